"""What a pod asks of IPAM: Calico's pod and namespace annotations and CNI config, as one request.

Calico's CNI plugin (cni-plugin/pkg/k8s) reads, in this order of precedence:

* `cni.projectcalico.org/ipAddrsNoIpam` (pod): the pod gets exactly these addresses and IPAM is
  not asked at all. Only when the network config enables it, `"feature_control":
  {"ip_addrs_no_ipam": true}`; otherwise ADD fails ("requested feature is not enabled").
* `cni.projectcalico.org/ipAddrs` (pod): exactly these addresses, assigned through IPAM (each
  must lie in an enabled pool that allows Workload use and be free; IPReservations do not apply).
  Both annotations at once is an error.
* `cni.projectcalico.org/ipv4pools`: the pools to allocate from, by name or CIDR; the pod's
  annotation wins over its namespace's, which wins over the network config's `ipam.ipv4_pools`;
  without any, every pool selecting the node and the namespace qualifies.
* `cni.projectcalico.org/ipv6pools`: the same for IPv6 pools (and `ipam.ipv6_pools`), used when
  the pod gets an IPv6 address.
* Which families: the network config's `ipam.assign_ipv4` (default "true") and `ipam.assign_ipv6`
  (default "false"), strings as in Calico's config; "true" for both makes a dual-stack pod, one
  address of each family under one IPAM handle. `cni.projectcalico.org/ipFamilies` (pod, else
  namespace), e.g. `["IPv4", "IPv6"]`, overrides them for one pod.

Values are JSON lists, as in Calico. ipAddrs / ipAddrsNoIpam take at most one address per family.

Where the annotations come from: the pod's from the container runtime when it passes them
(`runtimeConfig["io.kubernetes.cri.pod-annotations"]`, which containerd and CRI-O send to plugins
declaring that capability, and the lab does), else from the Kubernetes API when one is configured
(Calico's way); the namespace's labels and annotations from its Profile `kns.<namespace>`, which
the datastore derives from the Namespace (Kubernetes datastore), felixpy-controllers' mirror
writes (etcd mode) or the lab writes.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore.api import Datastore, NotFound

ANNOTATION_PREFIX = "cni.projectcalico.org/"
IPV4_POOLS = ANNOTATION_PREFIX + "ipv4pools"
IPV6_POOLS = ANNOTATION_PREFIX + "ipv6pools"
IP_ADDRS = ANNOTATION_PREFIX + "ipAddrs"
IP_ADDRS_NO_IPAM = ANNOTATION_PREFIX + "ipAddrsNoIpam"
IP_FAMILIES = ANNOTATION_PREFIX + "ipFamilies"

POD_ANNOTATIONS_CAPABILITY = "io.kubernetes.cri.pod-annotations"
NAMESPACE_PROFILE_PREFIX = names.NAMESPACE_PROFILE_PREFIX
NAMESPACE_LABEL_PREFIX = "pcns."
NAMESPACE_NAME_LABEL = "pcns.projectcalico.org/name"  # Calico's own, not one of the namespace's

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_FAMILY_NAMES = {"IPv4": 4, "IPv6": 6}


class RequestError(ValueError):
    """The annotations or network config ask for something invalid; str() is one line."""


@dataclass(frozen=True, slots=True)
class Metadata:
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class IPRequest:
    """One pod's request: automatic (optionally from named pools), fixed addresses, or no IPAM."""

    pools: tuple[str, ...] | None = None  # automatic assignment from these pools (None: any qualifying)
    ips: tuple[IPAddress, ...] = ()  # fixed addresses
    bypass_ipam: bool = False  # ips are used as they are, IPAM is not asked (ipAddrsNoIpam)
    families: tuple[int, ...] = (4,)  # automatic assignment: one address of each of these families
    pools6: tuple[str, ...] | None = None  # the IPv6 pools, as `pools`


def _json_list(value: str, what: str) -> list[str]:
    try:
        parsed = json.loads(value)
    except ValueError:
        raise RequestError(f"{what}: {value!r} is not a JSON list of strings") from None
    if not isinstance(parsed, list) or not all(isinstance(item, str) for item in parsed):
        raise RequestError(f"{what}: {value!r} is not a JSON list of strings")
    return parsed


def _addresses(value: str, annotation: str) -> tuple[IPAddress, ...]:
    items = _json_list(value, annotation)
    if not items:
        raise RequestError(f'annotation "{annotation}" specified but empty')
    out: list[IPAddress] = []
    for item in items:
        try:
            addr = ipaddress.ip_address(item.strip())
        except ValueError:
            raise RequestError(f"{annotation}: invalid IP address {item!r}") from None
        if any(other.version == addr.version for other in out):
            raise RequestError(f'cannot have more than one IPv{addr.version} address for "{annotation}" annotation')
        out.append(addr)
    return tuple(out)


def _feature(config: Mapping[str, Any], name: str) -> bool:
    features = config.get("feature_control") or {}
    if not isinstance(features, Mapping):
        raise RequestError("network config: feature_control must be an object")
    value = features.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(f"network config: feature_control.{name} must be true or false")
    return value


def _ipam_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    ipam = config.get("ipam")
    if ipam is None:
        return {}
    if not isinstance(ipam, Mapping):
        raise RequestError("network config: ipam must be an object")
    kind = ipam.get("type", "calico-ipam")
    if kind != "calico-ipam":
        raise RequestError(f"network config: ipam.type {kind!r} is not supported: felixpy does Calico IPAM "
                           "itself (omit ipam or use calico-ipam)")
    return ipam


def config_pools(config: Mapping[str, Any], field_name: str = "ipv4_pools") -> tuple[str, ...] | None:
    """The network config's `ipam.ipv4_pools` (or `ipv6_pools`); refuses an `ipam.type` other
    than Calico's."""
    pools = _ipam_config(config).get(field_name)
    if pools is None:
        return None
    if not isinstance(pools, list) or not all(isinstance(p, str) for p in pools):
        raise RequestError(f"network config: ipam.{field_name} must be a list of pool names or CIDRs")
    return tuple(pools) or None


def config_families(config: Mapping[str, Any]) -> tuple[int, ...]:
    """`ipam.assign_ipv4` (default "true") and `ipam.assign_ipv6` (default "false"): Calico's
    strings "true" / "false"."""
    ipam = _ipam_config(config)
    families = []
    for version, name, default in ((4, "assign_ipv4", "true"), (6, "assign_ipv6", "false")):
        value = ipam.get(name, default)
        if not isinstance(value, str) or value.lower() not in ("true", "false"):
            raise RequestError(f'network config: ipam.{name} must be "true" or "false"')
        if value.lower() == "true":
            families.append(version)
    if not families:
        raise RequestError("network config: ipam.assign_ipv4 and ipam.assign_ipv6 are both false: "
                           "the pod would get no address")
    return tuple(families)


def ip_request(pod: Mapping[str, str], namespace: Callable[[], Metadata], config: Mapping[str, Any]) -> IPRequest:
    """The request pod annotations, namespace annotations (read only if needed) and config make."""
    # validated whether or not an annotation overrides them
    from_config, from_config6 = config_pools(config), config_pools(config, "ipv6_pools")
    families = config_families(config)
    no_ipam, fixed = pod.get(IP_ADDRS_NO_IPAM, ""), pod.get(IP_ADDRS, "")
    if no_ipam and fixed:
        raise RequestError("can't have both annotations: 'ipAddrs' and 'ipAddrsNoIpam' in use at the same time")
    if no_ipam:
        if not _feature(config, "ip_addrs_no_ipam"):
            raise RequestError("requested feature is not enabled: ip_addrs_no_ipam")
        return IPRequest(ips=_addresses(no_ipam, IP_ADDRS_NO_IPAM), bypass_ipam=True)
    if fixed:
        return IPRequest(ips=_addresses(fixed, IP_ADDRS))
    # Automatic assignment: the pod's ipFamilies and ipv4pools / ipv6pools, else its namespace's.
    families_text = pod.get(IP_FAMILIES) or None
    pools_text, pools6_text = pod.get(IPV4_POOLS) or None, pod.get(IPV6_POOLS) or None
    if families_text is None or pools_text is None or pools6_text is None:
        ns = namespace().annotations
        families_text = families_text or ns.get(IP_FAMILIES) or None
        pools_text = pools_text or ns.get(IPV4_POOLS) or None
        pools6_text = pools6_text or ns.get(IPV6_POOLS) or None
    if families_text is not None:
        wanted = _json_list(families_text, IP_FAMILIES)
        if not wanted or any(family not in _FAMILY_NAMES for family in wanted):
            raise RequestError(f"error parsing ipFamilies: {families_text}")
        families = tuple(sorted({_FAMILY_NAMES[f] for f in wanted}))
    # An empty list, as in Calico, means every qualifying pool.
    pools = tuple(_json_list(pools_text, IPV4_POOLS)) or None if pools_text is not None else from_config
    pools6 = tuple(_json_list(pools6_text, IPV6_POOLS)) or None if pools6_text is not None else from_config6
    return IPRequest(pools=pools, families=families, pools6=pools6)


def runtime_pod_annotations(config: Mapping[str, Any]) -> Mapping[str, str] | None:
    """The pod's annotations as the container runtime passed them, or None if it did not."""
    runtime = config.get("runtimeConfig")
    if not isinstance(runtime, Mapping):
        return None
    annotations = runtime.get(POD_ANNOTATIONS_CAPABILITY)
    if not isinstance(annotations, Mapping):
        return None
    return {str(k): str(v) for k, v in annotations.items()}


def namespace_metadata(store: Datastore, namespace: str) -> Metadata:
    """A namespace's labels and annotations, from its Profile `kns.<namespace>` (empty if none)."""
    try:
        kv = store.get(keys.resource_key("profiles", NAMESPACE_PROFILE_PREFIX + namespace))
    except NotFound:
        return Metadata()
    value = kv.value or {}
    to_apply = (value.get("spec") or {}).get("labelsToApply") or {}
    labels = {k[len(NAMESPACE_LABEL_PREFIX):]: str(v) for k, v in to_apply.items()
              if k.startswith(NAMESPACE_LABEL_PREFIX) and k != NAMESPACE_NAME_LABEL}
    annotations = {str(k): str(v) for k, v in ((value.get("metadata") or {}).get("annotations") or {}).items()}
    return Metadata(labels=labels, annotations=annotations)


def kube_pod_annotations(open_http: Callable[[], Any]) -> Callable[[str, str], Mapping[str, str]]:
    """A lookup of a pod's annotations in the Kubernetes API. open_http returns the Kubernetes
    datastore's HTTP layer and is called once, on first use. Raises RequestError when the pod
    cannot be read, as Calico's plugin fails ADD then."""
    http: list[Any] = []

    def lookup(namespace: str, pod: str) -> Mapping[str, str]:
        try:
            if not http:
                http.append(open_http())
            obj = http[0].request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        except Exception as err:  # the HTTP layer's errors carry the status; keep the message one line
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise RequestError(f"cannot read pod {namespace}/{pod} from the Kubernetes API: {text}") from None
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        return {str(k): str(v) for k, v in annotations.items()}

    return lookup
