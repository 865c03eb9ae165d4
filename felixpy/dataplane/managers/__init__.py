"""Dataplane managers: the calc's messages in, driver calls out, no I/O of their own.

Every manager has the same two methods (Go Felix's Manager interface): `on_update(message)`
records a message from felixpy/messages.py when it is one the manager handles (and ignores the
others), `complete_deferred_work()` turns what changed into calls on its drivers (which do the
I/O later, in the agent's apply order). The agent sends every message to every manager.

    RouteManager   CalcRoutes, LearnedRoutes, TunnelDevices  →  RouteTable
    TunnelManager  EncapState                                →  TunnelLinks
    MasqManager    NatState                                  →  nat Table, IPSets
    PolicyManager  FilterState                               →  filter Table, IPSets
"""

from __future__ import annotations

from typing import Protocol

from felixpy.messages import Message


class Manager(Protocol):
    def on_update(self, message: Message) -> None:
        """Record the message's desired state if this manager handles it; no I/O."""

    def complete_deferred_work(self) -> None:
        """Hand what changed since the last call to the drivers; no I/O, idempotent."""
