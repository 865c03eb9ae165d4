"""RouteManager: desired routes from the calc graph → the RouteTable driver."""

from __future__ import annotations

from typing import Iterable

from felixpy.dataplane.drivers.routes import Route, RouteTable
from felixpy.messages import RouteSpec


class RouteManager:
    def __init__(self, table: RouteTable) -> None:
        self._table = table
        self._desired: frozenset[RouteSpec] = frozenset()
        self._dirty = True

    def on_routes(self, routes: Iterable[RouteSpec]) -> None:
        """Record the whole desired set; no I/O."""
        desired = frozenset(routes)
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
