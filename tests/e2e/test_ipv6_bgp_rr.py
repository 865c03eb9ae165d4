"""Dual-stack lab behind a BIRD 2 route reflector (mesh off, Calico's recipe): the reflector has an
IPv4 and an IPv6 session to each client, reflects IPv6 blocks on the IPv6 sessions with the
originator's IPv6 next hop, and `felixctl node status` on it prints both tables."""

from __future__ import annotations

import ipaddress

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e
LAB_NODES = 2
LAB_MODE = "bgp"
LAB_ARGS = ["--ip-family", "dual", "--route-reflectors", "1"]
RR6 = "fd00:192:0:2::221"


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("ns", "add", "x")
    lab.cli("pod", "add", "x/a", "--node", "n1", "--serve", "tcp:80,udp:80")
    lab.cli("pod", "add", "x/b", "--node", "n2", "--serve", "tcp:80,udp:80")

    def up() -> bool:
        nodes = {n["name"]: n for n in lab.json("status", "-o", "json")["nodes"]}
        return (len(nodes["rr1"]["bgp"]) == 4 and all(p["state"] == "Established"
                                                       for n in nodes.values() for p in n["bgp"]))

    wait_for("every reflector session Established", up, timeout=30)
    return lab


def test_ipv6_routes_are_reflected_with_the_originators_next_hop(cluster: Lab) -> None:
    nodes = {n["name"]: n for n in cluster.json("status", "-o", "json")["nodes"]}
    assert sorted(p["peer"] for p in nodes["n1"]["bgp"]) == ["192.0.2.221", RR6]
    assert sorted(p["peer"] for p in nodes["rr1"]["bgp"]) == [
        "192.0.2.11", "192.0.2.12", "fd00:192:0:2::11", "fd00:192:0:2::12"]
    conf = cluster.cli("exec", "rr1", "--", "cat", f"/run/felixpy-lab/{cluster.name}/rr1/bird/bird.conf").stdout
    assert "neighbor fd00:192:0:2::11 as 64512;" in conf and "  ipv6 {" in conf
    pods = {f"{p['namespace']}/{p['name']}": p["ips"] for p in cluster.json("status", "-o", "json")["pods"]}
    for ref, owner, other in (("x/a", "n1", "n2"), ("x/b", "n2", "n1")):
        v6 = next(ip for ip in pods[ref] if ":" in ip)
        block = str(ipaddress.ip_network(f"{v6}/122", strict=False))
        want = f"{block} via fd00:192:0:2::{10 + int(owner[1:])} dev eth0"
        wait_for(f"{block} on {other}", lambda: want in cluster.ip(other, "-6", "route", "show", "proto", "80"),
                 timeout=10)
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert {"icmp6", "tcp6/80", "udp6/80", "icmp", "tcp/80"} <= set(data["results"])
    assert not blocked_pairs(data), blocked_pairs(data)
    table = cluster.cli("exec", "rr1", "--", "felixctl", "node", "status", "--status-file",
                        f"/run/felixpy-lab/{cluster.name}/rr1/lib/bgp-status.json").stdout
    v6_part = table.split("IPv6 BGP status")[1]
    assert "| fd00:192:0:2::11 | node specific | up " in v6_part, table
