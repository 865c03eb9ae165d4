"""The calculation graph: datastore updates in, the node's desired dataplane state out.

Synchronous and memoryless: it keeps an index of the resources it cares about, and every output
is a pure function of that index, recomputed when asked (`routes()`, `nat()`,
`local_endpoints()`). No I/O happens here, and nothing is remembered about what the kernel looks
like; that is the dataplane drivers' job.

    KVUpdate ──► parse key ──► pools        ──► nat()
                           ├─► nodes (IPs)  ──┐
                           ├─► affinities   ──┼─► routes()
                           └─► endpoints    ──┴─► local_endpoints()

Routes on node N:
  * a /32 (scope link) to each local pod's veth;
  * a blackhole for each block with a confirmed affinity to N (traffic to unused addresses in our
    own blocks stops here instead of bouncing to the default route);
  * when remote routes come from the datastore (backend "vxlan" with unencapsulated pools: the
    lab's "routes" mode, flannel host-gw style) a route to each block affine to another node via
    that node's IP, and a /32 via the hosting node for every remote pod whose address is borrowed
    from a block that is not affine to its node.

With BGP (backend "bird") routes to other nodes come from the BGP controller instead, and
`bgp_announcements()` says what this node announces: its confirmed blocks and borrowed /32s.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

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
            self._node_labels.pop(name, None)
            return
        self._node_labels[name] = dict(value.get("metadata", {}).get("labels") or {})
        address = (value.get("spec", {}).get("bgp") or {}).get("ipv4Address")
        if address:
            self._node_ips[name] = _addr(address)
        else:
            self._node_ips.pop(name, None)

    def _on_pool(self, name: str, value: Any) -> None:
        if value is None:
            self._pools.pop(name, None)
            return
        spec = value["spec"]
        cidr = str(ipaddress.ip_network(spec["cidr"]))
        if ipaddress.ip_network(cidr).version != 4:
            return
        pool = _Pool(cidr, bool(spec.get("natOutgoing")), bool(spec.get("disabled")),
                     bool(spec.get("disableBGPExport")))
        encap = [f"{field}={spec[field]}" for field in ("ipipMode", "vxlanMode")
                 if spec.get(field, "Never") != "Never"]
        if encap and self._pools.get(name) != pool:
            # Encapsulation (tunl0 / vxlan.calico) is not programmed by this release: say so
            # once per pool change instead of pretending.
            log.warning("pool %s %s: encapsulation is not supported yet; its blocks are routed "
                        "unencapsulated via node IPs", name, " ".join(encap))
        self._pools[name] = pool

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
            elif self.remote_routes_from_datastore and node in self._node_ips:
                routes.add(RouteSpec(cidr, gateway=self._node_ips[node]))
        if self.remote_routes_from_datastore:
            routes.update(self._borrowed_routes())
        return routes

    def _borrowed_routes(self) -> set[RouteSpec]:
        """Remote pods whose address is not in a block affine to their own node."""
        own_blocks: dict[str, list[ipaddress.IPv4Network]] = {}
        for cidr, node in self._affinities.items():
            own_blocks.setdefault(node, []).append(ipaddress.IPv4Network(cidr))
        routes = set()
        for ep in self._endpoints.values():
            if ep.node == self.node_name or ep.node not in self._node_ips:
                continue
            for ip in ep.ips:
                addr = ipaddress.IPv4Address(ip)
                if not any(addr in block for block in own_blocks.get(ep.node, [])):
                    routes.add(RouteSpec(f"{ip}/32", gateway=self._node_ips[ep.node]))
        return routes

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
