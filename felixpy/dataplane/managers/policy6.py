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
"""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

from felixpy import names
from felixpy.dataplane.drivers.iptables import Table
from policy import model
from policy.iptables import Chain, Rule
from policy.render import EndpointChains

log = logging.getLogger(__name__)

GUARD_CHAIN = names.check_chain_name(names.CHAIN_PREFIX + "v6-policy-not-rendered")
_BUILTINS = ("FORWARD", "INPUT", "OUTPUT")


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


def guard_chain(ingress: frozenset[str], egress: frozenset[str]) -> Chain:
    """The guard chain (pure): a DROP per policed direction of each endpoint interface."""
    rules = [Rule(match=f"-o {iface}", action="DROP", comment="ingress policy not rendered for IPv6")
             for iface in sorted(ingress)]
    rules += [Rule(match=f"-i {iface}", action="DROP", comment="egress policy not rendered for IPv6")
              for iface in sorted(egress)]
    return Chain(GUARD_CHAIN, tuple(rules))


class Ipv6PolicyGuard:
    def __init__(self, filter6: Table) -> None:
        self._filter6 = filter6
        self._desired: tuple[frozenset[str], frozenset[str]] | None = None
        self._programmed: tuple[frozenset[str], frozenset[str]] | None = None

    def set_endpoints(self, ingress: frozenset[str], egress: frozenset[str]) -> None:
        """The local workload interfaces with ingress / egress policy."""
        self._desired = (frozenset(ingress), frozenset(egress))

    def complete_deferred_work(self) -> None:
        if self._desired is None or self._desired == self._programmed:
            return
        ingress, egress = self._desired
        self._filter6.update_chain(guard_chain(ingress, egress))
        for builtin in _BUILTINS:
            self._filter6.set_jump_rules(builtin, [Rule(match="", action=f"-j {GUARD_CHAIN}")])
        if ingress or egress:
            log.warning("IPv6 traffic of policy-selected pods is dropped: felixpy does not render policy "
                        "into ip6tables yet ingress_ifaces=%d egress_ifaces=%d", len(ingress), len(egress))
        self._programmed = self._desired
