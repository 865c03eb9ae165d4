"""RouteManager: desired routes from the calc graph, merged with BGP-learned ones → the RouteTable driver.

The calc graph's routes (local pods, our blackholed blocks, datastore routes to other nodes) always
win: a learned route to a destination the calc graph routes itself is dropped, so BGP can never
override a local pod route or one of our own blocks (a more specific learned /32 inside our block,
a pod borrowed by another node, is kept). Learned routes whose next hop is this node are dropped.
Every route carries the same `proto` (names.ROUTE_PROTO), learned ones included.

Routes through a tunnel device that is not usable (TunnelDevices: not wanted, no parent interface
yet, or tunl0 on a kernel without IPIP) are left out before the merge rather than retried forever
by the driver; a learned route may then take their place.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

from felixpy.dataplane.drivers.routes import RouteTable
from felixpy.messages import CalcRoutes, LearnedRoutes, Message, Route, TunnelDevices

log = logging.getLogger(__name__)


def merge_learned(own: Iterable[Route], learned: Mapping[str, str],
                  local_ips: frozenset[str] = frozenset()) -> frozenset[Route]:
    """`own` plus a route via the next hop for every learned prefix `own` has no route for."""
    merged = set(own)
    taken = {r.dst for r in merged}
    for prefix, next_hop in learned.items():
        if prefix in taken or next_hop in local_ips:
            continue
        merged.add(Route(prefix, gateway=next_hop))
    return frozenset(merged)


class RouteManager:
    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._own: frozenset[Route] = frozenset()
        self._learned = LearnedRoutes({})
        self._blocked: frozenset[str] = frozenset()
        self._desired: frozenset[Route] = frozenset()
        self._stale = True  # an input changed: recompute the merge before the next hand-over
        self._first = True

    def on_update(self, message: Message) -> None:
        if isinstance(message, CalcRoutes):
            self._own = message.routes
        elif isinstance(message, LearnedRoutes):
            self._learned = message
        elif isinstance(message, TunnelDevices):
            if message.blocked == self._blocked:
                return  # sent after every links apply; usually nothing changed
            self._blocked = message.blocked
        else:
            return
        self._stale = True

    def complete_deferred_work(self) -> None:
        if not self._stale:
            return
        self._stale = False
        own = [r for r in self._own if r.iface not in self._blocked] if self._blocked else self._own
        desired = merge_learned(own, self._learned.routes, self._learned.local_ips)
        if desired != self._desired or self._first:
            self._desired = desired
            self._first = False
            self._table.set_routes(desired)

    @property
    def desired(self) -> frozenset[Route]:
        return self._desired
