"""FakeDataplane: the agent's real route, iptables and ipset drivers over the stateful kernel fakes.

    dp = FakeDataplane(links={"eth0": 2})
    agent = Agent(..., **dp.drivers())          # route_table, nat_table, filter_table, mangle_table,
                                                # raw_table, ipsets
    dp.netlink.ours()                           # our routes "in the kernel"
    dp.iptables.tables["filter"], dp.ipset.sets # chains and sets "in the kernel"

No tunnel links driver: an agent given its own route driver runs without tunnel devices.
"""

from __future__ import annotations

from typing import Any

from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Table
from felixpy.dataplane.drivers.routes import RouteTable
from tests.fakes.iptables import FakeIpset, FakeIptables
from tests.fakes.netlink import FakeNetlink


class FakeDataplane:
    def __init__(self, links: dict[str, int] | None = None) -> None:
        self.netlink = FakeNetlink(links)
        self.iptables = FakeIptables()
        self.ipset = FakeIpset()
        self.routes = RouteTable(netlink=self.netlink)
        # No sleeping between restore retries: a test injects failures on purpose.
        self.nat = Table("nat", backend="nft", runner=self.iptables, sleep=lambda _: None)
        self.filter = Table("filter", backend="nft", runner=self.iptables, sleep=lambda _: None)
        self.mangle = Table("mangle", backend="nft", runner=self.iptables, sleep=lambda _: None)
        self.raw = Table("raw", backend="nft", runner=self.iptables, sleep=lambda _: None)
        self.ipsets = IPSets(runner=self.ipset)

    def drivers(self) -> dict[str, Any]:
        """Keyword arguments for Agent(...)."""
        return {"route_table": self.routes, "nat_table": self.nat, "filter_table": self.filter,
                "mangle_table": self.mangle, "raw_table": self.raw, "ipsets": self.ipsets}

    def chains(self, table: str = "filter") -> dict[str, list[str]]:
        return self.iptables.tables[table]

    def set_members(self) -> dict[str, set[str]]:
        return {name: members for name, (_, members) in self.ipset.sets.items()}
