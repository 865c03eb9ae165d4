"""MasqManager: natOutgoing for IP pools, as Felix programs it.

Two ipsets and one chain in the nat table:

    POSTROUTING ─► cali-POSTROUTING ─► cali-nat-outgoing:
        -m set --match-set cali40masq-ipam-pools src
        -m set ! --match-set cali40all-ipam-pools dst  -j MASQUERADE --random-fully

so traffic from a natOutgoing pool to anything outside all pools leaves with the node's address,
while pod-to-pod traffic across nodes keeps its pod source address.

Felix's NATOutgoingAddress turns the MASQUERADE into `SNAT --to-source <address>`, and its
NATPortRange puts TCP and UDP on those source ports (`--to-ports` / `<address>:<ports>`), each
followed by a RETURN so the catch-all rule only sees the other protocols (felix/rules/nat.go).

IPv6 pools get the same chain in ip6tables' nat table with the cali60 sets (one MasqManager per
family, as Felix renders NATOutgoingChain per IP version). NATOutgoingAddress is an IPv4 address,
so IPv6 traffic is always masqueraded to the interface's address; NATPortRange applies to both.
"""

from __future__ import annotations

from dataclasses import dataclass

from felixpy import names
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Chain, Rule, Table
from felixpy.messages import Message, NatState

MASQ_SET = names.check_ipset_name(names.IPSET_PREFIX + "masq-ipam-pools")
ALL_POOLS_SET = names.check_ipset_name(names.IPSET_PREFIX + "all-ipam-pools")
MASQ_SET_V6 = names.check_ipset_name(names.IPSET_PREFIX_V6 + "masq-ipam-pools")
ALL_POOLS_SET_V6 = names.check_ipset_name(names.IPSET_PREFIX_V6 + "all-ipam-pools")
_SETS = {4: (MASQ_SET, ALL_POOLS_SET), 6: (MASQ_SET_V6, ALL_POOLS_SET_V6)}
POSTROUTING_CHAIN = names.check_chain_name(names.CHAIN_PREFIX + "POSTROUTING")
NAT_OUTGOING_CHAIN = names.check_chain_name(names.CHAIN_PREFIX + "nat-outgoing")


@dataclass(frozen=True, slots=True)
class NatSettings:
    """Felix's NATOutgoingAddress and NATPortRange (None: MASQUERADE, any port)."""

    outgoing_address: str | None = None
    port_range: tuple[int, int] | None = None


def _snat(settings: NatSettings, ports: str | None) -> str:
    if settings.outgoing_address is not None:
        target = f"{settings.outgoing_address}:{ports}" if ports else settings.outgoing_address
        return f"-j SNAT --to-source {target} --random-fully"
    return f"-j MASQUERADE --to-ports {ports} --random-fully" if ports else "-j MASQUERADE --random-fully"


def _of_family(cidrs: frozenset[str], ip_version: int) -> frozenset[str]:
    return frozenset(c for c in cidrs if (":" in c) == (ip_version == 6))


def nat_chains(nat: NatState, settings: NatSettings = NatSettings(), ip_version: int = 4) -> list[Chain]:
    """The nat-table chains of one family for a NatState (pure)."""
    masq_set, all_set = _SETS[ip_version]
    if ip_version == 6:
        settings = NatSettings(None, settings.port_range)  # an IPv4 SNAT address means nothing here
    outgoing_rules: tuple[Rule, ...] = ()
    if _of_family(nat.masq_pools, ip_version):
        match = f"-m set --match-set {masq_set} src -m set ! --match-set {all_set} dst"
        comment = "nat outgoing from natOutgoing pools"
        rules: list[Rule] = []
        if settings.port_range is not None:
            ports = f"{settings.port_range[0]}-{settings.port_range[1]}"
            for proto in ("tcp", "udp"):
                rules += [Rule(match=f"{match} -p {proto}", action=_snat(settings, ports), comment=comment),
                          Rule(match=f"{match} -p {proto}", action="-j RETURN", comment=comment)]
        rules.append(Rule(match=match, action=_snat(settings, None), comment=comment))
        outgoing_rules = tuple(rules)
    return [
        Chain(POSTROUTING_CHAIN, (Rule(match="", action=f"-j {NAT_OUTGOING_CHAIN}"),)),
        Chain(NAT_OUTGOING_CHAIN, outgoing_rules),
    ]


class MasqManager:
    def __init__(self, nat_table: Table, ipsets: IPSets, settings: NatSettings = NatSettings(),
                 ip_version: int = 4) -> None:
        self._nat = nat_table
        self._ipsets = ipsets
        self._settings = settings
        self._version = ip_version
        self._desired: NatState | None = None
        self._dirty = True

    def on_update(self, message: Message) -> None:
        if isinstance(message, NatState) and message != self._desired:
            self._desired = message
            self._dirty = True

    def complete_deferred_work(self) -> None:
        if not self._dirty or self._desired is None:
            return
        nat = self._desired
        masq_set, all_set = _SETS[self._version]
        self._ipsets.set_members(masq_set, "hash:net", sorted(_of_family(nat.masq_pools, self._version)))
        self._ipsets.set_members(all_set, "hash:net", sorted(_of_family(nat.all_pools, self._version)))
        for chain in nat_chains(nat, self._settings, self._version):
            self._nat.update_chain(chain)
        self._nat.set_jump_rules("POSTROUTING", [Rule(match="", action=f"-j {POSTROUTING_CHAIN}")])
        self._dirty = False
