"""The reference evaluator: what the policy model (policy/model.py) says about one packet.

`explain(src, dst, port, protocol, policies=..., profiles=...)` walks the same steps as the
endpoint chains the renderer writes: the source endpoint's egress policies, then the destination
endpoint's ingress policies, each in order; the first matching rule of a policy decides, the end
of the tier drops when a policy selected the endpoint but nothing allowed, and the namespace
profiles decide when no policy selected it. The answer names what decided it, so
`felixctl policy explain` can say why.

match_endpoint() is THE definition of "this endpoint matches that rule selector": the ipset
members the renderer computes come from it too, so explain and the kernel agree.

Selectors see an endpoint's labels plus its namespace's labels with Calico's "pcns." prefix
(profile labelsToApply are inherited labels in Calico); the endpoint's own labels win.
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
from policy.calico import NAMESPACE_LABEL_PREFIX, ORCHESTRATOR_LABEL, protocol_name, protocol_number
from policy.model import (
    Direction,
    Endpoint,
    EndpointMatch,
    EntityRule,
    ICMPMatch,
    NamedPort,
    Policy,
    Port,
    PortRange,
    Profile,
    Rule,
)

DecidedBy = Literal["policy", "end-of-tier", "profile", "no-profile"]
Peer = Union[Endpoint, str]
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- selectors --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=65536)
def selector_labels(ep: Endpoint) -> Mapping[str, str]:
    """The labels selectors see: namespace labels as pcns.<key>, then the endpoint's own labels."""
    labels = {NAMESPACE_LABEL_PREFIX + k: v for k, v in ep.namespace_labels}
    labels.update(ep.labels)
    return labels


@functools.lru_cache(maxsize=65536)
def _namespace_labels(ep: Endpoint) -> Mapping[str, str]:
    return dict(ep.namespace_labels)


def match_endpoint(match: EndpointMatch, ep: Endpoint) -> bool:
    """Whether a rule's endpoint selector (with its namespace scoping) selects ep."""
    if match.namespace is not None and ep.namespace != match.namespace:
        return False
    if match.namespace_selector is not None and not selectors.parse(match.namespace_selector).evaluate(
        _namespace_labels(ep)
    ):
        return False
    return selectors.parse(match.selector).evaluate(selector_labels(ep))


def applies(policy: Policy, ep: Endpoint) -> bool:
    """Whether the policy selects the endpoint (either direction)."""
    if policy.namespace is not None and ep.namespace != policy.namespace:
        return False
    if policy.namespace_selector is not None and not selectors.parse(policy.namespace_selector).evaluate(
        _namespace_labels(ep)
    ):
        return False
    return selectors.parse(policy.selector).evaluate(selector_labels(ep))


def policies_for(ep: Endpoint, direction: Direction, policies: Iterable[Policy]) -> list[Policy]:
    """The policies that police ep in this direction, in the order they run."""
    return sorted((p for p in policies if direction in p.types and applies(p, ep)), key=Policy.sort_key)


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
    """One end of the packet: its address, its endpoint (None for a plain IP), its port."""

    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    endpoint: Endpoint | None
    port: int | None


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
        if side.endpoint is None or not match_endpoint(er.endpoints, side.endpoint):
            return None
        why.append(describe_endpoints(er.endpoints))
    if er.not_endpoints is not None:
        if side.endpoint is not None and match_endpoint(er.not_endpoints, side.endpoint):
            return None
        why.append(f"not {describe_selector(er.not_endpoints.selector)}")
    if er.nets:
        net = _in_nets(side.ip, er.nets)
        if net is None:
            return None
        why.append(f"net {net}")
    if er.not_nets:
        if _in_nets(side.ip, er.not_nets) is not None:
            return None
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


def match_rule(rule: Rule, packet: _Packet, direction: Direction) -> str | None:
    """None if the rule does not match, else a phrase naming what matched."""
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


def _evaluate_direction(
    ep: Endpoint,
    direction: Direction,
    packet: _Packet,
    what: str,
    policies: list[Policy],
    profiles: Mapping[str, Profile],
) -> DirectionVerdict:
    applied = policies_for(ep, direction, policies)
    ids = tuple(p.id for p in applied)

    def verdict(allowed: bool, decided_by: DecidedBy, policy_id: str | None, rule_index: int | None,
                action: str | None, reason: str, profile: str | None = None) -> DirectionVerdict:
        return DirectionVerdict(allowed, decided_by, policy_id, rule_index, action, reason,
                                direction=direction, endpoint=ep.id, policies=ids, profile=profile)

    passed: str | None = None
    for pol in applied:
        for index, rule in enumerate(_rules_of(pol, direction)):
            why = match_rule(rule, packet, direction)
            if why is None or rule.action == "Log":
                continue  # Log rules log and carry on, as in the chain
            if rule.action == "Allow":
                return verdict(True, "policy", pol.id, index, "Allow", f"allowed by policy {pol.id} rule {index} ({why})")
            if rule.action == "Deny":
                return verdict(False, "policy", pol.id, index, "Deny", f"denied by policy {pol.id} rule {index} ({why})")
            passed = f"policy {pol.id} rule {index} passed ({why})"
            break
        if passed is not None:
            break
    if applied and passed is None:
        names = ", ".join(ids)
        subject = f"policy {names} selects" if len(ids) == 1 else f"policies {names} select"
        return verdict(False, "end-of-tier", ids[0], None, None,
                       f"end of tier: {subject} {ep.id} but no rule allowed {what}")
    prefix = passed if passed is not None else f"no policy selects {ep.id}"
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


# -- explain ----------------------------------------------------------------------------------------


def _side(peer: Peer, port: int | None) -> _Side:
    if isinstance(peer, Endpoint):
        ip = ipaddress.ip_interface(peer.ips[0]).ip if peer.ips else None
        return _Side(ip, peer, port)
    return _Side(ipaddress.ip_address(peer), None, port)


def _name(peer: Peer) -> str:
    return peer.id if isinstance(peer, Endpoint) else str(peer)


def explain(
    src: Peer,
    dst: Peer,
    port: int,
    protocol: str,
    *,
    policies: Iterable[Policy] | Mapping[str, Policy],
    profiles: Iterable[Profile] | Mapping[str, Profile],
    src_port: int | None = None,
    icmp_type: int | None = 8,
    icmp_code: int | None = 0,
) -> Verdict:
    """Is a packet from src to dst on port/protocol allowed, and what decided it?

    src / dst: an Endpoint, or an IP address text for something that is not an endpoint (its side
    is not policed). src_port: the source port, only needed for rules that match source ports.
    ICMP defaults to an echo request (type 8 code 0).
    """
    proto = protocol_number(protocol_name(protocol))
    policy_list = list(policies.values()) if isinstance(policies, Mapping) else list(policies)
    profile_map = dict(profiles) if isinstance(profiles, Mapping) else {p.name: p for p in profiles}
    dst_port = port if proto in _PORT_PROTOCOLS else None
    packet = _Packet(proto, _side(src, src_port), _side(dst, dst_port), icmp_type, icmp_code)
    pname = protocol_name(protocol).lower()
    what = f"{pname}/{port}" if proto in _PORT_PROTOCOLS else pname
    egress = ingress = None
    if isinstance(src, Endpoint):
        egress = _evaluate_direction(src, "Egress", packet, f"{what} to {_name(dst)}", policy_list, profile_map)
    if isinstance(dst, Endpoint):
        ingress = _evaluate_direction(dst, "Ingress", packet, f"{what} from {_name(src)}", policy_list, profile_map)
    allowed = all(v.allowed for v in (egress, ingress) if v is not None)
    return Verdict(allowed, egress, ingress, _name(src), _name(dst), port, pname)


def reachable(src: Peer, dst: Peer, port: int, protocol: str, *,
              policies: Iterable[Policy] | Mapping[str, Policy],
              profiles: Iterable[Profile] | Mapping[str, Profile]) -> bool:
    """explain(...).allowed, for tables of expectations."""
    return explain(src, dst, port, protocol, policies=policies, profiles=profiles).allowed
