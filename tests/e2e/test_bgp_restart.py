"""Mode bgp without graceful restart: a killed ExaBGP's routes are withdrawn everywhere, then come back.

`BGPConfiguration default` with `nodeMeshMaxRestartTime: 0s` turns graceful restart off for every
mesh session (bgp/peers.py; the agent renders no `graceful-restart` capability and its RIB
flushes a peer's routes as soon as the session drops). Killing n2's ExaBGP under a running
cross-node ping must then remove n2's block from n1 and n3; `felixpy-lab speaker start n2` brings
the sessions and the routes back, and the ping recovers. test_bgp.py covers the hitless case.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tests.e2e.labtools import Lab, ping_summary, wait_for

pytestmark = pytest.mark.e2e

LAB_MODE = "bgp"
LAB_NODES = 3
NODES = [f"n{i}" for i in range(1, LAB_NODES + 1)]
PODS = {"r/p1": "n1", "r/p2": "n2", "r/p3": "n3"}
NO_GRACEFUL_RESTART = """\
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  nodeMeshMaxRestartTime: 0s
"""


def _node_ip(node: str) -> str:
    return f"192.0.2.{10 + int(node[1:])}"


def _routes(lab: Lab, node: str) -> str:
    return lab.ip(node, "route", "show", "proto", "80")


def _all_established(lab: Lab) -> bool:
    return all(len(n["bgp"]) == LAB_NODES - 1 and all(p["state"] == "Established" for p in n["bgp"])
               for n in lab.json("status")["nodes"])


def _exabgp_conf(lab: Lab, node: str) -> str:
    with open(f"/run/felixpy-lab/{lab.name}/{node}/exabgp/exabgp.conf") as f:
        return f.read()


@pytest.fixture(scope="module")
def mesh(lab: Lab) -> Lab:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(NO_GRACEFUL_RESTART)
        f.flush()
        lab.cli("apply", "-f", f.name)
    # Every agent re-renders its ExaBGP configuration without the capability and reloads it.
    wait_for("graceful restart off in every exabgp.conf",
             lambda: all("neighbor" in _exabgp_conf(lab, n) and "graceful-restart" not in _exabgp_conf(lab, n)
                         for n in NODES), timeout=15)
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80")
    wait_for("every BGP session Established", lambda: _all_established(lab), timeout=30)
    return lab


def test_killed_exabgp_without_graceful_restart_withdraws_then_recovers(mesh: Lab) -> None:
    n2_block = mesh.json("status")["nodes"][1]["blocks"][0]
    want = f"{n2_block} via {_node_ip('n2')} dev eth0"
    wait_for("n2's block on n1 and n3", lambda: all(want in _routes(mesh, n) for n in ("n1", "n3")), timeout=10)
    argv = [sys.executable, "-m", "felixpy.lab.cli", "exec", "r/p1", "--name", mesh.name, "--",
            "ping", "-n", "-q", "-i", "0.05", "-c", "240", "-W", "1", mesh.pod_ip("r/p2")]  # ~12 s
    ping = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)
        os.kill(mesh.state()["nodes"][1]["exabgp_pid"], signal.SIGKILL)
        gone = wait_for("n2's block withdrawn on n1 and n3",
                        lambda: all(n2_block not in _routes(mesh, n) for n in ("n1", "n3")),
                        timeout=10, interval=0.05)
        print(f"n2's block withdrawn on n1 and n3 {gone * 1000:.0f} ms after SIGKILL of its ExaBGP")
        time.sleep(1.0)  # the ping runs without a route meanwhile
        mesh.cli("speaker", "start", "n2")
        back = wait_for("n2's block back on n1 and n3",
                        lambda: all(want in _routes(mesh, n) for n in ("n1", "n3")), timeout=20, interval=0.05)
        print(f"n2's block back on n1 and n3 {back * 1000:.0f} ms after `speaker start n2` returned")
    finally:
        try:
            out, _ = ping.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            ping.kill()
            out, _ = ping.communicate()
    sent, received = ping_summary(out)
    print(f"ping: {sent - received} of {sent} lost while n2's routes were withdrawn")
    assert sent == 240 and 0 < received < sent, out  # the withdrawal really cut traffic, then it came back
    wait_for("every BGP session Established again", lambda: _all_established(mesh), timeout=20)
    recovered = mesh.cli("exec", "r/p1", "--", "ping", "-n", "-q", "-i", "0.05", "-c", "20", "-W", "1",
                         mesh.pod_ip("r/p2"), check=False).stdout
    assert ping_summary(recovered) == (20, 20), recovered
    assert mesh.cli("probe", "r/p3", "r/p2", "--port", "80").returncode == 0
