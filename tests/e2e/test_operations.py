"""Operations on a real lab: metrics, checksystem and diags as an operator uses them.

A BGP lab of two nodes and one route reflector, started with FELIX_PROMETHEUSMETRICSENABLED=true
(the lab passes FELIX_* on to every agent), plus felixpy-controllers run in the lab's fabric
namespace against the lab's etcd. Then:

* scraping n1's, rr1's and the controllers' /metrics returns every metric the Grafana dashboard
  and the alert rules query, with values that match the lab;
* `felixctl node checksystem` inside a node reports the missing ipip module as FAIL with its
  reason (this kernel has no CONFIG_NET_IPIP), and the neighbour limits from the host;
* with a BGP password on the reflector sessions, `felixctl node diags` and `cluster diags` hold
  routes, rules, sets, BGP state and logs, and no trace of the password; neither does any log
  of the run.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import tarfile
import time
from typing import Any, Iterator

import pytest

from felixpy.lab import topology
from tests.e2e.labtools import Lab, skip_reason, wait_for
from tests.unit.test_dashboards import used_metric_names
from tests.unit.test_health import parse_exposition, value

pytestmark = pytest.mark.e2e

NODES = ["n1", "n2"]
RR = "rr1"
RR_IP = "192.0.2.221"
CONTROLLERS_PORT = 9094
PASSWORD = "e2e-ops-" + secrets.token_hex(6)
# Series that only exist after an event this lab never has (a leaked address being collected).
EVENT_ONLY = {"ipam_allocations_gc_reclamations"}


class OpsLab(Lab):
    controllers: subprocess.Popen[bytes] | None = None
    controllers_log = ""

    def fetch(self, where: str, port: int, path: str) -> tuple[int, str]:
        """GET http://127.0.0.1:port/path inside a node's (or the fabric's) namespace."""
        script = ("import json, urllib.request, urllib.error\n"
                  "try:\n"
                  f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
                  "    print(json.dumps([r.status, r.read().decode()]))\n"
                  "except urllib.error.HTTPError as e:\n"
                  "    print(json.dumps([e.code, e.read().decode()]))\n"
                  "except OSError as e:\n"
                  "    print(json.dumps([0, str(e)]))\n")
        netns = topology.fabric_netns(self.name) if where == "fabric" else self.netns(where)
        done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script],
                              capture_output=True, text=True, timeout=20)
        code, body = json.loads(done.stdout)
        return int(code), str(body)

    def scrape(self, where: str, port: int = 9091) -> tuple[dict[str, str], dict[Any, float]]:
        code, body = self.fetch(where, port, "/metrics")
        assert code == 200, f"{where}: {body}"
        return parse_exposition(body)


@pytest.fixture(scope="module")
def lab() -> Iterator[OpsLab]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    the_lab = OpsLab("e2e" + secrets.token_hex(2))
    saved = os.environ.get("FELIX_PROMETHEUSMETRICSENABLED")
    os.environ["FELIX_PROMETHEUSMETRICSENABLED"] = "true"
    log_path = f"/tmp/{the_lab.name}-controllers.log"
    try:
        the_lab.cli("up", "--nodes", str(len(NODES)), "--route-reflectors", "1", timeout=180)
        the_lab.cli("ns", "add", "ops")
        the_lab.cli("pod", "add", "ops/a", "--node", "n1", "--serve", "tcp:80")
        the_lab.cli("pod", "add", "ops/b", "--node", "n2", "--serve", "tcp:80")
        env = {**os.environ, "DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": topology.ETCD_ENDPOINT,
               "FELIXPY_CONTROLLERS_METRICS_HOST": "127.0.0.1",
               "FELIXPY_CONTROLLERS_METRICS_PORT": str(CONTROLLERS_PORT)}
        with open(log_path, "wb") as out:
            the_lab.controllers = subprocess.Popen(
                ["ip", "netns", "exec", topology.fabric_netns(the_lab.name), sys.executable, "-m",
                 "felixpy.controllers.main"], env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        the_lab.controllers_log = log_path
        yield the_lab
    except BaseException:
        for node in [*NODES, RR]:
            sys.stderr.write(f"--- agent log {node} ---\n{the_lab.agent_log(node)}\n")
        raise
    finally:
        if the_lab.controllers is not None:
            the_lab.controllers.terminate()
            try:
                the_lab.controllers.wait(timeout=10)
            except subprocess.TimeoutExpired:
                the_lab.controllers.kill()
                the_lab.controllers.wait(timeout=5)
        if saved is None:
            os.environ.pop("FELIX_PROMETHEUSMETRICSENABLED", None)
        else:
            os.environ["FELIX_PROMETHEUSMETRICSENABLED"] = saved
        subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "down", "--name", the_lab.name],
                       capture_output=True, text=True, timeout=60)
        if os.path.exists(log_path):
            os.unlink(log_path)


def _established(lab: OpsLab, since: float = 0.0) -> bool:
    nodes = {n["name"]: n["bgp"] for n in lab.json("status")["nodes"]}
    return all(len(nodes[n]) == 1 and nodes[n][0]["state"] == "Established" and float(nodes[n][0]["since"]) >= since
               for n in NODES) and len(nodes[RR]) == len(NODES)


def _family(name: str, types: dict[str, str]) -> str:
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and types.get(name[: -len(suffix)]) in ("histogram", "summary"):
            return name[: -len(suffix)]
    return name


def test_metrics_cover_the_dashboard_and_the_alerts(lab: OpsLab) -> None:
    wait_for("reflector sessions Established", lambda: _established(lab), timeout=60)
    wait_for("n1 ready", lambda: value(lab.scrape("n1")[1], "felixpy_agent_ready") == 1, timeout=60)
    wait_for("controllers ready", lambda: lab.fetch("fabric", CONTROLLERS_PORT, "/readyz") == (200, "ready\n"),
             timeout=60)
    # The reflector's gauges come from its own periodic look at BIRD, a little after the sessions come up.
    wait_for("the reflector's peers up in its metrics", lambda: [
        v for (name, _), v in lab.scrape(RR)[1].items() if name == "felixpy_bgp_peer_up"] == [1, 1], timeout=60)
    scrapes = {"n1": lab.scrape("n1"), RR: lab.scrape(RR), "controllers": lab.scrape("fabric", CONTROLLERS_PORT)}
    types = {k: v for t, _ in scrapes.values() for k, v in t.items()}
    names = {name for _, s in scrapes.values() for name, _labels in s}
    missing_family = sorted(n for n in used_metric_names() if _family(n, types) not in types)
    assert not missing_family, f"dashboard/alert metrics not exported by the lab: {missing_family}"
    missing_series = sorted(n for n in used_metric_names() - EVENT_ONLY if n not in names)
    assert not missing_series, f"declared but no series yet: {missing_series}"

    _, n1 = scrapes["n1"]
    assert value(n1, "felix_host", host="n1") == 1
    assert value(n1, "felix_cluster_num_hosts") == 3  # n1, n2 and the reflector's Node
    assert value(n1, "felix_cluster_num_workload_endpoints") == 2
    assert value(n1, "felix_active_local_endpoints") == 1
    assert value(n1, "felix_resync_state") == 3
    assert value(n1, "felixpy_bgp_peer_up", peer=RR_IP, type="reflector", peer_node=RR) == 1
    assert value(n1, "felixpy_bgp_speaker_up") == 1
    assert value(n1, "felix_iptables_rules", ip_version="4", table="filter") > 0
    assert value(n1, "felix_iptables_restore_calls") >= 1 and value(n1, "felix_iptables_restore_errors") == 0
    assert value(n1, "felix_int_dataplane_apply_time_seconds_count") >= 1
    assert value(n1, "felix_route_table_num_routes", table="IPv4:254") >= 2  # own pod + n2's block
    assert value(n1, "felixpy_ipam_ips_in_use") == 1
    _, rr = scrapes[RR]
    assert {dict(labels)["peer"] for name, labels in rr if name == "felixpy_bgp_peer_up"} == {
        "192.0.2.11", "192.0.2.12"}
    assert all(v == 1 for (name, _), v in rr.items() if name == "felixpy_bgp_peer_up")
    assert value(rr, "felixpy_agent_ready") == 1  # the reflector's readiness: its BIRD sessions
    _, ctl = scrapes["controllers"]
    pool = next(dict(labels)["ippool"] for name, labels in ctl if name == "ipam_ippool_size")
    assert value(ctl, "ipam_allocations_in_use", ippool=pool, node="n1") == 1
    assert value(ctl, "ipam_allocations_in_use", ippool=pool, node="n2") == 1
    assert value(ctl, "ipam_blocks", ippool=pool, node="n1") == 1
    assert lab.fetch("fabric", CONTROLLERS_PORT, "/healthz") == (200, "live\n")


def test_checksystem_in_a_lab_node(lab: OpsLab) -> None:
    done = lab.cli("exec", "n1", "--", sys.executable, "-m", "felixpy.ctl.main", "node", "checksystem", "-o", "json",
                   check=False)
    data = json.loads(done.stdout)
    checks = {c["name"]: c for c in data["checks"]}
    with open("/proc/config.gz", "rb") as f:
        import gzip

        has_ipip = b"\nCONFIG_NET_IPIP=" in gzip.decompress(f.read())
    if has_ipip:
        pytest.skip("this kernel has IPIP: nothing missing to report")
    assert done.returncode == 1
    assert checks["ipip"]["result"] == "FAIL"
    assert checks["ipip"]["detail"] == "CONFIG_NET_IPIP is not set in /proc/config.gz"
    assert "CONFIG_NET_IPIP" in checks["ipip"]["fix"]
    # Read from the host's namespace (they exist only there), for the 3 Nodes in the lab's etcd.
    neigh = checks["neighbour table"]
    assert neigh["result"] == "PASS", neigh
    assert "the host's network namespace" in neigh["detail"] and "3 nodes in the datastore" in neigh["detail"]
    assert checks["net.ipv4.ip_forward"]["result"] == "PASS"  # the agent set it in its namespace
    assert checks["vxlan"]["result"] == "PASS" and checks["iptables"]["result"] == "PASS"


def _tar(path: str) -> dict[str, str]:
    with tarfile.open(path) as tar:
        return {m.name.split("/", 1)[1]: (tar.extractfile(m) or open(os.devnull, "rb")).read().decode(errors="replace")
                for m in tar.getmembers()}


def _leaks(texts: dict[str, str]) -> list[str]:
    b64 = base64.b64encode(PASSWORD.encode()).decode()
    return [name for name, text in texts.items() if PASSWORD in text or b64 in text]


def test_diags_with_a_bgp_password_hold_no_secret(lab: OpsLab) -> None:
    for node in [*NODES, RR]:
        directory = f"/run/felixpy-lab/{lab.name}/{node}/secrets/bgp-rr"
        os.makedirs(directory, exist_ok=True)
        with open(f"{directory}/password", "w") as f:
            f.write(PASSWORD)
    peer = {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "peer-with-route-reflectors"},
            "spec": {"nodeSelector": "all()", "peerSelector": f"{topology.RR_LABEL} == 'true'",
                     "password": {"secretKeyRef": {"name": "bgp-rr", "key": "password"}}}}
    applied = time.time()
    done = subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "apply", "-f", "-", "--name", lab.name],
                          input=json.dumps(peer), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    took = wait_for("reflector sessions Established again with MD5", lambda: _established(lab, applied), timeout=60)
    print(f"reflector sessions back with MD5 in {took:.1f} s")

    out = f"/tmp/{lab.name}-node-diags.tar.gz"
    try:
        done = lab.cli("exec", "n1", "--", sys.executable, "-m", "felixpy.ctl.main", "node", "diags", "--output", out)
        assert done.stdout.splitlines()[-1] == f"Diags saved to {out}"
        files = _tar(out)
    finally:
        if os.path.exists(out):
            os.unlink(out)
    assert "proto 80" in files["network/ip-route.txt"]  # felixpy's routes
    assert "cali-" in files["iptables/iptables-nft-save.txt"] or "cali-" in files.get(
        "iptables/iptables-legacy-save.txt", "")
    assert "ipsets/ipset-list.txt" in files
    status = json.loads(files["bgp/bgp-status.json"])
    assert status["node"] == "n1" and status["peers"][0]["peer"] == RR_IP
    assert "md5-password <redacted>;" in files["bgp/exabgp.conf"]
    assert "felixpy-node" in files["agent/stderr.log"]  # the lab's agent.log, found through the agent
    assert "FELIXPY_SECRETS_DIR=" in files["agent/environment.txt"]
    assert "FAIL  ipip" in files["checksystem.txt"] or "PASS  ipip" in files["checksystem.txt"]
    assert not _leaks(files), f"password in node diags: {_leaks(files)}"

    out = f"/tmp/{lab.name}-cluster-diags.tar.gz"
    env = {**os.environ, "DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": topology.ETCD_ENDPOINT}
    try:
        done = subprocess.run(["ip", "netns", "exec", topology.fabric_netns(lab.name), sys.executable, "-m",
                               "felixpy.ctl.main", "cluster", "diags", "--output", out],
                              capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
        assert "not collected: pod logs: no Kubernetes API configured" in done.stdout
        files = _tar(out)
    finally:
        if os.path.exists(out):
            os.unlink(out)
    assert "secretKeyRef" in files["datastore/bgppeers.yaml"]
    assert {"name: n1", "name: n2", "name: rr1"} <= {line.strip() for line in files["datastore/nodes.yaml"].splitlines()}
    assert not _leaks(files)

    # No log of the run carries the password either: agents, ExaBGP, BIRD, the reflector, etcd.
    logs = {}
    for base, _dirs, names in os.walk(f"/run/felixpy-lab/{lab.name}"):
        for name in names:
            if name.endswith((".log", ".out")):
                with open(os.path.join(base, name), errors="replace") as f:
                    logs[os.path.join(base, name)] = f.read()
    with open(lab.controllers_log, errors="replace") as f:
        logs["controllers"] = f.read()
    assert len(logs) >= 6
    assert not _leaks(logs), f"password in logs: {_leaks(logs)}"
