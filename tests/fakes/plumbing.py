"""A stateful fake of the CNI server's kernel side (cni/server.Plumbing): pods' veths and host routes.

It keeps what the kernel would after each call (one veth per host name, its pod end in a named
sandbox, the host /32 routes through it), refuses what the kernel refuses (a sandbox that does
not exist, a host route of another owner) and removes a veth's routes with it. The real-kernel
counterpart is tests/integration/test_cni_server.py.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Sequence

from felixpy import names
from felixpy.kernel import veth
from felixpy.kernel.netlink import KernelRoute


@dataclass
class FakeVeth:
    host_iface: str
    netns: str
    container_iface: str
    index: int
    mac: str
    ips: list[str] = field(default_factory=list)


class FakePlumbing:
    def __init__(self, sandboxes: Sequence[str] = ()) -> None:
        self.sandboxes = set(sandboxes)  # netns paths that exist
        self.veths: dict[str, FakeVeth] = {}  # host iface -> veth
        self.routes: dict[str, KernelRoute] = {}  # dst -> route
        self.fail_configure = False
        self.calls: list[tuple[str, str]] = []
        self._index = itertools.count(100)

    def create(self, *, netns_path: str, host_iface: str, container_iface: str,
               mtu: int) -> veth.WorkloadPlumbing:
        self.calls.append(("create", host_iface))
        if netns_path not in self.sandboxes:
            raise veth.PlumbingError(f"pod veth {host_iface} ({netns_path}): cannot open network namespace")
        self._remove(host_iface)
        for other in [v for v in self.veths.values()
                      if v.netns == netns_path and v.container_iface == container_iface]:
            self._remove(other.host_iface)
        link = FakeVeth(host_iface, netns_path, container_iface, next(self._index), veth.random_mac())
        self.veths[host_iface] = link
        return veth.WorkloadPlumbing(container_mac=link.mac, host_ifindex=link.index)

    def configure(self, plumbing: veth.WorkloadPlumbing, *, netns_path: str, host_iface: str,
                  container_iface: str, ips: Sequence[ipaddress.IPv4Interface]) -> None:
        self.calls.append(("configure", host_iface))
        if self.fail_configure:
            self._remove(host_iface)
            raise veth.PlumbingError(f"pod veth {host_iface} ({netns_path}): injected failure")
        self.veths[host_iface].ips = [str(ip.ip) for ip in ips]

    def add_host_routes(self, routes: Sequence[KernelRoute]) -> None:
        for route in routes:
            self.calls.append(("add_host_route", route.dst))
            existing = self.routes.get(route.dst)
            if existing is not None and existing.proto != route.proto:
                raise veth.PlumbingError(f"pod route {route.dst}: a route of another owner exists")
            self.routes[route.dst] = route

    def teardown(self, *, netns_path: str | None, container_iface: str, host_iface: str | None) -> bool:
        self.calls.append(("teardown", host_iface or f"{netns_path}:{container_iface}"))
        if netns_path in self.sandboxes:
            for link in list(self.veths.values()):
                if link.netns == netns_path and link.container_iface == container_iface:
                    self._remove(link.host_iface)
                    return True
        if host_iface and host_iface in self.veths:
            self._remove(host_iface)
            return True
        return False

    def check(self, *, netns_path: str, host_iface: str, container_iface: str,
              ips: Sequence[ipaddress.IPv4Interface], container_mac: str | None,
              route_proto: int | None) -> list[str]:
        link = self.veths.get(host_iface)
        if link is None:
            return [f"host interface {host_iface} does not exist"]
        problems = []
        if container_mac is not None and link.mac != container_mac.lower():
            problems.append(f"pod interface {container_iface} MAC is {link.mac}, not {container_mac}")
        for ip in ips:
            if str(ip.ip) not in link.ips:
                problems.append(f"pod interface {container_iface} lacks address {ip.ip}/32")
            route = self.routes.get(f"{ip.ip}/32")
            if route_proto is not None and (route is None or route.ifindex != link.index):
                problems.append(f"no route {ip.ip}/32 dev {host_iface} proto {route_proto} on the node")
        return problems

    # -- test helpers -------------------------------------------------------------------------
    def _remove(self, host_iface: str) -> None:
        link = self.veths.pop(host_iface, None)
        if link is not None:  # the kernel drops every route through a deleted device
            self.routes = {d: r for d, r in self.routes.items() if r.ifindex != link.index}

    def pod_iface(self, namespace: str, pod: str) -> str:
        return names.workload_iface_name(namespace, pod)
