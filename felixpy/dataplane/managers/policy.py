"""PolicyManager: the policy chains and jump rules of the filter, mangle and raw tables, and the
policy ipsets, as desired state.

The calc side (calc/policy.py) hands over everything policy should hold as one FilterState:
per table (filter; mangle for preDNAT and DNAT'd host output; raw for doNotTrack) the chains by
name and the jump rules at the top of the built-in chains, and the ipsets with their members.
This manager turns that into driver calls — `Table.update_chain` only for chains that changed,
`remove_chain` for chains no longer wanted, `set_jump_rules`, `IPSets.set_members` /
`remove_set` — and does no I/O itself: the agent applies the drivers in dependency order
(ipsets, then the tables, then ipset deletions).

One PolicyManager per IP family: the IPv4 one drives iptables and the cali40 sets, the IPv6 one
(ip_version 6) ip6tables and the cali60 sets, each taking only its family's FilterState.

Changes are found by identity first: the calc memoises rendering by value, so an unchanged chain
is the same object as last time and the diff over thousands of chains costs microseconds each.
"""

from __future__ import annotations

from typing import Mapping

from felixpy.dataplane.drivers.ipsets import IPSets, SetType
from felixpy.dataplane.drivers.iptables import Table
from felixpy.messages import FilterState, Message
from policy.iptables import Chain, Rule


class _TableDiff:
    """What was last handed to one Table driver, to hand it only the differences."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self._chains: dict[str, Chain] = {}
        self._jumps: dict[str, tuple[Rule, ...]] = {}

    def update(self, chains: Mapping[str, Chain], jumps: Mapping[str, tuple[Rule, ...]]) -> None:
        for name, chain in chains.items():
            old_chain = self._chains.get(name)
            if old_chain is not chain and old_chain != chain:
                self.table.update_chain(chain)
                self._chains[name] = chain
        for name in [n for n in self._chains if n not in chains]:
            self.table.remove_chain(name)
            del self._chains[name]
        for builtin in set(jumps) | set(self._jumps):
            rules = tuple(jumps.get(builtin, ()))
            if self._jumps.get(builtin) != rules:
                self.table.set_jump_rules(builtin, rules)
                if rules:
                    self._jumps[builtin] = rules
                else:
                    self._jumps.pop(builtin, None)


class PolicyManager:
    def __init__(self, filter_table: Table, ipsets: IPSets, *, mangle_table: Table | None = None,
                 raw_table: Table | None = None, ip_version: int = 4) -> None:
        self.ip_version = ip_version
        self._filter = _TableDiff(filter_table)
        # Without mangle / raw drivers (tests that only fake the filter table) their chains are
        # not written anywhere.
        self._mangle = _TableDiff(mangle_table) if mangle_table is not None else None
        self._raw = _TableDiff(raw_table) if raw_table is not None else None
        self._ipsets = ipsets
        self._sets: dict[str, tuple[str, frozenset[str]]] = {}
        self._pending: FilterState | None = None

    def on_update(self, message: Message) -> None:
        """Record the whole desired state; the driver calls happen in complete_deferred_work."""
        if isinstance(message, FilterState) and message.ip_version == self.ip_version:
            self._pending = message

    def complete_deferred_work(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        # ipsets first in the data flow too: a new chain may reference a new set.
        for name, value in state.ipsets.items():
            wanted = (value.type, value.members)
            old = self._sets.get(name)
            if old is None or (old[1] is not wanted[1] and old != wanted):
                self._ipsets.set_members(name, _set_type(value.type), value.members)
                self._sets[name] = wanted
        for name in [n for n in self._sets if n not in state.ipsets]:
            self._ipsets.remove_set(name)
            del self._sets[name]
        self._filter.update(state.chains, state.jumps)
        if self._mangle is not None:
            self._mangle.update(state.mangle.chains, state.mangle.jumps)
        if self._raw is not None:
            self._raw.update(state.raw.chains, state.raw.jumps)


def _set_type(text: str) -> SetType:
    if text == "hash:net":
        return "hash:net"
    if text == "hash:ip,port":
        return "hash:ip,port"
    if text == "hash:ip":
        return "hash:ip"
    raise ValueError(f"unsupported ipset type {text!r}")
