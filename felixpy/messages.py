"""The values the calculation graph hands to the dataplane: what the kernel should look like.

calc/ produces them, dataplane/ consumes them; the two packages meet only here. The agent sends
each of the calc's outputs to every dataplane manager (`Manager.on_update(message)`); a manager
keeps the messages it understands and ignores the rest, as Go Felix's managers do.

    CalcRoutes ─┐
    LearnedRoutes ─┼─► RouteManager ──► RouteTable (one `Route` value all the way to the driver)
    TunnelDevices ─┘
    EncapState ───► TunnelManager ──► TunnelLinks
    NatState ─────► MasqManager ──► nat Table, IPSets
    FilterState ──► PolicyManager ──► filter, mangle and raw Tables, IPSets
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Literal, Mapping, Union

from policy.iptables import Chain, Rule


@functools.lru_cache(maxsize=1 << 16)
def _network(text: str) -> tuple[str, int]:
    # The calc graph builds the same destinations on every apply: parse each one once.
    net = ipaddress.ip_network(text, strict=False)
    return str(net), net.version


@functools.lru_cache(maxsize=1 << 12)
def _address(text: str) -> tuple[str, int]:
    addr = ipaddress.ip_address(text)
    return str(addr), addr.version


@dataclass(frozen=True, slots=True)
class Route:
    """One route felixpy wants in the node's main routing table, from the calc to the route driver.

    unicast needs a gateway, an iface, or both; blackhole needs neither. `dst` and `gateway` are
    normalised on construction, so two routes are the same route exactly when they are equal.
    IPv4 and IPv6 routes are the same value; the gateway must be of the destination's family.
    """

    dst: str  # CIDR
    type: Literal["unicast", "blackhole"] = "unicast"
    gateway: str | None = None
    iface: str | None = None
    onlink: bool = False

    def __post_init__(self) -> None:
        dst, version = _network(self.dst)
        object.__setattr__(self, "dst", dst)
        if self.type == "blackhole":
            if self.gateway or self.iface or self.onlink:
                raise ValueError(f"blackhole route {self.dst} cannot have a gateway or iface")
        elif self.type == "unicast":
            if not self.gateway and not self.iface:
                raise ValueError(f"route {self.dst} needs a gateway or an iface")
            if self.gateway:
                gateway, gateway_version = _address(self.gateway)
                if gateway_version != version:
                    raise ValueError(f"route {self.dst}: gateway {gateway} is not an IPv{version} address")
                object.__setattr__(self, "gateway", gateway)
            if self.onlink and not self.iface:
                raise ValueError(f"onlink route {self.dst} needs an iface")
        else:
            raise ValueError(f"route {self.dst}: unknown type {self.type!r}")

    @property
    def version(self) -> int:
        return _network(self.dst)[1]

    def describe(self) -> str:
        parts = [self.dst if self.type == "unicast" else f"blackhole {self.dst}"]
        if self.gateway:
            parts.append(f"via {self.gateway}")
        if self.iface:
            parts.append(f"dev {self.iface}")
        if self.onlink:
            parts.append("onlink")
        return " ".join(parts)


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

    @property
    def routes(self) -> tuple[Route, ...]:
        return pod_routes(self.iface, self.ips)


def pod_routes(iface: str, ips: tuple[str, ...]) -> tuple[Route, ...]:
    """A local pod's /32s (/128s) to its veth; none until the CNI plugin has named the interface."""
    if not iface:
        return ()
    return tuple(Route(f"{ip}/{128 if ':' in ip else 32}", iface=iface) for ip in ips)


# -- routes ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CalcRoutes:
    """The calc graph's whole desired route set (local pods, our blocks, routes to other nodes)."""

    routes: frozenset[Route]


@dataclass(frozen=True, slots=True)
class LearnedRoutes:
    """BGP's best routes (prefix → next hop) and this node's own addresses (never a next hop)."""

    routes: Mapping[str, str]
    local_ips: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TunnelDevices:
    """Tunnel devices no route may go through right now (not wanted, or not usable yet)."""

    blocked: frozenset[str]


# -- encapsulation ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class RemoteVtep:
    """Another node's VXLAN endpoint: its tunnel address and MAC, reached via its node IP."""

    node: str
    node_ip: str
    tunnel_ip: str
    mac: str


@dataclass(frozen=True, slots=True)
class EncapState:
    """Which tunnel devices this node needs, with what, and the remote VTEPs.

    vxlan.calico carries the IPv4 pools' VXLAN over the node's IPv4 address, vxlan-v6.calico
    the IPv6 pools' over its IPv6 address (Felix's two VXLAN managers).
    """

    local_ip: str | None = None
    vxlan: bool = False  # some enabled IPv4 pool has vxlanMode Always / CrossSubnet
    vxlan_address: str | None = None
    vxlan_mac: str | None = None
    vteps: frozenset[RemoteVtep] = frozenset()
    ipip: bool = False
    ipip_address: str | None = None
    local_ipv6: str | None = None
    vxlan_v6: bool = False  # some enabled IPv6 pool has vxlanMode Always / CrossSubnet
    vxlan_v6_address: str | None = None
    vxlan_v6_mac: str | None = None
    vteps_v6: frozenset[RemoteVtep] = frozenset()


# -- iptables and ipsets ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NatState:
    """natOutgoing: traffic from masq_pools to anywhere outside all_pools is masqueraded.

    Both families: each is programmed in its own nat table (iptables / ip6tables) and ipsets.
    """

    masq_pools: frozenset[str]
    all_pools: frozenset[str]


@dataclass(frozen=True, slots=True)
class IPSetState:
    """One desired ipset: its type ("hash:net" | "hash:ip,port") and members."""

    type: str
    members: frozenset[str]


@dataclass(frozen=True)
class TableState:
    """Our chains and our jump rules (per built-in chain) in one iptables table."""

    chains: Mapping[str, Chain] = field(default_factory=dict)
    jumps: Mapping[str, tuple[Rule, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class FilterState:
    """Everything policy should hold on this node: the filter table, the policy ipsets, and the
    mangle and raw tables' chains (host endpoints' preDNAT and doNotTrack policy)."""

    chains: Mapping[str, Chain]
    jumps: Mapping[str, tuple[Rule, ...]]
    ipsets: Mapping[str, IPSetState]
    mangle: TableState = field(default_factory=TableState)
    raw: TableState = field(default_factory=TableState)
    ip_version: int = 4  # iptables (4) or ip6tables (6); the ipsets are that family's


Message = Union[CalcRoutes, LearnedRoutes, TunnelDevices, EncapState, NatState, FilterState]
