"""deploy/: the manifests against the Kubernetes 1.37 schemas, the RBAC the code needs, the env
the agent reads, and the Dockerfile against the tree it builds from."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from felixpy import config as felixpy_config
from felixpy.cni import install, plugin

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy/felixpy.yaml"
DOCKERFILE = REPO / "deploy/Dockerfile"
KUBERNETES_VERSION = "1.37.0"


def load_docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


DOCS = load_docs()


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
CONTROLLERS = one("Deployment", "felixpy-controllers")
CONFIGMAP = one("ConfigMap", "felixpy-config")


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
    "IPAMBlock": ("ipamblocks", False),
    "BlockAffinity": ("blockaffinities", False),
    "IPAMHandle": ("ipamhandles", False),
    "IPAMConfig": ("ipamconfigs", False),
    "BGPConfiguration": ("bgpconfigurations", False),
    "BGPPeer": ("bgppeers", False),
    "FelixConfiguration": ("felixconfigurations", False),
    "NetworkPolicy": ("networkpolicies", True),
    "GlobalNetworkPolicy": ("globalnetworkpolicies", False),
    "ClusterInformation": ("clusterinformations", False),
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

CORE, NET, CALICO = "", "networking.k8s.io", "crd.projectcalico.org"

# (apiGroup, resource, verbs) -> why felixpy-node needs it.
NODE_RULES: list[tuple[str, str, str, str]] = [
    (CORE, "nodes", "get list watch", "syncer: every Node (routes to other nodes' blocks, BGP peers); startup reads its own"),
    (CORE, "nodes", "patch", "startup: its address and AS as projectcalico.org/* annotations (kube.py merge patch)"),
    (CORE, "nodes/status", "patch", "clears the NetworkUnavailable condition once routes are programmed"),
    (CORE, "pods", "get list watch", "workload endpoints: labels, IPs, named container ports"),
    (CORE, "pods", "patch", "CNI ADD/DEL: the pod's IPs and container ID as cni.projectcalico.org/* annotations"),
    (CORE, "namespaces", "get list watch", "profiles kns.<namespace> with the namespace's labels"),
    (NET, "networkpolicies", "list watch", "Kubernetes NetworkPolicies, converted to Calico policy"),
    (CALICO, "ippools", "get list watch", "pools: IPAM, routes, natOutgoing"),
    (CALICO, "ippools", "create", "startup creates the default pool when none exists (create-only)"),
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
    (CALICO, "felixconfigurations", "get list watch", "datastore Felix parameters"),
    (CALICO, "felixconfigurations", "create", "startup's ensureDefaultConfig (create-only)"),
    (CALICO, "networkpolicies", "get list watch", "Calico NetworkPolicies"),
    (CALICO, "globalnetworkpolicies", "get list watch", "Calico GlobalNetworkPolicies"),
    (CALICO, "clusterinformations", "get list watch", "datastoreReady (CNI refuses while false)"),
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
    for workload in (DAEMONSET, CONTROLLERS):
        for c in containers(workload):
            for item in c.get("env", []):
                assert "valueFrom" in item or isinstance(item["value"], str), item


@pytest.mark.parametrize("workload,name", [(DAEMONSET, "felixpy-node"), (CONTROLLERS, "felixpy-controllers")])
def test_agent_env_vars_are_all_in_felixpy_config(workload: dict[str, Any], name: str) -> None:
    known = set(felixpy_config.VARIABLES) - {"FELIX_*"}
    names = [item["name"] for item in container(workload, name)["env"]]
    assert len(names) == len(set(names)), "duplicate env var"
    assert sorted(set(names) - known) == []


def test_node_env_parses_to_the_intended_config() -> None:
    node = container(DAEMONSET, "felixpy-node")
    cfg = felixpy_config.load_config(resolved_env(node))
    assert cfg.datastore.type == "kubernetes" and cfg.datastore.wait_for_datastore
    assert cfg.node.name == NODE_NAME
    assert cfg.node.networking_backend == CONFIGMAP["data"]["calico_backend"]
    assert cfg.felix.health_enabled
    assert cfg.felix.unused_params() == []
    # calico-vxlan.yaml's pool: no IPIP (it needs a BGP speaker), VXLAN always
    assert (cfg.ipv4_pool.ipip_mode, cfg.ipv4_pool.vxlan_mode) == ("Never", "Always")
    for probe, path in (("livenessProbe", "/liveness"), ("readinessProbe", "/readiness")):
        get = node[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, cfg.felix.health_port)


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


def test_daemonset_runs_like_calico_node() -> None:
    spec = DAEMONSET["spec"]["template"]["spec"]
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    assert {"effect": "NoSchedule", "operator": "Exists"} in spec["tolerations"]
    assert {"effect": "NoExecute", "operator": "Exists"} in spec["tolerations"]
    assert [c["name"] for c in spec["initContainers"]] == ["install-cni"]
    for c in containers(DAEMONSET):
        assert c["securityContext"]["privileged"] is True


def test_mounts_are_calico_nodes() -> None:
    paths = host_paths(DAEMONSET)
    node_mounts = {m["mountPath"]: paths[m["name"]] for m in container(DAEMONSET, "felixpy-node")["volumeMounts"]}
    for path in ("/run/xtables.lock", "/var/run/calico", "/var/lib/calico", "/lib/modules", "/var/run/netns"):
        assert node_mounts[path] == path
    cni_mounts = {m["mountPath"]: paths[m["name"]] for m in container(DAEMONSET, "install-cni")["volumeMounts"]}
    settings = install.settings_from_env(resolved_env(container(DAEMONSET, "install-cni")))
    assert cni_mounts == {settings.bin_dir: "/opt/cni/bin", settings.net_dir: "/etc/cni/net.d"}
    # The CNI socket lives in a host directory the agent mounts, so the plugin on the host reaches it.
    assert node_mounts["/var/run/calico"] == str(Path(settings.agent_socket).parent)


def test_every_mount_names_a_volume() -> None:
    for workload in (DAEMONSET, CONTROLLERS):
        volumes = {v["name"] for v in workload["spec"]["template"]["spec"].get("volumes", [])}
        for c in containers(workload):
            for mount in c.get("volumeMounts", []):
                assert mount["name"] in volumes


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_commands_are_console_scripts_of_the_image() -> None:
    scripts = pyproject()["project"]["scripts"]
    for workload in (DAEMONSET, CONTROLLERS):
        for c in containers(workload):
            assert c["command"][0] in scripts, f"{c['name']}: {c['command'][0]} is not in [project.scripts]"


def test_image_tag_is_the_project_version() -> None:
    version = pyproject()["project"]["version"]
    for workload in (DAEMONSET, CONTROLLERS):
        for c in containers(workload):
            assert c["image"] == f"felixpy:{version}"


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
    for package in ("python3", "iptables", "ipset", "iproute2"):
        assert re.search(rf"\b{package}\b", final_stage), package
