"""Render the policy model into Felix-style chains (filter, mangle, raw), jump rules and IP set specs.

Pure: model values in, `policy.iptables` Chain / Rule values and `IPSetSpec`s out; no I/O and no
imports from felixpy. The agent feeds the result to one Table driver per table and to IPSets.

Both families (Felix renders every chain once per IP version): `ip_version=6` gives the same
chains for ip6tables, with the `cali60` IP sets, each rule filtered to the family (a rule whose
ipVersion, nets / notNets or ICMP flavour are all the other family's renders nothing there),
ICMPv6 matched as `-p ipv6-icmp -m icmp6 --icmpv6-type`, and cali-wl-to-host accepting the
ICMPv6 of neighbour discovery ahead of policy.

Packet walk (calico-reference §4.3, Felix's rules/static.go and rules/endpoints.go):
* raw PREROUTING → cali-PREROUTING: clear our marks; traffic not from a workload goes to
  cali-from-host-endpoint (host endpoints with doNotTrack policy); ACCEPT once the accept mark is
  set. raw OUTPUT → cali-OUTPUT: clear marks, cali-to-host-endpoint, ACCEPT on the accept mark.
  An untracked Allow sets the accept mark and NOTRACKs the packet: no conntrack entry.
* mangle PREROUTING → cali-PREROUTING: established traffic and packets raw accepted are
  ACCEPTed; then cali-from-host-endpoint (host endpoints with preDNAT policy, before the nat
  table's DNAT); ACCEPT on the accept mark. mangle POSTROUTING → cali-POSTROUTING: host-originated
  traffic that was DNAT'd gets the normal egress policy of its host endpoint here (its output
  interface is only known now).
* FORWARD → cali-FORWARD: clear the pass and scratch marks (the accept mark carries raw/mangle's
  verdict); unless already accepted, the ingress host endpoint's applyOnForward policy
  (cali-from-hep-forward); `-i cali+` → cali-from-wl-dispatch (egress policy of the source
  pod); `-o cali+` → cali-to-wl-dispatch (ingress policy of the destination pod); the egress host
  endpoint's applyOnForward policy (cali-to-hep-forward); ACCEPT when the accept mark is set,
  else set it (so mangle POSTROUTING leaves forwarded traffic alone). Endpoint chains RETURN on
  accept, so a pod→pod packet on one node gets the source's egress AND the destination's
  ingress.
* INPUT → cali-INPUT: `-i cali+` → goto cali-wl-to-host (egress policy, then
  DefaultEndpointToHostAction); ACCEPT what raw/mangle accepted; then the host endpoint of the
  input interface (cali-from-host-endpoint) and ACCEPT on its accept mark.
* OUTPUT → cali-OUTPUT: ACCEPT what raw accepted; `-o cali+` RETURN (host→pod is not policed);
  traffic that was not DNAT'd gets its host endpoint's egress policy (cali-to-host-endpoint).
* Host endpoint chains cali-fh-/cali-th-<iface> jump to cali-failsafe-in/-out first: those
  ports (FELIX_FAILSAFEINBOUNDHOSTPORTS / OUTBOUND) are ACCEPTed whatever the policy says, so
  no policy can cut a node off. A host endpoint with interfaceName "*" is every interface's
  default (Felix's "any-interface-at-all" chains); doNotTrack policy does not apply to it.
* Dispatch chains are a prefix tree over interface names (`-g` to the endpoint chain); an unknown
  workload interface is dropped (fail closed), an interface without a host endpoint is not
  policed.
* Endpoint chains: conntrack RELATED,ESTABLISHED accept, INVALID drop (not in raw), the failsafe
  jump (host endpoints), clear marks, then tier by tier (Felix's tiers): "Start of tier" clears
  the pass mark (the first tier's is the clear just before), each applicable policy
  (`-j cali-pi/po-<id>` while the pass mark is clear, RETURN once the accept mark is set), and
  an end-of-tier DROP unless the tier's default action is Pass (never in raw/mangle: the filter
  table still has its say); then the profiles and DROP "Drop if no profiles matched" (normal
  chains only). Forward chains with no policy accept ("Allow forwarded traffic by default").
* Policy chains: each model Rule becomes zero or more iptables rules (OR-ed nets / ports / named
  ports are expanded); Allow sets the accept mark and returns, Pass the pass mark, Deny drops, Log
  logs. A rule that can never match (ports without a port protocol, nets only of the other
  family, ICMP fields on another protocol) renders to nothing, never to a broader rule.

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
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
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
    "ALL_HOSTS_SET",
    "ALL_INTERFACES_NAME",
    "PASS_MARK",
    "SCRATCH_MARK",
    "EndpointChains",
    "FilterTable",
    "HostEncap",
    "HostEndpointChains",
    "IPSetSpec",
    "RenderConfig",
    "TableChains",
    "TierPolicies",
    "dispatch_chains",
    "endpoint_chain_name",
    "endpoint_chains",
    "host_dispatch_chains",
    "host_endpoint_chains",
    "mangle_static_chains",
    "raw_static_chains",
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
    "table_jump_rules",
    "tier_ids",
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
CHAIN_PREROUTING = "cali-PREROUTING"
CHAIN_POSTROUTING = "cali-POSTROUTING"
CHAIN_WL_TO_HOST = "cali-wl-to-host"
CHAIN_FAILSAFE_IN = "cali-failsafe-in"
CHAIN_FAILSAFE_OUT = "cali-failsafe-out"
CHAIN_FROM_WL_DISPATCH = "cali-from-wl-dispatch"
CHAIN_TO_WL_DISPATCH = "cali-to-wl-dispatch"
CHAIN_FROM_HOST_ENDPOINT = "cali-from-host-endpoint"
CHAIN_TO_HOST_ENDPOINT = "cali-to-host-endpoint"
CHAIN_FROM_HEP_FORWARD = "cali-from-hep-forward"
CHAIN_TO_HEP_FORWARD = "cali-to-hep-forward"

POLICY_IN_PREFIX = "cali-pi-"
POLICY_OUT_PREFIX = "cali-po-"
PROFILE_IN_PREFIX = "cali-pri-"
PROFILE_OUT_PREFIX = "cali-pro-"
TO_WORKLOAD_PREFIX = "cali-tw-"
FROM_WORKLOAD_PREFIX = "cali-fw-"
TO_HOST_PREFIX = "cali-th-"
FROM_HOST_PREFIX = "cali-fh-"
TO_HOST_FORWARD_PREFIX = "cali-thfw-"
FROM_HOST_FORWARD_PREFIX = "cali-fhfw-"
# Felix's chain-name stand-in for a `*` host endpoint: longer than IFNAMSIZ, so no real
# interface can have it.
ALL_INTERFACES_NAME = "any-interface-at-all"

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
class TierPolicies:
    """One tier of an endpoint chain: the policy ids that apply, in evaluation order, per direction."""

    name: str
    default_action: model.TierAction = "Deny"
    ingress: tuple[str, ...] = ()
    egress: tuple[str, ...] = ()

    def ids(self, direction: model.Direction) -> tuple[str, ...]:
        return self.ingress if direction == "Ingress" else self.egress


Tiers = tuple[TierPolicies, ...]


def tier_ids(tiers: Iterable[TierPolicies]) -> Iterable[str]:
    for tier in tiers:
        yield from tier.ingress
        yield from tier.egress


@dataclass(frozen=True)
class EndpointChains:
    """What one local workload endpoint needs: its interface, the tiers of policies that apply
    (in Felix's tier order, tiers without an applicable policy left out) and its profiles."""

    iface: str
    tiers: Tiers = ()
    profiles: tuple[str, ...] = ()

    @classmethod
    def default_tier(cls, iface: str, ingress: Sequence[str] = (), egress: Sequence[str] = (),
                     profiles: Sequence[str] = ()) -> EndpointChains:
        """An endpoint whose policies are all in the default tier."""
        tiers = (TierPolicies(model.DEFAULT_TIER, "Deny", tuple(ingress), tuple(egress)),) if ingress or egress else ()
        return cls(iface, tiers, tuple(profiles))

    def policy_ids(self) -> Iterable[str]:
        return tier_ids(self.tiers)

    @property
    def ingress(self) -> tuple[str, ...]:
        """Every ingress policy id, tier after tier."""
        return tuple(pid for tier in self.tiers for pid in tier.ingress)

    @property
    def egress(self) -> tuple[str, ...]:
        return tuple(pid for tier in self.tiers for pid in tier.egress)


@dataclass(frozen=True)
class HostEndpointChains:
    """What one active host endpoint of this node needs (Felix's endpoint manager splits its
    policies by kind): `iface` is the interface, or "*" for all of them."""

    iface: str
    normal: Tiers = ()  # filter INPUT/OUTPUT, and mangle POSTROUTING for DNAT'd output
    forward: Tiers = ()  # applyOnForward: filter FORWARD
    pre_dnat: Tiers = ()  # ingress only: mangle PREROUTING
    untracked: Tiers = ()  # doNotTrack: raw PREROUTING/OUTPUT (never for "*")
    profiles: tuple[str, ...] = ()

    @property
    def chain_iface(self) -> str:
        return ALL_INTERFACES_NAME if self.iface == model.ALL_INTERFACES else self.iface

    def policy_ids(self) -> Iterable[str]:
        for tiers in (self.normal, self.forward, self.pre_dnat, self.untracked):
            yield from tier_ids(tiers)


_DEFAULT_FAILSAFE_IN = model.DEFAULT_FAILSAFE_INBOUND
_DEFAULT_FAILSAFE_OUT = model.DEFAULT_FAILSAFE_OUTBOUND


@dataclass(frozen=True)
class RenderConfig:
    iface_prefix: str = "cali"
    default_endpoint_to_host_action: EndpointToHostAction = "DROP"
    failsafe_inbound: tuple[tuple[str, int], ...] = _DEFAULT_FAILSAFE_IN
    failsafe_outbound: tuple[tuple[str, int], ...] = _DEFAULT_FAILSAFE_OUT
    vxlan_port: int = 4789

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
        if not 1 <= self.vxlan_port <= 65535:
            raise ValueError(f"invalid VXLAN port {self.vxlan_port}")


@dataclass(frozen=True)
class HostEncap:
    """Which encapsulations the cluster's pools use: their packets between the nodes are allowed
    before any host endpoint policy (Felix's "Allow IPIP/VXLAN packets from/to Calico hosts"),
    so that a host endpoint's policy cannot cut the pod network."""

    vxlan: bool = False
    ipip: bool = False


ALL_HOSTS_SET = "cali40all-hosts-net"  # every node's address (Felix's all-hosts-net set)
ALL_HOSTS_SET_V6 = "cali60all-hosts-net"  # every node's IPv6 address
ALL_HOSTS_SETS = {4: ALL_HOSTS_SET, 6: ALL_HOSTS_SET_V6}
# ICMPv6 a workload may always send to its host, ahead of its egress policy (Felix's
# ICMPv6Filter): multicast listener query / report / done, router solicitation, neighbour
# solicitation and advertisement, so that no policy can break the pod's neighbour discovery.
WORKLOAD_ICMPV6_TYPES = (130, 131, 132, 133, 135, 136)


@dataclass(frozen=True)
class TableChains:
    """Our chains and our jump rules in one iptables table."""

    chains: dict[str, Chain] = field(default_factory=dict)
    jumps: dict[str, list[Rule]] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterTable:
    """Everything policy needs: the filter table's chains and jump rules, the raw and mangle
    tables' (host endpoints), and the IP sets all of them use."""

    chains: dict[str, Chain] = field(default_factory=dict)
    jumps: dict[str, list[Rule]] = field(default_factory=dict)
    ipsets: dict[str, IPSetSpec] = field(default_factory=dict)
    raw: TableChains = field(default_factory=TableChains)
    mangle: TableChains = field(default_factory=TableChains)


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
def _net(text: str, ip_version: int) -> str | None:
    """The canonical CIDR, or None for one of the other family (rendered in the other table)."""
    try:
        net = ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"invalid CIDR {text!r} in policy rule") from None
    return str(net) if net.version == ip_version else None


def _family_nets(nets: Sequence[str], ip_version: int) -> list[str]:
    return [n for n in (_net(text, ip_version) for text in nets) if n is not None]


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
    """The rule cannot match any packet of the family being rendered: render nothing."""


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
    entity: model.EntityRule, flag: str, proto: str | None, ipsets: dict[str, IPSetSpec], ip_version: int
) -> _Side:
    addr = "-s" if flag == "src" else "-d"
    # Felix's FilterRuleToIPVersion: a rule whose nets (or notNets) are all of the other family
    # is not rendered in this family's table at all; mixed lists keep this family's entries.
    nets = _family_nets(entity.nets, ip_version)
    if entity.nets and not nets:
        raise _Never
    not_nets = _family_nets(entity.not_nets, ip_version)
    if entity.not_nets and not not_nets:
        raise _Never
    inline = not_nets if (len(not_nets) == 1 and not nets) else []
    block = [] if inline else not_nets

    sets: list[str] = []
    if entity.endpoints is not None:
        name = selector_set_name(entity.endpoints, ip_version)
        ipsets[name] = IPSetSpec("hash:net", entity.endpoints, ip_version=ip_version)
        sets.append(f"-m set --match-set {name} {flag}")
    if entity.not_endpoints is not None:
        name = selector_set_name(entity.not_endpoints, ip_version)
        ipsets[name] = IPSetSpec("hash:net", entity.not_endpoints, ip_version=ip_version)
        sets.append(f"-m set ! --match-set {name} {flag}")

    ports_flag = "--sports" if flag == "src" else "--dports"

    def named(port: model.NamedPort) -> str | None:
        if proto not in PORT_PROTOCOLS:
            return None  # no container port has this protocol: the set would always be empty
        set_name = named_port_set_name(entity.endpoints, port.name, proto, ip_version)
        ipsets[set_name] = IPSetSpec("hash:ip,port", entity.endpoints, port.name, proto, ip_version)
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


def _icmp_match(icmp: model.ICMPMatch, negate: bool, ip_version: int) -> str | None:
    """`-m icmp [!] --icmp-type t[/c]` (IPv6: `-m icmp6 [!] --icmpv6-type t[/c]`), or None when
    the match is "any ICMP" (type unset)."""
    if icmp.type is None:
        if icmp.code is not None:
            raise ValueError("an ICMP code needs an ICMP type")
        return None
    if not 0 <= icmp.type <= 255 or (icmp.code is not None and not 0 <= icmp.code <= 255):
        raise ValueError(f"invalid ICMP type/code {icmp.type}/{icmp.code}")
    value = str(icmp.type) if icmp.code is None else f"{icmp.type}/{icmp.code}"
    if ip_version == 6:
        return f"-m icmp6 {'! ' if negate else ''}--icmpv6-type {value}"
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


def _ptext(proto: str) -> str:
    """A protocol as `-p` takes it (ip6tables-save spells ICMPv6 `ipv6-icmp`)."""
    return "ipv6-icmp" if proto == "icmpv6" else proto


def _protocol_variants(rule: model.Rule, ip_version: int = 4) -> list[tuple[str | None, list[str]]]:
    """OR-ed (protocol, protocol and ICMP match parts) pairs for a rule; [] when it cannot match.

    Mirrors policy.evaluate.match_rule: ports without a protocol mean any port protocol, ICMP
    fields without one mean the family's ICMP (ICMP for IPv4, ICMPv6 for IPv6, as Felix renders
    `icmp` per table), a notICMP only constrains ICMP packets. The other family's ICMP never
    matches (a `protocol: ICMPv6` rule has no IPv4 rules, a `protocol: ICMP` rule no IPv6 ones).
    """
    icmp_name, other_icmp = ("icmp", "icmpv6") if ip_version == 4 else ("icmpv6", "icmp")
    proto = _protocol(rule.protocol)
    not_proto = _protocol(rule.not_protocol)
    if proto == other_icmp or (proto is not None and proto == not_proto):
        return []
    if not_proto == other_icmp or proto is not None:
        not_proto = None  # always true in this family, or implied by the positive protocol
    src, dst = rule.source, rule.destination
    icmp = _icmp_match(rule.icmp, False, ip_version) if rule.icmp is not None else None
    not_icmp = _icmp_match(rule.not_icmp, True, ip_version) if rule.not_icmp is not None else None
    p_icmp = f"-p {_ptext(icmp_name)}"

    if any((src.ports, src.not_ports, dst.ports, dst.not_ports)):
        if rule.icmp is not None:
            return []  # ICMP packets have no ports
        if proto is None:
            return [(p, [f"-p {p}"]) for p in _MULTIPORT_PROTOCOLS if p != not_proto]
        return [(proto, [f"-p {proto}"])] if proto in _MULTIPORT_PROTOCOLS else []
    if rule.icmp is not None:
        if proto not in (None, icmp_name) or not_proto == icmp_name:
            return []
        if rule.not_icmp is not None and not_icmp is None:
            return []  # "not any ICMP" on an ICMP packet
        return [(icmp_name, [p_icmp, *(m for m in (icmp, not_icmp) if m is not None)])]
    if rule.not_icmp is not None and proto in (None, icmp_name) and not_proto != icmp_name:
        if proto == icmp_name:
            return [(icmp_name, [p_icmp, not_icmp])] if not_icmp is not None else []
        if not_proto is not None:
            raise ValueError("notICMP together with notProtocol needs a protocol")
        non_icmp: tuple[str | None, list[str]] = (None, [f"! {p_icmp}"])
        return [(icmp_name, [p_icmp, not_icmp]), non_icmp] if not_icmp is not None else [non_icmp]
    if proto is not None:
        return [(proto, [f"-p {_ptext(proto)}"])]
    return [(None, [f"! -p {_ptext(not_proto)}"] if not_proto else [])]


def _render_rule(rule: model.Rule, ipsets: dict[str, IPSetSpec], ip_version: int = 4) -> list[Rule]:
    """The iptables (ip_version 6: ip6tables) rules for one model rule; empty when it can never
    match a packet of that family (its ipVersion is the other one, its nets are all of the
    other family, or it is for the other family's ICMP).

    IP set specs the rules reference are added to `ipsets` only when rules are produced.
    """
    action, after = _action_rules(rule.action)
    if rule.ip_version is not None and rule.ip_version != ip_version:
        return []
    wanted: dict[str, IPSetSpec] = {}
    matches: list[str] = []
    block: list[str] = []  # the "not in net" matches that need the scratch mark
    for proto, head in _protocol_variants(rule, ip_version):
        try:
            src = _side(rule.source, "src", proto, wanted, ip_version)
            dst = _side(rule.destination, "dst", proto, wanted, ip_version)
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


def _render_rules(rules: Iterable[model.Rule], ipsets: dict[str, IPSetSpec], ip_version: int = 4
                  ) -> tuple[Rule, ...]:
    out: list[Rule] = []
    for rule in rules:
        out.extend(_render_rule(rule, ipsets, ip_version))
    return tuple(out)


def _directions(policy: model.Policy) -> list[tuple[model.Direction, tuple[model.Rule, ...]]]:
    out: list[tuple[model.Direction, tuple[model.Rule, ...]]] = []
    if "Ingress" in policy.types:
        out.append(("Ingress", policy.ingress))
    if "Egress" in policy.types:
        out.append(("Egress", policy.egress))
    return out


def policy_chains(policy: model.Policy, ip_version: int = 4) -> list[Chain]:
    """cali-pi-<id> for an Ingress policy, cali-po-<id> for an Egress one (both when both), for
    iptables (ip_version 4) or ip6tables (6): the same names, each family's rules."""
    sink: dict[str, IPSetSpec] = {}
    return [
        Chain(policy_chain_name(policy.id, direction), _render_rules(rules, sink, ip_version))
        for direction, rules in _directions(policy)
    ]


def ipsets_for_policy(policy: model.Policy, ip_version: int = 4) -> dict[str, IPSetSpec]:
    """The IP sets policy_chains(policy, ip_version) references, by name."""
    ipsets: dict[str, IPSetSpec] = {}
    for _, rules in _directions(policy):
        _render_rules(rules, ipsets, ip_version)
    return ipsets


def profile_chains(profile: model.Profile, ip_version: int = 4) -> list[Chain]:
    """cali-pri-<name> and cali-pro-<name> (e.g. cali-pri-kns.default)."""
    sink: dict[str, IPSetSpec] = {}
    return [
        Chain(profile_chain_name(profile.name, "Ingress"), _render_rules(profile.ingress, sink, ip_version)),
        Chain(profile_chain_name(profile.name, "Egress"), _render_rules(profile.egress, sink, ip_version)),
    ]


def ipsets_for_profile(profile: model.Profile, ip_version: int = 4) -> dict[str, IPSetSpec]:
    ipsets: dict[str, IPSetSpec] = {}
    _render_rules(profile.ingress, ipsets, ip_version)
    _render_rules(profile.egress, ipsets, ip_version)
    return ipsets


# -- endpoint chains -------------------------------------------------------------------------------

_CONNTRACK_ACCEPT = Rule("-m conntrack --ctstate RELATED,ESTABLISHED", "ACCEPT")
_CONNTRACK_MARK = Rule("-m conntrack --ctstate RELATED,ESTABLISHED", _set_mark(ACCEPT_MARK))
_CONNTRACK_RETURN = Rule("-m conntrack --ctstate RELATED,ESTABLISHED", "RETURN")
_CONNTRACK_DROP = Rule("-m conntrack --ctstate INVALID", "DROP")
_CLEAR_MARKS = Rule("", _clear_mark(ACCEPT_MARK | PASS_MARK))
_POLICY_ACCEPTED = Rule(_mark(ACCEPT_MARK), "RETURN", "Return if policy accepted")
_NOTRACK = Rule(_mark(ACCEPT_MARK), "NOTRACK")
_PROFILE_ACCEPTED = Rule(_mark(ACCEPT_MARK), "RETURN", "Return if profile accepted")
_NO_PROFILE = Rule("", "DROP", "Drop if no profiles matched")
_FORWARD_DEFAULT = (
    Rule("", _set_mark(ACCEPT_MARK), "Allow forwarded traffic by default"),
    Rule("", "RETURN", "Return for accepted forward traffic"),
)

ChainType = Literal["normal", "forward", "untracked", "pre-dnat"]


@functools.lru_cache(maxsize=16384)
def _policy_jump(chain: str) -> Rule:
    """The jump to a policy chain while the pass mark is clear (one shared value per policy)."""
    return Rule(_mark_clear(PASS_MARK), chain)


@functools.lru_cache(maxsize=256)
def _tier_rules(tier: str) -> tuple[Rule, Rule]:
    start = Rule("", _clear_mark(PASS_MARK), f"Start of tier {tier}")
    end = Rule(_mark_clear(PASS_MARK), "DROP", f"End of tier {tier}. Drop if no policies passed packet")
    return start, end


def _endpoint_chain(
    name: str,
    direction: model.Direction,
    tiers: Tiers,
    policies: Mapping[str, model.Policy],
    profiles: Sequence[str],
    known_profiles: Container[str] | None,
    *,
    chain_type: ChainType = "normal",
    failsafe: str | None = None,
    allow: str = "ACCEPT",
) -> Chain:
    """One endpoint chain, as Felix's endpointIptablesChain renders it (see the module docstring).

    `allow` is what established traffic gets: ACCEPT, or RETURN with the accept mark set (the
    mangle table's egress chains, which must leave the verdict to the filter table)."""
    rules: list[Rule] = []
    if chain_type != "untracked":
        rules.extend((_CONNTRACK_ACCEPT,) if allow == "ACCEPT" else (_CONNTRACK_MARK, _CONNTRACK_RETURN))
        rules.append(_CONNTRACK_DROP)
    if failsafe is not None:
        rules.append(Rule("", failsafe))
    rules.append(_CLEAR_MARKS)
    rendered_tiers = 0
    for tier in tiers:
        ids = tier.ingress if direction == "Ingress" else tier.egress
        if not ids:
            continue
        mark = len(rules)
        if rendered_tiers:
            # Felix clears the pass mark at the start of every tier; the first tier's clear is
            # the one just above.
            rules.append(_tier_rules(tier.name)[0])
        applying = 0
        for policy_id in ids:
            policy = policies.get(policy_id)
            if policy is None:
                # Fail closed: count it (so the end-of-tier DROP stays) but do not jump to a
                # chain that does not exist.
                log.warning("endpoint policy missing chain=%s policy=%s", name, policy_id)
                applying += 1
                continue
            if direction not in policy.types:
                continue
            applying += 1
            rules.append(_policy_jump(policy_chain_name(policy.id, direction)))
            if chain_type == "untracked":
                rules.append(_NOTRACK)
            rules.append(_POLICY_ACCEPTED)
        if not applying:
            del rules[mark:]  # Felix skips a tier with no policy for this direction
            continue
        rendered_tiers += 1
        if chain_type in ("normal", "forward") and tier.default_action != "Pass":
            rules.append(_tier_rules(tier.name)[1])
    if chain_type == "forward" and not rendered_tiers:
        rules.extend(_FORWARD_DEFAULT)
    if chain_type == "normal":
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
    """cali-tw-<iface> (ingress) and cali-fw-<iface> (egress) for one workload endpoint.

    `policies` maps policy id → Policy for (at least) the ids the endpoint lists; a listed id
    missing from it keeps the end-of-tier DROP without a jump (fail closed). With
    `known_profiles`, jumps to profiles outside it are left out (their chains would not exist).
    """
    return [
        _endpoint_chain(endpoint_chain_name(ep.iface, "Ingress"), "Ingress", ep.tiers, policies,
                        ep.profiles, known_profiles),
        _endpoint_chain(endpoint_chain_name(ep.iface, "Egress"), "Egress", ep.tiers, policies,
                        ep.profiles, known_profiles),
    ]


def host_chain_name(prefix: str, iface: str) -> str:
    """cali-fh-/cali-th-/cali-fhfw-/cali-thfw-<iface> (hashed when too long, as for "*")."""
    if iface != ALL_INTERFACES_NAME:
        _check_iface(iface)
    return check_chain_name(length_limited_name(prefix, iface))


@dataclass(frozen=True)
class HostChains:
    """A host endpoint's chains, per table."""

    filter: tuple[Chain, ...] = ()
    mangle: tuple[Chain, ...] = ()
    raw: tuple[Chain, ...] = ()


def host_endpoint_chains(
    hep: HostEndpointChains,
    policies: Mapping[str, model.Policy],
    *,
    known_profiles: Container[str] | None = None,
) -> HostChains:
    """Felix's HostEndpointToFilterChains, ...ToMangleEgressChains, ...ToMangleIngressChains and
    ...ToRawChains for one host endpoint."""
    iface = hep.chain_iface
    th, fh = host_chain_name(TO_HOST_PREFIX, iface), host_chain_name(FROM_HOST_PREFIX, iface)

    def chain(name: str, direction: model.Direction, tiers: Tiers, chain_type: ChainType,
              failsafe: str | None, allow: str = "ACCEPT") -> Chain:
        profiles = hep.profiles if chain_type == "normal" else ()
        return _endpoint_chain(name, direction, tiers, policies, profiles, known_profiles,
                               chain_type=chain_type, failsafe=failsafe, allow=allow)

    filter_chains = (
        chain(th, "Egress", hep.normal, "normal", CHAIN_FAILSAFE_OUT),
        chain(fh, "Ingress", hep.normal, "normal", CHAIN_FAILSAFE_IN),
        chain(host_chain_name(TO_HOST_FORWARD_PREFIX, iface), "Egress", hep.forward, "forward", None),
        chain(host_chain_name(FROM_HOST_FORWARD_PREFIX, iface), "Ingress", hep.forward, "forward", None),
    )
    mangle = [chain(th, "Egress", hep.normal, "normal", CHAIN_FAILSAFE_OUT, allow="RETURN")]
    if hep.pre_dnat:
        mangle.append(chain(fh, "Ingress", hep.pre_dnat, "pre-dnat", CHAIN_FAILSAFE_IN))
    raw: tuple[Chain, ...] = ()
    if hep.untracked and hep.iface != model.ALL_INTERFACES:
        raw = (chain(th, "Egress", hep.untracked, "untracked", CHAIN_FAILSAFE_OUT),
               chain(fh, "Ingress", hep.untracked, "untracked", CHAIN_FAILSAFE_IN))
    return HostChains(filter_chains, tuple(mangle), raw)


# -- dispatch chains -------------------------------------------------------------------------------

_UNKNOWN_INTERFACE = Rule("", "DROP", "Unknown interface")


def _common_prefix(names: Sequence[str]) -> str:
    first, last = min(names), max(names)
    i = 0
    while i < len(first) and i < len(last) and first[i] == last[i]:
        i += 1
    return first[:i]


def _dispatch_tree(
    root: str,
    flag: str,
    leaf_chain: Callable[[str], str],
    ifaces: Sequence[str],
    iface_prefix: str,
    end_rules: Sequence[Rule],
) -> list[Chain]:
    order: list[str] = []  # pre-order: a chain before its sub-chains
    seen: set[str] = set()
    built: dict[str, Chain] = {}

    def leaf(iface: str) -> Rule:
        return Rule(f"{flag} {iface}", f"-g {leaf_chain(iface)}")

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
        rules.extend(end_rules)
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
        *_dispatch_tree(CHAIN_FROM_WL_DISPATCH, "-i", lambda i: endpoint_chain_name(i, "Egress"), names,
                        config.iface_prefix, (_UNKNOWN_INTERFACE,)),
        *_dispatch_tree(CHAIN_TO_WL_DISPATCH, "-o", lambda i: endpoint_chain_name(i, "Ingress"), names,
                        config.iface_prefix, (_UNKNOWN_INTERFACE,)),
    ]


def _host_dispatch(root: str, flag: str, prefix: str, ifaces: Sequence[str], default: bool,
                   before_default: Sequence[Rule] = ()) -> list[Chain]:
    """A host endpoint dispatch tree: `flag iface -g <prefix><iface>`; an interface without a
    host endpoint falls through unpoliced, or goes to the `*` host endpoint's chain (default)."""
    end: list[Rule] = []
    if default:
        end.extend(before_default)
        end.append(Rule("", f"-g {host_chain_name(prefix, ALL_INTERFACES_NAME)}"))
    return _dispatch_tree(root, flag, lambda i: host_chain_name(prefix, i), ifaces, "", end)


def host_dispatch_chains(
    heps: Iterable[HostEndpointChains], config: RenderConfig = RenderConfig()
) -> dict[str, TableChains]:
    """The host endpoint dispatch chains of all three tables, as Felix's endpoint manager builds
    them: filter (normal and forward, every active host endpoint), mangle (from: those with
    preDNAT policy; to: every one, for DNAT'd output), raw (those with doNotTrack policy, never
    the `*` one). Keyed by table name."""
    heps = list(heps)
    named = sorted(h.iface for h in heps if h.iface != model.ALL_INTERFACES)
    if len(set(named)) != len(named):
        raise ValueError("two host endpoints for one interface")
    wildcard = next((h for h in heps if h.iface == model.ALL_INTERFACES), None)
    pre_dnat = sorted(h.iface for h in heps if h.pre_dnat and h.iface != model.ALL_INTERFACES)
    untracked = sorted(h.iface for h in heps if h.untracked and h.iface != model.ALL_INTERFACES)
    skip_workloads = (Rule(f"-o {config.iface_prefix}+", "RETURN",
                           "Skip egress WHEP policy for traffic to local workload"),)
    chains = {
        "filter": [
            *_host_dispatch(CHAIN_FROM_HOST_ENDPOINT, "-i", FROM_HOST_PREFIX, named, wildcard is not None),
            *_host_dispatch(CHAIN_TO_HOST_ENDPOINT, "-o", TO_HOST_PREFIX, named, wildcard is not None),
            *_host_dispatch(CHAIN_FROM_HEP_FORWARD, "-i", FROM_HOST_FORWARD_PREFIX, named, wildcard is not None),
            *_host_dispatch(CHAIN_TO_HEP_FORWARD, "-o", TO_HOST_FORWARD_PREFIX, named, wildcard is not None),
        ],
        "mangle": [
            *_host_dispatch(CHAIN_FROM_HOST_ENDPOINT, "-i", FROM_HOST_PREFIX, pre_dnat,
                            wildcard is not None and bool(wildcard.pre_dnat)),
            *_host_dispatch(CHAIN_TO_HOST_ENDPOINT, "-o", TO_HOST_PREFIX, named, wildcard is not None,
                            skip_workloads),
        ],
        "raw": [
            *_host_dispatch(CHAIN_FROM_HOST_ENDPOINT, "-i", FROM_HOST_PREFIX, untracked, False),
            *_host_dispatch(CHAIN_TO_HOST_ENDPOINT, "-o", TO_HOST_PREFIX, untracked, False),
        ],
    }
    return {table: TableChains({c.name: c for c in cs}) for table, cs in chains.items()}


# -- static chains and jumps -----------------------------------------------------------------------


def _failsafe_rules(ports: Sequence[tuple[str, int]], flag: str, comment: str) -> tuple[Rule, ...]:
    by_proto: dict[str, list[model.PortRange]] = {}
    for proto, port in ports:
        by_proto.setdefault(proto, []).append(model.PortRange(port, port))
    return tuple(
        Rule(f"-p {proto} -m multiport {flag} {chunk}", "ACCEPT", comment)
        for proto, group in by_proto.items()
        for chunk in _multiport_chunks(group)
    )


def _failsafe_chains(config: RenderConfig, table: str) -> list[Chain]:
    """cali-failsafe-in / -out: ACCEPT the failsafe ports (only host endpoint chains jump here).
    In the raw table, before conntrack, the replies are let through too (the other direction's
    ports as source ports), so a doNotTrack policy can never untrack half a failsafe connection."""
    inbound = list(_failsafe_rules(config.failsafe_inbound, "--dports", "Failsafe inbound"))
    outbound = list(_failsafe_rules(config.failsafe_outbound, "--dports", "Failsafe outbound"))
    if table == "raw":
        inbound += _failsafe_rules(config.failsafe_outbound, "--sports", "Failsafe outbound reply")
        outbound += _failsafe_rules(config.failsafe_inbound, "--sports", "Failsafe inbound reply")
    return [Chain(CHAIN_FAILSAFE_IN, tuple(inbound)), Chain(CHAIN_FAILSAFE_OUT, tuple(outbound))]


_ALL_MARKS = ACCEPT_MARK | PASS_MARK | SCRATCH_MARK
_ACCEPTED = Rule(_mark(ACCEPT_MARK), "ACCEPT")
_HEP_ACCEPTED = Rule(_mark(ACCEPT_MARK), "ACCEPT", "Host endpoint policy accepted packet")
_HEP_ACCEPTED_RETURN = Rule(_mark(ACCEPT_MARK), "RETURN", "Host endpoint policy accepted packet")


def _encap_rules(config: RenderConfig, encap: HostEncap, direction: str, ip_version: int = 4) -> tuple[Rule, ...]:
    """Encapsulated pod traffic between the nodes, allowed before host endpoint policy (IPv6:
    VXLAN only, between the nodes' IPv6 addresses; IPIP is IPv4 only, as in Calico)."""
    hosts = ALL_HOSTS_SETS[ip_version]
    if direction == "in":
        peer, local, word = f"-m set --match-set {hosts} src", "-m addrtype --dst-type LOCAL", "from"
    else:
        peer, local, word = f"-m set --match-set {hosts} dst", "-m addrtype --src-type LOCAL", "to"
    rules: list[Rule] = []
    if encap.ipip and ip_version == 4:
        rules.append(Rule(f"-p 4 {peer} {local}", "ACCEPT", f"Allow IPIP packets {word} Calico hosts"))
    if encap.vxlan:
        rules.append(Rule(f"-p udp -m multiport --dports {config.vxlan_port} {peer} {local}", "ACCEPT",
                          f"Allow IPv{ip_version} VXLAN packets {word} Calico hosts"))
    return tuple(rules)


_WORKLOAD_ICMPV6 = tuple(Rule(f"-p ipv6-icmp -m icmp6 --icmpv6-type {t}", "ACCEPT") for t in WORKLOAD_ICMPV6_TYPES)


def static_chains(config: RenderConfig = RenderConfig(), encap: HostEncap = HostEncap(),
                  ip_version: int = 4) -> list[Chain]:
    """The filter table's cali-INPUT, cali-FORWARD, cali-OUTPUT, cali-wl-to-host and failsafe
    chains; for ip6tables (ip_version 6) cali-wl-to-host first accepts the ICMPv6 of neighbour
    discovery (WORKLOAD_ICMPV6_TYPES), as Felix's does, and `encap` is the IPv6 pools'."""
    wl = f"{config.iface_prefix}+"
    return [
        Chain(CHAIN_FORWARD, (
            # The accept mark is raw's / mangle's verdict on this packet: keep it.
            Rule("", _clear_mark(PASS_MARK | SCRATCH_MARK)),
            Rule(_mark_clear(ACCEPT_MARK), CHAIN_FROM_HEP_FORWARD, "Ingress host endpoint: forward policy"),
            Rule(f"-i {wl}", CHAIN_FROM_WL_DISPATCH, "From workload: egress policy"),
            Rule(f"-o {wl}", CHAIN_TO_WL_DISPATCH, "To workload: ingress policy"),
            Rule("", CHAIN_TO_HEP_FORWARD, "Egress host endpoint: forward policy"),
            Rule(_mark(ACCEPT_MARK), "ACCEPT", "Policy explicitly accepted packet"),
            # Tells mangle POSTROUTING this was forwarded: no host endpoint egress policy there.
            Rule("", _set_mark(ACCEPT_MARK)),
        )),
        Chain(CHAIN_INPUT, (
            *_encap_rules(config, encap, "in", ip_version),
            Rule(f"-i {wl}", f"-g {CHAIN_WL_TO_HOST}"),
            Rule(_mark(ACCEPT_MARK), "ACCEPT", "Accepted by raw or mangle host endpoint policy"),
            Rule("", _clear_mark(_ALL_MARKS)),
            Rule("", CHAIN_FROM_HOST_ENDPOINT),
            _HEP_ACCEPTED,
        )),
        Chain(CHAIN_OUTPUT, (
            Rule(_mark(ACCEPT_MARK), "ACCEPT", "Accepted by raw host endpoint policy"),
            Rule(f"-o {wl}", "RETURN", "Host to workload traffic is not policed"),
            *_encap_rules(config, encap, "out", ip_version),
            Rule("", _clear_mark(_ALL_MARKS)),
            # DNAT'd output is policed in mangle POSTROUTING, once its interface is known.
            Rule("-m conntrack ! --ctstate DNAT", CHAIN_TO_HOST_ENDPOINT),
            _HEP_ACCEPTED,
        )),
        Chain(CHAIN_WL_TO_HOST, (
            *(_WORKLOAD_ICMPV6 if ip_version == 6 else ()),
            Rule("", CHAIN_FROM_WL_DISPATCH),
            Rule("", config.default_endpoint_to_host_action,
                 "Configured DefaultEndpointToHostAction"),
        )),
        *_failsafe_chains(config, "filter"),
    ]


def mangle_static_chains(config: RenderConfig = RenderConfig()) -> list[Chain]:
    """The mangle table's cali-PREROUTING (preDNAT policy) and cali-POSTROUTING (egress policy of
    DNAT'd host output), and its failsafe chains."""
    return [
        Chain(CHAIN_PREROUTING, (
            Rule("-m conntrack --ctstate RELATED,ESTABLISHED", "ACCEPT"),
            _ACCEPTED,
            Rule("", CHAIN_FROM_HOST_ENDPOINT),
            _HEP_ACCEPTED,
        )),
        Chain(CHAIN_POSTROUTING, (
            Rule(_mark(ACCEPT_MARK), "RETURN"),
            Rule("", _clear_mark(_ALL_MARKS)),
            Rule("-m conntrack --ctstate DNAT", CHAIN_TO_HOST_ENDPOINT),
            _HEP_ACCEPTED_RETURN,
        )),
        *_failsafe_chains(config, "mangle"),
    ]


def raw_static_chains(config: RenderConfig = RenderConfig()) -> list[Chain]:
    """The raw table's cali-PREROUTING and cali-OUTPUT (doNotTrack policy), and its failsafe chains."""
    return [
        Chain(CHAIN_PREROUTING, (
            # Clear our marks first: the filter and mangle tables trust the accept mark.
            Rule("", _clear_mark(_ALL_MARKS)),
            Rule(f"-i {config.iface_prefix}+", "RETURN", "Workload traffic: no untracked policy"),
            Rule("", CHAIN_FROM_HOST_ENDPOINT),
            _ACCEPTED,
        )),
        Chain(CHAIN_OUTPUT, (
            Rule("", _clear_mark(_ALL_MARKS)),
            Rule("", CHAIN_TO_HOST_ENDPOINT),
            _ACCEPTED,
        )),
        *_failsafe_chains(config, "raw"),
    ]


_JUMPS: dict[str, dict[str, tuple[str, ...]]] = {
    "filter": {"INPUT": (CHAIN_INPUT,), "FORWARD": (CHAIN_FORWARD,), "OUTPUT": (CHAIN_OUTPUT,)},
    "mangle": {"PREROUTING": (CHAIN_PREROUTING,), "POSTROUTING": (CHAIN_POSTROUTING,)},
    "raw": {"PREROUTING": (CHAIN_PREROUTING,), "OUTPUT": (CHAIN_OUTPUT,)},
}


def table_jump_rules(table: str) -> dict[str, list[Rule]]:
    """Our rules at the top of a table's built-in chains."""
    return {builtin: [Rule("", chain) for chain in chains] for builtin, chains in _JUMPS[table].items()}


def jump_rules() -> dict[str, list[Rule]]:
    """Our rules at the top of the filter table's built-in chains."""
    return table_jump_rules("filter")


# -- everything ------------------------------------------------------------------------------------


def render_filter_table(
    endpoints: Iterable[EndpointChains],
    policies: Mapping[str, model.Policy],
    profiles: Mapping[str, model.Profile],
    config: RenderConfig = RenderConfig(),
    host_endpoints: Iterable[HostEndpointChains] = (),
    encap: HostEncap = HostEncap(),
    ip_version: int = 4,
) -> FilterTable:
    """The filter, mangle and raw tables for these local workload and host endpoints, for
    iptables (ip_version 4) or ip6tables (6): the same chains, each family's rules and sets.

    Only the policies and profiles some endpoint references are rendered (others would be dead
    chains), each in the tables that use it, and only the IP sets those reference are returned.
    """
    tables: dict[str, dict[str, Chain]] = {"filter": {}, "mangle": {}, "raw": {}}
    ipsets: dict[str, IPSetSpec] = {}

    def add(table: str, chain: Chain) -> None:
        chains = tables[table]
        if chain.name in chains and chains[chain.name] != chain:
            raise ValueError(f"two different chains named {chain.name!r} in table {table}")
        chains[chain.name] = chain

    eps = list(endpoints)
    heps = list(host_endpoints)
    for chain in static_chains(config, encap, ip_version):
        add("filter", chain)
    if encap.vxlan or (encap.ipip and ip_version == 4):
        ipsets[ALL_HOSTS_SETS[ip_version]] = IPSetSpec("hash:net", None, ip_version=ip_version)
    for chain in mangle_static_chains(config):
        add("mangle", chain)
    for chain in raw_static_chains(config):
        add("raw", chain)
    for chain in dispatch_chains([ep.iface for ep in eps], config):
        add("filter", chain)
    for table, dispatch in host_dispatch_chains(heps, config).items():
        for chain in dispatch.chains.values():
            add(table, chain)
    used: dict[str, dict[str, None]] = {"filter": {}, "mangle": {}, "raw": {}}
    used_profiles: dict[str, None] = {}
    mangle_profiles: dict[str, None] = {}  # the mangle egress chains of host endpoints jump to these
    for ep in eps:
        for chain in endpoint_chains(ep, policies, known_profiles=profiles):
            add("filter", chain)
        used["filter"].update(dict.fromkeys(ep.policy_ids()))
        used_profiles.update(dict.fromkeys(ep.profiles))
    for hep in heps:
        hep_chains = host_endpoint_chains(hep, policies, known_profiles=profiles)
        for table in ("filter", "mangle", "raw"):
            for chain in getattr(hep_chains, table):
                add(table, chain)
        normal = list(tier_ids(hep.normal))
        used["filter"].update(dict.fromkeys(normal + list(tier_ids(hep.forward))))
        used["mangle"].update(dict.fromkeys(normal + list(tier_ids(hep.pre_dnat))))
        if hep.iface != model.ALL_INTERFACES:
            used["raw"].update(dict.fromkeys(tier_ids(hep.untracked)))
        used_profiles.update(dict.fromkeys(hep.profiles))
        mangle_profiles.update(dict.fromkeys(hep.profiles))
    for table, ids in used.items():
        for policy_id in ids:
            policy = policies.get(policy_id)
            if policy is None:
                continue
            for direction, rules in _directions(policy):
                add(table, Chain(policy_chain_name(policy.id, direction), _render_rules(rules, ipsets, ip_version)))
    for name in used_profiles:
        profile = profiles.get(name)
        if profile is None:
            continue
        ingress = _render_rules(profile.ingress, ipsets, ip_version)
        egress = _render_rules(profile.egress, ipsets, ip_version)
        add("filter", Chain(profile_chain_name(profile.name, "Ingress"), ingress))
        add("filter", Chain(profile_chain_name(profile.name, "Egress"), egress))
        if name in mangle_profiles:
            add("mangle", Chain(profile_chain_name(profile.name, "Egress"), egress))
    return FilterTable(
        chains=tables["filter"], jumps=jump_rules(), ipsets=ipsets,
        raw=TableChains(tables["raw"], table_jump_rules("raw")),
        mangle=TableChains(tables["mangle"], table_jump_rules("mangle")),
    )


def restore_text(table: FilterTable | TableChains, name: str = "filter") -> str:
    """One table as one `iptables-restore --noflush` input for a table that has none of our
    chains yet (goldens, benchmarks, kernel tests); the agent uses the Table driver."""
    lines = [f"*{name}"]
    lines.extend(f":{chain} - [0:0]" for chain in sorted(table.chains))
    for chain in sorted(table.chains):
        lines.extend(render_chain(table.chains[chain]))
    for builtin in sorted(table.jumps):
        rules = table.jumps[builtin]
        for position, (rule, rule_hash) in enumerate(zip(rules, rule_hashes(builtin, rules)), 1):
            lines.append(f"-I {builtin} {position} {render_with_hash(rule, rule_hash)}")
    lines.extend(["COMMIT", ""])
    return "\n".join(lines)
