"""The calculation graph: datastore updates in, the node's desired dataplane state out.

Synchronous and memoryless: it keeps an index of the resources it cares about, and every output
is a pure function of that index, recomputed when asked (`routes()`, `nat()`, `encap()`,
`local_endpoints()`). No I/O happens here, and nothing is remembered about what the kernel looks
like; that is the dataplane drivers' job.

    Dispatcher ──► on_pool     ──► pools              ──► nat(), encap()
               ├─► on_node     ──► nodes (IPs, VTEPs) ──┐
               ├─► on_affinity ──► affinities       ──┼─► routes(), bgp_announcements()
               └─► on_endpoint ──► endpoints        ──┴─► local_endpoints()

Its inputs are already decoded (calc/updates.py): an invalid resource arrives as a deletion.

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
from typing import TYPE_CHECKING

from felixpy import names
from felixpy.calc.updates import BlockAffinity, IPPool, Kind, Node, Update, WorkloadEndpoint
from felixpy.messages import EncapState, LocalEndpoint, NatState, RemoteVtep, Route, pod_routes

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher


class CalcGraph:
    def __init__(self, node_name: str, *, remote_routes_from_datastore: bool) -> None:
        self.node_name = node_name
        self.remote_routes_from_datastore = remote_routes_from_datastore
        self._pools: dict[str, IPPool] = {}  # pool name -> IPv4 pool
        self._nodes: dict[str, Node] = {}  # node name -> addresses (nodes with an IPv4 only)
        self._node_labels: dict[str, dict[str, str]] = {}
        self._affinities: dict[str, str] = {}  # block CIDR -> node (confirmed only)
        self._endpoints: dict[str, WorkloadEndpoint] = {}  # WEP key -> endpoint
        self.dirty = True

    # -- input -----------------------------------------------------------------------------
    def register_with(self, dispatcher: Dispatcher) -> None:
        dispatcher.register(Kind.IP_POOL, self.on_pool)
        dispatcher.register(Kind.NODE, self.on_node)
        dispatcher.register(Kind.BLOCK_AFFINITY, self.on_affinity)
        dispatcher.register(Kind.WORKLOAD_ENDPOINT, self.on_endpoint)

    def on_affinity(self, update: Update[BlockAffinity]) -> None:
        affinity = update.value
        if affinity is not None and affinity.confirmed:
            self._affinities[affinity.cidr] = affinity.node
        elif self._affinities.get(update.name) == update.node:
            del self._affinities[update.name]
        self.dirty = True

    def on_endpoint(self, update: Update[WorkloadEndpoint]) -> None:
        if update.value is None:
            self._endpoints.pop(update.key, None)
        else:
            self._endpoints[update.key] = update.value
        self.dirty = True

    def on_node(self, update: Update[Node]) -> None:
        node = update.value
        if node is None:
            self._node_labels.pop(update.name, None)
        else:
            self._node_labels[update.name] = dict(node.labels)
        if node is None or node.ipv4 is None:
            self._nodes.pop(update.name, None)
        else:
            self._nodes[update.name] = node
        self.dirty = True

    def on_pool(self, update: Update[IPPool]) -> None:
        pool = update.value
        if pool is None or ipaddress.ip_network(pool.cidr).version != 4:
            self._pools.pop(update.name, None)
        else:
            self._pools[update.name] = pool
        self.dirty = True

    # -- outputs ---------------------------------------------------------------------------
    def node_labels(self) -> dict[str, str]:
        return dict(self._node_labels.get(self.node_name, {}))

    def local_endpoints(self) -> list[LocalEndpoint]:
        return [
            LocalEndpoint(key, e.namespace, e.pod, e.iface, e.ipv4s, e.mac, e.labels)
            for key, e in self._endpoints.items()
            if e.node == self.node_name
        ]

    def routes(self) -> set[Route]:
        routes: set[Route] = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name:
                routes.update(pod_routes(ep.iface, ep.ipv4s))
        for cidr, node in self._affinities.items():
            if node == self.node_name:
                routes.add(Route(cidr, type="blackhole"))
            else:
                route = self._remote_route(cidr, node)
                if route is not None:
                    routes.add(route)
        routes.update(self._borrowed_routes())
        return routes

    def _pool_of(self, net: ipaddress.IPv4Network) -> IPPool | None:
        for pool in self._pools.values():
            if net.subnet_of(ipaddress.IPv4Network(pool.cidr)):
                return pool
        return None

    def _remote_route(self, dst: str, node: str) -> Route | None:
        """The route to `dst` (a block or a /32) hosted by another node, by its pool's mode."""
        info = self._nodes.get(node)
        if info is None:
            return None
        pool = self._pool_of(ipaddress.IPv4Network(dst))
        vxlan_mode = pool.vxlan_mode if pool is not None else "Never"
        ipip_mode = pool.ipip_mode if pool is not None else "Never"
        encap = vxlan_mode != "Never" or ipip_mode != "Never"
        if encap and "CrossSubnet" in (vxlan_mode, ipip_mode) and self._same_subnet(info):
            return Route(dst, gateway=info.ipv4)
        if vxlan_mode != "Never":
            if info.vxlan_tunnel_ip is None or info.vxlan_mac is None:
                return None  # no VTEP yet: nothing to send it to
            return Route(dst, gateway=info.vxlan_tunnel_ip, iface=names.VXLAN_DEVICE, onlink=True)
        if ipip_mode != "Never":
            return Route(dst, gateway=info.ipv4, iface=names.IPIP_DEVICE, onlink=True)
        if self.remote_routes_from_datastore:
            return Route(dst, gateway=info.ipv4)
        return None

    def _same_subnet(self, remote: Node) -> bool:
        local = self._nodes.get(self.node_name)
        if local is None:
            return False
        return ipaddress.IPv4Address(remote.ipv4) in ipaddress.IPv4Network(local.ipv4_network)

    def _borrowed_routes(self) -> set[Route]:
        """Remote pods whose address is not in a block affine to their own node."""
        own_blocks: dict[str, list[ipaddress.IPv4Network]] = {}
        for cidr, node in self._affinities.items():
            own_blocks.setdefault(node, []).append(ipaddress.IPv4Network(cidr))
        routes = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name or ep.node not in self._nodes:
                continue
            for ip in ep.ipv4s:
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
                RemoteVtep(name, info.ipv4, info.vxlan_tunnel_ip, info.vxlan_mac)
                for name, info in self._nodes.items()
                if name != self.node_name and info.ipv4 and info.vxlan_tunnel_ip and info.vxlan_mac
            )
        return EncapState(
            local_ip=local.ipv4 if local else None,
            vxlan=vxlan,
            vxlan_address=local.vxlan_tunnel_ip if local and vxlan else None,
            vxlan_mac=local.vxlan_mac if local and vxlan else None,
            vteps=vteps,
            ipip=ipip,
            ipip_address=local.ipip_tunnel_ip if local and ipip else None,
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
            for ip in ep.ipv4s:
                host = ipaddress.IPv4Network(f"{ip}/32")
                if not any(host.subnet_of(b) for b in blocks) and exported(host):
                    prefixes.add(str(host))
        return frozenset(prefixes)

    def nat(self) -> NatState:
        return NatState(
            masq_pools=frozenset(p.cidr for p in self._pools.values() if p.nat_outgoing),
            all_pools=frozenset(p.cidr for p in self._pools.values()),
        )
