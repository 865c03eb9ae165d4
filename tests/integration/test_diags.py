"""felixctl node diags / cluster diags: what lands in the tarball, and that no secret does.

cluster diags runs as felixctl does, against a real etcd and (for the pods' logs) the fake
Kubernetes API; node diags' collection is run with a scripted command runner here (the real
kernel, agent and ExaBGP are in tests/e2e/test_operations.py).
"""

from __future__ import annotations

import base64
import os
import pathlib
import subprocess
import sys
import tarfile
from typing import Any, Iterator

import pytest

from felixpy.ctl.diags import agent_env_text, collect_node, parse_since
from felixpy.ctl.errors import UserError
from felixpy.datastore import keys
from felixpy.ipam.allocator import IPAM
from tests.support.fake_kube_api import FakeKubeAPI

PASSWORD = "diags-test-Secret-7c1"
K8S_PASSWORD = "from-the-kube-api-4d2"


def _members(path: pathlib.Path) -> dict[str, str]:
    with tarfile.open(path) as tar:
        out = {}
        for member in tar.getmembers():
            data = tar.extractfile(member)
            assert data is not None
            out[member.name.split("/", 1)[1]] = data.read().decode()
        return out


def _no_secret(files: dict[str, str]) -> None:
    b64 = base64.b64encode(PASSWORD.encode()).decode()
    leaked = [name for name, text in files.items() if PASSWORD in text or b64 in text]
    assert not leaked, f"the password is in {leaked}"


@pytest.fixture
def kube() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI().start()
    try:
        api.put("/api/v1/namespaces", {"metadata": {"name": "kube-system"}})
        yield api
    finally:
        api.stop()


def test_cluster_diags(etcd_store: Any, etcd_endpoint: str, kube: FakeKubeAPI, tmp_path: pathlib.Path) -> None:
    store = etcd_store
    store.create(keys.resource_key("ippools", "p1"), {
        "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p1"},
        "spec": {"cidr": "10.66.0.0/16", "blockSize": 26}})
    store.create(keys.resource_key("bgppeers", "rr"), {
        "apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "rr"},
        "spec": {"peerIP": "192.0.2.200", "asNumber": 64512,
                 "password": {"secretKeyRef": {"name": "bgp", "key": "peer"}}}})
    # A mesh password from a Kubernetes Secret (not in FELIXPY_SECRETS_DIR): found through the
    # datastore's reference and redacted all the same.
    store.create(keys.resource_key("bgpconfigurations", "default"), {
        "apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
        "spec": {"nodeMeshPassword": {"secretKeyRef": {"name": "bgp-k8s", "key": "mesh"}}}})
    kube.put("/api/v1/namespaces/kube-system/secrets", {
        "metadata": {"name": "bgp-k8s"}, "data": {"mesh": base64.b64encode(K8S_PASSWORD.encode()).decode()}})
    for node in ("n1", "n2"):
        store.create(keys.resource_key("nodes", node), {
            "apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": node}, "spec": {}})
    IPAM(store, cache_ttl=0).auto_assign(num=1, handle="h1", attrs={"node": "n1"}, node="n1")
    secrets_dir = tmp_path / "secrets" / "bgp"
    secrets_dir.mkdir(parents=True)
    (secrets_dir / "peer").write_text(PASSWORD)
    for pod, node in (("felixpy-node-a", "n1"), ("felixpy-node-b", "n2")):
        kube.put("/api/v1/namespaces/kube-system/pods", {
            "metadata": {"name": pod, "labels": {"app.kubernetes.io/name": "felixpy-node"}},
            "spec": {"nodeName": node, "containers": [{"name": "felixpy-node"}, {"name": "exabgp"}]}})
        kube.set_pod_log("kube-system", pod, "felixpy-node", f"agent log of {pod}\n")
    # A log line that (wrongly) carries the password: the bundle must not.
    kube.set_pod_log("kube-system", "felixpy-node-b", "exabgp", f"neighbor md5 {PASSWORD} mesh {K8S_PASSWORD}\n")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kube.kubeconfig())
    out = tmp_path / "cluster.tar.gz"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DATASTORE_TYPE": "etcdv3",
           "ETCD_ENDPOINTS": etcd_endpoint, "KUBECONFIG": str(kubeconfig),
           "FELIXPY_SECRETS_DIR": str(tmp_path / "secrets"), **({"PYTHONPATH": os.environ["PYTHONPATH"]}
                                                                  if "PYTHONPATH" in os.environ else {})}
    done = subprocess.run([sys.executable, "-m", "felixpy.ctl.main", "cluster", "diags", "--output", str(out),
                           "--since", "30m", "--max-logs", "1", "--focus-nodes", "n2"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"Diags saved to {out}"
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    files = _members(out)
    assert "cidr: 10.66.0.0/16" in files["datastore/ippools.yaml"]
    assert "secretKeyRef" in files["datastore/bgppeers.yaml"]
    assert "10.66." in files["ipam/blocks.json"] and "/calico/ipam/v2/host/n1/" in files["ipam/affinities.json"]
    assert "ipam/check.txt" in files and "ipam/check.json" in files
    # --max-logs 1 with --focus-nodes n2: only n2's pod, every container of it.
    node_logs = sorted(n for n in files if n.startswith("logs/felixpy-node/"))
    assert node_logs == ["logs/felixpy-node/n2/felixpy-node-b/exabgp.log",
                         "logs/felixpy-node/n2/felixpy-node-b/felixpy-node.log"]
    assert files["logs/felixpy-node/n2/felixpy-node-b/felixpy-node.log"] == "agent log of felixpy-node-b\n"
    assert files["logs/felixpy-node/n2/felixpy-node-b/exabgp.log"] == "neighbor md5 <redacted> mesh <redacted>\n"
    assert any("sinceSeconds=1800" in path for _, path in kube.requests)
    _no_secret(files)


def test_cluster_diags_bad_input_is_one_line(etcd_endpoint: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "ETCD_ENDPOINTS": etcd_endpoint}
    done = subprocess.run([sys.executable, "-m", "felixpy.ctl.main", "cluster", "diags", "--since", "soon"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1 and done.stderr == (
        "felixctl: error: --since 'soon': expected a duration such as 30m, 2h or 90s\n")
    with pytest.raises(UserError):
        parse_since("")
    assert parse_since("1h30m") == 5400


def test_node_diags_collects_and_redacts(tmp_path: pathlib.Path) -> None:
    secrets = tmp_path / "secrets" / "bgp"
    secrets.mkdir(parents=True)
    (secrets / "mesh-password").write_text(PASSWORD)
    conf = tmp_path / "exabgp" / "exabgp.conf"
    conf.parent.mkdir()
    b64 = base64.b64encode(PASSWORD.encode()).decode()
    conf.write_text(f"neighbor 192.0.2.12 {{\n    md5-password {b64};\n    md5-base64 true;\n}}\n")
    (conf.parent / "exabgp.log").write_text("exabgp started\n")
    bird = tmp_path / "bird.conf"
    bird.write_text('protocol bgp Node_192_0_2_11 {\n  password "other-password";\n}\n')
    logs = tmp_path / "log"
    logs.mkdir()
    (logs / "felix.log").write_text("x" * 5000 + "\nlast line\n")
    status = tmp_path / "bgp-status.json"
    status.write_text('{"pid": %d, "sidecar": "connected", "node": "n1", "learned": 2, "peers": '
                      '[{"peer": "192.0.2.12", "type": "mesh", "state": "Established", "since": 1700000000, '
                      '"info": ""}]}' % os.getpid())
    calls: list[list[str]] = []

    def run(argv: list[str]) -> str:
        calls.append(argv)
        if argv[0] == "conntrack":
            raise RuntimeError("command 'conntrack -S' failed (rc=127): No such file or directory: conntrack")
        return f"output of {' '.join(argv)}\n"

    env = {"NODENAME": "n1", "FELIXPY_SECRETS_DIR": str(tmp_path / "secrets"), "FELIXPY_BGP_STATUS": str(status),
           "FELIXPY_EXABGP_CONFIG": str(conf), "FELIXPY_BIRD_CONFIG": str(bird)}
    bundle = collect_node(env, log_dirs=[str(logs)], run=run, max_log_bytes=1000)
    files = {name: data.decode() for name, data in bundle.files.items()}
    assert bundle.prefix.startswith("felixpy-node-diags-n1-")
    assert files["network/ip-route.txt"] == "output of ip -4 route show table all\n"
    assert files["iptables/iptables-nft-save.txt"] == "output of iptables-nft-save -c\n"
    assert files["ipsets/ipset-list.txt"] == "output of ipset list\n"
    assert "md5-password <redacted>;" in files["bgp/exabgp.conf"]
    assert 'password "<redacted>";' in files["bgp/bird.conf"]
    assert files["bgp/exabgp.log"] == "exabgp started\n"
    assert "192.0.2.12" in files["bgp/node-status.txt"] and "Established" in files["bgp/node-status.txt"]
    assert files["logs/felix.log"].endswith("last line\n") and len(files["logs/felix.log"]) < 1100
    assert "Kernel" in files["checksystem.txt"]
    assert any(p.startswith("conntrack -S: ") for p in bundle.problems)
    # The agent's environment (this test process stands in for it): felixpy's variables only,
    # and nothing whose name says it is a secret.
    assert "PATH=" not in files["agent/environment.txt"]
    assert agent_env_text({"ETCD_PASSWORD": "x", "FELIX_LOGSEVERITYSCREEN": "INFO", "HOME": "/root",
                           "K8S_TOKEN_FILE": "/t"}) == (
        "ETCD_PASSWORD=<redacted>\nFELIX_LOGSEVERITYSCREEN=INFO\nK8S_TOKEN_FILE=<redacted>\n")
    _no_secret(files)
    out = tmp_path / "node.tar.gz"
    bundle.write(str(out))
    written = _members(out)
    assert "MANIFEST.txt" in written and "conntrack -S" in written["MANIFEST.txt"]
    _no_secret(written)
