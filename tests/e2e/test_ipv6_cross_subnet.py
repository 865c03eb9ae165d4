"""Dual-stack across two subnets in BGP mode: IPv4 and IPv6 pools with vxlanMode CrossSubnet.

`felixpy-lab up --cross-subnet --ip-family dual` (mode bgp): odd nodes on 192.0.2.0/24 and
fd00:192:0:2::/64, even nodes on 198.51.100.0/24 and fd00:198:51:100::/64, the fabric namespace
routing between them (IPv4 and IPv6 forwarding) and knowing no pod routes. As Calico's BGP +
VXLAN CrossSubnet: a node reaches its own subnet's IPv6 blocks with the route BGP taught it (via
the owner's IPv6 address on eth0) and the other subnet's through vxlan-v6.calico onlink; every
pod reaches every other over both families.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e

LAB_MODE = "bgp"
LAB_NODES = 3
LAB_ARGS = ["--cross-subnet", "--ip-family", "dual"]
PODS = {"x/a": "n1", "x/b": "n2", "x/c": "n3"}


def _v6_block(lab: Lab, node: str) -> str:
    nodes = {n["name"]: n for n in lab.json("status", "-o", "json")["nodes"]}
    return next(b for b in nodes[node]["blocks"] if ipaddress.ip_network(b).version == 6)


def _v6_routes(lab: Lab, node: str) -> list[str]:
    return lab.ip(node, "-6", "route", "show", "proto", "80").splitlines()


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("ns", "add", "x")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    # Both remote IPv6 blocks routed on n1 (the VXLAN one waits for n2's IPv6 VTEP).
    blocks = {node: _v6_block(lab, node) for node in ("n2", "n3")}
    wait_for("n1's routes to both remote IPv6 blocks",
             lambda: all(any(r.startswith(b) for r in _v6_routes(lab, "n1")) for b in blocks.values()), 30)
    return lab


def test_nodes_sit_in_two_ipv6_subnets(cluster: Lab) -> None:
    addresses = {node: cluster.ip(node, "-6", "addr", "show", "dev", "eth0", "scope", "global") for node in PODS.values()}
    assert "fd00:192:0:2::11/64" in addresses["n1"] and "fd00:192:0:2::13/64" in addresses["n3"]
    assert "fd00:198:51:100::12/64" in addresses["n2"]
    assert "default via fd00:198:51:100::1" in cluster.ip("n2", "-6", "route", "show", "default")


def test_same_subnet_ipv6_block_is_plain_and_the_other_subnets_goes_through_vxlan_v6(cluster: Lab) -> None:
    routes = _v6_routes(cluster, "n1")
    same = next(r for r in routes if r.startswith(_v6_block(cluster, "n3")))
    other = next(r for r in routes if r.startswith(_v6_block(cluster, "n2")))
    assert "via fd00:192:0:2::13 dev eth0" in same, same
    assert "dev vxlan-v6.calico" in other and "onlink" in other, other


def test_full_matrix_over_both_families(cluster: Lab) -> None:
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert set(data["results"]) == {"icmp", "tcp/80", "udp/80", "icmp6", "tcp6/80", "udp6/80"}
    assert not blocked_pairs(data), blocked_pairs(data)
