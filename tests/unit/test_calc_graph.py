"""The calc graph as state sequences: datastore updates in (through the dispatcher), desired routes
and NAT out."""

from __future__ import annotations

from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.messages import Route


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

