"""Dual-stack lab in BGP mode: IPv4 and IPv6 routes learned over the ExaBGP mesh, as Calico's bird
and bird6 do it: one session per family between the nodes' addresses of that family, IPv6 blocks
only on the IPv6 sessions, next hop the owning node's IPv6 address.

`up --ip-family dual` without `--mode`: BGP is the lab's default mode.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import time

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, finish_ping, start_ping, wait_for

pytestmark = pytest.mark.e2e
LAB_NODES = 3
LAB_MODE = "bgp"
LAB_ARGS = ["--ip-family", "dual"]
NODES = ["n1", "n2", "n3"]
PODS = {"x/a": "n1", "x/b": "n2", "x/c": "n3"}


def _ip4(node: str) -> str:
    return f"192.0.2.{10 + int(node[1:])}"


def _ip6(node: str) -> str:
    return f"fd00:192:0:2::{10 + int(node[1:])}"


def _established(lab: Lab) -> bool:
    nodes = lab.json("status", "-o", "json")["nodes"]
    return all(len(n["bgp"]) == 2 * (LAB_NODES - 1) and all(p["state"] == "Established" for p in n["bgp"])
               for n in nodes)


def _v6(lab: Lab, ref: str) -> str:
    pod = next(p for p in lab.json("status", "-o", "json")["pods"] if f"{p['namespace']}/{p['name']}" == ref)
    return next(ip for ip in pod["ips"] if ":" in ip)


def _v6_block(lab: Lab, ref: str) -> str:
    return str(ipaddress.ip_network(f"{_v6(lab, ref)}/122", strict=False))


def _routes6(lab: Lab, node: str) -> str:
    return lab.ip(node, "-6", "route", "show", "proto", "80")


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("ns", "add", "x")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    wait_for("every IPv4 and IPv6 session Established", lambda: _established(lab), timeout=30)
    return lab


def test_one_session_per_family_between_same_family_addresses(cluster: Lab) -> None:
    for node in cluster.json("status", "-o", "json")["nodes"]:
        others = [n for n in NODES if n != node["name"]]
        assert sorted(p["peer"] for p in node["bgp"]) == sorted([_ip4(n) for n in others] + [_ip6(n) for n in others])
    conf = cluster.cli("exec", "n1", "--", "cat", f"/run/felixpy-lab/{cluster.name}/n1/exabgp/exabgp.conf").stdout
    v6 = conf[conf.index(f"neighbor {_ip6('n2')} {{"):]
    v6 = v6[:v6.index("\n}\n")]
    assert f"local-address {_ip6('n1')};" in v6 and "ipv6 unicast;" in v6 and "ipv4 unicast" not in v6
    table = cluster.cli("exec", "n1", "--", "felixctl", "node", "status").stdout
    v4_part, v6_part = table.split("IPv6 BGP status")
    assert "IPv4 BGP status" in v4_part and _ip4("n2") in v4_part and _ip6("n2") not in v4_part
    for node in ("n2", "n3"):
        assert f"| {_ip6(node)} | node-to-node mesh | up " in v6_part, table
    data = json.loads(cluster.cli("exec", "n1", "--", "felixctl", "node", "status", "-o", "json").stdout)
    assert {p["peer"]: p["state"] for p in data["peers"]}[_ip6("n3")] == "Established"


def test_learned_ipv6_blocks_are_in_every_kernel_via_the_owners_ipv6_address(cluster: Lab) -> None:
    for ref, owner in PODS.items():
        block = _v6_block(cluster, ref)
        for node in NODES:
            if node != owner:
                want = f"{block} via {_ip6(owner)} dev eth0"
                wait_for(f"{block} on {node}", lambda: want in _routes6(cluster, node), timeout=10)
        assert f"blackhole {block}" in _routes6(cluster, owner)
    # IPv4 still over the IPv4 sessions, with the IPv4 next hop.
    v4 = cluster.ip("n1", "route", "show", "proto", "80")
    assert f"via {_ip4('n2')} dev eth0" in v4 and f"via {_ip4('n3')} dev eth0" in v4


def test_full_matrix_over_both_families(cluster: Lab) -> None:
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert set(data["results"]) == {"icmp", "tcp/80", "udp/80", "icmp6", "tcp6/80", "udp6/80"}
    assert not blocked_pairs(data), blocked_pairs(data)


def test_exabgp_restart_keeps_the_ipv6_routes_and_loses_no_ping(cluster: Lab) -> None:
    """The dataplane is sacred for IPv6 too: n2's ExaBGP killed and started again, its IPv6 block
    stays in the other kernels (graceful restart) and n2 keeps what it learned (stale paths)."""
    n2_block = _v6_block(cluster, "x/b")
    n1_block = _v6_block(cluster, "x/a")
    ping = start_ping(cluster, "x/a", _v6(cluster, "x/b"), interval=0.05, count=160)  # ~8 s
    try:
        time.sleep(1.0)
        os.kill(cluster.state()["nodes"][1]["exabgp_pid"], signal.SIGKILL)
        time.sleep(1.5)
        assert f"{n2_block} via {_ip6('n2')}" in _routes6(cluster, "n1")
        assert f"{n1_block} via {_ip6('n1')}" in _routes6(cluster, "n2")
        cluster.cli("speaker", "start", "n2")
    finally:
        sent, received = finish_ping(ping, timeout=30)
    assert sent == 160 and received == sent, f"lost {sent - received} of {sent} IPv6 pings across the restart"
    wait_for("n2's sessions Established again", lambda: _established(cluster), timeout=20)
    for node in ("n1", "n3"):
        assert f"{n2_block} via {_ip6('n2')}" in _routes6(cluster, node)
    assert f"{n1_block} via {_ip6('n1')}" in _routes6(cluster, "n2")
    assert cluster.cli("probe", "x/c", "x/b", "--port", "80", "--family", "6").returncode == 0


def test_disable_bgp_export_on_the_ipv6_pool_withdraws_only_ipv6(cluster: Lab) -> None:
    block = _v6_block(cluster, "x/c")
    v4_before = cluster.ip("n1", "route", "show", "proto", "80")

    def patch(value: bool) -> None:
        cluster.cli("exec", "n1", "--", "felixctl", "patch", "ippool", "default-ipv6-ippool",
                    "-p", json.dumps({"spec": {"disableBGPExport": value}}))

    patch(True)
    try:
        wait_for("n3's IPv6 block withdrawn from n1 and n2",
                 lambda: all(block not in _routes6(cluster, n) for n in ("n1", "n2")), timeout=10)
        assert cluster.ip("n1", "route", "show", "proto", "80") == v4_before  # IPv4 untouched
    finally:
        patch(False)
    wait_for("n3's IPv6 block back on n1", lambda: f"{block} via {_ip6('n3')}" in _routes6(cluster, "n1"),
             timeout=10)


def test_a_reflector_node_with_pods_reflects_ipv6_too(cluster: Lab, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Calico's recipe turns n1 into a reflector that keeps its pods (last: it ends the mesh). Its
    BIRD gets the IPv6 sessions to n2 and n3, its agent a second loopback session for IPv6
    (ExaBGP ::1 ↔ BIRD Local_Agent6), and the IPv6 blocks keep flowing both ways."""
    felixctl = ("exec", "n1", "--", "felixctl")
    cluster.cli(*felixctl, "patch", "node", "n1", "-p", '{"spec":{"bgp":{"routeReflectorClusterID":"244.0.0.1"}}}')
    cluster.cli(*felixctl, "label", "node", "n1", "route-reflector=true")
    peer = tmp_path / "peer.yaml"
    peer.write_text("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: peer-with-route-reflectors}\n"
                    "spec: {nodeSelector: all(), peerSelector: route-reflector == 'true'}\n")
    cluster.cli("apply", "-f", str(peer))
    cluster.cli(*felixctl, "patch", "bgpconfiguration", "default", "-p", '{"spec":{"nodeToNodeMeshEnabled":false}}')
    status_file = f"/run/felixpy-lab/{cluster.name}/n1/lib/bgp-status.json"

    def reflecting() -> bool:
        try:
            with open(status_file, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return False
        agent = sorted((r["peer"], r["state"]) for r in data.get("agentSessions") or [])
        peers = sorted((r["peer"], r["state"]) for r in data.get("peers") or [])
        return (agent == [("192.0.2.11", "Established"), (_ip6("n1"), "Established")]
                and peers == sorted((a, "Established") for n in ("n2", "n3") for a in (_ip4(n), _ip6(n))))

    wait_for("n1 reflecting with both agent sessions up", reflecting, timeout=30)
    n1_block, n2_block = _v6_block(cluster, "x/a"), _v6_block(cluster, "x/b")
    wait_for("n1's IPv6 block reflected to n2 and n3",
             lambda: all(f"{n1_block} via {_ip6('n1')}" in _routes6(cluster, n) for n in ("n2", "n3")), timeout=15)
    wait_for("n2's IPv6 block reflected to n3 and into n1's kernel",
             lambda: all(f"{n2_block} via {_ip6('n2')}" in _routes6(cluster, n) for n in ("n1", "n3")), timeout=15)
    data = cluster.json("matrix", "--ports", "80", "--protos", "tcp", "--family", "6")
    assert not blocked_pairs(data), blocked_pairs(data)
