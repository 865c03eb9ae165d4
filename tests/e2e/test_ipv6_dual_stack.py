"""Dual-stack lab in VXLAN mode: every pod gets an IPv4 and an IPv6 address, and the full matrix
(icmp, tcp, udp) passes over both families.

Calico's dual-stack VXLAN setup: IP6=autodetect, an IPv6 pool with vxlanMode Always (/122
blocks), the CNI network config's ipam.assign_ipv4 / assign_ipv6 "true". IPv4 node-to-node
traffic goes through vxlan.calico, IPv6 through vxlan-v6.calico over the nodes' IPv6 fabric
addresses (VNI 4096, port 4789, MTU host - 70).
"""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
from typing import Any

import pytest

from tests.e2e.labtools import Lab, blocked_pairs, wait_for

pytestmark = pytest.mark.e2e
LAB_MODE = "vxlan"
LAB_NODES = 2
LAB_ARGS = ["--ip-family", "dual"]
PODS = {"x/a": "n1", "x/b": "n1", "x/c": "n2"}


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node, "--serve", "tcp:80,udp:80")
    return lab


def tx_packets(lab: Lab, node: str, device: str) -> int:
    lines = lab.ip(node, "-s", "link", "show", device).splitlines()
    idx = next(i for i, ln in enumerate(lines) if ln.strip().startswith("TX:"))
    return int(lines[idx + 1].split()[1])


def test_every_pod_has_one_address_of_each_family(cluster: Lab) -> None:
    pods = cluster.json("status", "-o", "json")["pods"]
    assert len(pods) == 3
    for pod in pods:
        versions = sorted(ipaddress.ip_address(ip).version for ip in pod["ips"])
        assert versions == [4, 6], pod
        v6 = next(ip for ip in pod["ips"] if ":" in ip)
        assert ipaddress.ip_address(v6) in ipaddress.ip_network("fd00:10:244::/64")
    # Pod side as Calico's CNI plugin makes it: the /128 and a default route via the host veth's
    # link-local address.
    addrs = cluster.cli("exec", "x/a", "--", "ip", "-6", "addr", "show", "eth0").stdout
    assert re.search(r"inet6 fd00:10:244:[0-9a-f:]+/128 scope global", addrs), addrs
    routes = cluster.cli("exec", "x/a", "--", "ip", "-6", "route", "show", "default").stdout
    assert "default via fe80::ecee:eeff:feee:eeee dev eth0" in routes


def test_full_matrix_over_both_families(cluster: Lab) -> None:
    before = tx_packets(cluster, "n1", "vxlan-v6.calico")
    data = cluster.json("matrix", "--ports", "80", "--protos", "icmp,tcp,udp")
    assert set(data["results"]) == {"icmp", "tcp/80", "udp/80", "icmp6", "tcp6/80", "udp6/80"}
    assert not blocked_pairs(data), blocked_pairs(data)
    assert tx_packets(cluster, "n1", "vxlan-v6.calico") > before  # IPv6 really crossed the v6 tunnel
    only6 = cluster.json("matrix", "--ports", "80", "--protos", "tcp", "--family", "6")
    assert set(only6["results"]) == {"tcp6/80"}


def test_ipv6_routes_blackholes_and_vxlan_v6_device(cluster: Lab) -> None:
    routes = cluster.ip("n1", "-6", "route")
    blackholes = [ln for ln in routes.splitlines() if ln.startswith("blackhole fd00:10:244:")]
    assert blackholes and all("/122" in ln and "proto 80" in ln for ln in blackholes), routes
    pod_routes = [ln for ln in routes.splitlines() if re.match(r"fd00:10:244:\S+ dev cali", ln)]
    assert len(pod_routes) == 2, routes  # a /128 per local pod
    remote = [ln for ln in routes.splitlines() if "dev vxlan-v6.calico" in ln and "/122" in ln]
    assert len(remote) == 1 and "onlink" in remote[0] and "proto 80" in remote[0], routes
    link = cluster.ip("n1", "-d", "link", "show", "vxlan-v6.calico")
    assert "vxlan id 4096" in link and "dstport 4789" in link and "local fd00:192:0:2::11" in link
    assert re.search(r"mtu 1430\b", link)  # host MTU 1500 - 70
    # The pods' MTU is the smallest over both families' encapsulations.
    assert "mtu 1430" in cluster.cli("exec", "x/a", "--", "ip", "link", "show", "eth0").stdout


def test_policy_is_enforced_over_both_families(cluster: Lab, tmp_path: Any) -> None:
    """A NetworkPolicy selecting x/c (ingress from x/a only, plus ICMPv6 echo from anyone through a
    Calico policy): over IPv4 and IPv6 alike a is let in and b is not (policy is rendered into
    iptables and ip6tables, the selector's set holds each family's addresses; c is on the other
    node, across VXLAN v4 and v6). Pods no policy selects keep both families."""
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "c-from-a", "namespace": "x"},
              "spec": {"podSelector": {"matchLabels": {"app": "c"}}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "a"}}}]}]}}
    ping6 = {"apiVersion": "projectcalico.org/v3", "kind": "NetworkPolicy",
             "metadata": {"name": "c-ping6", "namespace": "x"},
             "spec": {"selector": "app == 'c'", "types": ["Ingress"],
                      "ingress": [{"action": "Allow", "ipVersion": 6, "protocol": "ICMPv6",
                                   "icmp": {"type": 128}}]}}
    cluster.cli("label", "pod", "x/a", "app=a")
    cluster.cli("label", "pod", "x/c", "app=c")
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps(policy) + "\n---\n" + json.dumps(ping6))
    cluster.cli("apply", "-f", str(path))

    def reach(src: str, family: str, proto: str = "tcp") -> bool:
        port = ("--port", "80") if proto != "icmp" else ()
        return cluster.cli("probe", src, "x/c", "--proto", proto, *port, "--family", family,
                           "--timeout", "0.5", check=False).returncode == 0

    for family in ("4", "6"):
        wait_for(f"b blocked from c over IPv{family}", lambda f=family: not reach("x/b", f), timeout=20)  # type: ignore[misc]
        assert reach("x/a", family)
    assert reach("x/b", "6", "icmp") and not reach("x/b", "4", "icmp")  # ICMPv6 echo only, ipVersion 6
    assert cluster.cli("probe", "x/a", "x/b", "--port", "80", "--family", "6").returncode == 0
    save6 = subprocess.run(["ip", "netns", "exec", cluster.netns("n2"), "ip6tables-save", "-t", "filter"],
                           capture_output=True, text=True, timeout=10, check=True).stdout
    assert "-A cali-pi-" in save6 and "cali60s:" in save6 and "--icmpv6-type 128" in save6, save6
    cluster.cli("delete", "-f", str(path))
    for family in ("4", "6"):
        wait_for(f"c reachable over IPv{family} again", lambda f=family: reach("x/b", f), timeout=20)  # type: ignore[misc]


def test_nat_outgoing_for_the_ipv6_pool(cluster: Lab, tmp_path: Any) -> None:
    """The fabric has no route back to the IPv6 pool: a pod reaches the fabric's IPv6 address only
    once the pool has natOutgoing (ip6tables MASQUERADE with the cali60 sets)."""
    fabric = "fd00:192:0:2::1"

    def reach() -> bool:
        return cluster.cli("probe", "x/b", fabric, "--proto", "icmp", check=False).returncode == 0

    assert not reach()
    pool = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "default-ipv6-ippool"},
            "spec": {"cidr": "fd00:10:244::/64", "blockSize": 122, "vxlanMode": "Always", "natOutgoing": True}}
    path = tmp_path / "pool.yaml"
    path.write_text(json.dumps(pool))
    cluster.cli("apply", "-f", str(path))
    wait_for("IPv6 natOutgoing to the fabric", reach, timeout=20)
    nat = subprocess.run(["ip", "netns", "exec", cluster.netns("n1"), "ip6tables-save", "-t", "nat"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert re.search(r"-A cali-nat-outgoing .*cali60masq-ipam-pools src .*cali60all-ipam-pools dst .*MASQUERADE", nat), nat
