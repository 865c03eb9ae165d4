"""felixctl with DATASTORE_TYPE=kubernetes against a real kube-apiserver, as an operator runs it
(the felixctl command, KUBECONFIG in the environment): apply / get / label / patch / delete, the
server's own refusals in one line, ipam show and check, and `datastore migrate` from a real etcd
into the real API server and back with every resource and IPAM allocation intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from felixpy.ctl import migrate
from felixpy.lab.controlplane import ControlPlaneError
from tests.integration.test_migrate import NS, felixctl, populate, snapshot
from tests.support.kube_cluster import KubeCluster

REPO = Path(__file__).resolve().parents[2]


def ctl(kube: KubeCluster, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "felixpy.ctl.main", *argv], input=stdin, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **kube.env(), "PYTHONPATH": str(REPO)})


POLICIES = """
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: pool-a}
spec: {cidr: 10.81.0.0/16, blockSize: 26, natOutgoing: true}
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-db}
spec:
  selector: app == 'db'
  types: [Ingress]
  ingress: [{action: Deny}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: allow-web, namespace: fxt-ctl}
spec:
  selector: app == 'web'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]
"""


def test_felixctl_verbs_on_the_real_server(kube: KubeCluster) -> None:
    kube.namespace("fxt-ctl")
    kube.node("fxt-n1", address="192.0.2.11")
    done = ctl(kube, "apply", "-f", "-", stdin=POLICIES)
    assert done.returncode == 0, done.stderr
    got = yaml.safe_load(ctl(kube, "get", "ippool", "pool-a", "-o", "yaml").stdout)
    assert got["spec"]["cidr"] == "10.81.0.0/16" and got["metadata"]["resourceVersion"]
    assert kube.request("GET", "/apis/crd.projectcalico.org/v1/ippools/pool-a")["spec"]["natOutgoing"] is True
    wide = ctl(kube, "get", "ippools", "-o", "wide")
    assert wide.returncode == 0 and "10.81.0.0/16" in wide.stdout
    assert "allow-web" in ctl(kube, "get", "networkpolicy", "-n", "fxt-ctl").stdout

    assert ctl(kube, "label", "ippool", "pool-a", "tier=gold").returncode == 0
    assert kube.request("GET", "/apis/crd.projectcalico.org/v1/ippools/pool-a")["metadata"]["labels"] == {"tier": "gold"}
    patched = ctl(kube, "patch", "ippool", "pool-a", "-p", '{"spec": {"disabled": true}}')
    assert patched.returncode == 0, patched.stderr
    assert kube.request("GET", "/apis/crd.projectcalico.org/v1/ippools/pool-a")["spec"]["disabled"] is True

    # The kubelet's Node carries what felixctl writes into a Calico Node, as annotations.
    node = json.loads(ctl(kube, "get", "node", "fxt-n1", "-o", "json").stdout)
    node["spec"]["bgp"] = {"ipv4Address": "192.0.2.11/24", "asNumber": 64600}
    assert ctl(kube, "replace", "-f", "-", stdin=json.dumps(node)).returncode == 0
    annotations = kube.request("GET", "/api/v1/nodes/fxt-n1")["metadata"]["annotations"]
    assert annotations["projectcalico.org/ASNumber"] == "64600"

    # Refusals: the server's message in one line, nothing written.
    missing_ns = POLICIES.replace("fxt-ctl", "fxt-nowhere").split("---")[-1]
    done = ctl(kube, "create", "-f", "-", stdin=missing_ns)
    assert done.returncode != 0 and done.stderr.count("\n") == 1 and "fxt-nowhere" in done.stderr
    assert "Traceback" not in done.stderr
    done = ctl(kube, "create", "-f", "-", stdin=POLICIES.split("---")[0])
    assert done.returncode != 0 and "already exists" in done.stderr and done.stderr.count("\n") == 1

    assert ctl(kube, "delete", "-f", "-", stdin=POLICIES).returncode == 0
    with pytest.raises(ControlPlaneError, match="404"):
        kube.request("GET", "/apis/crd.projectcalico.org/v1/ippools/pool-a")


def test_felixctl_ipam_on_the_real_server(kube: KubeCluster) -> None:
    kube.node("fxt-n1")
    assert ctl(kube, "apply", "-f", "-", stdin=POLICIES.split("---")[0]).returncode == 0
    from felixpy.ipam.allocator import IPAM

    store = kube.store()
    ips = IPAM(store).auto_assign(num=2, handle="k8s-pod-network.x", attrs={"node": "fxt-n1"}, node="fxt-n1")
    show = ctl(kube, "ipam", "show", "--show-blocks")
    assert show.returncode == 0 and "10.81." in show.stdout, show.stderr
    check = ctl(kube, "ipam", "check")
    assert "not in use" in check.stdout or "leak" in check.stdout.lower(), check.stdout  # no endpoints: leaks
    release = ctl(kube, "ipam", "release", f"--ip={ips[0]}")
    assert release.returncode == 0, release.stderr
    assert [str(ip) for ip in IPAM(store).ips_by_handle("k8s-pod-network.x")] == [str(ips[1])]


def test_migrate_etcd_to_the_real_server_and_back(kube: KubeCluster, etcd_store: Any, tmp_path: Path) -> None:
    # The cluster as the kubelet and the scheduler left it: Node n1, the pod's namespace and pod.
    kube.request("POST", "/api/v1/nodes", {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    try:
        kube.namespace(NS)
        kube.pod(NS, "web-1", "n1", labels={"app": "web"})
        store = kube.store()
        populate(etcd_store)
        assert felixctl(etcd_store, "datastore", "migrate", "lock")[0] == 0
        before = snapshot(etcd_store)
        code, text, err = felixctl(etcd_store, "datastore", "migrate", "export")
        assert code == 0, err
        dump = tmp_path / "cluster.yaml"
        dump.write_text(text)

        done = ctl(kube, "datastore", "migrate", "import", "-f", str(dump))
        assert done.returncode == 0, done.stderr
        assert "Successfully imported" in done.stdout
        assert migrate.is_locked(store)
        assert snapshot(store) == before

        done = ctl(kube, "datastore", "migrate", "export")
        assert done.returncode == 0, done.stderr
        etcd_store.delete_prefix("/calico/")
        dump.write_text(done.stdout)
        code, _, err = felixctl(etcd_store, "datastore", "migrate", "import", "-f", str(dump))
        assert code == 0, err
        assert snapshot(etcd_store) == before
        assert ctl(kube, "datastore", "migrate", "unlock").returncode == 0
        assert not migrate.is_locked(store)
    finally:
        kube.request("DELETE", "/api/v1/nodes/n1")
