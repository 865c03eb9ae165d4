"""Render BIRD 2 configuration for a felixpy route reflector.

ExaBGP cannot reflect routes (exabgp-notes §6), so a reflector runs BIRD 2 with this
configuration: one `protocol bgp` per peer from `bgp.peers.select_peers` (its clients are the
peers with `rr_client`, marked `rr client; rr cluster id`; other reflectors of the same cluster
are plain iBGP, as in Calico: BIRD 2 takes the cluster ID it writes on a reflected route from the
client side of the reflection, so routes between a client and another reflector carry the
cluster's ID either way — an `rr cluster id` on a non-client session is parsed and unused),
reflection only — no kernel
protocol, so BIRD never programs the FIB (except BGPPeer `reachableBy` routes on a dedicated
reflector). Timers follow Calico's `bgp_template`
(calico-reference §3.6): `connect delay time 2; connect retry time 5; error wait time 5,30` (the
last keeps a reconfigured peer from being held down for BIRD's default 60 s), graceful restart
with the peer's restart time.

Peers on the reflector's own L2 segment are `direct` with `gateway direct` (BIRD makes iBGP
multihop by default and would then try to resolve next hops recursively, with no IGP to do it).
Pass `multihop=True` for reflectors that reach clients through routers.

The BGPPeer and BGPConfiguration fields render as confd renders them: `localASNumber` (`local
as`), `keepaliveTime` (`keepalive time`), `ttlSecurity` (`ttl security on; multihop N`),
`numAllowedLocalASNumbers` (`allow local as N`), `nextHopMode` (`next hop self|keep`), BGPFilters
(one function per filter and direction, bgp.filters, called in the BGPPeer's order ahead of the
default), prefixAdvertisement communities (added to everything reflected that no filter
decided), `listenPort` (`local … port P`) and `bindMode NodeIP` (`strict bind`: BIRD 2 binds the
listening socket to the sessions' local address; without it to every address, Calico's None).

A reflector that is also a node running pods (`local_agent`) has one more session: its own agent's
ExaBGP, over loopback (`Local_Agent`, an rr client: the agent announces the node's own routes into
BIRD and learns everything BIRD reflects), and with an IPv6 address a second one for IPv6
(`Local_Agent6`, from `::1`). Its next hops are resolved through `protocol direct`.

What is exported is Calico's choice (confd's `calico_export_to_bgp_peers`), after the BGPFilters:
routes inside an IP pool that exports to BGP, and on a reflector the routes inside the
serviceLoadBalancerIPs and serviceExternalIPs ranges; a reflector node's own routes (from its
agent) always. Routes from elsewhere (a ToR's default route, say) are not passed on. The session
to the node's own agent stands in for BIRD's kernel protocol in calico-node: it gets everything
BIRD learned, as the kernel would.

Apply a new rendering with `birdc configure`: BIRD keeps unchanged sessions up.
BIRD strings have no escapes, so passwords containing `"` or a newline are refused.
Pure text rendering.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from typing import Sequence

from bgp.advertise import CommunityRule
from bgp.filters import BGPFilter, bird_calls, render_bird_functions
from bgp.peers import Peer, PeerType

LOCAL_AGENT_NAME = "Local_Agent"
# BIRD's log levels per BGPConfiguration logSeverityScreen, as confd maps them (debug/info; the rest
# only errors): `debug` statements of the BGP protocols.
_DEBUG = {"Debug": "all", "Trace": "all", "Info": "{ states }"}


@dataclass(frozen=True)
class LocalAgent:
    """The node's own ExaBGP, seen from its BIRD: where it connects from and listens."""

    address: str  # a loopback address the agent's ExaBGP binds, e.g. 127.0.0.2
    port: int  # where that ExaBGP listens, so BIRD can connect too (it holds the BGP port itself)
    address6: str | None = None  # its IPv6 loopback address (::1), for the IPv6 session


def local_agent_name(version: int) -> str:
    """The BIRD protocol of the agent's session of that family (Local_Agent, Local_Agent6)."""
    return LOCAL_AGENT_NAME if version == 4 else f"{LOCAL_AGENT_NAME}6"


def hashed_router_id(name: str, *, avoid: str = "") -> str:
    """A stable IPv4 router ID from a name (Calico's CALICO_ROUTER_ID=hash idea), never `avoid`."""
    digest = hashlib.sha256(name.encode()).digest()
    for i in range(0, len(digest) - 3):
        candidate = str(ipaddress.IPv4Address(digest[i:i + 4]))
        if candidate not in (avoid, "0.0.0.0", "255.255.255.255"):
            return candidate
    raise ValueError(f"no router ID for {name!r}")  # pragma: no cover - 29 candidates


def _quoted(value: str, what: str) -> str:
    if '"' in value or "\n" in value or "\\" in value:
        raise ValueError(f"{what} cannot contain a double quote, backslash or newline for BIRD")
    return f'"{value}"'


def _next_hop(peer: Peer, node_as: int) -> str:
    if peer.next_hop_mode == "Self":
        return "next hop self;"
    if peer.next_hop_mode == "Keep":
        return "next hop keep;"
    # Auto: reflection keeps the client's next hop on iBGP; eBGP only keeps it when asked to
    # (keepOriginalNextHop, which confd honours for eBGP peers only).
    ebgp = peer.is_ebgp(node_as)
    return "next hop keep;" if (not ebgp or peer.keep_original_next_hop) else "next hop self;"


def _protocol(peer: Peer, *, local_address: str | None, as_number: int, cluster_id: str | None,
              multihop: bool, filter_order: Sequence[str], communities: bool, listen_port: int,
              calico_export: bool) -> list[str]:
    ipaddress.ip_address(peer.address)
    neighbor = f"neighbor {peer.address}" + (f" port {peer.port}" if peer.port != 179 else "")
    local_as = peer.local_as_for(as_number)
    ebgp = peer.is_ebgp(as_number)
    local = peer.type is PeerType.LOCAL
    lines = [
        f"protocol bgp {peer.name} from felixpy_template {{",
        f'  description "{peer.type.value}";',
        # sourceAddress None: no address, the kernel picks the source (confd's `local as N`).
        f"  local{f' {local_address}' if local_address else ''}"
        f"{f' port {listen_port}' if listen_port != 179 else ''} as {local_as};",
        f"  {neighbor} as {peer.as_number};",
    ]
    hops = multihop or local or bool(peer.ttl_security)
    if peer.ttl_security:
        lines += ["  ttl security on;", f"  multihop {peer.ttl_security};"]
    else:
        lines.append("  multihop;" if hops else "  direct;")
    if peer.rr_client and local:
        # The node's own agent is a client with this BIRD's own cluster ID (its router ID, BIRD's
        # default), not the cluster's: BIRD never reflects a route to a client of a cluster that
        # is already on the route's CLUSTER_LIST, and what another reflector of the same cluster
        # passes on must still reach this node's kernel (calico-node's BIRD programs it directly).
        lines.append("  rr client;")
    elif peer.rr_client:
        if cluster_id is None:
            raise ValueError(f"peer {peer.address} is a route-reflector client but no cluster ID is set")
        lines += ["  rr client;", f"  rr cluster id {cluster_id};"]
    if peer.password:
        lines.append(f"  password {_quoted(peer.password, 'BGP password')};")
    if peer.keepalive_time:
        lines.append(f"  keepalive time {peer.keepalive_time};")
    if peer.num_allowed_local_as:
        lines.append(f"  allow local as {peer.num_allowed_local_as};")
    if peer.max_restart_time > 0:
        lines += ["  graceful restart on;", f"  graceful restart time {peer.max_restart_time};"]
    else:
        lines.append("  graceful restart off;")
    if peer.passive:
        lines.append("  passive on;")
    if local:
        # The node's own agent: reconnect at once after its ExaBGP restarts.
        lines += ["  connect delay time 1;", "  connect retry time 1;", "  error wait time 1, 2;"]
    # An IPv6 session runs the filters' V6 functions (confd renders those into bird6).
    import_calls = bird_calls(peer.filters, filter_order, "import", ebgp=ebgp, version=peer.version)
    export_calls = bird_calls(peer.filters, filter_order, "export", ebgp=ebgp, version=peer.version)
    tag = "felixpy_communities(); " if communities else ""
    if local or not calico_export:
        default_export = "if source = RTS_BGP then accept;"
    else:
        default_export = (f'if proto = "{local_agent_name(peer.version)}" then {{ {tag}accept; }} '
                          f"if source = RTS_BGP && felixpy_calico_route() then {{ {tag}accept; }}")
    lines += [
        f"  ipv{peer.version} {{",
        # The node's own routes win over copies of the same prefix from other nodes (a Service
        # range every node announces), as calico-node's static routes (preference 200) do over BGP.
        *(["    preference 200;"] if local else []),
        "    import " + ("all;" if not import_calls else "filter { " + " ".join(import_calls) + " accept; };"),
        "    export filter { " + " ".join(export_calls + [default_export, "reject;"]) + " };",
        f"    {_next_hop(peer, as_number)}",
        "    gateway recursive;" if hops else "    gateway direct;",
        "  };",
        "}",
    ]
    return lines


def _communities_function(rules: Sequence[CommunityRule]) -> list[str]:
    lines = ["# prefixAdvertisements: communities on what is exported and no BGPFilter decided",
             "function felixpy_communities() {"]
    for rule in rules:
        adds = [f"bgp_community.add(({c.replace(':', ', ')}));" for c in rule.communities]
        adds += [f"bgp_large_community.add(({c.replace(':', ', ')}));" for c in rule.large_communities]
        if adds:
            # A net is only ever compared with a prefix of its own type (BIRD refuses mixing).
            lines.append(f"  if {_net_type(rule.cidr)} then {{ if net ~ {rule.cidr} then {{ {' '.join(adds)} }} }}")
    lines.append("}")
    return lines


def _net_type(cidr: str) -> str:
    return f"net.type = NET_IP{ipaddress.ip_network(cidr).version}"


def _calico_route_function(pools: Sequence[str], quiet_pools: Sequence[str], service_cidrs: Sequence[str]) -> list[str]:
    lines = ["# Calico's routes: what confd's calico_export_to_bgp_peers (bird6: its IPv6 twin) lets out",
             "function felixpy_calico_route() {"]
    for version in (4, 6):
        body = []
        for cidrs, verdict in ((quiet_pools, "false"), (pools, "true"), (service_cidrs, "true")):
            family = [c for c in cidrs if ipaddress.ip_network(c).version == version]
            if family:
                body.append(f"if net ~ [ {', '.join(f'{c}+' for c in family)} ] then return {verdict};")
        if body:
            # Prefix sets are typed: each family's sets are only matched against its own nets.
            lines.append(f"  if net.type = NET_IP{version} then {{ {' '.join(body)} }}")
    lines += ["  return false;", "}"]
    return lines


def render_bird_reflector(*, router_id: str, as_number: int, cluster_id: str | None,
                          peers: Sequence[Peer],
                          log_file: str | None = None, multihop: bool = False,
                          listen_address: str | None = None, listen_port: int = 179,
                          filters: Sequence[BGPFilter] = (), communities: Sequence[CommunityRule] = (),
                          log_severity: str = "Info", export_pools: Sequence[str] | None = None,
                          no_export_pools: Sequence[str] = (), service_cidrs: Sequence[str] = (),
                          ignored_interfaces: Sequence[str] = ()) -> str:
    """BIRD 2 configuration text for a reflector (deterministic for the same inputs).

    `export_pools`: the IP pools whose routes are exported (None: every BGP route, no Calico
    export filter); `no_export_pools` the disableBGPExport ones; `service_cidrs` the Service
    ranges a reflector passes on (serviceLoadBalancerIPs and serviceExternalIPs)."""
    ipaddress.IPv4Address(router_id)
    if cluster_id is not None:
        ipaddress.IPv4Address(cluster_id)
    if not 0 < as_number < 2**32:
        raise ValueError(f"invalid AS number {as_number}")
    if not 0 < listen_port < 65536:
        raise ValueError(f"invalid listen port {listen_port}")
    has_local_agent = any(p.type is PeerType.LOCAL for p in peers)
    lines = ["# BIRD 2 route reflector, rendered by felixpy (bgp.bird). Do not edit."]
    if log_file is not None:
        lines.append(f"log {_quoted(log_file, 'log file')} all;")
    else:
        lines.append("log stderr { warning, error, fatal };")
    lines.append(f"router id {router_id};")
    lines += ["", "protocol device { scan time 10; }"]
    if multihop or has_local_agent:
        # Recursive next-hop resolution needs the connected routes in BIRD's table; like confd's
        # direct template, never the pods' veths, kube-proxy's dummy, nor ignoredInterfaces.
        patterns = [f"-{_quoted(i, 'interface name')}" for i in ignored_interfaces]
        patterns += ['-"cali*"', '-"kube-ipvs*"', '"*"']
        channels = "ipv4; ipv6;" if any(p.version == 6 for p in peers) else "ipv4;"
        lines.append(f"protocol direct {{ {channels} interface {', '.join(patterns)}; }}")
    if any(p.reachable_by and p.version == 6 for p in peers):
        raise ValueError("BGPPeer reachableBy for an IPv6 peer is not supported on a route reflector")
    reachable = sorted({(p.address, p.reachable_by) for p in peers if p.reachable_by})
    if reachable and not has_local_agent:
        # BGPPeer reachableBy: a /32 to the peer via that gateway, as confd renders it. A
        # dedicated reflector's BIRD programs it (its only kernel export); on a node with pods
        # the agent programs it with the node's other routes.
        lines += ["protocol static felixpy_reachable_by {", "  ipv4;",
                  *(f"  route {address}/32 via {gateway};" for address, gateway in reachable), "}",
                  "protocol kernel felixpy_kernel {",
                  '  ipv4 { import none; export where proto = "felixpy_reachable_by"; };', "}"]
    else:
        lines.append("# No kernel protocol: a reflector never programs its own FIB.")
    filter_order = [f.name for f in filters]
    lines += ["", *render_bird_functions(filters)] if filters else []
    lines += ["", *_communities_function(communities)] if communities else []
    calico_export = export_pools is not None
    if calico_export:
        assert export_pools is not None
        lines += ["", *_calico_route_function(export_pools, no_export_pools,
                                              service_cidrs if cluster_id is not None else ())]
    debug = _DEBUG.get(log_severity)
    lines += [
        "",
        "template bgp felixpy_template {",
        *([f"  debug {debug};"] if debug else []),
        # bindMode NodeIP: listen on the node's address only (BIRD binds every session's
        # `local` address; without it, every address).
        *(["  strict bind yes;"] if listen_address is not None else []),
        "  connect delay time 2;",
        "  connect retry time 5;",
        "  error wait time 5, 30;",
        "}",
    ]
    for peer in sorted(peers, key=lambda p: (ipaddress.ip_address(p.address).version, int(ipaddress.ip_address(p.address)))):
        lines.append("")
        # bindMode NodeIP names the node's IPv4 address; an IPv6 session binds the node's IPv6.
        same_family = listen_address is not None and ipaddress.ip_address(listen_address).version == peer.version
        lines += _protocol(peer, local_address=listen_address if same_family else peer.source_address,
                           as_number=as_number, cluster_id=cluster_id, multihop=multihop,
                           filter_order=filter_order, communities=bool(communities), listen_port=listen_port,
                           calico_export=calico_export)
    return "\n".join(lines) + "\n"
