"""projectcalico.org/v3 resources: the kind table, validation with defaults, and storage keys.

`validate(obj)` turns whatever a user wrote (YAML/JSON decoded to dicts) into the normalised
resource the rest of felixpy reads: `apiVersion` and `kind` set, metadata trimmed to the fields
we keep, spec defaults filled (an IPPool always has `blockSize`, `ipipMode`, ... so readers never
guess). Anything wrong raises ValidationError with one line naming the resource and the field:

    IPPool "p1": spec.cidr: invalid CIDR "10.0.0.0/33"

Only structure is validated here; meaning (which endpoints a policy selects, which pools a node
may use) is the calculation graph's business.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from felixpy.datastore import keys
from felixpy.model import coverage
from felixpy.model import schema as s
from felixpy.model.schema import FieldError, q
from policy.calico import default_types
from policy.model import DEFAULT_TIER_ORDER

log = logging.getLogger(__name__)

API_VERSION = "projectcalico.org/v3"
DEFAULT_NAMESPACE = "default"


class ValidationError(ValueError):
    """A resource failed validation; str() is one line naming the resource and the field."""


@dataclass(frozen=True, slots=True)
class Kind:
    kind: str
    plural: str  # lower-case plural used in etcd keys
    namespaced: bool
    aliases: tuple[str, ...]  # calicoctl's names for the kind on the command line


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("IPPool", "ippools", False, ("ippool", "ippools", "ipp", "ipps", "pool", "pools")),
        Kind(
            "IPReservation",
            "ipreservations",
            False,
            ("ipreservation", "ipreservations", "reservation", "reservations"),
        ),
        Kind(
            "IPAMConfiguration",
            "ipamconfigurations",
            False,
            ("ipamconfiguration", "ipamconfigurations", "ipamconfig", "ipamconfigs"),
        ),
        Kind("Node", "nodes", False, ("node", "nodes", "no", "nos")),
        Kind(
            "BGPConfiguration",
            "bgpconfigurations",
            False,
            ("bgpconfiguration", "bgpconfigurations", "bgpconfig", "bgpconfigs"),
        ),
        Kind("BGPPeer", "bgppeers", False, ("bgppeer", "bgppeers", "bgpp", "bgpps", "bp", "bps")),
        Kind("BGPFilter", "bgpfilters", False, ("bgpfilter", "bgpfilters")),
        Kind(
            "CalicoNodeStatus",
            "caliconodestatuses",
            False,
            ("caliconodestatus", "caliconodestatuses", "cns", "cnss"),
        ),
        Kind(
            "FelixConfiguration",
            "felixconfigurations",
            False,
            ("felixconfiguration", "felixconfigurations", "felixconfig", "felixconfigs"),
        ),
        Kind(
            "WorkloadEndpoint",
            "workloadendpoints",
            True,
            ("workloadendpoint", "workloadendpoints", "wep", "weps"),
        ),
        Kind("Profile", "profiles", False, ("profile", "profiles", "pro", "pros")),
        Kind(
            "NetworkPolicy",
            "networkpolicies",
            True,
            ("networkpolicy", "networkpolicies", "np", "nps", "policy", "policies", "pol", "pols"),
        ),
        Kind(
            "GlobalNetworkPolicy",
            "globalnetworkpolicies",
            False,
            ("globalnetworkpolicy", "globalnetworkpolicies", "gnp", "gnps"),
        ),
        Kind(
            "ClusterInformation",
            "clusterinformations",
            False,
            ("clusterinformation", "clusterinformations", "clusterinfo", "clusterinfos"),
        ),
        Kind("Tier", "tiers", False, ("tier", "tiers")),
        Kind("NetworkSet", "networksets", True, ("networkset", "networksets", "netset", "netsets")),
        Kind(
            "GlobalNetworkSet",
            "globalnetworksets",
            False,
            ("globalnetworkset", "globalnetworksets", "gnetset", "gnetsets"),
        ),
        Kind("HostEndpoint", "hostendpoints", False, ("hostendpoint", "hostendpoints", "hep", "heps")),
    )
}

_BY_ALIAS: dict[str, Kind] = {}
for _k in KINDS.values():
    _BY_ALIAS[_k.kind.lower()] = _k
    for _alias in _k.aliases:
        _BY_ALIAS[_alias] = _k


def lookup_kind(name: str) -> Kind:
    """Resolve a kind name or calicoctl alias (case-insensitive); raises ValueError."""
    kind = _BY_ALIAS.get(name.lower().split(".projectcalico.org")[0])
    if kind is None:
        raise ValueError(f"resource type {q(name)} is not supported")
    return kind


def storage_key(kind: str, name: str, namespace: str | None = None) -> str:
    """Where a resource lives in the datastore (IPAMConfiguration: Calico's IPAM config key)."""
    if kind == "IPAMConfiguration":
        return keys.IPAM_CONFIG
    info = KINDS[kind]
    return keys.resource_key(info.plural, name, (namespace or DEFAULT_NAMESPACE) if info.namespaced else None)


# -- shared pieces -----------------------------------------------------------------------------------

_MODES = ("Always", "CrossSubnet", "Never")
_ACTIONS = ("Allow", "Deny", "Log", "Pass")
_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "icmp": "ICMP", "icmpv6": "ICMPv6", "sctp": "SCTP", "udplite": "UDPLite"}
_PORT_PROTOCOLS = ("TCP", "UDP", "SCTP", "UDPLite", 6, 17, 132, 136)


def _protocol(value: Any, path: str) -> str | int:
    if isinstance(value, bool):
        raise FieldError(path, f"invalid protocol {q(value)}")
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        number = int(value)
        if not 1 <= number <= 255:
            raise FieldError(path, f"protocol number {number} is out of range 1..255")
        return number
    if isinstance(value, str) and value.lower() in _PROTOCOLS:
        return _PROTOCOLS[value.lower()]
    raise FieldError(path, f"invalid protocol {q(value)} (TCP, UDP, ICMP, ICMPv6, SCTP, UDPLite or 1..255)")


def _icmp_post(icmp: dict[str, Any], path: str) -> None:
    if "code" in icmp and "type" not in icmp:
        raise FieldError(s.join(path, "code"), "an ICMP code needs an ICMP type")


_ICMP = s.obj({"type": s.integer(0, 254), "code": s.integer(0, 255)}, post=_icmp_post, name="ICMPFields")

_SERVICE_ACCOUNT_MATCH = s.obj({"names": s.list_of(s.string()), "selector": s.selector})

_ENTITY_RULE = s.obj(
    {
        "nets": s.list_of(s.cidr(strict=False, allow_ip=True)),
        "notNets": s.list_of(s.cidr(strict=False, allow_ip=True)),
        "selector": s.selector,
        "notSelector": s.selector,
        "namespaceSelector": s.selector,
        "ports": s.list_of(s.port),
        "notPorts": s.list_of(s.port),
        "serviceAccounts": _SERVICE_ACCOUNT_MATCH,
        "services": s.obj({"name": s.string(), "namespace": s.string()}),
    },
    name="EntityRule",
)


def _ip_version(value: Any, path: str) -> int:
    if value not in (4, 6) or isinstance(value, bool):
        raise FieldError(path, "must be 4 or 6")
    return int(value)


def _rule_post(rule: dict[str, Any], path: str) -> None:
    protocol = rule.get("protocol")
    for side in ("source", "destination"):
        for field in ("ports", "notPorts"):
            if rule.get(side, {}).get(field) and protocol not in _PORT_PROTOCOLS:
                raise FieldError(
                    s.join(path, f"{side}.{field}"),
                    "ports are only valid with protocol TCP, UDP, SCTP or UDPLite",
                )
    for field in ("icmp", "notICMP"):
        if field in rule and protocol not in ("ICMP", "ICMPv6", 1, 58):
            raise FieldError(s.join(path, field), "only valid with protocol ICMP or ICMPv6")


_RULE = s.obj(
    {
        "action": s.string(enum=_ACTIONS),
        "protocol": _protocol,
        "notProtocol": _protocol,
        "ipVersion": _ip_version,
        "icmp": _ICMP,
        "notICMP": _ICMP,
        "source": _ENTITY_RULE,
        "destination": _ENTITY_RULE,
        "metadata": s.obj({"annotations": s.string_map()}),
    },
    required=("action",),
    post=_rule_post,
    name="Rule",
)


_rules = s.list_of(_RULE)


def _policy_post(spec: dict[str, Any], path: str) -> None:
    spec["tier"] = spec.get("tier") or "default"
    if "types" not in spec:
        # Calico's default: Ingress, Egress when there are egress rules only, both when both.
        spec["types"] = default_types(spec)
    if len(set(spec["types"])) != len(spec["types"]):
        raise FieldError(s.join(path, "types"), "contains duplicates")
    if spec.get("doNotTrack") and spec.get("preDNAT"):
        raise FieldError(path, "doNotTrack and preDNAT cannot both be true")
    if (spec.get("doNotTrack") or spec.get("preDNAT")) and not spec.get("applyOnForward"):
        raise FieldError(s.join(path, "applyOnForward"), "must be true when doNotTrack or preDNAT is set")
    if spec.get("preDNAT") and spec.get("egress"):
        raise FieldError(s.join(path, "egress"), "preDNAT policies cannot have egress rules")


def _tier_name(value: Any, path: str) -> str:
    """Tier names are DNS labels: no dots, since they appear inside other names (Calico)."""
    if not isinstance(value, str) or len(value) > 63 or not s.DNS1123_LABEL.fullmatch(value):
        raise FieldError(path, f"invalid tier name {q(value)}: must be a DNS-1123 label (lower-case letters, "
                         "digits and '-', starting and ending with a letter or digit, at most 63)")
    return value


_POLICY_FIELDS: dict[str, s.Checker] = {
    "tier": _tier_name,
    "order": s.number,
    "selector": s.selector,
    "serviceAccountSelector": s.selector,
    "types": s.list_of(s.string(enum=("Ingress", "Egress"))),
    "ingress": _rules,
    "egress": _rules,
    "performanceHints": s.list_of(s.string(enum=("AssumeNeededOnEveryNode",))),
}

_NETWORK_POLICY = s.obj(_POLICY_FIELDS, defaults={"selector": "all()"}, post=_policy_post)
_GLOBAL_NETWORK_POLICY = s.obj(
    {
        **_POLICY_FIELDS,
        "namespaceSelector": s.selector,
        "doNotTrack": s.boolean,
        "preDNAT": s.boolean,
        "applyOnForward": s.boolean,
    },
    defaults={"selector": "all()"},
    post=_policy_post,
)


# -- Tier, NetworkSet, GlobalNetworkSet, HostEndpoint --------------------------------------------------

# Calico's well-known tiers and the order and default action its API insists on (CEL rules of
# the Tier type); "default" always exists, the other two come with AdminNetworkPolicy.
WELL_KNOWN_TIERS: dict[str, tuple[float, str]] = {
    "default": (DEFAULT_TIER_ORDER, "Deny"),
    "kube-admin": (1_000.0, "Pass"),
    "kube-baseline": (10_000_000.0, "Pass"),
}

_TIER = s.obj(
    {"order": s.number, "defaultAction": s.string(enum=("Deny", "Pass"))},
    # A Tier without order sorts with the default tier (libcalico-go's DefaultTierFields).
    defaults={"order": DEFAULT_TIER_ORDER, "defaultAction": "Deny"},
)

_NETWORK_SET = s.obj({"nets": s.list_of(s.cidr(strict=False, allow_ip=True))})


def _interface_name(value: Any, path: str) -> str:
    if value == "*" or (isinstance(value, str) and _IFACE_NAME.fullmatch(value)):
        return str(value)
    raise FieldError(path, f"invalid interface name {q(value)} (an interface name of at most 15 characters, "
                     "or \"*\" for all interfaces)")


_IFACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}")


def _host_endpoint_post(spec: dict[str, Any], path: str) -> None:
    if not spec.get("interfaceName"):
        if spec.get("expectedIPs"):
            # Calico can find the interface by its addresses; felixpy does not watch the host's
            # interfaces yet, and guessing would police the wrong one (or none).
            raise FieldError(s.join(path, "interfaceName"), "required by felixpy: finding the interface by "
                             "spec.expectedIPs alone is not supported yet")
        raise FieldError(path, "at least one of interfaceName or expectedIPs must be specified")
    names = [p.get("name") for p in spec.get("ports") or ()]
    if len(set(names)) != len(names):
        raise FieldError(s.join(path, "ports"), "port names must be unique")


def _endpoint_port_post(port: dict[str, Any], path: str) -> None:
    if port["protocol"] not in _PORT_PROTOCOLS:
        raise FieldError(s.join(path, "protocol"), "must be TCP, UDP, SCTP or UDPLite (a protocol with ports)")


_HOST_ENDPOINT = s.obj(
    {
        "node": s.subdomain_name,
        "interfaceName": _interface_name,
        "expectedIPs": s.list_of(s.ip_address()),
        "profiles": s.list_of(s.subdomain_name),
        "ports": s.list_of(s.obj(
            {"name": s.string(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", what="port name"), "protocol": _protocol,
             "port": s.integer(1, 65535)},
            required=("name", "protocol", "port"), post=_endpoint_port_post)),
    },
    required=("node",),
    post=_host_endpoint_post,
)


# -- IPPool ------------------------------------------------------------------------------------------


def _ippool_post(spec: dict[str, Any], path: str) -> None:
    net = ipaddress.ip_network(spec["cidr"], strict=False)
    lo, hi, default_block = (20, 32, 26) if net.version == 4 else (116, 128, 122)
    block = spec.setdefault("blockSize", default_block)
    if not lo <= block <= hi:
        raise FieldError(s.join(path, "blockSize"), f"{block} is out of range {lo}..{hi} for an IPv{net.version} pool")
    if block < net.prefixlen:
        raise FieldError(
            s.join(path, "blockSize"),
            f"a /{block} block does not fit in the /{net.prefixlen} pool (blockSize must be >= {net.prefixlen})",
        )
    if spec["ipipMode"] != "Never" and spec["vxlanMode"] != "Never":
        raise FieldError(path, "ipipMode and vxlanMode cannot both be enabled")
    if net.version == 6 and spec["ipipMode"] != "Never":
        raise FieldError(s.join(path, "ipipMode"), "IPIP is not supported on an IPv6 pool")
    uses = spec["allowedUses"]
    if len(set(uses)) != len(uses):
        raise FieldError(s.join(path, "allowedUses"), "contains duplicates")
    if "LoadBalancer" in uses:
        if len(uses) > 1:
            raise FieldError(s.join(path, "allowedUses"), "LoadBalancer cannot be combined with other uses")
        if spec["ipipMode"] != "Never" or spec["vxlanMode"] != "Never":
            raise FieldError(path, "a LoadBalancer pool cannot use IPIP or VXLAN")


_IPPOOL = s.obj(
    {
        "cidr": s.cidr(strict=True),
        "blockSize": s.integer(),
        "ipipMode": s.string(enum=_MODES),
        "vxlanMode": s.string(enum=_MODES),
        "natOutgoing": s.boolean,
        "disabled": s.boolean,
        "disableBGPExport": s.boolean,
        "nodeSelector": s.selector,
        "namespaceSelector": s.selector,
        "allowedUses": s.list_of(s.string(enum=("Workload", "Tunnel", "LoadBalancer")), min_items=1),
        "assignmentMode": s.string(enum=("Automatic", "Manual")),
    },
    required=("cidr",),
    defaults={
        "ipipMode": "Never",
        "vxlanMode": "Never",
        "natOutgoing": False,
        "disabled": False,
        "disableBGPExport": False,
        "nodeSelector": "all()",
        "allowedUses": ["Workload", "Tunnel"],
        "assignmentMode": "Automatic",
    },
    post=_ippool_post,
)


# -- IPReservation -----------------------------------------------------------------------------------

# Addresses automatic assignment never hands out (felixpy/ipam/reservations.py). Calico accepts
# single addresses and CIDRs of either family; a CIDR with host bits set names the network it is in.
_IP_RESERVATION = s.obj({"reservedCIDRs": s.list_of(s.cidr(strict=False, allow_ip=True))})


# -- IPAMConfiguration ------------------------------------------------------------------------------


def _ipam_config_post(spec: dict[str, Any], path: str) -> None:
    if not spec["strictAffinity"] and not spec["autoAllocateBlocks"]:
        raise FieldError(path, "strictAffinity and autoAllocateBlocks cannot both be false")


_IPAM_CONFIG = s.obj(
    {
        "strictAffinity": s.boolean,
        "autoAllocateBlocks": s.boolean,
        "maxBlocksPerHost": s.integer(0, 2**31 - 1),
        "kubeVirtVMAddressPersistence": s.string(enum=("Enabled", "Disabled")),
    },
    defaults={"strictAffinity": False, "autoAllocateBlocks": True, "maxBlocksPerHost": 0},
    post=_ipam_config_post,
)


def to_ipam_config_value(resource: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Calico stores at /calico/ipam/v2/config for a validated IPAMConfiguration."""
    spec = resource["spec"]
    value: dict[str, Any] = {
        "strict_affinity": spec["strictAffinity"],
        "auto_allocate_blocks": spec["autoAllocateBlocks"],
        "maxBlocksPerHost": spec["maxBlocksPerHost"],
    }
    if "kubeVirtVMAddressPersistence" in spec:
        value["kubeVirtVMAddressPersistence"] = spec["kubeVirtVMAddressPersistence"]
    return value


def from_ipam_config_value(value: Mapping[str, Any]) -> dict[str, Any]:
    """The IPAMConfiguration resource `default` for the value stored at /calico/ipam/v2/config."""
    spec: dict[str, Any] = {
        "strictAffinity": bool(value.get("strict_affinity", False)),
        "autoAllocateBlocks": bool(value.get("auto_allocate_blocks", True)),
        "maxBlocksPerHost": int(value.get("maxBlocksPerHost", 0)),
    }
    if "kubeVirtVMAddressPersistence" in value:
        spec["kubeVirtVMAddressPersistence"] = value["kubeVirtVMAddressPersistence"]
    return {
        "apiVersion": API_VERSION,
        "kind": "IPAMConfiguration",
        "metadata": {"name": "default"},
        "spec": spec,
    }


# -- Node --------------------------------------------------------------------------------------------

_NODE = s.obj(
    {
        "bgp": s.obj(
            {
                "asNumber": s.as_number,
                "ipv4Address": s.interface_cidr(4),
                "ipv6Address": s.interface_cidr(6),
                "ipv4IPIPTunnelAddr": s.ip_address(4),
                "routeReflectorClusterID": s.ip_address(4),
            }
        ),
        "ipv4VXLANTunnelAddr": s.ip_address(4),
        "ipv6VXLANTunnelAddr": s.ip_address(6),
        "vxlanTunnelMACAddr": s.string(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", what="MAC address"),
        "vxlanTunnelMACAddrV6": s.string(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", what="MAC address"),
        "orchRefs": s.list_of(s.obj({"nodeName": s.string(), "orchestrator": s.string()})),
        "addresses": s.list_of(
            s.obj(
                {"address": s.cidr(strict=False, allow_ip=True), "type": s.string()},
                required=("address",),
            )
        ),
        "interfaces": s.list_of(
            s.obj({"name": s.string(), "addresses": s.list_of(s.string())}, required=("name",))
        ),
        "wireguard": s.obj({"interfaceIPv4Address": s.ip_address(4), "interfaceIPv6Address": s.ip_address(6)}),
    }
)
_NODE_STATUS = s.obj(
    {
        "wireguardPublicKey": s.string(),
        "wireguardPublicKeyV6": s.string(),
        "podCIDRs": s.list_of(s.cidr(strict=False)),
    }
)


# -- BGP ---------------------------------------------------------------------------------------------

_SECRET_REF = s.obj(
    {"secretKeyRef": s.obj({"name": s.string(), "key": s.string()}, required=("name", "key"))},
    required=("secretKeyRef",),
)
_CIDR_ITEM = s.obj({"cidr": s.cidr(strict=False, allow_ip=True)}, required=("cidr",))  # IPv4 or IPv6
_COMMUNITY_VALUE = s.string(r"\d+:\d+(:\d+)?", what="community")
_NODE_SPECIFIC_BGP_FIELDS = {"logSeverityScreen", "listenPort", "prefixAdvertisements", "bindMode"}


def _community_value(value: Any, path: str) -> str:
    """A standard (16-bit aa:nn) or large (32-bit aa:nn:mm) community value."""
    text: str = _COMMUNITY_VALUE(value, path)
    parts = [int(p) for p in text.split(":")]
    limit = 0xFFFF if len(parts) == 2 else 0xFFFFFFFF
    if any(p > limit for p in parts):
        raise FieldError(path, f"community {q(text)} is out of range ({'16' if len(parts) == 2 else '32'}-bit parts)")
    return text


def _log_level(value: Any, path: str) -> str:
    levels = {"trace": "Trace", "debug": "Debug", "info": "Info", "warning": "Warning", "error": "Error",
              "fatal": "Fatal", "none": "None"}
    if not isinstance(value, str) or value.lower() not in levels:
        raise FieldError(path, f"invalid log level {q(value)} (one of {', '.join(levels.values())})")
    return levels[value.lower()]


def _bgp_configuration_post(spec: dict[str, Any], path: str) -> None:
    named = {c["name"] for c in spec.get("communities") or ()}
    for i, adv in enumerate(spec.get("prefixAdvertisements") or ()):
        for j, value in enumerate(adv.get("communities") or ()):
            if value not in named and not re.fullmatch(r"\d+:\d+(:\d+)?", value):
                raise FieldError(s.join(path, f"prefixAdvertisements[{i}].communities[{j}]"),
                                 f"{q(value)} is neither a community value nor a name in spec.communities")
            if value not in named:
                _community_value(value, s.join(path, f"prefixAdvertisements[{i}].communities[{j}]"))


_BGP_CONFIGURATION = s.obj(
    {
        "logSeverityScreen": _log_level,
        "nodeToNodeMeshEnabled": s.boolean,
        "asNumber": s.as_number,
        "serviceClusterIPs": s.list_of(_CIDR_ITEM),
        "serviceExternalIPs": s.list_of(_CIDR_ITEM),
        "serviceLoadBalancerIPs": s.list_of(_CIDR_ITEM),
        "serviceLoadBalancerAggregation": s.string(enum=("Enabled", "Disabled")),
        "communities": s.list_of(s.obj({"name": s.string(), "value": _community_value}, required=("name", "value"))),
        "prefixAdvertisements": s.list_of(
            s.obj({"cidr": s.cidr(strict=False), "communities": s.list_of(s.string())}, required=("cidr",))
        ),
        "listenPort": s.integer(1, 65535),
        "nodeMeshPassword": _SECRET_REF,
        "nodeMeshMaxRestartTime": s.duration,
        "bindMode": s.string(enum=("None", "NodeIP")),
        "ignoredInterfaces": s.list_of(s.string()),
        "localWorkloadPeeringIPV4": s.ip_address(4),
        "localWorkloadPeeringIPV6": s.ip_address(6),
        "programClusterRoutes": s.string(enum=("Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly", "Enabled")),
        "ipv4NormalRoutePriority": s.integer(1, 2**31 - 1),
        "ipv6NormalRoutePriority": s.integer(1, 2**31 - 1),
    },
    post=_bgp_configuration_post,
)
# confd's effective defaults for the global configuration, made explicit in the stored resource.
_BGP_GLOBAL_DEFAULTS = {"logSeverityScreen": "Info", "nodeToNodeMeshEnabled": True, "asNumber": 64512}


def _peer_ip(value: Any, path: str) -> str:
    """`ip`, `ip:port` or `[v6]:port`."""
    if not isinstance(value, str):
        raise FieldError(path, f"invalid peer IP {q(value)}")
    host, port = value, None
    if value.startswith("["):
        close = value.find("]")
        if close < 0 or value[close + 1 : close + 2] != ":":
            raise FieldError(path, f"invalid peer IP {q(value)}")
        host, port = value[1:close], value[close + 2 :]
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise FieldError(path, f"invalid peer IP {q(value)}") from None
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise FieldError(path, f"invalid port in peer IP {q(value)}")
    return value


def _keepalive(value: Any, path: str) -> str:
    text: str = s.duration(value, path)
    from bgp.peers import MAX_KEEPALIVE, parse_duration

    seconds = parse_duration(text)
    if seconds is None or not 1 <= seconds <= MAX_KEEPALIVE:
        raise FieldError(path, f"keepalive time must be 1s to {MAX_KEEPALIVE}s")
    return text


def _bgp_peer_post(spec: dict[str, Any], path: str) -> None:
    if "node" in spec and "nodeSelector" in spec:
        raise FieldError(path, "node and nodeSelector cannot both be set")
    if "peerSelector" in spec:
        if "peerIP" in spec or "asNumber" in spec:
            raise FieldError(path, "peerSelector cannot be combined with peerIP or asNumber")
    elif "peerIP" not in spec or "asNumber" not in spec:
        raise FieldError(path, "either peerIP and asNumber, or peerSelector, must be set")
    # An IPv6 peerIP (two or more colons, bracketed or not) needs an IPv6 gateway, and reachableBy
    # takes IPv4 only: refused here rather than by every node's peering code later.
    if "reachableBy" in spec and str(spec.get("peerIP", "")).count(":") > 1:
        raise FieldError(f"{path}.reachableBy", "an IPv6 peerIP needs an IPv6 gateway, and IPv6 reachableBy "
                         "is not supported yet")


_BGP_PEER = s.obj(
    {
        "node": s.subdomain_name,
        "nodeSelector": s.selector,
        "peerIP": _peer_ip,
        "asNumber": s.as_number,
        "peerSelector": s.selector,
        "localASNumber": s.as_number,
        "keepOriginalNextHop": s.boolean,
        "nextHopMode": s.string(enum=("Auto", "Self", "Keep")),
        "password": _SECRET_REF,
        "sourceAddress": s.string(enum=("UseNodeIP", "None")),
        "failureDetectionMode": s.string(enum=("None", "BFDIfDirectlyConnected")),
        "restartMode": s.string(enum=("GracefulRestart", "LongLivedGracefulRestart")),
        "maxRestartTime": s.duration,
        "keepaliveTime": _keepalive,
        "birdGatewayMode": s.string(enum=("Recursive", "DirectIfDirectlyConnected")),
        "numAllowedLocalASNumbers": s.integer(0, 10),
        "ttlSecurity": s.integer(0, 255),
        "reachableBy": s.ip_address(4),
        "filters": s.list_of(s.subdomain_name),
        "localWorkloadSelector": s.selector,
        "reversePeering": s.string(enum=("Auto", "Manual")),
    },
    post=_bgp_peer_post,
)


def _filter_rule_post(rule: dict[str, Any], path: str) -> None:
    from bgp.filters import FilterError, _rule

    try:
        _rule(rule, path, 6 if "V6[" in path else 4)
    except FilterError as err:
        message = str(err)
        if message.startswith(path):
            message = message[len(path):].lstrip(".: ")
        raise FieldError(path, message) from None


_FILTER_RULE = s.obj(
    {
        "action": s.string(enum=("Accept", "Reject")),
        "matchOperator": s.string(enum=("Equal", "NotEqual", "In", "NotIn")),
        # IPv4 in exportV4/importV4, IPv6 in the V6 lists: the post check (bgp.filters) sees which.
        "cidr": s.cidr(strict=False),
        "prefixLength": s.obj({"min": s.integer(0, 128), "max": s.integer(0, 128)}),
        "source": s.string(enum=("RemotePeers",)),
        "interface": s.string(),
        "peerType": s.string(enum=("eBGP", "iBGP")),
        "communities": s.obj({"values": s.list_of(_community_value)}),
        "asPathPrefix": s.list_of(s.as_number),
        "priority": s.integer(0, 2**31 - 1),
        "operations": s.list_of(s.obj({
            "addCommunity": s.obj({"value": _community_value}, required=("value",)),
            "prependASPath": s.obj({"prefix": s.list_of(s.as_number, min_items=1)}, required=("prefix",)),
            "setPriority": s.obj({"value": s.integer(0, 2**31 - 1)}),
        })),
    },
    required=("action",),
    post=_filter_rule_post,
    name="BGPFilterRule",
)
_BGP_FILTER = s.obj(
    {
        "exportV4": s.list_of(_FILTER_RULE),
        "importV4": s.list_of(_FILTER_RULE),
        "exportV6": s.list_of(_FILTER_RULE),
        "importV6": s.list_of(_FILTER_RULE),
    }
)

_CALICO_NODE_STATUS = s.obj(
    {
        "node": s.subdomain_name,
        "classes": s.list_of(s.string(enum=("Agent", "BGP", "Routes")), min_items=1),
        "updatePeriodSeconds": s.integer(0, 86400),
    },
    required=("node", "classes", "updatePeriodSeconds"),
)


# -- FelixConfiguration --------------------------------------------------------------------------------

_B, _I, _S, _D = s.boolean, s.integer(), s.string(), s.duration
_PROTO_PORT = s.obj(
    {"protocol": s.string(enum=("tcp", "udp", "sctp", "TCP", "UDP", "SCTP")), "port": s.integer(0, 65535),
     "net": s.cidr(strict=False, allow_ip=True)},
    required=("port",),
)
_FELIX_FIELDS: dict[str, s.Checker] = {
    # Datastore, lifecycle, logging.
    "useInternalDataplaneDriver": _B, "dataplaneDriver": _S, "dataplaneWatchdogTimeout": _D,
    "logPrefix": _S, "logFilePath": _S, "logSeverityFile": _log_level, "logSeverityScreen": _log_level,
    "logSeveritySys": _log_level, "logDebugFilenameRegex": _S, "logActionRateLimit": _S,
    "logActionRateLimitBurst": _I, "reportingInterval": _D, "reportingTTL": _D,
    "endpointReportingEnabled": _B, "endpointReportingDelay": _D, "endpointStatusPathPrefix": _S,
    "usageReportingEnabled": _B, "usageReportingInitialDelay": _D, "usageReportingInterval": _D,
    "healthEnabled": _B, "healthHost": _S, "healthPort": s.integer(0, 65535),
    "healthTimeoutOverrides": s.list_of(s.obj({"name": _S, "timeout": _D}, required=("name", "timeout"))),
    "prometheusMetricsEnabled": _B, "prometheusMetricsHost": _S, "prometheusMetricsPort": s.integer(0, 65535),
    "prometheusGoMetricsEnabled": _B, "prometheusProcessMetricsEnabled": _B,
    "prometheusWireGuardMetricsEnabled": _B, "featureDetectOverride": _S, "featureGates": _S,
    "debugMemoryProfilePath": _S, "debugDisableLogDropping": _B, "debugSimulateCalcGraphHangAfter": _D,
    "debugSimulateDataplaneHangAfter": _D, "debugSimulateDataplaneApplyDelay": _D, "debugHost": _S,
    "debugPort": _I, "policySyncPathPrefix": _S, "sidecarAccelerationEnabled": _B, "openstackRegion": _S,
    "metadataAddr": _S, "metadataPort": _I, "externalNodesList": s.list_of(_S), "ipv6Support": _B,
    "ipForwarding": s.string(enum=("Enabled", "Disabled")),
    # Interfaces, routes, tunnels.
    "interfacePrefix": _S, "interfaceExclude": _S, "interfaceRefreshInterval": _D,
    "routeRefreshInterval": _D, "routeSyncDisabled": _B, "routeSource": s.string(enum=("CalicoIPAM", "WorkloadIPs")),
    "routeTableRange": s.obj({"min": _I, "max": _I}, required=("min", "max")),
    "routeTableRanges": s.list_of(s.obj({"min": _I, "max": _I}, required=("min", "max"))),
    "removeExternalRoutes": _B, "deviceRouteSourceAddress": s.ip_address(4),
    "deviceRouteSourceAddressIPv6": s.ip_address(6), "deviceRouteProtocol": s.integer(0, 255),
    "ipv4ElevatedRoutePriority": _I, "ipv4NormalRoutePriority": _I, "ipv6ElevatedRoutePriority": _I,
    "ipv6NormalRoutePriority": _I,
    "programClusterRoutes": s.string(enum=("Disabled", "EnabledIPIPOnly", "EnabledNoEncapOnly", "Enabled")),
    "netlinkTimeout": _D, "mtuIfacePattern": _S, "ipipEnabled": _B, "ipipMTU": _I,
    "vxlanEnabled": _B, "vxlanMTU": _I, "vxlanMTUV6": _I, "vxlanPort": s.integer(1, 65535),
    "vxlanVNI": s.integer(1, 16777215), "allowVXLANPacketsFromWorkloads": _B,
    "allowIPIPPacketsFromWorkloads": _B, "wireguardEnabled": _B, "wireguardEnabledV6": _B,
    "wireguardListeningPort": _I, "wireguardListeningPortV6": _I, "wireguardRoutingRulePriority": _I,
    "wireguardInterfaceName": _S, "wireguardInterfaceNameV6": _S, "wireguardMTU": _I, "wireguardMTUV6": _I,
    "wireguardHostEncryptionEnabled": _B, "wireguardKeepAlive": _D, "wireguardThreadingEnabled": _B,
    "awsSrcDstCheck": s.string(enum=("DoNothing", "Enable", "Disable")), "floatingIPs": s.string(enum=("Enabled", "Disabled")),
    # iptables, ipsets, nftables.
    "iptablesBackend": s.string(enum=("Legacy", "NFT", "Auto", "legacy", "nft", "auto")),
    "nftablesMode": s.string(enum=("Disabled", "Enabled", "Auto")), "nftablesRefreshInterval": _D,
    "iptablesRefreshInterval": _D, "iptablesPostWriteCheckInterval": _D, "iptablesLockFilePath": _S,
    "iptablesLockTimeout": _D, "iptablesLockProbeInterval": _D, "ipsetsRefreshInterval": _D,
    "maxIpsetSize": _I, "iptablesMarkMask": _I, "iptablesNATOutgoingInterfaceFilter": _S,
    "chainInsertMode": s.string(enum=("Insert", "Append")),
    "defaultEndpointToHostAction": s.string(enum=("Drop", "Return", "Accept", "DROP", "RETURN", "ACCEPT")),
    "iptablesFilterAllowAction": s.string(enum=("Accept", "Return", "ACCEPT", "RETURN")),
    "iptablesMangleAllowAction": s.string(enum=("Accept", "Return", "ACCEPT", "RETURN")),
    "iptablesFilterDenyAction": s.string(enum=("Drop", "Reject", "DROP", "REJECT")),
    "disableConntrackInvalidCheck": _B, "failsafeInboundHostPorts": s.list_of(_PROTO_PORT),
    "failsafeOutboundHostPorts": s.list_of(_PROTO_PORT), "kubeNodePortRanges": s.list_of(s.int_or_string),
    "natPortRange": s.int_or_string, "natOutgoingAddress": s.ip_address(4),
    "natOutgoingExclusions": s.string(enum=("IPPoolsOnly", "IPPoolsAndHostIPs")),
    "serviceLoopPrevention": s.string(enum=("Drop", "Reject", "Disabled")),
    "genericXDPEnabled": _B, "xdpEnabled": _B, "xdpRefreshInterval": _D,
    # eBPF (accepted so Calico manifests apply unchanged; felixpy's dataplane is iptables).
    "bpfEnabled": _B, "bpfDisableUnprivileged": _B, "bpfLogLevel": _S, "bpfDataIfacePattern": _S,
    "bpfConnectTimeLoadBalancingEnabled": _B, "bpfConnectTimeLoadBalancing": _S,
    "bpfExternalServiceMode": _S, "bpfKubeProxyIptablesCleanupEnabled": _B,
    "bpfKubeProxyMinSyncPeriod": _D, "bpfKubeProxyEndpointSlicesEnabled": _B,
}
_FELIX_CONFIGURATION = s.obj(_FELIX_FIELDS)


# -- WorkloadEndpoint, Profile, ClusterInformation -----------------------------------------------------

_WEP_PORT = s.obj(
    {
        "name": s.string(),
        "protocol": _protocol,
        "port": s.integer(0, 65535),
        "hostPort": s.integer(0, 65535),
        "hostIP": s.ip_address(),
    },
    required=("port",),
)
_WORKLOAD_ENDPOINT = s.obj(
    {
        "orchestrator": s.string(),
        "workload": s.string(),
        "node": s.string(),
        "containerID": s.string(),
        "pod": s.string(),
        "endpoint": s.string(),
        "serviceAccountName": s.string(),
        "ipNetworks": s.list_of(s.cidr(strict=False, allow_ip=True)),
        "ipv4Gateway": s.ip_address(4),
        "ipv6Gateway": s.ip_address(6),
        "ipNATs": s.list_of(
            s.obj({"internalIP": s.ip_address(), "externalIP": s.ip_address()}, required=("internalIP", "externalIP"))
        ),
        "profiles": s.list_of(s.string()),
        "interfaceName": s.string(),
        "mac": s.string(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", what="MAC address"),
        "ports": s.list_of(_WEP_PORT),
        "allowSpoofedSourcePrefixes": s.list_of(s.cidr(strict=False)),
        "qosControls": s.anything,
    }
)
_PROFILE = s.obj(
    {"ingress": _rules, "egress": _rules, "labelsToApply": s.string_map(s.label_key, s.label_value)}
)
_CLUSTER_INFORMATION = s.obj(
    {
        "clusterGUID": s.string(),
        "clusterType": s.string(),
        "calicoVersion": s.string(),
        "datastoreReady": s.boolean,
        "variant": s.string(),
    }
)

_SPECS: dict[str, s.Checker] = {
    "IPPool": _IPPOOL,
    "IPReservation": _IP_RESERVATION,
    "IPAMConfiguration": _IPAM_CONFIG,
    "Node": _NODE,
    "BGPConfiguration": _BGP_CONFIGURATION,
    "BGPPeer": _BGP_PEER,
    "BGPFilter": _BGP_FILTER,
    "CalicoNodeStatus": _CALICO_NODE_STATUS,
    "FelixConfiguration": _FELIX_CONFIGURATION,
    "WorkloadEndpoint": _WORKLOAD_ENDPOINT,
    "Profile": _PROFILE,
    "NetworkPolicy": _NETWORK_POLICY,
    "GlobalNetworkPolicy": _GLOBAL_NETWORK_POLICY,
    "ClusterInformation": _CLUSTER_INFORMATION,
    "Tier": _TIER,
    "NetworkSet": _NETWORK_SET,
    "GlobalNetworkSet": _NETWORK_SET,
    "HostEndpoint": _HOST_ENDPOINT,
}


def _timestamp(value: Any, path: str) -> str:
    # An unquoted timestamp in YAML decodes to a datetime; store the RFC 3339 text Calico uses.
    if isinstance(value, datetime.datetime):
        moment: datetime.datetime = value
        if moment.tzinfo is not None:
            moment = moment.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    if not isinstance(value, str):
        raise FieldError(path, f"expected a timestamp, got {q(value)}")
    return value


_METADATA = s.obj(
    {
        "name": s.subdomain_name,
        "namespace": s.string(),
        "labels": s.string_map(s.label_key, s.label_value),
        "annotations": s.string_map(),
        # Store-managed fields: accepted (so `get -o yaml | apply -f -` works) and kept.
        "resourceVersion": s.string(),
        "creationTimestamp": _timestamp,
        "uid": s.string(),
        "generation": s.integer(0),
    },
    required=("name",),
    name="ObjectMeta",
)


# Which fields felixpy honours; the refusals of the others are attached to the field tables here.
ROOTS: dict[str, tuple[tuple[str, s.Obj], ...]] = {
    kind: (("spec", spec),) for kind, spec in _SPECS.items() if isinstance(spec, s.Obj)
}
ROOTS["Node"] = (("spec", _NODE), ("status", _NODE_STATUS))
ROOTS["ObjectMeta"] = (("", _METADATA),)
COVERAGE_PROBLEMS = coverage.install(ROOTS)


# -- validate ----------------------------------------------------------------------------------------


def describe(obj: Mapping[str, Any]) -> str:
    """`Kind "name"` for messages, as well as the object allows."""
    kind = obj.get("kind") if isinstance(obj.get("kind"), str) else "resource"
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return f'{kind} "{name}"' if isinstance(name, str) and name else str(kind)


def validate(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The normalised resource, or ValidationError naming the resource and the field."""
    if not isinstance(obj, Mapping):
        raise ValidationError(f"expected a resource object, got {type(obj).__name__}")
    where = describe(obj)
    with s.collect_warnings() as warnings:
        try:
            resource = _validate(obj)
        except FieldError as e:
            raise ValidationError(f"{where}: {e}") from None
    for warning in warnings:
        # A field accepted with no effect (model/coverage.py: Tolerated); felixctl shows WARNING lines.
        log.warning("%s: %s", where, warning)
    return resource


def _validate(obj: Mapping[str, Any]) -> dict[str, Any]:
    for field in obj:
        if field not in ("apiVersion", "kind", "metadata", "spec", "status"):
            raise FieldError(str(field), "unknown field")
    api_version = obj.get("apiVersion", API_VERSION)
    if api_version != API_VERSION:
        raise FieldError("apiVersion", f"unsupported apiVersion {q(api_version)} (expected {API_VERSION})")
    kind = obj.get("kind")
    if not isinstance(kind, str) or not kind:
        raise FieldError("kind", "required field is missing")
    if kind not in KINDS:
        raise FieldError("kind", f"unsupported kind {q(kind)} (one of {', '.join(sorted(KINDS))})")
    info = KINDS[kind]
    meta = _METADATA(obj.get("metadata"), "metadata")
    if info.namespaced:
        namespace = meta.setdefault("namespace", DEFAULT_NAMESPACE)
        if not s.DNS1123_LABEL.fullmatch(namespace) or len(namespace) > 63:
            raise FieldError("metadata.namespace", f"invalid namespace {q(namespace)}")
    elif "namespace" in meta:
        if meta["namespace"]:
            raise FieldError("metadata.namespace", f"{kind} is not namespaced")
        del meta["namespace"]
    if "status" in obj and kind not in ("Node", "CalicoNodeStatus"):
        raise FieldError("status", "unknown field")
    if kind in ("NetworkSet", "GlobalNetworkSet") and "projectcalico.org/namespace" in meta.get("labels", {}):
        # Calico: that label only carries the real namespace into the v1 model.
        raise FieldError("metadata.labels", "projectcalico.org/namespace is not a valid label name")
    spec = _SPECS[kind](obj.get("spec"), "spec")
    _check_kind_rules(kind, meta["name"], spec)
    out: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind, "metadata": meta, "spec": spec}
    if kind == "Node" and obj.get("status") is not None:
        out["status"] = _NODE_STATUS(obj["status"], "status")
    if kind == "CalicoNodeStatus" and isinstance(obj.get("status"), Mapping):
        # Written by the agent (node/nodestatus.py); kept so that `get -o yaml | apply -f -` works.
        out["status"] = copy.deepcopy(dict(obj["status"]))
    return out


def _check_kind_rules(kind: str, name: str, spec: dict[str, Any]) -> None:
    if kind in ("IPAMConfiguration", "ClusterInformation") and name != "default":
        raise FieldError("metadata.name", f"{kind} must be named 'default'")
    if kind == "BGPConfiguration":
        if name.startswith("node."):
            extra = sorted(set(spec) - _NODE_SPECIFIC_BGP_FIELDS)
            if extra:
                raise FieldError(f"spec.{extra[0]}", "cannot be set in a node-specific BGPConfiguration")
        elif name == "default":
            for field, default in _BGP_GLOBAL_DEFAULTS.items():
                spec.setdefault(field, default)
    if kind == "NetworkPolicy" and "namespaceSelector" in spec:
        raise FieldError("spec.namespaceSelector", "unknown field")
    if kind == "Tier":
        if len(name) > 63 or not s.DNS1123_LABEL.fullmatch(name):
            raise FieldError("metadata.name", f"invalid tier name {q(name)}: must be a DNS-1123 label "
                             "(no dots: tier names appear inside other names)")
        if name in WELL_KNOWN_TIERS:
            order, action = WELL_KNOWN_TIERS[name]
            if spec["order"] != order:
                raise FieldError("spec.order", f"the {q(name)} tier's order must be {order:.0f}")
            if spec["defaultAction"] != action:
                raise FieldError("spec.defaultAction", f"the {q(name)} tier's default action must be {action}")


# -- cross-resource checks ---------------------------------------------------------------------------


def check_pool_overlap(pool: Mapping[str, Any], existing: Iterable[Mapping[str, Any]]) -> None:
    """Reject a pool whose CIDR overlaps another pool's (a pool with the same name is ignored)."""
    name = pool["metadata"]["name"]
    cidr = pool["spec"]["cidr"]
    net = ipaddress.ip_network(cidr, strict=False)
    for other in existing:
        other_name = other["metadata"]["name"]
        if other_name == name:
            continue
        other_cidr = other["spec"]["cidr"]
        other_net = ipaddress.ip_network(other_cidr, strict=False)
        if net.version == other_net.version and net.overlaps(other_net):
            raise ValidationError(
                f'IPPool "{name}": spec.cidr {cidr} overlaps IPPool "{other_name}" ({other_cidr})'
            )


def check_immutable(new: Mapping[str, Any], old: Mapping[str, Any]) -> None:
    """Reject changes to fields that cannot change once a resource exists (an IPPool's CIDR and
    block size: existing blocks were carved with them)."""
    if new["kind"] != "IPPool":
        return
    for field in ("cidr", "blockSize"):
        before, after = old.get("spec", {}).get(field), new["spec"][field]
        if before is not None and before != after:
            raise ValidationError(
                f'IPPool "{new["metadata"]["name"]}": spec.{field}: cannot be changed ({before} -> {after}); '
                "create a new pool and disable this one"
            )


def identity(resource: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(kind, name, namespace-or-None) of a validated resource."""
    meta = resource["metadata"]
    return resource["kind"], meta["name"], meta.get("namespace") if KINDS[resource["kind"]].namespaced else None


def copy_resource(resource: Mapping[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(dict(resource))
