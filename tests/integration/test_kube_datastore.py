"""The Kubernetes datastore (felixpy/datastore/kube.py) against the fake API server.

The datastore contract (the same tests as test_datastore_contract.py, on keys the Kubernetes
datastore can hold: IPAM handles), then what is special about KDD: the object each key is stored
as, Nodes / Pods / Namespaces / NetworkPolicies read from the Kubernetes API, a list spanning
kinds followed by a watch without gaps or duplicates, bookmarks, 410 Gone, outages, and IPAM and
the Syncer running unchanged on top.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore import kube_mapping as m
from felixpy.datastore.api import (
    AlreadyExists,
    Compacted,
    Conflict,
    DatastoreError,
    NotFound,
    Unavailable,
    WatchEvent,
)
from felixpy.datastore.kube import KubeConfigError, KubeDatastore, load_settings, open_kube_datastore
from felixpy.datastore.syncer import KVUpdate, Syncer, SyncStatus
from tests.support.fake_kube_api import FakeKubeAPI

P = keys.HANDLES + "t-"  # contract keys: IPAM handles store any JSON object verbatim
U = keys.HANDLES + "u-"


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI(bookmark_interval=0.2).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def kubeconfig(fake: FakeKubeAPI, tmp_path: Path) -> str:
    path = tmp_path / "kubeconfig"
    path.write_text(fake.kubeconfig())
    return str(path)


@pytest.fixture
def store(kubeconfig: str) -> Iterator[KubeDatastore]:
    s = KubeDatastore(load_settings(kubeconfig=kubeconfig))
    try:
        yield s
    finally:
        s.close()


def collect(watch: Any, until: Callable[[list[WatchEvent]], bool], timeout: float = 5.0) -> list[WatchEvent]:
    """Iterate a watch on a thread until `until(seen)` or timeout; returns what was seen."""
    seen: list[WatchEvent] = []
    done = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for batch in watch:
                seen.extend(batch)
                if until(seen):
                    break
        except BaseException as err:  # handed to the test thread
            errors.append(err)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    done.wait(timeout)
    watch.close()
    if errors:
        raise errors[0]
    return seen


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ------------------------------------------------------------------------------------------
# The datastore contract
# ------------------------------------------------------------------------------------------

def test_create_get_update_delete(store: KubeDatastore) -> None:
    kv = store.create(P + "a", {"x": 1})
    assert store.get(P + "a").value == {"x": 1}
    assert store.get(P + "a").revision == kv.revision
    with pytest.raises(AlreadyExists):
        store.create(P + "a", {"x": 2})
    kv2 = store.update(P + "a", {"x": 2}, kv.revision)
    assert kv2.revision > kv.revision
    with pytest.raises(Conflict):
        store.update(P + "a", {"x": 3}, kv.revision)
    with pytest.raises(Conflict):
        store.delete(P + "a", kv.revision)
    store.delete(P + "a", kv2.revision)
    with pytest.raises(NotFound):
        store.get(P + "a")
    with pytest.raises(NotFound):
        store.update(P + "a", {}, kv2.revision)
    with pytest.raises(NotFound):
        store.delete(P + "a")


def test_list_is_sorted_and_prefix_bounded(store: KubeDatastore) -> None:
    for name in ("b", "a", "c"):
        store.create(P + name, {"n": name})
    store.create(U + "z", {})
    items, rev = store.list(P)
    assert [kv.key for kv in items] == [P + "a", P + "b", P + "c"]
    assert rev >= max(kv.revision for kv in items)


def test_watch_replays_from_revision_in_order(store: KubeDatastore) -> None:
    kv = store.create(P + "a", {"v": 1})
    store.update(P + "a", {"v": 2}, kv.revision)
    store.delete(P + "a")
    watch = store.watch(P, kv.revision)
    threading.Timer(0.2, lambda: store.create(P + "b", {"v": 9})).start()
    seen = collect(watch, lambda s: len(s) >= 4)
    assert [(e.key, e.value) for e in seen] == [
        (P + "a", {"v": 1}),
        (P + "a", {"v": 2}),
        (P + "a", None),
        (P + "b", {"v": 9}),
    ]
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)


def test_watch_from_compacted_revision_raises(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    kv = store.create(P + "a", {"v": 1})
    for i in range(3):
        kv = store.update(P + "a", {"v": i}, kv.revision)
    fake.compact(kv.revision)
    with pytest.raises(Compacted):
        collect(store.watch(P, kv.revision - 2), lambda s: True)


def test_concurrent_cas_increments_lose_nothing(store: KubeDatastore) -> None:
    store.create(P + "counter", {"n": 0})

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                kv = store.get(P + "counter")
                try:
                    store.update(kv.key, {"n": kv.value["n"] + 1}, kv.revision)
                    break
                except Conflict:
                    time.sleep(0)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.get(P + "counter").value == {"n": 100}


# ------------------------------------------------------------------------------------------
# Calico resources and IPAM objects as CRDs
# ------------------------------------------------------------------------------------------

POOL = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "IPPool",
    "metadata": {"name": "pool1", "labels": {"a": "b"}},
    "spec": {"cidr": "10.65.0.0/16", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "Never",
             "natOutgoing": True, "nodeSelector": "all()"},
}


def test_resource_round_trips_as_a_crd(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    key = keys.resource_key("ippools", "pool1")
    kv = store.create(key, POOL)
    obj = fake.object("/apis/crd.projectcalico.org/v1/ippools/pool1")
    assert obj is not None
    assert obj["kind"] == "IPPool" and obj["spec"] == POOL["spec"] and obj["metadata"]["labels"] == {"a": "b"}
    got = store.get(key).value
    assert got["metadata"].pop("uid") and got["metadata"].pop("creationTimestamp")  # the server's own
    assert got == POOL == {k: v for k, v in kv.value.items()} | {"metadata": got["metadata"]}
    assert kv.revision == int(obj["metadata"]["resourceVersion"])


def test_namespaced_resource_needs_its_namespace(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    key = keys.resource_key("networkpolicies", "np1", "ns1")
    value = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
             "metadata": {"name": "np1", "namespace": "ns1"}, "spec": {"selector": "all()", "order": 10}}
    with pytest.raises(DatastoreError, match="namespaces"):
        store.create(key, value)
    fake.put("/api/v1/namespaces", {"metadata": {"name": "ns1"}})
    store.create(key, value)
    assert fake.object("/apis/crd.projectcalico.org/v1/namespaces/ns1/networkpolicies/np1") is not None
    items, _ = store.list(keys.resource_prefix("networkpolicies", "ns1"))
    assert [kv.key for kv in items] == [key]
    # only the one namespace's collection was listed, for both NetworkPolicy kinds
    lists = [p.split("?")[0] for meth, p in fake.requests
             if meth == "GET" and p.split("?")[0].endswith("networkpolicies")]
    assert lists[-2:] == ["/apis/crd.projectcalico.org/v1/namespaces/ns1/networkpolicies",
                          "/apis/networking.k8s.io/v1/namespaces/ns1/networkpolicies"]


def test_ipam_objects_use_calico_kdd_names(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    block = {"cidr": "10.65.1.0/26", "affinity": "host:n1", "affinity_claim_time": "t", "allocations": [None] * 64,
             "unallocated": list(range(64)), "attributes": [], "sequenceNumber": 0,
             "sequenceNumberForAllocation": {}, "deleted": False}
    store.create(keys.block_key("10.65.1.0/26"), block)
    obj = fake.object("/apis/crd.projectcalico.org/v1/ipamblocks/10-65-1-0-26")
    assert obj is not None and obj["spec"]["affinityClaimTime"] == "t" and "affinity_claim_time" not in obj["spec"]
    assert store.get(keys.block_key("10.65.1.0/26")).value == block
    # Calico's IPAMBlock CRD requires strictAffinity and drops nulls it does not mark nullable:
    # the object always carries strictAffinity, and a block read without the nulls is unchanged.
    unaffine = {**block, "affinity": None, "affinity_claim_time": None}
    obj = m.block_object("10.65.1.0/26", unaffine)
    assert obj["spec"]["strictAffinity"] is False
    pruned = {**obj, "spec": {k: v for k, v in obj["spec"].items() if v is not None}}
    assert m._block_convert(pruned) == (keys.block_key("10.65.1.0/26"), unaffine)

    store.create(keys.affinity_key("n1", "10.65.1.0/26"), {"state": "confirmed", "deleted": False})
    obj = fake.object("/apis/crd.projectcalico.org/v1/blockaffinities/n1-10-65-1-0-26")
    assert obj is not None and obj["spec"] == {"state": "confirmed", "node": "n1", "cidr": "10.65.1.0/26",
                                              "deleted": "false", "type": "host"}
    assert store.get(keys.affinity_key("n1", "10.65.1.0/26")).value == {"state": "confirmed", "deleted": False}

    long_node = "n" + "x" * 250
    store.create(keys.affinity_key(long_node, "10.65.2.0/26"), {"state": "pending", "deleted": False})
    items, _ = store.list(keys.host_affinity_prefix(long_node))
    assert [kv.key for kv in items] == [keys.affinity_key(long_node, "10.65.2.0/26")]
    assert len(m.affinity_name(long_node, "10.65.2.0/26")) <= 253

    store.create(keys.handle_key("K8s-Pod-Network.ABC"), {"block": {"10.65.1.0/26": 1}, "deleted": False})
    obj = fake.object("/apis/crd.projectcalico.org/v1/ipamhandles/k8s-pod-network.abc")
    assert obj is not None and obj["spec"]["handleID"] == "K8s-Pod-Network.ABC"
    assert [kv.key for kv in store.list(keys.HANDLES)[0]] == [keys.handle_key("K8s-Pod-Network.ABC")]
    with pytest.raises(NotFound):  # same object name, another handle
        store.get(keys.handle_key("k8s-pod-network.abc"))

    store.create(keys.IPAM_CONFIG, {"strict_affinity": True, "auto_allocate_blocks": True, "maxBlocksPerHost": 4})
    obj = fake.object("/apis/crd.projectcalico.org/v1/ipamconfigs/default")
    assert obj is not None and obj["spec"] == {"strictAffinity": True, "autoAllocateBlocks": True, "maxBlocksPerHost": 4}
    assert store.get(keys.IPAM_CONFIG).value["strict_affinity"] is True


def test_keys_kdd_cannot_hold_are_refused(store: KubeDatastore) -> None:
    with pytest.raises(DatastoreError, match="no place"):
        store.create("/calico/t/a", {})
    with pytest.raises(DatastoreError, match="not a valid Kubernetes object name"):
        store.create(keys.handle_key("has space"), {})


# ------------------------------------------------------------------------------------------
# Nodes, Pods, Namespaces, NetworkPolicies from the Kubernetes API
# ------------------------------------------------------------------------------------------

def kubelet_node(fake: FakeKubeAPI, name: str = "n1") -> None:
    fake.put("/api/v1/nodes", {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.11"},
                                 {"type": "Hostname", "address": name}]},
    })


def test_nodes_are_kubernetes_nodes_with_calico_annotations(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    key = keys.resource_key("nodes", "n1")
    with pytest.raises(NotFound):
        store.get(key)
    with pytest.raises(DatastoreError, match="created by the kubelet"):
        store.create(key, {"metadata": {"name": "n1"}, "spec": {}})
    kubelet_node(fake)
    kv = store.get(key)
    assert kv.value["metadata"]["labels"] == {"kubernetes.io/hostname": "n1"}
    assert kv.value["spec"]["addresses"] == [{"address": "192.0.2.11", "type": "InternalIP"}]
    with pytest.raises(AlreadyExists):
        store.create(key, kv.value)

    value = json.loads(json.dumps(kv.value))
    value["spec"]["bgp"] = {"ipv4Address": "192.0.2.11/24", "asNumber": 64512}
    value["spec"]["ipv4VXLANTunnelAddr"] = "10.65.0.1"
    value["metadata"]["labels"]["rack"] = "r1"
    kv2 = store.update(key, value, kv.revision)
    obj = fake.object("/api/v1/nodes/n1")
    assert obj is not None
    ann = obj["metadata"]["annotations"]
    assert ann["projectcalico.org/IPv4Address"] == "192.0.2.11/24"
    assert ann["projectcalico.org/ASNumber"] == "64512"
    assert ann["projectcalico.org/IPv4VXLANTunnelAddr"] == "10.65.0.1"
    assert obj["metadata"]["labels"] == {"kubernetes.io/hostname": "n1", "rack": "r1"}
    assert kv2.value["spec"]["bgp"] == {"ipv4Address": "192.0.2.11/24", "asNumber": 64512}
    assert store.get(key) == kv2
    with pytest.raises(Conflict):
        store.update(key, value, kv.revision)

    # Dropping a label removes it only if Calico added it; the kubelet's stay.
    value = json.loads(json.dumps(kv2.value))
    value["metadata"]["labels"] = {}
    del value["spec"]["bgp"]["asNumber"]
    store.update(key, value, kv2.revision)
    obj = fake.object("/api/v1/nodes/n1")
    assert obj is not None
    assert obj["metadata"]["labels"] == {"kubernetes.io/hostname": "n1"}
    assert "projectcalico.org/ASNumber" not in obj["metadata"]["annotations"]


def make_pod(fake: FakeKubeAPI, ns: str = "ns1", name: str = "web-1", node: str = "n1", **extra: Any) -> None:
    if fake.object(f"/api/v1/namespaces/{ns}") is None:
        fake.put("/api/v1/namespaces", {"metadata": {"name": ns, "labels": {"team": "a"}}})
    pod = {
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "web"}},
        "spec": {"nodeName": node, "serviceAccountName": "sa1", "containers": [
            {"name": "c", "image": "x", "ports": [
                {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                {"containerPort": 9000},
            ]}]},
        "status": {"phase": "Pending"},
    }
    pod.update(extra)
    fake.put(f"/api/v1/namespaces/{ns}/pods", pod)


def cni_wep(node: str = "n1", ns: str = "ns1", pod: str = "web-1", ip: str = "10.65.0.5") -> tuple[str, dict[str, Any]]:
    name = names.workload_endpoint_name(node, pod)
    return keys.resource_key("workloadendpoints", name, ns), {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns, "labels": {}},
        "spec": {"orchestrator": "k8s", "node": node, "containerID": "cid1", "pod": pod, "endpoint": "eth0",
                 "interfaceName": "x", "ipNetworks": [f"{ip}/32"], "mac": "02:00:00:00:00:01",
                 "profiles": [f"kns.{ns}"], "ports": []},
    }


def test_workload_endpoints_are_pods(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    make_pod(fake)
    key, value = cni_wep()
    with pytest.raises(NotFound):  # the pod is not networked yet
        store.get(key)
    kv = store.create(key, value)
    pod = fake.object("/api/v1/namespaces/ns1/pods/web-1")
    assert pod is not None
    assert pod["metadata"]["annotations"] == {"cni.projectcalico.org/podIP": "10.65.0.5/32",
                                              "cni.projectcalico.org/podIPs": "10.65.0.5/32",
                                              "cni.projectcalico.org/containerID": "cid1"}
    got = store.get(key)
    assert got == kv
    assert got.value["metadata"]["labels"] == {
        "app": "web", "projectcalico.org/namespace": "ns1", "projectcalico.org/orchestrator": "k8s",
        "projectcalico.org/serviceaccount": "sa1"}
    spec = got.value["spec"]
    assert spec["ipNetworks"] == ["10.65.0.5/32"] and spec["containerID"] == "cid1" and spec["node"] == "n1"
    assert spec["interfaceName"] == "cali" + __import__("hashlib").sha1(b"ns1.web-1").hexdigest()[:11]
    assert spec["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    assert spec["profiles"] == ["kns.ns1"]
    with pytest.raises(AlreadyExists):
        store.create(key, value)

    value["spec"]["ipNetworks"] = ["10.65.0.6/32"]
    kv2 = store.update(key, value, kv.revision)
    assert kv2.value["spec"]["ipNetworks"] == ["10.65.0.6/32"]
    with pytest.raises(Conflict):
        store.update(key, value, kv.revision)
    items, _ = store.list(keys.resource_prefix("workloadendpoints"))
    assert [i.key for i in items] == [key]

    store.delete(key, kv2.revision)
    with pytest.raises(NotFound):
        store.get(key)
    pod = fake.object("/api/v1/namespaces/ns1/pods/web-1")
    assert pod is not None and not pod["metadata"].get("annotations")  # the pod itself stays
    with pytest.raises(NotFound):
        store.delete(key)


def test_wep_create_retries_when_the_kubelet_writes_the_pod(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    make_pod(fake)
    key, value = cni_wep()
    pod_path = "/api/v1/namespaces/ns1/pods/web-1"
    raced: list[dict[str, Any]] = []

    def kubelet(method: str, path: str) -> None:  # a status write between the CNI's read and its patch
        if method == "PATCH" and path == pod_path and not raced:
            raced.append(fake.modify(pod_path, lambda p: p.update(status={"phase": "Running"})))

    fake.before_request = kubelet
    kv = store.create(key, value)
    assert raced and kv.revision > int(raced[0]["metadata"]["resourceVersion"])
    assert kv.value["spec"]["ipNetworks"] == ["10.65.0.5/32"]
    assert [meth for meth, p in fake.requests if p == pod_path] == ["GET", "PATCH", "GET", "PATCH"]


def test_pods_that_are_not_our_endpoints(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    ann = {"cni.projectcalico.org/podIP": "10.65.0.9/32"}
    make_pod(fake, name="host", spec={"nodeName": "n1", "hostNetwork": True, "containers": []})
    make_pod(fake, name="done", status={"phase": "Succeeded"})
    make_pod(fake, name="unscheduled", spec={"containers": []})
    for name in ("host", "done"):
        fake.modify(f"/api/v1/namespaces/ns1/pods/{name}", lambda p: p["metadata"].update(annotations=ann))
    assert store.list(keys.resource_prefix("workloadendpoints"))[0] == []
    key, value = cni_wep(node="n2", pod="unscheduled")
    with pytest.raises(DatastoreError, match="does not match"):
        store.create(key, value)


def test_profiles_are_namespaces_and_read_only(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    fake.put("/api/v1/namespaces", {"metadata": {"name": "ns1", "labels": {"team": "a"}}})
    kv = store.get(keys.resource_key("profiles", "kns.ns1"))
    assert kv.value["spec"] == {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}],
                                "labelsToApply": {"pcns.team": "a", "pcns.projectcalico.org/name": "ns1"}}
    with pytest.raises(DatastoreError, match="read-only"):
        store.update(kv.key, kv.value, kv.revision)
    with pytest.raises(DatastoreError, match="read-only"):
        store.delete(kv.key)
    with pytest.raises(DatastoreError, match="no place"):
        store.get(keys.resource_key("profiles", "custom"))


def test_kubernetes_network_policies_appear_as_calico_policies(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    fake.put("/api/v1/namespaces", {"metadata": {"name": "ns1"}})
    fake.put("/apis/networking.k8s.io/v1/namespaces/ns1/networkpolicies", {
        "metadata": {"name": "deny"}, "spec": {"podSelector": {"matchLabels": {"app": "web"}}}})
    key = keys.resource_key("networkpolicies", "knp.default.deny", "ns1")
    kv = store.get(key)
    assert kv.value["spec"]["selector"] == "projectcalico.org/orchestrator == 'k8s' && app == 'web'"
    assert kv.value["spec"]["types"] == ["Ingress"] and kv.value["spec"]["order"] == 1000
    assert [i.key for i in store.list(keys.resource_prefix("networkpolicies"))[0]] == [key]
    with pytest.raises(DatastoreError, match="read-only"):
        store.create(keys.resource_key("networkpolicies", "knp.default.x", "ns1"), kv.value)


# ------------------------------------------------------------------------------------------
# One list over many kinds, then the watch
# ------------------------------------------------------------------------------------------

def test_list_across_kinds_then_watch_has_no_gap_and_no_duplicate(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    kubelet_node(fake)
    make_pod(fake)
    store.create(keys.resource_key("ippools", "pool1"), POOL)
    store.create(P + "a", {"v": 1})
    items, rev = store.list("/calico/")
    listed = {kv.key for kv in items}
    assert {keys.resource_key("ippools", "pool1"), P + "a", keys.resource_key("nodes", "n1"),
            keys.resource_key("profiles", "kns.ns1")} <= listed

    # Changes after the list, in several kinds, plus kubelet noise that changes nothing for us.
    key, value = cni_wep()
    store.create(key, value)
    fake.modify("/api/v1/namespaces/ns1/pods/web-1", lambda p: p.update(status={"phase": "Running"}))
    store.create(P + "b", {"v": 2})
    store.delete(keys.resource_key("ippools", "pool1"))

    # The three changes arrive, and nothing more (no replay of the snapshot) before a marker
    # written once they have arrived.
    watch = store.watch("/calico/", rev + 1)
    seen: list[WatchEvent] = []

    def consume() -> None:
        for batch in watch:
            seen.extend(batch)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert wait_for(lambda: len(seen) >= 3, timeout=10)
    store.create(P + "marker", {"v": 3})
    assert wait_for(lambda: any(e.key == P + "marker" for e in seen), timeout=10)
    watch.close()
    t.join(5)
    assert sorted((e.key, e.value is None) for e in seen) == sorted([
        (key, False), (P + "b", False), (keys.resource_key("ippools", "pool1"), True), (P + "marker", False)])


def test_quiet_watch_survives_compaction_thanks_to_bookmarks(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    kv = store.create(P + "a", {"v": 1})
    watch = store.watch(P, kv.revision + 1)
    seen: list[WatchEvent] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for batch in watch:
                seen.extend(batch)
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    for i in range(5):  # other kinds move the revision on
        store.create(keys.block_key(f"10.66.{i}.0/26"), {"cidr": f"10.66.{i}.0/26"})
    time.sleep(0.6)  # > bookmark_interval: the handles stream learns the newer revision
    fake.compact()
    fake.drop_watches()  # the server ends the stream; the watch resumes from its bookmark
    time.sleep(0.3)
    store.create(P + "b", {"v": 2})
    store.create(P + "c", {"v": 3})  # seen after b: nothing (no replay) came in between or before
    assert wait_for(lambda: len(seen) >= 2 or bool(errors))
    watch.close()
    t.join(5)
    assert not errors
    assert [(e.key, e.value) for e in seen] == [(P + "b", {"v": 2}), (P + "c", {"v": 3})]


def test_without_bookmarks_resuming_after_compaction_is_compacted(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    fake.bookmark_interval = 3600.0
    kv = store.create(P + "a", {"v": 1})
    watch = store.watch(P, kv.revision + 1)
    store.create(keys.block_key("10.66.0.0/26"), {"cidr": "10.66.0.0/26"})
    time.sleep(0.2)
    fake.compact()
    fake.drop_watches()
    with pytest.raises(Compacted):
        collect(watch, lambda s: False, timeout=5)


def test_outage_is_unavailable(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    store.create(P + "a", {})
    watch = store.watch(P, 1)
    fake.stop()
    fake.drop_watches()
    with pytest.raises(Unavailable):
        collect(watch, lambda s: False, timeout=5)
    t0 = time.monotonic()
    with pytest.raises(Unavailable):
        store.get(P + "a")
    with pytest.raises(Unavailable):
        store.list("/calico/")
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------------------------------
# IPAM and the Syncer, unchanged, on the Kubernetes datastore
# ------------------------------------------------------------------------------------------

def test_ipam_assigns_and_releases_on_kdd(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    from felixpy.ipam.allocator import IPAM
    from felixpy.model import resources

    kubelet_node(fake)
    store.create(keys.resource_key("ippools", "pool1"), resources.validate(json.loads(json.dumps(POOL))))
    ipam = IPAM(store, cache_ttl=0)
    ips = ipam.auto_assign(num=3, handle="k8s-pod-network.c1", attrs={"node": "n1", "pod": "p", "namespace": "ns1"},
                           node="n1", node_labels={})
    assert len(ips) == 3 and all(ip in ipaddress.ip_network("10.65.0.0/16") for ip in ips)
    assert sorted(ipam.ips_by_handle("k8s-pod-network.c1")) == sorted(ips)
    blocks = fake._list(fake._resolve("/apis/crd.projectcalico.org/v1/ipamblocks"))["items"]
    affinities = fake._list(fake._resolve("/apis/crd.projectcalico.org/v1/blockaffinities"))["items"]
    assert len(blocks) == 1 and len(affinities) == 1 and affinities[0]["spec"]["node"] == "n1"
    assert ipam.affine_blocks("n1") == [blocks[0]["spec"]["cidr"]] or \
        [str(c) for c in ipam.affine_blocks("n1")] == [blocks[0]["spec"]["cidr"]]
    assert sorted(ipam.release_by_handle("k8s-pod-network.c1")) == sorted(ips)
    assert ipam.release_by_handle("k8s-pod-network.c1") == []
    assert ipam.ips_by_handle("k8s-pod-network.c1") == []
    assert fake.object("/apis/crd.projectcalico.org/v1/ipamhandles/k8s-pod-network.c1") is None


def test_ipam_concurrent_assignments_are_unique(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    from felixpy.ipam.allocator import IPAM
    from felixpy.model import resources

    kubelet_node(fake)
    store.create(keys.resource_key("ippools", "pool1"), resources.validate(json.loads(json.dumps(POOL))))
    results: list[Any] = []

    def worker(i: int) -> None:
        ipam = IPAM(store, cache_ttl=0)
        for j in range(5):
            results.extend(ipam.auto_assign(num=1, handle=f"h-{i}-{j}", attrs={"node": "n1"}, node="n1",
                                            node_labels={}))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 20 and len(set(results)) == 20


def test_syncer_snapshot_watch_and_relist_on_compaction(store: KubeDatastore, fake: FakeKubeAPI) -> None:
    fake.bookmark_interval = 3600.0  # no bookmarks: a dropped stream must hit 410 and relist
    kubelet_node(fake)
    make_pod(fake)
    store.create(P + "a", {"v": 1})
    view: dict[str, Any] = {}
    statuses: list[SyncStatus] = []
    lock = threading.Lock()

    def callback(event: Any) -> None:
        with lock:
            if isinstance(event, SyncStatus):
                statuses.append(event)
                return
            for u in event:
                assert isinstance(u, KVUpdate)
                if u.value is None:
                    view.pop(u.key, None)
                else:
                    view[u.key] = u.value

    syncer = Syncer(store, callback, retry_interval=0.1, max_retry_interval=0.2)
    syncer.start()
    try:
        assert wait_for(lambda: SyncStatus.IN_SYNC in statuses)
        assert P + "a" in view and keys.resource_key("nodes", "n1") in view
        key, value = cni_wep()
        store.create(key, value)
        assert wait_for(lambda: key in view)

        lists_before = sum(1 for meth, p in fake.requests if meth == "GET" and "watch=" not in p)
        store.create(keys.block_key("10.66.0.0/26"), {"cidr": "10.66.0.0/26"})
        time.sleep(0.2)
        fake.compact()
        store.delete(P + "a")  # happens while the syncer's streams are being dropped
        fake.compact()
        fake.drop_watches()
        assert wait_for(lambda: P + "a" not in view)
        store.create(P + "c", {"v": 3})
        assert wait_for(lambda: P + "c" in view)
        lists_after = sum(1 for meth, p in fake.requests if meth == "GET" and "watch=" not in p)
        assert lists_after > lists_before  # it relisted
        items, _ = store.list("/calico/")
        with lock:
            assert view == {kv.key: kv.value for kv in items}
    finally:
        syncer.stop()


# ------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------

def test_open_from_environment(kubeconfig: str, tmp_path: Path) -> None:
    store = open_kube_datastore({"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": kubeconfig})
    try:
        store.create(P + "x", {})
        assert store.get(P + "x").value == {}
    finally:
        store.close()
    home = tmp_path / "home"
    (home / ".kube").mkdir(parents=True)
    (home / ".kube" / "config").write_text(Path(kubeconfig).read_text())
    store = open_kube_datastore({"HOME": str(home)})
    try:
        assert store.get(P + "x").value == {}
    finally:
        store.close()
    with pytest.raises(KubeConfigError, match="set KUBECONFIG"):
        open_kube_datastore({"HOME": str(tmp_path / "nohome")})
    with pytest.raises(KubeConfigError, match="kubeconfig"):
        open_kube_datastore({"KUBECONFIG": str(tmp_path / "missing")})
