"""RouteManager: desired routes from the calc graph, merged with BGP-learned ones → the RouteTable driver.

The calc graph's routes (local pods, our blackholed blocks, datastore routes to other nodes) always
win: a learned route to a destination the calc graph routes itself is dropped, so BGP can never
override a local pod route or one of our own blocks (a more specific learned /32 inside our block,
a pod borrowed by another node, is kept). Learned routes whose next hop is this node are dropped.
Every route carries the same `proto` (names.ROUTE_PROTO), learned ones included.
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

from felixpy.dataplane.drivers.routes import Route, RouteTable
from felixpy.messages import RouteSpec

log = logging.getLogger(__name__)


def merge_learned(own: frozenset[RouteSpec], learned: Mapping[str, str],
                  local_ips: frozenset[str] = frozenset()) -> frozenset[RouteSpec]:
    """`own` plus a route via the next hop for every learned prefix `own` has no route for."""
    taken = {r.dst for r in own}
    merged = set(own)
    for prefix, next_hop in learned.items():
        if prefix in taken or next_hop in local_ips:
            continue
        merged.add(RouteSpec(prefix, gateway=next_hop))
    return frozenset(merged)


class RouteManager:
    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._own: frozenset[RouteSpec] = frozenset()
        self._learned: dict[str, str] = {}
        self._local_ips: frozenset[str] = frozenset()
        self._desired: frozenset[RouteSpec] = frozenset()
        self._dirty = True

    def on_routes(self, routes: Iterable[RouteSpec]) -> None:
        """Record the calc graph's whole desired set; no I/O."""
        self._own = frozenset(routes)
        self._recompute()

    def on_learned(self, routes: Mapping[str, str], *, local_ips: Iterable[str] = ()) -> None:
        """Record the BGP routes (prefix → next hop) to merge in; no I/O."""
        self._learned = dict(routes)
        self._local_ips = frozenset(local_ips)
        self._recompute()

    def _recompute(self) -> None:
        desired = merge_learned(self._own, self._learned, self._local_ips)
        if desired != self._desired:
            self._desired = desired
            self._dirty = True

    def complete_deferred_work(self) -> None:
        if self._dirty:
            self._table.set_routes(
                Route(dst=r.dst, type=r.type, gateway=r.gateway, iface=r.iface, onlink=r.onlink)
                for r in self._desired
            )
            self._dirty = False

    @property
    def desired(self) -> frozenset[RouteSpec]:
        return self._desired
