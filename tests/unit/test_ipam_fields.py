"""The IPPool and IPAM fields users rely on, on the in-memory datastore (issue 9, IPAM part).

allowedUses, namespaceSelector, requested pools, IPReservations, releases guarded by handle and
sequence number, `felixctl ipam split`, `ipam show --show-borrowed` and the reserved column.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import random
from pathlib import Path
from typing import Any

import pytest

from felixpy.ctl import ipam_cmd
from felixpy.ctl.migrate import set_datastore_ready
from felixpy.datastore import keys
from felixpy.datastore.api import NotFound
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam.allocator import IPAM, ReleaseOptions
from felixpy.ipam.block import Block, ReleaseGuard, StaleRelease
from felixpy.ipam.config import IPAMConfig
from felixpy.ipam.errors import NoQualifiedPoolError, PoolExhaustedError, StaleReleaseError
from felixpy.ipam.reservations import Reservations
from felixpy.ipam.split import split_cidr
from felixpy.model.resources import ValidationError, validate

IP = ipaddress.IPv4Address
NET = ipaddress.ip_network


def add_pool(store: MemoryDatastore, name: str, cidr: str, block_size: int = 28, **spec: Any) -> None:
    pool = validate({"kind": "IPPool", "metadata": {"name": name}, "spec": {"cidr": cidr, "blockSize": block_size, **spec}})
    store.create(keys.resource_key("ippools", name), pool)


def reserve(store: MemoryDatastore, name: str, *cidrs: str) -> None:
    res = validate({"kind": "IPReservation", "metadata": {"name": name}, "spec": {"reservedCIDRs": list(cidrs)}})
    store.create(keys.resource_key("ipreservations", name), res)


@pytest.fixture
def store() -> MemoryDatastore:
    return MemoryDatastore()


def new_ipam(store: MemoryDatastore) -> IPAM:
    return IPAM(store, cache_ttl=0, rng=random.Random(3))


def pod(ipam: IPAM, handle: str, node: str = "n1", num: int = 1, **kw: Any) -> list[IP]:
    return ipam.auto_assign(num=num, handle=handle, attrs={"node": node, "namespace": "ns", "pod": handle},
                            node=node, **kw)


def ctl(store: MemoryDatastore, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="felixctl")
    ipam_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = ipam_cmd.run(args, store, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# -- allowedUses ---------------------------------------------------------------------------------------
def test_a_load_balancer_pool_never_gives_pod_or_tunnel_addresses(store: MemoryDatastore) -> None:
    add_pool(store, "lb", "10.9.0.0/24", allowedUses=["LoadBalancer"])
    ipam = new_ipam(store)
    with pytest.raises(NoQualifiedPoolError, match=r"allows use Workload \(allowedUses: lb \['LoadBalancer'\]\)"):
        pod(ipam, "a")
    with pytest.raises(NoQualifiedPoolError, match="allows use Tunnel"):
        pod(ipam, "t", use="Tunnel")
    with pytest.raises(NoQualifiedPoolError, match="allows use Workload"):
        pod(ipam, "b", pools=["lb"])  # naming the pool does not get round allowedUses
    assert store.list(keys.BLOCKS)[0] == []  # nothing was claimed


def test_uses_pick_the_pool_for_pods_and_tunnels(store: MemoryDatastore) -> None:
    add_pool(store, "lb", "10.9.0.0/24", allowedUses=["LoadBalancer"])
    add_pool(store, "tun", "10.8.0.0/24", allowedUses=["Tunnel"])
    add_pool(store, "pods", "10.7.0.0/24", allowedUses=["Workload"])
    add_pool(store, "both", "10.6.0.0/24", disabled=True)  # the default uses, but disabled
    ipam = new_ipam(store)
    for i in range(20):  # more than one block: the claim path, not just one lucky block
        assert pod(ipam, f"p{i}")[0] in NET("10.7.0.0/24")
    assert pod(ipam, "t", use="Tunnel")[0] in NET("10.8.0.0/24")
    # The node now owns blocks in both pools; each use still only draws from its own.
    assert pod(ipam, "p-last")[0] in NET("10.7.0.0/24")


def test_assign_ip_checks_the_pools_use_and_that_it_is_enabled(store: MemoryDatastore) -> None:
    add_pool(store, "lb", "10.9.0.0/24", allowedUses=["LoadBalancer"])
    add_pool(store, "off", "10.5.0.0/24", disabled=True)
    ipam = new_ipam(store)
    with pytest.raises(NoQualifiedPoolError, match="IP pool lb, which does not allow use Workload"):
        ipam.assign_ip("10.9.0.5", handle="h", attrs={}, node="n1", use="Workload")
    with pytest.raises(NoQualifiedPoolError, match="not in any enabled IP pool"):
        ipam.assign_ip("10.5.0.5", handle="h", attrs={}, node="n1", use="Workload")
    assert store.list(keys.BLOCKS)[0] == [] and ipam.ips_by_handle("h") == []
    ipam.assign_ip("10.9.0.5", handle="lb-svc", attrs={}, node="n1")  # no use declared: as Calico, allowed


def test_pool_uses_are_validated() -> None:
    with pytest.raises(ValidationError, match="LoadBalancer cannot be combined"):
        validate({"kind": "IPPool", "metadata": {"name": "p"},
                  "spec": {"cidr": "10.0.0.0/24", "allowedUses": ["LoadBalancer", "Workload"]}})
    with pytest.raises(ValidationError, match=r"spec.allowedUses\[0\]"):
        validate({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/24", "allowedUses": ["Pods"]}})
    pool = validate({"kind": "IPPool", "metadata": {"name": "p"}, "spec": {"cidr": "10.0.0.0/24"}})
    assert pool["spec"]["allowedUses"] == ["Workload", "Tunnel"]


# -- namespaceSelector --------------------------------------------------------------------------------
def test_namespace_selector_and_node_selector_must_both_match(store: MemoryDatastore) -> None:
    add_pool(store, "blue", "10.1.0.0/24", namespaceSelector="team == 'blue'")
    add_pool(store, "blue-b", "10.2.0.0/24", namespaceSelector="team == 'blue'", nodeSelector="zone == 'b'")
    add_pool(store, "rest", "10.3.0.0/24", namespaceSelector="team != 'blue'")
    ipam = new_ipam(store)
    blue, red = {"team": "blue"}, {"team": "red"}
    for i in range(5):
        assert pod(ipam, f"b{i}", namespace_labels=blue, node_labels={"zone": "a"})[0] in NET("10.1.0.0/24")
        assert pod(ipam, f"r{i}", namespace_labels=red, node_labels={"zone": "a"})[0] in NET("10.3.0.0/24")
        assert pod(ipam, f"n{i}", node_labels={"zone": "a"})[0] in NET("10.3.0.0/24")  # no labels: != matches
    got = pod(ipam, "zb", node="n2", namespace_labels=blue, node_labels={"zone": "b"})[0]
    assert got in NET("10.1.0.0/24") or got in NET("10.2.0.0/24")
    set_spec(store, "rest", namespaceSelector="team == 'green'")
    with pytest.raises(NoQualifiedPoolError, match="no enabled IPv4 pool selects node n1 and namespace ns"):
        pod(ipam, "x", namespace_labels=red, node_labels={"zone": "a"})


def set_spec(store: MemoryDatastore, name: str, **spec: Any) -> None:
    kv = store.get(keys.resource_key("ippools", name))
    kv.value["spec"].update(spec)
    store.update(kv.key, kv.value, kv.revision)


def test_namespace_labels_are_only_read_when_a_pool_has_a_namespace_selector(store: MemoryDatastore) -> None:
    add_pool(store, "any", "10.1.0.0/24")
    ipam = new_ipam(store)
    calls: list[int] = []

    def labels() -> dict[str, str]:
        calls.append(1)
        return {"team": "blue"}

    pod(ipam, "a", namespace_labels=labels)
    assert calls == []
    set_spec(store, "any", namespaceSelector="team == 'blue'")
    pod(ipam, "b", namespace_labels=labels)
    assert calls == [1]


def test_requested_pools_skip_selectors_and_manual_mode_but_not_disabled(store: MemoryDatastore) -> None:
    # Calico's determinePools: named pools are used unconditionally (their selectors are not
    # consulted), as long as they exist and are enabled.
    add_pool(store, "zone-b", "10.1.0.0/24", nodeSelector="zone == 'b'", namespaceSelector="team == 'x'")
    add_pool(store, "manual", "10.2.0.0/24", assignmentMode="Manual")
    add_pool(store, "off", "10.3.0.0/24", disabled=True)
    ipam = new_ipam(store)
    assert pod(ipam, "a", pools=["zone-b"], node_labels={"zone": "a"})[0] in NET("10.1.0.0/24")
    assert pod(ipam, "b", pools=["10.2.0.0/24"])[0] in NET("10.2.0.0/24")
    with pytest.raises(NoQualifiedPoolError, match="the requested pool off does not exist or is not an enabled IPv4 pool"):
        pod(ipam, "c", pools=["off"])
    with pytest.raises(NoQualifiedPoolError, match="the requested pool 10.4.0.0/24 does not exist"):
        pod(ipam, "d", pools=["10.4.0.0/24"])


# -- IPReservations ------------------------------------------------------------------------------------
def test_reservation_validation() -> None:
    res = validate({"kind": "IPReservation", "metadata": {"name": "r"},
                    "spec": {"reservedCIDRs": ["10.0.0.1", "10.0.1.0/28", "fd00::/120"]}})
    assert res["spec"]["reservedCIDRs"] == ["10.0.0.1", "10.0.1.0/28", "fd00::/120"]
    with pytest.raises(ValidationError, match=r'spec.reservedCIDRs\[1\]: invalid CIDR "10.0.0.300"'):
        validate({"kind": "IPReservation", "metadata": {"name": "r"}, "spec": {"reservedCIDRs": ["10.0.0.1", "10.0.0.300"]}})
    with pytest.raises(ValidationError, match="spec.cidrs: unknown field"):
        validate({"kind": "IPReservation", "metadata": {"name": "r"}, "spec": {"cidrs": ["10.0.0.1"]}})


def test_reservations_merge_and_count() -> None:
    r = Reservations.of(["10.0.0.0/30", "10.0.0.2", "10.0.0.4/30", "fd00::1", "10.0.1.7/24"])
    # IPv6 reservations hold IPv6 addresses back (merged apart from the IPv4 ones).
    assert r.nets == (NET("10.0.0.0/29"), NET("10.0.1.0/24"), ipaddress.ip_network("fd00::1/128"))
    assert r.matches(ipaddress.ip_address("fd00::1")) and not r.matches(ipaddress.ip_address("fd00::2"))
    assert r.reserved_count(ipaddress.ip_network("fd00::/122")) == 1
    assert r.reserved_count(NET("10.0.0.0/28")) == 8
    assert r.covers(NET("10.0.0.0/29")) and not r.covers(NET("10.0.0.0/28"))
    assert r.covers(NET("10.0.1.16/28"))
    assert r.matches(IP("10.0.0.7")) and not r.matches(IP("10.0.0.8"))


def test_auto_assign_never_hands_out_reserved_addresses(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/26", 28)  # four blocks of 16
    reserve(store, "r1", "10.0.0.0/29", "10.0.0.9")  # half of the first block and one more
    reserve(store, "r2", "10.0.0.16/28")  # the whole second block
    ipam = new_ipam(store)
    got = pod(ipam, "a", num=64 - 8 - 1 - 16)
    assert len(set(got)) == 39
    reserved = Reservations.of(["10.0.0.0/29", "10.0.0.9", "10.0.0.16/28"])
    assert not any(reserved.matches(ip) for ip in got)
    assert "10.0.0.16/28" not in [keys.parse_key(kv.key).name for kv in store.list(keys.BLOCKS)[0]]
    with pytest.raises(PoolExhaustedError):
        pod(ipam, "b")
    # A specific address is not held back by a reservation (Calico's AssignIP).
    ipam.assign_ip("10.0.0.9", handle="pinned", attrs={}, node="n1", use="Workload")
    assert ipam.ips_by_handle("pinned") == [IP("10.0.0.9")]


def test_reserved_addresses_are_skipped_when_borrowing_too(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)  # one block only
    ipam = new_ipam(store)
    pod(ipam, "n1-first", node="n1")
    reserve(store, "r", "10.0.0.0/29")
    got = pod(ipam, "borrower", node="n2", num=8)  # the 8 free, unreserved addresses of n1's block
    assert not any(ip in NET("10.0.0.0/29") for ip in got)
    with pytest.raises(PoolExhaustedError):
        pod(ipam, "more", node="n2")


def test_a_reservation_never_evicts_an_allocation(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    (first,) = pod(ipam, "a")
    reserve(store, "r", f"{first}/32")
    assert ipam.get_assignment(first) is not None
    assert ipam.release_ips([first]) == []
    assert first not in pod(ipam, "b", num=15)


def test_show_counts_reserved_addresses(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    (first,) = pod(ipam, "a")
    reserve(store, "r", f"{first}/32", "10.0.0.12/30")
    code, out, _ = ctl(store, "ipam", "show", "--show-blocks")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    assert code == 0
    # 16 addresses: 1 in use (and reserved), 5 reserved, 16 - 1 - 5 + 1 free.
    assert rows[1] == ["IP Pool", "10.0.0.0/28", "16", "1 (6%)", "5 (31%)", "11 (69%)"]
    assert rows[2] == ["Block", "10.0.0.0/28", "16", "1 (6%)", "5 (31%)", "11 (69%)"]


# -- releases guarded by handle and sequence number ----------------------------------------------------
def test_block_release_refuses_a_stale_sequence_number() -> None:
    block = Block.new("10.0.0.0/28", "host:n1")
    (ip,) = block.assign(1, "h1", {})
    seq = block.allocation(ip).sequence_number  # type: ignore[union-attr]
    block.release([ip])
    assert block.assign_ip(ip, "h1", {}) == ip  # the same address, a new allocation
    with pytest.raises(StaleRelease, match="assigned again since it was looked at"):
        block.release_counting([ip], {ip: ReleaseGuard(sequence_number=seq)})
    with pytest.raises(StaleRelease, match="now belongs to handle h1, not h0"):
        block.release_counting([ip], {ip: ReleaseGuard(handle="h0")})
    assert block.allocation(ip) is not None  # nothing changed
    current = block.allocation(ip).sequence_number  # type: ignore[union-attr]
    assert block.release_counting([ip], {ip: ReleaseGuard("h1", current)}) == ([], {"h1": 1})


def test_release_with_options_frees_only_the_allocation_that_was_seen(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    (ip,) = pod(ipam, "old")
    seen = ipam.get_assignment(ip)
    assert seen is not None and seen.sequence_number is not None
    # Between the scan and the release the address is released and given to another pod.
    ipam.release_by_handle("old")
    ipam.assign_ip(ip, handle="new", attrs={"pod": "new"}, node="n1")
    (other,) = pod(ipam, "other")
    outcome = ipam.release([ReleaseOptions(ip, "old", seen.sequence_number), ReleaseOptions(IP("10.0.0.13"))])
    assert outcome.stale and "not released" in outcome.stale[0]
    assert outcome.released == () and ipam.ips_by_handle("new") == [ip]
    with pytest.raises(StaleReleaseError):
        ipam.release([ReleaseOptions(ip, sequence_number=seen.sequence_number)], strict=True)
    now = ipam.get_assignment(other)
    assert now is not None
    outcome = ipam.release([ReleaseOptions(other, "other", now.sequence_number)])
    assert outcome.released == (other,) and ipam.ips_by_handle("other") == []
    with pytest.raises(NotFound):
        store.get(keys.handle_key("other"))


def test_release_from_report_uses_the_reported_sequence_numbers(store: MemoryDatastore, tmp_path: Path) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    leaks = pod(ipam, "leaked", num=2)
    report_file = tmp_path / "r.json"
    ctl(store, "ipam", "check", "-o", str(report_file))
    problems = json.loads(report_file.read_text())["problems"]
    assert {p["ip"]: p["sequenceNumber"] for p in problems} == {
        str(ip): ipam.get_assignment(ip).sequence_number for ip in leaks}  # type: ignore[union-attr]
    # leaks[1] is released and assigned again (to a handle that is leaked too) after the report.
    ipam.release_ips([leaks[1]])
    ipam.assign_ip(leaks[1], handle="leaked", attrs={}, node="n1")
    code, out, _ = ctl(store, "ipam", "release", "--from-report", str(report_file))
    assert code == 0
    assert "Not released: address" in out and "Released 0 of 2" in out  # one stale address holds its block
    assert ipam.get_assignment(leaks[0]) is not None and ipam.get_assignment(leaks[1]) is not None
    ctl(store, "ipam", "check", "-o", str(report_file))
    code, out, _ = ctl(store, "ipam", "release", "--from-report", str(report_file))
    assert "Released 2 of 2" in out and ipam.ips_by_handle("leaked") == []


def test_release_ip_is_guarded_by_what_it_read(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    (ip,) = pod(ipam, "a")
    code, out, _ = ctl(store, "ipam", "release", f"--ip={ip}")
    assert code == 0 and f"Successfully released IP address {ip}" in out
    assert ipam.get_assignment(ip) is None


# -- ipam show --show-borrowed ----------------------------------------------------------------------
def test_show_borrowed(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    pod(ipam, "mine", node="n1")
    ipam.set_config(IPAMConfig(strict_affinity=False))
    (borrowed,) = pod(ipam, "theirs", node="n2")
    ipam.auto_assign(num=1, handle="vxlan-tunnel-addr-n3", attrs={"node": "n3", "type": "vxlanTunnelAddress"},
                     node="n3", use="Tunnel")
    ipam.auto_assign(num=1, handle="anon", attrs={}, node="n1")
    code, out, _ = ctl(store, "ipam", "show", "--show-borrowed")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    assert code == 0
    assert rows[0] == ["IP", "BORROWING-NODE", "BLOCK", "BLOCK OWNER", "TYPE", "ALLOCATED-TO"]
    assert rows[1] == [str(borrowed), "n2", "10.0.0.0/28", "n1", "pod", "ns/theirs"]
    assert rows[2][1:] == ["n3", "10.0.0.0/28", "n1", "vxlanTunnelAddress", ""]
    assert "found 1 IP allocations without an explicit node association" in out


# -- ipam split ----------------------------------------------------------------------------------------
def test_split_cidr() -> None:
    assert split_cidr("10.0.0.0/24", 4) == ["10.0.0.0/26", "10.0.0.64/26", "10.0.0.128/26", "10.0.0.192/26"]
    for bad in (0, 1, 3, 6):
        with pytest.raises(Exception, match="not a power of 2"):
            split_cidr("10.0.0.0/24", bad)
    with pytest.raises(Exception, match="not large enough"):
        split_cidr("10.0.0.0/31", 4)


def test_split_needs_the_lock_and_keeps_allocations(store: MemoryDatastore) -> None:
    add_pool(store, "big", "10.0.0.0/24", 26, natOutgoing=True, nodeSelector="all()")
    ipam = new_ipam(store)
    held = pod(ipam, "a", num=3)
    code, _, err = ctl(store, "ipam", "split", "4", "--name", "big")
    assert code == 1 and err == ("error: datastore is not locked: run `felixctl datastore migrate lock` "
                                 "before splitting an IP pool\n")
    set_datastore_ready(store, False)
    for argv, message in (
        (["3", "--name", "big"], "not a power of 2"),
        (["8", "--name", "big"], "gives /27 pools, smaller than the pool's /26 blocks"),
        (["2", "--name", "nope"], "unable to find IP pool with name nope"),
        (["2", "--cidr", "10.1.0.0/24"], "unable to find an IP pool with CIDR 10.1.0.0/24"),
    ):
        code, _, err = ctl(store, "ipam", "split", *argv)
        assert code == 1 and message in err and err.count("\n") == 1, err
    assert store.get(keys.resource_key("ippools", "big")).value["spec"]["disabled"] is False  # untouched

    code, out, _ = ctl(store, "ipam", "split", "4", "--cidr", "10.0.0.0/24")
    assert code == 0 and "IP Pool big was successfully split into 4 smaller pools." in out
    with pytest.raises(NotFound):
        store.get(keys.resource_key("ippools", "big"))
    pools = {kv.value["metadata"]["name"]: kv.value["spec"] for kv in store.list(keys.resource_prefix("ippools"))[0]}
    assert sorted(pools) == ["split-big-0", "split-big-1", "split-big-2", "split-big-3"]
    assert [pools[f"split-big-{i}"]["cidr"] for i in range(4)] == [
        "10.0.0.0/26", "10.0.0.64/26", "10.0.0.128/26", "10.0.0.192/26"]
    assert all(p["natOutgoing"] is True and p["disabled"] is False and p["blockSize"] == 26 for p in pools.values())
    assert ipam.ips_by_handle("a") == held
    assert pod(ipam, "b")[0] in NET("10.0.0.0/24")


def test_datastore_migration_carries_every_kind() -> None:
    # A kind missing here would be silently dropped by `felixctl datastore migrate export`.
    from felixpy.ctl.migrate import EXPORT_ORDER
    from felixpy.model.resources import KINDS

    assert sorted(EXPORT_ORDER) == sorted(KINDS)
