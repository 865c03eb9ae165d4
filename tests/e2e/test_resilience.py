"""The dataplane outlives its control plane: agent restarts and etcd outages lose no packet."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.e2e.labtools import Lab, finish_ping, start_ping, wait_for

pytestmark = pytest.mark.e2e

LAB_NODES = 3


@pytest.fixture(scope="module")
def pods(lab: Lab) -> Lab:
    lab.cli("ns", "add", "r")
    lab.cli("pod", "add", "r/a", "--node", "n1", "--serve", "tcp:80")
    lab.cli("pod", "add", "r/b", "--node", "n2", "--serve", "tcp:80")
    return lab


def test_agent_restart_loses_no_packet(pods: Lab) -> None:
    ping = start_ping(pods, "r/a", pods.pod_ip("r/b"), interval=0.05, count=160)  # ~8 s
    try:
        time.sleep(1.0)
        for node in ("n1", "n2"):  # both ends of the path, one after the other
            os.kill(pods.state()["nodes"][int(node[1:]) - 1]["agent_pid"], signal.SIGKILL)
            time.sleep(0.5)
            pods.cli("agent", "start", node)
    finally:
        sent, received = finish_ping(ping, timeout=30)
    assert sent == 160
    assert received == sent, f"lost {sent - received} of {sent} packets across agent restarts"
    # The restarted agents still serve CNI and program new pods.
    pods.cli("pod", "add", "r/after-restart", "--node", "n1")
    assert pods.cli("exec", "r/after-restart", "--", "ping", "-c", "1", "-W", "2",
                    pods.pod_ip("r/b"), check=False).returncode == 0


def test_etcd_outage_leaves_dataplane_and_agents_catch_up(pods: Lab) -> None:
    etcd_pid = pods.state()["etcd_pid"]
    ping = start_ping(pods, "r/a", pods.pod_ip("r/b"), interval=0.2, count=100)  # ~20 s
    os.kill(etcd_pid, signal.SIGSTOP)
    try:
        time.sleep(20)
        # Still intact in the middle of the outage: a fresh TCP connect across nodes.
        assert pods.cli("probe", "r/b", "r/a", "--port", "80").returncode == 0
    finally:
        os.kill(etcd_pid, signal.SIGCONT)
        sent, received = finish_ping(ping, timeout=30)
    assert sent == 100 and received == sent, f"lost {sent - received} of {sent} pings during the outage"
    # A pod added after etcd returns, on the third node, is reachable from the others.
    pods.cli("pod", "add", "r/late", "--node", "n3", "--serve", "tcp:80")
    took = wait_for("r/a and r/b reach r/late",
                    lambda: all(pods.cli("probe", src, "r/late", "--port", "80", check=False).returncode == 0
                                for src in ("r/a", "r/b")), timeout=20)
    print(f"new pod reachable {took:.1f} s after its ADD")
