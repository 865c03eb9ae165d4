"""Pod plumbing against the real kernel: a "node" namespace and pod namespaces per test (root).

The agent runs inside its node's network namespace; the tests reproduce that by calling the
plumbing from a thread that entered a throw-away node namespace (netns.run_in_netns).
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from felixpy import names
from felixpy.kernel import netns, veth

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

T = TypeVar("T")


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=10).stdout


class Lab:
    def __init__(self) -> None:
        self.prefix = "fxt" + secrets.token_hex(3)[:5]
        self.node = f"{self.prefix}n"
        self.namespaces: list[str] = []

    def add_ns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        return f"/run/netns/{name}"

    def pod(self, i: int) -> str:
        return self.add_ns(f"{self.prefix}p{i}")

    def on_node(self, fn: Callable[[], T]) -> T:
        return netns.run_in_netns(f"/run/netns/{self.node}", fn)

    def iface(self, i: int) -> str:
        return f"cali{self.prefix}{i:03d}"[: names.IFNAMSIZ]

    def close(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def lab() -> Iterator[Lab]:
    lab = Lab()
    try:
        lab.add_ns(lab.node)
        # An uplink with an address, so the pod has something on the node to talk to.
        sh("ip", "-n", lab.node, "link", "add", f"{lab.prefix}u", "type", "veth", "peer", "name",
           f"{lab.prefix}v")
        sh("ip", "-n", lab.node, "link", "set", f"{lab.prefix}u", "up")
        sh("ip", "-n", lab.node, "addr", "add", "192.0.2.1/24", "dev", f"{lab.prefix}u")
        # proxy_arp only answers for 169.254.1.1 if the node routes it elsewhere, as real nodes
        # do through their default route.
        sh("ip", "-n", lab.node, "route", "add", "default", "via", "192.0.2.254")
        yield lab
    finally:
        lab.close()


def ip4(text: str) -> ipaddress.IPv4Interface:
    return ipaddress.IPv4Interface(text)


def test_setup_builds_calico_layout_and_carries_traffic(lab: Lab) -> None:
    pod_ns = lab.pod(0)
    iface = lab.iface(0)
    pod_ip = ip4("10.244.0.5/32")
    result = lab.on_node(lambda: veth.setup_workload(
        netns_path=pod_ns, host_iface=iface, ips=[pod_ip], mtu=1400))

    host = sh("ip", "-n", lab.node, "-d", "link", "show", iface)
    assert "ee:ee:ee:ee:ee:ee" in host and "mtu 1400" in host and "state UP" in host
    assert sh("ip", "-n", lab.node, "-o", "link", "show", iface).startswith(
        f"{result.host_ifindex}: ")
    for key in (f"net.ipv4.conf.{iface}.proxy_arp", f"net.ipv4.conf.{iface}.forwarding"):
        assert sh("ip", "netns", "exec", lab.node, "sysctl", "-n", key).strip() == "1"
    assert sh("ip", "netns", "exec", lab.node, "sysctl", "-n",
              f"net.ipv4.neigh.{iface}.proxy_delay").strip() == "0"
    assert f"10.244.0.5 lladdr {result.container_mac} PERMANENT" in sh(
        "ip", "-n", lab.node, "neigh", "show", "dev", iface)
    # No host route: that is the route driver's job.
    assert sh("ip", "-n", lab.node, "route", "show", "10.244.0.5") == ""

    pod = os.path.basename(pod_ns)
    pod_link = sh("ip", "-n", pod, "link", "show", "eth0")
    assert result.container_mac in pod_link and "mtu 1400" in pod_link
    assert "inet 10.244.0.5/32" in sh("ip", "-n", pod, "addr", "show", "eth0")
    assert "UP" in sh("ip", "-n", pod, "link", "show", "lo")
    routes = sh("ip", "-n", pod, "route", "show")
    assert "default via 169.254.1.1 dev eth0" in routes
    assert "169.254.1.1 dev eth0 scope link" in routes
    assert lab.on_node(lambda: veth.check_workload(
        netns_path=pod_ns, host_iface=iface, ips=[pod_ip])) == []

    # Traffic both ways once the node has its /32 route (what the route driver will add).
    sh("ip", "-n", lab.node, "route", "add", "10.244.0.5/32", "dev", iface, "scope", "link")
    sh("ip", "netns", "exec", lab.node, "ping", "-c1", "-W2", "10.244.0.5")
    sh("ip", "netns", "exec", pod, "ping", "-c1", "-W2", "192.0.2.1")


def test_check_reports_broken_plumbing(lab: Lab) -> None:
    pod_ns = lab.pod(0)
    iface = lab.iface(0)
    ips = [ip4("10.244.0.6/32")]
    lab.on_node(lambda: veth.setup_workload(netns_path=pod_ns, host_iface=iface, ips=ips, mtu=1500))
    sh("ip", "-n", os.path.basename(pod_ns), "addr", "del", "10.244.0.6/32", "dev", "eth0")
    sh("ip", "-n", lab.node, "link", "set", iface, "down")
    problems = lab.on_node(lambda: veth.check_workload(netns_path=pod_ns, host_iface=iface, ips=ips))
    assert any("is down" in p for p in problems)
    assert any("lacks address 10.244.0.6/32" in p for p in problems)


def test_setup_replaces_stale_veth_and_teardown_is_idempotent(lab: Lab) -> None:
    pod_ns = lab.pod(0)
    iface = lab.iface(0)
    ips = [ip4("10.244.0.7/32")]
    first = lab.on_node(lambda: veth.setup_workload(netns_path=pod_ns, host_iface=iface, ips=ips, mtu=1500))
    second = lab.on_node(lambda: veth.setup_workload(netns_path=pod_ns, host_iface=iface, ips=ips, mtu=1500))
    assert first.container_mac != second.container_mac
    assert lab.on_node(lambda: veth.check_workload(netns_path=pod_ns, host_iface=iface, ips=ips)) == []
    for _ in range(2):
        lab.on_node(lambda: veth.teardown_workload(host_iface=iface, netns_path=pod_ns))
    lab.on_node(lambda: veth.teardown_workload(host_iface=iface, netns_path="/run/netns/fxtnone"))
    assert sh("ip", "-n", lab.node, "link", "show", iface, check=False) == ""
    assert "eth0" not in sh("ip", "-n", os.path.basename(pod_ns), "link", "show")


def test_missing_netns_is_one_clear_error(lab: Lab) -> None:
    with pytest.raises(veth.PlumbingError) as info:
        lab.on_node(lambda: veth.setup_workload(
            netns_path=f"/run/netns/{lab.prefix}gone", host_iface=lab.iface(0),
            ips=[ip4("10.244.0.8/32")], mtu=1500))
    assert "\n" not in str(info.value) and "network namespace" in str(info.value)


def test_parallel_setup_never_moves_the_calling_threads(lab: Lab) -> None:
    count = 8
    pod_paths = [lab.pod(i) for i in range(count)]
    node_ns_id = lab.on_node(lambda: os.readlink("/proc/thread-self/ns/net"))
    my_ns_id = os.readlink("/proc/thread-self/ns/net")

    def plumb(i: int) -> tuple[str, str]:
        ips = [ip4(f"10.244.1.{i + 1}/32")]
        veth.setup_workload(netns_path=pod_paths[i], host_iface=lab.iface(i), ips=ips, mtu=1500)
        problems = veth.check_workload(netns_path=pod_paths[i], host_iface=lab.iface(i), ips=ips)
        assert problems == [], problems
        return os.readlink("/proc/thread-self/ns/net"), threading.current_thread().name

    def run_all() -> list[tuple[str, str]]:
        # The pool's threads are started from a thread inside the node namespace, so they start
        # there too, like the agent's CNI server threads.
        with ThreadPoolExecutor(max_workers=4) as pool:
            return list(pool.map(plumb, range(count)))

    results = lab.on_node(run_all)
    assert {ns_id for ns_id, _ in results} == {node_ns_id}
    assert os.readlink("/proc/thread-self/ns/net") == my_ns_id
    for i, path in enumerate(pod_paths):
        assert f"inet 10.244.1.{i + 1}/32" in sh("ip", "-n", os.path.basename(path), "addr")


def test_host_route_is_written_once_and_never_over_another_owners(lab: Lab) -> None:
    from felixpy.kernel.netlink import SCOPE_LINK, KernelRoute

    pod_ns = lab.pod(0)
    iface = lab.iface(0)
    plumbing = lab.on_node(lambda: veth.setup_workload(
        netns_path=pod_ns, host_iface=iface, ips=[ip4("10.244.0.9/32")], mtu=1500))
    route = KernelRoute(dst="10.244.0.9/32", ifindex=plumbing.host_ifindex, scope=SCOPE_LINK, proto=80)
    lab.on_node(lambda: veth.add_host_routes([route]))
    lab.on_node(lambda: veth.add_host_routes([route]))  # ours already: replaced in place
    assert sh("ip", "-n", lab.node, "route", "show", "10.244.0.9/32") == f"10.244.0.9 dev {iface} proto 80 scope link \n"
    sh("ip", "netns", "exec", lab.node, "ping", "-c1", "-W2", "10.244.0.9")
    # A route of another owner at the pod's address is reported, not replaced.
    sh("ip", "-n", lab.node, "route", "add", "10.244.0.10/32", "via", "192.0.2.254", "proto", "static")
    other = KernelRoute(dst="10.244.0.10/32", ifindex=plumbing.host_ifindex, scope=SCOPE_LINK, proto=80)
    with pytest.raises(veth.PlumbingError) as info:
        lab.on_node(lambda: veth.add_host_routes([other]))
    assert "a route of another owner exists" in str(info.value) and "proto 4" in str(info.value)
    assert "via 192.0.2.254" in sh("ip", "-n", lab.node, "route", "show", "10.244.0.10/32")
    # Nor a blackhole (the kernel's route lookup answers those with EINVAL).
    sh("ip", "-n", lab.node, "route", "add", "blackhole", "10.244.0.13/32")
    hole = KernelRoute(dst="10.244.0.13/32", ifindex=plumbing.host_ifindex, scope=SCOPE_LINK, proto=80)
    with pytest.raises(veth.PlumbingError, match="not a unicast route"):
        lab.on_node(lambda: veth.add_host_routes([hole]))
    # And CHECK sees a pod address that only a blackhole block covers as unrouted.
    sh("ip", "-n", lab.node, "route", "del", "10.244.0.9/32")
    sh("ip", "-n", lab.node, "route", "add", "blackhole", "10.244.0.0/26")
    problems = lab.on_node(lambda: veth.check_workload(
        netns_path=pod_ns, host_iface=iface, ips=[ip4("10.244.0.9/32")], route_proto=80))
    assert problems == [f"no route 10.244.0.9/32 dev {iface} proto 80 on the node"]


def test_teardown_from_inside_the_sandbox_never_touches_another_sandbox(lab: Lab) -> None:
    old_ns, new_ns = lab.pod(0), lab.pod(1)
    iface = lab.iface(0)  # both sandboxes of one pod share the host-side name
    ips = [ip4("10.244.0.11/32")]
    lab.on_node(lambda: veth.setup_workload(netns_path=old_ns, host_iface=iface, ips=ips, mtu=1500))
    assert "eth0" in sh("ip", "-n", os.path.basename(old_ns), "link", "show")
    # The new sandbox's ADD replaces the stale host end (and with it the old pod end).
    lab.on_node(lambda: veth.setup_workload(netns_path=new_ns, host_iface=iface, ips=ips, mtu=1500))
    assert "eth0" not in sh("ip", "-n", os.path.basename(old_ns), "link", "show")
    # The old sandbox's late DEL finds nothing of its own and removes nothing.
    assert lab.on_node(lambda: veth.teardown_workload(netns_path=old_ns)) is False
    assert lab.on_node(lambda: veth.check_workload(netns_path=new_ns, host_iface=iface, ips=ips)) == []
    # A sandbox whose eth0 is not a veth keeps it.
    sh("ip", "-n", os.path.basename(old_ns), "link", "add", "eth0", "type", "bridge")
    assert lab.on_node(lambda: veth.teardown_workload(netns_path=old_ns)) is False
    assert "eth0" in sh("ip", "-n", os.path.basename(old_ns), "link", "show")
    # The new sandbox's own DEL removes its pair, and is idempotent.
    assert lab.on_node(lambda: veth.teardown_workload(netns_path=new_ns)) is True
    assert lab.on_node(lambda: veth.teardown_workload(netns_path=new_ns)) is False
    assert sh("ip", "-n", lab.node, "link", "show", iface, check=False) == ""


def test_link_then_configure_is_setup_in_two_steps(lab: Lab) -> None:
    pod_ns = lab.pod(0)
    iface = lab.iface(0)
    ips = [ip4("10.244.0.12/32")]
    plumbing = lab.on_node(lambda: veth.create_workload_link(
        netns_path=pod_ns, host_iface=iface, mtu=1400, container_mac="02:aa:bb:cc:dd:ee"))
    assert plumbing.container_mac == "02:aa:bb:cc:dd:ee"
    pod_link = sh("ip", "-n", os.path.basename(pod_ns), "link", "show", "eth0")
    assert "02:aa:bb:cc:dd:ee" in pod_link and "state DOWN" in pod_link  # no address yet, not up
    lab.on_node(lambda: veth.configure_workload(plumbing, netns_path=pod_ns, host_iface=iface, ips=ips))
    assert lab.on_node(lambda: veth.check_workload(
        netns_path=pod_ns, host_iface=iface, ips=ips, container_mac="02:aa:bb:cc:dd:ee")) == []
    problems = lab.on_node(lambda: veth.check_workload(
        netns_path=pod_ns, host_iface=iface, ips=ips, container_mac="02:00:00:00:00:01", route_proto=80))
    assert any("MAC is 02:aa:bb:cc:dd:ee" in p for p in problems)
    assert any("no route 10.244.0.12/32" in p for p in problems)
