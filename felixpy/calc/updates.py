"""Typed datastore updates: each update's key and value decoded once, for every consumer.

`decode(KVUpdate)` turns a key into its kind, name and namespace and the stored JSON into the
value its consumers read (an `IPPool`, a `Node`, a policy `Policy`, an IPAM `Block`, ...). A value
that cannot be decoded is treated as absent: the update is handed on with `value=None`, exactly
as if the resource had been deleted, and one warning names the key and the field. This is Go
Felix's ValidationFilter: an invalid resource fails closed (its routes, rules and ipset members
go away) and never crashes the agent, and every consumer sees the same verdict.

What "invalid" means per kind is what the consumers need to be true, not the full write-time
validation of model/resources.py (felixctl and the other writers already ran that): a pool whose
CIDR does not parse, a node whose spec.bgp.ipv4Address does not, a workload endpoint without
spec.node or with an address or port policy cannot read. Kubernetes Services and EndpointSlices
(KubernetesService, KubernetesEndpointSlice: the Kubernetes objects, mirrored into etcd by
felixpy-controllers or read from the API in the Kubernetes datastore) become bgp.services values.
BGPConfiguration, BGPPeer, BGPFilter and CalicoNodeStatus values are handed on as stored: the BGP
controller interprets them as a set and refuses a bad one by keeping its previous configuration
and reporting the error (`felixctl node status`), which is what an operator needs there, rather
than silently peering without it. FelixConfiguration and
ClusterInformation are handed on as stored too: the agent's config watch (node/config_watch.py)
parses each parameter the way startup did, so both read one value the same way.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Callable, Container, Generic, Iterable, Mapping, TypeVar, get_args

from bgp.services import EndpointSliceInfo, ServiceInfo
from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.ipam.block import Block
from policy import calico
from policy.model import Action, Endpoint, HostEndpoint, Policy, Profile, Rule, Tier

log = logging.getLogger(__name__)

NAMESPACE_PROFILE_PREFIX = names.NAMESPACE_PROFILE_PREFIX
SERVICE_ACCOUNT_PROFILE_PREFIX = names.SERVICE_ACCOUNT_PROFILE_PREFIX


class Kind(StrEnum):
    """The kinds of update the agent's consumers handle (Calico's names)."""

    IP_POOL = "IPPool"
    NODE = "Node"
    BLOCK_AFFINITY = "BlockAffinity"
    IPAM_BLOCK = "IPAMBlock"
    WORKLOAD_ENDPOINT = "WorkloadEndpoint"
    PROFILE = "Profile"
    NETWORK_POLICY = "NetworkPolicy"
    GLOBAL_NETWORK_POLICY = "GlobalNetworkPolicy"
    BGP_CONFIGURATION = "BGPConfiguration"
    BGP_PEER = "BGPPeer"
    BGP_FILTER = "BGPFilter"
    CALICO_NODE_STATUS = "CalicoNodeStatus"
    # Kubernetes objects the BGP controller advertises (service addresses): Calico's model kinds.
    KUBERNETES_SERVICE = "KubernetesService"
    KUBERNETES_ENDPOINT_SLICE = "KubernetesEndpointSlice"
    TIER = "Tier"
    NETWORK_SET = "NetworkSet"
    GLOBAL_NETWORK_SET = "GlobalNetworkSet"
    HOST_ENDPOINT = "HostEndpoint"
    FELIX_CONFIGURATION = "FelixConfiguration"
    CLUSTER_INFORMATION = "ClusterInformation"


_RESOURCE_KINDS = {
    "ippools": Kind.IP_POOL,
    "nodes": Kind.NODE,
    "workloadendpoints": Kind.WORKLOAD_ENDPOINT,
    "profiles": Kind.PROFILE,
    "networkpolicies": Kind.NETWORK_POLICY,
    "globalnetworkpolicies": Kind.GLOBAL_NETWORK_POLICY,
    "bgpconfigurations": Kind.BGP_CONFIGURATION,
    "bgppeers": Kind.BGP_PEER,
    "bgpfilters": Kind.BGP_FILTER,
    "caliconodestatuses": Kind.CALICO_NODE_STATUS,
    "kubernetesservices": Kind.KUBERNETES_SERVICE,
    "kubernetesendpointslices": Kind.KUBERNETES_ENDPOINT_SLICE,
    "tiers": Kind.TIER,
    "networksets": Kind.NETWORK_SET,
    "globalnetworksets": Kind.GLOBAL_NETWORK_SET,
    "hostendpoints": Kind.HOST_ENDPOINT,
    "felixconfigurations": Kind.FELIX_CONFIGURATION,
    "clusterinformations": Kind.CLUSTER_INFORMATION,
}

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Update(Generic[V]):
    """One datastore update, decoded. `value` None: deleted, or invalid (already logged)."""

    kind: Kind
    key: str
    name: str  # the resource name; for blocks and affinities the CIDR as the key spells it
    namespace: str | None
    revision: int
    value: V | None
    node: str = ""  # BlockAffinity: the node the block is affine to


# -- the decoded values ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class IPPool:
    name: str
    cidr: str  # normalised
    nat_outgoing: bool
    disabled: bool
    disable_bgp_export: bool
    ipip_mode: str  # Always | CrossSubnet | Never
    vxlan_mode: str


@dataclass(frozen=True, slots=True)
class Node:
    """A Node's addresses as routing reads them; `resource` is the stored Node (BGP peering).

    Each family is independent: a node with only an IPv6 address is routed to over IPv6 only.
    """

    name: str
    labels: tuple[tuple[str, str], ...]
    ipv4: str | None  # bare address from spec.bgp.ipv4Address; None: no IPv4, nothing to route to
    ipv4_network: str | None  # its subnet, from the address's prefix
    vxlan_tunnel_ip: str | None
    vxlan_mac: str | None  # lower case
    ipip_tunnel_ip: str | None
    resource: Mapping[str, Any]
    ipv6: str | None = None  # from spec.bgp.ipv6Address
    ipv6_network: str | None = None
    vxlan_tunnel_ip_v6: str | None = None  # spec.ipv6VXLANTunnelAddr
    vxlan_mac_v6: str | None = None  # spec.vxlanTunnelMACAddrV6, lower case

    def address(self, version: int) -> str | None:
        return self.ipv4 if version == 4 else self.ipv6

    def network(self, version: int) -> str | None:
        return self.ipv4_network if version == 4 else self.ipv6_network

    def vtep(self, version: int) -> tuple[str | None, str | None]:
        """(VXLAN tunnel address, VTEP MAC) of one family."""
        return (self.vxlan_tunnel_ip, self.vxlan_mac) if version == 4 else (self.vxlan_tunnel_ip_v6, self.vxlan_mac_v6)


@dataclass(frozen=True, slots=True)
class BlockAffinity:
    node: str
    cidr: str  # normalised
    state: str  # confirmed | pending | pendingDeletion
    deleted: bool

    @property
    def confirmed(self) -> bool:
        # Pending or pendingDeletion affinities are not routed (calico#6867).
        return self.state == "confirmed" and not self.deleted


@dataclass(frozen=True, slots=True)
class WorkloadEndpoint:
    node: str
    namespace: str
    pod: str
    iface: str
    ipv4s: tuple[str, ...]  # bare IPv4 addresses: what routes go to
    mac: str
    labels: tuple[tuple[str, str], ...]
    # As policy sees it, without its namespace's labels: joining those in is the policy calc's job.
    endpoint: Endpoint
    ipv6s: tuple[str, ...] = ()  # bare IPv6 addresses

    def ips(self, ipv6: bool = True) -> tuple[str, ...]:
        """Every address routes go to: IPv4, then IPv6 (unless IPv6 is not programmed)."""
        return self.ipv4s + self.ipv6s if ipv6 else self.ipv4s


@dataclass(frozen=True, slots=True)
class NamedProfile:
    """A Profile; for `kns.<ns>` also the labels it gives the namespace's pods (else None), for
    `ksa.<ns>.<sa>` the service account and the labels it gives the pods running as it."""

    profile: Profile
    namespace_labels: Mapping[str, str] | None
    service_account: tuple[str, str] | None = None  # (namespace, name)
    sa_labels: Mapping[str, str] | None = None


def service_account_of_profile(name: str) -> tuple[str, str] | None:
    """(namespace, service account) of a `ksa.<ns>.<sa>` profile name (namespaces have no dots)."""
    if not name.startswith(SERVICE_ACCOUNT_PROFILE_PREFIX):
        return None
    namespace, dot, account = name[len(SERVICE_ACCOUNT_PROFILE_PREFIX):].partition(".")
    return (namespace, account) if dot and namespace and account else None


# -- decoding --------------------------------------------------------------------------------------

# What a malformed stored value raises while being read: treated as absent, never a crash.
INVALID = (KeyError, TypeError, ValueError, AttributeError)


def kind_of(parsed: keys.ParsedKey) -> Kind | None:
    if parsed.kind == "resource":
        return _RESOURCE_KINDS.get(parsed.plural)
    if parsed.kind == "affinity":
        return Kind.BLOCK_AFFINITY
    if parsed.kind == "block":
        return Kind.IPAM_BLOCK
    return None


def decode(update: KVUpdate, wanted: Container[Kind] | None = None) -> Update[Any] | None:
    """The typed update, or None for a key of no kind in `wanted` (default: every kind)."""
    parsed = keys.parse_key(update.key)
    kind = kind_of(parsed)
    if kind is None or (wanted is not None and kind not in wanted):
        return None
    value = None
    if update.value is not None:
        try:
            value = _DECODERS[kind](parsed, update.value)
        except INVALID as err:
            log.warning("ignoring invalid datastore value kind=%s key=%s error=%s", kind, update.key,
                        str(err) or type(err).__name__)
    return Update(kind, update.key, parsed.name, parsed.namespace, update.revision, value, parsed.node)


def _resource(kind: Kind, parsed: keys.ParsedKey, value: Mapping[str, Any]) -> dict[str, Any]:
    """The stored value as a resource: kind, metadata.name and .namespace filled from the key."""
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    meta = dict(value.get("metadata") or {})
    meta.setdefault("name", parsed.name)
    if parsed.namespace is not None:
        meta.setdefault("namespace", parsed.namespace)
    resource = {**value, "metadata": meta}
    resource.setdefault("kind", str(kind))
    return resource


def _addr(cidr_or_ip: str) -> str:
    return str(ipaddress.ip_interface(cidr_or_ip).ip)


def _ip_pool(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> IPPool:
    spec = value["spec"]
    cidr = str(ipaddress.ip_network(spec["cidr"]))
    ipip_mode = str(spec.get("ipipMode") or "Never")
    vxlan_mode = str(spec.get("vxlanMode") or "Never")
    if ipip_mode != "Never" and vxlan_mode != "Never":
        # Validation refuses this on write; a pool stored some other way is not guessed at.
        raise ValueError(f"pool {parsed.name} enables both ipipMode and vxlanMode")
    return IPPool(parsed.name, cidr, bool(spec.get("natOutgoing")), bool(spec.get("disabled")),
                  bool(spec.get("disableBGPExport")), ipip_mode, vxlan_mode)


def _node(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> Node:
    resource = _resource(Kind.NODE, parsed, value)
    labels = tuple(sorted((resource["metadata"].get("labels") or {}).items()))
    spec = resource.get("spec") or {}
    bgp = spec.get("bgp") or {}
    address, address6 = bgp.get("ipv4Address"), bgp.get("ipv6Address")
    iface = ipaddress.IPv4Interface(address) if address else None
    iface6 = ipaddress.IPv6Interface(address6) if address6 else None
    vxlan_ip = spec.get("ipv4VXLANTunnelAddr") if iface else None
    ipip_ip = bgp.get("ipv4IPIPTunnelAddr") if iface else None
    mac = spec.get("vxlanTunnelMACAddr") if iface else None
    vxlan_ip6 = spec.get("ipv6VXLANTunnelAddr") if iface6 else None
    mac6 = spec.get("vxlanTunnelMACAddrV6") if iface6 else None
    return Node(
        name=parsed.name,
        labels=labels,
        ipv4=str(iface.ip) if iface else None,
        ipv4_network=str(iface.network) if iface else None,
        vxlan_tunnel_ip=_addr(vxlan_ip) if vxlan_ip else None,
        vxlan_mac=str(mac).lower() if mac else None,
        ipip_tunnel_ip=_addr(ipip_ip) if ipip_ip else None,
        resource=resource,
        ipv6=str(iface6.ip) if iface6 else None,
        ipv6_network=str(iface6.network) if iface6 else None,
        vxlan_tunnel_ip_v6=_addr(vxlan_ip6) if vxlan_ip6 else None,
        vxlan_mac_v6=str(mac6).lower() if mac6 else None,
    )


def _block_affinity(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> BlockAffinity:
    return BlockAffinity(parsed.node, str(ipaddress.ip_network(parsed.name)),
                         str(value.get("state", "confirmed")), bool(value.get("deleted")))


def _ipam_block(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> Block | None:
    if value.get("deleted"):
        return None  # being released: no longer anyone's block
    return Block.from_json(value)


def _workload_endpoint(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> WorkloadEndpoint:
    resource = _resource(Kind.WORKLOAD_ENDPOINT, parsed, value)
    meta = resource["metadata"]
    spec = resource["spec"]
    networks = spec.get("ipNetworks") or []
    return WorkloadEndpoint(
        node=str(spec["node"]),
        namespace=str(meta.get("namespace") or ""),
        pod=str(spec.get("pod", "")),
        iface=str(spec.get("interfaceName", "")),
        ipv4s=tuple(_addr(n) for n in networks if ipaddress.ip_interface(n).version == 4),
        mac=str(spec.get("mac", "")),
        labels=tuple(sorted((meta.get("labels") or {}).items())),
        endpoint=calico.endpoint_from_resources(resource, {}),
        ipv6s=tuple(_addr(n) for n in networks if ipaddress.ip_interface(n).version == 6),
    )


_ACTIONS = frozenset(get_args(Action))


def _check_actions(rules: Iterable[Rule]) -> None:
    # Rendering refuses an unknown action; found there it would fail every apply of the whole
    # filter table, found here it makes just this policy absent.
    for rule in rules:
        if rule.action not in _ACTIONS:
            raise ValueError(f"unknown rule action {rule.action!r} (Allow, Deny, Log or Pass)")


def _profile(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> NamedProfile:
    resource = _resource(Kind.PROFILE, parsed, value)
    labels = None
    if parsed.name.startswith(NAMESPACE_PROFILE_PREFIX):
        labels = dict(calico.namespace_labels_from_profile(resource))
    account = service_account_of_profile(parsed.name)
    sa_labels = dict(calico.service_account_labels_from_profile(resource)) if account else None
    profile = calico.profile_from_resource(resource)
    _check_actions(profile.ingress + profile.egress)
    return NamedProfile(profile, labels, account, sa_labels)


def _policy(kind: Kind) -> Callable[[keys.ParsedKey, Mapping[str, Any]], Policy]:
    def decode_policy(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> Policy:
        policy = calico.policy_from_resource(_resource(kind, parsed, value))
        _check_actions(policy.ingress + policy.egress)
        return policy
    return decode_policy


def _tier(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> Tier:
    return calico.tier_from_resource(_resource(Kind.TIER, parsed, value))


def _network_set(kind: Kind) -> Callable[[keys.ParsedKey, Mapping[str, Any]], Endpoint]:
    def decode_network_set(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> Endpoint:
        # Without its namespace's labels: joining those in is the policy calc's job.
        return calico.network_set_from_resource(_resource(kind, parsed, value), {})
    return decode_network_set


def _host_endpoint(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> HostEndpoint:
    # Without its profiles' labels: the policy calc joins those in (it has the profiles).
    return calico.host_endpoint_from_resource(_resource(Kind.HOST_ENDPOINT, parsed, value))


def _as_stored(kind: Kind) -> Callable[[keys.ParsedKey, Mapping[str, Any]], Mapping[str, Any]]:
    def decode_stored(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> Mapping[str, Any]:
        return _resource(kind, parsed, value)
    return decode_stored


def _kubernetes_object(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected an object, got {type(value).__name__}")
    meta = dict(value.get("metadata") or {})
    meta.setdefault("name", parsed.name)
    meta.setdefault("namespace", parsed.namespace)
    return {**value, "metadata": meta}


def _kubernetes_service(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> ServiceInfo:
    return ServiceInfo.from_object(_kubernetes_object(parsed, value))


def _kubernetes_endpoint_slice(parsed: keys.ParsedKey, value: Mapping[str, Any]) -> EndpointSliceInfo:
    return EndpointSliceInfo.from_object(_kubernetes_object(parsed, value))


_DECODERS: dict[Kind, Callable[[keys.ParsedKey, Any], Any]] = {
    Kind.IP_POOL: _ip_pool,
    Kind.NODE: _node,
    Kind.BLOCK_AFFINITY: _block_affinity,
    Kind.IPAM_BLOCK: _ipam_block,
    Kind.WORKLOAD_ENDPOINT: _workload_endpoint,
    Kind.PROFILE: _profile,
    Kind.NETWORK_POLICY: _policy(Kind.NETWORK_POLICY),
    Kind.GLOBAL_NETWORK_POLICY: _policy(Kind.GLOBAL_NETWORK_POLICY),
    Kind.BGP_CONFIGURATION: _as_stored(Kind.BGP_CONFIGURATION),
    Kind.BGP_PEER: _as_stored(Kind.BGP_PEER),
    Kind.BGP_FILTER: _as_stored(Kind.BGP_FILTER),
    Kind.CALICO_NODE_STATUS: _as_stored(Kind.CALICO_NODE_STATUS),
    Kind.KUBERNETES_SERVICE: _kubernetes_service,
    Kind.KUBERNETES_ENDPOINT_SLICE: _kubernetes_endpoint_slice,
    Kind.TIER: _tier,
    Kind.NETWORK_SET: _network_set(Kind.NETWORK_SET),
    Kind.GLOBAL_NETWORK_SET: _network_set(Kind.GLOBAL_NETWORK_SET),
    Kind.HOST_ENDPOINT: _host_endpoint,
    Kind.FELIX_CONFIGURATION: _as_stored(Kind.FELIX_CONFIGURATION),
    Kind.CLUSTER_INFORMATION: _as_stored(Kind.CLUSTER_INFORMATION),
}


def with_namespace_labels(endpoint: Endpoint, labels: Mapping[str, str],
                          sa_labels: Mapping[str, str] | None = None) -> Endpoint:
    """The endpoint as policy matches it: with its namespace's (and its service account's)
    labels joined in."""
    joined = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
    sa = tuple(sorted((str(k), str(v)) for k, v in (sa_labels or {}).items()))
    if joined == endpoint.namespace_labels and sa == endpoint.sa_labels:
        return endpoint
    return replace(endpoint, namespace_labels=joined, sa_labels=sa)
