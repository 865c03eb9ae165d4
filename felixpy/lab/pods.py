"""Pods and namespaces in the lab: the kubelet's and kube-controllers' parts, done for real.

A pod is a netns plumbed by the real `felixpy-cni` exactly as kubelet runs it (env + stdin, inside
the node's netns). The agent allocates the IP, plumbs the veth and writes the WorkloadEndpoint;
the lab then does what Calico's kube-controllers do: it keeps the WorkloadEndpoint's labels and
named ports (and service account) in step with the pod (compare-and-swap updates), and keeps one
Profile `kns.<ns>` per namespace carrying the namespace's labels (and its `cni.projectcalico.org/*`
annotations, as the Kubernetes datastore and felixpy-controllers' mirror carry them) and one
`ksa.<ns>.<sa>` per service account (`sa add`) carrying the account's. A pod's annotations reach
the agent the way containerd and CRI-O pass them to a plugin declaring the capability:
`runtimeConfig["io.kubernetes.cri.pod-annotations"]` in the network config of each CNI call.
"""

from __future__ import annotations

import ipaddress

import json
import logging
import os
import select
import shutil
import subprocess
import sys
import time
from typing import Any

from felixpy import names
from felixpy.cni.install import install_plugin
from felixpy.datastore import keys
from felixpy.datastore.api import Conflict, Datastore, NotFound
from felixpy.lab import procs, topology
from felixpy.lab.state import LabState, PodState

log = logging.getLogger(__name__)

CNI_NETWORK = "k8s-pod-network"
CAS_ATTEMPTS = 10
NS_LABEL = "kubernetes.io/metadata.name"
CNI_ANNOTATION_PREFIX = "cni.projectcalico.org/"
POD_ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"


class CNIError(Exception):
    """The CNI plugin answered with an error result or no result; the message is one line."""


_entered_fabric: str | None = None


def enter_fabric(lab: str) -> None:
    """Move this process into the lab's fabric netns, once: etcd and the API server listen there."""
    global _entered_fabric
    if _entered_fabric != lab:
        procs.enter_netns(topology.fabric_netns(lab))
        _entered_fabric = lab


def kube_api(lab: str) -> Any:
    """The lab's control plane (--datastore kubernetes), for the cluster admin's API calls."""
    from felixpy.lab import kube

    enter_fabric(lab)
    return kube.control_plane(lab)


def open_datastore(lab: str) -> Datastore:
    """The lab's etcd, or its API server as the cluster admin (--datastore kubernetes), reached
    from inside its fabric netns (the CLI process moves there once)."""
    enter_fabric(lab)
    from felixpy.lab import kube

    if kube.is_kube_lab(lab):
        from felixpy.datastore.kube import KubeDatastore, load_settings

        return KubeDatastore(load_settings(kubeconfig=kube.admin_kubeconfig(lab)))
    # Imported only now: the gRPC machinery must start its threads inside the fabric netns.
    from felixpy.datastore.etcd import EtcdDatastore

    return EtcdDatastore([topology.ETCD_ENDPOINT])


# --- namespaces ---------------------------------------------------------------------------------

def namespace_labels(namespace: str, labels: dict[str, str]) -> dict[str, str]:
    return {**labels, NS_LABEL: namespace}


def profile_for_namespace(namespace: str, labels: dict[str, str],
                          annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """Calico's `kns.<ns>` profile: allow all, and hand the namespace's labels to its pods as pcns.*."""
    to_apply = {"pcns.projectcalico.org/name": namespace}
    to_apply.update({f"pcns.{k}": v for k, v in namespace_labels(namespace, labels).items()})
    metadata: dict[str, Any] = {"name": names.namespace_profile(namespace)}
    cni = {k: v for k, v in (annotations or {}).items() if k.startswith(CNI_ANNOTATION_PREFIX)}
    if cni:
        metadata["annotations"] = cni
    return {
        "apiVersion": "projectcalico.org/v3",
        "kind": "Profile",
        "metadata": metadata,
        "spec": {
            "ingress": [{"action": "Allow"}],
            "egress": [{"action": "Allow"}],
            "labelsToApply": to_apply,
        },
    }


def profile_for_service_account(namespace: str, account: str, labels: dict[str, str]) -> dict[str, Any]:
    """Calico's `ksa.<ns>.<sa>` profile: no rules, the account's labels for its pods as pcsa.*."""
    to_apply = {"pcsa.projectcalico.org/name": account, **{f"pcsa.{k}": v for k, v in labels.items()}}
    return {"apiVersion": "projectcalico.org/v3", "kind": "Profile",
            "metadata": {"name": names.service_account_profile(namespace, account)}, "spec": {"labelsToApply": to_apply}}


def write_profile(store: Datastore, namespace: str, labels: dict[str, str],
                  annotations: dict[str, str] | None = None) -> None:
    write_profile_value(store, profile_for_namespace(namespace, labels, annotations))


def write_profile_value(store: Datastore, value: dict[str, Any]) -> None:
    """Create or update one Profile, compare-and-swap, bounded retries."""
    key = keys.resource_key("profiles", value["metadata"]["name"])
    for _ in range(CAS_ATTEMPTS):
        try:
            current = store.get(key)
        except NotFound:
            try:
                store.create(key, value)
                return
            except Exception as e:  # AlreadyExists: someone raced us; read again
                log.debug("profile create raced key=%s err=%s", key, e)
                continue
        if current.value == value:
            return
        try:
            store.update(key, value, current.revision)
            return
        except (Conflict, NotFound):
            continue
    raise topology.LabUsageError(f"profile {value['metadata']['name']}: kept changing, giving up")


# --- CNI ----------------------------------------------------------------------------------------

def cni_config(lab: str, node: str, pod: PodState | None = None, ip_family: str = "ipv4") -> dict[str, Any]:
    """The network config as the runtime hands it to the plugin: with the pod's annotations in
    runtimeConfig, as containerd does for a plugin declaring the pod-annotations capability.
    IPv6 and dual-stack labs say which families with Calico's ipam.assign_ipv4 / assign_ipv6."""
    config: dict[str, Any] = {"cniVersion": "1.0.0", "name": CNI_NETWORK, "type": "felixpy",
                              "agent_socket": topology.cni_socket(lab, node), "mtu": 0,
                              "capabilities": {POD_ANNOTATIONS_CAPABILITY: True}}
    if ip_family != "ipv4":
        wanted = topology.families(ip_family)
        config["ipam"] = {"type": "calico-ipam", "assign_ipv4": str(4 in wanted).lower(),
                          "assign_ipv6": str(6 in wanted).lower()}
    if pod is not None:
        config["runtimeConfig"] = {POD_ANNOTATIONS_CAPABILITY: dict(pod.annotations)}
    return config


def cni_env(command: str, pod: PodState) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": pod.container_id,
        "CNI_NETNS": f"/run/netns/{pod.netns}",
        "CNI_IFNAME": topology.POD_IFACE,
        "CNI_PATH": f"{procs.bin_dir()}:/usr/lib/cni",
        "CNI_ARGS": (f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};K8S_POD_NAME={pod.name};"
                     f"K8S_POD_INFRA_CONTAINER_ID={pod.container_id}"),
    }


def cni_plugin(lab: str) -> str:
    """The lab's CNI bin dir holds the plugin as install-cni puts it on a node: the static C
    plugin (cni-shim/) when a C compiler is at hand, else the lean `python -IS` form of the same
    protocol (felixpy.cni.install). Built or written once per lab."""
    bin_dir = f"{topology.run_dir(lab)}/cni-bin"
    path = f"{bin_dir}/felixpy"
    if os.path.exists(path):
        return path
    shim_src = os.path.join(os.path.dirname(__file__), "..", "..", "cni-shim")
    if os.path.exists(os.path.join(shim_src, "Makefile")) and shutil.which("make") and shutil.which("gcc"):
        built = subprocess.run(["make", "-s", "-C", shim_src, f"BUILD_DIR={bin_dir}/.build"],
                               capture_output=True, text=True)
        if built.returncode == 0:
            os.replace(f"{bin_dir}/.build/felixpy-cni", path)
            return path
        log.warning("building the C CNI plugin failed, using the Python one: %s", built.stderr.strip()[-200:])
    install_plugin(bin_dir)
    return path


def run_cni(lab: str, command: str, pod: PodState, timeout: float = 60.0, ip_family: str = "ipv4") -> dict[str, Any]:
    """Run the CNI plugin in the node's netns as kubelet would; returns the parsed result (ADD) or {}."""
    argv = ["ip", "netns", "exec", topology.node_netns(lab, pod.node), cni_plugin(lab)]
    try:
        done = subprocess.run(argv, input=json.dumps(cni_config(lab, pod.node, pod, ip_family)),
                              env=cni_env(command, pod), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CNIError(f"CNI {command} for {pod.ref}: no answer within {timeout:g} s") from None
    out = done.stdout.strip()
    result: dict[str, Any] = {}
    if out:
        try:
            result = json.loads(out)
        except ValueError:
            raise CNIError(f"CNI {command} for {pod.ref}: not JSON: {out[:200]}") from None
    if done.returncode != 0 or "code" in result:
        msg = result.get("msg") or done.stderr.strip() or f"exit {done.returncode}"
        details = result.get("details")
        raise CNIError(f"CNI {command} for {pod.ref} failed: {msg}" + (f" ({details})" if details else ""))
    return result


def result_ips(result: dict[str, Any]) -> list[str]:
    """Pod IPs (without prefix length) from a CNI 1.0 result."""
    return [entry["address"].split("/")[0] for entry in result.get("ips", []) if "address" in entry]


# --- WorkloadEndpoint ---------------------------------------------------------------------------

def wep_key(pod: PodState) -> str:
    return keys.resource_key("workloadendpoints", names.workload_endpoint_name(pod.node, pod.name),
                             pod.namespace)


def wep_labels(pod: PodState) -> dict[str, str]:
    labels = {**pod.labels, "projectcalico.org/namespace": pod.namespace,
              "projectcalico.org/orchestrator": "k8s"}
    if pod.service_account:
        labels["projectcalico.org/serviceaccount"] = pod.service_account
    return labels


def wep_ports(pod: PodState) -> list[dict[str, object]]:
    return [port.to_wep_port() for port in topology.parse_serve(",".join(pod.serve))]


def sync_workload_endpoint(store: Datastore, pod: PodState, wait: float = 10.0) -> None:
    """Set the WorkloadEndpoint's labels and ports from the pod, compare-and-swap, bounded retries."""
    key = wep_key(pod)
    deadline = time.monotonic() + wait
    for _ in range(CAS_ATTEMPTS * 20):
        try:
            current = store.get(key)
        except NotFound:
            if time.monotonic() > deadline:
                raise CNIError(f"pod {pod.ref}: no WorkloadEndpoint at {key}") from None
            time.sleep(0.1)
            continue
        value = json.loads(json.dumps(current.value))
        value.setdefault("metadata", {})["labels"] = wep_labels(pod)
        spec = value.setdefault("spec", {})
        ports = wep_ports(pod)
        if ports:
            spec["ports"] = ports
        else:
            spec.pop("ports", None)
        if pod.service_account:
            spec["serviceAccountName"] = pod.service_account
        else:
            spec.pop("serviceAccountName", None)
        if value == current.value:
            return
        try:
            store.update(key, value, current.revision)
            return
        except (Conflict, NotFound):
            continue
    raise CNIError(f"pod {pod.ref}: WorkloadEndpoint kept changing, giving up")


# --- pod server ---------------------------------------------------------------------------------

def start_server(lab: str, pod: PodState, timeout: float = 10.0) -> int:
    specs = served_specs(pod)
    argv = ["ip", "netns", "exec", pod.netns, sys.executable, "-m", "felixpy.lab.podserver",
            "--lab", lab, "--pod", pod.ref, *specs]
    log_path = f"{topology.run_dir(lab)}/pod-{pod.netns}.log"
    with open(log_path, "ab") as err:
        proc = subprocess.Popen(argv, env={**procs.base_env(), procs.LAB_ENV: lab},
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                start_new_session=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else b""
    proc.stdout.close()
    if line.strip() != b"ready":
        procs.stop_pids({proc.pid})
        raise CNIError(f"pod {pod.ref}: server did not start; see {log_path}")
    return proc.pid


def served_specs(pod: PodState) -> list[str]:
    return [p.spec() for p in topology.parse_serve(",".join(pod.serve))]


def status_blocks(store: Datastore, node: str) -> list[str]:
    """The node's confirmed affine blocks of both families (IPv4 first), from its IPAM affinities."""
    kvs = [kv for version in (4, 6) for kv in store.list(keys.host_affinity_prefix(node, version))[0]]
    blocks = []
    for kv in kvs:
        value = kv.value if isinstance(kv.value, dict) else {}
        if value.get("state", "confirmed") != "confirmed" or value.get("deleted") in (True, "true"):
            continue
        blocks.append(keys.parse_key(kv.key).name)
    return sorted(blocks, key=lambda b: (ipaddress.ip_network(b).version, ipaddress.ip_network(b)))


def all_pods(state: LabState) -> list[PodState]:
    return sorted(state.pods, key=lambda p: (p.namespace, p.name))
