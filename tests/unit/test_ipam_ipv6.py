"""IPv6 and dual-stack IPAM on the in-memory datastore: Calico's keys, /122 blocks, one call per family."""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest

from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam import check as ipam_check
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.block import Block
from felixpy.ipam.errors import NoQualifiedPoolError, PoolExhaustedError
from felixpy.ipam.pools import parse_pool
from felixpy.ipam.usage import utilisation
from felixpy.ipam.reservations import Reservations

V6 = ipaddress.IPv6Address


def add_pool(store: MemoryDatastore, name: str, cidr: str, **spec: Any) -> None:
    store.create(keys.resource_key("ippools", name),
                 {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
                  "spec": {"cidr": cidr, **spec}})


@pytest.fixture
def store() -> MemoryDatastore:
    s = MemoryDatastore()
    add_pool(s, "v4", "10.244.0.0/16", blockSize=26)
    add_pool(s, "v6", "fd00:10:244::/64")  # no blockSize: Calico's IPv6 default, /122
    return s


def new_ipam(store: MemoryDatastore) -> IPAM:
    return IPAM(store, cache_ttl=0, rng=random.Random(7))


def test_ipv6_pool_defaults_to_122_blocks_and_uses_calicos_keys(store: MemoryDatastore) -> None:
    ipam = new_ipam(store)
    [ip6] = ipam.auto_assign(num=1, handle="h1", attrs={"node": "n1"}, node="n1", version=6)
    assert isinstance(ip6, V6) and ip6 in ipaddress.ip_network("fd00:10:244::/64")
    [block] = ipam.affine_blocks("n1")
    net = ipaddress.ip_network(block)
    assert net.prefixlen == 122 and ip6 in net
    # Calico's etcd layout: .../assignment/ipv6/block/<addr>-<len> and .../host/<node>/ipv6/block/...
    assert store.get(f"/calico/ipam/v2/assignment/ipv6/block/{net.network_address}-122").value["cidr"] == block
    assert store.get(f"/calico/ipam/v2/host/n1/ipv6/block/{net.network_address}-122").value["state"] == "confirmed"
    assert len(Block.from_json(store.get(keys.block_key(block)).value).allocations) == 64


def test_dual_stack_pod_gets_one_address_of_each_family_under_one_handle(store: MemoryDatastore) -> None:
    ipam = new_ipam(store)
    attrs = {"node": "n1", "namespace": "x", "pod": "a"}
    [ip4] = ipam.auto_assign(num=1, handle="k8s-pod-network.c1", attrs=attrs, node="n1", version=4)
    [ip6] = ipam.auto_assign(num=1, handle="k8s-pod-network.c1", attrs=attrs, node="n1", version=6)
    assert ip4.version == 4 and ip6.version == 6
    assert sorted(ipam.ips_by_handle("k8s-pod-network.c1"), key=lambda a: a.version) == [ip4, ip6]
    assert ipam.get_assignment(ip6).attrs == attrs  # type: ignore[union-attr]
    # Both families' blocks are the node's, and releasing the handle frees both addresses.
    assert {ipaddress.ip_network(b).version for b in ipam.affine_blocks("n1")} == {4, 6}
    assert sorted(ipam.release_by_handle("k8s-pod-network.c1"), key=lambda a: a.version) == [ip4, ip6]
    assert ipam.ips_by_handle("k8s-pod-network.c1") == []


def test_requested_pools_must_be_of_the_requests_family(store: MemoryDatastore) -> None:
    ipam = new_ipam(store)
    [ip6] = ipam.auto_assign(num=1, handle="h", attrs={}, node="n1", pools=["v6"], version=6)
    assert ip6.version == 6
    # libcalico-go looks a requested pool up among the request family's enabled pools only.
    with pytest.raises(NoQualifiedPoolError, match="the requested pool v4 does not exist or is not an enabled IPv6"):
        ipam.auto_assign(num=1, handle="h2", attrs={}, node="n1", pools=["v4"], version=6)
    store.delete(keys.resource_key("ippools", "v6"))
    with pytest.raises(NoQualifiedPoolError, match="no enabled IPv6 pool selects node n1"):
        ipam.auto_assign(num=1, handle="h3", attrs={}, node="n1", version=6)


def test_ipv6_pool_exhaustion_borrowing_and_release(store: MemoryDatastore) -> None:
    add_pool(store, "tiny", "fd00:99::/122", blockSize=123)  # two blocks of 32
    store.delete(keys.resource_key("ippools", "v6"))
    ipam = new_ipam(store)
    got = ipam.auto_assign(num=64, handle="n1", attrs={"node": "n1"}, node="n1", version=6)
    assert len(set(got)) == 64
    with pytest.raises(PoolExhaustedError, match="no free IPv6 address in pools \\[fd00:99::/122\\]"):
        ipam.auto_assign(num=1, handle="n2", attrs={"node": "n2"}, node="n2", version=6)
    ipam.release_ips([got[0]])
    # n2 has no block and the pool has none free: it borrows the address from n1's block.
    [borrowed] = ipam.auto_assign(num=1, handle="n2", attrs={"node": "n2"}, node="n2", version=6)
    assert borrowed == got[0]


def test_ipv6_reservations_are_skipped(store: MemoryDatastore) -> None:
    ipam = new_ipam(store)
    [first] = ipam.auto_assign(num=1, handle="a", attrs={}, node="n1", version=6)
    block = ipaddress.ip_network(ipam.affine_blocks("n1")[0])
    store.create(keys.resource_key("ipreservations", "r"),
                 {"kind": "IPReservation", "metadata": {"name": "r"},
                  "spec": {"reservedCIDRs": [str(first + 1), str(first + 2)]}})
    got = ipam.auto_assign(num=3, handle="b", attrs={}, node="n1", version=6)
    assert first + 1 not in got and first + 2 not in got and all(ip in block for ip in got)
    assert Reservations.of(["fd00::/127", "10.0.0.0/31"]).reserved_count(ipaddress.ip_network("fd00::/122")) == 2


def test_check_and_show_cover_ipv6(store: MemoryDatastore) -> None:
    ipam = new_ipam(store)
    [ip6] = ipam.auto_assign(num=1, handle="h", attrs={"node": "n1"}, node="n1", version=6)
    report = ipam_check.check(store)
    assert report.blocks == 1 and report.leaked_ips() == [str(ip6)]  # allocated, used by nobody
    pools = [p for p in (parse_pool(kv.value) for kv in store.list(keys.resource_prefix("ippools"))[0]) if p]
    shown = {u.cidr: u for u in utilisation(store, pools, Reservations())}
    assert shown["fd00:10:244::/64"].in_use == 1 and shown["10.244.0.0/16"].in_use == 0
    assert [b.cidr for b in shown["fd00:10:244::/64"].blocks] == ipam.affine_blocks("n1")
