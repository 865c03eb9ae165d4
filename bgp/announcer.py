"""Turn "what each peer should carry" into the fewest ExaBGP API commands, and remember what was sent.

The agent knows, per configured session, the prefixes it should announce there and with which
attributes (bgp.advertise). ExaBGP keeps a per-neighbour adj-RIB-out that API commands edit: a
command without a neighbour selector goes to every configured neighbour, `neighbor A , neighbor B
announce …` to those named. So the plan per batch is:

- per peer, diff desired against what was sent: prefixes to withdraw, prefixes to (re)announce
  with new attributes;
- group the changes by attributes and by the set of peers they concern; a group that concerns
  every configured peer is sent without a selector (the common case: no BGPFilter, every session
  carries the same routes, exactly one command per 500 prefixes as before);
- a peer that comes up (`eor`) is refreshed on its own: everything announced on this connection
  that it should not have is withdrawn to it, everything it should have is announced to it, then
  our End-of-RIB (neighbours use manual-eor, exabgp-notes gotcha 6);
- a peer whose selected command failed (`forget`) is not trusted any more until its next refresh:
  ExaBGP answers `error` for a selector that names a neighbour it does not have yet (a reload
  still to come), and that peer gets everything when it comes up.

IPv6: a session carries the family of its address only (Calico's bird/bird6), so a peer's
desired routes, withdraws and End-of-RIB are all of its family, and each family's routes go out
with that family's next hop (`next_hops`: 4 → the node's IPv4, 6 → its IPv6).

Pure: returns command strings, no I/O.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping, Union

from bgp.protocol import FAMILIES, Attributes, announce_routes, end_of_rib, withdraw_routes

Desired = Mapping[str, Mapping[str, Attributes]]  # peer → prefix → attributes
NextHops = Union[str, Mapping[int, str]]  # one IPv4 next hop, or one per family (4, 6)


def _version(address_or_prefix: str) -> int:
    return ipaddress.ip_network(address_or_prefix, strict=False).version


def _same_family(prefixes: Iterable[str], peer: str) -> set[str]:
    version = _version(peer)
    return {p for p in prefixes if _version(p) == version}


class Announcer:
    def __init__(self) -> None:
        self._peers: list[str] = []
        self._sent: dict[str, dict[str, Attributes] | None] = {}  # None: unknown until refreshed
        self._ever: set[str] = set()  # every prefix announced on this connection (+ adj-RIB-out read back)

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """A new sidecar connection: ExaBGP's adj-RIB-out is whatever it is; refresh everyone."""
        self._sent = {p: None for p in self._peers}
        self._ever = set()

    def set_peers(self, peers: Iterable[str]) -> None:
        self._peers = sorted(set(peers))
        self._sent = {p: self._sent.get(p, {}) for p in self._peers}

    def forget(self, peers: Iterable[str]) -> None:
        for peer in peers:
            if peer in self._sent:
                self._sent[peer] = None

    def seen_announced(self, prefixes: Iterable[str]) -> None:
        """Prefixes ExaBGP says it announces (read back after connecting): withdrawn where unwanted."""
        prefixes = set(prefixes)
        self._ever |= prefixes
        for peer, sent in self._sent.items():
            if sent is not None:
                for prefix in _same_family(prefixes, peer) - set(sent):
                    sent[prefix] = Attributes()

    def announced(self) -> set[str]:
        """Prefixes announced to at least one peer."""
        return {prefix for sent in self._sent.values() if sent for prefix in sent}

    def sent_to(self, peer: str) -> dict[str, Attributes] | None:
        sent = self._sent.get(peer)
        return None if sent is None else dict(sent)

    # -- planning -------------------------------------------------------------------------------
    def commands(self, desired: Desired, next_hop: NextHops, *, refresh: Iterable[str] = (),
                 eor: Iterable[str] = ()) -> list[str]:
        """Commands that bring every peer to `desired`. `refresh`: peers to resend everything to
        (with the others, selector-free when that is everyone); `eor`: peers that just came up, each
        refreshed on its own and sent our End-of-RIB."""
        next_hops: Mapping[int, str] = {4: next_hop} if isinstance(next_hop, str) else next_hop
        refresh = set(refresh)
        eor_peers = [p for p in sorted(set(eor)) if p in self._sent]
        withdraw: dict[str, set[str]] = {}
        announce: dict[tuple[str, Attributes], set[str]] = {}
        for peer in self._peers:
            if peer in eor_peers:
                continue
            want = desired.get(peer, {})
            have = self._sent.get(peer)
            if have is None or peer in refresh:
                if have is None and peer not in refresh:
                    continue  # unknown: it gets everything at its next refresh
                for prefix in _same_family(self._ever | set(have or ()), peer) - set(want):
                    withdraw.setdefault(prefix, set()).add(peer)
                for prefix, attributes in want.items():
                    announce.setdefault((prefix, attributes), set()).add(peer)
            else:
                for prefix in set(have) - set(want):
                    withdraw.setdefault(prefix, set()).add(peer)
                for prefix, attributes in want.items():
                    if have.get(prefix) != attributes:
                        announce.setdefault((prefix, attributes), set()).add(peer)
            self._sent[peer] = dict(want)
        commands = self._render(withdraw, announce, next_hops, everyone=frozenset(self._peers))
        for peer in eor_peers:
            want = desired.get(peer, {})
            version = _version(peer)
            hop = next_hops.get(version)
            gone = _same_family(self._ever | set(self._sent.get(peer) or ()), peer) - set(want)
            if gone and hop is not None:
                commands += withdraw_routes(sorted(gone), hop, neighbor=peer)
            by_attributes: dict[Attributes, list[str]] = {}
            for prefix, attributes in sorted(want.items()):
                by_attributes.setdefault(attributes, []).append(prefix)
            for attributes, prefixes in sorted(by_attributes.items(), key=lambda item: item[0].render()):
                if hop is not None:
                    commands += announce_routes(prefixes, hop, neighbor=peer, attributes=attributes)
            commands.append(end_of_rib(neighbor=peer, family=FAMILIES[version]))
            self._sent[peer] = dict(want)
        for sent in self._sent.values():
            if sent:
                self._ever |= set(sent)
        return commands

    @staticmethod
    def _render(withdraw: Mapping[str, set[str]], announce: Mapping[tuple[str, Attributes], set[str]],
                next_hops: Mapping[int, str], *, everyone: frozenset[str]) -> list[str]:
        commands: list[str] = []
        withdraw_groups: dict[tuple[int, frozenset[str]], list[str]] = {}
        for prefix, targets in withdraw.items():
            withdraw_groups.setdefault((_version(prefix), frozenset(targets)), []).append(prefix)
        for (version, group), prefixes in sorted(withdraw_groups.items(),
                                                 key=lambda item: (item[0][0], sorted(item[0][1]))):
            if version not in next_hops:
                continue  # no address of that family: nothing of it was announced
            selector = None if group == everyone else sorted(group)
            commands += withdraw_routes(sorted(prefixes), next_hops[version], neighbor=selector)
        announce_groups: dict[tuple[int, Attributes, frozenset[str]], list[str]] = {}
        for (prefix, attributes), targets in announce.items():
            announce_groups.setdefault((_version(prefix), attributes, frozenset(targets)), []).append(prefix)
        for (version, attributes, group), prefixes in sorted(
                announce_groups.items(), key=lambda item: (item[0][0], sorted(item[0][2]), item[0][1].render())):
            if version not in next_hops:
                continue
            selector = None if group == everyone else sorted(group)
            commands += announce_routes(sorted(prefixes), next_hops[version], neighbor=selector,
                                        attributes=attributes)
        return commands
