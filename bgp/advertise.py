"""What a node announces to each of its BGP peers, with which attributes.

Calico's export, for a node's own routes (confd's `calico_export_to_bgp_peers` and the filters in
front of it, calico-reference §3.6):

1. The session's BGPFilter export rules, in order; the first that matches decides: Reject keeps
   the route from this peer, Accept announces it with the rule's operations applied (and none of
   the prefixAdvertisement communities: confd adds those further down the filter, which an Accept
   never reaches).
2. Otherwise the route is announced with the communities of every prefixAdvertisement whose CIDR
   contains it (`net ~ cidr`), from the node's own BGPConfiguration `node.<name>` when it has
   prefixAdvertisements, else from `default`. A community is a value (`aa:nn`, or `aa:nn:mm` for
   a large community) or the name of one in `default`'s `communities` list.

The node's own routes are its blocks, its borrowed /32s and its Service addresses; next hop is the
node's address on every session. Unless some peer's filters treat it differently, a route goes to
every peer with the same attributes, and the agent sends it as one command for all of them.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from bgp.filters import BGPFilter, FilterError, Route, evaluate, is_large, parse_community
from bgp.protocol import Attributes, PathAttributes


@dataclass(frozen=True)
class CommunityRule:
    cidr: str
    communities: tuple[str, ...]  # standard, "aa:nn"
    large_communities: tuple[str, ...]  # "aa:nn:mm"


def community_rules(default: Mapping[str, Any] | None,
                    node_config: Mapping[str, Any] | None = None) -> tuple[CommunityRule, ...]:
    """The prefixAdvertisements in force on a node, with community names resolved.

    Raises FilterError (one line, naming the resource and field) for a name that `default`'s
    `communities` does not define, or a value that is not a community.
    """
    default_spec = (default or {}).get("spec") or {}
    named: dict[str, str] = {}
    for item in default_spec.get("communities") or ():
        named[str(item.get("name"))] = str(item.get("value"))
    source, resource = default_spec, 'BGPConfiguration "default"'
    node_spec = (node_config or {}).get("spec") or {}
    if node_spec.get("prefixAdvertisements"):
        source = node_spec
        resource = f'BGPConfiguration "{(node_config or {}).get("metadata", {}).get("name", "node")}"'
    rules = []
    for i, adv in enumerate(source.get("prefixAdvertisements") or ()):
        cidr = str(ipaddress.ip_network(str(adv.get("cidr")), strict=False))
        standard: list[str] = []
        large: list[str] = []
        for value in adv.get("communities") or ():
            text = named.get(str(value), str(value))
            try:
                parts = parse_community(text)
            except ValueError:
                raise FilterError(f"{resource}: spec.prefixAdvertisements[{i}].communities: {value!r} is neither "
                                  "a community value nor the name of one in spec.communities") from None
            (large if len(parts) == 3 else standard).append(":".join(str(p) for p in parts))
        rules.append(CommunityRule(cidr, tuple(standard), tuple(large)))
    return tuple(rules)


def communities_for(prefix: str, rules: Iterable[CommunityRule]) -> Attributes:
    """The attributes of one of our routes when no filter decided: every matching rule's communities."""
    net = ipaddress.ip_network(prefix)
    standard: list[str] = []
    large: list[str] = []
    for rule in rules:
        cidr = ipaddress.ip_network(rule.cidr)
        if cidr.version == net.version and net.subnet_of(cidr):  # type: ignore[arg-type]
            standard += [c for c in rule.communities if c not in standard]
            large += [c for c in rule.large_communities if c not in large]
    return Attributes(communities=tuple(standard), large_communities=tuple(large))


@dataclass(frozen=True)
class LocalRoute:
    """One route this node originates; `interface` is set for a pod's /32 (its veth)."""

    prefix: str
    interface: str | None = None


@dataclass(frozen=True)
class PeerExport:
    """How to judge one session's export: its filters and whether it is eBGP."""

    filters: tuple[BGPFilter, ...]
    ebgp: bool


def _to_attributes(path: PathAttributes) -> Attributes:
    return Attributes(communities=tuple(path.communities), large_communities=tuple(path.large_communities),
                      as_path=tuple(path.as_path))


def exports(routes: Iterable[LocalRoute], rules: Sequence[CommunityRule],
            peers: Mapping[str, PeerExport]) -> dict[str, dict[str, Attributes]]:
    """peer address → prefix → attributes: what each session should carry (a session carries the
    routes of its address's family only, as Calico's bird and bird6)."""
    base = {r.prefix: communities_for(r.prefix, rules) for r in routes}
    by_family = {v: {p: a for p, a in base.items() if ipaddress.ip_network(p).version == v} for v in (4, 6)}
    interfaces = {r.prefix: r.interface for r in routes}
    out: dict[str, dict[str, Attributes]] = {}
    for address, export in peers.items():
        family = by_family[ipaddress.ip_address(address).version]
        if not export.filters:
            out[address] = dict(family)
            continue
        chosen: dict[str, Attributes] = {}
        for prefix, attributes in family.items():
            verdict = evaluate(export.filters, "export", Route(prefix, interface=interfaces[prefix]),
                               ebgp=export.ebgp)
            if not verdict.matched:
                chosen[prefix] = attributes
            elif verdict.accepted:
                chosen[prefix] = _to_attributes(verdict.attributes)
        out[address] = chosen
    return out


def import_policy(filters: Mapping[str, tuple[BGPFilter, ...]], ebgp: Mapping[str, bool],
                  local_as: Mapping[str, int], allowed_local_as: Mapping[str, int]):  # type: ignore[no-untyped-def]
    """The RIB's import policy (bgp.rib.ImportPolicy) for sessions keyed by peer address: the AS
    path loop check (our AS at most numAllowedLocalASNumbers times), then the BGPFilter import rules."""

    def policy(peer: str, prefix: str, attributes: PathAttributes) -> PathAttributes | None:
        own = local_as.get(peer)
        if own is not None and attributes.as_path.count(own) > allowed_local_as.get(peer, 0):
            return None
        peer_filters = filters.get(peer)
        if not peer_filters:
            return attributes
        verdict = evaluate(peer_filters, "import", Route(prefix, attributes, from_bgp=True),
                           ebgp=ebgp.get(peer, False))
        return verdict.attributes if verdict.accepted else None

    return policy


def is_large_community(value: str) -> bool:
    return is_large(value)
