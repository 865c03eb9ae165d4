"""The reference evaluator: what the policy model (policy/model.py) says about one packet.

`explain(src, dst, port, protocol, policies=..., profiles=..., tiers=...)` walks the same steps as
the chains the renderer writes: the source endpoint's egress policies, then the destination
endpoint's ingress policies, tier by tier; the first matching rule of a policy decides, Pass ends
the tier, the end of a tier drops (or passes, with `defaultAction: Pass`) when a policy of it
selected the endpoint but nothing decided, and the profiles decide when no tier did. The answer
names what decided it (policy, rule, tier), so `felixctl policy explain` can say why.

Host endpoints (policy.model.HostEndpoint) are explained the way Felix's tables treat packets:
to the host through the endpoint's interface (raw: doNotTrack policy, then mangle: preDNAT
policy, then filter INPUT: normal policy, each after the inbound failsafe ports), from the host
out through it (raw, then filter OUTPUT, after the outbound failsafe ports), and forwarded in
through it (`via`: doNotTrack, preDNAT, then applyOnForward policy; forwarded traffic with no
applyOnForward policy is allowed). One packet is explained as given: no NAT is applied.

match_endpoint() is THE definition of "this endpoint matches that rule selector": the ipset
members the renderer computes come from it too, so explain and the kernel agree.

Selectors see an endpoint's labels as Calico's v1 model has them (selector_labels): its own
labels, its namespace's labels as "pcns.<key>", its service account's as "pcsa.<key>", its
profiles' labelsToApply (host endpoints); its own labels win. A rule's namespaceSelector is
evaluated as libcalico-go rewrites it: over "pcns.<key>", with all() meaning "any namespace"
(has(projectcalico.org/namespace)) and global() "no namespace".
A peer given as a plain IP (not an endpoint) matches only rules without endpoint selectors.

This module is pure and imports nothing from felixpy.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Literal, Mapping, Union

from policy import selectors
from policy.calico import (
    NAMESPACE_LABEL,
    NAMESPACE_LABEL_PREFIX,
    ORCHESTRATOR_LABEL,
    SERVICE_ACCOUNT_LABEL_PREFIX,
    protocol_name,
    protocol_number,
)
from policy.model import (
    DEFAULT_FAILSAFE_INBOUND,
    DEFAULT_FAILSAFE_OUTBOUND,
    DEFAULT_TIER,
    Direction,
    Endpoint,
    EndpointMatch,
    EntityRule,
    HostEndpoint,
    ICMPMatch,
    NamedPort,
    Policy,
    Port,
    PortRange,
    Profile,
    Rule,
    Tier,
    resolve_tier,
)

DecidedBy = Literal["policy", "end-of-tier", "profile", "no-profile", "failsafe", "forward-default",
                    "not-policed"]
Stage = Literal["normal", "untracked", "pre-dnat", "forward"]
Peer = Union[Endpoint, HostEndpoint, str]
_PORT_PROTOCOLS = frozenset({6, 17, 132, 136})
_ICMP_PROTOCOLS = frozenset({1, 58})


@dataclass(frozen=True, slots=True)
class DirectionVerdict:
    """The verdict of one endpoint's policy in one direction.

    decided_by: "policy" (a rule's Allow / Deny), "end-of-tier" (policies selected the endpoint,
    none allowed), "profile" (no policy decided; a profile rule did) or "no-profile" (nothing
    allowed). policy_id / rule_index name the deciding policy rule; for a profile decision,
    `profile` names the profile and rule_index its rule.
    """

    allowed: bool
    decided_by: DecidedBy
    policy_id: str | None
    rule_index: int | None
    action: str | None
    reason: str
    direction: Direction = "Ingress"
    endpoint: str = ""
    policies: tuple[str, ...] = ()  # ids of the policies that selected the endpoint, in order
    profile: str | None = None
    tier: str | None = None  # the tier of the deciding policy (or whose end decided)
    stage: Stage = "normal"  # host endpoints: which table's policy decided


@dataclass(frozen=True, slots=True)
class Verdict:
    """allowed = the source's egress AND the destination's ingress allow (a plain-IP side is not
    policed: its verdict is None)."""

    allowed: bool
    egress: DirectionVerdict | None
    ingress: DirectionVerdict | None
    src: str = ""
    dst: str = ""
    port: int = 0
    protocol: str = ""
    forward: DirectionVerdict | None = None  # `via` a host endpoint: its ingress on forwarded traffic

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- selectors --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def selector_labels(ep: Endpoint) -> Mapping[str, str]:
    """The labels selectors see (Calico's label inheritance): the profiles' labelsToApply, the
    namespace's labels as pcns.<key> and the service account's as pcsa.<key>, then the
    endpoint's own labels, which win. A namespaced endpoint always carries its namespace label."""
    labels = dict(ep.profile_labels)
    labels.update((NAMESPACE_LABEL_PREFIX + k, v) for k, v in ep.namespace_labels)
    labels.update((SERVICE_ACCOUNT_LABEL_PREFIX + k, v) for k, v in ep.sa_labels)
    labels.update(ep.labels)
    if ep.namespace is not None:
        labels.setdefault(NAMESPACE_LABEL, ep.namespace)
    return labels


@functools.lru_cache(maxsize=4096)
def namespace_selector(text: str) -> selectors.Selector:
    """A namespaceSelector as a selector over selector_labels (libcalico-go's rewrite)."""
    prefixed = selectors.prefixed(selectors.parse(text), NAMESPACE_LABEL_PREFIX)
    return selectors.replace_all(prefixed, selectors.Has(NAMESPACE_LABEL))


def match_endpoint(match: EndpointMatch, ep: Endpoint) -> bool:
    """Whether a rule's endpoint selector (with its namespace scoping) selects ep."""
    if match.namespace is not None and ep.namespace != match.namespace:
        return False
    labels = selector_labels(ep)
    if match.namespace_selector is not None and not namespace_selector(match.namespace_selector).evaluate(labels):
        return False
    return selectors.parse(match.selector).evaluate(labels)


def applies(policy: Policy, ep: Endpoint) -> bool:
    """Whether the policy selects the endpoint (either direction, any kind of policy); its
    namespaceSelector and serviceAccountSelector are part of policy.selector."""
    if policy.namespace is not None and ep.namespace != policy.namespace:
        return False
    return selectors.parse(policy.selector).evaluate(selector_labels(ep))


def policies_for(ep: Endpoint, direction: Direction, policies: Iterable[Policy]) -> list[Policy]:
    """The policies that police a workload endpoint in this direction (preDNAT and doNotTrack
    ones never do), in the order they run within their tier."""
    return sorted((p for p in policies if p.for_workloads and direction in p.types and applies(p, ep)),
                  key=Policy.sort_key)


def tiered(policies: Iterable[Policy], tiers: Mapping[str, Tier]) -> list[tuple[Tier, list[Policy]]]:
    """Policies grouped by tier, tiers in Felix's order, policies in order within each tier;
    tiers no policy belongs to are left out (Felix skips them)."""
    groups: dict[str, list[Policy]] = {}
    for policy in policies:
        groups.setdefault(policy.tier, []).append(policy)
    out = [(resolve_tier(name, tiers), sorted(group, key=Policy.sort_key)) for name, group in groups.items()]
    out.sort(key=lambda item: item[0].sort_key())
    return out


# -- describing matches (for reasons) --------------------------------------------------------------


def describe_selector(text: str) -> str:
    """A selector as people read it: Calico's implicit `orchestrator == "k8s"` term dropped."""
    sel = selectors.parse(text)
    k8s = selectors.Compare(ORCHESTRATOR_LABEL, "==", "k8s")
    if sel == k8s:
        return "all pods"
    if isinstance(sel, selectors.And) and k8s in sel.terms:
        return str(selectors.and_(*(t for t in sel.terms if t != k8s)))
    return str(sel)


def describe_endpoints(match: EndpointMatch) -> str:
    parts: list[str] = []
    if match.selector != "all()" or match.namespace_selector is None:
        text = describe_selector(match.selector)
        parts.append(text if text == "all pods" or match.selector == "all()" else f"selector {text}")
    if match.namespace is not None:
        parts.append(f"in namespace {match.namespace}")
    if match.namespace_selector is not None:
        if match.namespace_selector == "all()":
            parts.append("in all namespaces" if parts else "pods in all namespaces")
        else:
            parts.append(("in " if parts else "pods in ") + f"namespaces {match.namespace_selector}")
    return " ".join(parts)


def _describe_port(port: Port) -> str:
    if isinstance(port, NamedPort):
        return port.name
    return str(port.first) if port.first == port.last else f"{port.first}-{port.last}"


# -- matching one rule ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Side:
    """One end of the packet: its address, its endpoint (None for a plain IP), its port, and the
    network sets and host endpoints whose addresses hold it (selector ipsets match those too)."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    endpoint: Endpoint | None
    port: int | None
    holders: tuple[Endpoint, ...] = ()

    @property
    def candidates(self) -> tuple[Endpoint, ...]:
        return ((self.endpoint,) if self.endpoint is not None else ()) + self.holders


def _port_matches(port: Port, side: _Side, proto: int) -> bool:
    if side.port is None:
        return False
    if isinstance(port, PortRange):
        return port.first <= side.port <= port.last
    # A named port resolves on the endpoint at this end of the packet, for this protocol.
    if side.endpoint is None:
        return False
    return any(
        cp.name == port.name and protocol_number(cp.protocol) == proto and cp.port == side.port
        for cp in side.endpoint.ports
    )


def _kind_name(ep: Endpoint) -> str:
    return {"networkset": "network set", "host": "host endpoint"}.get(ep.kind, "endpoint")


def _in_nets(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None, nets: tuple[str, ...]) -> str | None:
    if ip is None:
        return None
    for net in nets:
        network = ipaddress.ip_network(net, strict=False)
        if ip.version == network.version and ip in network:
            return net
    return None


def _match_entity(er: EntityRule, side: _Side, proto: int) -> list[str] | None:
    """None if the entity rule does not match this side, else the phrases saying what matched."""
    why: list[str] = []
    if er.endpoints is not None:
        # The kernel matches the address against the selector's ipset: whatever selected thing
        # holds it (the pod itself, a network set's net, a host endpoint's expectedIP) counts.
        selected = next((e for e in side.candidates if match_endpoint(er.endpoints, e)), None)
        if selected is None:
            return None
        via = "" if selected is side.endpoint else f" ({_kind_name(selected)} {selected.id})"
        why.append(describe_endpoints(er.endpoints) + via)
    if er.not_endpoints is not None:
        not_endpoints = er.not_endpoints
        if any(match_endpoint(not_endpoints, e) for e in side.candidates):
            return None
        why.append(f"not {describe_selector(not_endpoints.selector)}")
    if er.nets:
        net = _in_nets(side.ip, er.nets)
        if net is None:
            return None
        why.append(f"net {net}")
    if er.not_nets:
        if _in_nets(side.ip, er.not_nets) is not None:
            return None
        if side.ip is not None and not any(ipaddress.ip_network(n, strict=False).version == side.ip.version
                                           for n in er.not_nets):
            return None  # only the other family's: Felix renders no rule for this one
        why.append(f"except {', '.join(er.not_nets)}")
    if er.ports:
        hit = next((p for p in er.ports if _port_matches(p, side, proto)), None)
        if hit is None:
            return None
        text = _describe_port(hit)
        why.append(f"port {text}" + (f" (={side.port})" if isinstance(hit, NamedPort) else ""))
    if er.not_ports:
        if any(_port_matches(p, side, proto) for p in er.not_ports):
            return None
        why.append(f"not ports {', '.join(_describe_port(p) for p in er.not_ports)}")
    return why


def _icmp_matches(icmp: ICMPMatch, icmp_type: int | None, icmp_code: int | None) -> bool:
    if icmp.type is not None and icmp.type != icmp_type:
        return False
    return icmp.code is None or icmp.code == icmp_code


@dataclass(frozen=True, slots=True)
class _Packet:
    proto: int
    src: _Side
    dst: _Side
    icmp_type: int | None
    icmp_code: int | None

    @property
    def ip_version(self) -> int | None:
        ip = self.src.ip if self.src.ip is not None else self.dst.ip
        return ip.version if ip is not None else None


def match_rule(rule: Rule, packet: _Packet, direction: Direction) -> str | None:
    """None if the rule does not match, else a phrase naming what matched.

    As the kernel sees it (Felix renders each rule per IP family): a rule of the other
    ipVersion, or whose notNets are all of the other family, is not in this family's table."""
    if rule.ip_version is not None and packet.ip_version is not None and rule.ip_version != packet.ip_version:
        return None
    if rule.protocol is not None and protocol_number(rule.protocol) != packet.proto:
        return None
    if rule.not_protocol is not None and protocol_number(rule.not_protocol) == packet.proto:
        return None
    if rule.icmp is not None and (
        packet.proto not in _ICMP_PROTOCOLS or not _icmp_matches(rule.icmp, packet.icmp_type, packet.icmp_code)
    ):
        return None
    if rule.not_icmp is not None and packet.proto in _ICMP_PROTOCOLS and _icmp_matches(
        rule.not_icmp, packet.icmp_type, packet.icmp_code
    ):
        return None
    src = _match_entity(rule.source, packet.src, packet.proto)
    if src is None:
        return None
    dst = _match_entity(rule.destination, packet.dst, packet.proto)
    if dst is None:
        return None
    # Say the peer first ("from ..." on ingress, "to ..." on egress), then the ports.
    peer, own = (src, dst) if direction == "Ingress" else (dst, src)
    phrases: list[str] = []
    peer_words = [w for w in peer if not w.startswith("port")]
    if peer_words:
        phrases.append(("from " if direction == "Ingress" else "to ") + " ".join(peer_words))
    else:
        phrases.append("from anywhere" if direction == "Ingress" else "to anywhere")
    phrases += [w for w in own if not w.startswith("port")]
    ports = [w for w in [*src, *dst] if w.startswith("port")]
    if rule.protocol is not None:
        phrases.append(f"protocol {rule.protocol}")
    phrases += ports if ports else (["any port"] if packet.proto in _PORT_PROTOCOLS else [])
    return ", ".join(phrases)


# -- one direction ----------------------------------------------------------------------------------


def _rules_of(item: Policy | Profile, direction: Direction) -> tuple[Rule, ...]:
    return item.ingress if direction == "Ingress" else item.egress


def _in_tier(tier: Tier) -> str:
    return "" if tier.name == DEFAULT_TIER else f" in tier {tier.name}"


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What walking some tiers decided (allowed None: nothing decided, go on)."""

    allowed: bool | None
    decided_by: DecidedBy | None = None
    policy_id: str | None = None
    rule_index: int | None = None
    action: str | None = None
    reason: str = ""
    tier: str | None = None
    passed: tuple[str, ...] = ()  # what passed on, for the reason of a later decision


def _walk_tiers(ep: Endpoint, direction: Direction, packet: _Packet, what: str,
                groups: list[tuple[Tier, list[Policy]]], *, end_of_tier: bool, kind: str = "") -> _Outcome:
    """One endpoint chain's tiers. end_of_tier False (doNotTrack, preDNAT): a tier that decides
    nothing lets the packet go on, as Felix renders those chains."""
    passed: list[str] = []
    for tier, group in groups:
        passed_here: str | None = None
        for pol in group:
            for index, rule in enumerate(_rules_of(pol, direction)):
                why = match_rule(rule, packet, direction)
                if why is None or rule.action == "Log":
                    continue  # Log rules log and carry on, as in the chain
                if rule.action in ("Allow", "Deny"):
                    verb = "allowed" if rule.action == "Allow" else "denied"
                    return _Outcome(rule.action == "Allow", "policy", pol.id, index, rule.action,
                                    f"{verb} by {kind}policy {pol.id}{_in_tier(tier)} rule {index} ({why})",
                                    tier.name, tuple(passed))
                passed_here = f"{kind}policy {pol.id}{_in_tier(tier)} rule {index} passed ({why})"
                break
            if passed_here is not None:
                break
        if passed_here is not None:
            passed.append(passed_here)
            continue
        ids = ", ".join(p.id for p in group)
        subject = f"{kind}policy {ids} selects" if len(group) == 1 else f"{kind}policies {ids} select"
        if not end_of_tier:
            passed.append(f"{subject} {ep.id}{_in_tier(tier)} but no rule matched")
            continue
        if tier.default_action == "Pass":
            passed.append(f"end of tier {tier.name}: {subject} {ep.id} but no rule matched; "
                          "the tier's default action is Pass")
            continue
        tier_text = "" if tier.name == DEFAULT_TIER else f" {tier.name}"
        return _Outcome(False, "end-of-tier", group[0].id, None, None,
                        f"end of tier{tier_text}: {subject} {ep.id} but no rule allowed {what}",
                        tier.name, tuple(passed))
    return _Outcome(None, passed=tuple(passed))


def _evaluate_direction(
    ep: Endpoint,
    direction: Direction,
    packet: _Packet,
    what: str,
    policies: list[Policy],
    profiles: Mapping[str, Profile],
    tiers: Mapping[str, Tier],
) -> DirectionVerdict:
    applied = policies_for(ep, direction, policies)
    return _normal_chain(ep, direction, packet, what, applied, profiles, tiers)


def _normal_chain(ep: Endpoint, direction: Direction, packet: _Packet, what: str, applied: list[Policy],
                  profiles: Mapping[str, Profile], tiers: Mapping[str, Tier],
                  stage: Stage = "normal", prefix_notes: tuple[str, ...] = ()) -> DirectionVerdict:
    """A normal endpoint chain: tiers with their end-of-tier verdicts, then the profiles."""
    groups = tiered(applied, tiers)
    ids = tuple(p.id for _, group in groups for p in group)

    def verdict(allowed: bool, decided_by: DecidedBy, policy_id: str | None, rule_index: int | None,
                action: str | None, reason: str, profile: str | None = None,
                tier: str | None = None) -> DirectionVerdict:
        return DirectionVerdict(allowed, decided_by, policy_id, rule_index, action,
                                "; ".join((*prefix_notes, reason)), direction=direction, endpoint=ep.id,
                                policies=ids, profile=profile, tier=tier, stage=stage)

    outcome = _walk_tiers(ep, direction, packet, what, groups, end_of_tier=True)
    if outcome.allowed is not None:
        assert outcome.decided_by is not None
        return verdict(outcome.allowed, outcome.decided_by, outcome.policy_id, outcome.rule_index,
                       outcome.action, "; ".join((*outcome.passed, outcome.reason)), tier=outcome.tier)
    prefix = "; ".join(outcome.passed) if outcome.passed else f"no policy selects {ep.id}"
    missing: list[str] = []
    for name in ep.profiles:
        profile = profiles.get(name)
        if profile is None:
            missing.append(name)
            continue
        for index, rule in enumerate(_rules_of(profile, direction)):
            why = match_rule(rule, packet, direction)
            if why is None or rule.action in ("Log", "Pass"):
                continue
            allowed = rule.action == "Allow"
            return verdict(allowed, "profile", None, index, rule.action,
                           f"{prefix}; profile {name} {'allows' if allowed else 'denies'}", profile=name)
    note = f" (profile {', '.join(missing)} not found)" if missing else ""
    if not ep.profiles:
        note = " (the endpoint has no profiles)"
    return verdict(False, "no-profile", None, None, None, f"{prefix}; no profile allows {what}{note}")


# -- host endpoints ---------------------------------------------------------------------------------


def host_policies(hep: HostEndpoint, direction: Direction, policies: Iterable[Policy],
                  stage: Stage) -> list[Policy]:
    """The policies of one of a host endpoint's chains (Felix's calc splits them by kind)."""
    def wanted(p: Policy) -> bool:
        if stage == "untracked":
            return p.do_not_track
        if stage == "pre-dnat":
            return p.pre_dnat and direction == "Ingress"
        if stage == "forward":
            return p.apply_on_forward and not (p.pre_dnat or p.do_not_track)
        return not (p.pre_dnat or p.do_not_track)
    return sorted((p for p in policies if wanted(p) and direction in p.types and applies(p, hep.endpoint)),
                  key=Policy.sort_key)


def _failsafe(packet: _Packet, direction: Direction, table: str,
              inbound: tuple[tuple[str, int], ...], outbound: tuple[tuple[str, int], ...]) -> str | None:
    """The failsafe entry that lets this packet through (Felix's cali-failsafe-in/out; in the raw
    table also the other direction's ports as source ports, for the replies)."""
    proto = _PROTO_NAMES.get(packet.proto)
    if proto is None:
        return None
    dst_ports = inbound if direction == "Ingress" else outbound
    for p, port in dst_ports:
        if p == proto and packet.dst.port == port:
            return f"failsafe {'inbound' if direction == 'Ingress' else 'outbound'} {proto}/{port}"
    if table == "raw":
        src_ports = outbound if direction == "Ingress" else inbound
        for p, port in src_ports:
            if p == proto and packet.src.port == port:
                return f"failsafe reply from {proto}/{port}"
    return None


_PROTO_NAMES = {6: "tcp", 17: "udp", 132: "sctp"}


def _host_direction(hep: HostEndpoint, direction: Direction, packet: _Packet, what: str,
                    policies: list[Policy], profiles: Mapping[str, Profile], tiers: Mapping[str, Tier],
                    failsafe_in: tuple[tuple[str, int], ...], failsafe_out: tuple[tuple[str, int], ...],
                    forward: bool = False) -> DirectionVerdict:
    """A host endpoint's verdict on a packet to the host (Ingress) or from it (Egress), or on a
    packet forwarded in through it (forward): raw, then mangle (ingress), then filter."""
    ep = hep.endpoint
    notes: list[str] = []

    def early(outcome: _Outcome, stage: Stage, ids: tuple[str, ...]) -> DirectionVerdict:
        assert outcome.allowed is not None and outcome.decided_by is not None
        return DirectionVerdict(outcome.allowed, outcome.decided_by, outcome.policy_id, outcome.rule_index,
                                outcome.action, "; ".join((*notes, *outcome.passed, outcome.reason)),
                                direction=direction, endpoint=ep.id, policies=ids, tier=outcome.tier,
                                stage=stage)

    def failsafe(table: str, stage: Stage) -> DirectionVerdict | None:
        hit = _failsafe(packet, direction, table, failsafe_in, failsafe_out)
        if hit is None:
            return None
        return DirectionVerdict(True, "failsafe", None, None, "Allow",
                                "; ".join((*notes, f"{hit}: host endpoint policy never blocks it")),
                                direction=direction, endpoint=ep.id, stage=stage)

    stages: list[tuple[Stage, str]] = []
    if not hep.all_interfaces:  # Felix ignores doNotTrack policy on a `*` host endpoint
        stages.append(("untracked", "raw"))
    if direction == "Ingress":
        stages.append(("pre-dnat", "mangle"))
    for stage, table in stages:
        applied = host_policies(hep, direction, policies, stage)
        if not applied:
            continue
        if (fs := failsafe(table, stage)) is not None:
            if table == "mangle":
                return fs
            # The raw table's failsafe ACCEPT only ends the raw table: tracked, on to the rest.
            notes.append(fs.reason.split("; ")[-1].replace(": host endpoint policy never blocks it",
                                                          ": skips doNotTrack policy"))
            continue
        kind = "doNotTrack " if stage == "untracked" else "preDNAT "
        outcome = _walk_tiers(ep, direction, packet, what, tiered(applied, tiers), end_of_tier=False, kind=kind)
        if outcome.allowed is not None:
            return early(outcome, stage, tuple(p.id for p in applied))
        notes.extend(outcome.passed)
    if forward:
        applied = host_policies(hep, direction, policies, "forward")
        if not applied:
            return DirectionVerdict(True, "forward-default", None, None, None,
                                    "; ".join((*notes, f"no applyOnForward policy selects {ep.id}: "
                                               "forwarded traffic is allowed")),
                                    direction=direction, endpoint=ep.id, stage="forward")
        outcome = _walk_tiers(ep, direction, packet, what, tiered(applied, tiers), end_of_tier=True)
        if outcome.allowed is not None:
            return early(outcome, "forward", tuple(p.id for p in applied))
        # Forward chains have no profiles and no final drop: the packet leaves felixpy's
        # FORWARD rules undecided.
        return DirectionVerdict(True, "forward-default", None, None, None,
                                "; ".join((*notes, *outcome.passed, "no applyOnForward policy decided: "
                                           "the FORWARD chain's own rules decide")),
                                direction=direction, endpoint=ep.id, stage="forward")
    if (fs := failsafe("filter", "normal")) is not None:
        return fs
    return _normal_chain(ep, direction, packet, what, host_policies(hep, direction, policies, "normal"),
                         profiles, tiers, "normal", tuple(notes))


# -- explain ----------------------------------------------------------------------------------------


def _endpoint_of(peer: Peer) -> Endpoint | None:
    if isinstance(peer, HostEndpoint):
        return peer.endpoint
    return peer if isinstance(peer, Endpoint) else None


def _side(peer: Peer, port: int | None, others: tuple[Endpoint, ...], ip_version: int | None = None) -> _Side:
    ep = _endpoint_of(peer)
    if ep is not None:
        ips = [ipaddress.ip_interface(a).ip for a in ep.ips]
        ip = next((a for a in ips if ip_version is None or a.version == ip_version), None)
    else:
        assert isinstance(peer, str)
        ip = ipaddress.ip_address(peer)
    holders = tuple(o for o in others if o is not ep and ip is not None and _in_nets(ip, o.ips) is not None)
    return _Side(ip, ep, port, holders)


def _name(peer: Peer) -> str:
    if isinstance(peer, HostEndpoint):
        return f"hostendpoint/{peer.name}"
    return peer.id if isinstance(peer, Endpoint) else str(peer)


def _not_policed(ep: Endpoint, direction: Direction, reason: str) -> DirectionVerdict:
    return DirectionVerdict(True, "not-policed", None, None, None, reason, direction=direction, endpoint=ep.id)


def explain(
    src: Peer,
    dst: Peer,
    port: int,
    protocol: str,
    *,
    policies: Iterable[Policy] | Mapping[str, Policy],
    profiles: Iterable[Profile] | Mapping[str, Profile],
    tiers: Iterable[Tier] | Mapping[str, Tier] = (),
    src_port: int | None = None,
    icmp_type: int | None = 8,
    icmp_code: int | None = 0,
    via: HostEndpoint | None = None,
    failsafe_inbound: tuple[tuple[str, int], ...] = DEFAULT_FAILSAFE_INBOUND,
    failsafe_outbound: tuple[tuple[str, int], ...] = DEFAULT_FAILSAFE_OUTBOUND,
    others: Iterable[Endpoint] = (),
    ip_version: int | None = None,
) -> Verdict:
    """Is a packet from src to dst on port/protocol allowed, and what decided it?

    src / dst: an Endpoint (a pod), a HostEndpoint (the host itself, through that interface), or
    an IP address text for something that is not an endpoint (its side is not policed).
    via: the packet enters the node through this host endpoint and is forwarded to dst.
    src_port: the source port, only needed for rules that match source ports (and the raw
    table's failsafe replies). ICMP defaults to an echo request (type 8 code 0).
    others: the network sets and host endpoints of the cluster: an address inside one of their
    nets / expectedIPs matches the selectors that select them, as their ipset members do.
    ip_version: the packet's family (an endpoint's address of that family is used); by default
    the family of an IP address given as src or dst, else the endpoints' first addresses.
    """
    proto = protocol_number(protocol_name(protocol))
    if ip_version is None:
        literal = next((p for p in (src, dst) if isinstance(p, str)), None)
        ip_version = ipaddress.ip_address(literal).version if literal is not None else None
    policy_list = list(policies.values()) if isinstance(policies, Mapping) else list(policies)
    profile_map = dict(profiles) if isinstance(profiles, Mapping) else {p.name: p for p in profiles}
    tier_map = dict(tiers) if isinstance(tiers, Mapping) else {t.name: t for t in tiers}
    dst_port = port if proto in _PORT_PROTOCOLS else None
    holders = tuple(others)
    packet = _Packet(proto, _side(src, src_port, holders, ip_version), _side(dst, dst_port, holders, ip_version),
                     icmp_type, icmp_code)
    pname = protocol_name(protocol).lower()
    what = f"{pname}/{port}" if proto in _PORT_PROTOCOLS else pname
    egress = ingress = forward = None
    failsafes = (failsafe_inbound, failsafe_outbound)
    src_ep, dst_ep = _endpoint_of(src), _endpoint_of(dst)
    same_node = src_ep is not None and dst_ep is not None and src_ep.node is not None and src_ep.node == dst_ep.node
    if isinstance(src, HostEndpoint) and isinstance(dst, Endpoint) and same_node:
        # cali-OUTPUT returns for `-o cali+`: a host talking to its own pods is not policed.
        reason = "traffic from a host to its own workloads is not policed"
        return Verdict(True, _not_policed(src.endpoint, "Egress", reason), _not_policed(dst, "Ingress", reason),
                       _name(src), _name(dst), port, pname)
    if isinstance(src, HostEndpoint):
        egress = _host_direction(src, "Egress", packet, f"{what} to {_name(dst)}", policy_list, profile_map,
                                 tier_map, *failsafes)
    elif isinstance(src, Endpoint):
        egress = _evaluate_direction(src, "Egress", packet, f"{what} to {_name(dst)}", policy_list, profile_map,
                                     tier_map)
    if isinstance(dst, HostEndpoint):
        if isinstance(src, Endpoint) and same_node:
            # cali-INPUT sends `-i cali+` to cali-wl-to-host before any host endpoint policy.
            ingress = _not_policed(dst.endpoint, "Ingress", "traffic from a workload to its own host is not "
                                   "subject to host endpoint policy (DefaultEndpointToHostAction decides)")
        else:
            ingress = _host_direction(dst, "Ingress", packet, f"{what} from {_name(src)}", policy_list,
                                      profile_map, tier_map, *failsafes)
    elif isinstance(dst, Endpoint):
        ingress = _evaluate_direction(dst, "Ingress", packet, f"{what} from {_name(src)}", policy_list,
                                      profile_map, tier_map)
    if via is not None:
        forward = _host_direction(via, "Ingress", packet, f"{what} from {_name(src)} forwarded to {_name(dst)}",
                                  policy_list, profile_map, tier_map, *failsafes, forward=True)
    allowed = all(v.allowed for v in (egress, ingress, forward) if v is not None)
    return Verdict(allowed, egress, ingress, _name(src), _name(dst), port, pname, forward)


def reachable(src: Peer, dst: Peer, port: int, protocol: str, *,
              policies: Iterable[Policy] | Mapping[str, Policy],
              profiles: Iterable[Profile] | Mapping[str, Profile],
              tiers: Iterable[Tier] | Mapping[str, Tier] = ()) -> bool:
    """explain(...).allowed, for tables of expectations."""
    return explain(src, dst, port, protocol, policies=policies, profiles=profiles, tiers=tiers).allowed
