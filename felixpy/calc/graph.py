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

Routes on node N, for IPv4 and (with IPv6 support) IPv6 alike, each family on its own:
  * a /32 (/128) (scope link) to each local pod's veth;
  * a blackhole for each block with a confirmed affinity to N (traffic to unused addresses in our
    own blocks stops here instead of bouncing to the default route);
  * for each block affine to another node M, and a /32 (/128) for every remote pod whose address
    is borrowed from a block that is not affine to its node, by the mode of the pool it is in
    (calico-reference §3.3, §3.4), through M's address of the block's family (an IPv6 block of a
    node without an IPv6 address is not routed):
      - vxlanMode Always: `via <M's VXLAN tunnel IP> dev vxlan.calico onlink` (IPv6:
        `via <M's IPv6 VXLAN tunnel IP> dev vxlan-v6.calico onlink`; only once M has a VTEP of
        that family: tunnel address and MAC on its Node);
      - ipipMode Always: `via <M's IP> dev tunl0 onlink` (IPv4 pools only);
      - CrossSubnet: as Always when M's IP is outside N's subnet (the prefix of N's
        spec.bgp.ipv4Address, ipv6Address for IPv6), else `via <M's IP>` unencapsulated;
      - no encapsulation: `via <M's IP>` only when remote routes come from the datastore
        (backend "vxlan" with unencapsulated pools: the lab's "routes" mode, flannel host-gw
        style); with BGP those come from the BGP controller instead.
    Encapsulated routes are programmed whatever the backend, as Felix does: the route manager
    lets them win over BGP-learned routes for the same prefix.

`bgp_announcements()` says what this node announces over BGP: its confirmed blocks and borrowed
/32s (/128s). `encap()` says which tunnel devices this node needs and the remote VTEPs.

IPv6 support off (Felix's Ipv6Support=false): IPv6 pools, blocks, addresses and nodes' IPv6
addresses are left out of every output, so nothing IPv6 is programmed.
"""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import TYPE_CHECKING

from felixpy import names
from felixpy.calc.updates import BlockAffinity, IPPool, Kind, Node, Update, WorkloadEndpoint
from felixpy.messages import EncapState, LocalEndpoint, NatState, RemoteVtep, Route, pod_routes

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher


def _net(cidr: str) -> IPNetwork:
    return ipaddress.ip_network(cidr)


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_DEVICES = {4: names.VXLAN_DEVICE, 6: names.VXLAN_V6_DEVICE}


class CalcGraph:
    def __init__(self, node_name: str, *, remote_routes_from_datastore: bool, ipv6: bool = True) -> None:
        self.node_name = node_name
        self.remote_routes_from_datastore = remote_routes_from_datastore
        self.ipv6 = ipv6  # Felix's Ipv6Support
        self._pools: dict[str, IPPool] = {}  # pool name -> pool (IPv6 ones only with ipv6)
        self._nodes: dict[str, Node] = {}  # node name -> addresses (nodes with an address we route over)
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
        if affinity is not None and not self.ipv6 and ":" in affinity.cidr:
            affinity = None
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
        if node is not None and not self.ipv6 and node.ipv6 is not None:
            node = replace(node, ipv6=None, ipv6_network=None, vxlan_tunnel_ip_v6=None, vxlan_mac_v6=None)
        if node is None or (node.ipv4 is None and node.ipv6 is None):
            self._nodes.pop(update.name, None)
        else:
            self._nodes[update.name] = node
        self.dirty = True

    def on_pool(self, update: Update[IPPool]) -> None:
        pool = update.value
        if pool is None or (not self.ipv6 and _net(pool.cidr).version == 6):
            self._pools.pop(update.name, None)
        else:
            self._pools[update.name] = pool
        self.dirty = True

    # -- outputs ---------------------------------------------------------------------------
    def node_labels(self) -> dict[str, str]:
        return dict(self._node_labels.get(self.node_name, {}))

    def local_endpoints(self) -> list[LocalEndpoint]:
        return [
            LocalEndpoint(key, e.namespace, e.pod, e.iface, e.ips(self.ipv6), e.mac, e.labels)
            for key, e in self._endpoints.items()
            if e.node == self.node_name
        ]

    def routes(self) -> set[Route]:
        routes: set[Route] = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name:
                routes.update(pod_routes(ep.iface, ep.ips(self.ipv6)))
        for cidr, node in self._affinities.items():
            if node == self.node_name:
                routes.add(Route(cidr, type="blackhole"))
            else:
                route = self._remote_route(cidr, node)
                if route is not None:
                    routes.add(route)
        routes.update(self._borrowed_routes())
        return routes

    def _pool_of(self, net: IPNetwork) -> IPPool | None:
        for pool in self._pools.values():
            pool_net = _net(pool.cidr)
            if pool_net.version == net.version and net.subnet_of(pool_net):  # type: ignore[arg-type]
                return pool
        return None

    def _remote_route(self, dst: str, node: str) -> Route | None:
        """The route to `dst` (a block or a /32 or /128) hosted by another node, by its pool's mode,
        through the node's address of dst's family."""
        info = self._nodes.get(node)
        if info is None:
            return None
        net = _net(dst)
        version = net.version
        node_ip = info.address(version)
        if node_ip is None:
            return None  # the node has no address of this family to route over
        pool = self._pool_of(net)
        vxlan_mode = pool.vxlan_mode if pool is not None else "Never"
        ipip_mode = pool.ipip_mode if pool is not None and version == 4 else "Never"
        encap = vxlan_mode != "Never" or ipip_mode != "Never"
        if encap and "CrossSubnet" in (vxlan_mode, ipip_mode) and self._same_subnet(info, version):
            return Route(dst, gateway=node_ip)
        if vxlan_mode != "Never":
            tunnel_ip, mac = info.vtep(version)
            if tunnel_ip is None or mac is None:
                return None  # no VTEP yet: nothing to send it to
            return Route(dst, gateway=tunnel_ip, iface=_DEVICES[version], onlink=True)
        if ipip_mode != "Never":
            return Route(dst, gateway=node_ip, iface=names.IPIP_DEVICE, onlink=True)
        if self.remote_routes_from_datastore:
            return Route(dst, gateway=node_ip)
        return None

    def _same_subnet(self, remote: Node, version: int = 4) -> bool:
        local = self._nodes.get(self.node_name)
        remote_ip = remote.address(version)
        local_net = local.network(version) if local is not None else None
        if local_net is None or remote_ip is None:
            return False
        return ipaddress.ip_address(remote_ip) in _net(local_net)

    def _borrowed_routes(self) -> set[Route]:
        """Remote pods whose address is not in a block affine to their own node."""
        own_blocks: dict[str, list[IPNetwork]] = {}
        for cidr, node in self._affinities.items():
            own_blocks.setdefault(node, []).append(_net(cidr))
        routes = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name or ep.node not in self._nodes:
                continue
            for ip in ep.ips(self.ipv6):
                addr = ipaddress.ip_address(ip)
                if not any(addr in block for block in own_blocks.get(ep.node, [])):
                    route = self._remote_route(f"{ip}/{addr.max_prefixlen}", ep.node)
                    if route is not None:
                        routes.add(route)
        return routes

    def _vteps(self, version: int) -> frozenset[RemoteVtep]:
        out = set()
        for name, info in self._nodes.items():
            tunnel_ip, mac = info.vtep(version)
            node_ip = info.address(version)
            if name != self.node_name and node_ip and tunnel_ip and mac:
                out.add(RemoteVtep(name, node_ip, tunnel_ip, mac))
        return frozenset(out)

    def encap(self) -> EncapState:
        """The tunnel devices this node needs (from the enabled pools of each family) and the
        remote VTEPs."""
        enabled = [p for p in self._pools.values() if not p.disabled]
        v4 = [p for p in enabled if _net(p.cidr).version == 4]
        v6 = [p for p in enabled if _net(p.cidr).version == 6]
        vxlan = any(p.vxlan_mode != "Never" for p in v4)
        vxlan_v6 = any(p.vxlan_mode != "Never" for p in v6)
        ipip = any(p.ipip_mode != "Never" for p in v4)
        local = self._nodes.get(self.node_name)
        return EncapState(
            local_ip=local.ipv4 if local else None,
            vxlan=vxlan,
            vxlan_address=local.vxlan_tunnel_ip if local and vxlan else None,
            vxlan_mac=local.vxlan_mac if local and vxlan else None,
            vteps=self._vteps(4) if vxlan else frozenset(),
            ipip=ipip,
            ipip_address=local.ipip_tunnel_ip if local and ipip else None,
            local_ipv6=local.ipv6 if local else None,
            vxlan_v6=vxlan_v6,
            vxlan_v6_address=local.vxlan_tunnel_ip_v6 if local and vxlan_v6 else None,
            vxlan_v6_mac=local.vxlan_mac_v6 if local and vxlan_v6 else None,
            vteps_v6=self._vteps(6) if vxlan_v6 else frozenset(),
        )

    def bgp_announcements(self) -> frozenset[str]:
        """What this node announces over BGP (backend "bird").

        Its confirmed affine blocks, and a /32 (/128) for each local pod whose address is not
        inside one of them (borrowed from another node's block); never anything from a pool with
        `disableBGPExport`. A /32 inside our own blocks is covered by the block's announcement.
        """
        no_export = [_net(p.cidr) for p in self._pools.values() if p.disable_bgp_export]

        def inside(net: IPNetwork, others: list[IPNetwork]) -> bool:
            return any(net.version == o.version and net.subnet_of(o) for o in others)  # type: ignore[arg-type]

        blocks = [_net(cidr) for cidr, node in self._affinities.items() if node == self.node_name]
        prefixes = {str(b) for b in blocks if not inside(b, no_export)}
        for ep in self._endpoints.values():
            if ep.node != self.node_name:
                continue
            for ip in ep.ips(self.ipv6):
                host = _net(f"{ip}/{128 if ':' in ip else 32}")
                if not inside(host, blocks) and not inside(host, no_export):
                    prefixes.add(str(host))
        return frozenset(prefixes)

    def nat(self) -> NatState:
        return NatState(
            masq_pools=frozenset(p.cidr for p in self._pools.values() if p.nat_outgoing),
            all_pools=frozenset(p.cidr for p in self._pools.values()),
        )
