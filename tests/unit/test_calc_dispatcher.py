"""The dispatcher and the decoding behind it (calc/dispatcher.py, calc/updates.py): keys to kinds,
values decoded once, invalid values delivered as deletions and logged once, fan-out by kind."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.calc.policy import PolicyCalc
from felixpy.calc.updates import (BlockAffinity, IPPool, Kind, NamedProfile, Node, Update, WorkloadEndpoint,
                                  decode)
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.ipam.block import Block
from felixpy.node.bgp import BGPResources
from policy.model import Policy


class Recorder:
    """Registers for the given kinds and keeps what it is handed."""

    def __init__(self, *kinds: Kind) -> None:
        self.kinds = kinds
        self.updates: list[Update[Any]] = []

    def register_with(self, dispatcher: Dispatcher) -> None:
        for kind in self.kinds:
            dispatcher.register(kind, self.updates.append)


def kv(key: str, value: Any, revision: int = 7) -> KVUpdate:
    return KVUpdate(key, value, revision)


WEP_KEY = keys.resource_key("workloadendpoints", "n1-k8s-a-eth0", "x")
WEP: dict[str, Any] = {"metadata": {"labels": {"app": "web"}},
       "spec": {"node": "n1", "pod": "a", "interfaceName": "cali1", "mac": "ee:ee:ee:ee:ee:ee",
                "ipNetworks": ["10.244.1.5/32", "fd00::5/128"], "profiles": ["kns.x"],
                "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}}


def test_updates_reach_only_the_handlers_of_their_kind() -> None:
    nodes, weps = Recorder(Kind.NODE), Recorder(Kind.WORKLOAD_ENDPOINT, Kind.NODE)
    dispatcher = Dispatcher(nodes, weps)
    dispatcher.on_updates([
        kv(keys.resource_key("nodes", "n1"), {"spec": {}}),
        kv(WEP_KEY, WEP),
        kv(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16"}}),  # nobody's
        kv(keys.handle_key("k8s-pod-network.abc"), {"block": {}}),
    ])
    assert [u.kind for u in nodes.updates] == [Kind.NODE]
    assert [u.kind for u in weps.updates] == [Kind.NODE, Kind.WORKLOAD_ENDPOINT]
    wep = weps.updates[1]
    assert (wep.key, wep.name, wep.namespace, wep.revision) == (WEP_KEY, "n1-k8s-a-eth0", "x", 7)


def test_kinds_nobody_handles_are_not_even_decoded(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = Dispatcher(Recorder(Kind.NODE))
    with caplog.at_level(logging.WARNING):
        dispatcher.on_update(kv(keys.resource_key("ippools", "p"), {"spec": {"cidr": "bad"}}))
    assert caplog.records == []


def test_an_invalid_value_is_one_warning_and_a_deletion_for_every_handler(
        caplog: pytest.LogCaptureFixture) -> None:
    graph, policy, recorder = CalcGraph("n1", remote_routes_from_datastore=True), PolicyCalc("n1"), \
        Recorder(Kind.WORKLOAD_ENDPOINT)
    dispatcher = Dispatcher(graph, policy, recorder)
    dispatcher.on_update(kv(WEP_KEY, WEP))
    assert graph.local_endpoints() and policy.endpoints()
    with caplog.at_level(logging.WARNING):
        dispatcher.on_update(kv(WEP_KEY, {**WEP, "spec": {**WEP["spec"], "ipNetworks": ["10.244.1.500/32"]}}))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "kind=WorkloadEndpoint" in warnings[0] and WEP_KEY in warnings[0] and "10.244.1.500" in warnings[0]
    assert recorder.updates[-1].value is None
    assert graph.local_endpoints() == [] and policy.endpoints() == []


def test_workload_endpoint_is_decoded_for_routes_and_for_policy() -> None:
    update = decode(kv(WEP_KEY, WEP))
    assert update is not None
    wep = update.value
    assert isinstance(wep, WorkloadEndpoint)
    assert (wep.node, wep.namespace, wep.pod, wep.iface, wep.mac) == ("n1", "x", "a", "cali1", "ee:ee:ee:ee:ee:ee")
    assert wep.ipv4s == ("10.244.1.5",)  # routes are IPv4
    assert wep.labels == (("app", "web"),)
    ep = wep.endpoint
    assert ep.namespace == "x" and ep.name == "a" and ep.namespace_labels == ()
    assert ep.ips == ("10.244.1.5", "fd00::5") and ep.profiles == ("kns.x",)
    assert [(p.name, p.port) for p in ep.ports] == [("http", 80)]


def test_resources_are_decoded_once_into_what_their_consumers_read() -> None:
    pool = decode(kv(keys.resource_key("ippools", "p"),
                     {"spec": {"cidr": "10.244.0.0/16", "vxlanMode": "CrossSubnet", "natOutgoing": True}}))
    assert pool is not None and pool.value == IPPool("p", "10.244.0.0/16", True, False, False, "Never", "CrossSubnet")

    node = decode(kv(keys.resource_key("nodes", "n2"), {
        "metadata": {"labels": {"zone": "b"}},
        "spec": {"bgp": {"ipv4Address": "192.0.2.12/24", "ipv4IPIPTunnelAddr": "10.244.2.1"},
                 "ipv4VXLANTunnelAddr": "10.244.2.0", "vxlanTunnelMACAddr": "66:00:00:00:00:AA"}}))
    assert node is not None and isinstance(node.value, Node)
    n = node.value
    assert (n.name, n.labels, n.ipv4, n.ipv4_network) == ("n2", (("zone", "b"),), "192.0.2.12", "192.0.2.0/24")
    assert (n.vxlan_tunnel_ip, n.vxlan_mac, n.ipip_tunnel_ip) == ("10.244.2.0", "66:00:00:00:00:aa", "10.244.2.1")
    assert n.resource["metadata"]["name"] == "n2" and n.resource["kind"] == "Node"  # filled from the key

    affinity = decode(kv(keys.affinity_key("n2", "10.244.2.0/26"), {"state": "pending"}))
    assert affinity is not None and affinity.node == "n2"
    assert affinity.value == BlockAffinity("n2", "10.244.2.0/26", "pending", False)
    assert not affinity.value.confirmed

    profile = decode(kv(keys.resource_key("profiles", "kns.x"),
                        {"spec": {"labelsToApply": {"pcns.team": "red", "other": "x"}}}))
    assert profile is not None and isinstance(profile.value, NamedProfile)
    assert profile.value.profile.name == "kns.x" and profile.value.namespace_labels == {"team": "red"}

    policy = decode(kv(keys.resource_key("networkpolicies", "allow", "x"),
                       {"spec": {"selector": "app == 'web'", "ingress": [{"action": "Allow"}]}}))
    assert policy is not None and isinstance(policy.value, Policy)
    assert policy.value.id == "x/allow"  # kind, name and namespace from the key

    peer = decode(kv(keys.resource_key("bgppeers", "tor"), {"spec": {"peerIP": "192.0.2.1", "asNumber": 65001}}))
    assert peer is not None and peer.value is not None and peer.value["metadata"] == {"name": "tor"}


def test_ipam_blocks_being_released_are_absent_without_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    block = Block.new("10.244.1.0/26", affinity="host:n1").to_json()
    key = keys.block_key("10.244.1.0/26")
    decoded = decode(kv(key, block))
    assert decoded is not None and isinstance(decoded.value, Block) and decoded.name == "10.244.1.0/26"
    with caplog.at_level(logging.WARNING):
        released = decode(kv(key, {**block, "deleted": True}))
    assert released is not None and released.value is None and caplog.records == []


@pytest.mark.parametrize(("key", "value"), [
    (keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.1/16"}}),  # host bits set
    (keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16", "ipipMode": "Always",
                                                  "vxlanMode": "Always"}}),
    (keys.resource_key("nodes", "n1"), {"spec": {"bgp": {"ipv4Address": "192.0.2.300/24"}}}),
    (keys.HOSTS + "n1/ipv4/block/10.244.1.7-26", {"state": "confirmed"}),  # host bits in the key
    (keys.resource_key("profiles", "kns.x"), {"spec": {"ingress": [{"action": "Maybe"}]}}),
    (keys.resource_key("networkpolicies", "n", "x"), {"spec": {"egress": [{"action": "Allow",
                                                                           "protocol": "bogus"}]}}),
    (keys.resource_key("globalnetworkpolicies", "g"), {"spec": {"selector": "app == "}}),
    (keys.resource_key("workloadendpoints", "w", "x"), ["not", "an", "object"]),
])
def test_invalid_values_decode_as_absent(key: str, value: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        update = decode(kv(key, value))
    assert update is not None and update.value is None
    assert len(caplog.records) == 1 and key in caplog.records[0].getMessage()


def test_bgp_resources_take_the_reflectors_raw_updates_too() -> None:
    resources = BGPResources()
    resources.changed = False
    assert resources.on_update(kv(keys.resource_key("bgppeers", "tor"), {"spec": {"peerIP": "192.0.2.1"}}))
    assert resources.changed and resources.peers["tor"]["spec"] == {"peerIP": "192.0.2.1"}
    assert not resources.on_update(kv(keys.resource_key("profiles", "kns.x"), {"spec": {}}))
    # Pools matter to a reflector (what Calico's export filter lets out).
    assert resources.on_update(kv(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.0.0.0/8"}}))
    assert resources.on_update(kv(keys.resource_key("nodes", "n1"), {"spec": {}}))
    assert resources.nodes["n1"]["metadata"]["name"] == "n1"
    assert resources.on_update(kv(keys.resource_key("bgppeers", "tor"), None))
    assert resources.peers == {}
