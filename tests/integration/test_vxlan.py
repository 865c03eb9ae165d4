"""VXLAN for real: two node namespaces on a bridge, programmed from calc outputs by the links and route drivers.

    pod p1 (10.244.1.5) ─ n1 ──eth0 192.0.2.11──┐
                                               br0 (namespace <prefix>br)
    pod p2 (10.244.2.5) ─ n2 ──eth0 192.0.2.12──┘

Each node runs a CalcGraph fed the same datastore updates (pool vxlanMode Always, both Nodes with
their VTEP address and MAC, block affinities, the two pods), and the TunnelManager + TunnelLinks
and RouteManager + RouteTable against its own namespace, in the agent's order (links before
routes). A ping between the pods must cross vxlan.calico (its tx counter grows); FDB, neighbour
and device deleted by hand come back on resync.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.dataplane.drivers.links import TunnelLinks
from felixpy.dataplane.drivers.routes import RouteTable
from felixpy.dataplane.managers.routes import RouteManager
from felixpy.dataplane.managers.tunnels import TunnelManager
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.kernel import netns
from felixpy.kernel.netlink import Netlink
from felixpy.kernel.tunnels import TunnelKernel
from felixpy.messages import CalcRoutes, TunnelDevices

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

NODES = {
    "n1": {"ip": "192.0.2.11", "vtep": "10.244.1.0", "mac": "66:0a:00:00:00:01", "block": "10.244.1.0/26",
           "pod": "10.244.1.5"},
    "n2": {"ip": "192.0.2.12", "vtep": "10.244.2.0", "mac": "66:0a:00:00:00:02", "block": "10.244.2.0/26",
           "pod": "10.244.2.5"},
}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=15)


def updates(mode: str) -> list[KVUpdate]:
    out = [KVUpdate(keys.resource_key("ippools", "p"),
                    {"spec": {"cidr": "10.244.0.0/16", "vxlanMode": mode, "ipipMode": "Never"}}, 1)]
    for name, n in NODES.items():
        out.append(KVUpdate(keys.resource_key("nodes", name), {"metadata": {"name": name}, "spec": {
            "bgp": {"ipv4Address": f"{n['ip']}/24"},
            "ipv4VXLANTunnelAddr": n["vtep"], "vxlanTunnelMACAddr": n["mac"]}}, 1))
        out.append(KVUpdate(keys.affinity_key(name, n["block"]), {"state": "confirmed"}, 1))
        out.append(KVUpdate(keys.resource_key("workloadendpoints", f"{name}-k8s-pod-eth0", "x"), {
            "metadata": {"namespace": "x"},
            "spec": {"node": name, "pod": "pod", "interfaceName": f"cali{name}",
                     "ipNetworks": [f"{n['pod']}/32"]}}, 1))
    return out


@dataclass
class Node:
    name: str
    ns: str
    links: TunnelLinks
    tunnels: TunnelManager
    table: RouteTable
    routes: RouteManager
    calc: CalcGraph

    def apply(self) -> None:
        """One agent apply: links first, then routes (felixpy/node/agent.py APPLY_ORDER)."""
        self.tunnels.on_update(self.calc.encap())
        self.routes.on_update(CalcRoutes(frozenset(self.calc.routes())))
        self.tunnels.complete_deferred_work()
        result = self.links.apply()
        assert not result.failed, result.failed
        if result.devices_changed:
            self.table.queue_resync()
        self.routes.on_update(TunnelDevices(self.tunnels.blocked_devices()))
        self.routes.complete_deferred_work()
        applied = self.table.apply()
        assert not applied.failed and not applied.pending, applied

    def resync(self) -> None:
        self.links.queue_resync()
        self.table.queue_resync()
        self.apply()


@pytest.fixture
def cluster() -> Iterator[dict[str, Node]]:
    prefix = "fxt" + secrets.token_hex(3)[:5]
    spaces = [f"{prefix}br"] + [f"{prefix}{n}" for n in NODES] + [f"{prefix}p{n}" for n in NODES]
    stack: list[Any] = []
    try:
        for ns in spaces:
            sh("ip", "netns", "add", ns)
        br = f"{prefix}br"
        sh("ip", "-n", br, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", br, "link", "set", "br0", "up")
        nodes = {}
        for name, n in NODES.items():
            node_ns, pod_ns = f"{prefix}{name}", f"{prefix}p{name}"
            sh("ip", "-n", br, "link", "add", f"up{name}", "type", "veth", "peer", "name", "eth0",
               "netns", node_ns)
            sh("ip", "-n", br, "link", "set", f"up{name}", "master", "br0", "up")
            sh("ip", "-n", node_ns, "addr", "add", f"{n['ip']}/24", "dev", "eth0")
            sh("ip", "-n", node_ns, "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            # Proxy ARP answers for 169.254.1.1 only if the node has a route to it: a default
            # route to a router that does not exist (nothing leaves the bridge namespace).
            sh("ip", "-n", node_ns, "route", "add", "default", "via", "192.0.2.1")
            # The pod, plumbed as kernel/veth.py does: /32, default via 169.254.1.1, proxy ARP.
            sh("ip", "-n", node_ns, "link", "add", f"cali{name}", "type", "veth", "peer", "name", "eth0",
               "netns", pod_ns)
            sh("ip", "netns", "exec", node_ns, "sysctl", "-qw", f"net.ipv4.conf.cali{name}.proxy_arp=1",
               f"net.ipv4.neigh.cali{name}.proxy_delay=0")
            sh("ip", "-n", node_ns, "link", "set", f"cali{name}", "up")
            sh("ip", "-n", pod_ns, "addr", "add", f"{n['pod']}/32", "dev", "eth0")
            sh("ip", "-n", pod_ns, "link", "set", "eth0", "up")
            sh("ip", "-n", pod_ns, "route", "add", names.POD_GATEWAY, "dev", "eth0", "scope", "link")
            sh("ip", "-n", pod_ns, "route", "add", "default", "via", names.POD_GATEWAY, "dev", "eth0")
            ctx = netns.iproute_in(f"/run/netns/{node_ns}")
            ipr = ctx.__enter__()
            stack.append(ctx)
            links = TunnelLinks(netlink=TunnelKernel(ipr))
            table = RouteTable(netlink=Netlink(ipr))
            calc = CalcGraph(name, remote_routes_from_datastore=False)  # BGP backend: VXLAN still routes
            nodes[name] = Node(name, node_ns, links, TunnelManager(links), table, RouteManager(table), calc)
        yield nodes
    finally:
        for ctx in reversed(stack):
            ctx.__exit__(None, None, None)
        for ns in spaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=15)


def feed(nodes: dict[str, Node], mode: str = "Always") -> None:
    for node in nodes.values():
        Dispatcher(node.calc).on_updates(updates(mode))
        node.apply()


def ping(src: Node, dst: str) -> bool:
    pod_ns = src.ns.replace(src.name, f"p{src.name}")
    return sh("ip", "netns", "exec", pod_ns, "ping", "-c", "2", "-i", "0.2", "-W", "1", dst,
              check=False).returncode == 0


def tx_packets(node: Node) -> int:
    out = sh("ip", "-n", node.ns, "-s", "-j", "link", "show", names.VXLAN_DEVICE).stdout
    return int(json.loads(out)[0]["stats64"]["tx"]["packets"])


def test_pods_on_two_nodes_talk_over_vxlan_and_drift_is_repaired(cluster: dict[str, Node]) -> None:
    n1, n2 = cluster["n1"], cluster["n2"]
    feed(cluster)
    details = sh("ip", "-n", n1.ns, "-d", "link", "show", names.VXLAN_DEVICE).stdout
    assert "vxlan id 4096" in details and "dstport 4789" in details and "nolearning" in details
    assert "mtu 1450" in details and NODES["n1"]["mac"] in details
    routes = sh("ip", "-n", n1.ns, "route", "show", "proto", str(names.ROUTE_PROTO)).stdout
    assert f"10.244.2.0/26 via 10.244.2.0 dev {names.VXLAN_DEVICE} onlink" in routes
    fdb = sh("ip", "netns", "exec", n1.ns, "bridge", "fdb", "show", "dev", names.VXLAN_DEVICE).stdout
    assert f"{NODES['n2']['mac']} dst 192.0.2.12 self permanent" in fdb
    neigh = sh("ip", "-n", n1.ns, "neigh", "show", "dev", names.VXLAN_DEVICE).stdout
    assert f"10.244.2.0 lladdr {NODES['n2']['mac']} PERMANENT" in neigh

    before = tx_packets(n1)
    assert ping(n1, NODES["n2"]["pod"])
    assert tx_packets(n1) >= before + 2  # the echo requests left through the tunnel

    # FDB entry deleted by hand: traffic stops, the resync puts it back.
    sh("ip", "netns", "exec", n1.ns, "bridge", "fdb", "del", NODES["n2"]["mac"], "dev", names.VXLAN_DEVICE,
       "dst", "192.0.2.12", "self")
    assert not ping(n1, NODES["n2"]["pod"])
    n1.resync()
    assert ping(n1, NODES["n2"]["pod"])

    # Neighbour entry deleted by hand: repaired.
    sh("ip", "-n", n1.ns, "neigh", "del", "10.244.2.0", "dev", names.VXLAN_DEVICE)
    n1.resync()
    assert f"10.244.2.0 lladdr {NODES['n2']['mac']} PERMANENT" in \
        sh("ip", "-n", n1.ns, "neigh", "show", "dev", names.VXLAN_DEVICE).stdout

    # The whole device deleted by hand (its routes go with it): device and routes come back.
    sh("ip", "-n", n2.ns, "link", "del", names.VXLAN_DEVICE)
    assert not ping(n1, NODES["n2"]["pod"])
    n2.resync()
    assert ping(n1, NODES["n2"]["pod"])


def test_cross_subnet_same_subnet_goes_unencapsulated(cluster: dict[str, Node]) -> None:
    n1 = cluster["n1"]
    feed(cluster, mode="CrossSubnet")
    routes = sh("ip", "-n", n1.ns, "route", "show", "proto", str(names.ROUTE_PROTO)).stdout
    assert "10.244.2.0/26 via 192.0.2.12 dev eth0" in routes
    before = tx_packets(n1)
    assert ping(n1, NODES["n2"]["pod"])
    assert tx_packets(n1) == before  # same subnet: nothing through the tunnel
