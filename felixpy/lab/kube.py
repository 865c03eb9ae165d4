"""The lab on a real Kubernetes control plane (`felixpy-lab up --datastore kubernetes`).

The control plane (felixpy/lab/controlplane.py: etcd, kube-apiserver, kube-controller-manager)
runs in the lab's fabric namespace, the API server on https://192.0.2.1:6443, where the nodes reach
it over their eth0. deploy/felixpy.yaml's ServiceAccounts, RBAC, CRDs and ConfigMap are applied as
shipped, and every agent runs with a token of the `felixpy-node` ServiceAccount.

There is no kubelet, no scheduler and no container runtime: the lab plays them, through the API as
they would.
* Nodes: registered as the kubelet registers one (labels, InternalIP, Ready), with the
  NetworkUnavailable condition a cloud node controller sets (each agent clears it); a heartbeat
  process renews every node's Lease in kube-node-lease, so the node lifecycle controller keeps
  the nodes Ready.
* Pods: created, bound to their node with a Binding (the scheduler's part), plumbed by the real
  CNI plugin, then given their IPs and phase Running through pods/status (the kubelet's part).
  Deleting one is graceful: DELETE (deletionTimestamp set, the pod still runs), CNI DEL, then the
  final DELETE with grace period 0, as the kubelet confirms a termination.
* Namespaces and their labels are Namespace objects, pod labels the Pod's; Kubernetes
  NetworkPolicies are created through the networking API, so the server's validation applies
  (every document is first sent as a dry run: all or nothing).
"""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from felixpy.lab import procs, topology
from felixpy.lab.controlplane import (
    ControlPlane,
    ControlPlaneError,
    Endpoints,
    apply_objects,
    binaries_missing,
)
from felixpy.lab.state import LabState, NodeState, PodState

API_PORT = 6443
ETCD_PORT = 2379  # inside the fabric namespace, on its loopback: only the API server talks to it
SYSTEM = "kube-system"
NODE_SA = "felixpy-node"
POD_IMAGE = "registry.invalid/felixpy-lab/pod:1"  # never pulled: the lab's pods are namespaces
MANIFEST_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                  "CustomResourceDefinition", "ConfigMap")
LEASE_SECONDS = 40
HEARTBEAT_INTERVAL = 10.0


class KubeLabError(topology.LabUsageError):
    """What the API server or the control plane refused; one line."""


def kube_dir(lab: str) -> str:
    return f"{topology.run_dir(lab)}/kube"


def is_kube_lab(lab: str) -> bool:
    return os.path.exists(f"{kube_dir(lab)}/admin.kubeconfig")


def api_server() -> str:
    return f"https://{topology.FABRIC_IP}:{API_PORT}"


def node_kubeconfig(lab: str) -> str:
    return f"{kube_dir(lab)}/{NODE_SA}.kubeconfig"


def admin_kubeconfig(lab: str) -> str:
    return f"{kube_dir(lab)}/admin.kubeconfig"


def control_plane(lab: str) -> ControlPlane:
    """The lab's control plane: started by `up`, reached by every later command (the CLI must be
    in the fabric namespace to call it)."""
    def spawn(what: str, argv: list[str], log_path: str) -> int:
        return procs._spawn(lab, topology.fabric_netns(lab), argv, procs.base_env(), log_path)

    return ControlPlane(kube_dir(lab), Endpoints(topology.FABRIC_IP, API_PORT, ETCD_PORT, ETCD_PORT + 1, 10257),
                        spawn=spawn)


def manifest_path() -> Path:
    return Path(__file__).resolve().parents[2] / "deploy" / "felixpy.yaml"


def check_available() -> None:
    missing = binaries_missing()
    if missing:
        raise KubeLabError(f"--datastore kubernetes needs {', '.join(missing)}: run scripts/build-kube.sh "
                           "(scripts/setup.sh does)")
    if not manifest_path().exists():
        raise KubeLabError(f"--datastore kubernetes needs {manifest_path()} (run from a felixpy checkout)")


def _call(cp: ControlPlane, method: str, path: str, body: Any = None,
          content_type: str = "application/json") -> Any:
    try:
        return cp.request(method, path, body, content_type)
    except ControlPlaneError as err:
        raise KubeLabError(str(err)) from None


def _now(micro: bool = False) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


# --- up -----------------------------------------------------------------------------------------

def start(st: LabState) -> ControlPlane:
    """Start the control plane in the fabric (the caller is in the fabric namespace), apply the
    manifest's cluster objects, register the nodes and write the agents' kubeconfig."""
    cp = control_plane(st.name)
    try:
        cp.start()
        st.kube_pids = dict(cp.pids)
        docs = [d for d in yaml.safe_load_all(manifest_path().read_text()) if d and d["kind"] in MANIFEST_KINDS]
        apply_objects(cp, docs)
    except ControlPlaneError as err:
        raise KubeLabError(str(err)) from None
    for node in st.nodes:
        register_node(cp, node)
    try:
        cp.token_kubeconfig(SYSTEM, NODE_SA, node_kubeconfig(st.name))
    except ControlPlaneError as err:
        raise KubeLabError(str(err)) from None
    return cp


def register_node(cp: ControlPlane, node: NodeState) -> None:
    """The kubelet's registration: the Node, its status (addresses, Ready) and its Lease; plus the
    NetworkUnavailable condition a cloud provider's node controller puts on a new Node."""
    labels = {"kubernetes.io/hostname": node.name, "kubernetes.io/os": "linux"}
    if node.route_reflector:
        labels[topology.RR_LABEL] = "true"
    _call(cp, "POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                        "metadata": {"name": node.name, "labels": labels}})
    now = _now()
    _call(cp, "PATCH", f"/api/v1/nodes/{node.name}/status", {"status": {
        "addresses": [{"type": "InternalIP", "address": node.ip}, {"type": "Hostname", "address": node.name}],
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "felixpy-lab plays the kubelet",
             "lastHeartbeatTime": now, "lastTransitionTime": now},
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
             "message": "waiting for the network plugin", "lastTransitionTime": now},
        ]}}, "application/merge-patch+json")
    renew_lease(cp, node.name)


def renew_lease(cp: ControlPlane, node: str) -> None:
    path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{node}"
    spec = {"holderIdentity": node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _now(micro=True)}
    try:
        cp.request("PATCH", path, {"spec": spec}, "application/merge-patch+json")
    except ControlPlaneError as err:
        if ": 404 " not in str(err):
            raise
        cp.request("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases", {
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": node}, "spec": spec})


# --- namespaces ---------------------------------------------------------------------------------

def ensure_namespace(cp: ControlPlane, namespace: str, labels: dict[str, str],
                     annotations: dict[str, str] | None = None) -> None:
    """Create the Namespace or set its labels (kubectl label semantics: the labels given are the
    labels it has, kubernetes.io/metadata.name being the API server's own) and, when given, its
    annotations (the ones given are the ones it has)."""
    path = f"/api/v1/namespaces/{namespace}"
    try:
        current = cp.request("GET", path)
    except ControlPlaneError as err:
        if ": 404 " not in str(err):
            raise KubeLabError(str(err)) from None
        metadata: dict[str, Any] = {"name": namespace, "labels": labels}
        if annotations:
            metadata["annotations"] = annotations
        _call(cp, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": metadata})
        _wait_default_service_account(cp, namespace)
        return
    meta = current.get("metadata") or {}
    patch: dict[str, Any] = {}
    labels_patch = _map_patch(meta.get("labels") or {}, labels, keep=("kubernetes.io/metadata.name",))
    if labels_patch:
        patch["labels"] = labels_patch
    if annotations is not None:
        annotations_patch = _map_patch(meta.get("annotations") or {}, annotations)
        if annotations_patch:
            patch["annotations"] = annotations_patch
    if patch:
        _call(cp, "PATCH", path, {"metadata": patch}, "application/merge-patch+json")


def _map_patch(old: dict[str, str], new: dict[str, str], keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """The merge patch turning map old into new (keys in keep are never removed)."""
    patch: dict[str, Any] = {k: v for k, v in new.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in new and k not in keep})
    return patch


def ensure_service_account(cp: ControlPlane, namespace: str, name: str, labels: dict[str, str]) -> None:
    """Create the ServiceAccount or set its labels (the labels given are the labels it has): the
    Kubernetes datastore serves it as the ksa.<ns>.<sa> profile policy selects by."""
    path = f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}"
    try:
        current = cp.request("GET", path)
    except ControlPlaneError as err:
        if ": 404 " not in str(err):
            raise KubeLabError(str(err)) from None
        _call(cp, "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {
            "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "labels": labels}})
        return
    old = (current.get("metadata") or {}).get("labels") or {}
    patch: dict[str, Any] = {k: v for k, v in labels.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in labels})
    if patch:
        _call(cp, "PATCH", path, {"metadata": {"labels": patch}}, "application/merge-patch+json")


def _wait_default_service_account(cp: ControlPlane, namespace: str, timeout: float = 30.0) -> None:
    """The ServiceAccount admission plugin refuses pods until the controller-manager has made the
    namespace's `default` ServiceAccount."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            cp.request("GET", f"/api/v1/namespaces/{namespace}/serviceaccounts/default")
            return
        except ControlPlaneError:
            time.sleep(0.1)
    raise KubeLabError(f"namespace {namespace}: no default ServiceAccount after {timeout:g} s")


# --- pods ---------------------------------------------------------------------------------------

def pod_path(pod: PodState) -> str:
    return f"/api/v1/namespaces/{pod.namespace}/pods/{pod.name}"


def create_pod(cp: ControlPlane, pod: PodState, node_ip: str) -> None:
    """The Pod as a user creates it, then bound to its node as the scheduler binds one."""
    ports = [{"name": p.name, "containerPort": p.port, "protocol": p.protocol.upper()}
             for p in topology.parse_serve(",".join(pod.serve))]
    container: dict[str, Any] = {"name": "pod", "image": POD_IMAGE}
    if ports:
        container["ports"] = ports
    spec: dict[str, Any] = {"containers": [container]}
    if pod.service_account:
        spec["serviceAccountName"] = pod.service_account  # must exist (`sa add`): admission checks
    _call(cp, "POST", f"/api/v1/namespaces/{pod.namespace}/pods", {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod.name, "labels": dict(pod.labels), "annotations": dict(pod.annotations)},
        "spec": spec})
    _call(cp, "POST", f"{pod_path(pod)}/binding", {
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod.name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": pod.node}})


def pod_running(cp: ControlPlane, pod: PodState, node_ip: str) -> None:
    """What the kubelet reports once the sandbox is up: phase Running and the IPs from CNI."""
    now = _now()
    _call(cp, "PATCH", f"{pod_path(pod)}/status", {"status": {
        "phase": "Running", "hostIP": node_ip, "hostIPs": [{"ip": node_ip}],
        "podIP": pod.ips[0] if pod.ips else None, "podIPs": [{"ip": ip} for ip in pod.ips],
        "startTime": now,
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                       {"type": "PodScheduled", "status": "True", "lastTransitionTime": now}]}},
        "application/merge-patch+json")


def begin_delete(cp: ControlPlane, pod: PodState) -> None:
    """`kubectl delete pod`: the API server sets deletionTimestamp; the pod runs on until the kubelet stops it."""
    try:
        cp.request("DELETE", pod_path(pod))
    except ControlPlaneError as err:
        if ": 404 " not in str(err):
            raise KubeLabError(str(err)) from None


def finish_delete(cp: ControlPlane, pod: PodState) -> None:
    """The kubelet's last word on a stopped pod: delete it with grace period 0."""
    try:
        cp.request("DELETE", pod_path(pod), {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
    except ControlPlaneError as err:
        if ": 404 " not in str(err):
            raise KubeLabError(str(err)) from None


def set_pod_labels(cp: ControlPlane, pod: PodState, old: dict[str, str]) -> None:
    patch: dict[str, Any] = {k: v for k, v in pod.labels.items() if old.get(k) != v}
    patch.update({k: None for k in old if k not in pod.labels})
    if patch:
        _call(cp, "PATCH", pod_path(pod), {"metadata": {"labels": patch}}, "application/merge-patch+json")


# --- Kubernetes NetworkPolicies -----------------------------------------------------------------

def is_k8s_policy(doc: dict[str, Any]) -> bool:
    return doc.get("apiVersion") == "networking.k8s.io/v1" and doc.get("kind") == "NetworkPolicy"


def _policy_path(doc: dict[str, Any]) -> tuple[str, str]:
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace") or "default"
    return f"/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies", str(meta.get("name", ""))


def apply_policies(cp: ControlPlane, docs: list[tuple[str, dict[str, Any]]], delete: bool) -> list[str]:
    """Create/replace (or delete) Kubernetes NetworkPolicies (source, object) through the API:
    every document first as a server-side dry run, so the server's refusal of any of them writes
    none. Returns one line per policy."""
    planned: list[tuple[str, str, str, dict[str, Any] | None]] = []  # (method, path, what, body)
    for source, doc in docs:
        collection, name = _policy_path(doc)
        ns = collection.split("/")[5]
        what = f"NetworkPolicy {ns}/{name}"
        if not isinstance(doc.get("metadata"), dict) or not name:
            raise KubeLabError(f"{source}: metadata.name is required")
        try:
            current = cp.request("GET", f"{collection}/{name}")
        except ControlPlaneError as err:
            if ": 404 " not in str(err):
                raise KubeLabError(f"{what}: {err}") from None
            current = None
        if delete:
            if current is None:
                raise KubeLabError(f"{what}: not found")
            planned.append(("DELETE", f"{collection}/{name}", f"{what} deleted", None))
            continue
        body = json.loads(json.dumps(doc))
        if current is None:
            planned.append(("POST", collection, f"{what} created", body))
        else:
            body.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
            planned.append(("PUT", f"{collection}/{name}", f"{what} configured", body))
    for method, path, what, body in planned:
        try:
            cp.request(method, path + "?dryRun=All", body)
        except ControlPlaneError as err:
            # "<METHOD> <path>: <code> <the server's message>" -> "NetworkPolicy ns/name: <message>"
            message = str(err).split(": ", 1)[-1].split(" ", 1)[-1]
            raise KubeLabError(f"{what.rsplit(' ', 1)[0]}: {message}") from None
    for method, path, _, body in planned:
        _call(cp, method, path, body)
    return [what for _, _, what, _ in planned]


# --- the kubelet's heartbeat --------------------------------------------------------------------

def heartbeat(lab: str) -> None:
    """Renew every lab node's Lease every HEARTBEAT_INTERVAL seconds, until the lab goes away.
    Runs as its own process (`python -m felixpy.lab.kube LAB`) in the fabric namespace."""
    from felixpy.lab import state

    cp = control_plane(lab)
    while os.path.exists(topology.state_path(lab)):
        try:
            for node in state.load(lab).nodes:
                renew_lease(cp, node.name)
        except (ControlPlaneError, topology.LabUsageError) as err:
            print(f"heartbeat: {err}", flush=True)  # the API server restarting: try again later
        time.sleep(HEARTBEAT_INTERVAL)


def start_heartbeat(lab: str) -> int:
    import sys

    return procs._spawn(lab, topology.fabric_netns(lab), [sys.executable, "-m", "felixpy.lab.kube", lab],
                        procs.base_env(), f"{kube_dir(lab)}/heartbeat.log")


if __name__ == "__main__":
    import sys

    heartbeat(sys.argv[1])
