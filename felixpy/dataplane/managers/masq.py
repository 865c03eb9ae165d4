"""MasqManager: natOutgoing for IP pools, as Felix programs it.

Two ipsets and one chain in the nat table:

    POSTROUTING ─► cali-POSTROUTING ─► cali-nat-outgoing:
        -m set --match-set cali40masq-ipam-pools src
        -m set ! --match-set cali40all-ipam-pools dst  -j MASQUERADE --random-fully

so traffic from a natOutgoing pool to anything outside all pools leaves with the node's address,
while pod-to-pod traffic across nodes keeps its pod source address.
"""

from __future__ import annotations

from felixpy import names
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Chain, Rule, Table
from felixpy.messages import Message, NatState

MASQ_SET = names.check_ipset_name(names.IPSET_PREFIX + "masq-ipam-pools")
ALL_POOLS_SET = names.check_ipset_name(names.IPSET_PREFIX + "all-ipam-pools")
POSTROUTING_CHAIN = names.check_chain_name(names.CHAIN_PREFIX + "POSTROUTING")
NAT_OUTGOING_CHAIN = names.check_chain_name(names.CHAIN_PREFIX + "nat-outgoing")


def nat_chains(nat: NatState) -> list[Chain]:
    """The nat-table chains for a NatState (pure)."""
    outgoing_rules: tuple[Rule, ...] = ()
    if nat.masq_pools:
        outgoing_rules = (
            Rule(
                match=f"-m set --match-set {MASQ_SET} src -m set ! --match-set {ALL_POOLS_SET} dst",
                action="-j MASQUERADE --random-fully",
                comment="nat outgoing from natOutgoing pools",
            ),
        )
    return [
        Chain(POSTROUTING_CHAIN, (Rule(match="", action=f"-j {NAT_OUTGOING_CHAIN}"),)),
        Chain(NAT_OUTGOING_CHAIN, outgoing_rules),
    ]


class MasqManager:
    def __init__(self, nat_table: Table, ipsets: IPSets) -> None:
        self._nat = nat_table
        self._ipsets = ipsets
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
        self._ipsets.set_members(MASQ_SET, "hash:net", sorted(nat.masq_pools))
        self._ipsets.set_members(ALL_POOLS_SET, "hash:net", sorted(nat.all_pools))
        for chain in nat_chains(nat):
            self._nat.update_chain(chain)
        self._nat.set_jump_rules("POSTROUTING", [Rule(match="", action=f"-j {POSTROUTING_CHAIN}")])
        self._dirty = False
