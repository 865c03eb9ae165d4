"""An IPv6-only lab (routes mode): Nodes have no IPv4 address and there is no IPv4 pool; pods get an
IPv6 address only, and other nodes' /122 blocks are routed over the nodes' IPv6 fabric addresses
from the datastore."""

from __future__ import annotations

import pytest

from tests.e2e.labtools import Lab, blocked_pairs

pytestmark = pytest.mark.e2e
LAB_MODE = "routes"
LAB_NODES = 2
LAB_ARGS = ["--ip-family", "ipv6"]
PODS = {"y/a": "n1", "y/b": "n2"}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    return lab


def test_ipv6_only_pods_reach_each_other(cluster: Lab) -> None:
    pods = cluster.json("status", "-o", "json")["pods"]
    assert all(len(p["ips"]) == 1 and ":" in p["ips"][0] for p in pods), pods
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert set(data["results"]) == {"icmp6", "tcp6/80", "udp6/80"}
    assert not blocked_pairs(data), blocked_pairs(data)
    remote = [ln for ln in cluster.ip("n1", "-6", "route").splitlines() if "via fd00:192:0:2::12" in ln]
    assert len(remote) == 1 and "/122" in remote[0], remote
    assert "blackhole" not in cluster.ip("n1", "route")  # no IPv4 block anywhere
