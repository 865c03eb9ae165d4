"""The route driver: owns every route carrying names.ROUTE_PROTO in the main routing table.

API model: `set_routes()` declares the whole desired set of `messages.Route` values (no I/O),
`apply()` reconciles the kernel with it, `queue_resync()` makes the next apply read everything
back first. `programmed` maps each destination to the desired Route the kernel is known to hold
(after an add, a replace, or a read-back that found it): a route is programmed exactly when it
equals the value there.

Design: we remember what we programmed (`_programmed`, dst -> routes of our proto there) and
trust it between resyncs, so an apply after a small change costs only the netlink requests for
the destinations that changed. The kernel is read back on the first apply, after a
`queue_resync()` (periodic drift repair) and after any failed request. Only routes with our proto
are ever replaced or deleted; a route of another proto at a destination we want makes our add
fail (EEXIST) and is reported, never overwritten. A route whose interface does not exist yet is
left pending and retried on every apply.

Routes written by the CNI path: Calico's CNI plugin writes a new pod's /32 itself and Felix owns
it from then on; felixpy's does the same (kernel/veth.add_host_routes, with `kernel_route`'s
value and our proto) and hands the route to `adopt()` before the pod's WorkloadEndpoint exists.
The driver records it as programmed, so the apply that brings the endpoint finds it already right
and writes nothing. Until the endpoint arrives the route is held: not deleted as unwanted for the
hold time the CNI path gives (its ADD deadline); a route whose ADD failed is gone with its veth,
and otherwise removed like any unwanted route of ours once the hold ends.

Thread ownership: the agent's main loop; the netlink object belongs to that thread too.
"""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable, Iterable, Mapping

from felixpy import names
from felixpy.kernel.netlink import (
    SCOPE_LINK,
    SCOPE_UNIVERSE,
    KernelRoute,
    NetlinkError,
    RouteNetlink,
)
from felixpy.messages import Route

__all__ = ["ApplyResult", "RouteTable", "kernel_route"]

log = logging.getLogger(__name__)


def kernel_route(want: Route, ifindex: int | None, proto: int = names.ROUTE_PROTO) -> KernelRoute:
    """The kernel form of a desired route: what the driver writes, and what the CNI path writes
    for a pod's /32 before the driver owns it (so the driver finds it already right)."""
    scope = SCOPE_LINK if want.type == "unicast" and not want.gateway else SCOPE_UNIVERSE
    return KernelRoute(
        dst=want.dst, type=want.type, gateway=want.gateway, ifindex=ifindex,
        onlink=want.onlink, scope=scope, proto=proto,
    )


@dataclass(frozen=True)
class ApplyResult:
    """What one apply() did. `pending`: dsts waiting for their iface; `failed`: dst -> error."""

    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    deleted: tuple[str, ...] = ()
    pending: tuple[str, ...] = ()
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.deleted)


class RouteTable:
    """Reconciles the kernel's main-table routes of one proto with a declared desired set."""

    def __init__(self, *, netlink: RouteNetlink | None = None, proto: int = names.ROUTE_PROTO,
                 observe_read_back: Callable[[float], None] | None = None) -> None:
        if netlink is None:
            from felixpy.kernel.netlink import Netlink

            netlink = Netlink()
        self._nl = netlink
        self._proto = proto
        self._desired: dict[str, Route] = {}
        self._programmed: dict[str, list[KernelRoute]] = {}
        self._dirty: set[str] = set()  # dsts whose desired state changed since the last apply
        self._retry: set[str] = set()  # pending (iface missing) or failed dsts
        self._in_kernel: dict[str, Route] = {}  # dst -> the desired route the kernel holds there
        self._resync = True  # the first apply reads back (and sweeps what is no longer desired)
        self._held: dict[str, float] = {}  # dst -> monotonic deadline: adopted, not yet desired
        # dst -> (interface name, index) the CNI path wrote the adopted route through: the apply
        # that brings the pod's endpoint needs no link lookup to find that route right.
        self._adopted_link: dict[str, tuple[str, int]] = {}
        self.observe_read_back = observe_read_back  # seconds of each full listing (metrics)

    @property
    def desired(self) -> dict[str, Route]:
        return dict(self._desired)

    @property
    def programmed(self) -> Mapping[str, Route]:
        """dst -> the desired route the kernel is known to hold there (read-only view)."""
        return MappingProxyType(self._in_kernel)

    def set_routes(self, routes: Iterable[Route]) -> None:
        """Declare the complete desired set. Cheap: only records which dsts changed."""
        new: dict[str, Route] = {}
        for route in routes:
            if route.dst in new and new[route.dst] != route:
                raise ValueError(
                    f"two desired routes for {route.dst}: {new[route.dst].describe()} and "
                    f"{route.describe()}"
                )
            new[route.dst] = route
        for dst in new.keys() | self._desired.keys():
            if new.get(dst) != self._desired.get(dst):
                self._dirty.add(dst)
        self._desired = new

    def queue_resync(self) -> None:
        self._resync = True

    def adopt(self, routes: Iterable[KernelRoute], hold: float, iface: str | None = None) -> None:
        """Routes of our proto another writer has just put in the kernel (the CNI path, a pod's /32).

        Recorded as what the kernel holds and reconciled on the next apply: kept when desired,
        left alone for `hold` seconds while not desired yet (see the module docstring).
        iface: the name of the interface the routes' ifindex is (the pod's host veth); the first
        reconcile of a route then takes the index from here instead of asking the kernel.
        """
        deadline = time.monotonic() + hold
        for route in routes:
            if route.proto != self._proto:
                raise ValueError(f"route {route.describe()} is not ours to adopt (proto {self._proto})")
            others = [r for r in self._programmed.get(route.dst, []) if r.priority != route.priority]
            self._programmed[route.dst] = others + [route]
            self._held[route.dst] = deadline
            if iface is not None and route.ifindex is not None:
                self._adopted_link[route.dst] = (iface, route.ifindex)
            else:
                self._adopted_link.pop(route.dst, None)
            self._dirty.add(route.dst)

    def apply(self) -> ApplyResult:
        if self._resync:
            try:
                self._read_back()
            except NetlinkError as exc:
                log.warning("route read-back failed error=%s", exc)
                return ApplyResult(failed={"*": str(exc)})
            todo = set(self._desired) | set(self._programmed)
        else:
            todo = self._dirty | self._retry
        self._dirty = set()
        self._retry = set()
        plan = _Plan()
        iface_index: dict[str, int | None] = {}
        for dst in sorted(todo):
            self._reconcile(dst, plan, iface_index)
        result = plan.result()
        if result.changed or result.failed or result.pending:
            log.info(
                "routes applied added=%d replaced=%d deleted=%d pending=%d failed=%d",
                len(result.added), len(result.replaced), len(result.deleted),
                len(result.pending), len(result.failed),
            )
        return result

    def _read_back(self) -> None:
        started = time.monotonic()
        programmed: dict[str, list[KernelRoute]] = {}
        for route in self._nl.list_routes(proto=self._proto):
            programmed.setdefault(route.dst, []).append(route)
        if self.observe_read_back is not None:
            self.observe_read_back(time.monotonic() - started)
        self._programmed = programmed
        self._resync = False
        log.debug("routes read back count=%d", sum(len(v) for v in programmed.values()))

    def _reconcile(self, dst: str, plan: _Plan, iface_index: dict[str, int | None]) -> None:
        want = self._desired.get(dst)
        self._in_kernel.pop(dst, None)  # until this pass confirms it again
        have = list(self._programmed.get(dst, []))
        held_until = self._held.pop(dst, None)
        adopted_link = self._adopted_link.pop(dst, None)
        if want is None:
            if held_until is not None and time.monotonic() < held_until and have:
                self._held[dst] = held_until  # its endpoint is on its way: keep it
                if adopted_link is not None:
                    self._adopted_link[dst] = adopted_link
                plan.pending.append(dst)
                self._retry.add(dst)
                return
            for route in have:
                if self._delete(route, plan):
                    have.remove(route)
            self._store(dst, have)
            return
        ifindex: int | None = None
        if want.iface is not None:
            if adopted_link is not None and adopted_link[0] == want.iface and want.iface not in iface_index:
                # Written through that interface by the CNI path moments ago (its veth going
                # would have taken the route along, and its endpoint with it).
                iface_index[want.iface] = adopted_link[1]
            if want.iface not in iface_index:
                try:
                    iface_index[want.iface] = self._nl.link_index(want.iface)
                except NetlinkError as exc:
                    self._fail(dst, plan, exc)
                    return
            ifindex = iface_index[want.iface]
            if ifindex is None:
                # Left as it is (whatever we had there) until the interface appears.
                plan.pending.append(dst)
                self._retry.add(dst)
                return
        target = self._to_kernel(want, ifindex)
        keep = next((r for r in have if _matches(r, target)), None)
        for route in list(have):
            if route is keep or (keep is None and route.priority == target.priority):
                continue  # kept, or about to be replaced in place
            if self._delete(route, plan):
                have.remove(route)
        if keep is not None:
            self._store(dst, have)
            self._in_kernel[dst] = want
            return
        replacing = any(r.priority == target.priority for r in have)
        try:
            if replacing:
                self._nl.replace_route(target)
            else:
                self._nl.add_route(target)
        except NetlinkError as exc:
            if exc.errno == errno.ENODEV:
                plan.pending.append(dst)  # the iface vanished since we looked it up
                self._retry.add(dst)
                return
            if exc.errno == errno.EEXIST:
                # Not ours (we would have replaced it): leave it, report it, retry next time.
                log.warning("route conflicts with a foreign route dst=%s route=%s", dst,
                            want.describe())
                plan.failed[dst] = f"{exc}: a route of another proto exists for {dst}"
                self._retry.add(dst)  # no read-back needed: our own picture is still right
                return
            self._fail(dst, plan, exc)
            return
        (plan.replaced if replacing else plan.added).append(dst)
        self._store(dst, [r for r in have if r.priority != target.priority] + [target])
        self._in_kernel[dst] = want

    def _to_kernel(self, want: Route, ifindex: int | None) -> KernelRoute:
        return kernel_route(want, ifindex, self._proto)

    def _delete(self, route: KernelRoute, plan: _Plan) -> bool:
        try:
            self._nl.delete_route(route)
        except NetlinkError as exc:
            if exc.errno != errno.ESRCH:
                self._fail(route.dst, plan, exc)
                return False
        plan.deleted.append(route.dst)
        return True

    def _fail(self, dst: str, plan: _Plan, exc: NetlinkError) -> None:
        log.warning("route programming failed dst=%s error=%s", dst, exc)
        plan.failed[dst] = str(exc)
        self._retry.add(dst)
        # Our picture of the kernel may be wrong now: read it back on the next apply.
        self._resync = True

    def _store(self, dst: str, routes: list[KernelRoute]) -> None:
        if routes:
            self._programmed[dst] = routes
        else:
            self._programmed.pop(dst, None)


def _matches(have: KernelRoute, want: KernelRoute) -> bool:
    return (
        have.type == want.type
        and have.gateway == want.gateway
        # ifindex None: we let the kernel pick the device, whatever it picked is fine.
        and (want.ifindex is None or have.ifindex == want.ifindex)
        and have.onlink == want.onlink
        and have.scope == want.scope
        and have.priority == want.priority
        and have.table == want.table
    )


@dataclass
class _Plan:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    def result(self) -> ApplyResult:
        return ApplyResult(
            added=tuple(self.added), replaced=tuple(self.replaced), deleted=tuple(self.deleted),
            pending=tuple(self.pending), failed=dict(self.failed),
        )
