"""The dispatcher: every datastore update decoded once, then fanned out to the handlers of its kind.

Go Felix's calculation graph starts the same way (a validation filter, then dispatchers that
route each update by its key's type). Consumers do not parse keys or stored JSON themselves:
each registers a handler per kind it cares about (`register_with(dispatcher)`) and receives
`Update`s whose value is already decoded, or None when the resource was deleted or is invalid
(calc/updates.py says what invalid means; it is decided and logged there, once). Kinds nobody
registered for are not decoded at all (IPAM handles, ...).

The agent's wiring (node/agent.py):

    Syncer ── KVUpdate(key, value|None, revision) ──► Dispatcher.on_update
                                                        │ updates.decode: key → kind, name, namespace
                                                        │                 value → typed value | None
        ┌───────────────────────────────────────────────┘
        ├─ IPPool ──────────────► CalcGraph          pools: modes, natOutgoing → routes, nat(), encap()
        ├─ Node ────────────────┬► CalcGraph          node IPs, subnets, VTEPs, this node's labels
        │                       └► BGPResources       peering (BGP controller, backend "bird")
        ├─ BlockAffinity ───────► CalcGraph          blackholes, routes to other nodes' blocks
        ├─ WorkloadEndpoint ────┬► CalcGraph          local pod routes, borrowed /32s
        │                       ├► PolicyCalc         endpoints, ipset members
        │                       └► Agent              revisions, for the CNI server's endpoint waiter
        ├─ Profile ─────────────► PolicyCalc         profiles, namespace labels
        ├─ NetworkPolicy ───────► PolicyCalc
        ├─ GlobalNetworkPolicy ─► PolicyCalc
        ├─ BGPConfiguration ────► BGPResources
        ├─ BGPPeer ─────────────► BGPResources
        ├─ FelixConfiguration ──► ConfigWatch        default, node.<name>: restart on a change
        ├─ ClusterInformation ──► ConfigWatch        datastoreReady: the migration lock
        └─ IPAMBlock ───────────► IPAMUsage          felixpy_ipam_* metrics

Handlers run in registration order, synchronously, on the agent's main loop; they index and mark
themselves dirty, and do no I/O.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

from felixpy.calc.updates import Kind, Update, decode
from felixpy.datastore.syncer import KVUpdate

Handler = Callable[[Update[Any]], None]


class Registrant(Protocol):
    """A consumer of updates: registers its handlers, one per kind it reads."""

    def register_with(self, dispatcher: Dispatcher) -> None: ...


class Dispatcher:
    def __init__(self, *consumers: Registrant) -> None:
        self._handlers: dict[Kind, list[Handler]] = {}
        for consumer in consumers:
            consumer.register_with(self)

    def register(self, kind: Kind, handler: Handler) -> None:
        self._handlers.setdefault(kind, []).append(handler)

    def on_update(self, update: KVUpdate) -> None:
        typed = decode(update, self._handlers)
        if typed is None:
            return
        for handler in self._handlers[typed.kind]:
            handler(typed)

    def on_updates(self, updates: Iterable[KVUpdate]) -> None:
        for update in updates:
            self.on_update(update)
