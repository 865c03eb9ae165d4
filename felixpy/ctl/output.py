"""felixctl's output formats: calicoctl-like tables (ps, wide), YAML and JSON.

Tables are columns separated by at least three spaces, like calicoctl's tabwriter. YAML/JSON print
a single resource as itself and several as a `<Kind>List`, as calicoctl does.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import yaml

from felixpy.model.resources import API_VERSION

FORMATS = ("ps", "wide", "yaml", "json")
DEFAULT_AS_NUMBER = 64512

Row = list[str]
Column = tuple[str, Callable[[Mapping[str, Any]], str]]


def _spec(res: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = res.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _meta(res: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = res.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _field(*path: str) -> Callable[[Mapping[str, Any]], str]:
    def get(res: Mapping[str, Any]) -> str:
        value: Any = _spec(res)
        for part in path:
            value = value.get(part) if isinstance(value, Mapping) else None
        return _text(value)

    return get


def _name(res: Mapping[str, Any]) -> str:
    return _text(_meta(res).get("name"))


def _namespace(res: Mapping[str, Any]) -> str:
    return _text(_meta(res).get("namespace"))


def _networks(res: Mapping[str, Any]) -> str:
    nets = _spec(res).get("ipNetworks") or []
    return ",".join(str(n) for n in nets)


def _columns(kind: str, wide: bool, default_as: int) -> list[Column]:
    def node_asn(res: Mapping[str, Any]) -> str:
        own = _spec(res).get("bgp", {}).get("asNumber") if isinstance(_spec(res).get("bgp"), Mapping) else None
        # Like calicoctl: an inherited (global) AS number is shown in parentheses.
        return _text(own) if own is not None else f"({default_as})"

    if kind == "IPPool":
        if wide:
            return [("NAME", _name), ("CIDR", _field("cidr")), ("NAT", _field("natOutgoing")),
                    ("IPIPMODE", _field("ipipMode")), ("VXLANMODE", _field("vxlanMode")),
                    ("DISABLED", _field("disabled")), ("DISABLEBGPEXPORT", _field("disableBGPExport")),
                    ("SELECTOR", _field("nodeSelector")), ("ASSIGNMENTMODE", _field("assignmentMode"))]
        return [("NAME", _name), ("CIDR", _field("cidr")), ("SELECTOR", _field("nodeSelector"))]
    if kind == "Node":
        if wide:
            return [("NAME", _name), ("ASN", node_asn), ("IPV4", _field("bgp", "ipv4Address")),
                    ("IPV6", _field("bgp", "ipv6Address"))]
        return [("NAME", _name)]
    if kind == "WorkloadEndpoint":
        # A Kubernetes pod's endpoint has no spec.workload: calicoctl shows the pod there instead.
        cols = [("NAMESPACE", _namespace), ("WORKLOAD", lambda res: _field("workload")(res) or _field("pod")(res)),
                ("NODE", _field("node")),
                ("NETWORKS", _networks), ("INTERFACE", _field("interfaceName"))]
        if wide:
            cols += [("NAME", _name), ("PROFILES", lambda res: ",".join(_spec(res).get("profiles") or []))]
        return cols
    if kind == "BGPPeer":
        cols = [("NAME", _name), ("PEERIP", _field("peerIP")), ("NODE", _field("node")),
                ("ASN", _field("asNumber"))]
        if wide:
            cols += [("NODESELECTOR", _field("nodeSelector")), ("PEERSELECTOR", _field("peerSelector"))]
        return cols
    if kind in ("NetworkPolicy", "GlobalNetworkPolicy"):
        cols = ([("NAMESPACE", _namespace)] if kind == "NetworkPolicy" else []) + [("NAME", _name)]
        if wide:
            cols += [("ORDER", _field("order")), ("SELECTOR", _field("selector"))]
        return cols
    if kind == "Tier":
        cols = [("NAME", _name), ("ORDER", _field("order"))]
        return cols + ([("DEFAULTACTION", _field("defaultAction"))] if wide else [])
    if kind == "HostEndpoint":
        cols = [("NAME", _name), ("NODE", _field("node"))]
        if wide:
            cols += [("INTERFACE", _field("interfaceName")),
                     ("IPS", lambda res: ",".join(_spec(res).get("expectedIPs") or [])),
                     ("PROFILES", lambda res: ",".join(_spec(res).get("profiles") or []))]
        return cols
    if kind in ("NetworkSet", "GlobalNetworkSet"):
        cols = ([("NAMESPACE", _namespace)] if kind == "NetworkSet" else []) + [("NAME", _name)]
        return cols + ([("NETS", lambda res: ",".join(_spec(res).get("nets") or []))] if wide else [])
    if kind == "BGPConfiguration" and wide:
        return [("NAME", _name), ("LOGSEVERITY", _field("logSeverityScreen")),
                ("MESHENABLED", _field("nodeToNodeMeshEnabled")), ("ASNUMBER", _field("asNumber"))]
    if kind == "IPReservation" and wide:
        return [("NAME", _name), ("CIDRS", lambda res: ",".join(_spec(res).get("reservedCIDRs") or [])[:80])]
    if kind == "IPAMConfiguration" and wide:
        return [("NAME", _name), ("STRICTAFFINITY", _field("strictAffinity")),
                ("AUTOALLOCATEBLOCKS", _field("autoAllocateBlocks")),
                ("MAXBLOCKSPERHOST", _field("maxBlocksPerHost"))]
    return [("NAME", _name)]


def table(kind: str, items: Sequence[Mapping[str, Any]], wide: bool = False,
          default_as: int = DEFAULT_AS_NUMBER) -> str:
    """The ps/wide table for resources of one kind (header row even when empty)."""
    cols = _columns(kind, wide, default_as)
    rows: list[Row] = [[title for title, _ in cols]]
    rows += [[get(res) for _, get in cols] for res in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["   ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) + "\n"


def as_list(kind: str, items: Sequence[Mapping[str, Any]], revision: int) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": f"{kind}List",
        "metadata": {"resourceVersion": str(revision)},
        "items": [dict(i) for i in items],
    }


def dump(obj: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(obj, indent=2) + "\n"
    return str(yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))


def render(kind: str, items: Sequence[Mapping[str, Any]], fmt: str, *, single: bool,
           revision: int, default_as: int = DEFAULT_AS_NUMBER) -> str:
    """Format `get` output; `single` prints the one resource itself instead of a List."""
    if fmt in ("ps", "wide"):
        return table(kind, items, wide=fmt == "wide", default_as=default_as)
    if single and len(items) == 1:
        return dump(dict(items[0]), fmt)
    return dump(as_list(kind, items, revision), fmt)
