"""A read-only view of the node's main routing tables (IPv4 and IPv6), every protocol, for status reports.

CalicoNodeStatus lists a node's routes the way BIRD sees them (its kernel, static, direct and BGP
routes); the route driver only ever reads back the routes it owns, so this is a separate, plain
dump. Read-only: nothing here changes the kernel.
"""

from __future__ import annotations

from typing import Any

from felixpy import names
from felixpy.kernel.netlink import MAIN_TABLE, SCOPE_LINK, _from_message, _table_of, attempt


def main_table_routes() -> list[dict[str, Any]]:
    """Every IPv4 and IPv6 route of the main table: dst, gateway, interface name, type, scope, ours."""
    from pyroute2 import IPRoute

    with IPRoute(groups=0) as ipr:
        with attempt("route dump", f"table {MAIN_TABLE}"):
            msgs = [m for family in (2, 10) for m in ipr.route("dump", family=family)
                    if _table_of(m) == MAIN_TABLE]
        with attempt("link dump", "all"):
            links = {int(link["index"]): str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links()}
    routes = []
    for msg in msgs:
        route = _from_message(msg)
        routes.append({
            "dst": route.dst,
            "gateway": route.gateway,
            "interface": links.get(route.ifindex) if route.ifindex is not None else None,
            "type": route.type,
            "scope": "link" if route.scope == SCOPE_LINK else "global",
            "ours": route.proto == names.ROUTE_PROTO,
        })
    return sorted(routes, key=lambda r: str(r["dst"]))
