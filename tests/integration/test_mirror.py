"""The Kubernetes → etcd mirror (felixpy/controllers/mirror.py) against the fake Kubernetes API
server and a real etcd: Namespaces, ServiceAccounts, NetworkPolicies and Pod labels arrive in
etcd, follow updates and deletions, survive a 410 relist, and a resync removes only stale copies
the mirror owns. WorkloadEndpoints are never created by the mirror.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from felixpy import names
from felixpy.controllers.mirror import KubeReader, Mirror
from felixpy.datastore import keys
from felixpy.datastore.api import NotFound
from felixpy.node.k8s_node import open_kube_http
from policy.k8s import convert_k8s_networkpolicy
from tests.support.fake_kube_api import FakeKubeAPI

pytestmark = pytest.mark.etcd

NS = "fxt-mirror"


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(bookmark_interval=0.2).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def reader(fake: FakeKubeAPI, tmp_path: Path) -> KubeReader:
    path = tmp_path / "kubeconfig"
    path.write_text(fake.kubeconfig())
    http = open_kube_http({"KUBECONFIG": str(path)})
    assert http is not None
    return KubeReader(http, watch_timeout_seconds=5)


@pytest.fixture
def start_mirror(etcd_store: Any, reader: KubeReader) -> Iterator[Callable[..., Mirror]]:
    started: list[Mirror] = []

    def start(resync_period: float = 60.0) -> Mirror:
        mirror = Mirror(etcd_store, reader, resync_period=resync_period, retry_interval=0.2)
        mirror.start()
        started.append(mirror)
        return mirror

    yield start
    for mirror in started:
        mirror.stop()
        mirror.join()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def value(store: Any, key: str) -> Any:
    try:
        return store.get(key).value
    except NotFound:
        return None


def delete(fake: FakeKubeAPI, path: str) -> None:
    req = urllib.request.Request(fake.url + path, method="DELETE")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}}


def policy(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                     "ingress": [{"ports": [{"port": 80}]}]}}


def pod(name: str, node: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": "web",
                     "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]}}


def cni_endpoint(store: Any, node: str, pod_name: str) -> str:
    """Write the WorkloadEndpoint the CNI plugin would (no pod labels, no ports)."""
    name = names.workload_endpoint_name(node, pod_name)
    key = keys.resource_key("workloadendpoints", name, NS)
    store.create(key, {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": NS,
                     "labels": {"projectcalico.org/namespace": NS, "projectcalico.org/orchestrator": "k8s"}},
        "spec": {"orchestrator": "k8s", "node": node, "pod": pod_name, "endpoint": "eth0",
                 "containerID": "c0ffee", "interfaceName": "cali0123456789a", "ipNetworks": ["10.65.0.7/32"],
                 "mac": "02:00:00:00:00:01", "profiles": [f"kns.{NS}"], "ports": []},
    })
    return key


def test_namespaces_serviceaccounts_and_policies_follow_kubernetes(
        fake: FakeKubeAPI, etcd_store: Any, start_mirror: Callable[..., Mirror]) -> None:
    fake.put("/api/v1/namespaces", namespace(NS, {"team": "a"}))
    fake.put(f"/api/v1/namespaces/{NS}/serviceaccounts", {"metadata": {"name": "web", "labels": {"tier": "fe"}}})
    fake.put(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies", policy("allow-web"))
    start_mirror()

    kns = keys.resource_key("profiles", f"kns.{NS}")
    ksa = keys.resource_key("profiles", f"ksa.{NS}.web")
    knp = keys.resource_key("networkpolicies", "knp.default.allow-web", NS)
    assert wait_for(lambda: value(etcd_store, knp) is not None and value(etcd_store, ksa) is not None
                    and value(etcd_store, kns) is not None)
    profile = value(etcd_store, kns)
    assert profile["spec"]["labelsToApply"] == {"pcns.team": "a", "pcns.projectcalico.org/name": NS}
    assert profile["spec"]["ingress"] == [{"action": "Allow"}] and profile["spec"]["egress"] == [{"action": "Allow"}]
    assert value(etcd_store, ksa)["spec"] == {"labelsToApply": {"pcsa.tier": "fe", "pcsa.projectcalico.org/name": "web"}}
    stored_np = fake.object(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/allow-web")
    assert stored_np is not None
    assert value(etcd_store, knp) == convert_k8s_networkpolicy(stored_np)

    # Updates follow; an unchanged object is not rewritten.
    revision = etcd_store.get(ksa).revision
    fake.modify(f"/api/v1/namespaces/{NS}", lambda o: o["metadata"]["labels"].update(team="b"))
    assert wait_for(lambda: value(etcd_store, kns)["spec"]["labelsToApply"].get("pcns.team") == "b")
    assert etcd_store.get(ksa).revision == revision

    # Deletions follow.
    delete(fake, f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/allow-web")
    delete(fake, f"/api/v1/namespaces/{NS}/serviceaccounts/web")
    assert wait_for(lambda: value(etcd_store, knp) is None and value(etcd_store, ksa) is None)
    delete(fake, f"/api/v1/namespaces/{NS}")
    assert wait_for(lambda: value(etcd_store, kns) is None)


def test_endpoint_labels_follow_the_pod_and_endpoints_are_never_created(
        fake: FakeKubeAPI, etcd_store: Any, start_mirror: Callable[..., Mirror]) -> None:
    fake.put("/api/v1/namespaces", namespace(NS))
    fake.put(f"/api/v1/namespaces/{NS}/pods", pod("web-1", "n1", {"app": "web"}))
    fake.put(f"/api/v1/namespaces/{NS}/pods", pod("web-2", "n1", {"app": "web"}))
    key1 = cni_endpoint(etcd_store, "n1", "web-1")
    mirror = start_mirror()

    expected = {"app": "web", "projectcalico.org/namespace": NS, "projectcalico.org/orchestrator": "k8s",
                "projectcalico.org/serviceaccount": "web"}
    assert wait_for(lambda: value(etcd_store, key1)["metadata"]["labels"] == expected)
    wep = value(etcd_store, key1)
    assert wep["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    assert wep["spec"]["ipNetworks"] == ["10.65.0.7/32"] and wep["spec"]["containerID"] == "c0ffee"

    # web-2 has no endpoint: the mirror does not make one. A later pod change observed (web-1's
    # label) proves the mirror handled web-2 before we look. When the CNI plugin writes web-2's
    # endpoint, the labels arrive without waiting for a resync (resync_period is 60 s here).
    assert wait_for(lambda: mirror.in_sync)
    key2 = keys.resource_key("workloadendpoints", names.workload_endpoint_name("n1", "web-2"), NS)
    fake.modify(f"/api/v1/namespaces/{NS}/pods/web-1", lambda o: o["metadata"]["labels"].update(app="api"))
    assert wait_for(lambda: value(etcd_store, key1)["metadata"]["labels"]["app"] == "api")
    assert value(etcd_store, key2) is None
    cni_endpoint(etcd_store, "n1", "web-2")
    assert wait_for(lambda: value(etcd_store, key2)["metadata"]["labels"] == expected)

    # Deleting the pod leaves the endpoint alone: removing it is the CNI plugin's DEL. A later
    # change (web-2's label) observed proves the mirror has handled the deletion.
    delete(fake, f"/api/v1/namespaces/{NS}/pods/web-1")
    fake.modify(f"/api/v1/namespaces/{NS}/pods/web-2", lambda o: o["metadata"]["labels"].update(app="db"))
    assert wait_for(lambda: value(etcd_store, key2)["metadata"]["labels"]["app"] == "db")
    assert value(etcd_store, key1) is not None


def test_relists_after_410_and_catches_up(fake: FakeKubeAPI, etcd_store: Any,
                                         start_mirror: Callable[..., Mirror]) -> None:
    fake.put("/api/v1/namespaces", namespace(NS))
    fake.put(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies", policy("old"))
    mirror = start_mirror()
    old = keys.resource_key("networkpolicies", "knp.default.old", NS)
    assert wait_for(lambda: value(etcd_store, old) is not None and mirror.in_sync)

    def lists() -> int:
        return sum(1 for method, path in fake.requests
                   if method == "GET" and path.startswith("/apis/networking.k8s.io/v1/networkpolicies")
                   and "watch=true" not in path)

    before = lists()
    # Hold the policy watch's reconnect while the policies change and the history is compacted
    # away: the reconnect then gets 410 and only a fresh list can show the changes.
    release = threading.Event()

    def hold(method: str, path: str) -> None:
        if path == "/apis/networking.k8s.io/v1/networkpolicies":
            release.wait(5)

    fake.before_request = hold
    fake.drop_watches()
    delete(fake, f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/old")
    fake.put(f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies", policy("new"))
    fake.compact()
    release.set()
    new = keys.resource_key("networkpolicies", "knp.default.new", NS)
    assert wait_for(lambda: value(etcd_store, new) is not None and value(etcd_store, old) is None)
    assert lists() > before


def test_resync_deletes_only_stale_objects_the_mirror_owns(
        fake: FakeKubeAPI, etcd_store: Any, start_mirror: Callable[..., Mirror]) -> None:
    fake.put("/api/v1/namespaces", namespace(NS))
    stale = [keys.resource_key("profiles", "kns.gone"), keys.resource_key("profiles", "ksa.gone.sa"),
             keys.resource_key("networkpolicies", "knp.default.gone", NS)]
    kept = [keys.resource_key("profiles", "custom"), keys.resource_key("networkpolicies", "mine", NS)]
    for key in stale + kept:
        etcd_store.create(key, {"apiVersion": "projectcalico.org/v3", "kind": "x", "metadata": {}, "spec": {}})
    mirror = start_mirror(resync_period=60.0)
    assert wait_for(lambda: all(value(etcd_store, k) is None for k in stale))
    assert all(value(etcd_store, k) is not None for k in kept)
    assert value(etcd_store, keys.resource_key("profiles", f"kns.{NS}")) is not None
    # A second full pass finds nothing to do.
    again = mirror.resync()
    assert (again.written, again.deleted, again.endpoints_updated) == (0, 0, 0)


def test_no_kubernetes_api_means_no_mirror(etcd_store: Any) -> None:
    from felixpy.controllers.mirror import open_mirror

    assert open_mirror(etcd_store, {"DATASTORE_TYPE": "etcdv3", "HOME": "/nonexistent"}) is None


def test_kube_reader_lists_across_namespaces(fake: FakeKubeAPI, reader: KubeReader) -> None:
    for ns in ("fxt-a", "fxt-b"):
        fake.put("/api/v1/namespaces", namespace(ns))
        fake.put(f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": "default"}})
    items, rv = reader.list("/api/v1/serviceaccounts")
    assert sorted((i["metadata"]["namespace"], i["metadata"]["name"]) for i in items) == [
        ("fxt-a", "default"), ("fxt-b", "default")]
    assert int(rv) == fake.revision
    assert json.loads(json.dumps(items))  # plain JSON


def test_services_and_endpoint_slices_are_copied_for_bgp_advertisement(
        fake: FakeKubeAPI, etcd_store: Any, start_mirror: Callable[..., Mirror]) -> None:
    fake.put("/api/v1/namespaces", namespace(NS))
    fake.put(f"/api/v1/namespaces/{NS}/services", {
        "metadata": {"name": "web", "namespace": NS},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "externalTrafficPolicy": "Local",
                 "ports": [{"port": 80}], "selector": {"app": "web"}},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.10"}]}}})
    slice_path = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
    fake.put(slice_path, {
        "metadata": {"name": "web-abc", "namespace": NS, "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.65.0.7"], "nodeName": "n1", "conditions": {"ready": True},
                       "targetRef": {"kind": "Pod", "name": "web-1"}}],
        "ports": [{"port": 8080}]})
    stale = keys.resource_key("kubernetesservices", "gone", NS)
    etcd_store.create(stale, {"kind": "Service"})
    mirror = start_mirror()

    svc_key = keys.resource_key("kubernetesservices", "web", NS)
    slice_key = keys.resource_key("kubernetesendpointslices", "web-abc", NS)
    assert wait_for(lambda: value(etcd_store, svc_key) is not None and value(etcd_store, slice_key) is not None)
    assert value(etcd_store, svc_key)["spec"] == {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                                                   "externalTrafficPolicy": "Local"}
    assert value(etcd_store, svc_key)["status"]["loadBalancer"]["ingress"] == [{"ip": "198.18.0.10"}]
    assert value(etcd_store, slice_key)["endpoints"] == [
        {"addresses": ["10.65.0.7"], "nodeName": "n1", "conditions": {"ready": True}}]
    # The endpoint turns not-ready: the copy follows; the mirror's resync removes a copy of
    # nothing (the stale Service).
    fake.modify(f"{slice_path}/web-abc", lambda o: o["endpoints"][0]["conditions"].update(ready=False))
    assert wait_for(lambda: value(etcd_store, slice_key)["endpoints"][0]["conditions"] == {"ready": False})
    assert wait_for(lambda: mirror.in_sync) and wait_for(lambda: value(etcd_store, stale) is None)
    delete(fake, f"{slice_path}/web-abc")
    delete(fake, f"/api/v1/namespaces/{NS}/services/web")
    assert wait_for(lambda: value(etcd_store, slice_key) is None and value(etcd_store, svc_key) is None)
