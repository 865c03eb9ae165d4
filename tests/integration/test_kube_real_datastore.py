"""The Kubernetes datastore (felixpy/datastore/kube.py) against a real kube-apiserver.

The same behaviour test_kube_datastore.py checks on the fake, here on the real thing
(tests/support/kube_cluster.py: etcd 3.7, kube-apiserver and kube-controller-manager 1.37 with
deploy/felixpy.yaml's CRDs): every value felixpy writes comes back unchanged through the CRD
schemas (pruning), paged lists, Nodes written by a "kubelet", Pods bound by a "scheduler" and
deleted gracefully, Terminating namespaces, a list across kinds then a watch without gap or
duplicate, the Syncer through a real 410 (a restarted API server's watch cache), an outage, and
IPAM from several processes at once.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore import kube_mapping as m
from felixpy.datastore.api import AlreadyExists, Conflict, DatastoreError, NotFound, Unavailable, WatchEvent
from felixpy.datastore.syncer import KVUpdate, Syncer, SyncStatus
from felixpy.ipam import check as ipam_check
from felixpy.ipam.allocator import IPAM
from felixpy.model import resources
from tests.support.kube_cluster import KubeCluster

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ipam_worker.py")
P = keys.HANDLES + "t-"


def plain(value: Any) -> Any:
    """A read value without what the API server adds (uid, creationTimestamp)."""
    value = json.loads(json.dumps(value))
    meta = value.get("metadata") if isinstance(value, dict) else None
    if isinstance(meta, dict):
        meta.pop("uid", None)
        meta.pop("creationTimestamp", None)
    return value


def drain(watch: Iterable[list[WatchEvent]], into: list[WatchEvent]) -> None:
    """Collect a watch's events (in a thread) until it ends."""
    for batch in watch:
        into.extend(batch)


def wait_for(cond: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    return cond()


def cni_wep(node: str, ns: str, pod: str, ip: str, container: str = "cid1") -> tuple[str, dict[str, Any]]:
    name = names.workload_endpoint_name(node, pod)
    return keys.resource_key("workloadendpoints", name, ns), {
        "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"orchestrator": "k8s", "node": node, "containerID": container, "pod": pod, "endpoint": "eth0",
                 "interfaceName": "x", "ipNetworks": [f"{ip}/32"], "profiles": [f"kns.{ns}"]},
    }


# ------------------------------------------------------------------------------------------
# What felixpy writes survives the CRD schemas (pruning) unchanged
# ------------------------------------------------------------------------------------------

RESOURCES: list[dict[str, Any]] = [
    {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "pool1", "labels": {"a": "b"}},
     "spec": {"cidr": "10.65.0.0/16", "blockSize": 26, "ipipMode": "Never", "vxlanMode": "CrossSubnet",
              "natOutgoing": True, "disabled": False, "disableBGPExport": False, "nodeSelector": "all()",
              "allowedUses": ["Workload", "Tunnel"]}},
    {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
     "spec": {"logSeverityScreen": "Info", "nodeToNodeMeshEnabled": True, "asNumber": 64512,
              "nodeMeshMaxRestartTime": "2m0s",
              "nodeMeshPassword": {"secretKeyRef": {"name": "bgp", "key": "mesh"}}}},
    {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "tor"},
     "spec": {"peerIP": "192.0.2.254", "asNumber": 64513, "nodeSelector": "rack == 'a'",
              "password": {"secretKeyRef": {"name": "bgp", "key": "tor"}}, "keepOriginalNextHop": False}},
    {"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration", "metadata": {"name": "default"},
     "spec": {"logSeverityScreen": "Info", "reportingInterval": "0s", "routeRefreshInterval": "10s",
              "iptablesRefreshInterval": "90s", "defaultEndpointToHostAction": "Accept", "vxlanVNI": 4096,
              "bpfEnabled": False}},
    {"apiVersion": "projectcalico.org/v3", "kind": "GlobalNetworkPolicy", "metadata": {"name": "deny-db"},
     "spec": {"order": 100, "selector": "role == 'db'", "types": ["Ingress", "Egress"],
              "ingress": [{"action": "Allow", "protocol": "TCP", "source": {"selector": "role == 'web'"},
                           "destination": {"ports": [5432, "80:90", "http"]}},
                          {"action": "Deny", "source": {"nets": ["10.0.0.0/8"], "notNets": ["10.1.0.0/16"]}}],
              "egress": [{"action": "Allow", "protocol": "UDP", "destination": {"ports": [53]}}]}},
    {"apiVersion": "projectcalico.org/v3", "kind": "BGPFilter", "metadata": {"name": "tor"},
     "spec": {"importV4": [{"action": "Reject", "matchOperator": "In", "cidr": "198.51.100.0/24",
                            "prefixLength": {"min": 24}}],
              "exportV4": [{"action": "Accept", "communities": {"values": ["65000:1"]},
                            "operations": [{"addCommunity": {"value": "65000:2:3"}}]}]}},
    {"apiVersion": "projectcalico.org/v3", "kind": "CalicoNodeStatus", "metadata": {"name": "n1-status"},
     "spec": {"node": "fxt-n1", "classes": ["Agent", "BGP", "Routes"], "updatePeriodSeconds": 10}},
    {"apiVersion": "projectcalico.org/v3", "kind": "ClusterInformation", "metadata": {"name": "default"},
     "spec": {"clusterGUID": "0123456789abcdef0123456789abcdef", "clusterType": "k8s,bgp",
              "datastoreReady": True, "calicoVersion": "felixpy"}},
]


def test_every_resource_kind_round_trips_unpruned(kube: KubeCluster) -> None:
    store = kube.store()
    kube.namespace("fxt-np")
    values = [resources.validate(json.loads(json.dumps(v))) for v in RESOURCES]
    values.append(resources.validate({
        "apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
        "metadata": {"name": "allow-web", "namespace": "fxt-np", "annotations": {"note": "kept"}},
        "spec": {"order": 10, "selector": "app == 'web'", "types": ["Ingress"],
                 "ingress": [{"action": "Allow", "protocol": "TCP", "destination": {"ports": [80]}}]}}))
    for value in values:
        meta = value["metadata"]
        key = resources.storage_key(value["kind"], meta["name"], meta.get("namespace"))
        kv = store.create(key, value)
        assert plain(kv.value) == value, value["kind"]
        assert plain(store.get(key).value) == value, value["kind"]
    # Namespaces' profiles and the cluster's own Services (default/kubernetes) are there too.
    derived = tuple(keys.resource_prefix(p) for p in ("profiles", "kubernetesservices", "kubernetesendpointslices"))
    listed = {kv.key: plain(kv.value) for kv in store.list("/calico/resources/v3/projectcalico.org/")[0]
              if not kv.key.startswith(derived)}
    assert sorted(listed.values(), key=json.dumps) == sorted(values, key=json.dumps)


def test_ipam_objects_round_trip_unpruned(kube: KubeCluster) -> None:
    store = kube.store()
    kube.node("fxt-n1")
    store.create(keys.resource_key("ippools", "pool1"), resources.validate(json.loads(json.dumps(RESOURCES[0]))))
    ipam = IPAM(store, cache_ttl=0)
    ips = ipam.auto_assign(num=3, handle="K8s-Pod-Network.Abc", attrs={"node": "fxt-n1", "pod": "p"},
                           node="fxt-n1", node_labels={})
    assert len(ips) == 3 and all(ip in ipaddress.ip_network("10.65.0.0/16") for ip in ips)
    (block_kv,) = store.list(keys.BLOCKS)[0]
    raw = kube.request("GET", f"{m.CRD_API}/ipamblocks/{m.cidr_to_name(block_kv.value['cidr'])}")
    # The block as stored is exactly the block as written: nothing pruned, nothing renamed back.
    assert m._block_convert(raw) == (block_kv.key, block_kv.value)
    assert block_kv.value["attributes"] and block_kv.value.get("affinityClaimTime") is None
    (aff,) = store.list(keys.HOSTS)[0]
    assert aff.value == {"state": "confirmed", "deleted": False}
    (handle,) = store.list(keys.HANDLES)[0]
    assert handle.key == keys.handle_key("K8s-Pod-Network.Abc") and sum(handle.value["block"].values()) == 3
    store.create(keys.IPAM_CONFIG, {"strict_affinity": True, "auto_allocate_blocks": True, "maxBlocksPerHost": 4})
    assert store.get(keys.IPAM_CONFIG).value == {"strict_affinity": True, "auto_allocate_blocks": True,
                                                 "maxBlocksPerHost": 4}
    assert sorted(ipam.release_by_handle("K8s-Pod-Network.Abc")) == sorted(ips)
    assert ipam_check.check(store).problems == ()


def test_an_object_the_server_rejects_is_its_message_and_no_write(kube: KubeCluster) -> None:
    store = kube.store()
    bad = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "bad"},
           "spec": {"cidr": "10.66.0.0/16", "blockSize": "large"}}  # the CRD types blockSize
    with pytest.raises(DatastoreError, match=r"422 Invalid: .*spec.blockSize") as err:
        store.create(keys.resource_key("ippools", "bad"), bad)
    assert "\n" not in str(err.value)
    with pytest.raises(NotFound):
        store.get(keys.resource_key("ippools", "bad"))


# ------------------------------------------------------------------------------------------
# Lists: pages, one snapshot
# ------------------------------------------------------------------------------------------

def test_paged_list_returns_everything_from_one_snapshot(kube: KubeCluster) -> None:
    paged = kube.store(list_page_size=2)
    writer = kube.store()
    for i in range(7):
        writer.create(P + f"{i}", {"i": i})
    items, rev = paged.list(P)
    assert [kv.value["i"] for kv in items] == list(range(7))
    assert rev >= max(kv.revision for kv in items)
    # The list revision is the first page's: a write during the paging is not in the pages, and
    # the watch from that revision delivers it.
    seen: list[WatchEvent] = []
    watch = paged.watch(P, rev + 1)
    t = threading.Thread(target=drain, args=(watch, seen), daemon=True)
    t.start()
    writer.create(P + "late", {"i": 99})
    assert wait_for(lambda: seen)
    watch.close()
    assert [(e.key, e.value) for e in seen] == [(P + "late", {"i": 99})]


# ------------------------------------------------------------------------------------------
# Nodes and Pods: the kubelet's objects, Calico's annotations
# ------------------------------------------------------------------------------------------

def test_nodes_carry_calico_fields_in_annotations(kube: KubeCluster) -> None:
    store = kube.store()
    key = keys.resource_key("nodes", "fxt-n1")
    with pytest.raises(DatastoreError, match="created by the kubelet"):
        store.create(key, {"metadata": {"name": "fxt-n1"}, "spec": {}})
    kube.node("fxt-n1", address="192.0.2.11")
    kv = store.get(key)
    assert {"address": "192.0.2.11", "type": "InternalIP"} in kv.value["spec"]["addresses"]
    value = json.loads(json.dumps(kv.value))
    value["spec"]["bgp"] = {"ipv4Address": "192.0.2.11/24", "asNumber": 64512}
    value["metadata"]["labels"]["rack"] = "r1"
    kv2 = store.update(key, value, kv.revision)
    node = kube.request("GET", "/api/v1/nodes/fxt-n1")
    assert node["metadata"]["annotations"]["projectcalico.org/IPv4Address"] == "192.0.2.11/24"
    assert node["metadata"]["labels"]["rack"] == "r1"
    assert node["metadata"]["labels"]["kubernetes.io/hostname"] == "fxt-n1"
    with pytest.raises(Conflict):
        store.update(key, value, kv.revision)
    # A write that changes nothing is no write: the revision stays.
    assert store.update(key, kv2.value, kv2.revision).revision == kv2.revision
    # The kubelet's own status write in between is not lost, and our next write is a Conflict.
    kube.request("PATCH", "/api/v1/nodes/fxt-n1/status",
                 {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}},
                 "application/merge-patch+json")
    with pytest.raises(Conflict):
        store.update(key, value, kv2.revision)


def test_workload_endpoints_are_bound_pods_and_survive_graceful_deletion(kube: KubeCluster) -> None:
    store = kube.store()
    kube.node("fxt-n1")
    kube.namespace("fxt-a", {"team": "a"})
    kube.pod("fxt-a", "web", "fxt-n1", labels={"app": "web"}, service_account="default",
             ports=[{"name": "http", "containerPort": 8080}])
    key, value = cni_wep("fxt-n1", "fxt-a", "web", "10.65.0.5")
    with pytest.raises(NotFound):
        store.get(key)
    kv = store.create(key, value)
    got = store.get(key)
    assert got == kv
    assert got.value["metadata"]["labels"]["app"] == "web"
    assert got.value["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 8080}]
    with pytest.raises(AlreadyExists):
        store.create(key, value)

    # kubectl delete pod: with a node and no kubelet the Pod stays, Terminating (deletionTimestamp),
    # and stays an endpoint: its containers are still running until the kubelet stops them.
    kube.request("DELETE", "/api/v1/namespaces/fxt-a/pods/web")
    pod = kube.request("GET", "/api/v1/namespaces/fxt-a/pods/web")
    assert pod["metadata"]["deletionTimestamp"]
    assert store.get(key).value["spec"]["ipNetworks"] == ["10.65.0.5/32"]
    # The CNI DEL (the kubelet's teardown) removes the endpoint; patching a terminating Pod works.
    store.delete(key)
    with pytest.raises(NotFound):
        store.get(key)
    kube.request("DELETE", "/api/v1/namespaces/fxt-a/pods/web",
                 {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
    with pytest.raises(NotFound):
        store.delete(key)
    with pytest.raises(NotFound):  # the Pod is gone: the CNI of a pod deleted meanwhile
        store.create(key, value)


def test_pods_that_are_not_endpoints(kube: KubeCluster) -> None:
    store = kube.store()
    kube.node("fxt-n1")
    kube.namespace("fxt-a")
    ann = {"metadata": {"annotations": {m.ANN_POD_IP: "10.65.0.9/32", m.ANN_POD_IPS: "10.65.0.9/32"}}}
    kube.pod("fxt-a", "host", "fxt-n1", host_network=True)
    kube.pod("fxt-a", "done", "fxt-n1")
    kube.pod("fxt-a", "pending")  # no node: not scheduled
    for name in ("host", "done", "pending"):
        kube.request("PATCH", f"/api/v1/namespaces/fxt-a/pods/{name}", ann, "application/merge-patch+json")
    kube.request("PATCH", "/api/v1/namespaces/fxt-a/pods/done/status", {"status": {"phase": "Succeeded"}},
                 "application/merge-patch+json")
    assert store.list(keys.resource_prefix("workloadendpoints"))[0] == []
    key, value = cni_wep("fxt-n2", "fxt-a", "pending", "10.65.0.7")
    with pytest.raises(DatastoreError, match="does not match"):
        store.create(key, value)


def test_namespaces_network_policies_and_terminating_namespaces(kube: KubeCluster) -> None:
    store = kube.store()
    kube.node("fxt-n1")
    kube.namespace("fxt-a", {"team": "a"})
    profile = store.get(keys.resource_key("profiles", "kns.fxt-a"))
    assert profile.value["spec"]["labelsToApply"]["pcns.team"] == "a"
    assert profile.value["spec"]["labelsToApply"]["pcns.kubernetes.io/metadata.name"] == "fxt-a"
    kube.request("POST", "/apis/networking.k8s.io/v1/namespaces/fxt-a/networkpolicies", {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "deny"},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}}}})
    knp = store.get(keys.resource_key("networkpolicies", "knp.default.deny", "fxt-a"))
    assert knp.value["spec"]["selector"] == "projectcalico.org/orchestrator == 'k8s' && app == 'web'"

    # A namespace with a pod on a node stays Terminating (no kubelet finishes the pod): it still
    # has its profile, and a new Calico policy in it is refused with the server's message.
    kube.pod("fxt-a", "web", "fxt-n1")
    kube.request("DELETE", "/api/v1/namespaces/fxt-a")
    assert kube.request("GET", "/api/v1/namespaces/fxt-a")["status"]["phase"] == "Terminating"
    assert store.get(keys.resource_key("profiles", "kns.fxt-a")).value == profile.value
    policy = resources.validate({"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
                                 "metadata": {"name": "late", "namespace": "fxt-a"},
                                 "spec": {"selector": "all()", "types": ["Ingress"]}})
    with pytest.raises(DatastoreError, match="being terminated") as err:
        store.create(keys.resource_key("networkpolicies", "late", "fxt-a"), policy)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------
# List + watch across kinds, the Syncer through a real 410, an outage
# ------------------------------------------------------------------------------------------

def test_list_across_kinds_then_watch_has_no_gap_and_no_duplicate(kube: KubeCluster) -> None:
    store = kube.store()
    kube.node("fxt-n1")
    # The node lifecycle controller adds the deprecated beta.kubernetes.io/os label to a new Node
    # (a real change of the Calico Node's labels): let it, before the snapshot.
    kube.wait("the node controller's labels", lambda: "beta.kubernetes.io/os" in kube.request(
        "GET", "/api/v1/nodes/fxt-n1")["metadata"].get("labels", {}))
    kube.namespace("fxt-a")
    kube.pod("fxt-a", "web", "fxt-n1")
    store.create(keys.resource_key("ippools", "pool1"), resources.validate(json.loads(json.dumps(RESOURCES[0]))))
    store.create(P + "a", {"v": 1})
    items, rev = store.list("/calico/")
    assert {keys.resource_key("ippools", "pool1"), P + "a", keys.resource_key("nodes", "fxt-n1"),
            keys.resource_key("profiles", "kns.fxt-a")} <= {kv.key for kv in items}

    key, value = cni_wep("fxt-n1", "fxt-a", "web", "10.65.0.5")
    store.create(key, value)
    # The kubelet's status write: no change for us, no event.
    kube.request("PATCH", "/api/v1/namespaces/fxt-a/pods/web/status", {"status": {"phase": "Running"}},
                 "application/merge-patch+json")
    store.create(P + "b", {"v": 2})
    store.delete(keys.resource_key("ippools", "pool1"))
    watch = store.watch("/calico/", rev + 1)
    seen: list[WatchEvent] = []
    t = threading.Thread(target=drain, args=(watch, seen), daemon=True)
    t.start()
    assert wait_for(lambda: len(seen) >= 3)
    store.create(P + "c", {"v": 3})  # a later event: proves nothing else was queued before it
    assert wait_for(lambda: any(e.key == P + "c" for e in seen))
    watch.close()
    t.join(5)
    assert sorted((e.key, e.value is None) for e in seen) == sorted([
        (key, False), (P + "b", False), (keys.resource_key("ippools", "pool1"), True), (P + "c", False)])


def test_syncer_relists_after_a_real_410_and_resumes(kube: KubeCluster) -> None:
    store = kube.store()
    kube.node("fxt-n1")
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

    syncer = Syncer(store, callback, retry_interval=0.2, max_retry_interval=1.0)
    syncer.start()
    try:
        assert wait_for(lambda: SyncStatus.IN_SYNC in statuses)
        assert P + "a" in view and keys.resource_key("nodes", "fxt-n1") in view
        in_sync_before = statuses.count(SyncStatus.IN_SYNC)
        # The restarted server's watch cache starts at the current revision: resuming the
        # streams from before it is a 410, and the syncer lists again.
        kube.restart_apiserver()
        store.delete(P + "a")
        store.create(P + "c", {"v": 3})
        assert wait_for(lambda: P + "c" in view and P + "a" not in view, timeout=30)
        assert wait_for(lambda: statuses.count(SyncStatus.IN_SYNC) > in_sync_before, timeout=30)
        items, _ = store.list("/calico/")
        with lock:
            assert view == {kv.key: kv.value for kv in items}
    finally:
        syncer.stop()


def test_a_quiet_kind_survives_the_servers_stream_ends(kube: KubeCluster) -> None:
    """The API server ends each watch after timeoutSeconds; the quiet kind's next stream resumes
    from the newest revision it knows (its own last change, or a bookmark's when the server sent
    one) while another kind moves the global revision on: no 410, no gap, no duplicate.

    Seen here: the watch cache of a quiet CRD sends a BOOKMARK before the timeout only once it
    has heard of a newer revision (etcd progress notifications), so the resume revision may stay
    the kind's own; the watch cache serves it all the same. Only a restarted API server (whose
    cache starts over) answers such a resume with 410 (test_syncer_relists_after_a_real_410...)."""
    store = kube.store(watch_timeout_seconds=3)
    kv = store.create(P + "quiet", {"v": 1})
    opened: list[int] = []
    real_stream = store._http.stream

    def recording(path: str, query: Any, read_timeout: float) -> Any:
        if path.endswith("/ipamhandles"):
            opened.append(int(query["resourceVersion"]))
        return real_stream(path, query, read_timeout)

    store._http.stream = recording  # type: ignore[method-assign]
    watch = store.watch(P, kv.revision + 1)
    seen: list[WatchEvent] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for batch in watch:
                seen.extend(batch)
        except BaseException as err:  # handed to the test thread
            errors.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        for i in range(20):  # another kind moves the revision on
            store.create(keys.block_key(f"10.66.{i}.0/26"), {"cidr": f"10.66.{i}.0/26"})
        assert wait_for(lambda: len(opened) >= 3, timeout=15), opened  # two server-side ends
        assert opened[0] == kv.revision and opened == sorted(opened)
        late = store.create(P + "late", {"v": 2})
        assert wait_for(lambda: any(e.key == P + "late" for e in seen))
        assert not errors
        assert [(e.key, e.revision) for e in seen] == [(P + "late", late.revision)]
    finally:
        watch.close()
        t.join(5)


def test_outage_is_unavailable_quickly_then_recovers(kube: KubeCluster) -> None:
    store = kube.store(timeout=3.0)
    store.create(P + "a", {})
    kube.cp.stop("kube-apiserver")
    try:
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            store.get(P + "a")
        with pytest.raises(Unavailable):
            store.list("/calico/")
        assert time.monotonic() - t0 < 8
    finally:
        kube.cp.start_apiserver()
    assert store.get(P + "a").value == {}


# ------------------------------------------------------------------------------------------
# IPAM from several processes
# ------------------------------------------------------------------------------------------

def test_ipam_in_four_processes_on_two_nodes_hands_out_each_address_once(kube: KubeCluster) -> None:
    store = kube.store()
    store.create(keys.resource_key("ippools", "small"), {
        "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "small"},
        "spec": {"cidr": "10.77.0.0/24", "blockSize": 28}})
    kube.namespace("fxt-ipam")
    count = 12
    for n in range(2):
        kube.node(f"fxt-n{n}")
    for w in range(4):
        for i in range(count):
            kube.pod("fxt-ipam", f"w{w}-{i}", f"fxt-n{w % 2}")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    workers = [subprocess.Popen(
        [sys.executable, str(WORKER), f"kubeconfig:{kube.admin_kubeconfig}", "--node", f"fxt-n{w % 2}",
         "--count", str(count), "--prefix", f"w{w}", "--namespace", "fxt-ipam"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) for w in range(4)]
    handles: dict[str, str] = {}
    try:
        for proc in workers:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err[-2000:]
            result = json.loads(out.strip().splitlines()[-1])
            assert result["error"] is None, result["error"]
            handles.update(result["handles"])
    finally:
        for proc in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert len(handles) == 4 * count
    assert len(set(handles.values())) == len(handles), "an address was handed out twice"
    ipam = IPAM(store)
    for handle, ip in handles.items():
        assignment = ipam.get_assignment(ip)
        assert assignment is not None and assignment.handle == handle
    report = ipam_check.check(store)
    assert report.problems == (), "\n".join(report.lines())
