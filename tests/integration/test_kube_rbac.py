"""deploy/ for real: every object is accepted by a real kube-apiserver, and each component works with
the token of its ServiceAccount, bound by its ClusterRole exactly as shipped, and is refused what
lies outside its role.

The agent's part runs in-process with the felixpy-node token: node startup (Node annotations,
default pool and configuration), the Syncer over everything under /calico/, IPAM and a CNI
WorkloadEndpoint, the NetworkUnavailable condition (after which the controller-manager's node
lifecycle controller lifts its network-unavailable taint). The controllers run as the real
felixpy-controllers process with the felixpy-controllers token. A token bound to nothing gets one
clear error naming the verb and the resource.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from felixpy.config import AutodetectMethod, load_config
from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore import kube_mapping as m
from felixpy.datastore.api import DatastoreError
from felixpy.datastore.syncer import Syncer, SyncStatus
from felixpy.ipam import check as ipam_check
from felixpy.ipam.allocator import IPAM
from felixpy.kernel.addresses import Interface, IPInterface
from felixpy.lab.controlplane import ControlPlaneError
from felixpy.node import k8s_node
from felixpy.node.health import DatastoreProbe
from felixpy.node.startup import startup
from tests.support.kube_cluster import KubeCluster, manifest_objects

REPO = Path(__file__).resolve().parents[2]
NET_TAINT = "node.kubernetes.io/network-unavailable"
HOST = [Interface("eth0", 2, True, 1500, (ipaddress.IPv4Interface("192.0.2.11/24"),))]


def forbidden(err: BaseException, verb: str, resource: str) -> bool:
    text = str(err)
    return "\n" not in text and "forbidden" in text and f'cannot {verb} resource "{resource}"' in text


def taints(kube: KubeCluster, node: str) -> set[str]:
    return {t["key"] for t in kube.request("GET", f"/api/v1/nodes/{node}")["spec"].get("taints") or []}


def _detect(method: AutodetectMethod, version: int = 4) -> IPInterface:
    return HOST[0].addresses[0]


def test_every_object_in_deploy_is_accepted(kube: KubeCluster) -> None:
    """All of deploy/*.yaml's Kubernetes objects, created as shipped (CRDs structural, RBAC valid,
    workloads admitted with their priority classes and security contexts); the projectcalico.org
    resources of route-reflector-bgp.yaml through felixctl into the CRDs."""
    workloads = []
    try:
        for path in sorted((REPO / "deploy").glob("*.yaml")):
            # alerts.yaml is a Prometheus rule file, not a Kubernetes object: no apiVersion.
            objects = [o for o in manifest_objects(path)
                       if "apiVersion" in o and not o["apiVersion"].startswith("projectcalico.org/")]
            kube.apply(objects)
            workloads += [o for o in objects if o["kind"] in ("DaemonSet", "Deployment")]
        for crd in manifest_objects(kinds=("CustomResourceDefinition",)):
            got = kube.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}")
            conditions = {c["type"]: c["status"] for c in got["status"]["conditions"]}
            assert conditions.get("NonStructuralSchema", "False") == "False", crd["metadata"]["name"]
            assert conditions["Established"] == "True"
        done = subprocess.run([sys.executable, "-m", "felixpy.ctl.main", "apply", "-f",
                               str(REPO / "deploy/route-reflector-bgp.yaml")],
                              env={**os.environ, **kube.env()}, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        peer = kube.request("GET", f"{m.CRD_API}/bgppeers/peer-with-route-reflectors")
        assert peer["spec"]["peerSelector"] == "route-reflector == 'true'"
    finally:
        for w in workloads:
            plural = "daemonsets" if w["kind"] == "DaemonSet" else "deployments"
            try:
                kube.request("DELETE", f"/apis/apps/v1/namespaces/{w['metadata']['namespace']}/{plural}/"
                                       f"{w['metadata']['name']}")
            except ControlPlaneError:
                pass


def test_agent_works_with_the_node_token_and_is_refused_the_rest(kube: KubeCluster, tmp_path: Path) -> None:
    kube.node("fxt-n1", address="192.0.2.11", conditions=[
        {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated", "message": "no CNI yet"}])
    kube.namespace("fxt-a")
    kube.pod("fxt-a", "web", "fxt-n1")
    token = kube.sa_kubeconfig("felixpy-node")
    store = kube.store(token)
    env = {**kube.env(token), "NODENAME": "fxt-n1", "CALICO_IPV4POOL_CIDR": "10.71.0.0/16",
           "CALICO_IPV4POOL_VXLAN": "Always", "FELIXPY_STATE_DIR": str(tmp_path),
           "CALICO_NODENAME_FILE": str(tmp_path / "nodename")}
    result = startup(store, load_config(env), detect=_detect,
                     interfaces=lambda: list(HOST))
    node = kube.request("GET", "/api/v1/nodes/fxt-n1")
    assert node["metadata"]["annotations"]["projectcalico.org/IPv4Address"] == "192.0.2.11/24"
    assert node["metadata"]["annotations"]["projectcalico.org/IPv4VXLANTunnelAddr"]
    assert result.node["spec"]["ipv4VXLANTunnelAddr"]
    for plural, name in (("ippools", "default-ipv4-ippool"), ("felixconfigurations", "default"),
                         ("clusterinformations", "default")):
        kube.request("GET", f"{m.CRD_API}/{plural}/{name}")

    # Everything under /calico/ (eleven CRDs, Nodes, Pods, Namespaces, NetworkPolicies): list + watch.
    statuses: list[Any] = []
    syncer = Syncer(store, lambda e: statuses.append(e) if isinstance(e, SyncStatus) else None)
    syncer.start()
    try:
        kube.wait("the agent's syncer in sync", lambda: SyncStatus.IN_SYNC in statuses)
    finally:
        syncer.stop()

    # The CNI plugin's work: an address and the Pod's annotations.
    ipam = IPAM(store)
    (ip,) = ipam.auto_assign(handle="k8s-pod-network.cid1", attrs={"node": "fxt-n1", "pod": "web",
                                                                   "namespace": "fxt-a"}, node="fxt-n1")
    wep_key = keys.resource_key("workloadendpoints", names.workload_endpoint_name("fxt-n1", "web"), "fxt-a")
    store.create(wep_key, {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
                           "metadata": {"name": names.workload_endpoint_name("fxt-n1", "web"), "namespace": "fxt-a"},
                           "spec": {"node": "fxt-n1", "pod": "web", "containerID": "cid1",
                                    "ipNetworks": [f"{ip}/32"]}})
    assert store.get(wep_key).value["spec"]["ipNetworks"] == [f"{ip}/32"]

    # NetworkUnavailable: the controller-manager tainted the Node for it; clearing the condition
    # with the node token (GET nodes, PATCH nodes/status) makes it lift the taint.
    kube.wait("the network-unavailable taint", lambda: NET_TAINT in taints(kube, "fxt-n1"))
    assert k8s_node.clear_network_unavailable("fxt-n1", env) is True
    conditions = {c["type"]: c for c in kube.request("GET", "/api/v1/nodes/fxt-n1")["status"]["conditions"]}
    assert conditions["NetworkUnavailable"]["status"] == "False"
    assert conditions["NetworkUnavailable"]["reason"] == k8s_node.REASON
    kube.wait("the taint lifted", lambda: NET_TAINT not in taints(kube, "fxt-n1"))

    # Outside the role: deleting a Pod, a Node, changing a pool, reading a Secret elsewhere.
    from felixpy.datastore.kube import _ApiError

    http = store._http
    with pytest.raises(_ApiError) as err:
        http.request("DELETE", "/api/v1/namespaces/fxt-a/pods/web")
    assert err.value.code == 403 and forbidden(err.value, "delete", "pods")
    with pytest.raises(DatastoreError) as derr:
        store.delete(keys.resource_key("nodes", "fxt-n1"))
    assert forbidden(derr.value, "delete", "nodes")
    pool = store.get(keys.resource_key("ippools", "default-ipv4-ippool"))
    with pytest.raises(DatastoreError) as derr:
        store.update(pool.key, {**pool.value, "spec": {**pool.value["spec"], "disabled": True}}, pool.revision)
    assert forbidden(derr.value, "update", "ippools")
    with pytest.raises(_ApiError) as err:
        http.request("GET", "/api/v1/namespaces/default/secrets")
    assert forbidden(err.value, "list", "secrets")
    assert sorted(ipam.release_by_handle("k8s-pod-network.cid1")) == [ip]


def test_controllers_work_with_their_token_and_are_refused_the_rest(kube: KubeCluster, tmp_path: Path) -> None:
    admin = kube.store()
    admin.create(keys.resource_key("ippools", "pool1"), {
        "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "pool1"},
        "spec": {"cidr": "10.72.0.0/16", "blockSize": 26}})
    kube.namespace("fxt-a")
    for n in ("fxt-n1", "fxt-n2"):
        kube.node(n)
        kube.pod("fxt-a", f"web-{n}", n)
    ipam = IPAM(admin)
    kept = {}
    for n in ("fxt-n1", "fxt-n2"):
        pod = f"web-{n}"
        (ip,) = ipam.auto_assign(handle=f"k8s-pod-network.{pod}", attrs={"node": n, "pod": pod, "namespace": "fxt-a"},
                                 node=n)
        name = names.workload_endpoint_name(n, pod)
        admin.create(keys.resource_key("workloadendpoints", name, "fxt-a"), {
            "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": name, "namespace": "fxt-a"},
            "spec": {"node": n, "pod": pod, "containerID": pod, "ipNetworks": [f"{ip}/32"]}})
        kept[n] = ip
    # A leak (an address whose pod never got its endpoint), and a Node that goes away.
    (leak,) = ipam.auto_assign(handle="k8s-pod-network.ghost", attrs={"node": "fxt-n1", "pod": "ghost",
                                                                      "namespace": "fxt-a"}, node="fxt-n1")
    kube.request("DELETE", "/api/v1/namespaces/fxt-a/pods/web-fxt-n2",
                 {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
    kube.request("DELETE", "/api/v1/nodes/fxt-n2")

    token = kube.sa_kubeconfig("felixpy-controllers")
    env = {**os.environ, **kube.env(token), "FELIXPY_IPAM_GC_GRACE_PERIOD": "1s",
           "FELIXPY_CONTROLLER_RECONCILE_PERIOD": "2s", "FELIXPY_CONTROLLER_MIN_PASS_INTERVAL": "1s",
           "LOG_LEVEL": "info", "PYTHONPATH": str(REPO)}
    log = tmp_path / "controllers.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "felixpy.controllers.main"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=REPO)
    try:
        def settled() -> bool:
            owners = {str(a.ip): a for a in _allocations(admin)}
            return (str(leak) not in owners and str(kept["fxt-n2"]) not in owners
                    and not admin.list(keys.host_affinity_prefix("fxt-n2"))[0])
        kube.wait("the controllers' cleanup", settled, timeout=60, interval=0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    text = log.read_text()
    assert "forbidden" not in text.lower(), text[-3000:]
    assert ipam.get_assignment(kept["fxt-n1"]) is not None  # a live pod's address stays
    assert ipam_check.check(admin).problems == ()

    store = kube.store(token)
    with pytest.raises(DatastoreError) as err:
        store.create(keys.resource_key("ippools", "p2"), {
            "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p2"},
            "spec": {"cidr": "10.73.0.0/16"}})
    assert forbidden(err.value, "create", "ippools")
    with pytest.raises(DatastoreError) as err:
        store.delete(keys.resource_key("workloadendpoints", names.workload_endpoint_name("fxt-n1", "web-fxt-n1"), "fxt-a"))
    assert forbidden(err.value, "patch", "pods")


def _allocations(store: Any) -> list[Any]:
    from felixpy.controllers.ipam_gc import list_allocations

    return list_allocations(store)


def test_a_token_without_rights_is_one_clear_line_and_not_ready(kube: KubeCluster,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    kube.namespace("fxt-rbac")
    kube.request("POST", "/api/v1/namespaces/fxt-rbac/serviceaccounts",
                 {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "nobody"}})
    store = kube.store(kube.cp.token_kubeconfig("fxt-rbac", "nobody"))
    with pytest.raises(DatastoreError) as err:
        store.list("/calico/")
    assert "\n" not in str(err.value) and "cannot list resource" in str(err.value)

    probe = DatastoreProbe(store)
    assert probe.probe_once() is False
    ready, why = probe.check()
    assert not ready and 'cannot get resource "clusterinformations"' in why

    caplog.set_level(logging.WARNING, logger="felixpy.datastore.syncer")
    statuses: list[Any] = []
    syncer = Syncer(store, statuses.append, retry_interval=0.1, max_retry_interval=0.2)
    seen = threading.Event()
    syncer.start()
    try:
        kube.wait("the syncer's warning", lambda: any("cannot list resource" in r.getMessage()
                                                      for r in caplog.records))
    finally:
        syncer.stop()
        seen.set()
    assert SyncStatus.IN_SYNC not in statuses
    line = next(r.getMessage() for r in caplog.records if "cannot list resource" in r.getMessage())
    assert "\n" not in line and "forbidden" in line
    assert json.dumps(line)  # one printable line
