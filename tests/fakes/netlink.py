"""Stateful fakes of the netlink boundaries: routes (RouteNetlink) and tunnel devices (TunnelNetlink).

Each keeps what the kernel would (routes keyed by table, dst and metric; links, addresses, FDB
and neighbour entries), refuses what the kernel refuses (EEXIST, ENODEV, ESRCH, no ipip module)
and records every call, so driver tests check the resulting kernel state. The real-kernel
counterparts are tests/integration/test_route_driver.py and test_vxlan.py.
"""

from __future__ import annotations

import errno
from dataclasses import replace

from felixpy import names
from felixpy.kernel.netlink import KernelRoute, NetlinkError
from felixpy.kernel.tunnels import FdbEntry, NeighEntry, ParentLink, TunnelLink

class FakeNetlink:
    """Keeps routes the way the kernel does (keyed by table, dst, metric) and fails on demand."""

    def __init__(self, links: dict[str, int] | None = None) -> None:
        self.links: dict[str, int] = dict(links or {})
        self.routes: dict[tuple[int, str, int], KernelRoute] = {}
        self.fail_next: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    # -- test helpers -------------------------------------------------------------------------
    def add_link(self, name: str, index: int) -> None:
        self.links[name] = index

    def remove_link(self, name: str) -> None:
        index = self.links.pop(name)
        # The kernel drops every route through a deleted device.
        self.routes = {k: r for k, r in self.routes.items() if r.ifindex != index}

    def ours(self) -> dict[str, KernelRoute]:
        return {r.dst: r for r in self.routes.values() if r.proto == names.ROUTE_PROTO}

    def mutating_calls(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in ("add_route", "replace_route", "delete_route")]

    def _maybe_fail(self, op: str, target: str) -> None:
        self.calls.append((op, target))
        if op in self.fail_next:
            self.fail_next.discard(op)
            raise NetlinkError(op, target, errno.EIO, "injected failure")

    def _check_dev(self, route: KernelRoute) -> None:
        if route.ifindex is not None and route.ifindex not in self.links.values():
            raise NetlinkError("route", route.dst, errno.ENODEV, "no such device")

    # -- RouteNetlink ---------------------------------------------------------------------------
    def link_index(self, name: str) -> int | None:
        self._maybe_fail("link_index", name)
        return self.links.get(name)

    def list_routes(self, *, proto: int, table: int = 254) -> list[KernelRoute]:
        self._maybe_fail("list_routes", str(proto))
        return [r for r in self.routes.values() if r.proto == proto and r.table == table]

    def add_route(self, route: KernelRoute) -> None:
        self._maybe_fail("add_route", route.dst)
        self._check_dev(route)
        key = (route.table, route.dst, route.priority)
        if key in self.routes:
            raise NetlinkError("route add", route.dst, errno.EEXIST, "file exists")
        self.routes[key] = route

    def replace_route(self, route: KernelRoute) -> None:
        self._maybe_fail("replace_route", route.dst)
        self._check_dev(route)
        self.routes[(route.table, route.dst, route.priority)] = route

    def delete_route(self, route: KernelRoute) -> None:
        self._maybe_fail("delete_route", route.dst)
        key = (route.table, route.dst, route.priority)
        found = self.routes.get(key)
        if found is None or found.proto != route.proto:
            raise NetlinkError("route del", route.dst, errno.ESRCH, "no such process")
        del self.routes[key]


class FakeTunnelKernel:
    """Links, addresses, FDB and neighbours of one namespace; `calls` records every write."""

    def __init__(self, *, ipip_module: bool = True, fallback_tunl0: bool = False) -> None:
        self.parents = {"192.0.2.11": ParentLink("eth0", 2, 1500)}
        self.links: dict[str, TunnelLink] = {}
        self.fdb: dict[int, set[FdbEntry]] = {}
        self.neigh: dict[int, set[NeighEntry]] = {}
        self.ipip_module = ipip_module
        self.calls: list[str] = []
        self._next = 10
        if fallback_tunl0:
            self._add(TunnelLink("tunl0", 0, "ipip", "", 1480, False, frozenset()))

    def _add(self, link: TunnelLink) -> None:
        self._next += 1
        self.links[link.name] = replace(link, index=self._next)
        self.fdb[self._next], self.neigh[self._next] = set(), set()

    def _by_index(self, index: int) -> TunnelLink:
        return next(link for link in self.links.values() if link.index == index)

    def _update(self, index: int, **changes: object) -> None:
        link = self._by_index(index)
        self.links[link.name] = replace(link, **changes)  # type: ignore[arg-type]

    def get_link(self, name: str) -> TunnelLink | None:
        return self.links.get(name)

    def parent_of(self, ip: str) -> ParentLink | None:
        return self.parents.get(ip)

    def create_vxlan(self, name: str, *, vni: int, port: int, parent: int, local: str, mac: str, mtu: int) -> None:
        self.calls.append(f"create {name}")
        self._add(TunnelLink(name, 0, "vxlan", mac, mtu, False, frozenset(), vni, port, local, parent, False))

    def create_ipip(self, name: str) -> None:
        self.calls.append(f"create {name}")
        if not self.ipip_module:
            raise NetlinkError("link add", f"{name} type ipip", errno.EOPNOTSUPP, "EOPNOTSUPP")
        self._add(TunnelLink(name, 0, "ipip", "", 1480, False, frozenset()))

    def delete_link(self, index: int) -> None:
        self.calls.append(f"delete {index}")
        del self.links[self._by_index(index).name]

    def set_link(self, index: int, *, mac: str | None = None, mtu: int | None = None, up: bool | None = None) -> None:
        self.calls.append(f"set {index} mac={mac} mtu={mtu} up={up}")
        link = self._by_index(index)
        self._update(index, mac=mac or link.mac, mtu=mtu or link.mtu, up=link.up if up is None else up)

    def add_address(self, index: int, cidr: str) -> None:
        self.calls.append(f"addr add {cidr}")
        self._update(index, addresses=self._by_index(index).addresses | {cidr})

    def delete_address(self, index: int, cidr: str) -> None:
        self.calls.append(f"addr del {cidr}")
        self._update(index, addresses=self._by_index(index).addresses - {cidr})

    def list_fdb(self, index: int) -> set[FdbEntry]:
        return set(self.fdb[index])

    def add_fdb(self, index: int, entry: FdbEntry) -> None:
        self.calls.append(f"fdb add {entry.mac} {entry.dst}")
        self.fdb[index].add(entry)

    def delete_fdb(self, index: int, entry: FdbEntry) -> None:
        self.calls.append(f"fdb del {entry.mac} {entry.dst}")
        self.fdb[index].discard(entry)

    def list_neigh(self, index: int) -> set[NeighEntry]:
        return set(self.neigh[index])

    def replace_neigh(self, index: int, entry: NeighEntry) -> None:
        self.calls.append(f"neigh {entry.ip} {entry.mac}")
        self.neigh[index] = {e for e in self.neigh[index] if e.ip != entry.ip} | {entry}

    def delete_neigh(self, index: int, entry: NeighEntry) -> None:
        self.calls.append(f"neigh del {entry.ip}")
        self.neigh[index].discard(entry)
