"""IPIP for real, on any kernel with ipip (this sandbox's has no CONFIG_NET_IPIP: ../shared/tools/ipip-vm.sh).

Run from the repo root:  ipip-vm.sh -t 900 .venv/bin/python -m pytest -q tests/ipip

Two node namespaces joined by a veth pair, a pod in each; each node's CalcGraph gets a pool with
ipipMode Always (or CrossSubnet), and its TunnelManager + TunnelLinks and RouteManager +
RouteTable program the namespace in the agent's order. The ipip module being loaded, every new
namespace already has the fallback tunl0, which the driver adopts. Pod → pod traffic must cross
tunl0 (its tx counter grows); with CrossSubnet on one subnet it must not.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest



def kernel_has_ipip() -> bool:
    """Whether this kernel can make an ipip device: the module loaded or built in, loadable with
    modprobe, or, failing both checks, an ipip device created in a throwaway namespace."""
    if os.path.isdir("/sys/module/ipip"):
        return True
    if shutil.which("modprobe") and subprocess.run(["modprobe", "-q", "ipip"], capture_output=True,
                                                   timeout=30).returncode == 0:
        return os.path.isdir("/sys/module/ipip")
    probe = f"fxipip{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, timeout=30).returncode != 0:
        return False
    try:
        return subprocess.run(["ip", "-n", probe, "link", "add", "ipipprobe", "type", "ipip", "local", "192.0.2.1"],
                              capture_output=True, timeout=30).returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)


if os.geteuid() != 0:
    pytest.skip("IPIP tests need root (network namespaces)", allow_module_level=True)
if not kernel_has_ipip():
    pytest.skip("this kernel has no ipip (no /sys/module/ipip, modprobe ipip failed, an ipip device "
                "cannot be created): run inside ../shared/tools/ipip-vm.sh", allow_module_level=True)

from felixpy import names  # noqa: E402
from felixpy.calc.dispatcher import Dispatcher  # noqa: E402
from felixpy.calc.graph import CalcGraph  # noqa: E402
from felixpy.dataplane.drivers.links import TunnelLinks  # noqa: E402
from felixpy.dataplane.drivers.routes import RouteTable  # noqa: E402
from felixpy.dataplane.managers.routes import RouteManager  # noqa: E402
from felixpy.dataplane.managers.tunnels import TunnelManager  # noqa: E402
from felixpy.datastore import keys  # noqa: E402
from felixpy.datastore.syncer import KVUpdate  # noqa: E402
from felixpy.kernel import netns  # noqa: E402
from felixpy.kernel.netlink import Netlink  # noqa: E402
from felixpy.kernel.tunnels import TunnelKernel  # noqa: E402
from felixpy.messages import CalcRoutes, TunnelDevices  # noqa: E402

pytestmark = [pytest.mark.root, pytest.mark.ipip]

NODES = {
    "n1": {"ip": "192.0.2.11", "tunnel": "10.244.1.1", "block": "10.244.1.0/26", "pod": "10.244.1.5"},
    "n2": {"ip": "192.0.2.12", "tunnel": "10.244.2.1", "block": "10.244.2.0/26", "pod": "10.244.2.5"},
}


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=60)


def updates(mode: str) -> list[KVUpdate]:
    out = [KVUpdate(keys.resource_key("ippools", "p"),
                    {"spec": {"cidr": "10.244.0.0/16", "ipipMode": mode, "vxlanMode": "Never"}}, 1)]
    for name, n in NODES.items():
        out.append(KVUpdate(keys.resource_key("nodes", name), {"metadata": {"name": name}, "spec": {
            "bgp": {"ipv4Address": f"{n['ip']}/24", "ipv4IPIPTunnelAddr": n["tunnel"]}}}, 1))
        out.append(KVUpdate(keys.affinity_key(name, n["block"]), {"state": "confirmed"}, 1))
        out.append(KVUpdate(keys.resource_key("workloadendpoints", f"{name}-k8s-pod-eth0", "x"), {
            "metadata": {"namespace": "x"},
            "spec": {"node": name, "pod": "pod", "interfaceName": f"cali{name}",
                     "ipNetworks": [f"{n['pod']}/32"]}}, 1))
    return out


@pytest.fixture
def spaces() -> Iterator[str]:
    prefix = "fxt" + secrets.token_hex(3)[:5]
    made = [f"{prefix}{n}" for n in NODES] + [f"{prefix}p{n}" for n in NODES]
    try:
        for ns in made:
            sh("ip", "netns", "add", ns)
        sh("ip", "-n", f"{prefix}n1", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", f"{prefix}n2")
        for name, n in NODES.items():
            node_ns, pod_ns = f"{prefix}{name}", f"{prefix}p{name}"
            sh("ip", "-n", node_ns, "addr", "add", f"{n['ip']}/24", "dev", "eth0")
            sh("ip", "-n", node_ns, "link", "set", "eth0", "up")
            sh("ip", "-n", node_ns, "route", "add", "default", "via", "192.0.2.1")
            sh("ip", "netns", "exec", node_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            sh("ip", "-n", node_ns, "link", "add", f"cali{name}", "type", "veth", "peer", "name", "eth0",
               "netns", pod_ns)
            sh("ip", "netns", "exec", node_ns, "sysctl", "-qw", f"net.ipv4.conf.cali{name}.proxy_arp=1",
               f"net.ipv4.neigh.cali{name}.proxy_delay=0")
            sh("ip", "-n", node_ns, "link", "set", f"cali{name}", "up")
            sh("ip", "-n", pod_ns, "addr", "add", f"{n['pod']}/32", "dev", "eth0")
            sh("ip", "-n", pod_ns, "link", "set", "eth0", "up")
            sh("ip", "-n", pod_ns, "route", "add", names.POD_GATEWAY, "dev", "eth0", "scope", "link")
            sh("ip", "-n", pod_ns, "route", "add", "default", "via", names.POD_GATEWAY, "dev", "eth0")
        yield prefix
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=60)


def program(prefix: str, mode: str) -> None:
    for name in NODES:
        with netns.iproute_in(f"/run/netns/{prefix}{name}") as ipr:
            links = TunnelLinks(netlink=TunnelKernel(ipr))
            tunnels = TunnelManager(links)
            table = RouteTable(netlink=Netlink(ipr))
            routes = RouteManager(table)
            calc = CalcGraph(name, remote_routes_from_datastore=False)
            Dispatcher(calc).on_updates(updates(mode))
            tunnels.on_update(calc.encap())
            routes.on_update(CalcRoutes(frozenset(calc.routes())))
            tunnels.complete_deferred_work()
            result = links.apply()
            assert not result.failed and not result.unavailable, result
            routes.on_update(TunnelDevices(tunnels.blocked_devices()))
            routes.complete_deferred_work()
            applied = table.apply()
            assert not applied.failed and not applied.pending, applied


def tx_packets(ns: str) -> int:
    data: Any = json.loads(sh("ip", "-n", ns, "-s", "-j", "link", "show", names.IPIP_DEVICE).stdout)
    return int(data[0]["stats64"]["tx"]["packets"])


def ping(prefix: str) -> bool:
    return sh("ip", "netns", "exec", f"{prefix}pn1", "ping", "-c", "2", "-i", "0.2", "-W", "2",
              NODES["n2"]["pod"], check=False).returncode == 0


def test_ipip_always_pods_talk_through_tunl0(spaces: str) -> None:
    program(spaces, "Always")
    n1 = f"{spaces}n1"
    assert f"inet {NODES['n1']['tunnel']}/32" in sh("ip", "-n", n1, "addr", "show", "dev", "tunl0").stdout
    routes = sh("ip", "-n", n1, "route", "show", "proto", str(names.ROUTE_PROTO)).stdout
    assert "10.244.2.0/26 via 192.0.2.12 dev tunl0 onlink" in routes
    before = tx_packets(n1)
    assert ping(spaces)
    assert tx_packets(n1) >= before + 2


def test_ipip_cross_subnet_same_subnet_is_plain(spaces: str) -> None:
    program(spaces, "CrossSubnet")
    n1 = f"{spaces}n1"
    routes = sh("ip", "-n", n1, "route", "show", "proto", str(names.ROUTE_PROTO)).stdout
    assert "10.244.2.0/26 via 192.0.2.12 dev eth0" in routes
    before = tx_packets(n1)
    assert ping(spaces)
    assert tx_packets(n1) == before
