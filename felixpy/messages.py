"""The values the calculation graph hands to the dataplane: what the kernel should look like.

calc/ produces them, dataplane/ consumes them; the two packages meet only here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True, slots=True, order=True)
class RouteSpec:
    """One route felixpy wants in the node's main routing table."""

    dst: str  # CIDR
    type: Literal["unicast", "blackhole"] = "unicast"
    gateway: str | None = None
    iface: str | None = None
    onlink: bool = False


@dataclass(frozen=True, slots=True)
class LocalEndpoint:
    """A pod on this node, as its WorkloadEndpoint describes it."""

    key: str  # datastore key of the WorkloadEndpoint
    namespace: str
    pod: str
    iface: str
    ips: tuple[str, ...]  # bare addresses, no prefix
    mac: str = ""
    labels: tuple[tuple[str, str], ...] = field(default=())


@dataclass(frozen=True, slots=True)
class NatState:
    """natOutgoing: traffic from masq_pools to anywhere outside all_pools is masqueraded."""

    masq_pools: frozenset[str]
    all_pools: frozenset[str]
