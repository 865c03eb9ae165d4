"""BGP's Kubernetes objects on the real API server: Services and EndpointSlices as the agent reads
them, and CalicoNodeStatus written by the agent, on felixpy's CRDs and on Calico's own (typed,
pruning) CRDs."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from felixpy.calc.updates import decode
from felixpy.datastore import keys
from felixpy.datastore import kube_mapping as m
from felixpy.datastore.syncer import KVUpdate
from felixpy.model import resources
from felixpy.node.nodestatus import PathView, Request, Snapshot, StatusWriter
from tests.support.calico_crds import calico_crds
from tests.support.kube_cluster import KubeCluster, manifest_objects

NS = "fxt-bgp"


def service_and_slice(kube: KubeCluster, ready: bool = True) -> None:
    kube.request("POST", f"/api/v1/namespaces/{NS}/services", {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        # No selector: the endpoints are ours (the lab's way), not the EndpointSlice controller's.
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local", "ports": [{"port": 80}]}})
    kube.request("PUT", f"/api/v1/namespaces/{NS}/services/web/status", {
        **kube.request("GET", f"/api/v1/namespaces/{NS}/services/web"),
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.10"}]}}})
    kube.request("POST", f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices", {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-x", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4", "ports": [{"port": 80}],
        "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "fxt-n1", "conditions": {"ready": ready}}]})


def test_services_and_endpoint_slices_read_and_watched_as_the_agent_reads_them(kube: KubeCluster) -> None:
    kube.namespace(NS)
    store = kube.store()
    _, revision = store.list(keys.resource_prefix("kubernetesservices"))
    watch = store.watch(keys.resource_prefix("kubernetesendpointslices"), revision + 1)
    try:
        service_and_slice(kube)
        svc_key = keys.resource_key("kubernetesservices", "web", NS)
        svc = kube.wait("the Service with its LoadBalancer IP", lambda: next(
            (kv for kv in store.list(keys.resource_prefix("kubernetesservices"))[0]
             if kv.key == svc_key and kv.value["status"]["loadBalancer"]["ingress"]), None))
        info = decode(KVUpdate(svc.key, svc.value, svc.revision))
        assert info is not None and info.value.load_balancer_ips == ("198.18.0.10",)
        assert info.value.external_traffic_policy == "Local" and info.value.cluster_ips
        seen: list[Any] = []
        for batch in watch:
            seen += batch
            if any(e.value for e in seen):
                break
        event = next(e for e in seen if e.value)
        decoded = decode(KVUpdate(event.key, event.value, event.revision))
        assert decoded is not None and decoded.value.service == "web"
        assert [(e.node, e.ready) for e in decoded.value.endpoints] == [("fxt-n1", True)]
        # The Kubernetes datastore never writes them.
        with pytest.raises(Exception, match="read-only"):
            store.create(keys.resource_key("kubernetesservices", "x", NS), {"spec": {}})
    finally:
        watch.close()


SNAPSHOT = Snapshot(speaker_ready=True, version="ExaBGP 5.0.15 (felixpy)", router_id="192.0.2.21",
                    boot_time=1_800_000_000.0, reconfigured=None,
                    peers=({"peer": "192.0.2.22", "type": "mesh", "state": "Established", "since": 1_800_000_010.0},),
                    best=(PathView("10.244.2.0/26", "192.0.2.22", "192.0.2.22", "mesh"),), others=(),
                    own_blocks=frozenset())


def write_node_status(kube: KubeCluster) -> dict[str, Any]:
    store = kube.store()
    value = resources.validate({"apiVersion": "projectcalico.org/v3", "kind": "CalicoNodeStatus",
                                "metadata": {"name": "fxt-n1-status"},
                                "spec": {"node": "fxt-n1", "classes": ["Agent", "BGP", "Routes"],
                                         "updatePeriodSeconds": 10}})
    key = resources.storage_key("CalicoNodeStatus", "fxt-n1-status")
    store.create(key, value)
    writer = StatusWriter(store, kernel_routes=lambda: [], wall=lambda: 1_800_000_020.0)
    assert writer.write(Request(key, "fxt-n1-status", ("Agent", "BGP", "Routes"), 10), SNAPSHOT)
    stored: dict[str, Any] = store.get(key).value
    assert stored["spec"] == value["spec"]
    return stored


def check_status(stored: dict[str, Any]) -> None:
    status = stored["status"]
    assert status["agent"]["birdV4"]["routerID"] == "192.0.2.21"
    assert status["bgp"]["numberEstablishedV4"] == 1
    assert status["bgp"]["peersV4"][0]["type"] == "NodeMesh"
    assert status["routes"]["routesV4"][0]["learnedFrom"] == {"sourceType": "NodeMesh", "peerIP": "192.0.2.22"}
    assert status["lastUpdated"].endswith("Z")


def test_calico_node_status_written_on_felixpys_crd(kube: KubeCluster) -> None:
    check_status(write_node_status(kube))


@pytest.fixture
def calico(kube: KubeCluster) -> Iterator[KubeCluster]:
    kube.apply(calico_crds())
    try:
        yield kube
    finally:
        kube.reset()
        kube.apply(manifest_objects(kinds=("CustomResourceDefinition",)))


def test_calico_node_status_and_bgp_filter_survive_calicos_typed_crds(calico: KubeCluster) -> None:
    check_status(write_node_status(calico))  # nothing pruned: Calico's status schema has every field
    store = calico.store()
    value = resources.validate({"apiVersion": "projectcalico.org/v3", "kind": "BGPFilter",
                                "metadata": {"name": "tor"},
                                "spec": {"importV4": [{"action": "Reject", "matchOperator": "In",
                                                       "cidr": "198.51.100.0/24", "prefixLength": {"max": 28}}]}})
    key = resources.storage_key("BGPFilter", "tor")
    store.create(key, value)
    assert store.get(key).value["spec"] == value["spec"]
    assert m.CRD_RESOURCES["bgpfilters"] == ("BGPFilter", False)
