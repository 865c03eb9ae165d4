"""IPv6-only lab in BGP mode: Nodes without an IPv4 address, no IPv4 pool; the mesh runs over the
nodes' IPv6 addresses only and the BGP identifier is a hash of the node name (Calico's
CALICO_ROUTER_ID=hash, which an IPv6-only calico-node needs)."""

from __future__ import annotations

import ipaddress

import pytest

from bgp.bird import hashed_router_id
from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e
LAB_NODES = 2
LAB_MODE = "bgp"
LAB_ARGS = ["--ip-family", "ipv6"]


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("ns", "add", "x")
    lab.cli("pod", "add", "x/a", "--node", "n1", "--serve", "tcp:80,udp:80")
    lab.cli("pod", "add", "x/b", "--node", "n2", "--serve", "tcp:80,udp:80")

    def up() -> bool:
        nodes = lab.json("status", "-o", "json")["nodes"]
        return all([p["state"] for p in n["bgp"]] == ["Established"] for n in nodes)

    wait_for("the IPv6 session Established", up, timeout=30)
    return lab


def test_ipv6_only_mesh_routes_and_matrix(cluster: Lab) -> None:
    nodes = {n["name"]: n for n in cluster.json("status", "-o", "json")["nodes"]}
    assert [p["peer"] for p in nodes["n1"]["bgp"]] == ["fd00:192:0:2::12"]
    conf = cluster.cli("exec", "n1", "--", "cat", f"/run/felixpy-lab/{cluster.name}/n1/exabgp/exabgp.conf").stdout
    assert f"router-id {hashed_router_id('n1')};" in conf and "ipv4 unicast" not in conf
    pods = {f"{p['namespace']}/{p['name']}": p["ips"] for p in cluster.json("status", "-o", "json")["pods"]}
    assert all(len(ips) == 1 and ipaddress.ip_address(ips[0]).version == 6 for ips in pods.values())
    block = str(ipaddress.ip_network(f"{pods['x/b'][0]}/122", strict=False))
    assert f"{block} via fd00:192:0:2::12 dev eth0" in cluster.ip("n1", "-6", "route", "show", "proto", "80")
    assert cluster.ip("n1", "route", "show", "proto", "80").strip() == ""  # no IPv4 routes at all
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert set(data["results"]) == {"icmp6", "tcp6/80", "udp6/80"}
    assert not blocked_pairs(data), blocked_pairs(data)
