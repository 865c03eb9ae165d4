"""FelixConfiguration in the lab: a change reaches every node's agent, which restarts as Felix does,
and the dataplane carries traffic throughout (the restart leaves routes and rules where they are)."""

from __future__ import annotations

import pathlib
import tempfile
import time

import pytest
import yaml

from tests.e2e.labtools import Lab, finish_ping, start_ping, wait_for

pytestmark = pytest.mark.e2e

LAB_NODES = 2
RESTARTED = "restarting felixpy-node for the configuration change"


@pytest.fixture(scope="module")
def pods(lab: Lab) -> Lab:
    lab.cli("ns", "add", "fc")
    lab.cli("pod", "add", "fc/a", "--node", "n1", "--serve", "tcp:80")
    lab.cli("pod", "add", "fc/b", "--node", "n2", "--serve", "tcp:80")
    return lab


def _full_log(lab: Lab, node: str) -> str:
    return pathlib.Path(f"/run/felixpy-lab/{lab.name}/{node}/agent.log").read_text(errors="replace")


def _forward(lab: Lab, node: str) -> list[str]:
    out = lab.cli("exec", node, "--", "iptables-save", "-t", "filter").stdout
    return [line for line in out.splitlines() if line.startswith("-A FORWARD ")]


def test_a_change_restarts_every_agent_and_loses_no_packet(pods: Lab) -> None:
    lab = pods
    pids = {n["name"]: n["agent_pid"] for n in lab.state()["nodes"]}
    restarts_before = {node: _full_log(lab, node).count(RESTARTED) for node in pids}
    lab.cli("exec", "n1", "--", "iptables", "-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "ACCEPT")
    change = {"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration", "metadata": {"name": "default"},
              "spec": {"reportingInterval": "0s", "logSeverityScreen": "Info", "chainInsertMode": "Append"}}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(change, f)
    ping = start_ping(lab, "fc/a", lab.pod_ip("fc/b"), interval=0.05, count=120)  # ~6 s
    try:
        time.sleep(1.0)
        started = time.monotonic()
        lab.cli("apply", "-f", f.name)
        for node in pids:
            wait_for(f"{node}'s agent to restart", lambda n=node: _full_log(lab, n).count(RESTARTED)
                     > restarts_before[n], 30)
        print(f"both agents restarted within {time.monotonic() - started:.1f} s of the apply")
    finally:
        sent, received = finish_ping(ping, timeout=30)
        pathlib.Path(f.name).unlink()
    assert sent == 120 and received == sent, f"lost {sent - received} of {sent} across the restarts"
    assert {n["name"]: n["agent_pid"] for n in lab.state()["nodes"]} == pids  # restarted in place
    # The new value is in force: our jump now follows the rule that was there before it.
    wait_for("cali-FORWARD appended on n1", lambda: "cali-FORWARD" in _forward(lab, "n1")[-1], 30)
    assert "198.51.100.0/24" in _forward(lab, "n1")[0]
    wait_for("the restarted agents serve CNI", lambda: lab.cli("pod", "add", "fc/c", "--node", "n1",
                                                               check=False).returncode == 0, 60)
    assert lab.cli("probe", "fc/c", "fc/b", "--port", "80", check=False).returncode == 0
