"""Mode bgp: a 5-node full mesh of ExaBGP sidecars driven by the agents.

Connectivity over BGP-learned routes only (no datastore routes to other nodes), a new block's route
reaching every node, sessions in `status` and `felixctl node status`, and restarts of the agent and
of ExaBGP under a running ping without losing a packet.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time

import pytest

from tests.e2e.labtools import Lab, finish_ping, start_ping, wait_for

pytestmark = pytest.mark.e2e

LAB_NODES = 5
LAB_MODE = "bgp"
NODES = [f"n{i}" for i in range(1, LAB_NODES + 1)]
# n5 gets no pod at first: its first pod claims a block the others must learn over BGP.
PODS = {"b/p1": "n1", "b/p2": "n2", "b/p3": "n3", "b/p4": "n4"}


def _node_ip(node: str) -> str:
    return f"192.0.2.{10 + int(node[1:])}"


def _sessions(lab: Lab) -> dict[str, list[dict[str, object]]]:
    return {n["name"]: n["bgp"] for n in lab.json("status")["nodes"]}


def _all_established(lab: Lab) -> bool:
    sessions = _sessions(lab)
    return all(len(peers) == LAB_NODES - 1 and all(p["state"] == "Established" for p in peers)
               for peers in sessions.values())


@pytest.fixture(scope="module")
def mesh(lab: Lab) -> Lab:
    lab.cli("ns", "add", "b")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80")
    wait_for("every BGP session Established", lambda: _all_established(lab), timeout=30)
    return lab


def _routes(lab: Lab, node: str) -> str:
    return lab.ip(node, "route", "show", "proto", "80")


def test_status_shows_established_mesh_sessions(mesh: Lab) -> None:
    data = mesh.json("status")
    assert data["mode"] == "bgp"
    for node in data["nodes"]:
        peers = {p["peer"]: p for p in node["bgp"]}
        assert set(peers) == {_node_ip(n) for n in NODES if n != node["name"]}
        assert all(p["state"] == "Established" and p["type"] == "mesh" for p in peers.values())
        assert node["exabgp"] == "running"


def test_felixctl_node_status(mesh: Lab) -> None:
    table = mesh.cli("exec", "n1", "--", "felixctl", "node", "status").stdout
    assert "PEER ADDRESS" in table and "node-to-node mesh" in table
    assert table.count("| up ") == LAB_NODES - 1, table
    data = json.loads(mesh.cli("exec", "n1", "--", "felixctl", "node", "status", "-o", "json").stdout)
    assert data["running"] is True
    assert {p["peer"] for p in data["peers"]} == {_node_ip(n) for n in NODES[1:]}
    assert all(p["state"] == "Established" for p in data["peers"])


def test_remote_blocks_are_learned_over_bgp(mesh: Lab) -> None:
    blocks = {n["name"]: n["blocks"] for n in mesh.json("status")["nodes"]}
    for node in NODES:
        routes = _routes(mesh, node)
        for other, other_blocks in blocks.items():
            for block in other_blocks:
                if other == node:
                    assert f"blackhole {block}" in routes
                else:
                    assert f"{block} via {_node_ip(other)} dev eth0" in routes, (node, routes)


def test_full_ping_and_tcp_matrix(mesh: Lab) -> None:
    data = mesh.json("matrix", "--ports", "80", "--protos", "icmp,tcp")
    for key in ("icmp", "tcp/80"):
        for src, row in data["results"][key].items():
            blocked = [dst for dst, ok in row.items() if not ok]
            assert not blocked, f"{key}: {src} cannot reach {blocked}"


def test_new_block_route_appears_on_every_node(mesh: Lab) -> None:
    assert mesh.json("status")["nodes"][4]["blocks"] == []
    mesh.cli("pod", "add", "b/p5", "--node", "n5", "--serve", "tcp:80")
    block = mesh.json("status")["nodes"][4]["blocks"][0]
    assert ipaddress.IPv4Address(mesh.pod_ip("b/p5")) in ipaddress.IPv4Network(block)
    want = f"{block} via {_node_ip('n5')} dev eth0"
    took = wait_for(f"{block} on every other node",
                    lambda: all(want in _routes(mesh, n) for n in NODES[:4]), timeout=10, interval=0.05)
    print(f"new block route on all 4 nodes {took * 1000:.0f} ms after the ADD returned")
    for src in PODS:
        assert mesh.cli("probe", src, "b/p5", "--port", "80", check=False).returncode == 0, src


def test_agent_restart_under_ping_loses_nothing(mesh: Lab) -> None:
    ping = start_ping(mesh, "b/p1", mesh.pod_ip("b/p2"), interval=0.05, count=140)  # ~7 s
    try:
        time.sleep(1.0)
        for node in ("n1", "n2"):
            os.kill(mesh.state()["nodes"][int(node[1:]) - 1]["agent_pid"], signal.SIGKILL)
            time.sleep(0.5)
            mesh.cli("agent", "start", node)
    finally:
        sent, received = finish_ping(ping, timeout=30)
    assert sent == 140 and received == sent, f"lost {sent - received} of {sent} across agent restarts"
    wait_for("sessions Established after the agent restarts", lambda: _all_established(mesh), timeout=15)


def test_exabgp_killed_and_restarted_routes_come_back(mesh: Lab) -> None:
    n2_block = mesh.json("status")["nodes"][1]["blocks"][0]
    ping = start_ping(mesh, "b/p1", mesh.pod_ip("b/p2"), interval=0.05, count=160)  # ~8 s
    try:
        time.sleep(1.0)
        os.kill(mesh.state()["nodes"][1]["exabgp_pid"], signal.SIGKILL)
        time.sleep(1.5)
        # Graceful restart: the other nodes keep n2's block meanwhile, n2 keeps what it learned.
        assert f"{n2_block} via {_node_ip('n2')}" in _routes(mesh, "n1")
        assert f"via {_node_ip('n1')}" in _routes(mesh, "n2")
        mesh.cli("speaker", "start", "n2")
    finally:
        sent, received = finish_ping(ping, timeout=30)
    assert sent == 160 and received == sent, f"lost {sent - received} of {sent} across the ExaBGP restart"
    wait_for("n2's sessions Established again", lambda: _all_established(mesh), timeout=20)
    for node in NODES:
        if node != "n2":
            assert f"{n2_block} via {_node_ip('n2')}" in _routes(mesh, node)
    assert mesh.cli("probe", "b/p3", "b/p2", "--port", "80").returncode == 0
    assert mesh.cli("probe", "b/p2", "b/p4", "--port", "80").returncode == 0


def test_exabgp_stopped_then_started_sessions_recover(mesh: Lab) -> None:
    """A clean stop (SIGTERM) shows in the peers' status as a session down; a start brings it back."""
    mesh.cli("speaker", "stop", "n4")
    wait_for("n4's peers see the session down",
             lambda: all(p["state"] != "Established" for p in _sessions(mesh)["n1"] if p["peer"] == _node_ip("n4")),
             timeout=10)
    mesh.cli("speaker", "start", "n4")
    wait_for("n4's sessions Established again", lambda: _all_established(mesh), timeout=20)
    assert mesh.cli("probe", "b/p1", "b/p4", "--port", "80").returncode == 0
