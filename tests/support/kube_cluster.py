"""A real Kubernetes control plane for the tests: etcd + kube-apiserver + kube-controller-manager.

Started once per test session (tests/integration/conftest.py) on loopback by
felixpy.lab.controlplane, with deploy/felixpy.yaml's ServiceAccounts, RBAC, CRDs and ConfigMap
applied exactly as shipped. Tests get the admin's kubeconfig, or one per ServiceAccount (a bound
token from the TokenRequest API, as kubelet mounts into a pod), and `reset()` between tests
deletes every object the tests create: all crd.projectcalico.org objects, the test namespaces
(labelled felixpy-test) and the test Nodes (named fxt-*).

The fake API server (tests/support/fake_kube_api.py) stays the fast unit layer; this is the
evidence that the Kubernetes datastore works against Kubernetes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from felixpy.datastore import kube_mapping as m
from felixpy.lab.controlplane import (
    ControlPlane,
    ControlPlaneError,
    apply_objects,
    binaries_missing,
    loopback_endpoints,
)

REPO = Path(__file__).resolve().parents[2]
MANIFEST = REPO / "deploy" / "felixpy.yaml"
TEST_LABEL = "felixpy-test"
TEST_NODE_PREFIX = "fxt-"
CRD_PLURALS = ("ippools", "ipreservations", "ipamblocks", "blockaffinities", "ipamhandles", "ipamconfigs", "bgpconfigurations",
               "bgppeers", "felixconfigurations", "networkpolicies", "globalnetworkpolicies",
               "clusterinformations", "tiers", "networksets", "globalnetworksets", "hostendpoints",
               "bgpfilters", "caliconodestatuses")
SYSTEM = "kube-system"


def manifest_objects(path: Path = MANIFEST, kinds: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return [d for d in docs if kinds is None or d["kind"] in kinds]


# Everything in deploy/felixpy.yaml but the workloads: those need a kubelet to run anyway, and
# their controllers would otherwise make pods for the tests' Nodes.
SETUP_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
               "CustomResourceDefinition", "ConfigMap")


@dataclass
class KubeCluster:
    cp: ControlPlane
    kubeconfigs: dict[str, str] = field(default_factory=dict)

    @property
    def server(self) -> str:
        return self.cp.endpoints.server

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        return self.cp.request(method, path, body, content_type)

    def apply(self, objects: list[dict[str, Any]]) -> None:
        apply_objects(self.cp, objects)

    # -- identities -----------------------------------------------------------------------------
    @property
    def admin_kubeconfig(self) -> str:
        return self.cp.admin_kubeconfig

    def sa_kubeconfig(self, name: str, namespace: str = SYSTEM) -> str:
        """A kubeconfig with a token of that ServiceAccount (made once per session)."""
        key = f"{namespace}/{name}"
        if key not in self.kubeconfigs:
            self.kubeconfigs[key] = self.cp.token_kubeconfig(namespace, name)
        return self.kubeconfigs[key]

    def env(self, kubeconfig: str | None = None) -> dict[str, str]:
        """calico-node's variables for the Kubernetes datastore (admin unless a kubeconfig is given)."""
        return {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": kubeconfig or self.admin_kubeconfig}

    def store(self, kubeconfig: str | None = None, **kwargs: Any) -> Any:
        from felixpy.datastore.kube import KubeDatastore, load_settings

        return KubeDatastore(load_settings(kubeconfig=kubeconfig or self.admin_kubeconfig), **kwargs)

    # -- objects the tests make -----------------------------------------------------------------
    def namespace(self, name: str, labels: dict[str, str] | None = None,
                  annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """A namespace, once it is usable: the ServiceAccount admission plugin refuses pods until
        the controller-manager has made the namespace's `default` ServiceAccount."""
        ns = self.request("POST", "/api/v1/namespaces", {
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {TEST_LABEL: "true", **(labels or {})},
                         "annotations": annotations or {}}})
        self.wait(f"ServiceAccount {name}/default", lambda: self._exists(
            f"/api/v1/namespaces/{name}/serviceaccounts/default"))
        return dict(ns)

    def _exists(self, path: str) -> bool:
        try:
            self.request("GET", path)
            return True
        except ControlPlaneError as err:
            if ": 404 " in str(err):
                return False
            raise

    def node(self, name: str, *, labels: dict[str, str] | None = None, address: str | None = None,
             conditions: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """A Node as the kubelet registers one (then its status written through nodes/status)."""
        assert name.startswith(TEST_NODE_PREFIX), name
        node = self.request("POST", "/api/v1/nodes", {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/os": "linux", "kubernetes.io/hostname": name,
                                                  **(labels or {})}}})
        status: dict[str, Any] = {}
        if address:
            status["addresses"] = [{"type": "InternalIP", "address": address}, {"type": "Hostname", "address": name}]
        if conditions:
            status["conditions"] = conditions
        if status:
            node = self.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": status},
                                "application/merge-patch+json")
        return dict(node)

    def pod(self, namespace: str, name: str, node: str | None = None, *, labels: dict[str, str] | None = None,
            ports: list[dict[str, Any]] | None = None, host_network: bool = False,
            service_account: str | None = None, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        """A Pod, bound to `node` the way the scheduler binds one (pods/binding)."""
        container: dict[str, Any] = {"name": "c", "image": "registry.invalid/pause:3.10"}
        if ports:
            container["ports"] = ports
        spec: dict[str, Any] = {"containers": [container], "hostNetwork": host_network}
        if service_account:
            spec["serviceAccountName"] = service_account
        pod = self.request("POST", f"/api/v1/namespaces/{namespace}/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}}, "spec": spec})
        if node:
            self.request("POST", f"/api/v1/namespaces/{namespace}/pods/{name}/binding", {
                "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}})
            pod = self.request("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
        return dict(pod)

    def wait(self, what: str, cond: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
        """Poll `cond()` until it returns something truthy (returned), bounded."""
        deadline = time.monotonic() + timeout
        while True:
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
            time.sleep(interval)

    # -- between tests ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Delete what tests create, and wait until it is gone (namespaces finish terminating)."""
        # A test that stopped a part failed half-way, or the controller-manager exited while the
        # API server restarted: the next test starts with all three running.
        self.cp.ensure_running()
        for plural in CRD_PLURALS:
            if plural in m.CRD_RESOURCES and m.CRD_RESOURCES[plural][1]:
                # A namespaced kind has no deletecollection across namespaces.
                spaces = {o["metadata"]["namespace"] for o in self.request("GET", f"{m.CRD_API}/{plural}")["items"]}
                for ns in spaces:
                    self.request("DELETE", f"{m.CRD_API}/namespaces/{ns}/{plural}")
            else:
                self.request("DELETE", f"{m.CRD_API}/{plural}")  # deletecollection
        namespaces = self.request("GET", f"/api/v1/namespaces?labelSelector={TEST_LABEL}")["items"]
        for ns in namespaces:
            name = ns["metadata"]["name"]
            # Pods first, with no grace: there is no kubelet to confirm a graceful deletion.
            self.request("DELETE", f"/api/v1/namespaces/{name}/pods",
                         {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0})
            try:
                self.request("DELETE", f"/api/v1/namespaces/{name}")
            except ControlPlaneError as err:
                if ": 404 " not in str(err):
                    raise
        for node in self.request("GET", "/api/v1/nodes")["items"]:
            if node["metadata"]["name"].startswith(TEST_NODE_PREFIX):
                try:
                    self.request("DELETE", f"/api/v1/nodes/{node['metadata']['name']}")
                except ControlPlaneError as err:
                    if ": 404 " not in str(err):
                        raise
        self.wait("test namespaces to be deleted",
                  lambda: not self.request("GET", f"/api/v1/namespaces?labelSelector={TEST_LABEL}")["items"],
                  timeout=60)

    def restart_apiserver(self) -> None:
        """Stop and start kube-apiserver (etcd keeps the data): its watch cache starts over."""
        self.cp.stop("kube-apiserver")
        self.cp.start_apiserver()
        self.cp.ensure_running()


def _spawn_tied_to_us(what: str, argv: list[str], log_path: str) -> int:
    """Start a control-plane process that the kernel stops when this test process dies
    (PR_SET_PDEATHSIG): a pytest killed by a timeout leaves no API server behind."""
    import ctypes
    import signal
    import subprocess

    libc = ctypes.CDLL(None, use_errno=True)

    def die_with_parent() -> None:
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG; its data is throwaway

    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=die_with_parent)
    return proc.pid


def start_cluster() -> Iterator[KubeCluster]:
    """The session's control plane: fails (never skips) when the binaries are missing."""
    missing = binaries_missing()
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing: run scripts/build-kube.sh (scripts/setup.sh does)")
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    workdir = tempfile.mkdtemp(prefix="fxt-kube-", dir=shm)
    cp = ControlPlane(workdir, loopback_endpoints(), spawn=_spawn_tied_to_us)
    try:
        cp.start()
        cluster = KubeCluster(cp)
        cluster.apply(manifest_objects(kinds=SETUP_KINDS))
        yield cluster
    finally:
        cp.stop()
        shutil.rmtree(workdir, ignore_errors=True)
