"""Kubernetes Service addresses a node advertises over BGP, as Calico computes them.

The inputs are the BGPConfiguration `default` (serviceClusterIPs, serviceExternalIPs,
serviceLoadBalancerIPs, serviceLoadBalancerAggregation), the Services and their EndpointSlices,
this node's name and whether the node is excluded from load balancers (its label
`node.kubernetes.io/exclude-from-external-load-balancers=true`). Calico's rules (confd's route
generator and client, calico-reference §3.7):

- Every node advertises the configured CIDRs themselves: the cluster IP range, the external IP
  ranges, and the LoadBalancer ranges (not the single-address /32 entries, and not at all when
  serviceLoadBalancerAggregation is Disabled). An excluded node advertises none of it.
- A Service with `externalTrafficPolicy: Local` is also advertised as /32s (its cluster IP when
  cluster IPs are advertised, its external IPs inside serviceExternalIPs, its LoadBalancer
  ingress IPs inside serviceLoadBalancerIPs) by exactly the nodes that host a ready endpoint of
  it; the /32 is withdrawn when the last local endpoint goes.
- A Service with `externalTrafficPolicy: Cluster` is advertised as /32s from every node when one
  of its addresses falls in a single-address entry (/32) of serviceExternalIPs or
  serviceLoadBalancerIPs, and, with aggregation Disabled, when it is a LoadBalancer with at
  least one ready endpoint anywhere.
- Only Services of type ClusterIP, NodePort or LoadBalancer with a cluster IP (not headless).
- `reject`: the configured ranges. BGP routes learned inside them are not programmed into the
  kernel (confd's `/calico/rejectcidrs`): kube-proxy owns service addresses on every node.

Both families: IPv6 ranges and addresses work like IPv4 ones (a single address is a /128, an
IPv6 EndpointSlice holds the IPv6 endpoints), each announced on its family's sessions. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

EXCLUDE_LABEL = "node.kubernetes.io/exclude-from-external-load-balancers"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ADVERTISED_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")


def _ips(addresses: Iterable[Any]) -> tuple[str, ...]:
    found = []
    for address in addresses:
        try:
            found.append(str(ipaddress.ip_address(str(address))))
        except ValueError:
            continue  # a hostname, or junk: nothing felixpy advertises
    return tuple(found)


def _host(ip: str) -> str:
    return f"{ip}/{32 if ipaddress.ip_address(ip).version == 4 else 128}"


@dataclass(frozen=True)
class ServiceInfo:
    """The parts of a Kubernetes Service that decide its advertisement."""

    namespace: str
    name: str
    type: str
    cluster_ips: tuple[str, ...]  # both families (clusterIPs of a dual-stack Service)
    external_ips: tuple[str, ...]
    load_balancer_ips: tuple[str, ...]  # status.loadBalancer.ingress[].ip
    external_traffic_policy: str  # Cluster | Local

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> "ServiceInfo":
        meta = obj.get("metadata") or {}
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        cluster = list(spec.get("clusterIPs") or ())
        if spec.get("clusterIP") and spec["clusterIP"] not in cluster:
            cluster.insert(0, spec["clusterIP"])
        ingress = ((status.get("loadBalancer") or {}).get("ingress")) or ()
        return cls(
            namespace=str(meta.get("namespace") or "default"),
            name=str(meta.get("name") or ""),
            type=str(spec.get("type") or "ClusterIP"),
            cluster_ips=_ips(c for c in cluster if c != "None"),
            external_ips=_ips(spec.get("externalIPs") or ()),
            load_balancer_ips=_ips(i.get("ip") for i in ingress if isinstance(i, Mapping) and i.get("ip")),
            external_traffic_policy=str(spec.get("externalTrafficPolicy") or "Cluster"),
        )


@dataclass(frozen=True)
class Endpoint:
    addresses: tuple[str, ...]
    node: str | None
    ready: bool


@dataclass(frozen=True)
class EndpointSliceInfo:
    namespace: str
    name: str
    service: str  # the kubernetes.io/service-name label
    endpoints: tuple[Endpoint, ...]  # IPv4 and IPv6 slices; FQDN ones hold no endpoints here

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> "EndpointSliceInfo":
        meta = obj.get("metadata") or {}
        endpoints: list[Endpoint] = []
        if obj.get("addressType", "IPv4") in ("IPv4", "IPv6"):
            for raw in obj.get("endpoints") or ():
                conditions = raw.get("conditions") or {}
                # The API says an unset `ready` means ready.
                ready = conditions.get("ready") is not False
                endpoints.append(Endpoint(_ips(raw.get("addresses") or ()), raw.get("nodeName"), ready))
        return cls(namespace=str(meta.get("namespace") or "default"), name=str(meta.get("name") or ""),
                   service=str((meta.get("labels") or {}).get(SERVICE_NAME_LABEL, "")),
                   endpoints=tuple(endpoints))


@dataclass(frozen=True)
class ServiceSettings:
    """BGPConfiguration `default`'s service fields."""

    cluster_cidrs: tuple[str, ...] = ()
    external_cidrs: tuple[str, ...] = ()
    load_balancer_cidrs: tuple[str, ...] = ()
    load_balancer_aggregation: bool = True

    @classmethod
    def from_resource(cls, obj: Mapping[str, Any] | None) -> "ServiceSettings":
        spec = (obj or {}).get("spec") or {}

        def cidrs(field: str) -> tuple[str, ...]:
            out = []
            for item in spec.get(field) or ():
                out.append(str(ipaddress.ip_network(str(item.get("cidr")), strict=False)))
            return tuple(out)

        return cls(cidrs("serviceClusterIPs"), cidrs("serviceExternalIPs"), cidrs("serviceLoadBalancerIPs"),
                   spec.get("serviceLoadBalancerAggregation", "Enabled") != "Disabled")

    @property
    def enabled(self) -> bool:
        return bool(self.cluster_cidrs or self.external_cidrs or self.load_balancer_cidrs)


@dataclass(frozen=True)
class ServiceRoutes:
    announce: frozenset[str]  # prefixes this node advertises
    reject: frozenset[str]  # learned routes inside these are not programmed


def _inside(ip: str, cidrs: Iterable[str]) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in ipaddress.ip_network(c) for c in cidrs)  # another family's net: False


def _single(cidrs: Iterable[str]) -> tuple[str, ...]:
    return tuple(c for c in cidrs if ipaddress.ip_network(c).prefixlen == ipaddress.ip_network(c).max_prefixlen)


def _families(cidrs: Iterable[str]) -> set[int]:
    return {ipaddress.ip_network(c).version for c in cidrs}


def service_routes(settings: ServiceSettings, services: Iterable[ServiceInfo],
                   slices: Iterable[EndpointSliceInfo], *, node: str, excluded: bool = False) -> ServiceRoutes:
    """What `node` advertises for Services, and the ranges whose learned routes it does not program."""
    lb_ranges = tuple(c for c in settings.load_balancer_cidrs if c not in _single(settings.load_balancer_cidrs))
    reject = frozenset(settings.cluster_cidrs + settings.external_cidrs + lb_ranges)
    if excluded or not settings.enabled:
        return ServiceRoutes(frozenset(), reject)
    announce: set[str] = set(settings.cluster_cidrs) | set(settings.external_cidrs)
    if settings.load_balancer_aggregation:
        announce |= set(lb_ranges)
    by_service: dict[tuple[str, str], list[Endpoint]] = {}
    for endpoint_slice in slices:
        by_service.setdefault((endpoint_slice.namespace, endpoint_slice.service), []).extend(endpoint_slice.endpoints)
    single_external = _single(settings.external_cidrs)
    single_lb = _single(settings.load_balancer_cidrs)
    for svc in services:
        if svc.type not in ADVERTISED_TYPES or not svc.cluster_ips:
            continue
        endpoints = [e for e in by_service.get((svc.namespace, svc.name), ()) if e.ready and e.addresses]
        if svc.external_traffic_policy == "Local":
            advertise = any(e.node == node for e in endpoints)
        else:
            advertise = (
                (svc.type == "LoadBalancer" and any(_inside(ip, single_lb) for ip in svc.load_balancer_ips))
                or any(_inside(ip, single_external) for ip in svc.external_ips)
                or (svc.type == "LoadBalancer" and not settings.load_balancer_aggregation and bool(endpoints)))
        if not advertise:
            continue
        # The cluster IPs of each family serviceClusterIPs covers (a dual-stack Service has two).
        cluster_families = _families(settings.cluster_cidrs)
        addresses: list[str] = [ip for ip in svc.cluster_ips if ipaddress.ip_address(ip).version in cluster_families]
        addresses += [ip for ip in svc.external_ips if _inside(ip, settings.external_cidrs)]
        addresses += [ip for ip in svc.load_balancer_ips if _inside(ip, settings.load_balancer_cidrs)]
        announce.update(_host(ip) for ip in addresses)
    return ServiceRoutes(frozenset(announce), reject)
