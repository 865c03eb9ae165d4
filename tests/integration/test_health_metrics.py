"""Health and metrics endpoints over real HTTP, and a real agent whose readiness follows etcd.

The agent test runs `felixpy-node` in a network namespace of its own, with its own etcd inside
that namespace (so freezing it with SIGSTOP touches nothing else), and asks the endpoints from
inside the namespace. It needs root, and it skips until felixpy/node/main.py starts the health
server (felixpy.node.health).
"""

from __future__ import annotations

import json
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

import pytest

import felixpy.node.main as node_main
from felixpy.datastore.memory import MemoryDatastore
from felixpy.node.health import HealthServer, add_agent_checks
from felixpy.node.metrics import CONTENT_TYPE, Metrics
from tests.unit.test_health import FakeStatus, parse_exposition, value


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read().decode(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers.get("Content-Type", "")


# -- in-process servers ---------------------------------------------------------------------------
def test_health_endpoints_over_http() -> None:
    server = HealthServer("127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert get(base + "/liveness")[:2] == (200, "live (starting)\n")
        assert get(base + "/readiness")[:2] == (503, "not ready: starting\n")
        status = FakeStatus(in_sync=True, last_apply_ok=True, last_tick=time.monotonic())
        store = MemoryDatastore()
        probe = add_agent_checks(server, status, store=store, probe_interval=0.05)
        assert probe is not None
        try:
            deadline = time.monotonic() + 5
            while get(base + "/readiness")[0] != 200 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert get(base + "/readiness")[:3] == (200, "ready\n", "text/plain; charset=utf-8")
            assert get(base + "/liveness")[:2] == (200, "live\n")
            store.available = False
            deadline = time.monotonic() + 5
            while get(base + "/readiness")[0] != 503 and time.monotonic() < deadline:
                time.sleep(0.02)
            code, body, _ = get(base + "/readiness")
            assert code == 503 and body.startswith("not ready: datastore: datastore not reachable")
        finally:
            probe.stop()
        assert get(base + "/readiness", method="HEAD")[:2] == (503, "")
        assert get(base + "/nothing-here")[0] == 404
    finally:
        server.stop()


def test_metrics_endpoint_over_http() -> None:
    metrics = Metrics()
    metrics.observe_apply(0.01)
    server = metrics.start_http(0, host="127.0.0.1")
    try:
        code, body, ctype = get(f"http://127.0.0.1:{server.port}/metrics")
        assert code == 200 and ctype == CONTENT_TYPE
        _, samples = parse_exposition(body)
        assert value(samples, "felixpy_dataplane_apply_seconds_count") == 1
    finally:
        server.stop()


def test_port_in_use_is_one_clear_error() -> None:
    first = HealthServer("127.0.0.1", 0)
    first.start()
    try:
        with pytest.raises(OSError, match=rf"health: cannot listen on 127.0.0.1:{first.port}: "):
            HealthServer("127.0.0.1", first.port).start()
    finally:
        first.stop()


# -- a real agent ---------------------------------------------------------------------------------
HEALTH_WIRED = "felixpy.node.health" in pathlib.Path(node_main.__file__).read_text()
METRICS_WIRED = "felixpy.node.metrics" in pathlib.Path(node_main.__file__).read_text()


@dataclass
class AgentInNetns:
    netns: str
    node: str
    etcd: subprocess.Popen[bytes]
    agent: subprocess.Popen[bytes]
    workdir: str

    def fetch(self, port: int, path: str) -> tuple[int, str]:
        """GET http://127.0.0.1:port/path from inside the namespace: (status, body), (0, error) if refused."""
        script = (
            "import json, sys, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=3)\n"
            "    print(json.dumps([r.status, r.read().decode()]))\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(json.dumps([e.code, e.read().decode()]))\n"
            "except OSError as e:\n"
            "    print(json.dumps([0, str(e)]))\n"
        )
        out = subprocess.run(["ip", "netns", "exec", self.netns, sys.executable, "-c", script],
                             capture_output=True, text=True, timeout=15)
        code, body = json.loads(out.stdout)
        return int(code), str(body)

    def log(self) -> str:
        return pathlib.Path(self.workdir, "agent.log").read_text(errors="replace")


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def agent_in_netns(needs_root: None) -> Iterator[AgentInNetns]:
    if not HEALTH_WIRED:
        pytest.skip("felixpy-node does not start felixpy.node.health yet (wiring in felixpy/node/main.py)")
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    prefix = "fxt" + secrets.token_hex(3)[:5]
    netns = prefix + "h"
    workdir = tempfile.mkdtemp(prefix=prefix + "-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        # The node's "uplink": a veth pair inside the namespace (no dummy module everywhere).
        _run("ip", "-n", netns, "link", "add", prefix + "d", "type", "veth", "peer", "name", prefix + "e")
        _run("ip", "-n", netns, "addr", "add", "192.0.2.10/24", "dev", prefix + "d")
        _run("ip", "-n", netns, "link", "set", prefix + "e", "up")
        _run("ip", "-n", netns, "link", "set", prefix + "d", "up")
        with open(os.path.join(workdir, "etcd.log"), "wb") as out:
            etcd = subprocess.Popen(
                ["ip", "netns", "exec", netns, "etcd", "--name", prefix, "--data-dir", f"{workdir}/etcd",
                 "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                 "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                 "--initial-cluster", f"{prefix}=http://127.0.0.1:2380", "--log-level", "error"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(etcd)
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONUNBUFFERED": "1",
            "NODENAME": prefix + "n", "DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": "http://127.0.0.1:2379",
            "WAIT_FOR_DATASTORE": "true", "IP": "192.0.2.10/24", "CALICO_IPV4POOL_CIDR": "10.231.0.0/16",
            "CALICO_NETWORKING_BACKEND": "vxlan", "FELIX_IPV6SUPPORT": "false",
            "FELIXPY_CNI_SOCKET": f"{workdir}/cni.sock", "FELIXPY_STATE_DIR": f"{workdir}/lib",
            "FELIX_HEALTHENABLED": "true", "FELIX_HEALTHHOST": "127.0.0.1", "FELIX_HEALTHPORT": "9099",
            "FELIX_PROMETHEUSMETRICSENABLED": "true", "FELIX_PROMETHEUSMETRICSPORT": "9091",
        }
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        os.makedirs(f"{workdir}/lib")
        with open(os.path.join(workdir, "agent.log"), "wb") as out:
            agent = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "felixpy.node.main"],
                                     env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        procs.append(agent)
        yield AgentInNetns(netns, prefix + "n", etcd, agent, workdir)
    finally:
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def wait_for(what: str, cond: Callable[[], bool], timeout: float, on_fail: Callable[[], str]) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{on_fail()}")


def test_agent_readiness_follows_etcd(agent_in_netns: AgentInNetns) -> None:
    a = agent_in_netns

    def diag() -> str:
        return f"readiness={a.fetch(9099, '/readiness')} agent exit={a.agent.poll()}\n--- agent log ---\n{a.log()}"

    wait_for("agent ready", lambda: a.fetch(9099, "/readiness") == (200, "ready\n"), 60, diag)
    assert a.fetch(9099, "/liveness") == (200, "live\n")
    if METRICS_WIRED:
        code, body = a.fetch(9091, "/metrics")
        assert code == 200, body
        _, samples = parse_exposition(body)
        assert value(samples, "felixpy_dataplane_apply_seconds_count") >= 1
        # Felix's names, from the real loop, kernel and datastore.
        assert value(samples, "felix_host", host=a.node) == 1
        assert value(samples, "felix_resync_state") == 3
        assert value(samples, "felix_cluster_num_hosts") == 1
        assert value(samples, "felix_int_dataplane_apply_time_seconds_count") >= 1
        assert value(samples, "felix_int_dataplane_initial_resync_time_seconds") > 0
        assert value(samples, "felix_iptables_save_calls") >= 1  # the first apply reads the tables back
        assert value(samples, "felix_iptables_restore_errors") == 0
        assert value(samples, "felix_iptables_chains", ip_version="4", table="filter") > 0
        assert value(samples, "felix_ipset_calls") >= 1
        assert value(samples, "felixpy_agent_ready") == 1
        assert value(samples, "felixpy_agent_readiness_check", check="datastore") == 1

    os.kill(a.etcd.pid, signal.SIGSTOP)
    try:
        took = wait_for("readiness 503 with etcd frozen",
                        lambda: a.fetch(9099, "/readiness")[0] == 503, 30, diag)
        code, body = a.fetch(9099, "/readiness")
        assert code == 503 and "datastore" in body, body
        assert a.fetch(9099, "/liveness")[0] == 200  # the loop still runs: no restart wanted
        print(f"readiness went 503 {took:.1f} s after SIGSTOP")
    finally:
        os.kill(a.etcd.pid, signal.SIGCONT)
    took = wait_for("ready again after SIGCONT", lambda: a.fetch(9099, "/readiness") == (200, "ready\n"), 30, diag)
    print(f"ready again {took:.1f} s after SIGCONT")
