"""Route reflectors: 6 nodes peering only with 2 BIRD 2 reflectors driven by felixpy-node, mesh off.

The full matrix connects over reflected routes; every node has sessions to the reflectors only; a
reflector's BIRD stopped leaves traffic flowing through the other one; a first pod on a node without
a block gets its route to every node through the reflectors, which felixpy-node reconfigured live.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from typing import Iterator

import pytest

from tests.e2e.labtools import Lab, ping_summary, skip_reason, wait_for

pytestmark = pytest.mark.e2e

NODES = [f"n{i}" for i in range(1, 7)]
REFLECTORS = ["rr1", "rr2"]
RR_IPS = {"192.0.2.221", "192.0.2.222"}
# n6 gets no pod at first: its first pod claims a block that must travel through the reflectors.
PODS = {"r/p1": "n1", "r/p2": "n2", "r/p3": "n3", "r/p4": "n4", "r/p5": "n5"}


def _node_ip(node: str) -> str:
    return f"192.0.2.{10 + int(node[1:])}"


def _sessions(lab: Lab) -> dict[str, list[dict[str, object]]]:
    return {n["name"]: n["bgp"] for n in lab.json("status")["nodes"]}


def _all_established(lab: Lab) -> bool:
    sessions = _sessions(lab)
    return (all(len(sessions[n]) == len(REFLECTORS) for n in NODES)
            and all(len(sessions[r]) == len(NODES) + 1 for r in REFLECTORS)
            and all(p["state"] == "Established" for peers in sessions.values() for p in peers))


def _routes(lab: Lab, node: str) -> str:
    return lab.ip(node, "route", "show", "proto", "80")


@pytest.fixture(scope="module")
def rr_lab() -> Iterator[Lab]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = Lab("e2e" + secrets.token_hex(2))
    try:
        lab.cli("up", "--nodes", str(len(NODES)), "--route-reflectors", str(len(REFLECTORS)), timeout=180)
        lab.cli("ns", "add", "r")
        for ref, node in PODS.items():
            lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80")
        wait_for("every reflector session Established", lambda: _all_established(lab), timeout=30)
        yield lab
    except BaseException:
        for node in [*NODES, *REFLECTORS]:
            sys.stderr.write(f"--- agent log {node} ---\n{lab.agent_log(node)}\n")
        raise
    finally:
        subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "down", "--name", lab.name],
                       capture_output=True, text=True, timeout=60)


def test_sessions_only_to_the_reflectors(rr_lab: Lab) -> None:
    data = rr_lab.json("status")
    by_name = {n["name"]: n for n in data["nodes"]}
    for node in NODES:
        peers = {p["peer"]: p for p in by_name[node]["bgp"]}
        assert set(peers) == RR_IPS, (node, peers)
        assert all(p["type"] == "reflector" and p["state"] == "Established" for p in peers.values())
        assert by_name[node]["routeReflector"] is False
    for rr in REFLECTORS:
        assert by_name[rr]["routeReflector"] is True and by_name[rr]["bird"] == "running"
        addresses = {p["peer"] for p in by_name[rr]["bgp"]}
        assert addresses == {_node_ip(n) for n in NODES} | (RR_IPS - {by_name[rr]["ip"]})
    table = rr_lab.cli("exec", "rr1", "--", "felixctl", "node", "status").stdout
    assert table.count("| up ") == len(NODES) + 1, table


def test_full_matrix_over_reflected_routes(rr_lab: Lab) -> None:
    blocks = {n["name"]: n["blocks"] for n in rr_lab.json("status")["nodes"]}
    for node in NODES:
        routes = _routes(rr_lab, node)
        for other in NODES:
            for block in blocks[other]:
                if other != node:
                    assert f"{block} via {_node_ip(other)} dev eth0" in routes, (node, routes)
    data = rr_lab.json("matrix", "--ports", "80", "--protos", "icmp,tcp")
    for key in ("icmp", "tcp/80"):
        for src, row in data["results"][key].items():
            blocked = [dst for dst, ok in row.items() if not ok]
            assert not blocked, f"{key}: {src} cannot reach {blocked}"


def test_dedicated_reflector_fills_a_calico_node_status(rr_lab: Lab) -> None:
    doc = ("apiVersion: projectcalico.org/v3\nkind: CalicoNodeStatus\nmetadata:\n  name: rr1-status\n"
           "spec:\n  node: rr1\n  classes: [Agent, BGP, Routes]\n  updatePeriodSeconds: 0\n")
    path = f"/run/felixpy-lab/{rr_lab.name}/rr1-status.yaml"
    with open(path, "w") as f:
        f.write(doc)
    rr_lab.cli("apply", "-f", path)

    def status() -> dict[str, object]:
        out = rr_lab.cli("exec", "n1", "--", "felixctl", "get", "caliconodestatus", "rr1-status", "-o", "json").stdout
        return json.loads(out).get("status") or {}

    wait_for("rr1's status", lambda: bool(status()), timeout=10)
    data = status()
    assert data["agent"]["birdV4"]["state"] == "Ready" and data["agent"]["birdV4"]["version"].startswith("BIRD 2")
    assert data["bgp"]["numberEstablishedV4"] == len(NODES) + 1
    # Every node's block as BIRD holds it: learned from its owner, next hop the owner.
    blocks = {b: _node_ip(n["name"]) for n in rr_lab.json("status")["nodes"] if n["name"] in NODES
              for b in n["blocks"]}
    held = {(r["destination"], r["gateway"]) for r in data["routes"]["routesV4"] if r["type"] == "RIB"
            and r["learnedFrom"].get("peerIP") == r["gateway"]}
    assert set(blocks.items()) <= held, (blocks, held)
    rr_lab.cli("delete", "-f", path)


def test_one_reflector_down_traffic_still_flows(rr_lab: Lab) -> None:
    argv = [sys.executable, "-m", "felixpy.lab.cli", "exec", "r/p1", "--name", rr_lab.name, "--",
            "ping", "-n", "-q", "-i", "0.05", "-c", "60", "-W", "1", rr_lab.pod_ip("r/p2")]  # ~3 s
    ping = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(0.5)
    rr_lab.cli("speaker", "stop", "rr1")
    try:
        out, _ = ping.communicate(timeout=30)
        sent, received = ping_summary(out)
        assert sent == 60 and received == sent, f"lost {sent - received} of {sent} while rr1 stopped"
        wait_for("the nodes see rr1's session down", lambda: all(
            p["state"] != "Established" for n in NODES for p in _sessions(rr_lab)[n] if p["peer"] == "192.0.2.221"),
            timeout=15)
        rr2 = {p["peer"]: p for p in _sessions(rr_lab)["rr2"]}
        assert all(rr2[_node_ip(n)]["state"] == "Established" for n in NODES)
        data = rr_lab.json("matrix", "--ports", "80", "--protos", "tcp")
        for src, row in data["results"]["tcp/80"].items():
            assert all(row.values()), f"with rr1 down {src} reaches only {row}"
        # A block claimed while rr1 is down reaches everyone through rr2 alone.
        rr_lab.cli("pod", "add", "r/q6", "--node", "n6", "--serve", "tcp:80")
        block = rr_lab.json("status")["nodes"][5]["blocks"][0]
        want = f"{block} via {_node_ip('n6')} dev eth0"
        took = wait_for(f"{block} on every other node via rr2", lambda: all(
            want in _routes(rr_lab, n) for n in NODES[:5]), timeout=10, interval=0.05)
        print(f"n6's new block on all 5 nodes {took * 1000:.0f} ms after the ADD returned (one reflector)")
        for src in PODS:
            assert rr_lab.cli("probe", src, "r/q6", "--port", "80", check=False).returncode == 0, src
    finally:
        rr_lab.cli("speaker", "start", "rr1")
    wait_for("rr1's sessions Established again", lambda: _all_established(rr_lab), timeout=30)
    rr1 = {p["peer"]: p for p in _sessions(rr_lab)["rr1"]}
    assert rr1[_node_ip("n6")]["routesReceived"] == 1


def test_new_node_joins_reflectors_live(rr_lab: Lab) -> None:
    """A Node that appears later becomes a client of both reflectors without a BIRD restart."""
    bird_pids = {n["name"]: n["bird_pid"] for n in rr_lab.state()["nodes"] if n["route_reflector"]}
    doc = ("apiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: extra\n"
           "spec:\n  bgp:\n    ipv4Address: 192.0.2.99/24\n")
    path = f"/run/felixpy-lab/{rr_lab.name}/extra-node.yaml"
    with open(path, "w") as f:
        f.write(doc)
    rr_lab.cli("apply", "-f", path)
    start = time.monotonic()
    wait_for("extra node configured on both reflectors", lambda: all(
        any(p["peer"] == "192.0.2.99" for p in _sessions(rr_lab)[r]) for r in REFLECTORS), timeout=10)
    print(f"new Node in both reflectors' BIRD configuration after {time.monotonic() - start:.2f} s")
    assert {n["name"]: n["bird_pid"] for n in rr_lab.state()["nodes"] if n["route_reflector"]} == bird_pids
    assert all(p["state"] == "Established" for r in REFLECTORS for p in _sessions(rr_lab)[r]
               if p["peer"] != "192.0.2.99")
    rr_lab.cli("delete", "-f", path)
    wait_for("extra node removed from both reflectors", lambda: all(
        all(p["peer"] != "192.0.2.99" for p in _sessions(rr_lab)[r]) for r in REFLECTORS), timeout=10)
