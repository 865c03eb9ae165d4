"""felixpy-controllers against a real etcd: the IPAM GC stories, and the real process end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest

from felixpy.controllers.ipam_gc import IPAMGarbageCollector
from felixpy.controllers.nodes import NodeCleanup
from felixpy.controllers.pods import WorkloadEndpointIndex
from tests.unit.test_health import parse_exposition, value
from tests.unit.test_ipam_gc import GRACE, Cluster, FakeClock


@pytest.fixture
def cluster(etcd_store: Any) -> Cluster:
    c = Cluster(etcd_store)
    c.add_node("n1")
    c.add_node("n2")
    return c


def gc_for(cluster: Cluster, clock: FakeClock) -> IPAMGarbageCollector:
    return IPAMGarbageCollector(cluster.store, WorkloadEndpointIndex(cluster.store), grace_period=GRACE, clock=clock)


def test_leak_released_after_grace_and_not_before(cluster: Cluster) -> None:
    clock = FakeClock()
    gone = cluster.add_pod("default", "gone", "n1")[0]
    live = cluster.add_pod("default", "live", "n2")[0]
    gc = gc_for(cluster, clock)
    gc.reconcile()
    cluster.delete_endpoint("default", "gone", "n1")  # deleted while n1's agent was down
    assert gc.reconcile().candidates == 1
    clock.advance(GRACE - 1)
    assert gc.reconcile().released == () and cluster.allocated(gone)
    clock.advance(1)
    assert gc.reconcile().released == (gone,)
    assert not cluster.allocated(gone) and cluster.allocated(live)
    clock.advance(10 * GRACE)
    assert gc.reconcile().released == () and cluster.allocated(live)


def test_multi_ip_handle_released_together(cluster: Cluster) -> None:
    clock = FakeClock()
    ips = cluster.add_pod("default", "multi", "n1", num=3, endpoint_ips=2)
    gc = gc_for(cluster, clock)
    gc.reconcile()
    clock.advance(2 * GRACE)
    assert gc.reconcile().released == ()  # two of three still in use: none go
    cluster.delete_endpoint("default", "multi", "n1")
    gc.reconcile()
    clock.advance(GRACE)
    assert sorted(gc.reconcile().released) == sorted(ips)
    assert not any(cluster.allocated(ip) for ip in ips)


def test_deleted_node_cleaned_up(cluster: Cluster) -> None:
    clock = FakeClock()
    tunnel = cluster.tunnel("n2")
    pods = [cluster.add_pod("default", f"p{i}", "n2")[0] for i in range(2)]
    keep = cluster.add_pod("default", "keep", "n1")[0]
    n2_blocks = cluster.affinities("n2")
    cluster.delete_node("n2")
    assert sorted(gc_for(cluster, clock).reconcile().released) == sorted([tunnel, *pods])
    assert NodeCleanup(cluster.store, clock=clock).reconcile().deleted_nodes == ("n2",)
    assert cluster.affinities("n2") == [] and not set(n2_blocks) & set(cluster.blocks())
    assert cluster.allocated(keep) and cluster.affinities("n1")


def wait_for(what: str, cond: Callable[[], bool], timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class ControllersProcess:
    port: int  # /metrics, /healthz, /readyz
    log_path: Any

    def __call__(self) -> str:
        return str(self.log_path.read_text(errors="replace"))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return int(r.status), r.read().decode()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read().decode()
        except OSError as err:
            return 0, str(err)


@pytest.fixture
def controllers_process(etcd_endpoint: str, tmp_path: Any) -> Iterator[ControllersProcess]:
    log_path = tmp_path / "controllers.log"
    port = _free_port()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONUNBUFFERED": "1",
        "DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": etcd_endpoint,
        "FELIXPY_IPAM_GC_GRACE_PERIOD": "1s", "FELIXPY_CONTROLLER_RECONCILE_PERIOD": "1m",
        "FELIXPY_CONTROLLER_MIN_PASS_INTERVAL": "0.2",
        "FELIXPY_CONTROLLERS_METRICS_HOST": "127.0.0.1", "FELIXPY_CONTROLLERS_METRICS_PORT": str(port),
    }
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "felixpy.controllers.main"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield ControllersProcess(port, log_path)
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
            raise AssertionError("felixpy-controllers did not stop on SIGTERM") from None
        assert rc == 0, log_path.read_text(errors="replace")


def test_controllers_process_collects_leaks_and_deleted_nodes(cluster: Cluster,
                                                            controllers_process: ControllersProcess) -> None:
    live = cluster.add_pod("default", "live", "n1")[0]
    gone = cluster.add_pod("default", "gone", "n1")[0]
    n2 = cluster.add_pod("default", "on-n2", "n2")[0]
    wait_for("first pass", lambda: "ipam gc pass" in controllers_process(), timeout=15)
    cluster.delete_endpoint("default", "gone", "n1")
    took = wait_for("leak released", lambda: not cluster.allocated(gone), timeout=15)
    assert took >= 0.9, "released before its 1 s grace period"
    cluster.delete_node("n2")
    wait_for("deleted node cleaned", lambda: not cluster.affinities("n2") and not cluster.allocated(n2), timeout=15)
    assert cluster.allocated(live)
    log = controllers_process()
    assert "Candidate IP leak handle=" in log and f"ip={gone}" in log
    assert f"Garbage collecting leaked IP address ip={gone}" in log
    assert "Cleaning up IPAM of deleted node node=n2" in log


def test_controllers_process_serves_ipam_metrics_and_health(cluster: Cluster,
                                                            controllers_process: ControllersProcess) -> None:
    cluster.add_pod("default", "live", "n1")
    cluster.add_pod("default", "live2", "n1")
    gone = cluster.add_pod("default", "gone", "n2")[0]
    wait_for("ready", lambda: controllers_process.get("/readyz") == (200, "ready\n"), timeout=15)
    assert controllers_process.get("/healthz") == (200, "live\n")

    def scrape() -> dict[Any, float]:
        code, body = controllers_process.get("/metrics")
        assert code == 200, body
        return parse_exposition(body)[1]

    wait_for("allocations counted", lambda: value(scrape(), "ipam_allocations_in_use", ippool="p1", node="n1") == 2,
             timeout=10)
    s = scrape()
    assert value(s, "ipam_allocations_in_use", ippool="p1", node="n2") == 1
    assert value(s, "ipam_ippool_size", ippool="p1") == 65536
    assert value(s, "ipam_blocks", ippool="p1", node="n1") == 1
    assert value(s, "felixpy_controller_passes_total") >= 1
    cluster.delete_endpoint("default", "gone", "n2")
    wait_for("leak released", lambda: not cluster.allocated(gone), timeout=15)
    wait_for("reclamation counted",
             lambda: value(scrape(), "ipam_allocations_gc_reclamations", ippool="p1", node="n2") == 1, timeout=10)
    wait_for("released address gone from in_use",
             lambda: value(scrape(), "ipam_allocations_in_use", ippool="p1", node="n2") == 0, timeout=10)
    assert value(scrape(), "ipam_allocations_gc_candidates", ippool="p1", node="n2") == 0
    assert controllers_process.get("/nope")[0] == 404
