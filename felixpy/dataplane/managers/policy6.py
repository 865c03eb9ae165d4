"""Ipv6PolicyGuard: IPv6 traffic of workloads that policy selects is dropped, not let through.

felixpy renders NetworkPolicy and Calico policy into iptables (IPv4) only so far. A dual-stack
pod that a policy selects would otherwise have its IPv6 traffic pass unpoliced: an accepted
policy silently not enforced. Until the policy is rendered into ip6tables (issue #10, step 2),
this guard fails closed instead: in ip6tables' filter table, traffic to an endpoint with ingress
policy and from an endpoint with egress policy is dropped (FORWARD, and INPUT / OUTPUT for the
node's own traffic with the pod). Endpoints no policy selects and whose profiles all allow
everything (a namespace's `kns.<ns>`) are untouched, so IPv6 connectivity without policy is as
Calico's; an endpoint whose profiles restrict a direction (or that has none, which Calico
denies) is policed in that direction.

Host endpoints the same way (`host_guard_chains`): an interface a HostEndpoint of this node names
(or every non-workload interface for `*`) whose normal, preDNAT or doNotTrack policies, or whose
profiles, restrict it has its IPv6 input and output dropped, and its forwarded IPv6 too when
applyOnForward or preDNAT policies apply to it. Still allowed, as Felix allows them before host
endpoint policy: loopback, replies of established connections, neighbour discovery, the failsafe
ports and VXLAN between nodes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

from felixpy import names
from felixpy.dataplane.drivers.iptables import Table
from policy import model
from policy.iptables import Chain, Rule
from policy.render import EndpointChains, HostEndpointChains

log = logging.getLogger(__name__)

GUARD_CHAIN = names.check_chain_name(names.CHAIN_PREFIX + "v6-policy-not-rendered")
_BUILTINS = ("FORWARD", "INPUT", "OUTPUT")
# builtin -> the host endpoint guard chain it jumps to.
HOST_CHAINS = {builtin: names.check_chain_name(f"{names.CHAIN_PREFIX}v6-hep-{suffix}")
               for builtin, suffix in (("INPUT", "in"), ("OUTPUT", "out"), ("FORWARD", "fwd"))}
_ND_TYPES = ("router-solicitation", "router-advertisement", "neighbour-solicitation", "neighbour-advertisement")


_ALLOW_ALL = (model.Rule("Allow"),)


def policed_ifaces(chains: Iterable[EndpointChains], profiles: Mapping[str, model.Profile]
                   ) -> tuple[frozenset[str], frozenset[str]]:
    """(interfaces with ingress policing, with egress policing) of the local workloads: any
    policy in that direction, or a profile that does not allow everything (or no profile)."""
    ingress: set[str] = set()
    egress: set[str] = set()
    for chain in chains:
        found = [profiles.get(name) for name in chain.profiles]
        for direction, out, policies in (("ingress", ingress, chain.ingress), ("egress", egress, chain.egress)):
            open_ = bool(found) and all(p is not None and getattr(p, direction) == _ALLOW_ALL for p in found)
            if policies or not open_:
                out.add(chain.iface)
    return frozenset(ingress), frozenset(egress)


@dataclass(frozen=True)
class HostGuard:
    """A host endpoint whose IPv6 traffic is dropped: `iface` ("*" for every non-workload
    interface), `local` for input/output, `forward` for forwarded traffic through it."""

    iface: str
    local: bool
    forward: bool


def policed_host_endpoints(hosts: Iterable[HostEndpointChains], profiles: Mapping[str, model.Profile]
                           ) -> tuple[HostGuard, ...]:
    """The host endpoints of this node with policy or restrictive profiles (Calico denies a host
    endpoint's own traffic when nothing allows it; forwarded traffic only when applyOnForward or
    preDNAT policies apply to it)."""
    guards = []
    for host in hosts:
        found = [profiles.get(name) for name in host.profiles]
        open_ = bool(found) and all(p is not None and p.ingress == _ALLOW_ALL and p.egress == _ALLOW_ALL
                                    for p in found)
        local = bool(host.normal or host.pre_dnat or host.untracked) or not open_
        forward = bool(host.forward or host.pre_dnat)
        if local or forward:
            guards.append(HostGuard(host.iface, local, forward))
    return tuple(guards)


def host_guard_chains(guards: Iterable[HostGuard], failsafe_inbound: Iterable[tuple[str, int]],
                      failsafe_outbound: Iterable[tuple[str, int]], vxlan_port: int) -> dict[str, Chain]:
    """builtin -> its host endpoint guard chain (pure)."""
    rules: dict[str, list[Rule]] = {"INPUT": [Rule(match="-i lo", action="RETURN")],
                                    "OUTPUT": [Rule(match="-o lo", action="RETURN")], "FORWARD": []}
    any_iface = f"{names.WORKLOAD_IFACE_PREFIX}+"
    for g in sorted(guards, key=lambda g: g.iface):
        into = f"-i {g.iface}" if g.iface != model.ALL_INTERFACES else f"! -i {any_iface}"
        out = f"-o {g.iface}" if g.iface != model.ALL_INTERFACES else f"! -o {any_iface}"
        for builtin, match, failsafe, on in (("INPUT", into, failsafe_inbound, g.local),
                                             ("OUTPUT", out, failsafe_outbound, g.local)):
            if not on:
                continue
            chain = rules[builtin]
            chain.append(Rule(match=f"{match} -m conntrack --ctstate RELATED,ESTABLISHED", action="RETURN"))
            chain += [Rule(match=f"{match} -p ipv6-icmp --icmpv6-type {t}", action="RETURN") for t in _ND_TYPES]
            chain += [Rule(match=f"{match} -p {proto} --dport {port}", action="RETURN",
                           comment="failsafe") for proto, port in failsafe]
            chain.append(Rule(match=f"{match} -p udp --dport {vxlan_port}", action="RETURN",
                              comment="VXLAN between nodes"))
            chain.append(Rule(match=match, action="DROP", comment="host endpoint policy not rendered for IPv6"))
        if g.forward:
            for match in (into, out):
                rules["FORWARD"].append(Rule(match=f"{match} -m conntrack --ctstate RELATED,ESTABLISHED",
                                             action="RETURN"))
                rules["FORWARD"].append(Rule(match=match, action="DROP",
                                             comment="host endpoint forward policy not rendered for IPv6"))
    return {builtin: Chain(HOST_CHAINS[builtin], tuple(chain)) for builtin, chain in rules.items()}


def guard_chain(ingress: frozenset[str], egress: frozenset[str]) -> Chain:
    """The guard chain (pure): a DROP per policed direction of each endpoint interface."""
    rules = [Rule(match=f"-o {iface}", action="DROP", comment="ingress policy not rendered for IPv6")
             for iface in sorted(ingress)]
    rules += [Rule(match=f"-i {iface}", action="DROP", comment="egress policy not rendered for IPv6")
              for iface in sorted(egress)]
    return Chain(GUARD_CHAIN, tuple(rules))


class Ipv6PolicyGuard:
    def __init__(self, filter6: Table, failsafe_inbound: Iterable[tuple[str, int]] = model.DEFAULT_FAILSAFE_INBOUND,
                 failsafe_outbound: Iterable[tuple[str, int]] = model.DEFAULT_FAILSAFE_OUTBOUND,
                 vxlan_port: int = names.VXLAN_PORT) -> None:
        self._filter6 = filter6
        self._failsafe = (tuple(failsafe_inbound), tuple(failsafe_outbound))
        self._vxlan_port = vxlan_port
        self._desired: tuple[frozenset[str], frozenset[str]] | None = None
        self._hosts: tuple[HostGuard, ...] = ()
        self._programmed: tuple[tuple[frozenset[str], frozenset[str]], tuple[HostGuard, ...]] | None = None

    def set_endpoints(self, ingress: frozenset[str], egress: frozenset[str]) -> None:
        """The local workload interfaces with ingress / egress policy."""
        self._desired = (frozenset(ingress), frozenset(egress))

    def set_host_endpoints(self, guards: Iterable[HostGuard]) -> None:
        """The local host endpoints whose IPv6 traffic is dropped (policed_host_endpoints)."""
        self._hosts = tuple(sorted(guards, key=lambda g: g.iface))

    def complete_deferred_work(self) -> None:
        if self._desired is None or (self._desired, self._hosts) == self._programmed:
            return
        ingress, egress = self._desired
        self._filter6.update_chain(guard_chain(ingress, egress))
        host_chains = host_guard_chains(self._hosts, *self._failsafe, self._vxlan_port)
        for chain in host_chains.values():
            self._filter6.update_chain(chain)
        for builtin in _BUILTINS:
            self._filter6.set_jump_rules(builtin, [Rule(match="", action=f"-j {GUARD_CHAIN}"),
                                                   Rule(match="", action=f"-j {HOST_CHAINS[builtin]}")])
        if ingress or egress:
            log.warning("IPv6 traffic of policy-selected pods is dropped: felixpy does not render policy "
                        "into ip6tables yet ingress_ifaces=%d egress_ifaces=%d", len(ingress), len(egress))
        if self._hosts:
            log.warning("IPv6 traffic of policed host endpoints is dropped (failsafe ports, neighbour "
                        "discovery and VXLAN excepted): felixpy does not render policy into ip6tables yet "
                        "host_endpoints=%s", ",".join(g.iface for g in self._hosts))
        self._programmed = (self._desired, self._hosts)
