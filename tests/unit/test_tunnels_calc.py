"""Calc graph outputs for encapsulated pools: routes per mode (incl. CrossSubnet) and the VTEP state."""

from __future__ import annotations

from typing import Any

import pytest

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.messages import EncapState, RemoteVtep, Route

MAC1, MAC2, MAC3 = "66:00:00:00:00:01", "66:00:00:00:00:02", "66:00:00:00:00:03"


def node(name: str, cidr: str, *, vxlan: str | None = None, mac: str | None = None,
         ipip: str | None = None) -> KVUpdate:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": cidr}}
    if vxlan:
        spec["ipv4VXLANTunnelAddr"] = vxlan
    if mac:
        spec["vxlanTunnelMACAddr"] = mac
    if ipip:
        spec["bgp"]["ipv4IPIPTunnelAddr"] = ipip
    return KVUpdate(keys.resource_key("nodes", name), {"metadata": {"name": name}, "spec": spec}, 1)


def pool(cidr: str = "10.244.0.0/16", *, vxlan: str = "Never", ipip: str = "Never",
         disabled: bool = False) -> KVUpdate:
    return KVUpdate(keys.resource_key("ippools", "p"),
                    {"spec": {"cidr": cidr, "vxlanMode": vxlan, "ipipMode": ipip, "disabled": disabled}}, 1)


def affinity(node_name: str, cidr: str) -> KVUpdate:
    return KVUpdate(keys.affinity_key(node_name, cidr), {"state": "confirmed"}, 1)


def wep(node_name: str, pod: str, ip: str) -> KVUpdate:
    key = keys.resource_key("workloadendpoints", f"{node_name}-k8s-{pod}-eth0", "x")
    return KVUpdate(key, {"metadata": {"namespace": "x"},
                          "spec": {"node": node_name, "pod": pod, "interfaceName": "cali0123456789a",
                                   "ipNetworks": [f"{ip}/32"]}}, 1)


# n1 and n2 share 192.0.2.0/24; n3 is on another subnet.
NODES = [
    node("n1", "192.0.2.11/24", vxlan="10.244.1.0", mac=MAC1, ipip="10.244.1.1"),
    node("n2", "192.0.2.12/24", vxlan="10.244.2.0", mac=MAC2, ipip="10.244.2.1"),
    node("n3", "198.51.100.13/24", vxlan="10.244.3.0", mac=MAC3, ipip="10.244.3.1"),
    affinity("n1", "10.244.1.0/26"), affinity("n2", "10.244.2.0/26"), affinity("n3", "10.244.3.0/26"),
    wep("n3", "borrowed", "10.244.2.9"),
]


def graph(*updates: KVUpdate, backend_routes: bool = False) -> CalcGraph:
    g = CalcGraph("n1", remote_routes_from_datastore=backend_routes)
    Dispatcher(g).on_updates(updates)
    return g


def remote(g: CalcGraph) -> set[Route]:
    return {r for r in g.routes() if r.type != "blackhole" and r.iface != "cali0123456789a"}


def vx(dst: str, via: str) -> Route:
    return Route(dst, gateway=via, iface=names.VXLAN_DEVICE, onlink=True)


def tun(dst: str, via: str) -> Route:
    return Route(dst, gateway=via, iface=names.IPIP_DEVICE, onlink=True)


@pytest.mark.parametrize("backend_routes", [False, True])
def test_vxlan_always_routes_every_remote_block_via_its_vtep(backend_routes: bool) -> None:
    g = graph(pool(vxlan="Always"), *NODES, backend_routes=backend_routes)
    assert remote(g) == {
        vx("10.244.2.0/26", "10.244.2.0"),
        vx("10.244.3.0/26", "10.244.3.0"),
        vx("10.244.2.9/32", "10.244.3.0"),  # borrowed: via the VTEP of the node hosting it
    }


def test_vxlan_cross_subnet_same_subnet_is_plain() -> None:
    g = graph(pool(vxlan="CrossSubnet"), *NODES)
    assert remote(g) == {
        Route("10.244.2.0/26", gateway="192.0.2.12"),
        vx("10.244.3.0/26", "10.244.3.0"),
        vx("10.244.2.9/32", "10.244.3.0"),
    }


def test_ipip_always_and_cross_subnet() -> None:
    assert remote(graph(pool(ipip="Always"), *NODES)) == {
        tun("10.244.2.0/26", "192.0.2.12"),
        tun("10.244.3.0/26", "198.51.100.13"),
        tun("10.244.2.9/32", "198.51.100.13"),
    }
    assert remote(graph(pool(ipip="CrossSubnet"), *NODES)) == {
        Route("10.244.2.0/26", gateway="192.0.2.12"),
        tun("10.244.3.0/26", "198.51.100.13"),
        tun("10.244.2.9/32", "198.51.100.13"),
    }


def test_no_encap_remote_routes_only_from_the_datastore_backend() -> None:
    assert remote(graph(pool(), *NODES)) == set()
    assert remote(graph(pool(), *NODES, backend_routes=True)) == {
        Route("10.244.2.0/26", gateway="192.0.2.12"),
        Route("10.244.3.0/26", gateway="198.51.100.13"),
        Route("10.244.2.9/32", gateway="198.51.100.13"),
    }


def test_node_without_vtep_gets_no_vxlan_route_until_it_has_one() -> None:
    g = graph(pool(vxlan="Always"), *NODES, node("n2", "192.0.2.12/24"))
    assert vx("10.244.2.0/26", "10.244.2.0") not in g.routes()
    assert all(v.node != "n2" for v in g.encap().vteps)
    Dispatcher(g).on_update(node("n2", "192.0.2.12/24", vxlan="10.244.2.0", mac=MAC2))
    assert vx("10.244.2.0/26", "10.244.2.0") in g.routes()


def test_own_block_stays_blackholed_with_encap() -> None:
    g = graph(pool(vxlan="Always"), *NODES)
    assert Route("10.244.1.0/26", type="blackhole") in g.routes()


def test_encap_state() -> None:
    g = graph(pool(vxlan="Always"), *NODES)
    assert g.encap() == EncapState(
        local_ip="192.0.2.11", vxlan=True, vxlan_address="10.244.1.0", vxlan_mac=MAC1,
        vteps=frozenset({RemoteVtep("n2", "192.0.2.12", "10.244.2.0", MAC2),
                         RemoteVtep("n3", "198.51.100.13", "10.244.3.0", MAC3)}),
        ipip=False, ipip_address=None)
    assert graph(pool(ipip="Always"), *NODES).encap() == EncapState(
        local_ip="192.0.2.11", ipip=True, ipip_address="10.244.1.1")
    # A disabled pool keeps its routes (addresses still in use) but needs no device.
    disabled = graph(pool(vxlan="Always", disabled=True), *NODES)
    assert not disabled.encap().vxlan
    assert vx("10.244.2.0/26", "10.244.2.0") in disabled.routes()


def test_pool_with_both_modes_is_ignored() -> None:
    g = graph(pool(vxlan="Always", ipip="Always"), *NODES)
    assert g.encap() == EncapState(local_ip="192.0.2.11")
    assert remote(g) == set()
