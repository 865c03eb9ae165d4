"""deploy/: the manifests against the Kubernetes 1.37 schemas, the RBAC the code needs, the env
the agent reads, the BGP containers' entry points, and the Dockerfile against the tree it builds
from."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bgp.config import SpeakerConfig, render_exabgp_conf, render_exabgp_env
from bgp.peers import BGPPeerSpec, BGPSettings, NodeInfo, PeerType, select_peers
from felixpy import config as felixpy_config
from felixpy.cni import install, plugin
from felixpy.model import resources
from felixpy.node import reflector
from felixpy.node.bgp import BGPPaths

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy/felixpy.yaml"
RR_MANIFEST = REPO / "deploy/route-reflector.yaml"
RR_BGP_RESOURCES = REPO / "deploy/route-reflector-bgp.yaml"
DOCKERFILE = REPO / "deploy/Dockerfile"
ENTRY_POINTS = REPO / "deploy/bin"
IMAGE_ENTRY_POINT_DIR = "/opt/felixpy/bin"
KUBERNETES_VERSION = "1.37.0"


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# Every Kubernetes object of both manifests (route-reflector-bgp.yaml holds projectcalico.org/v3
# resources for felixctl, checked on their own below).
DOCS = load_docs(MANIFEST) + load_docs(RR_MANIFEST)


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in DOCS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in containers(workload) if c["name"] == name]
    return found


DAEMONSET = one("DaemonSet", "felixpy-node")
REFLECTORS = one("DaemonSet", "felixpy-route-reflector")
CONTROLLERS = one("Deployment", "felixpy-controllers")
CONFIGMAP = one("ConfigMap", "felixpy-config")
WORKLOADS = (DAEMONSET, REFLECTORS, CONTROLLERS)


# --------------------------------------------------------------------------------------------
# Kubernetes schemas
# --------------------------------------------------------------------------------------------


def test_every_object_validates_against_kubernetes_1_37() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (offline 1.37 schemas)")
    assert DOCS
    for doc in DOCS:
        # strict: unknown fields are errors too (a typo such as hostNetwrk would pass otherwise)
        kv.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_what_it_should() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (offline 1.37 schemas)")
    broken = json.loads(json.dumps(DAEMONSET))
    broken["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def test_route_reflector_manifest_holds_only_the_reflector_daemonset() -> None:
    # It is applied after felixpy.yaml and reuses its ServiceAccount, RBAC and ConfigMap.
    assert [(d["kind"], d["metadata"]["name"]) for d in load_docs(RR_MANIFEST)] == [
        ("DaemonSet", "felixpy-route-reflector")]


def test_everything_is_in_kube_system_or_cluster_scoped() -> None:
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
    for doc in DOCS:
        if doc["kind"] in cluster_scoped:
            assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        else:
            assert doc["metadata"]["namespace"] == "kube-system", doc["metadata"]["name"]


# --------------------------------------------------------------------------------------------
# CRDs
# --------------------------------------------------------------------------------------------

# Calico's Kubernetes-datastore kinds (crd.projectcalico.org/v1): kind -> (plural, namespaced)
CRD_KINDS = {
    "IPPool": ("ippools", False),
    "IPReservation": ("ipreservations", False),
    "IPAMBlock": ("ipamblocks", False),
    "BlockAffinity": ("blockaffinities", False),
    "IPAMHandle": ("ipamhandles", False),
    "IPAMConfig": ("ipamconfigs", False),
    "BGPConfiguration": ("bgpconfigurations", False),
    "BGPPeer": ("bgppeers", False),
    "BGPFilter": ("bgpfilters", False),
    "CalicoNodeStatus": ("caliconodestatuses", False),
    "FelixConfiguration": ("felixconfigurations", False),
    "NetworkPolicy": ("networkpolicies", True),
    "GlobalNetworkPolicy": ("globalnetworkpolicies", False),
    "ClusterInformation": ("clusterinformations", False),
    "Tier": ("tiers", False),
    "NetworkSet": ("networksets", True),
    "GlobalNetworkSet": ("globalnetworksets", False),
    "HostEndpoint": ("hostendpoints", False),
}

FORBIDDEN_KEYWORDS = {"$ref", "definitions", "dependencies", "additionalItems", "patternProperties", "id", "$schema"}
JUNCTORS = ("allOf", "anyOf", "oneOf", "not")


def structural_problems(schema: Any, path: str = "", is_metadata: bool = False) -> Iterator[str]:
    """Why schema is not a structural schema (Kubernetes' rules for apiextensions.k8s.io/v1)."""
    if not isinstance(schema, dict):
        yield f"{path or '<root>'}: not an object"
        return
    where = path or "<root>"
    for key in FORBIDDEN_KEYWORDS & schema.keys():
        yield f"{where}: {key} is not allowed"
    if schema.get("uniqueItems") is True:
        yield f"{where}: uniqueItems: true is not allowed"
    if schema.get("additionalProperties") is False:
        yield f"{where}: additionalProperties: false is not allowed"
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    if not schema.get("type") and not int_or_string:
        yield f"{where}: no type"
    if "x-kubernetes-preserve-unknown-fields" in schema and schema["x-kubernetes-preserve-unknown-fields"] is not True:
        yield f"{where}: x-kubernetes-preserve-unknown-fields may only be true"
    if "properties" in schema and isinstance(schema.get("additionalProperties"), dict):
        yield f"{where}: properties and additionalProperties together"
    for junctor in JUNCTORS:
        for sub in (schema.get(junctor) or []) if junctor != "not" else ([schema["not"]] if "not" in schema else []):
            for key in ("description", "type", "default", "additionalProperties", "nullable"):
                if isinstance(sub, dict) and key in sub and not int_or_string:
                    yield f"{where}.{junctor}: sets {key}"
    if is_metadata and set(schema.get("properties", {})) - {"name", "generateName"}:
        yield f"{where}: metadata may only constrain name and generateName"
    for name, sub in (schema.get("properties") or {}).items():
        yield from structural_problems(sub, f"{path}.{name}" if path else name,
                                       is_metadata=(path == "" and name == "metadata"))
    if isinstance(schema.get("additionalProperties"), dict):
        yield from structural_problems(schema["additionalProperties"], f"{path}[*]")
    if "items" in schema:
        yield from structural_problems(schema["items"], f"{path}[]")
    elif schema.get("type") == "array":
        yield f"{where}: array without items"


def crds() -> list[dict[str, Any]]:
    return [d for d in DOCS if d["kind"] == "CustomResourceDefinition"]


def test_crds_are_calicos_kinds() -> None:
    got = {}
    for crd in crds():
        spec = crd["spec"]
        assert spec["group"] == "crd.projectcalico.org"
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.crd.projectcalico.org"
        assert spec["names"]["listKind"] == spec["names"]["kind"] + "List"
        assert [v["name"] for v in spec["versions"]] == ["v1"]
        assert spec["versions"][0]["served"] and spec["versions"][0]["storage"]
        got[spec["names"]["kind"]] = (spec["names"]["plural"], spec["scope"] == "Namespaced")
    assert got == CRD_KINDS


@pytest.mark.parametrize("kind", sorted(CRD_KINDS))
def test_crd_schema_is_structural(kind: str) -> None:
    (crd,) = [c for c in crds() if c["spec"]["names"]["kind"] == kind]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert list(structural_problems(schema)) == []
    assert schema["type"] == "object"
    assert schema["properties"]["spec"]["type"] == "object"


def test_structural_check_catches_violations() -> None:
    bad = {"type": "object", "properties": {
        "metadata": {"type": "object", "properties": {"labels": {"type": "object"}}},
        "spec": {"properties": {"a": {"type": "string"}}},
        "list": {"type": "array"},
        "odd": {"type": "object", "anyOf": [{"type": "string"}], "patternProperties": {}},
    }}
    problems = list(structural_problems(bad))
    assert any("metadata may only constrain" in p for p in problems)
    assert "spec: no type" in problems
    assert "list: array without items" in problems
    assert "odd.anyOf: sets type" in problems
    assert "odd: patternProperties is not allowed" in problems


# --------------------------------------------------------------------------------------------
# RBAC: exactly what the code calls
# --------------------------------------------------------------------------------------------

CORE, NET, CALICO, DISCOVERY = "", "networking.k8s.io", "crd.projectcalico.org", "discovery.k8s.io"

# (apiGroup, resource, verbs) -> why felixpy-node needs it.
NODE_RULES: list[tuple[str, str, str, str]] = [
    (CORE, "nodes", "get list watch", "syncer: every Node (routes to other nodes' blocks, BGP peers); startup reads its own"),
    (CORE, "nodes", "patch", "startup: its address and AS as projectcalico.org/* annotations (kube.py merge patch)"),
    (CORE, "nodes/status", "patch", "clears the NetworkUnavailable condition once routes are programmed"),
    (CORE, "pods", "get list watch", "workload endpoints: labels, IPs, named container ports"),
    (CORE, "pods", "patch", "CNI ADD/DEL: the pod's IPs and container ID as cni.projectcalico.org/* annotations"),
    (CORE, "namespaces", "get list watch", "profiles kns.<namespace> with the namespace's labels"),
    (CORE, "serviceaccounts", "get list watch", "profiles ksa.<namespace>.<account> with the account's labels"),
    (NET, "networkpolicies", "list watch", "Kubernetes NetworkPolicies, converted to Calico policy"),
    (CALICO, "ippools", "get list watch", "pools: IPAM, routes, natOutgoing"),
    (CALICO, "ippools", "create", "startup creates the default pool when none exists (create-only)"),
    (CALICO, "ipreservations", "get list watch", "IPAM: addresses auto-assignment skips"),
    (CALICO, "ipamblocks", "get list watch", "IPAM and routes to every block"),
    (CALICO, "ipamblocks", "create update delete", "IPAM: claim, assign/release (CAS), release empty affine blocks"),
    (CALICO, "blockaffinities", "get list watch", "IPAM: this node's affine blocks"),
    (CALICO, "blockaffinities", "create update delete", "IPAM: claim and confirm, release a block's affinity"),
    (CALICO, "ipamhandles", "get list watch", "IPAM: release by handle (CNI DEL); the syncer watches all of /calico/"),
    (CALICO, "ipamhandles", "create update delete", "IPAM: one handle per pod, updated per address, deleted when empty"),
    (CALICO, "ipamconfigs", "get list watch", "IPAM configuration (strictAffinity, maxBlocksPerHost)"),
    (CALICO, "ipamconfigs", "create", "startup's ensureDefaultConfig (create-only)"),
    (CALICO, "bgpconfigurations", "get list watch", "AS number, mesh on/off"),
    (CALICO, "bgpconfigurations", "create", "startup's ensureDefaultConfig (create-only)"),
    (CALICO, "bgppeers", "get list watch", "explicit BGP peers"),
    (CALICO, "bgpfilters", "get list watch", "BGPFilters named by BGPPeers"),
    (CALICO, "caliconodestatuses", "get list watch", "CalicoNodeStatus requests for this node"),
    (CALICO, "caliconodestatuses", "update", "the agent writes the status of its node's CalicoNodeStatus"),
    (CORE, "services", "get list watch", "BGP service advertisement: cluster, external and LoadBalancer IPs"),
    (DISCOVERY, "endpointslices", "get list watch", "BGP service advertisement: Local services' endpoints"),
    (CALICO, "felixconfigurations", "get list watch", "datastore Felix parameters"),
    (CALICO, "felixconfigurations", "create", "startup's ensureDefaultConfig (create-only)"),
    (CALICO, "networkpolicies", "get list watch", "Calico NetworkPolicies"),
    (CALICO, "globalnetworkpolicies", "get list watch", "Calico GlobalNetworkPolicies"),
    (CALICO, "clusterinformations", "get list watch", "datastoreReady (CNI refuses while false)"),
    (CALICO, "tiers", "get list watch", "policy tiers: order and default action"),
    (CALICO, "networksets", "get list watch", "NetworkSets: their nets are selector ipset members"),
    (CALICO, "globalnetworksets", "get list watch", "GlobalNetworkSets: their nets are selector ipset members"),
    (CALICO, "hostendpoints", "get list watch", "HostEndpoints: host interfaces' policy, expectedIPs in ipsets"),
    (CALICO, "clusterinformations", "create", "startup's ensureDefaultConfig (create-only)"),
]

# (apiGroup, resource, verbs) -> why felixpy-controllers needs it (Kubernetes-datastore mode).
CONTROLLER_RULES: list[tuple[str, str, str, str]] = [
    (CORE, "pods", "get list watch", "IPAM GC: is the pod an IP was assigned to still there"),
    (CORE, "nodes", "get list watch", "a deleted Node's affinities and blocks are cleaned up"),
    (CALICO, "ipamblocks", "get list watch update delete", "IPAM GC releases addresses; deleted nodes' empty blocks go"),
    (CALICO, "blockaffinities", "get list watch update delete", "deleted nodes' affinities are released"),
    (CALICO, "ipamhandles", "get list watch update delete", "IPAM GC releases all IPs of a handle together"),
    (CALICO, "ipamconfigs", "get list", "strictAffinity decides whether a released block is kept"),
    (CALICO, "ippools", "list", "releasing an address reads the pools (found missing on a real API server)"),
    (CALICO, "ippools", "watch", "the IPAM metrics follow the pools (ipam_ippool_size, per-pool labels)"),
    (CALICO, "clusterinformations", "get", "a pass is skipped while the datastore is locked (datastoreReady, "
     "found missing on a real API server)"),
]


def expand_expected(rules: list[tuple[str, str, str, str]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for group, resource, verbs, _why in rules for verb in verbs.split()}


def expand_granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    granted = set()
    for rule in role["rules"]:
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {role['metadata']['name']}"
                    granted.add((group, resource, verb))
    return granted


@pytest.mark.parametrize("name,rules", [("felixpy-node", NODE_RULES), ("felixpy-controllers", CONTROLLER_RULES)])
def test_rbac_grants_exactly_what_the_code_calls(name: str, rules: list[tuple[str, str, str, str]]) -> None:
    granted = expand_granted(one("ClusterRole", name))
    expected = expand_expected(rules)
    assert sorted(granted - expected) == [], "granted but not needed"
    assert sorted(expected - granted) == [], "needed but not granted"


@pytest.mark.parametrize("name", ["felixpy-node", "felixpy-controllers"])
def test_each_role_is_bound_to_its_own_service_account(name: str) -> None:
    binding = one("ClusterRoleBinding", name)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": "kube-system"}]
    one("ServiceAccount", name)
    workload = DAEMONSET if name == "felixpy-node" else CONTROLLERS
    assert workload["spec"]["template"]["spec"]["serviceAccountName"] == name


def test_crd_resources_in_rbac_exist() -> None:
    plurals = {plural for plural, _ in CRD_KINDS.values()}
    for _group, resource, _verbs, _why in NODE_RULES + CONTROLLER_RULES:
        if _group == CALICO:
            assert resource in plurals


# The code itself, run against the fake API server, which records every request it serves: each
# (apiGroup, resource, verb) the agent or the controllers made must be granted by their ClusterRole
# as shipped. The hand-written tables above say why; these runs say the tables are what the code does.

def _kube_fake(tmp_path: Path) -> tuple[Any, str]:
    from tests.support.fake_kube_api import FakeKubeAPI

    fake = FakeKubeAPI(bookmark_interval=0.2).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    return fake, str(kubeconfig)


def _fake_node(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {
        "addresses": [{"type": "InternalIP", "address": "192.0.2.11"}],
        "conditions": [{"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}}


def _fake_pod(namespace: str, name: str, node: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
            "spec": {"nodeName": node, "serviceAccountName": "default", "containers": [{"name": "c"}]}}


def _ungranted(recorded: set[Any], role: str) -> list[str]:
    granted = expand_granted(one("ClusterRole", role))
    return sorted(f"{r.verb} {r.group or 'core'}/{r.resource}" for r in recorded
                  if (r.group, r.resource, r.verb) not in granted)


def test_the_agent_makes_only_requests_felixpy_node_grants(tmp_path: Path) -> None:
    import ipaddress

    from felixpy import names
    from felixpy.config import load_config
    from felixpy.datastore import keys
    from felixpy.datastore.kube import KubeDatastore, load_settings
    from felixpy.datastore.syncer import Syncer, SyncStatus
    from felixpy.ipam.allocator import IPAM
    from felixpy.kernel.addresses import Interface
    from felixpy.node import k8s_node
    from felixpy.node.startup import startup

    fake, kubeconfig = _kube_fake(tmp_path)
    try:
        fake.put("/api/v1/nodes", _fake_node("fxt-n1"))
        fake.put("/api/v1/namespaces", {"metadata": {"name": "fxt-a"}})
        fake.put("/api/v1/namespaces/fxt-a/pods", _fake_pod("fxt-a", "web", "fxt-n1"))
        env = {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": kubeconfig, "NODENAME": "fxt-n1",
               "CALICO_IPV4POOL_CIDR": "10.71.0.0/16", "CALICO_IPV4POOL_VXLAN": "Always",
               "FELIXPY_STATE_DIR": str(tmp_path), "CALICO_NODENAME_FILE": str(tmp_path / "nodename")}
        host = [Interface("eth0", 2, True, 1500, (ipaddress.IPv4Interface("192.0.2.11/24"),))]
        store = KubeDatastore(load_settings(kubeconfig=kubeconfig))
        since = len(fake.requests)

        # What the agent does on a node: startup, the syncer over /calico/, the CNI plugin's IPAM
        # and WorkloadEndpoint, the NetworkUnavailable condition, a pod's DEL.
        startup(store, load_config(env), detect=lambda method, version=4: host[0].addresses[0],
                interfaces=lambda: list(host))
        statuses: list[Any] = []
        syncer = Syncer(store, lambda e: statuses.append(e) if isinstance(e, SyncStatus) else None)
        syncer.start()
        try:
            deadline = time.monotonic() + 20
            while SyncStatus.IN_SYNC not in statuses:
                assert time.monotonic() < deadline, "the syncer never got in sync"
                time.sleep(0.05)
        finally:
            syncer.stop()
        ipam = IPAM(store)
        (ip,) = ipam.auto_assign(handle="k8s-pod-network.cid1", attrs={"node": "fxt-n1", "pod": "web",
                                                                       "namespace": "fxt-a"}, node="fxt-n1")
        wep = names.workload_endpoint_name("fxt-n1", "web")
        wep_key = keys.resource_key("workloadendpoints", wep, "fxt-a")
        store.create(wep_key, {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
                               "metadata": {"name": wep, "namespace": "fxt-a"},
                               "spec": {"node": "fxt-n1", "pod": "web", "containerID": "cid1",
                                        "ipNetworks": [f"{ip}/32"]}})
        assert k8s_node.clear_network_unavailable("fxt-n1", env) is True
        store.delete(wep_key)
        assert sorted(ipam.release_by_handle("k8s-pod-network.cid1")) == [ip]
        recorded = fake.rbac_requests(since)
        store.close()
    finally:
        fake.stop()
    # Not vacuous: the run exercised reads, IPAM writes, the pod and Node patches.
    assert {("", "nodes/status", "patch"), ("", "pods", "patch"), (CALICO, "ipamblocks", "create"),
            (CALICO, "ipamhandles", "delete"), (CALICO, "ippools", "watch")} <= {
        (r.group, r.resource, r.verb) for r in recorded}
    assert _ungranted(recorded, "felixpy-node") == []


def test_the_controllers_make_only_requests_felixpy_controllers_grants(tmp_path: Path) -> None:
    from felixpy.datastore import keys
    from felixpy.datastore.kube import KubeDatastore, load_settings
    from felixpy.ipam.allocator import IPAM

    fake, kubeconfig = _kube_fake(tmp_path)
    proc = None
    try:
        admin = KubeDatastore(load_settings(kubeconfig=kubeconfig))
        admin.create(keys.resource_key("ippools", "pool1"), {
            "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "pool1"},
            "spec": {"cidr": "10.72.0.0/16", "blockSize": 26}})
        fake.put("/api/v1/nodes", _fake_node("fxt-n1"))
        fake.put("/api/v1/namespaces", {"metadata": {"name": "fxt-a"}})
        # A leak: an address whose pod does not exist; the controllers' IPAM GC releases it.
        (leak,) = IPAM(admin).auto_assign(handle="k8s-pod-network.ghost", attrs={
            "node": "fxt-n1", "pod": "ghost", "namespace": "fxt-a"}, node="fxt-n1")
        admin.close()
        since = len(fake.requests)
        env = {**os.environ, "DATASTORE_TYPE": "kubernetes", "KUBECONFIG": kubeconfig,
               "FELIXPY_IPAM_GC_GRACE_PERIOD": "1s", "FELIXPY_CONTROLLER_RECONCILE_PERIOD": "1s",
               "FELIXPY_CONTROLLER_MIN_PASS_INTERVAL": "1s", "PYTHONPATH": str(REPO)}
        with open(tmp_path / "controllers.log", "w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "felixpy.controllers.main"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=REPO)
        handle = f"/apis/crd.projectcalico.org/v1/ipamhandles/{'k8s-pod-network.ghost'}"
        deadline = time.monotonic() + 60
        while fake.object(handle) is not None:  # read in-process: no request of ours is recorded
            assert proc.poll() is None, (tmp_path / "controllers.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the leak {leak} was not released"
            time.sleep(0.2)
        recorded = fake.rbac_requests(since)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        fake.stop()
    assert {("", "pods", "list"), (CALICO, "ipamblocks", "update"), (CALICO, "ipamhandles", "delete")} <= {
        (r.group, r.resource, r.verb) for r in recorded}, sorted(recorded)
    assert _ungranted(recorded, "felixpy-controllers") == []


def test_rbac_and_crds_cover_what_the_kubernetes_datastore_reads() -> None:
    """The agent's syncer lists and watches everything under /calico/: every collection kube.py maps."""
    kube_mapping = pytest.importorskip("felixpy.datastore.kube_mapping")
    granted = expand_granted(one("ClusterRole", "felixpy-node"))
    plurals = {plural: namespaced for plural, namespaced in CRD_KINDS.values()}
    for kind in kube_mapping.ALL_KINDS:
        group = "" if kind.api == "/api/v1" else kind.api.split("/")[2]
        if group == CALICO:
            assert plurals.get(kind.resource) == kind.namespaced, f"no CRD for {kind.resource}"
        for verb in ("get", "list", "watch") if group != NET else ("list", "watch"):
            assert (group, kind.resource, verb) in granted, (group, kind.resource, verb)


# --------------------------------------------------------------------------------------------
# Environment: every variable is one the code reads
# --------------------------------------------------------------------------------------------

NODE_NAME = "node-1"


def resolved_env(c: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would give it (ConfigMap keys and fieldRefs)."""
    env = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            assert ref["name"] == "felixpy-config"
            env[item["name"]] = CONFIGMAP["data"][ref["key"]]
        else:
            assert source == {"fieldRef": {"fieldPath": "spec.nodeName"}}
            env[item["name"]] = NODE_NAME
    return env


def test_env_values_are_strings() -> None:
    for workload in WORKLOADS:
        for c in containers(workload):
            for item in c.get("env", []):
                assert "valueFrom" in item or isinstance(item["value"], str), item


# Route-reflector mode's variables, read by felixpy/node/reflector.py (not felixpy.config: they
# choose and configure another loop, documented in docs/bgp.md).
REFLECTOR_VARIABLES = {"FELIXPY_ROUTE_REFLECTOR", "FELIXPY_BIRD_CONFIG", "FELIXPY_BIRD_SOCKET", "FELIXPY_BIRD_START"}


def test_reflector_variables_are_the_ones_reflector_py_reads() -> None:
    source = Path(reflector.__file__).read_text()
    read = set(re.findall(r'env\.get\("(FELIXPY_[A-Z_]+)"', source))
    assert REFLECTOR_VARIABLES <= read
    assert read - REFLECTOR_VARIABLES <= set(felixpy_config.VARIABLES)


@pytest.mark.parametrize("workload,name,extra", [
    (DAEMONSET, "felixpy-node", set()),
    (DAEMONSET, "exabgp", set()),
    (REFLECTORS, "felixpy-node", REFLECTOR_VARIABLES),
    (CONTROLLERS, "felixpy-controllers", set()),
])
def test_agent_env_vars_are_all_in_felixpy_config(workload: dict[str, Any], name: str, extra: set[str]) -> None:
    known = set(felixpy_config.VARIABLES) - {"FELIX_*"} | extra
    names = [item["name"] for item in container(workload, name)["env"]]
    assert len(names) == len(set(names)), "duplicate env var"
    assert sorted(set(names) - known) == []


def test_bird_container_env_is_the_reflectors_paths() -> None:
    bird_env = resolved_env(container(REFLECTORS, "bird"))
    node_env = resolved_env(container(REFLECTORS, "felixpy-node"))
    assert set(bird_env) == {"FELIXPY_BIRD_CONFIG", "FELIXPY_BIRD_SOCKET"}
    assert bird_env == {k: node_env[k] for k in bird_env}


def test_node_env_parses_to_the_intended_config() -> None:
    node = container(DAEMONSET, "felixpy-node")
    cfg = felixpy_config.load_config(resolved_env(node))
    assert cfg.datastore.type == "kubernetes" and cfg.datastore.wait_for_datastore
    assert cfg.node.name == NODE_NAME
    # calico.yaml's configuration: BGP (the ExaBGP sidecar), an IPIP-always default pool
    assert cfg.node.networking_backend == CONFIGMAP["data"]["calico_backend"] == "bird"
    assert cfg.node.cluster_type == "k8s,bgp"
    assert (cfg.ipv4_pool.ipip_mode, cfg.ipv4_pool.vxlan_mode) == ("Always", "Never")
    assert cfg.felix.health_enabled
    assert cfg.felix.unused_params() == []
    assert not reflector.reflector_mode(resolved_env(node))
    for probe, path in (("livenessProbe", "/liveness"), ("readinessProbe", "/readiness")):
        get = node[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, cfg.felix.health_port)


def test_reflector_env_parses_to_reflector_mode() -> None:
    env = resolved_env(container(REFLECTORS, "felixpy-node"))
    cfg = felixpy_config.load_config(env)
    assert cfg.node.name == NODE_NAME and cfg.datastore.type == "kubernetes"
    assert cfg.node.networking_backend == "bird"
    assert reflector.reflector_mode(env)
    paths = reflector.ReflectorPaths.from_env(env, cfg.agent.state_dir)
    # BIRD is the bird container, not felixpy-node's child.
    assert not paths.start_bird
    assert (paths.config, paths.socket) == ("/var/run/calico/bird/bird.conf", "/var/run/calico/bird/bird.ctl")


def test_install_cni_env_vars_are_the_ones_install_reads() -> None:
    env = resolved_env(container(DAEMONSET, "install-cni"))
    assert sorted(set(env) - install.ENV_VARIABLES) == []
    settings = install.settings_from_env(env)
    node_env = felixpy_config.load_config(resolved_env(container(DAEMONSET, "felixpy-node")))
    # The plugin must dial the socket the agent listens on.
    assert settings.agent_socket == node_env.agent.cni_socket
    assert settings.conf_name == "10-felixpy.conflist"


def test_configmap_template_renders_to_the_shipped_conflist() -> None:
    settings = install.settings_from_env(resolved_env(container(DAEMONSET, "install-cni")))
    rendered = install.render_network_config(settings.template, mtu=settings.mtu, node_name=settings.node_name,
                                             agent_socket=settings.agent_socket)
    assert rendered == json.loads((REPO / "deploy/cni/10-felixpy.conflist").read_text())
    assert rendered == install.render_network_config(install.DEFAULT_TEMPLATE, mtu=0, node_name="",
                                                     agent_socket=plugin.DEFAULT_SOCKET)


# --------------------------------------------------------------------------------------------
# The DaemonSet and the Deployment
# --------------------------------------------------------------------------------------------


def host_paths(workload: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["hostPath"]["path"] for v in workload["spec"]["template"]["spec"].get("volumes", [])
            if "hostPath" in v}


def mounts(workload: dict[str, Any], name: str) -> dict[str, str]:
    """mountPath -> volume name of one container."""
    return {m["mountPath"]: m["name"] for m in container(workload, name).get("volumeMounts", [])}


def volume(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return found


def inside(path: str, directory: str) -> bool:
    return Path(path).parent == Path(directory)


@pytest.mark.parametrize("workload", [DAEMONSET, REFLECTORS], ids=["felixpy-node", "felixpy-route-reflector"])
def test_daemonsets_run_like_calico_node(workload: dict[str, Any]) -> None:
    spec = workload["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["serviceAccountName"] == "felixpy-node"
    assert {"effect": "NoSchedule", "operator": "Exists"} in spec["tolerations"]
    assert {"effect": "NoExecute", "operator": "Exists"} in spec["tolerations"]
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    for name in ("install-cni", "felixpy-node"):
        assert container(workload, name)["securityContext"]["privileged"] is True


def test_bgp_speakers_are_root_with_network_capabilities_not_privileged() -> None:
    for workload, name, needed in ((DAEMONSET, "exabgp", {"NET_BIND_SERVICE"}),
                                   (REFLECTORS, "bird", {"NET_BIND_SERVICE", "NET_ADMIN"})):
        security = container(workload, name)["securityContext"]
        assert "privileged" not in security and "runAsUser" not in security
        assert needed <= set(security["capabilities"]["add"])
    assert [c["name"] for c in DAEMONSET["spec"]["template"]["spec"]["containers"]] == ["felixpy-node", "exabgp"]
    assert [c["name"] for c in REFLECTORS["spec"]["template"]["spec"]["containers"]] == ["felixpy-node", "bird"]


def test_mounts_are_calico_nodes() -> None:
    paths = host_paths(DAEMONSET)
    node_mounts = {path: paths[name] for path, name in mounts(DAEMONSET, "felixpy-node").items() if name in paths}
    for path in ("/run/xtables.lock", "/var/run/calico", "/var/lib/calico", "/lib/modules", "/var/run/netns"):
        assert node_mounts[path] == path
    cni_mounts = {m["mountPath"]: paths[m["name"]] for m in container(DAEMONSET, "install-cni")["volumeMounts"]}
    settings = install.settings_from_env(resolved_env(container(DAEMONSET, "install-cni")))
    assert cni_mounts == {settings.bin_dir: "/opt/cni/bin", settings.net_dir: "/etc/cni/net.d"}
    # The CNI socket lives in a host directory the agent mounts, so the plugin on the host reaches it.
    assert node_mounts["/var/run/calico"] == str(Path(settings.agent_socket).parent)


def test_agent_and_exabgp_share_the_bgp_volume() -> None:
    agent_env = resolved_env(container(DAEMONSET, "felixpy-node"))
    exabgp_env = resolved_env(container(DAEMONSET, "exabgp"))
    cfg = felixpy_config.load_config(agent_env)
    paths = BGPPaths.from_env(agent_env, cfg.agent.state_dir)
    shared = "/var/run/calico/exabgp"
    agent_mounts, exabgp_mounts = mounts(DAEMONSET, "felixpy-node"), mounts(DAEMONSET, "exabgp")
    # One volume at the same path in both containers, holding the config, the pid file and the socket.
    assert agent_mounts[shared] == exabgp_mounts[shared] == "exabgp"
    assert list(exabgp_mounts) == [shared]
    for path in (paths.config, paths.pid_file, paths.socket):
        assert inside(path, shared), path
    # The entry point reads the very same values the agent does.
    assert exabgp_env == {"NODENAME": NODE_NAME, "FELIXPY_EXABGP_CONFIG": paths.config,
                          "FELIXPY_EXABGP_PIDFILE": paths.pid_file, "FELIXPY_BGP_SOCKET": paths.socket}
    # Per pod: the pid file names a pid in this pod's namespace, which the agent can signal
    # only when the containers share it.
    assert volume(DAEMONSET, "exabgp") == {"name": "exabgp", "emptyDir": {}}
    assert DAEMONSET["spec"]["template"]["spec"]["shareProcessNamespace"] is True
    # The status felixctl node status reads is on the host.
    assert inside(paths.status, "/var/lib/calico") and host_paths(DAEMONSET)[agent_mounts["/var/lib/calico"]]


def test_reflector_and_bird_share_the_bird_volume() -> None:
    env = resolved_env(container(REFLECTORS, "felixpy-node"))
    paths = reflector.ReflectorPaths.from_env(env, felixpy_config.load_config(env).agent.state_dir)
    shared = "/var/run/calico/bird"
    node_mounts, bird_mounts = mounts(REFLECTORS, "felixpy-node"), mounts(REFLECTORS, "bird")
    assert node_mounts[shared] == bird_mounts[shared] == "bird"
    assert inside(paths.config, shared) and inside(paths.socket, shared)
    assert volume(REFLECTORS, "bird") == {"name": "bird", "emptyDir": {}}
    assert host_paths(REFLECTORS)[node_mounts["/var/lib/calico"]] == "/var/lib/calico"
    assert inside(paths.status, "/var/lib/calico")


def schedules(workload: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the workload's nodeSelector and required node affinity accept a node with labels."""
    spec = workload["spec"]["template"]["spec"]
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return False
    required = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True

    def matches(expr: dict[str, Any]) -> bool:
        value = labels.get(expr["key"])
        if expr["operator"] == "In":
            return value in expr["values"]
        assert expr["operator"] == "NotIn", expr
        return value not in expr["values"]

    return any(all(matches(e) for e in term["matchExpressions"]) for term in required["nodeSelectorTerms"])


@pytest.mark.parametrize("labels,expected", [
    ({"kubernetes.io/os": "linux"}, "felixpy-node"),
    ({"kubernetes.io/os": "linux", "route-reflector": "false"}, "felixpy-node"),
    # Calico's recipe: the reflector still runs pods, so the agent stays (and reflects itself).
    ({"kubernetes.io/os": "linux", "route-reflector": "true"}, "felixpy-node"),
    ({"kubernetes.io/os": "linux", "route-reflector": "true", "felixpy.io/dedicated-route-reflector": "true"},
     "felixpy-route-reflector"),
    ({"kubernetes.io/os": "linux", "felixpy.io/dedicated-route-reflector": "false"}, "felixpy-node"),
])
def test_each_node_runs_exactly_one_bgp_speaker(labels: dict[str, str], expected: str) -> None:
    # Both listen on the node's port 179 (hostNetwork).
    running = [w["metadata"]["name"] for w in (DAEMONSET, REFLECTORS) if schedules(w, labels)]
    assert running == [expected]


def test_every_mount_names_a_volume() -> None:
    for workload in WORKLOADS:
        volumes = {v["name"] for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for c in containers(workload):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_commands_are_console_scripts_or_entry_points_of_the_image() -> None:
    scripts = pyproject()["project"]["scripts"]
    entry_points = {p.name for p in ENTRY_POINTS.iterdir()}
    used = set()
    for workload in WORKLOADS:
        for c in containers(workload):
            command = c["command"][0]
            assert command in scripts or command in entry_points, f"{c['name']}: {command} is in neither"
            used.add(command)
    assert entry_points <= used, "an entry point in deploy/bin/ that no container runs"


def test_image_tag_is_the_project_version() -> None:
    version = pyproject()["project"]["version"]
    for workload in WORKLOADS:
        for c in containers(workload):
            assert c["image"] == f"felixpy:{version}"


# --------------------------------------------------------------------------------------------
# Route reflectors: the projectcalico.org/v3 resources applied with felixctl
# --------------------------------------------------------------------------------------------


def test_reflector_bgp_resources_are_valid_calico_resources() -> None:
    docs = load_docs(RR_BGP_RESOURCES)
    assert [(d["apiVersion"], d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("projectcalico.org/v3", "BGPPeer", "peer-with-route-reflectors"),
        ("projectcalico.org/v3", "BGPConfiguration", "default"),
    ]
    for doc in docs:
        resources.validate(doc)  # what felixctl apply checks before storing
    peer, bgp_config = docs
    assert peer["spec"] == {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}
    assert bgp_config["spec"] == {"nodeToNodeMeshEnabled": False}


def test_reflector_bgp_resources_give_reflector_peering() -> None:
    """What felixpy does with the file: 3 nodes and 2 reflectors (labelled as docs/deploy.md says)."""
    peer, bgp_config = (resources.validate(d) for d in load_docs(RR_BGP_RESOURCES))
    nodes = [NodeInfo(f"n{i}", f"10.0.0.{i}") for i in (1, 2, 3)] + [
        NodeInfo(f"rr{i}", f"10.0.0.{100 + i}", labels={"route-reflector": "true"}, rr_cluster_id="244.0.0.1")
        for i in (1, 2)]
    settings = BGPSettings.from_resource(bgp_config)
    specs = [BGPPeerSpec.from_resource(peer)]
    # A node peers with the reflectors only (the mesh is off) ...
    n1 = select_peers("n1", nodes, settings, specs)
    assert sorted(p.address for p in n1) == ["10.0.0.101", "10.0.0.102"]
    assert all(p.type == PeerType.REFLECTOR and not p.rr_client for p in n1)
    # ... and a reflector with every node as its client, the other reflector as a plain iBGP peer.
    rr1 = {p.address: p for p in select_peers("rr1", nodes, settings, specs)}
    assert sorted(rr1) == ["10.0.0.1", "10.0.0.102", "10.0.0.2", "10.0.0.3"]
    assert [a for a, p in sorted(rr1.items()) if p.rr_client] == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


# --------------------------------------------------------------------------------------------
# The BGP containers' entry points (deploy/bin/), run with a stand-in for the daemon they exec
# --------------------------------------------------------------------------------------------


def fake_daemon(directory: Path, name: str) -> Path:
    """An executable `name` that records its argv and environment as JSON, then exits 0."""
    record = directory / f"{name}.json"
    path = directory / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(record)!r}, 'w'))\n")
    path.chmod(0o755)
    return record


def entry_point_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    fakes = tmp_path / "fakebin"
    fakes.mkdir(exist_ok=True)
    # As in the image: the venv (felixpy-node, python3, exabgp) first on PATH.
    venv_bin = Path(sys.executable).parent
    return {"PATH": f"{fakes}:{venv_bin}:/usr/bin:/bin", **extra}


def console_script_interpreter(name: str) -> str:
    """The interpreter a console script's #! line names: the agent's sys.executable."""
    script = shutil.which(name, path=str(Path(sys.executable).parent))
    assert script, f"{name} is not installed next to {sys.executable}"
    return Path(script).read_text().splitlines()[0].removeprefix("#!").strip()


def test_exabgp_entry_point_starts_exabgp_on_a_neighbourless_config(tmp_path: Path) -> None:
    run_dir = tmp_path / "exabgp"
    env = entry_point_env(tmp_path, NODENAME=NODE_NAME, FELIXPY_EXABGP_CONFIG=f"{run_dir}/exabgp.conf",
                          FELIXPY_EXABGP_PIDFILE=f"{run_dir}/exabgp.pid", FELIXPY_BGP_SOCKET=f"{run_dir}/sidecar.sock")
    record = fake_daemon(tmp_path / "fakebin", "exabgp")
    subprocess.run([str(ENTRY_POINTS / "felixpy-exabgp")], env=env, check=True, timeout=30)
    # What the agent renders before it knows any peer, with the interpreter it runs on: the
    # agent's first reload then leaves the process stanza, and so the sidecar, alone.
    python = console_script_interpreter("felixpy-node")
    assert (run_dir / "exabgp.conf").read_text() == render_exabgp_conf(SpeakerConfig(
        node_name=NODE_NAME, router_id="192.0.2.1", local_address="192.0.2.1", as_number=64512, peers=(),
        sidecar_socket=f"{run_dir}/sidecar.sock", python=python))
    assert (run_dir / "exabgp.env").read_text() == render_exabgp_env(log_destination="stderr")
    ran = json.loads(record.read_text())
    assert ran["argv"] == ["--env-file", f"{run_dir}/exabgp.env", "server", f"{run_dir}/exabgp.conf"]
    assert ran["env"]["exabgp_daemon_pid"] == f"{run_dir}/exabgp.pid"


def test_exabgp_entry_point_keeps_the_agents_config_and_clears_stale_files(tmp_path: Path) -> None:
    run_dir = tmp_path / "exabgp"
    run_dir.mkdir()
    env = entry_point_env(tmp_path, FELIXPY_EXABGP_CONFIG=f"{run_dir}/exabgp.conf",
                          FELIXPY_EXABGP_PIDFILE=f"{run_dir}/exabgp.pid", FELIXPY_BGP_SOCKET=f"{run_dir}/sidecar.sock")
    (run_dir / "exabgp.conf").write_text("# the agent's last rendering\n")
    (run_dir / "exabgp.pid").write_text("4242\n")
    (run_dir / "sidecar.sock").write_text("")
    record = fake_daemon(tmp_path / "fakebin", "exabgp")
    subprocess.run([str(ENTRY_POINTS / "felixpy-exabgp")], env=env, check=True, timeout=30)
    # A restarted container reads what the agent wrote last (its neighbours come up at once).
    assert (run_dir / "exabgp.conf").read_text() == "# the agent's last rendering\n"
    assert not (run_dir / "exabgp.pid").exists() and not (run_dir / "sidecar.sock").exists()
    assert record.exists()


def _children_named(pid: int, comm: str) -> set[int]:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return set()
    found = set()
    for child in children:
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                found.add(int(child))
        except FileNotFoundError:  # it just exited
            continue
    return found


def test_bird_entry_point_waits_for_the_reflectors_first_rendering(tmp_path: Path) -> None:
    run_dir = tmp_path / "bird"
    env = entry_point_env(tmp_path, FELIXPY_BIRD_CONFIG=f"{run_dir}/bird.conf", FELIXPY_BIRD_SOCKET=f"{run_dir}/bird.ctl")
    record = fake_daemon(tmp_path / "fakebin", "bird")
    proc = subprocess.Popen([str(ENTRY_POINTS / "felixpy-bird")], env=env)
    try:
        # The positive event: the entry point checked for the configuration and went back to sleep
        # twice (two distinct `sleep` children), so it had its chances to start BIRD too early.
        naps: set[int] = set()
        deadline = time.monotonic() + 10
        while len(naps) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, "the entry point is not waiting"
            naps |= _children_named(proc.pid, "sleep")
            time.sleep(0.05)
        assert not record.exists(), "BIRD started without a configuration"
        (run_dir / "bird.ctl").write_text("")  # stale
        (run_dir / "bird.conf").write_text("router id 192.0.2.1;\n")
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    assert json.loads(record.read_text())["argv"] == ["-f", "-c", f"{run_dir}/bird.conf", "-s", f"{run_dir}/bird.ctl"]
    assert not (run_dir / "bird.ctl").exists()


def test_entry_points_are_executable_shell_scripts() -> None:
    for path in ENTRY_POINTS.iterdir():
        assert path.stat().st_mode & stat.S_IXUSR, path
        assert path.read_text().startswith("#!/bin/sh\n"), path
        subprocess.run(["sh", "-n", str(path)], check=True, timeout=10)


# --------------------------------------------------------------------------------------------
# The Dockerfile
# --------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_files_that_exist() -> None:
    copies = [rest.split() for word, rest in dockerfile_instructions() if word == "COPY"]
    local = [args for args in copies if not args[0].startswith("--from=")]
    assert local
    for args in local:
        for source in args[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: not in the repository"
    # every package the build installs is copied in
    packages = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {args[0].rstrip("/") for args in local}
    assert {p.rstrip("*") for p in packages} <= copied


def test_dockerfile_builds_the_shim_where_install_cni_looks() -> None:
    instructions = dockerfile_instructions()
    runs = " ".join(rest for word, rest in instructions if word == "RUN")
    assert "make -C /src/cni-shim BUILD_DIR=/out" in runs
    assert any(word == "COPY" and rest.split() == ["--from=cni-shim", "/out/felixpy-cni", install.DEFAULT_SHIM]
               for word, rest in instructions)
    final_stage = runs.rsplit("python3-venv", 1)[-1]
    for package in ("python3", "iptables", "ipset", "iproute2", "bird2"):
        assert re.search(rf"\b{package}\b", final_stage), package


def test_image_carries_exabgp_and_the_entry_points_on_path() -> None:
    instructions = dockerfile_instructions()
    # exabgp is a dependency of the wheel the image installs, so it lands in the venv.
    assert any(dep.startswith("exabgp") for dep in pyproject()["project"]["dependencies"])
    assert "/opt/felixpy/venv/bin/exabgp version" in " ".join(rest for word, rest in instructions if word == "RUN")
    assert ("COPY", f"deploy/bin/ {IMAGE_ENTRY_POINT_DIR}/") in instructions
    (path_env,) = [rest for word, rest in instructions if word == "ENV" and "PATH=" in rest]
    path = re.search(r"PATH=(\S+)", path_env)
    assert path and IMAGE_ENTRY_POINT_DIR in path.group(1).split(":")


def test_node_may_read_bgp_secrets_in_its_namespace_only() -> None:
    # felixpy/node/secrets.py reads Secret <name> (GET) in FELIXPY_SECRETS_NAMESPACE (kube-system).
    role = one("Role", "felixpy-node-bgp-secrets")
    assert role["metadata"]["namespace"] == "kube-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    binding = one("RoleBinding", "felixpy-node-bgp-secrets")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "felixpy-node-bgp-secrets"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "felixpy-node", "namespace": "kube-system"}]
