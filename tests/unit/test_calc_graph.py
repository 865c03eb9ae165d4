"""The calc graph as state sequences: datastore updates in (through the dispatcher), desired routes,
NAT and encapsulation out — and, for the sequences, the routes the route driver leaves in a fake
kernel after each step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.dataplane.drivers.routes import RouteTable
from felixpy.dataplane.managers.routes import RouteManager
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.messages import CalcRoutes, RemoteVtep, Route
from tests.fakes.netlink import FakeNetlink


def node(name: str, ip: str) -> KVUpdate:
    return KVUpdate(keys.resource_key("nodes", name),
                    {"metadata": {"name": name, "labels": {"zone": "a"}},
                     "spec": {"bgp": {"ipv4Address": f"{ip}/24"}}}, 1)


def affinity(node_name: str, cidr: str, state: str = "confirmed") -> KVUpdate:
    return KVUpdate(keys.affinity_key(node_name, cidr), {"state": state, "deleted": False}, 1)


def wep(node_name: str, ns: str, pod: str, ip: str, iface: str = "cali0123456789a") -> KVUpdate:
    key = keys.resource_key("workloadendpoints", f"{node_name}-k8s-{pod}-eth0", ns)
    return KVUpdate(key, {"metadata": {"namespace": ns, "labels": {"app": pod}},
                          "spec": {"node": node_name, "pod": pod, "interfaceName": iface,
                                   "ipNetworks": [f"{ip}/32"]}}, 1)


def pool(name: str, cidr: str, nat: bool = True) -> KVUpdate:
    return KVUpdate(keys.resource_key("ippools", name), {"spec": {"cidr": cidr, "natOutgoing": nat}}, 1)


def deleted(update: KVUpdate) -> KVUpdate:
    return KVUpdate(update.key, None, 2)


def feed(graph: CalcGraph, *updates: KVUpdate) -> CalcGraph:
    Dispatcher(graph).on_updates(updates)
    return graph


STATE = [
    node("n1", "192.0.2.11"), node("n2", "192.0.2.12"),
    affinity("n1", "10.244.1.0/26"), affinity("n2", "10.244.2.0/26"),
    affinity("n2", "10.244.3.0/26", state="pending"),
    wep("n1", "x", "a", "10.244.1.1"),
    wep("n2", "x", "b", "10.244.2.1", iface="calibbbbbbbbbbb"),
    wep("n2", "x", "borrowed", "10.244.1.7", iface="caliccccccccccc"),
]


def test_routes_mode_programs_local_blackhole_remote_and_borrowed():
    g = feed(CalcGraph("n1", remote_routes_from_datastore=True), *STATE)
    assert g.routes() == {
        Route("10.244.1.1/32", iface="cali0123456789a"),
        Route("10.244.1.0/26", type="blackhole"),
        Route("10.244.2.0/26", gateway="192.0.2.12"),
        # a pod on n2 whose address came from n1's block: /32 via n2 beats n1's own blackhole
        Route("10.244.1.7/32", gateway="192.0.2.12"),
    }
    assert g.node_labels() == {"zone": "a"}


def test_bgp_backend_leaves_remote_routes_to_bgp():
    g = feed(CalcGraph("n1", remote_routes_from_datastore=False), *STATE)
    assert g.routes() == {
        Route("10.244.1.1/32", iface="cali0123456789a"),
        Route("10.244.1.0/26", type="blackhole"),
    }


def test_output_is_a_function_of_state_whatever_the_order():
    forward = feed(CalcGraph("n2", remote_routes_from_datastore=True), *STATE).routes()
    backward = feed(CalcGraph("n2", remote_routes_from_datastore=True), *reversed(STATE)).routes()
    assert forward == backward
    # Adding and removing everything again returns to the same output.
    g = feed(CalcGraph("n2", remote_routes_from_datastore=True), *STATE)
    feed(g, *(deleted(u) for u in STATE))
    assert g.routes() == set()
    feed(g, *STATE)
    assert g.routes() == forward


def test_removals_withdraw_routes():
    g = feed(CalcGraph("n1", remote_routes_from_datastore=True), *STATE)
    feed(g, deleted(STATE[1]))  # n2 vanished: its IP is unknown, its routes go
    assert all(r.gateway is None for r in g.routes())
    feed(g, deleted(STATE[5]))  # local pod deleted
    assert Route("10.244.1.1/32", iface="cali0123456789a") not in g.routes()


def test_invalid_values_are_treated_as_absent():
    g = feed(CalcGraph("n1", remote_routes_from_datastore=True), *STATE)
    bad = KVUpdate(STATE[5].key, {"spec": {"ipNetworks": ["not-an-ip"]}}, 3)
    feed(g, bad)
    assert not any(r.iface == "cali0123456789a" for r in g.routes())


def test_nat_state_from_pools():
    g = feed(CalcGraph("n1", remote_routes_from_datastore=True),
             pool("a", "10.244.0.0/16"), pool("b", "10.99.0.0/16", nat=False))
    nat = g.nat()
    assert nat.masq_pools == {"10.244.0.0/16"}
    assert nat.all_pools == {"10.244.0.0/16", "10.99.0.0/16"}


# -- state sequences, through to a fake kernel ----------------------------------------------------

POD_IFACE = "cali0123456789a"


@dataclass
class Node1:
    """n1's pipeline without the agent's threads: dispatcher → calc graph → route manager → driver."""

    remote_routes_from_datastore: bool = True
    netlink: FakeNetlink = field(default_factory=lambda: FakeNetlink({"eth0": 2, POD_IFACE: 7,
                                                                       names.VXLAN_DEVICE: 8,
                                                                       names.IPIP_DEVICE: 9}))

    def __post_init__(self) -> None:
        self.graph = CalcGraph("n1", remote_routes_from_datastore=self.remote_routes_from_datastore)
        self.dispatcher = Dispatcher(self.graph)
        self.table = RouteTable(netlink=self.netlink)
        self.manager = RouteManager(self.table)

    def step(self, *updates: KVUpdate) -> set[Route]:
        """Feed the updates, apply, and return the routes in the kernel (as Route values)."""
        self.dispatcher.on_updates(updates)
        self.manager.on_update(CalcRoutes(frozenset(self.graph.routes())))
        self.manager.complete_deferred_work()
        result = self.table.apply()
        assert not result.failed and not result.pending
        names_by_index = {index: name for name, index in self.netlink.links.items()}
        kernel = {Route(r.dst, type="blackhole") if r.type == "blackhole" else
                  Route(r.dst, gateway=r.gateway, iface=names_by_index.get(r.ifindex or -1), onlink=r.onlink)
                  for r in self.netlink.ours().values()}
        assert kernel == self.graph.routes()  # what the calc wants is exactly what the kernel has
        assert set(self.table.programmed.values()) == kernel
        return kernel


def vxlan_node(name: str, ip: str, tunnel: str | None = None, mac: str | None = None) -> KVUpdate:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": f"{ip}/24"}}
    if tunnel:
        spec["ipv4VXLANTunnelAddr"] = tunnel
    if mac:
        spec["vxlanTunnelMACAddr"] = mac
    return KVUpdate(keys.resource_key("nodes", name), {"metadata": {"name": name}, "spec": spec}, 1)


def encap_pool(vxlan: str = "Never", ipip: str = "Never") -> KVUpdate:
    return KVUpdate(keys.resource_key("ippools", "p"),
                    {"spec": {"cidr": "10.244.0.0/16", "vxlanMode": vxlan, "ipipMode": ipip}}, 1)


BLACKHOLE = Route("10.244.1.0/26", type="blackhole")
POD = Route("10.244.1.5/32", iface=POD_IFACE)


def test_sequence_endpoint_added_block_confirmed_endpoint_deleted() -> None:
    n1 = Node1()
    assert n1.step(node("n1", "192.0.2.11"), node("n2", "192.0.2.12"), pool("p", "10.244.0.0/16")) == set()
    # The CNI plugin got an address from a block whose affinity is still being claimed.
    pending = affinity("n1", "10.244.1.0/26", state="pending")
    assert n1.step(pending, wep("n1", "x", "a", "10.244.1.5")) == {POD}
    assert n1.step(affinity("n1", "10.244.1.0/26")) == {POD, BLACKHOLE}
    assert n1.graph.bgp_announcements() == {"10.244.1.0/26"}
    # n2's block, and a pod on n2 borrowing from n1's block (its /32 beats our blackhole).
    remote = Route("10.244.2.0/26", gateway="192.0.2.12")
    borrowed = Route("10.244.1.9/32", gateway="192.0.2.12")
    assert n1.step(affinity("n2", "10.244.2.0/26"),
                   wep("n2", "x", "b", "10.244.1.9", iface="calibbbbbbbbbbb")) == {POD, BLACKHOLE, remote, borrowed}
    assert n1.step(deleted(wep("n1", "x", "a", "10.244.1.5"))) == {BLACKHOLE, remote, borrowed}
    assert n1.step(deleted(wep("n2", "x", "b", "10.244.1.9"))) == {BLACKHOLE, remote}
    # The block released (pendingDeletion first, then gone): no longer ours to blackhole.
    assert n1.step(affinity("n1", "10.244.1.0/26", state="pendingDeletion")) == {remote}
    assert n1.step(deleted(affinity("n1", "10.244.1.0/26"))) == {remote}
    assert n1.step(deleted(node("n2", "192.0.2.12"))) == set()


def test_sequence_pool_encapsulation_changes() -> None:
    n1 = Node1(remote_routes_from_datastore=False)  # BGP backend: unencapsulated remote routes are BGP's
    mac2 = "66:00:00:00:00:02"
    base = (vxlan_node("n1", "192.0.2.11", "10.244.1.0", "66:00:00:00:00:01"),
            vxlan_node("n2", "192.0.2.12", "10.244.2.0", mac2),
            vxlan_node("n3", "198.51.100.13", "10.244.3.0", "66:00:00:00:00:03"),
            affinity("n1", "10.244.1.0/26"), affinity("n2", "10.244.2.0/26"), affinity("n3", "10.244.3.0/26"))
    assert n1.step(encap_pool(), *base) == {BLACKHOLE}
    assert n1.graph.encap().vxlan is False
    via_vxlan = {Route("10.244.2.0/26", gateway="10.244.2.0", iface=names.VXLAN_DEVICE, onlink=True),
                 Route("10.244.3.0/26", gateway="10.244.3.0", iface=names.VXLAN_DEVICE, onlink=True)}
    assert n1.step(encap_pool(vxlan="Always")) == {BLACKHOLE} | via_vxlan
    encap = n1.graph.encap()
    assert encap.vxlan and encap.vxlan_address == "10.244.1.0" and not encap.ipip
    assert RemoteVtep("n2", "192.0.2.12", "10.244.2.0", mac2) in encap.vteps
    # CrossSubnet: n2 shares n1's subnet and is reached directly, n3 still through the tunnel.
    assert n1.step(encap_pool(vxlan="CrossSubnet")) == {
        BLACKHOLE, Route("10.244.2.0/26", gateway="192.0.2.12"),
        Route("10.244.3.0/26", gateway="10.244.3.0", iface=names.VXLAN_DEVICE, onlink=True)}
    assert n1.step(encap_pool(ipip="Always")) == {
        BLACKHOLE, Route("10.244.2.0/26", gateway="192.0.2.12", iface=names.IPIP_DEVICE, onlink=True),
        Route("10.244.3.0/26", gateway="198.51.100.13", iface=names.IPIP_DEVICE, onlink=True)}
    assert n1.graph.encap().ipip and not n1.graph.encap().vxlan
    assert n1.step(encap_pool()) == {BLACKHOLE}


def test_sequence_node_vtep_changes() -> None:
    n1 = Node1()
    mac2, new_mac2 = "66:00:00:00:00:02", "66:00:00:00:00:22"
    n1.step(encap_pool(vxlan="Always"), vxlan_node("n1", "192.0.2.11", "10.244.1.0", "66:00:00:00:00:01"),
            affinity("n2", "10.244.2.0/26"))
    # n2 has no Node yet, then a Node without a VTEP: nothing to send its block to.
    assert n1.step(vxlan_node("n2", "192.0.2.12")) == set()
    assert n1.graph.encap().vteps == frozenset()
    tunnel = Route("10.244.2.0/26", gateway="10.244.2.0", iface=names.VXLAN_DEVICE, onlink=True)
    assert n1.step(vxlan_node("n2", "192.0.2.12", "10.244.2.0", mac2)) == {tunnel}
    assert n1.graph.encap().vteps == {RemoteVtep("n2", "192.0.2.12", "10.244.2.0", mac2)}
    # A new MAC changes the VTEP (FDB, neighbour), not the route.
    assert n1.step(vxlan_node("n2", "192.0.2.12", "10.244.2.0", new_mac2)) == {tunnel}
    assert n1.graph.encap().vteps == {RemoteVtep("n2", "192.0.2.12", "10.244.2.0", new_mac2)}
    # A new tunnel address moves the route's gateway; a new node IP moves the VTEP's.
    moved = Route("10.244.2.0/26", gateway="10.244.2.1", iface=names.VXLAN_DEVICE, onlink=True)
    assert n1.step(vxlan_node("n2", "192.0.2.12", "10.244.2.1", new_mac2)) == {moved}
    assert n1.step(vxlan_node("n2", "192.0.2.22", "10.244.2.1", new_mac2)) == {moved}
    assert n1.graph.encap().vteps == {RemoteVtep("n2", "192.0.2.22", "10.244.2.1", new_mac2)}
    assert n1.step(deleted(vxlan_node("n2", "192.0.2.22"))) == set()
    assert n1.graph.encap().vteps == frozenset()


@pytest.mark.parametrize("value", [
    {"spec": {"node": "n1", "ipNetworks": ["not-an-ip"], "interfaceName": POD_IFACE}},
    {"spec": {"ipNetworks": ["10.244.1.5/32"], "interfaceName": POD_IFACE}},  # no spec.node
    {"spec": {"node": "n1", "ipNetworks": ["10.244.1.5/32"], "interfaceName": POD_IFACE,
              "ports": [{"name": "web", "protocol": "TCP"}]}},  # a named port without a number
    "not an object",
])
def test_sequence_an_invalid_update_withdraws_like_a_delete(value: Any) -> None:
    n1 = Node1()
    good = wep("n1", "x", "a", "10.244.1.5")
    assert n1.step(node("n1", "192.0.2.11"), good) == {POD}
    assert n1.step(KVUpdate(good.key, value, 3)) == set()
    assert n1.step(good) == {POD}
