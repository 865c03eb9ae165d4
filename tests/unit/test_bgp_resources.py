"""The BGP kinds' validation (BGPFilter, CalicoNodeStatus, BGPConfiguration and BGPPeer fields), the
datastore decoding of Services and EndpointSlices, and CalicoNodeStatus reporting with a memory
datastore."""

from __future__ import annotations

from typing import Any

import pytest

from felixpy.calc.dispatcher import Dispatcher
from felixpy.datastore import keys, kube_mapping
from felixpy.datastore.memory import MemoryDatastore
from felixpy.datastore.syncer import KVUpdate
from felixpy.model.resources import ValidationError, validate
from felixpy.node.nodestatus import (NodeStatusReporter, PathView, Snapshot, StatusWriter, build_status,
                                     parse_bird_status)


def rejects(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate(obj)
    assert message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def bgp_filter(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPFilter", "metadata": {"name": "f"}, "spec": spec}


def test_bgp_filter_validates_rules_and_refuses_what_felixpy_cannot_do() -> None:
    ok = validate(bgp_filter(
        exportV4=[{"action": "Accept", "matchOperator": "In", "cidr": "77.0.0.0/16", "source": "RemotePeers"},
                  {"action": "Reject", "interface": "*.calico"}],
        importV4=[{"action": "Accept", "matchOperator": "In", "cidr": "55.0.0.0/16", "prefixLength": {"min": 30}},
                  {"action": "Reject", "peerType": "eBGP", "communities": {"values": ["65000:1"]},
                   "asPathPrefix": [65001], "operations": [{"addCommunity": {"value": "1:2:3"}},
                                                          {"prependASPath": {"prefix": [65009]}}]}]))
    assert ok["spec"]["importV4"][0]["prefixLength"] == {"min": 30}
    six = validate(bgp_filter(exportV6=[{"action": "Reject", "matchOperator": "In", "cidr": "fd00::/64",
                                         "prefixLength": {"min": 122, "max": 128}}]))
    assert six["spec"]["exportV6"][0]["prefixLength"] == {"min": 122, "max": 128}
    rejects(bgp_filter(importV6=[{"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8"}]),
            "spec.importV6[0]: cidr: '10.0.0.0/8' is not an IPv6 CIDR")
    rejects(bgp_filter(importV4=[{"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8",
                                  "prefixLength": {"max": 64}}]), "outside the cidr's /8..32")
    rejects(bgp_filter(importV4=[{"action": "Reject", "priority": 512}]), "spec.importV4[0].priority")
    rejects(bgp_filter(importV4=[{"action": "Accept", "operations": [{"setPriority": {"value": 256}}]}]),
            "spec.importV4[0].operations[0].setPriority")
    rejects(bgp_filter(importV4=[{"action": "Reject", "cidr": "10.0.0.0/8"}]),
            "spec.importV4[0]: cidr and matchOperator go together")
    rejects(bgp_filter(importV4=[{"action": "Reject", "matchOperator": "Equal", "cidr": "10.0.0.0/8",
                                  "prefixLength": {"max": 24}}]), "prefixLength needs matchOperator In or NotIn")
    rejects(bgp_filter(importV4=[{"action": "Reject", "matchOperator": "In", "cidr": "10.0.0.0/8",
                                  "prefixLength": {"min": 4}}]), "outside the cidr's /8..32")
    rejects(bgp_filter(importV4=[{"action": "Reject", "communities": {"values": ["70000:1"]}}]), "out of range")
    rejects(bgp_filter(importV4=[{"action": "Reject", "cidr": "2001:db8::/32", "matchOperator": "In"}]),
            "spec.importV4[0]: cidr: '2001:db8::/32' is not an IPv4 CIDR")


def test_calico_node_status_spec_and_agent_written_status() -> None:
    base = {"apiVersion": "projectcalico.org/v3", "kind": "CalicoNodeStatus", "metadata": {"name": "s"}}
    ok = validate({**base, "spec": {"node": "n1", "classes": ["Agent", "BGP"], "updatePeriodSeconds": 0},
                   "status": {"lastUpdated": "2026-12-04T10:00:00Z"}})
    assert ok["status"] == {"lastUpdated": "2026-12-04T10:00:00Z"}
    rejects({**base, "spec": {"node": "n1", "classes": ["Everything"], "updatePeriodSeconds": 5}}, "spec.classes[0]")
    rejects({**base, "spec": {"node": "n1", "classes": ["BGP"], "updatePeriodSeconds": 90000}},
            "spec.updatePeriodSeconds")
    rejects({**base, "spec": {"classes": ["BGP"], "updatePeriodSeconds": 5}}, "spec.node: required")


def bgp_configuration(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
            "spec": spec}


def test_bgp_configuration_fields() -> None:
    validate(bgp_configuration(communities=[{"name": "c", "value": "65000:100"}],
                               prefixAdvertisements=[{"cidr": "10.0.0.0/8", "communities": ["c", "1:2:3"]}],
                               serviceLoadBalancerAggregation="Disabled", ignoredInterfaces=["eth1"]))
    rejects(bgp_configuration(prefixAdvertisements=[{"cidr": "10.0.0.0/8", "communities": ["nope"]}]),
            "spec.prefixAdvertisements[0].communities[0]")
    rejects(bgp_configuration(communities=[{"name": "c", "value": "65536:1"}]), "out of range")
    validate(bgp_configuration(serviceClusterIPs=[{"cidr": "fd00::/108"}], prefixAdvertisements=[{"cidr": "fd00::/64"}]))
    rejects(bgp_configuration(serviceClusterIPs=[{"cidr": "fd00::/300"}]), "spec.serviceClusterIPs[0].cidr")
    for field, value in (("programClusterRoutes", "Enabled"), ("ipv4NormalRoutePriority", 1024),
                         ("localWorkloadPeeringIPV4", "169.254.0.1")):
        rejects(bgp_configuration(**{field: value}), f"spec.{field}: felixpy does not support")


def bgp_peer(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "p"},
            "spec": {"peerIP": "192.0.2.1", "asNumber": 65001, **spec}}


def test_bgp_peer_fields() -> None:
    validate(bgp_peer(localASNumber=65100, keepaliveTime="10s", ttlSecurity=1, numAllowedLocalASNumbers=2,
                      reachableBy="192.0.2.254", filters=["tor"], reversePeering="Manual",
                      failureDetectionMode="None", restartMode="GracefulRestart",
                      birdGatewayMode="DirectIfDirectlyConnected"))
    rejects(bgp_peer(keepaliveTime="0s"), "spec.keepaliveTime: keepalive time must be 1s")
    rejects(bgp_peer(failureDetectionMode="BFDIfDirectlyConnected"), "spec.failureDetectionMode: felixpy does not")
    rejects(bgp_peer(restartMode="LongLivedGracefulRestart"), "spec.restartMode: felixpy does not support")
    rejects(bgp_peer(birdGatewayMode="Recursive"), "spec.birdGatewayMode: felixpy does not support")
    rejects(bgp_peer(localWorkloadSelector="all()"), "spec.localWorkloadSelector: felixpy does not support")
    rejects(bgp_peer(reachableBy="fd00::1"), "spec.reachableBy")


# -- Services and EndpointSlices -------------------------------------------------------------------

def test_kubernetes_service_and_slice_mapping_keeps_what_advertisement_reads() -> None:
    svc = {"metadata": {"namespace": "shop", "name": "web", "resourceVersion": "7", "labels": {"a": "b"}},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                    "externalTrafficPolicy": "Local", "ports": [{"port": 80}], "selector": {"app": "web"}},
           "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.10", "ipMode": "VIP"}]}}}
    key, value = kube_mapping.SERVICES.convert(svc)  # type: ignore[misc]
    assert key == keys.resource_key("kubernetesservices", "web", "shop")
    assert value["spec"] == {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                             "externalTrafficPolicy": "Local"}
    assert value["status"] == {"loadBalancer": {"ingress": [{"ip": "198.18.0.10"}]}}
    loc = kube_mapping.locate(key)
    assert loc.kind is kube_mapping.SERVICES and not loc.kind.writable
    eps = {"metadata": {"namespace": "shop", "name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "n1",
                                                 "conditions": {"ready": True, "serving": True},
                                                 "targetRef": {"kind": "Pod", "name": "web-0"}}]}
    key, value = kube_mapping.ENDPOINT_SLICES.convert(eps)  # type: ignore[misc]
    assert value["endpoints"] == [{"addresses": ["10.244.1.5"], "nodeName": "n1", "conditions": {"ready": True}}]
    assert kube_mapping.locate(key).kind is kube_mapping.ENDPOINT_SLICES


# -- CalicoNodeStatus -----------------------------------------------------------------------------

SNAPSHOT = Snapshot(
    speaker_ready=True, version="ExaBGP 5.0.15 (felixpy)", router_id="192.0.2.11", boot_time=1_000_000.0,
    reconfigured=1_000_100.0,
    peers=({"peer": "192.0.2.12", "type": "mesh", "state": "Established", "since": 1_000_050.0},
           {"peer": "192.0.2.1", "type": "node", "state": "Connect", "since": 1_000_060.0}),
    best=(PathView("10.244.2.0/26", "192.0.2.12", "192.0.2.12", "mesh"),
          PathView("198.51.100.0/24", "192.0.2.1", "192.0.2.1", "node")),
    others=(PathView("10.244.2.0/26", "192.0.2.1", "192.0.2.1", "node"),),
    own_blocks=frozenset({"10.244.1.0/26"}))

KERNEL = [
    {"dst": "0.0.0.0/0", "gateway": "192.0.2.1", "interface": "eth0", "type": "unicast", "scope": "global",
     "ours": False},
    {"dst": "10.244.1.0/26", "gateway": None, "interface": None, "type": "blackhole", "scope": "global",
     "ours": True},
    {"dst": "10.244.2.0/26", "gateway": "192.0.2.12", "interface": "eth0", "type": "unicast", "scope": "global",
     "ours": True},
    {"dst": "192.0.2.0/24", "gateway": None, "interface": "eth0", "type": "unicast", "scope": "link", "ours": False},
]


def test_build_status_in_calicos_shape() -> None:
    status = build_status(SNAPSHOT, ("Agent", "BGP", "Routes"), now=1_000_200.0, kernel_routes=lambda: KERNEL)
    assert status["agent"]["birdV4"]["state"] == "Ready" and status["agent"]["birdV4"]["routerID"] == "192.0.2.11"
    assert status["bgp"]["numberEstablishedV4"] == 1 and status["bgp"]["numberNotEstablishedV4"] == 1
    assert status["bgp"]["peersV4"][0] == {"peerIP": "192.0.2.12", "type": "NodeMesh", "state": "Established",
                                           "since": status["bgp"]["peersV4"][0]["since"]}
    assert status["bgp"]["peersV4"][1]["type"] == "NodePeer"
    routes = {(r["type"], r["destination"], r["learnedFrom"].get("peerIP", "")): r
              for r in status["routes"]["routesV4"]}
    assert routes[("FIB", "0.0.0.0/0", "")]["learnedFrom"] == {"sourceType": "Kernel"}
    assert routes[("FIB", "10.244.1.0/26", "")]["interface"] == "blackhole"
    assert routes[("FIB", "10.244.1.0/26", "")]["learnedFrom"] == {"sourceType": "Static"}
    assert routes[("FIB", "10.244.2.0/26", "192.0.2.12")]["learnedFrom"]["sourceType"] == "NodeMesh"
    assert routes[("FIB", "192.0.2.0/24", "")]["learnedFrom"] == {"sourceType": "Direct"}
    assert routes[("RIB", "10.244.2.0/26", "192.0.2.1")]["learnedFrom"]["sourceType"] == "BGPPeer"
    assert routes[("RIB", "198.51.100.0/24", "192.0.2.1")]["gateway"] == "192.0.2.1"  # not in the kernel
    only_bgp = build_status(SNAPSHOT, ("BGP",), now=1_000_200.0, kernel_routes=None)
    assert set(only_bgp) == {"lastUpdated", "bgp"}


def node_status(name: str, node: str, period: int, classes: list[str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "CalicoNodeStatus", "metadata": {"name": name},
            "spec": {"node": node, "classes": classes or ["BGP"], "updatePeriodSeconds": period}}


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reporter_writes_own_node_at_once_then_every_period() -> None:
    store = MemoryDatastore()
    clock = Clock()
    writer = StatusWriter(store, kernel_routes=None, wall=lambda: 1_000_200.0)
    reporter = NodeStatusReporter("n1", writer, clock=clock)
    dispatcher = Dispatcher(reporter)
    keys_ = {}
    for name, node, period in (("mine", "n1", 10), ("once", "n1", 0), ("theirs", "n2", 10)):
        key = keys.resource_key("caliconodestatuses", name)
        keys_[name] = key
        store.create(key, node_status(name, node, period))
        dispatcher.on_update(KVUpdate(key, node_status(name, node, period), 1))
    assert reporter.next_deadline() == 100.0
    snapshots: list[int] = []

    def snapshot() -> Snapshot:
        snapshots.append(1)
        return SNAPSHOT

    assert reporter.report(snapshot) == 2 and snapshots == [1]  # one snapshot for both
    for request, taken in list(writer._pending.values()):
        writer.write(request, taken)
    assert store.get(keys_["mine"]).value["status"]["bgp"]["numberEstablishedV4"] == 1
    assert "status" in store.get(keys_["once"]).value and "status" not in store.get(keys_["theirs"]).value
    assert reporter.next_deadline() == 110.0  # "once" is done
    clock.now = 105.0
    assert reporter.report(snapshot) == 0
    clock.now = 110.0
    assert reporter.report(snapshot) == 1
    # Our own write coming back (same spec) does not reschedule; a changed spec reports at once.
    dispatcher.on_update(KVUpdate(keys_["mine"], store.get(keys_["mine"]).value, 5))
    assert reporter.next_deadline() == 120.0
    dispatcher.on_update(KVUpdate(keys_["mine"], node_status("mine", "n1", 10, ["Agent"]), 6))
    assert reporter.next_deadline() == 110.0
    # Deleted while a write was pending: nothing is recreated.
    store.delete(keys_["mine"])
    for request, taken in list(writer._pending.values()):
        assert writer.write(request, taken) is (request.key != keys_["mine"])
    assert keys_["mine"] not in {kv.key for kv in store.list(keys.resource_prefix("caliconodestatuses"))[0]}


def test_parse_bird_status() -> None:
    times = parse_bird_status("BIRD 2.0.12 ready.\nBIRD 2.0.12\nRouter ID is 192.0.2.221\n"
                              "Last reboot on 2026-12-01 09:59:00.000\nLast reconfiguration on 2026-12-01 10:00:01.5\n")
    assert times.version == "BIRD 2.0.12" and times.router_id == "192.0.2.221"
    assert times.boot is not None and times.reconfigured is not None and times.reconfigured - times.boot == 61
