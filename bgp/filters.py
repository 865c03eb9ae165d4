"""Calico's BGPFilter: import and export rules per BGP session, evaluated here and rendered for BIRD.

A BGPPeer lists BGPFilter names in `spec.filters`; every session that BGPPeer creates runs them
in that order. Each filter's rules run in order and the first rule that matches decides: its
operations are applied and the route is accepted or rejected there and then. A route no rule of
any filter matched falls through to Calico's default behaviour (import: accepted; export: the
node's own routes with their prefixAdvertisement communities). This is how confd renders them:
one BIRD function per filter and direction, called in order from the session's import or export
filter, ahead of the default logic (calico-reference §3.6, §3.7).

Two consumers, one meaning:
- `evaluate(rules, route, peer_type=…)`: the agent's side. ExaBGP has no policy language, so the
  agent applies import rules to what the RIB receives and export rules to what it announces.
- `render_bird_functions` / `bird_calls`: the route reflector's BIRD, which applies them itself.

Match fields (all present ones must match): `cidr` with `matchOperator` (Equal, NotEqual, In,
NotIn) and an optional `prefixLength {min, max}` (In / NotIn), `source: RemotePeers` (routes
learned over BGP), `interface` (a glob on the route's interface), `peerType` (eBGP or iBGP: the
session's), `communities.values` (the route carries this community), `asPathPrefix` (the AS path
starts with these ASNs). Operations: `addCommunity`, `prependASPath`.

Not supported (refused when a BGPFilter is written, model/resources.py): `priority` and the
`setPriority` operation (felixpy programs no route priorities).

IPv6: `importV6` / `exportV6` hold the rules for IPv6 routes (confd renders them into bird6), the
V4 lists those for IPv4 routes; a route only ever meets the rules of its own family. BIRD gets
one function per filter, direction and family (`felixpy_filter_<i>_<direction>` and `..._6`).

Pure: no I/O.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

from bgp.protocol import PathAttributes

ACCEPT = "Accept"
REJECT = "Reject"
MATCH_OPERATORS = ("Equal", "NotEqual", "In", "NotIn")
PEER_TYPES = ("eBGP", "iBGP")
_STANDARD = re.compile(r"^(\d+):(\d+)$")
_LARGE = re.compile(r"^(\d+):(\d+):(\d+)$")


class FilterError(ValueError):
    """A BGPFilter that cannot be used; one line naming the resource and the field."""


def parse_community(value: str) -> tuple[int, ...]:
    """"aa:nn" (standard, 16-bit halves) or "aa:nn:mm" (large, 32-bit parts) → its numbers."""
    text = str(value).strip()
    match = _STANDARD.match(text)
    if match:
        parts = tuple(int(x) for x in match.groups())
        if all(p <= 0xFFFF for p in parts):
            return parts
    match = _LARGE.match(text)
    if match:
        parts = tuple(int(x) for x in match.groups())
        if all(p <= 0xFFFFFFFF for p in parts):
            return parts
    raise ValueError(f"invalid community {value!r} (aa:nn with 16-bit parts, or aa:nn:mm with 32-bit parts)")


def is_large(community: str) -> bool:
    return len(parse_community(community)) == 3


@dataclass(frozen=True)
class Route:
    """What a rule looks at: the prefix and where it comes from, with its attributes."""

    prefix: str
    attributes: PathAttributes = field(default_factory=PathAttributes)
    from_bgp: bool = False  # learned from a BGP peer (RemotePeers) rather than originated here
    interface: str | None = None  # the interface the route points out of, when it has one


@dataclass(frozen=True)
class Rule:
    action: str
    cidr: str | None = None
    match_operator: str | None = None
    prefix_min: int | None = None
    prefix_max: int | None = None
    source: str | None = None  # "RemotePeers"
    interface: str | None = None
    peer_type: str | None = None  # "eBGP" | "iBGP"
    community: str | None = None
    as_path_prefix: tuple[int, ...] = ()
    add_communities: tuple[str, ...] = ()
    prepend_as_path: tuple[int, ...] = ()

    def matches(self, route: Route, *, ebgp: bool) -> bool:
        if self.peer_type is not None and (self.peer_type == "eBGP") != ebgp:
            return False
        if self.cidr is not None and not self._cidr_matches(route.prefix):
            return False
        if self.source == "RemotePeers" and not route.from_bgp:
            return False
        if self.interface is not None and (route.interface is None
                                           or not fnmatch.fnmatchcase(route.interface, self.interface)):
            return False
        if self.community is not None:
            carried = route.attributes.large_communities if is_large(self.community) else route.attributes.communities
            if _normal(self.community) not in {_normal(c) for c in carried}:
                return False
        if self.as_path_prefix and tuple(route.attributes.as_path[:len(self.as_path_prefix)]) != self.as_path_prefix:
            return False
        return True

    def _cidr_matches(self, prefix: str) -> bool:
        assert self.cidr is not None
        net = ipaddress.ip_network(prefix)
        cidr = ipaddress.ip_network(self.cidr)
        if self.match_operator == "Equal":
            return net == cidr
        if self.match_operator == "NotEqual":
            return net != cidr
        low = self.prefix_min if self.prefix_min is not None else cidr.prefixlen
        high = self.prefix_max if self.prefix_max is not None else cidr.max_prefixlen
        inside = (net.version == cidr.version and net.subnet_of(cidr)  # type: ignore[arg-type]
                  and low <= net.prefixlen <= high)
        return inside if self.match_operator == "In" else not inside

    def apply(self, attributes: PathAttributes) -> PathAttributes:
        """The attributes after this rule's operations."""
        if not (self.add_communities or self.prepend_as_path):
            return attributes
        standard = list(attributes.communities)
        large = list(attributes.large_communities)
        for community in self.add_communities:
            target = large if is_large(community) else standard
            if _normal(community) not in {_normal(c) for c in target}:
                target.append(_normal(community))
        return replace(attributes, communities=tuple(standard), large_communities=tuple(large),
                       as_path=self.prepend_as_path + tuple(attributes.as_path))


def _normal(community: str) -> str:
    return ":".join(str(p) for p in parse_community(community))


@dataclass(frozen=True)
class BGPFilter:
    name: str
    import_v4: tuple[Rule, ...] = ()
    export_v4: tuple[Rule, ...] = ()
    import_v6: tuple[Rule, ...] = ()
    export_v6: tuple[Rule, ...] = ()

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any]) -> "BGPFilter":
        """A stored BGPFilter (already validated on write; anything unusable raises FilterError)."""
        name = str((obj.get("metadata") or {}).get("name", ""))
        spec = obj.get("spec") or {}

        def rules(field: str, version: int) -> tuple[Rule, ...]:
            return tuple(_rule(r, f'BGPFilter "{name}": spec.{field}[{i}]', version)
                         for i, r in enumerate(spec.get(field) or ()))

        return cls(name, rules("importV4", 4), rules("exportV4", 4), rules("importV6", 6), rules("exportV6", 6))

    def rules(self, direction: str, version: int) -> tuple[Rule, ...]:
        if version == 6:
            return self.import_v6 if direction == "import" else self.export_v6
        return self.import_v4 if direction == "import" else self.export_v4


def _rule(raw: Mapping[str, Any], where: str, version: int = 4) -> Rule:
    try:
        action = raw.get("action")
        if action not in (ACCEPT, REJECT):
            raise FilterError(f"{where}.action must be Accept or Reject")
        cidr = raw.get("cidr")
        operator = raw.get("matchOperator")
        if (cidr is None) != (operator is None):
            raise FilterError(f"{where}: cidr and matchOperator go together")
        if operator is not None and operator not in MATCH_OPERATORS:
            raise FilterError(f"{where}.matchOperator must be one of {', '.join(MATCH_OPERATORS)}")
        network = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
        longest = 32 if version == 4 else 128
        if cidr is not None:
            try:
                cidr = str(network(cidr, strict=False))
            except ValueError:
                raise FilterError(f"{where}.cidr: {cidr!r} is not an IPv{version} CIDR") from None
        length = raw.get("prefixLength") or {}
        low, high = length.get("min"), length.get("max")
        if length and operator not in ("In", "NotIn"):
            raise FilterError(f"{where}.prefixLength needs matchOperator In or NotIn")
        for bound in (low, high):
            if bound is not None and not (cidr is not None and network(cidr).prefixlen <= bound <= longest):
                raise FilterError(f"{where}.prefixLength: {bound} is outside the cidr's "
                                  f"/{cidr and network(cidr).prefixlen}..{longest}")
        if low is not None and high is not None and low > high:
            raise FilterError(f"{where}.prefixLength: min {low} is above max {high}")
        source = raw.get("source")
        if source not in (None, "RemotePeers"):
            raise FilterError(f"{where}.source must be RemotePeers")
        peer_type = raw.get("peerType")
        if peer_type not in (None, *PEER_TYPES):
            raise FilterError(f"{where}.peerType must be eBGP or iBGP")
        if raw.get("priority") is not None:
            raise FilterError(f"{where}.priority: route priorities are not supported by felixpy")
        values = (raw.get("communities") or {}).get("values") or []
        if len(values) > 1:
            raise FilterError(f"{where}.communities.values: one community per rule")
        community = str(values[0]) if values else None
        if community is not None:
            parse_community(community)
        as_path = tuple(int(a) for a in raw.get("asPathPrefix") or ())
        adds: list[str] = []
        prepends: tuple[int, ...] = ()
        for j, op in enumerate(raw.get("operations") or ()):
            if "setPriority" in op:
                raise FilterError(f"{where}.operations[{j}].setPriority: route priorities are not supported by felixpy")
            if "addCommunity" in op:
                value = str((op["addCommunity"] or {}).get("value", ""))
                parse_community(value)
                adds.append(value)
            elif "prependASPath" in op:
                prepends += tuple(int(a) for a in (op["prependASPath"] or {}).get("prefix") or ())
            else:
                raise FilterError(f"{where}.operations[{j}]: expected addCommunity or prependASPath")
        return Rule(action=str(action), cidr=cidr, match_operator=operator, prefix_min=low, prefix_max=high,
                    source=source, interface=raw.get("interface"), peer_type=peer_type, community=community,
                    as_path_prefix=as_path, add_communities=tuple(adds), prepend_as_path=prepends)
    except FilterError:
        raise
    except (TypeError, ValueError, AttributeError) as err:
        raise FilterError(f"{where}: {err}") from None


@dataclass(frozen=True)
class Verdict:
    """The outcome for one route: accepted or not, the attributes to use, and whether a rule decided."""

    accepted: bool
    attributes: PathAttributes
    matched: bool


def evaluate(filters: Sequence[BGPFilter], direction: str, route: Route, *, ebgp: bool) -> Verdict:
    """Run `direction` ("import" | "export") rules of `filters` in order over one route."""
    # A route meets the rules of its own family only (confd: bird runs the V4 lists, bird6 the V6).
    version = ipaddress.ip_network(route.prefix).version
    for bgp_filter in filters:
        rules = bgp_filter.rules(direction, version)
        for rule in rules:
            if rule.matches(route, ebgp=ebgp):
                return Verdict(rule.action == ACCEPT, rule.apply(route.attributes), True)
    return Verdict(True, route.attributes, False)


def resolve(names: Iterable[str], known: Mapping[str, BGPFilter]) -> tuple[BGPFilter, ...]:
    """The filters a BGPPeer names, in order. A name with no BGPFilter behind it is skipped, as
    confd does (the session runs as if it were not listed)."""
    return tuple(known[name] for name in names if name in known)


# -- BIRD -----------------------------------------------------------------------------------------


def bird_function_name(index: int, direction: str, version: int = 4) -> str:
    """A plain BIRD symbol per filter: Kubernetes names may hold '.' and '-', which BIRD symbols cannot."""
    return f"felixpy_filter_{index}_{direction}" + ("" if version == 4 else "6")


def _bird_net(rule: Rule) -> str:
    assert rule.cidr is not None
    if rule.match_operator == "Equal":
        return f"(net = {rule.cidr})"
    if rule.match_operator == "NotEqual":
        return f"(net != {rule.cidr})"
    cidr = ipaddress.ip_network(rule.cidr)
    low = rule.prefix_min if rule.prefix_min is not None else cidr.prefixlen
    high = rule.prefix_max if rule.prefix_max is not None else cidr.max_prefixlen
    op = "~" if rule.match_operator == "In" else "!~"
    return f"(net {op} [ {rule.cidr}{{{low},{high}}} ])"


def _bird_community(value: str) -> str:
    parts = parse_community(value)
    attribute = "bgp_large_community" if len(parts) == 3 else "bgp_community"
    return f"(({', '.join(str(p) for p in parts)}) ~ {attribute})"


def _bird_rule(rule: Rule) -> str:
    conditions = []
    if rule.cidr is not None:
        conditions.append(_bird_net(rule))
    if rule.source == "RemotePeers":
        conditions.append("(source = RTS_BGP)")
    if rule.interface is not None:
        if '"' in rule.interface or "\\" in rule.interface:
            raise FilterError(f"interface {rule.interface!r} cannot be written for BIRD")
        conditions.append(f'(defined(ifname) && ifname ~ "{rule.interface}")')
    if rule.community is not None:
        conditions.append(_bird_community(rule.community))
    if rule.as_path_prefix:
        conditions.append(f"(bgp_path ~ [= {' '.join(str(a) for a in rule.as_path_prefix)} * =])")
    body = []
    for community in rule.add_communities:
        parts = parse_community(community)
        attribute = "bgp_large_community" if len(parts) == 3 else "bgp_community"
        body.append(f"{attribute}.add(({', '.join(str(p) for p in parts)}));")
    for asn in reversed(rule.prepend_as_path):
        body.append(f"bgp_path.prepend({asn});")
    body.append("accept;" if rule.action == ACCEPT else "reject;")
    statement = " ".join(body)
    text = f"if {' && '.join(conditions)} then {{ {statement} }}" if conditions else statement
    if rule.peer_type is not None:
        guard = "is_ebgp" if rule.peer_type == "eBGP" else "!is_ebgp"
        text = f"if ({guard}) then {{ {text} }}"
    return text


def render_bird_functions(filters: Sequence[BGPFilter]) -> list[str]:
    """One BIRD function per filter and direction (`felixpy_filter_<i>_import(bool is_ebgp)`)."""
    lines: list[str] = []
    for index, bgp_filter in enumerate(filters):
        for version in (4, 6):
            for direction in ("import", "export"):
                lines.append(f'# BGPFilter "{bgp_filter.name}" {direction}V{version}')
                lines.append(f"function {bird_function_name(index, direction, version)}(bool is_ebgp) {{")
                lines += [f"  {_bird_rule(rule)}" for rule in bgp_filter.rules(direction, version)]
                lines.append("}")
    return lines


def bird_calls(names: Iterable[str], order: Sequence[str], direction: str, *, ebgp: bool,
               version: int = 4) -> list[str]:
    """The calls, in the BGPPeer's order, to the functions of the filters it names that exist
    (those of the session's family)."""
    index = {name: i for i, name in enumerate(order)}
    flag = "true" if ebgp else "false"
    return [f"{bird_function_name(index[name], direction, version)}({flag});" for name in names if name in index]
