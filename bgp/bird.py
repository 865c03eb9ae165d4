"""Render BIRD 2 configuration for a felixpy route reflector.

ExaBGP cannot reflect routes (exabgp-notes §6), so a node in route-reflector mode runs BIRD 2 with
this configuration: one `protocol bgp` per peer from `bgp.peers.select_peers` (its clients are the
peers with `rr_client`, marked `rr client; rr cluster id`; other reflectors of the same cluster are
plain iBGP), reflection only — no kernel protocol, so the reflector never programs its own FIB, and
only BGP-learned routes are exported. Timers follow Calico's `bgp_template` (calico-reference §3.6):
`connect delay time 2; connect retry time 5; error wait time 5,30` (the last keeps a reconfigured
peer from being held down for BIRD's default 60 s), graceful restart with the peer's restart time.

Peers on the reflector's own L2 segment are `direct` with `gateway direct` (BIRD makes iBGP
multihop by default and would then try to resolve next hops recursively, with no IGP to do it).
Pass `multihop=True` for reflectors that reach clients through routers.

Apply a new rendering with `birdc configure`: BIRD keeps unchanged sessions up.
BIRD strings have no escapes, so passwords containing `"` or a newline are refused.
Pure text rendering.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from bgp.peers import Peer


def _quoted(value: str, what: str) -> str:
    if '"' in value or "\n" in value or "\\" in value:
        raise ValueError(f"{what} cannot contain a double quote, backslash or newline for BIRD")
    return f'"{value}"'


def _protocol(peer: Peer, *, local_address: str, as_number: int, cluster_id: str | None,
              multihop: bool) -> list[str]:
    ipaddress.ip_address(peer.address)
    neighbor = f"neighbor {peer.address}" + (f" port {peer.port}" if peer.port != 179 else "")
    lines = [
        f"protocol bgp {peer.name} from felixpy_template {{",
        f'  description "{peer.type.value}";',
        f"  local {local_address} as {as_number};",
        f"  {neighbor} as {peer.as_number};",
        "  multihop;" if multihop else "  direct;",
    ]
    if peer.rr_client:
        if cluster_id is None:
            raise ValueError(f"peer {peer.address} is a route-reflector client but no cluster ID is set")
        lines += ["  rr client;", f"  rr cluster id {cluster_id};"]
    if peer.password:
        lines.append(f"  password {_quoted(peer.password, 'BGP password')};")
    if peer.max_restart_time > 0:
        lines += ["  graceful restart on;", f"  graceful restart time {peer.max_restart_time};"]
    else:
        lines.append("  graceful restart off;")
    if peer.passive:
        lines.append("  passive on;")
    # iBGP reflection keeps the client's next hop by default; eBGP needs it asked for.
    next_hop = "next hop keep;" if (peer.keep_original_next_hop or peer.as_number == as_number) else "next hop self;"
    lines += [
        "  ipv4 {",
        "    import all;",
        "    export where source = RTS_BGP;",
        f"    {next_hop}",
        "    gateway recursive;" if multihop else "    gateway direct;",
        "  };",
        "}",
    ]
    return lines


def render_bird_reflector(*, router_id: str, as_number: int, cluster_id: str | None,
                          peers: Sequence[Peer], local_address: str | None = None,
                          log_file: str | None = None, multihop: bool = False) -> str:
    """BIRD 2 configuration text for a reflector (deterministic for the same inputs)."""
    ipaddress.IPv4Address(router_id)
    if cluster_id is not None:
        ipaddress.IPv4Address(cluster_id)
    if not 0 < as_number < 2**32:
        raise ValueError(f"invalid AS number {as_number}")
    local = local_address or router_id
    lines = ["# BIRD 2 route reflector, rendered by felixpy (bgp.bird). Do not edit."]
    if log_file is not None:
        lines.append(f"log {_quoted(log_file, 'log file')} all;")
    else:
        lines.append("log stderr { warning, error, fatal };")
    lines += [
        f"router id {router_id};",
        "",
        "protocol device { scan time 10; }",
    ]
    if multihop:
        # Recursive next-hop resolution needs the connected routes in BIRD's table.
        lines.append("protocol direct { ipv4; }")
    lines += [
        "# No kernel protocol: a reflector never programs its own FIB.",
        "",
        "template bgp felixpy_template {",
        "  connect delay time 2;",
        "  connect retry time 5;",
        "  error wait time 5, 30;",
        "}",
    ]
    for peer in sorted(peers, key=lambda p: int(ipaddress.ip_address(p.address))):
        lines.append("")
        lines += _protocol(peer, local_address=local, as_number=as_number, cluster_id=cluster_id,
                           multihop=multihop)
    return "\n".join(lines) + "\n"
