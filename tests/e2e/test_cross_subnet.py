"""VXLAN CrossSubnet in the lab: encapsulation only toward nodes in the other subnet.

`felixpy-lab up --mode vxlan --cross-subnet`: odd nodes on 192.0.2.0/24, even nodes on
198.51.100.0/24, the fabric namespace routing between the two, and the pool's vxlanMode
CrossSubnet. A node reaches its own subnet's blocks via the peer's IP on eth0 and the other
subnet's blocks via vxlan.calico onlink; every pod reaches every other pod.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e

LAB_MODE = "vxlan"
LAB_NODES = 4
LAB_ARGS = ["--cross-subnet"]
NODES = [f"n{i}" for i in range(1, LAB_NODES + 1)]
PODS = {f"x/p{i}": f"n{i}" for i in range(1, LAB_NODES + 1)}
SUBNET_A = ipaddress.IPv4Network("192.0.2.0/24")
SUBNET_B = ipaddress.IPv4Network("198.51.100.0/24")


def _subnet(node: str) -> ipaddress.IPv4Network:
    return SUBNET_A if int(node[1:]) % 2 else SUBNET_B


def _routes(lab: Lab, node: str) -> list[str]:
    return lab.ip(node, "route", "show", "proto", "80").splitlines()


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    # A route to every remote block on every node (VXLAN ones wait for the peer's VTEP).
    wait_for("every remote block routed on every node",
             lambda: all(sum(" via " in r for r in _routes(lab, n)) == LAB_NODES - 1 for n in NODES),
             timeout=15)
    return lab


def test_nodes_sit_on_two_subnets_behind_the_fabric_router(cluster: Lab) -> None:
    nodes = {n["name"]: n["ip"] for n in cluster.json("status")["nodes"]}
    for node, address in nodes.items():
        assert ipaddress.IPv4Address(address) in _subnet(node), (node, address)
        gateway = "192.0.2.1" if _subnet(node) == SUBNET_A else "198.51.100.1"
        assert f"default via {gateway} dev eth0" in cluster.ip(node, "route", "show", "default")
    pool = cluster.cli("exec", "n1", "--", "felixctl", "get", "ippools", "-o", "yaml").stdout
    assert "vxlanMode: CrossSubnet" in pool, pool


def test_same_subnet_plain_other_subnet_vxlan(cluster: Lab) -> None:
    data = cluster.json("status")
    ips = {n["name"]: n["ip"] for n in data["nodes"]}
    blocks = {n["name"]: n["blocks"] for n in data["nodes"]}
    for node in NODES:
        routes = _routes(cluster, node)
        for other in NODES:
            if other == node:
                continue
            for block in blocks[other]:
                line = next((r for r in routes if r.startswith(f"{block} ")), None)
                assert line is not None, (node, block, routes)
                if _subnet(other) == _subnet(node):
                    assert f"via {ips[other]} dev eth0" in line and "vxlan.calico" not in line, line
                else:
                    assert "dev vxlan.calico" in line and "onlink" in line, line


def test_full_matrix_across_and_within_subnets(cluster: Lab) -> None:
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert not blocked_pairs(data), blocked_pairs(data)
