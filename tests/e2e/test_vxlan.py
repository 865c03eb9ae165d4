"""VXLAN mode in the lab: every node-to-node packet crosses vxlan.calico; hand-made damage is repaired.

Calico's VXLAN-only setup (backend vxlan, pool vxlanMode Always): each agent allocates its VTEP
address from IPAM at startup, records it and its MAC on its Node, and programs a permanent
neighbour + FDB entry and onlink routes per remote node. The lab refreshes routes and links every
10 s (FELIX_ROUTEREFRESHINTERVAL).
"""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e
LAB_MODE = "vxlan"
PODS = {"x/a": "n1", "x/b": "n2", "x/c": "n3"}
REFRESH = 10


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    return lab


def tx_packets(lab: Lab, node: str) -> int:
    out = lab.ip(node, "-s", "link", "show", "vxlan.calico")
    # The line after "TX:" holds bytes then packets.
    lines = out.splitlines()
    idx = next(i for i, ln in enumerate(lines) if ln.strip().startswith("TX:"))
    return int(lines[idx + 1].split()[1])


def fdb(lab: Lab, node: str) -> str:
    return subprocess.run(["ip", "netns", "exec", lab.netns(node), "bridge", "fdb", "show", "dev", "vxlan.calico"],
                          capture_output=True, text=True, timeout=10, check=True).stdout


def test_full_matrix_over_vxlan(cluster: Lab) -> None:
    before = tx_packets(cluster, "n1")
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert not blocked_pairs(data), blocked_pairs(data)
    assert tx_packets(cluster, "n1") > before  # the traffic really went through the tunnel
    routes = cluster.ip("n1", "route")
    remote = [ln for ln in routes.splitlines() if "dev vxlan.calico" in ln]
    assert len(remote) == 2 and all("onlink" in ln and "proto 80" in ln for ln in remote), routes
    link = cluster.ip("n1", "-d", "link", "show", "vxlan.calico")
    assert "vxlan id 4096" in link and "dstport 4789" in link
    assert re.search(r"mtu 1450\b", link)  # host MTU 1500 - 50
    pod_mtu = cluster.cli("exec", "x/a", "--", "ip", "link", "show", "eth0").stdout
    assert "mtu 1450" in pod_mtu


def test_hand_deleted_fdb_and_neighbour_are_repaired(cluster: Lab) -> None:
    entries = [ln.split() for ln in fdb(cluster, "n1").splitlines() if "dst" in ln]
    assert len(entries) == 2
    mac, dst = entries[0][0], entries[0][2]
    cluster.ip("n1", "neigh", "flush", "dev", "vxlan.calico")
    subprocess.run(["ip", "netns", "exec", cluster.netns("n1"), "bridge", "fdb", "del", mac, "dev",
                    "vxlan.calico", "dst", dst], check=True, timeout=10)
    wait_for("FDB entry back", lambda: mac in fdb(cluster, "n1"), timeout=REFRESH + 5)
    wait_for("neighbours back", lambda: cluster.ip("n1", "neigh", "show", "dev", "vxlan.calico").count("PERMANENT") == 2,
             timeout=REFRESH + 5)
    assert cluster.cli("probe", "x/a", "x/b", "--port", "80").returncode == 0


def test_deleted_device_is_recreated(cluster: Lab) -> None:
    cluster.ip("n2", "link", "del", "vxlan.calico")
    wait_for("vxlan.calico back on n2", lambda: "vxlan.calico" in cluster.ip("n2", "link", "show"),
             timeout=REFRESH + 5)
    wait_for("traffic to n2's pod again",
             lambda: cluster.cli("probe", "x/a", "x/b", "--port", "80", check=False).returncode == 0,
             timeout=REFRESH + 5)
