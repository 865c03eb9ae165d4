"""The calculation graph: datastore updates in, the node's desired dataplane state out.

Synchronous and memoryless: it keeps an index of the resources it cares about, and every output
is a pure function of that index, recomputed when asked (`routes()`, `nat()`, `encap()`,
`local_endpoints()`). No I/O happens here, and nothing is remembered about what the kernel looks
like; that is the dataplane drivers' job.

    KVUpdate ──► parse key ──► pools        ──► nat(), encap()
                           ├─► nodes (IPs, VTEPs) ──┐
                           ├─► affinities   ──┼─► routes()
                           └─► endpoints    ──┴─► local_endpoints()

Routes on node N:
  * a /32 (scope link) to each local pod's veth;
  * a blackhole for each block with a confirmed affinity to N (traffic to unused addresses in our
    own blocks stops here instead of bouncing to the default route);
  * for each block affine to another node M, and a /32 for every remote pod whose address is
    borrowed from a block that is not affine to its node, by the mode of the pool it is in
    (calico-reference §3.3, §3.4):
      - vxlanMode Always: `via <M's VXLAN tunnel IP> dev vxlan.calico onlink` (only once M has a
        VTEP: tunnel address and MAC on its Node);
      - ipipMode Always: `via <M's IP> dev tunl0 onlink`;
      - CrossSubnet: as Always when M's IP is outside N's subnet (the prefix of N's
        spec.bgp.ipv4Address), else `via <M's IP>` unencapsulated;
      - no encapsulation: `via <M's IP>` only when remote routes come from the datastore
        (backend "vxlan" with unencapsulated pools: the lab's "routes" mode, flannel host-gw
        style); with BGP those come from the BGP controller instead.
    Encapsulated routes are programmed whatever the backend, as Felix does: the route manager
    lets them win over BGP-learned routes for the same prefix.

`bgp_announcements()` says what this node announces over BGP: its confirmed blocks and borrowed
/32s. `encap()` says which tunnel devices this node needs and the remote VTEPs.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.messages import LocalEndpoint, NatState, RouteSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Pool:
    cidr: str
    nat_outgoing: bool
    disabled: bool
    disable_bgp_export: bool = False
    ipip_mode: str = "Never"  # Always | CrossSubnet | Never
    vxlan_mode: str = "Never"

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.cidr)


@dataclass(frozen=True, slots=True)
class _NodeInfo:
    ip: str  # bare IPv4 address
    network: str  # its subnet, from the prefix of spec.bgp.ipv4Address
    vxlan_ip: str | None = None
    vxlan_mac: str | None = None
    ipip_ip: str | None = None


@dataclass(frozen=True, slots=True, order=True)
class RemoteVtep:
    """Another node's VXLAN endpoint: its tunnel address and MAC, reached via its node IP."""

    node: str
    node_ip: str
    tunnel_ip: str
    mac: str


@dataclass(frozen=True, slots=True)
class EncapState:
    """Which tunnel devices this node needs, with what, and the remote VTEPs (pure value)."""

    local_ip: str | None = None
    vxlan: bool = False  # some enabled IPv4 pool has vxlanMode Always / CrossSubnet
    vxlan_address: str | None = None
    vxlan_mac: str | None = None
    vteps: frozenset[RemoteVtep] = frozenset()
    ipip: bool = False
    ipip_address: str | None = None


@dataclass(frozen=True, slots=True)
class _Endpoint:
    key: str
    node: str
    namespace: str
    pod: str
    iface: str
    ips: tuple[str, ...]
    mac: str
    labels: tuple[tuple[str, str], ...]


def _addr(cidr_or_ip: str) -> str:
    return str(ipaddress.ip_interface(cidr_or_ip).ip)


class CalcGraph:
    def __init__(self, node_name: str, *, remote_routes_from_datastore: bool) -> None:
        self.node_name = node_name
        self.remote_routes_from_datastore = remote_routes_from_datastore
        self._pools: dict[str, _Pool] = {}  # pool name -> pool
        self._node_ips: dict[str, str] = {}  # node name -> IPv4 address
        self._nodes: dict[str, _NodeInfo] = {}  # node name -> addresses (nodes with an IPv4 only)
        self._node_labels: dict[str, dict[str, str]] = {}
        self._affinities: dict[str, str] = {}  # block CIDR -> node (confirmed only)
        self._endpoints: dict[str, _Endpoint] = {}  # WEP key -> endpoint
        self.dirty = True

    # -- input -----------------------------------------------------------------------------
    def on_update(self, update: KVUpdate) -> None:
        parsed = keys.parse_key(update.key)
        try:
            if parsed.kind == "affinity":
                self._on_affinity(parsed.node, parsed.name, update.value)
            elif parsed.kind == "resource" and parsed.plural == "workloadendpoints":
                self._on_endpoint(update.key, update.value)
            elif parsed.kind == "resource" and parsed.plural == "nodes":
                self._on_node(parsed.name, update.value)
            elif parsed.kind == "resource" and parsed.plural == "ippools":
                self._on_pool(parsed.name, update.value)
            else:
                return
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            # An invalid value is treated as absent (fail closed), never as a crash of the agent.
            log.warning("ignoring invalid datastore value key=%s error=%s", update.key, err)
            self._forget(update.key, parsed)
        self.dirty = True

    def _forget(self, key: str, parsed: keys.ParsedKey) -> None:
        if parsed.kind == "affinity":
            self._affinities.pop(parsed.name, None)
        elif parsed.plural == "workloadendpoints":
            self._endpoints.pop(key, None)
        elif parsed.plural == "nodes":
            self._node_ips.pop(parsed.name, None)
            self._nodes.pop(parsed.name, None)
            self._node_labels.pop(parsed.name, None)
        elif parsed.plural == "ippools":
            self._pools.pop(parsed.name, None)

    def _on_affinity(self, node: str, cidr: str, value: Any) -> None:
        if value is not None and value.get("state", "confirmed") == "confirmed" and not value.get("deleted"):
            self._affinities[str(ipaddress.ip_network(cidr))] = node
        elif self._affinities.get(cidr) == node:
            # Pending or pendingDeletion affinities are not routed (calico#6867).
            del self._affinities[cidr]

    def _on_endpoint(self, key: str, value: Any) -> None:
        if value is None:
            self._endpoints.pop(key, None)
            return
        spec = value["spec"]
        meta = value.get("metadata", {})
        ips = tuple(_addr(n) for n in spec.get("ipNetworks", []) if ipaddress.ip_interface(n).version == 4)
        self._endpoints[key] = _Endpoint(
            key=key,
            node=spec["node"],
            namespace=meta.get("namespace", ""),
            pod=spec.get("pod", ""),
            iface=spec.get("interfaceName", ""),
            ips=ips,
            mac=spec.get("mac", ""),
            labels=tuple(sorted((meta.get("labels") or {}).items())),
        )

    def _on_node(self, name: str, value: Any) -> None:
        if value is None:
            self._node_ips.pop(name, None)
            self._nodes.pop(name, None)
            self._node_labels.pop(name, None)
            return
        self._node_labels[name] = dict(value.get("metadata", {}).get("labels") or {})
        spec = value.get("spec") or {}
        bgp = spec.get("bgp") or {}
        address = bgp.get("ipv4Address")
        if not address:
            self._node_ips.pop(name, None)
            self._nodes.pop(name, None)
            return
        iface = ipaddress.IPv4Interface(address)
        self._node_ips[name] = str(iface.ip)
        vxlan_ip = spec.get("ipv4VXLANTunnelAddr")
        ipip_ip = bgp.get("ipv4IPIPTunnelAddr")
        mac = spec.get("vxlanTunnelMACAddr")
        self._nodes[name] = _NodeInfo(
            ip=str(iface.ip),
            network=str(iface.network),
            vxlan_ip=_addr(vxlan_ip) if vxlan_ip else None,
            vxlan_mac=str(mac).lower() if mac else None,
            ipip_ip=_addr(ipip_ip) if ipip_ip else None,
        )

    def _on_pool(self, name: str, value: Any) -> None:
        if value is None:
            self._pools.pop(name, None)
            return
        spec = value["spec"]
        cidr = str(ipaddress.ip_network(spec["cidr"]))
        if ipaddress.ip_network(cidr).version != 4:
            return
        ipip_mode = str(spec.get("ipipMode") or "Never")
        vxlan_mode = str(spec.get("vxlanMode") or "Never")
        if ipip_mode != "Never" and vxlan_mode != "Never":
            # Validation refuses this on write; a pool stored some other way is not guessed at.
            raise ValueError(f"pool {name} enables both ipipMode and vxlanMode")
        self._pools[name] = _Pool(cidr, bool(spec.get("natOutgoing")), bool(spec.get("disabled")),
                                  bool(spec.get("disableBGPExport")), ipip_mode, vxlan_mode)

    # -- outputs ---------------------------------------------------------------------------
    def node_labels(self) -> dict[str, str]:
        return dict(self._node_labels.get(self.node_name, {}))

    def local_endpoints(self) -> list[LocalEndpoint]:
        return [
            LocalEndpoint(e.key, e.namespace, e.pod, e.iface, e.ips, e.mac, e.labels)
            for e in self._endpoints.values()
            if e.node == self.node_name
        ]

    def routes(self) -> set[RouteSpec]:
        routes: set[RouteSpec] = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name and ep.iface:
                routes.update(RouteSpec(f"{ip}/32", iface=ep.iface) for ip in ep.ips)
        for cidr, node in self._affinities.items():
            if node == self.node_name:
                routes.add(RouteSpec(cidr, type="blackhole"))
            else:
                route = self._remote_route(cidr, node)
                if route is not None:
                    routes.add(route)
        routes.update(self._borrowed_routes())
        return routes

    def _pool_of(self, net: ipaddress.IPv4Network) -> _Pool | None:
        for pool in self._pools.values():
            if net.subnet_of(pool.network):
                return pool
        return None

    def _remote_route(self, dst: str, node: str) -> RouteSpec | None:
        """The route to `dst` (a block or a /32) hosted by another node, by its pool's mode."""
        info = self._nodes.get(node)
        if info is None:
            return None
        pool = self._pool_of(ipaddress.IPv4Network(dst))
        vxlan_mode = pool.vxlan_mode if pool is not None else "Never"
        ipip_mode = pool.ipip_mode if pool is not None else "Never"
        encap = vxlan_mode != "Never" or ipip_mode != "Never"
        if encap and "CrossSubnet" in (vxlan_mode, ipip_mode) and self._same_subnet(info):
            return RouteSpec(dst, gateway=info.ip)
        if vxlan_mode != "Never":
            if info.vxlan_ip is None or info.vxlan_mac is None:
                return None  # no VTEP yet: nothing to send it to
            return RouteSpec(dst, gateway=info.vxlan_ip, iface=names.VXLAN_DEVICE, onlink=True)
        if ipip_mode != "Never":
            return RouteSpec(dst, gateway=info.ip, iface=names.IPIP_DEVICE, onlink=True)
        if self.remote_routes_from_datastore:
            return RouteSpec(dst, gateway=info.ip)
        return None

    def _same_subnet(self, remote: _NodeInfo) -> bool:
        local = self._nodes.get(self.node_name)
        if local is None:
            return False
        return ipaddress.IPv4Address(remote.ip) in ipaddress.IPv4Network(local.network)

    def _borrowed_routes(self) -> set[RouteSpec]:
        """Remote pods whose address is not in a block affine to their own node."""
        own_blocks: dict[str, list[ipaddress.IPv4Network]] = {}
        for cidr, node in self._affinities.items():
            own_blocks.setdefault(node, []).append(ipaddress.IPv4Network(cidr))
        routes = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name or ep.node not in self._nodes:
                continue
            for ip in ep.ips:
                addr = ipaddress.IPv4Address(ip)
                if not any(addr in block for block in own_blocks.get(ep.node, [])):
                    route = self._remote_route(f"{ip}/32", ep.node)
                    if route is not None:
                        routes.add(route)
        return routes

    def encap(self) -> EncapState:
        """The tunnel devices this node needs (from the enabled IPv4 pools) and the remote VTEPs."""
        enabled = [p for p in self._pools.values() if not p.disabled]
        vxlan = any(p.vxlan_mode != "Never" for p in enabled)
        ipip = any(p.ipip_mode != "Never" for p in enabled)
        local = self._nodes.get(self.node_name)
        vteps: frozenset[RemoteVtep] = frozenset()
        if vxlan:
            vteps = frozenset(
                RemoteVtep(name, info.ip, info.vxlan_ip, info.vxlan_mac)
                for name, info in self._nodes.items()
                if name != self.node_name and info.vxlan_ip and info.vxlan_mac
            )
        return EncapState(
            local_ip=local.ip if local else None,
            vxlan=vxlan,
            vxlan_address=local.vxlan_ip if local and vxlan else None,
            vxlan_mac=local.vxlan_mac if local and vxlan else None,
            vteps=vteps,
            ipip=ipip,
            ipip_address=local.ipip_ip if local and ipip else None,
        )

    def bgp_announcements(self) -> frozenset[str]:
        """What this node announces over BGP (backend "bird").

        Its confirmed affine blocks, and a /32 for each local pod whose address is not inside one
        of them (borrowed from another node's block); never anything from a pool with
        `disableBGPExport`. A /32 inside our own blocks is covered by the block's announcement.
        """
        no_export = [ipaddress.IPv4Network(p.cidr) for p in self._pools.values() if p.disable_bgp_export]

        def exported(net: ipaddress.IPv4Network) -> bool:
            return not any(net.subnet_of(pool) for pool in no_export)

        blocks = [ipaddress.IPv4Network(cidr) for cidr, node in self._affinities.items()
                  if node == self.node_name]
        prefixes = {str(b) for b in blocks if exported(b)}
        for ep in self._endpoints.values():
            if ep.node != self.node_name:
                continue
            for ip in ep.ips:
                host = ipaddress.IPv4Network(f"{ip}/32")
                if not any(host.subnet_of(b) for b in blocks) and exported(host):
                    prefixes.add(str(host))
        return frozenset(prefixes)

    def nat(self) -> NatState:
        return NatState(
            masq_pools=frozenset(p.cidr for p in self._pools.values() if p.nat_outgoing),
            all_pools=frozenset(p.cidr for p in self._pools.values()),
        )
