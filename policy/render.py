"""Render the policy model into Felix-style filter-table chains, jump rules and IP set specs.

Pure: model values in, `policy.iptables` Chain / Rule values and `IPSetSpec`s out; no I/O and no
imports from felixpy. The agent feeds the result to the Table and IPSets drivers.

Packet walk (calico-reference §4.3, filter table, IPv4):
* FORWARD → cali-FORWARD: clear the accept and pass marks; `-i cali+` → cali-from-wl-dispatch
  (egress policy of the source pod); `-o cali+` → cali-to-wl-dispatch (ingress policy of the
  destination pod); accept when the accept mark is set. Endpoint chains RETURN on accept, so a
  pod→pod packet on one node gets the source's egress AND the destination's ingress; traffic
  that involves no workload interface passes through untouched.
* INPUT → cali-INPUT: `-i cali+` → goto cali-wl-to-host (egress policy, then
  DefaultEndpointToHostAction); then the failsafe inbound ports RETURN to the host's own rules,
  so no felixpy policing that is ever added after them (host endpoints) can cut a node off. They
  RETURN rather than ACCEPT: an ACCEPT would bypass the host's own firewall on those ports.
* OUTPUT → cali-OUTPUT: `-o cali+` RETURN (host→pod is not policed); failsafe outbound ports.
* Dispatch chains are a prefix tree over interface names (`-g` to the endpoint chain); an unknown
  interface is dropped (fail closed).
* Endpoint chains cali-tw-<if> (ingress) / cali-fw-<if> (egress): conntrack RELATED,ESTABLISHED
  accept, INVALID drop, clear marks, each applicable policy (`-j cali-pi/po-<id>` while the pass
  mark is clear, RETURN once the accept mark is set), an end-of-tier DROP when at least one policy
  applies in that direction, then the profiles, then DROP "Drop if no profiles matched".
* Policy chains: each model Rule becomes zero or more iptables rules (OR-ed nets / ports / named
  ports are expanded); Allow sets the accept mark and returns, Pass the pass mark, Deny drops, Log
  logs. A rule that can never match (ports without a port protocol, an IPv6-only net, ICMP
  fields on another protocol) renders to nothing, never to a broader rule.

Everything here is deterministic (equal input gives equal text) so callers may memoise
`policy_chains` / `profile_chains` by value and the driver's rule hashes are stable.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import ipaddress
import itertools
import logging
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from policy import model
from policy.iptables import Chain, Rule, render_chain, render_with_hash, rule_hashes
from policy.ipsets import (
    PORT_PROTOCOLS,
    IPSetSpec,
    named_port_set_name,
    selector_set_name,
)
from policy.names import MAX_CHAIN_NAME, check_chain_name

__all__ = [
    "ACCEPT_MARK",
    "PASS_MARK",
    "SCRATCH_MARK",
    "EndpointChains",
    "FilterTable",
    "IPSetSpec",
    "RenderConfig",
    "dispatch_chains",
    "endpoint_chain_name",
    "endpoint_chains",
    "ipsets_for_policy",
    "ipsets_for_profile",
    "jump_rules",
    "length_limited_name",
    "policy_chain_name",
    "policy_chains",
    "profile_chain_name",
    "profile_chains",
    "render_filter_table",
    "restore_text",
    "static_chains",
]

log = logging.getLogger(__name__)

# Mark bits (calico-reference §4.2, inside Felix's IptablesMarkMask 0xffff0000).
ACCEPT_MARK = 0x10000
PASS_MARK = 0x20000
SCRATCH_MARK = 0x40000  # "not in any of these nets" blocks inside one policy rule

TIER = "default"
LOG_PREFIX = "calico-packet: "
MULTIPORT_MAX = 15  # iptables multiport: 15 entries, a range counts as two
DISPATCH_FANOUT = 16  # a dispatch chain with more interfaces than this is split by next character

CHAIN_INPUT = "cali-INPUT"
CHAIN_FORWARD = "cali-FORWARD"
CHAIN_OUTPUT = "cali-OUTPUT"
CHAIN_WL_TO_HOST = "cali-wl-to-host"
CHAIN_FAILSAFE_IN = "cali-failsafe-in"
CHAIN_FAILSAFE_OUT = "cali-failsafe-out"
CHAIN_FROM_WL_DISPATCH = "cali-from-wl-dispatch"
CHAIN_TO_WL_DISPATCH = "cali-to-wl-dispatch"

POLICY_IN_PREFIX = "cali-pi-"
POLICY_OUT_PREFIX = "cali-po-"
PROFILE_IN_PREFIX = "cali-pri-"
PROFILE_OUT_PREFIX = "cali-pro-"
TO_WORKLOAD_PREFIX = "cali-tw-"
FROM_WORKLOAD_PREFIX = "cali-fw-"

EndpointToHostAction = Literal["DROP", "RETURN", "ACCEPT"]
_ENDPOINT_TO_HOST_ACTIONS = ("DROP", "RETURN", "ACCEPT")
_SAFE_SUFFIX_RE = re.compile(r"[A-Za-z0-9._/-]*")
_IFACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")

_PROTOCOL_NAMES = {"tcp": "tcp", "udp": "udp", "sctp": "sctp", "udplite": "udplite",
                   "icmp": "icmp", "icmpv6": "icmpv6"}
_PROTOCOL_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "136": "udplite", "1": "icmp",
                     "58": "icmpv6"}
_MULTIPORT_PROTOCOLS = ("tcp", "udp", "sctp", "udplite")


# -- values ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EndpointChains:
    """What one local endpoint needs: its interface and the policies/profiles that apply, in order."""

    iface: str
    ingress: tuple[str, ...] = ()  # policy ids, already in evaluation order
    egress: tuple[str, ...] = ()
    profiles: tuple[str, ...] = ()


_DEFAULT_FAILSAFE_IN: tuple[tuple[str, int], ...] = (
    ("tcp", 22), ("udp", 68), ("tcp", 179), ("tcp", 2379), ("tcp", 2380), ("tcp", 5473),
    ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)
_DEFAULT_FAILSAFE_OUT: tuple[tuple[str, int], ...] = (
    ("udp", 53), ("udp", 67), ("tcp", 179), ("tcp", 2379), ("tcp", 2380), ("tcp", 5473),
    ("tcp", 6443), ("tcp", 6666), ("tcp", 6667),
)


@dataclass(frozen=True)
class RenderConfig:
    iface_prefix: str = "cali"
    default_endpoint_to_host_action: EndpointToHostAction = "DROP"
    failsafe_inbound: tuple[tuple[str, int], ...] = _DEFAULT_FAILSAFE_IN
    failsafe_outbound: tuple[tuple[str, int], ...] = _DEFAULT_FAILSAFE_OUT

    def __post_init__(self) -> None:
        if not _IFACE_RE.fullmatch(self.iface_prefix):
            raise ValueError(f"invalid interface prefix {self.iface_prefix!r}")
        if self.default_endpoint_to_host_action not in _ENDPOINT_TO_HOST_ACTIONS:
            raise ValueError(
                f"DefaultEndpointToHostAction {self.default_endpoint_to_host_action!r} must be one "
                f"of {', '.join(_ENDPOINT_TO_HOST_ACTIONS)}"
            )
        for proto, port in (*self.failsafe_inbound, *self.failsafe_outbound):
            if proto not in PORT_PROTOCOLS or not 1 <= port <= 65535:
                raise ValueError(f"invalid failsafe port {proto}:{port}")


@dataclass(frozen=True)
class FilterTable:
    """Everything the filter table needs: our chains, our jump rules, the IP sets they use."""

    chains: dict[str, Chain] = field(default_factory=dict)
    jumps: dict[str, list[Rule]] = field(default_factory=dict)
    ipsets: dict[str, IPSetSpec] = field(default_factory=dict)


# -- names -----------------------------------------------------------------------------------------


def length_limited_name(prefix: str, suffix: str, max_length: int = MAX_CHAIN_NAME) -> str:
    """`prefix + suffix`, or `prefix + "_" + base64url(sha256(suffix))` cut to fit (Felix's scheme).

    Suffixes starting with "_" are always hashed so a hashed name never equals a plain one; so
    are suffixes with characters iptables-restore might split on.
    """
    if (
        len(prefix) + len(suffix) > max_length
        or suffix.startswith("_")
        or not _SAFE_SUFFIX_RE.fullmatch(suffix)
    ):
        digest = base64.urlsafe_b64encode(hashlib.sha256(suffix.encode()).digest()).decode()
        return prefix + "_" + digest[: max_length - len(prefix) - 1]
    return prefix + suffix


@functools.lru_cache(maxsize=16384)
def policy_chain_name(policy_id: str, direction: model.Direction) -> str:
    prefix = POLICY_IN_PREFIX if direction == "Ingress" else POLICY_OUT_PREFIX
    return check_chain_name(length_limited_name(prefix, policy_id))


@functools.lru_cache(maxsize=16384)
def profile_chain_name(profile: str, direction: model.Direction) -> str:
    prefix = PROFILE_IN_PREFIX if direction == "Ingress" else PROFILE_OUT_PREFIX
    return check_chain_name(length_limited_name(prefix, profile))


def endpoint_chain_name(iface: str, direction: model.Direction) -> str:
    """cali-tw-<iface> (to the workload: ingress) or cali-fw-<iface> (from it: egress)."""
    prefix = TO_WORKLOAD_PREFIX if direction == "Ingress" else FROM_WORKLOAD_PREFIX
    return check_chain_name(length_limited_name(prefix, _check_iface(iface)))


def _check_iface(iface: str) -> str:
    if not _IFACE_RE.fullmatch(iface):
        raise ValueError(f"invalid interface name {iface!r}")
    return iface


def _mark(bits: int) -> str:
    return f"-m mark --mark {bits:#x}/{bits:#x}"


def _mark_clear(bits: int) -> str:
    return f"-m mark --mark 0x0/{bits:#x}"


def _set_mark(bits: int) -> str:
    return f"MARK --set-xmark {bits:#x}/{bits:#x}"


def _clear_mark(bits: int) -> str:
    return f"MARK --set-xmark 0x0/{bits:#x}"


# -- policy and profile rules ----------------------------------------------------------------------


def _protocol(text: str | None) -> str | None:
    """iptables' spelling of a model protocol; ValueError for one that does not exist."""
    if text is None:
        return None
    lowered = text.strip().lower()
    if lowered in _PROTOCOL_NAMES:
        return _PROTOCOL_NAMES[lowered]
    if lowered.isdigit() and int(lowered) <= 255:
        return _PROTOCOL_NUMBERS.get(str(int(lowered)), str(int(lowered)))
    raise ValueError(f"unknown protocol {text!r} (TCP, UDP, SCTP, UDPLite, ICMP or 0-255)")


@functools.lru_cache(maxsize=8192)
def _net(text: str) -> str | None:
    """The canonical IPv4 CIDR, or None for an IPv6 one (our rules are IPv4)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r} in policy rule") from None
    return str(net) if net.version == 4 else None


def _v4_nets(nets: Sequence[str]) -> list[str]:
    return [n for n in map(_net, nets) if n is not None]


def _port_text(port: model.PortRange) -> str:
    if not 0 <= port.first <= port.last <= 65535:
        raise ValueError(f"invalid port range {port.first}:{port.last}")
    return str(port.first) if port.first == port.last else f"{port.first}:{port.last}"


def _multiport_chunks(ports: Iterable[model.PortRange]) -> list[str]:
    """Comma lists of at most MULTIPORT_MAX entries (a range counts twice)."""
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for port in ports:
        cost = 1 if port.first == port.last else 2
        if used + cost > MULTIPORT_MAX:
            chunks.append(",".join(current))
            current, used = [], 0
        current.append(_port_text(port))
        used += cost
    if current:
        chunks.append(",".join(current))
    return chunks


class _Never(Exception):
    """The rule cannot match any IPv4 packet: render nothing."""


@dataclass
class _Side:
    """One of a rule's source / destination, turned into match text."""

    flag: str  # "src" / "dst"
    net_alternatives: list[str]  # OR; [""] when unconstrained
    inline_not_nets: list[str]
    block_not_nets: list[str]  # handled with the scratch mark
    set_matches: list[str]  # AND
    port_alternatives: list[str]  # OR; [""] when unconstrained
    not_port_matches: list[str]  # AND


def _side(
    entity: model.EntityRule, flag: str, proto: str | None, ipsets: dict[str, IPSetSpec]
) -> _Side:
    addr = "-s" if flag == "src" else "-d"
    nets = _v4_nets(entity.nets)
    if entity.nets and not nets:
        raise _Never  # only IPv6 nets
    not_nets = _v4_nets(entity.not_nets)
    inline = not_nets if (len(not_nets) == 1 and not nets) else []
    block = [] if inline else not_nets

    sets: list[str] = []
    if entity.endpoints is not None:
        name = selector_set_name(entity.endpoints)
        ipsets[name] = IPSetSpec("hash:net", entity.endpoints)
        sets.append(f"-m set --match-set {name} {flag}")
    if entity.not_endpoints is not None:
        name = selector_set_name(entity.not_endpoints)
        ipsets[name] = IPSetSpec("hash:net", entity.not_endpoints)
        sets.append(f"-m set ! --match-set {name} {flag}")

    ports_flag = "--sports" if flag == "src" else "--dports"

    def named(port: model.NamedPort) -> str | None:
        if proto not in PORT_PROTOCOLS:
            return None  # no container port has this protocol: the set would always be empty
        set_name = named_port_set_name(entity.endpoints, port.name, proto)
        ipsets[set_name] = IPSetSpec("hash:ip,port", entity.endpoints, port.name, proto)
        return set_name

    port_alts: list[str] = [
        f"-m multiport {ports_flag} {chunk}"
        for chunk in _multiport_chunks(p for p in entity.ports if isinstance(p, model.PortRange))
    ]
    for port in entity.ports:
        if isinstance(port, model.NamedPort) and (port_set := named(port)) is not None:
            port_alts.append(f"-m set --match-set {port_set} {flag},{flag}")
    if entity.ports and not port_alts:
        raise _Never
    not_ports: list[str] = [
        f"-m multiport ! {ports_flag} {chunk}"
        for chunk in _multiport_chunks(
            p for p in entity.not_ports if isinstance(p, model.PortRange)
        )
    ]
    for port in entity.not_ports:
        if isinstance(port, model.NamedPort) and (port_set := named(port)) is not None:
            not_ports.append(f"-m set ! --match-set {port_set} {flag},{flag}")

    return _Side(
        flag=flag,
        net_alternatives=[f"{addr} {n}" for n in nets] or [""],
        inline_not_nets=[f"! {addr} {n}" for n in inline],
        block_not_nets=[f"{addr} {n}" for n in block],
        set_matches=sets,
        port_alternatives=port_alts or [""],
        not_port_matches=not_ports,
    )


def _icmp_match(icmp: model.ICMPMatch, negate: bool) -> str | None:
    """`-m icmp [!] --icmp-type t[/c]`, or None when the match is "any ICMP" (type unset)."""
    if icmp.type is None:
        if icmp.code is not None:
            raise ValueError("an ICMP code needs an ICMP type")
        return None
    if not 0 <= icmp.type <= 255 or (icmp.code is not None and not 0 <= icmp.code <= 255):
        raise ValueError(f"invalid ICMP type/code {icmp.type}/{icmp.code}")
    value = str(icmp.type) if icmp.code is None else f"{icmp.type}/{icmp.code}"
    return f"-m icmp {'! ' if negate else ''}--icmp-type {value}"


def _action_rules(action: model.Action) -> tuple[str, Rule | None]:
    """The action of each expanded rule, and the rule that follows the group (if any)."""
    if action == "Allow":
        return _set_mark(ACCEPT_MARK), Rule(_mark(ACCEPT_MARK), "RETURN")
    if action == "Pass":
        return _set_mark(PASS_MARK), Rule(_mark(PASS_MARK), "RETURN")
    if action == "Deny":
        return "DROP", None
    if action == "Log":
        return f'LOG --log-prefix "{LOG_PREFIX}" --log-level 5', None
    raise ValueError(f"unknown rule action {action!r} (Allow, Deny, Log or Pass)")


def _protocol_variants(rule: model.Rule) -> list[tuple[str | None, list[str]]]:
    """OR-ed (protocol, protocol and ICMP match parts) pairs for a rule; [] when it cannot match.

    Mirrors policy.evaluate.match_rule for IPv4: ports without a protocol mean any port protocol,
    ICMP fields without one mean ICMP, a notICMP only constrains ICMP packets.
    """
    proto = _protocol(rule.protocol)
    not_proto = _protocol(rule.not_protocol)
    if proto == "icmpv6" or (proto is not None and proto == not_proto):
        return []
    if not_proto == "icmpv6" or proto is not None:
        not_proto = None  # always true for IPv4, or implied by the positive protocol
    src, dst = rule.source, rule.destination
    icmp = _icmp_match(rule.icmp, False) if rule.icmp is not None else None
    not_icmp = _icmp_match(rule.not_icmp, True) if rule.not_icmp is not None else None

    if any((src.ports, src.not_ports, dst.ports, dst.not_ports)):
        if rule.icmp is not None:
            return []  # ICMP packets have no ports
        if proto is None:
            return [(p, [f"-p {p}"]) for p in _MULTIPORT_PROTOCOLS if p != not_proto]
        return [(proto, [f"-p {proto}"])] if proto in _MULTIPORT_PROTOCOLS else []
    if rule.icmp is not None:
        if proto not in (None, "icmp") or not_proto == "icmp":
            return []
        if rule.not_icmp is not None and not_icmp is None:
            return []  # "not any ICMP" on an ICMP packet
        return [("icmp", ["-p icmp", *(m for m in (icmp, not_icmp) if m is not None)])]
    if rule.not_icmp is not None and proto in (None, "icmp") and not_proto != "icmp":
        if proto == "icmp":
            return [("icmp", ["-p icmp", not_icmp])] if not_icmp is not None else []
        if not_proto is not None:
            raise ValueError("notICMP together with notProtocol needs a protocol")
        non_icmp: tuple[str | None, list[str]] = (None, ["! -p icmp"])
        return [("icmp", ["-p icmp", not_icmp]), non_icmp] if not_icmp is not None else [non_icmp]
    if proto is not None:
        return [(proto, [f"-p {proto}"])]
    return [(None, [f"! -p {not_proto}"] if not_proto else [])]


def _render_rule(rule: model.Rule, ipsets: dict[str, IPSetSpec]) -> list[Rule]:
    """The iptables rules for one model rule (empty when it can never match an IPv4 packet).

    IP set specs the rules reference are added to `ipsets` only when rules are produced.
    """
    action, after = _action_rules(rule.action)
    wanted: dict[str, IPSetSpec] = {}
    matches: list[str] = []
    block: list[str] = []  # the "not in net" matches that need the scratch mark
    for proto, head in _protocol_variants(rule):
        try:
            src = _side(rule.source, "src", proto, wanted)
            dst = _side(rule.destination, "dst", proto, wanted)
        except _Never:
            continue
        tail_mark: list[str] = []
        if src.block_not_nets or dst.block_not_nets:
            block = src.block_not_nets + dst.block_not_nets
            tail_mark.append(_mark(SCRATCH_MARK))
        sets = src.set_matches + dst.set_matches
        for src_net, dst_net, src_port, dst_port in itertools.product(
            src.net_alternatives, dst.net_alternatives, src.port_alternatives, dst.port_alternatives
        ):
            parts = [
                *head[:1],
                src_net,
                *src.inline_not_nets,
                dst_net,
                *dst.inline_not_nets,
                *sets,
                src_port,
                *src.not_port_matches,
                dst_port,
                *dst.not_port_matches,
                *head[1:],
                *tail_mark,
            ]
            matches.append(" ".join(p for p in parts if p))
    if not matches:
        return []
    out: list[Rule] = []
    if block:
        # AND of several "not in net" terms: set the scratch bit, clear it for each excluded net,
        # then require it (iptables takes one -s / -d per rule).
        out.append(Rule("", _set_mark(SCRATCH_MARK)))
        out.extend(Rule(net, _clear_mark(SCRATCH_MARK)) for net in block)
    out.extend(Rule(match, action) for match in matches)
    if after is not None:
        out.append(after)
    ipsets.update(wanted)
    return out


def _render_rules(rules: Iterable[model.Rule], ipsets: dict[str, IPSetSpec]) -> tuple[Rule, ...]:
    out: list[Rule] = []
    for rule in rules:
        out.extend(_render_rule(rule, ipsets))
    return tuple(out)


def _directions(policy: model.Policy) -> list[tuple[model.Direction, tuple[model.Rule, ...]]]:
    out: list[tuple[model.Direction, tuple[model.Rule, ...]]] = []
    if "Ingress" in policy.types:
        out.append(("Ingress", policy.ingress))
    if "Egress" in policy.types:
        out.append(("Egress", policy.egress))
    return out


def policy_chains(policy: model.Policy) -> list[Chain]:
    """cali-pi-<id> for an Ingress policy, cali-po-<id> for an Egress one (both when both)."""
    sink: dict[str, IPSetSpec] = {}
    return [
        Chain(policy_chain_name(policy.id, direction), _render_rules(rules, sink))
        for direction, rules in _directions(policy)
    ]


def ipsets_for_policy(policy: model.Policy) -> dict[str, IPSetSpec]:
    """The IP sets policy_chains(policy) references, by name."""
    ipsets: dict[str, IPSetSpec] = {}
    for _, rules in _directions(policy):
        _render_rules(rules, ipsets)
    return ipsets


def profile_chains(profile: model.Profile) -> list[Chain]:
    """cali-pri-<name> and cali-pro-<name> (e.g. cali-pri-kns.default)."""
    sink: dict[str, IPSetSpec] = {}
    return [
        Chain(profile_chain_name(profile.name, "Ingress"), _render_rules(profile.ingress, sink)),
        Chain(profile_chain_name(profile.name, "Egress"), _render_rules(profile.egress, sink)),
    ]


def ipsets_for_profile(profile: model.Profile) -> dict[str, IPSetSpec]:
    ipsets: dict[str, IPSetSpec] = {}
    _render_rules(profile.ingress, ipsets)
    _render_rules(profile.egress, ipsets)
    return ipsets


# -- endpoint chains -------------------------------------------------------------------------------

_CONNTRACK_ACCEPT = Rule("-m conntrack --ctstate RELATED,ESTABLISHED", "ACCEPT")
_CONNTRACK_DROP = Rule("-m conntrack --ctstate INVALID", "DROP")
_CLEAR_MARKS = Rule("", _clear_mark(ACCEPT_MARK | PASS_MARK))
_POLICY_ACCEPTED = Rule(_mark(ACCEPT_MARK), "RETURN", "Return if policy accepted")
_END_OF_TIER = Rule(
    _mark_clear(PASS_MARK), "DROP", f"End of tier {TIER}. Drop if no policies passed packet"
)
_PROFILE_ACCEPTED = Rule(_mark(ACCEPT_MARK), "RETURN", "Return if profile accepted")
_NO_PROFILE = Rule("", "DROP", "Drop if no profiles matched")


def _endpoint_chain(
    name: str,
    direction: model.Direction,
    policy_ids: Sequence[str],
    policies: Mapping[str, model.Policy],
    profiles: Sequence[str],
    known_profiles: Container[str] | None,
) -> Chain:
    rules = [_CONNTRACK_ACCEPT, _CONNTRACK_DROP, _CLEAR_MARKS]
    applying = 0
    for policy_id in policy_ids:
        policy = policies.get(policy_id)
        if policy is None:
            # Fail closed: count it (so the end-of-tier DROP stays) but do not jump to a chain
            # that does not exist.
            log.warning("endpoint policy missing chain=%s policy=%s", name, policy_id)
            applying += 1
            continue
        if direction not in policy.types:
            continue
        applying += 1
        rules.append(Rule(_mark_clear(PASS_MARK), policy_chain_name(policy.id, direction)))
        rules.append(_POLICY_ACCEPTED)
    if applying:
        rules.append(_END_OF_TIER)
    for profile in profiles:
        if known_profiles is not None and profile not in known_profiles:
            log.warning("endpoint profile missing chain=%s profile=%s", name, profile)
            continue
        rules.append(Rule("", profile_chain_name(profile, direction)))
        rules.append(_PROFILE_ACCEPTED)
    rules.append(_NO_PROFILE)
    return Chain(name, tuple(rules))


def endpoint_chains(
    ep: EndpointChains,
    policies: Mapping[str, model.Policy],
    *,
    known_profiles: Container[str] | None = None,
) -> list[Chain]:
    """cali-tw-<iface> (ingress) and cali-fw-<iface> (egress) for one endpoint.

    `policies` maps policy id → Policy for (at least) the ids the endpoint lists; a listed id
    missing from it keeps the end-of-tier DROP without a jump (fail closed). With
    `known_profiles`, jumps to profiles outside it are left out (their chains would not exist).
    """
    return [
        _endpoint_chain(
            endpoint_chain_name(ep.iface, "Ingress"), "Ingress", ep.ingress, policies,
            ep.profiles, known_profiles,
        ),
        _endpoint_chain(
            endpoint_chain_name(ep.iface, "Egress"), "Egress", ep.egress, policies,
            ep.profiles, known_profiles,
        ),
    ]


# -- dispatch chains -------------------------------------------------------------------------------

_UNKNOWN_INTERFACE = Rule("", "DROP", "Unknown interface")


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < len(first) and i < len(last) and first[i] == last[i]:
        i += 1
    return first[:i]


def _dispatch_tree(
    root: str, flag: str, direction: model.Direction, ifaces: Sequence[str], iface_prefix: str
) -> list[Chain]:
    order: list[str] = []  # pre-order: a chain before its sub-chains
    seen: set[str] = set()
    built: dict[str, Chain] = {}

    def leaf(iface: str) -> Rule:
        return Rule(f"{flag} {iface}", f"-g {endpoint_chain_name(iface, direction)}")

    def build(name: str, prefix: str, names: list[str]) -> None:
        if name in seen:
            raise ValueError(f"dispatch chain name collision {name!r}")
        seen.add(name)
        order.append(name)
        rules: list[Rule] = []
        if len(names) <= DISPATCH_FANOUT:
            rules.extend(leaf(n) for n in names)
        else:
            groups: dict[str, list[str]] = {}
            for n in names:
                if n == prefix:
                    rules.append(leaf(n))
                else:
                    groups.setdefault(n[len(prefix)], []).append(n)
            for char in sorted(groups):
                group = groups[char]
                if len(group) == 1:
                    rules.append(leaf(group[0]))
                    continue
                sub_prefix = prefix + char
                label = sub_prefix[len(iface_prefix):] if sub_prefix.startswith(iface_prefix) else sub_prefix
                sub = check_chain_name(length_limited_name(root + "-", label))
                rules.append(Rule(f"{flag} {sub_prefix}+", f"-g {sub}"))
                build(sub, sub_prefix, group)
        rules.append(_UNKNOWN_INTERFACE)
        built[name] = Chain(name, tuple(rules))

    names = sorted(ifaces)
    start = _common_prefix(names) if len(names) > DISPATCH_FANOUT else ""
    build(root, start, names)
    return [built[name] for name in order]


def dispatch_chains(ifaces: Iterable[str], config: RenderConfig = RenderConfig()) -> list[Chain]:
    """cali-from-wl-dispatch / cali-to-wl-dispatch trees over the local workload interfaces."""
    names = [_check_iface(i) for i in ifaces]
    if len(set(names)) != len(names):
        raise ValueError("duplicate interface names in dispatch")
    return [
        *_dispatch_tree(CHAIN_FROM_WL_DISPATCH, "-i", "Egress", names, config.iface_prefix),
        *_dispatch_tree(CHAIN_TO_WL_DISPATCH, "-o", "Ingress", names, config.iface_prefix),
    ]


# -- static chains and jumps -----------------------------------------------------------------------


def _failsafe_rules(ports: Sequence[tuple[str, int]], comment: str) -> tuple[Rule, ...]:
    by_proto: dict[str, list[model.PortRange]] = {}
    for proto, port in ports:
        by_proto.setdefault(proto, []).append(model.PortRange(port, port))
    return tuple(
        Rule(f"-p {proto} -m multiport --dports {chunk}", "RETURN", comment)
        for proto, group in by_proto.items()
        for chunk in _multiport_chunks(group)
    )


def static_chains(config: RenderConfig = RenderConfig()) -> list[Chain]:
    """cali-INPUT, cali-FORWARD, cali-OUTPUT, cali-wl-to-host and the failsafe chains."""
    wl = f"{config.iface_prefix}+"
    return [
        Chain(CHAIN_FORWARD, (
            Rule("", _clear_mark(ACCEPT_MARK | PASS_MARK)),
            Rule(f"-i {wl}", CHAIN_FROM_WL_DISPATCH, "From workload: egress policy"),
            Rule(f"-o {wl}", CHAIN_TO_WL_DISPATCH, "To workload: ingress policy"),
            Rule(_mark(ACCEPT_MARK), "ACCEPT", "Policy explicitly accepted packet"),
        )),
        Chain(CHAIN_INPUT, (
            Rule(f"-i {wl}", f"-g {CHAIN_WL_TO_HOST}"),
            Rule("", CHAIN_FAILSAFE_IN),
        )),
        Chain(CHAIN_OUTPUT, (
            Rule(f"-o {wl}", "RETURN", "Host to workload traffic is not policed"),
            Rule("", CHAIN_FAILSAFE_OUT),
        )),
        Chain(CHAIN_WL_TO_HOST, (
            Rule("", CHAIN_FROM_WL_DISPATCH),
            Rule("", config.default_endpoint_to_host_action,
                 "Configured DefaultEndpointToHostAction"),
        )),
        Chain(CHAIN_FAILSAFE_IN, _failsafe_rules(config.failsafe_inbound, "Failsafe inbound")),
        Chain(CHAIN_FAILSAFE_OUT, _failsafe_rules(config.failsafe_outbound, "Failsafe outbound")),
    ]


def jump_rules() -> dict[str, list[Rule]]:
    """Our rules at the top of the filter table's built-in chains."""
    return {
        "INPUT": [Rule("", CHAIN_INPUT)],
        "FORWARD": [Rule("", CHAIN_FORWARD)],
        "OUTPUT": [Rule("", CHAIN_OUTPUT)],
    }


# -- everything ------------------------------------------------------------------------------------


def render_filter_table(
    endpoints: Iterable[EndpointChains],
    policies: Mapping[str, model.Policy],
    profiles: Mapping[str, model.Profile],
    config: RenderConfig = RenderConfig(),
) -> FilterTable:
    """The whole filter table for these local endpoints.

    Only the policies and profiles some endpoint references are rendered (others would be dead
    chains), and only the IP sets those reference are returned.
    """
    chains: dict[str, Chain] = {}
    ipsets: dict[str, IPSetSpec] = {}

    def add(chain: Chain) -> None:
        if chain.name in chains and chains[chain.name] != chain:
            raise ValueError(f"two different chains named {chain.name!r}")
        chains[chain.name] = chain

    eps = list(endpoints)
    for chain in static_chains(config):
        add(chain)
    for chain in dispatch_chains([ep.iface for ep in eps], config):
        add(chain)
    used_policies: dict[str, None] = {}
    used_profiles: dict[str, None] = {}
    for ep in eps:
        for chain in endpoint_chains(ep, policies, known_profiles=profiles):
            add(chain)
        used_policies.update(dict.fromkeys(ep.ingress))
        used_policies.update(dict.fromkeys(ep.egress))
        used_profiles.update(dict.fromkeys(ep.profiles))
    for policy_id in used_policies:
        policy = policies.get(policy_id)
        if policy is None:
            continue
        for direction, rules in _directions(policy):
            add(Chain(policy_chain_name(policy.id, direction), _render_rules(rules, ipsets)))
    for name in used_profiles:
        profile = profiles.get(name)
        if profile is None:
            continue
        add(Chain(profile_chain_name(profile.name, "Ingress"), _render_rules(profile.ingress, ipsets)))
        add(Chain(profile_chain_name(profile.name, "Egress"), _render_rules(profile.egress, ipsets)))
    return FilterTable(chains=chains, jumps=jump_rules(), ipsets=ipsets)


def restore_text(table: FilterTable) -> str:
    """The whole filter table as one `iptables-restore --noflush` input for a table that has none
    of our chains yet (goldens, benchmarks, kernel tests); the agent uses the Table driver."""
    lines = ["*filter"]
    lines.extend(f":{name} - [0:0]" for name in sorted(table.chains))
    for name in sorted(table.chains):
        lines.extend(render_chain(table.chains[name]))
    for builtin in sorted(table.jumps):
        rules = table.jumps[builtin]
        for position, (rule, rule_hash) in enumerate(zip(rules, rule_hashes(builtin, rules)), 1):
            lines.append(f"-I {builtin} {position} {render_with_hash(rule, rule_hash)}")
    lines.extend(["COMMIT", ""])
    return "\n".join(lines)
