"""Typed netlink calls the route driver needs: dump our routes, add / replace / delete one, look up links.

A thin layer over pyroute2's IPRoute so that the driver works with frozen values (`KernelRoute`)
and one exception type (`NetlinkError`) that says what was attempted, and so that tests can swap
in a stateful fake behind the `RouteNetlink` protocol.

Thread ownership: a `Netlink` object belongs to the thread that created it (pyroute2 0.9 keeps
per-thread sockets and event loops); the agent's main loop owns the route driver's instance.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError as _PyNetlinkError

__all__ = [
    "MAIN_TABLE",
    "SCOPE_LINK",
    "SCOPE_UNIVERSE",
    "KernelRoute",
    "Netlink",
    "NetlinkError",
    "RouteNetlink",
    "attempt",
]

log = logging.getLogger(__name__)

MAIN_TABLE = 254
SCOPE_UNIVERSE = 0
SCOPE_LINK = 253
RTNH_F_ONLINK = 4

_RTN_NAMES = {1: "unicast", 2: "local", 3: "broadcast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
_RTN_NUMBERS = {name: number for number, name in _RTN_NAMES.items()}


class NetlinkError(Exception):
    """A netlink request failed. `op` and `target` say what was attempted, `errno` why."""

    def __init__(self, op: str, target: str, err: int, message: str) -> None:
        self.op = op
        self.target = target
        self.errno = err
        super().__init__(f"netlink {op} {target} failed: {message} (errno {err})")


@contextmanager
def attempt(op: str, target: str) -> Iterator[None]:
    """Turn pyroute2 / OS errors raised inside the block into one NetlinkError naming the request."""
    try:
        yield
    except NetlinkError:
        raise
    except _PyNetlinkError as exc:
        raise NetlinkError(op, target, exc.code, _strerror(exc.code)) from None
    except OSError as exc:
        code = exc.errno or 0
        raise NetlinkError(op, target, code, exc.strerror or _strerror(code)) from None


def _strerror(code: int) -> str:
    try:
        return errno.errorcode[code]
    except KeyError:
        return "unknown error"


@dataclass(frozen=True)
class KernelRoute:
    """One route as the kernel stores it (IPv4). `ifindex` None means "let the kernel choose"."""

    dst: str  # normalised CIDR, "10.0.0.0/26"
    type: str = "unicast"  # "unicast" | "blackhole" | other kernel types when read back
    gateway: str | None = None
    ifindex: int | None = None
    onlink: bool = False
    scope: int = SCOPE_UNIVERSE
    proto: int = 0
    priority: int = 0  # the metric; part of the kernel's identity of a route
    table: int = MAIN_TABLE

    def describe(self) -> str:
        parts = [self.dst if self.type == "unicast" else f"{self.type} {self.dst}"]
        if self.gateway:
            parts.append(f"via {self.gateway}")
        if self.ifindex is not None:
            parts.append(f"ifindex {self.ifindex}")
        if self.onlink:
            parts.append("onlink")
        parts.append(f"proto {self.proto}")
        if self.priority:
            parts.append(f"metric {self.priority}")
        return " ".join(parts)


class RouteNetlink(Protocol):
    """What the route driver needs from the kernel (real: `Netlink`; tests: a stateful fake)."""

    def link_index(self, name: str) -> int | None: ...

    def list_routes(self, *, proto: int, table: int = MAIN_TABLE) -> list[KernelRoute]: ...

    def add_route(self, route: KernelRoute) -> None: ...

    def replace_route(self, route: KernelRoute) -> None: ...

    def delete_route(self, route: KernelRoute) -> None: ...


def get_link_message(ipr: IPRoute, name: str) -> Any | None:
    """The kernel's link message for an interface name, or None when there is no such link."""
    try:
        with attempt("link get", name):
            msgs = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.errno in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return msgs[0] if msgs else None


class Netlink:
    """The real RouteNetlink: one pyroute2 IPRoute socket in the current thread's network namespace."""

    def __init__(self, ipr: IPRoute | None = None, rtnl_sock: socket.socket | None = None) -> None:
        """ipr: an IPRoute (in some namespace); None creates one here. rtnl_sock: a NETLINK_ROUTE
        socket in the same namespace for link lookups; created here too when ipr is None. Without
        one, links are looked up through pyroute2."""
        from felixpy.kernel.rtnl import Rtnl  # rtnl imports this module's values

        # groups=0: we never read multicast events, so do not let the kernel queue them for us.
        self._ipr = ipr if ipr is not None else IPRoute(groups=0)
        # Link lookups over raw rtnetlink: pyroute2 costs ~1.5 ms a lookup on this VM, the raw
        # socket a few microseconds, and a full route resync looks up every pod's veth.
        self._rtnl = Rtnl(rtnl_sock) if rtnl_sock is not None or ipr is None else None

    def close(self) -> None:
        self._ipr.close()
        if self._rtnl is not None:
            self._rtnl.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def link_index(self, name: str) -> int | None:
        if self._rtnl is not None:
            link = self._rtnl.link(name)
            return link.index if link is not None else None
        msg = get_link_message(self._ipr, name)
        return int(msg["index"]) if msg is not None else None

    def link_exists(self, name: str) -> bool:
        return self.link_index(name) is not None

    def list_routes(self, *, proto: int, table: int = MAIN_TABLE) -> list[KernelRoute]:
        with attempt("route dump", f"table {table} proto {proto}"):
            msgs = list(self._ipr.route("dump", table=table, proto=proto, family=2))
        routes = []
        for msg in msgs:
            # Filtering in the kernel needs strict checking; filter again so both paths agree.
            if msg["proto"] != proto or _table_of(msg) != table:
                continue
            routes.append(_from_message(msg))
        return routes

    def add_route(self, route: KernelRoute) -> None:
        with attempt("route add", route.describe()):
            self._ipr.route("add", **_to_request(route))

    def replace_route(self, route: KernelRoute) -> None:
        with attempt("route replace", route.describe()):
            self._ipr.route("replace", **_to_request(route))

    def delete_route(self, route: KernelRoute) -> None:
        with attempt("route delete", route.describe()):
            self._ipr.route("del", **_to_request(route))


def _table_of(msg: Any) -> int:
    table = msg.get_attr("RTA_TABLE")
    return int(table if table is not None else msg["table"])


def _from_message(msg: Any) -> KernelRoute:
    dst = msg.get_attr("RTA_DST") or "0.0.0.0"
    oif = msg.get_attr("RTA_OIF")
    return KernelRoute(
        dst=str(ipaddress.IPv4Network(f"{dst}/{msg['dst_len']}", strict=False)),
        type=_RTN_NAMES.get(msg["type"], f"type{msg['type']}"),
        gateway=msg.get_attr("RTA_GATEWAY"),
        ifindex=int(oif) if oif is not None else None,
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        scope=int(msg["scope"]),
        proto=int(msg["proto"]),
        priority=int(msg.get_attr("RTA_PRIORITY") or 0),
        table=_table_of(msg),
    )


def _to_request(route: KernelRoute) -> dict[str, Any]:
    req: dict[str, Any] = {
        "dst": route.dst,
        "table": route.table,
        "proto": route.proto,
        "scope": route.scope,
        "type": _RTN_NUMBERS.get(route.type, 1),
    }
    if route.priority:
        req["priority"] = route.priority
    if route.gateway:
        req["gateway"] = route.gateway
    if route.ifindex is not None:
        req["oif"] = route.ifindex
    if route.onlink:
        req["flags"] = RTNH_F_ONLINK
    return req
