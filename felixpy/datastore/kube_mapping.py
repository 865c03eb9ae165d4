"""How datastore keys and values map onto Kubernetes API objects in the Kubernetes datastore (KDD).

Pure functions and tables, no I/O: kube.py does the HTTP. The layout follows Calico's KDD:

    /calico/resources/v3/projectcalico.org/<plural>/...  crd.projectcalico.org/v1 <plural> (spec as written)
    /calico/ipam/v2/assignment/ipv4/block/10.0.1.0-26    ipamblocks "10-0-1-0-26"
    /calico/ipam/v2/host/<node>/ipv4/block/10.0.1.0-26   blockaffinities "<node>-10-0-1-0-26" (hashed > 253)
    /calico/ipam/v2/handle/<id>                          ipamhandles "<id lower-cased>" (spec.handleID = id)
    /calico/ipam/v2/config                               ipamconfigs "default"
    .../nodes/<name>                                     core v1 Node: Calico fields in projectcalico.org/* annotations
    .../workloadendpoints/<ns>/<node>-k8s-<pod>-eth0     core v1 Pod (+ cni.projectcalico.org/* annotations)
    .../profiles/kns.<ns>                                core v1 Namespace (read-only; its labels as
                                                         labelsToApply, its cni.projectcalico.org/*
                                                         annotations, which the CNI plugin reads)
    .../networkpolicies/<ns>/knp.default.<name>          networking.k8s.io/v1 NetworkPolicy (read-only)
    .../kubernetesservices/<ns>/<name>                   core v1 Service (read-only; BGP service advertisement)
    .../kubernetesendpointslices/<ns>/<name>             discovery.k8s.io/v1 EndpointSlice (read-only)

A Kind knows its collection path, which keys it owns, and how to turn one API object into the
(key, value) it stands for; `locate(key)` finds the Kind and object name a key is stored as.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from felixpy import names
from felixpy.datastore import keys

CRD_API = "/apis/crd.projectcalico.org/v1"
CRD_API_VERSION = "crd.projectcalico.org/v1"
CALICO_API_VERSION = "projectcalico.org/v3"
CORE_API = "/api/v1"
NETWORKING_API = "/apis/networking.k8s.io/v1"
DISCOVERY_API = "/apis/discovery.k8s.io/v1"

# Pod annotations the CNI plugin writes in KDD mode (calico-reference §6.2 step 6).
ANN_POD_IP = "cni.projectcalico.org/podIP"
ANN_POD_IPS = "cni.projectcalico.org/podIPs"
ANN_CONTAINER_ID = "cni.projectcalico.org/containerID"
WEP_ANNOTATIONS = (ANN_POD_IP, ANN_POD_IPS, ANN_CONTAINER_ID)

# Node annotations Calico's KDD keeps its Node fields in: annotation -> path in the v3 Node.
NODE_ANNOTATIONS: dict[str, tuple[str, ...]] = {
    "projectcalico.org/IPv4Address": ("spec", "bgp", "ipv4Address"),
    "projectcalico.org/IPv6Address": ("spec", "bgp", "ipv6Address"),
    "projectcalico.org/ASNumber": ("spec", "bgp", "asNumber"),
    "projectcalico.org/IPv4IPIPTunnelAddr": ("spec", "bgp", "ipv4IPIPTunnelAddr"),
    "projectcalico.org/RouteReflectorClusterID": ("spec", "bgp", "routeReflectorClusterID"),
    "projectcalico.org/IPv4VXLANTunnelAddr": ("spec", "ipv4VXLANTunnelAddr"),
    "projectcalico.org/VXLANTunnelMACAddr": ("spec", "vxlanTunnelMACAddr"),
    "projectcalico.org/IPv6VXLANTunnelAddr": ("spec", "ipv6VXLANTunnelAddr"),
    "projectcalico.org/VXLANTunnelMACAddrV6": ("spec", "vxlanTunnelMACAddrV6"),
    "projectcalico.org/IPv4WireguardInterfaceAddr": ("spec", "wireguard", "interfaceIPv4Address"),
    "projectcalico.org/IPv6WireguardInterfaceAddr": ("spec", "wireguard", "interfaceIPv6Address"),
    "projectcalico.org/WireguardPublicKey": ("status", "wireguardPublicKey"),
}
# The labels Calico itself put on the Kubernetes Node, so that it only ever removes its own.
ANN_NODE_LABELS = "projectcalico.org/labels"

# The Calico v3 resources stored as CRDs: plural -> (kind, namespaced).
CRD_RESOURCES: dict[str, tuple[str, bool]] = {
    "ippools": ("IPPool", False),
    "ipreservations": ("IPReservation", False),
    "bgpconfigurations": ("BGPConfiguration", False),
    "bgppeers": ("BGPPeer", False),
    "felixconfigurations": ("FelixConfiguration", False),
    "networkpolicies": ("NetworkPolicy", True),
    "globalnetworkpolicies": ("GlobalNetworkPolicy", False),
    "clusterinformations": ("ClusterInformation", False),
    "bgpfilters": ("BGPFilter", False),
    "caliconodestatuses": ("CalicoNodeStatus", False),
    "tiers": ("Tier", False),
    "networksets": ("NetworkSet", True),
    "globalnetworksets": ("GlobalNetworkSet", False),
    "hostendpoints": ("HostEndpoint", False),
}

K8S_NP_PREFIX = "knp.default."
PROFILE_PREFIX = names.NAMESPACE_PROFILE_PREFIX
SA_PROFILE_PREFIX = names.SERVICE_ACCOUNT_PROFILE_PREFIX
MAX_NAME = 253
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class MappingError(ValueError):
    """The key or value cannot be stored in the Kubernetes datastore; one line for the user."""


Converted = tuple[str, Any]  # (datastore key, value)


@dataclass(frozen=True)
class Kind:
    """One Kubernetes collection and the datastore keys it holds."""

    id: str  # unique among kinds, e.g. "crd/ippools", "core/pods"
    api: str  # "/api/v1" or "/apis/<group>/<version>"
    resource: str  # the collection's plural
    namespaced: bool
    key_prefix: str  # every key this kind yields starts with this (or equals it)
    convert: Callable[[dict[str, Any]], Converted | None]  # object -> (key, value), None = no key
    key_of: Callable[[dict[str, Any]], str | None]  # the key an object stands for even when convert is None
    writable: bool = True
    derived: bool = False  # one Kubernetes object carries more than our data: changes may be no-ops for us

    def collection_path(self, namespace: str | None = None) -> str:
        if self.namespaced and namespace:
            return f"{self.api}/namespaces/{namespace}/{self.resource}"
        return f"{self.api}/{self.resource}"

    def object_path(self, name: str, namespace: str | None = None) -> str:
        return f"{self.collection_path(namespace)}/{name}"

    def overlaps(self, prefix: str) -> bool:
        return self.key_prefix.startswith(prefix) or prefix.startswith(self.key_prefix)


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------

def cidr_to_name(cidr: str) -> str:
    """Calico's CIDR → object name: every '.', ':' and '/' becomes '-' (10.0.1.0/26 → 10-0-1-0-26)."""
    return re.sub(r"[.:/]", "-", cidr)


def fit_name(name: str) -> str:
    """A name within 253 characters: longer ones keep a prefix and end in a hash of the whole."""
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return name[: MAX_NAME - len(digest) - 1].rstrip("-.") + "-" + digest


def affinity_name(node: str, cidr: str) -> str:
    return fit_name(f"{node}-{cidr_to_name(cidr)}")


def handle_name(handle_id: str) -> str:
    name = handle_id.lower()
    if len(name) > MAX_NAME or not _DNS1123_SUBDOMAIN.fullmatch(name):
        raise MappingError(f'IPAM handle "{handle_id}" is not a valid Kubernetes object name')
    return name


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------

def _meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def revision_of(obj: dict[str, Any]) -> int:
    rv = _meta(obj).get("resourceVersion", "")
    try:
        return int(rv)
    except (TypeError, ValueError):
        raise MappingError(
            f"resourceVersion {rv!r} is not an integer: the Kubernetes datastore needs an etcd-backed "
            "API server") from None


def _v3_metadata(obj: dict[str, Any], name: str, namespace: str | None) -> dict[str, Any]:
    meta = _meta(obj)
    out: dict[str, Any] = {"name": name}
    if namespace is not None:
        out["namespace"] = namespace
    for field in ("labels", "annotations"):
        if meta.get(field):
            out[field] = dict(meta[field])
    for field in ("uid", "creationTimestamp"):
        if meta.get(field):
            out[field] = meta[field]
    return out


def _k8s_metadata(value: dict[str, Any], name: str, namespace: str | None) -> dict[str, Any]:
    """What of a written v3 metadata the API object keeps: labels and annotations (the server owns
    uid, creationTimestamp and resourceVersion)."""
    raw = value.get("metadata")
    meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
    out: dict[str, Any] = {"name": name}
    if namespace is not None:
        out["namespace"] = namespace
    for field in ("labels", "annotations"):
        if meta.get(field):
            out[field] = dict(meta[field])
    return out


def _expect_dict(value: Any, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MappingError(f"{key}: the Kubernetes datastore stores objects, got {type(value).__name__}")
    return value


# --------------------------------------------------------------------------------------------
# Calico v3 resources as CRDs
# --------------------------------------------------------------------------------------------

def resource_object(plural: str, name: str, namespace: str | None, value: Any) -> dict[str, Any]:
    kind, _ = CRD_RESOURCES[plural]
    value = _expect_dict(value, keys.resource_key(plural, name, namespace))
    obj: dict[str, Any] = {
        "apiVersion": CRD_API_VERSION,
        "kind": value.get("kind") or kind,
        "metadata": _k8s_metadata(value, name, namespace),
        "spec": value.get("spec") if isinstance(value.get("spec"), dict) else {},
    }
    if "status" in value:
        obj["status"] = value["status"]
    return obj


def _resource_convert(plural: str) -> Callable[[dict[str, Any]], Converted | None]:
    kind, namespaced = CRD_RESOURCES[plural]

    def convert(obj: dict[str, Any]) -> Converted | None:
        meta = _meta(obj)
        namespace = meta.get("namespace") if namespaced else None
        key = keys.resource_key(plural, meta.get("name", ""), namespace)
        value: dict[str, Any] = {
            "apiVersion": CALICO_API_VERSION,
            "kind": obj.get("kind") or kind,
            "metadata": _v3_metadata(obj, meta.get("name", ""), namespace),
            "spec": obj.get("spec") or {},
        }
        if "status" in obj:
            value["status"] = obj["status"]
        return key, value

    return convert


# --------------------------------------------------------------------------------------------
# IPAM objects
# --------------------------------------------------------------------------------------------

_BLOCK_RENAMES = {"affinity_claim_time": "affinityClaimTime"}  # etcd JSON -> IPAMBlock spec
_CONFIG_RENAMES = {"strict_affinity": "strictAffinity", "auto_allocate_blocks": "autoAllocateBlocks"}


def _renamed(d: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    return {renames.get(k, k): v for k, v in d.items()}


def _unrenamed(d: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    back = {v: k for k, v in renames.items()}
    return {back.get(k, k): v for k, v in d.items()}


def block_object(cidr: str, value: Any) -> dict[str, Any]:
    value = _expect_dict(value, keys.block_key(cidr))
    spec = _renamed(value, _BLOCK_RENAMES)
    spec["cidr"] = cidr
    # Calico's own IPAMBlock CRD requires strictAffinity (deprecated there, unused here): always
    # write it, so that the block is accepted when Calico's CRDs are installed instead of ours.
    spec.setdefault("strictAffinity", False)
    return {"apiVersion": CRD_API_VERSION, "kind": "IPAMBlock",
            "metadata": {"name": cidr_to_name(cidr)}, "spec": spec}


# Block fields that are null when unset: a CRD schema that does not mark them nullable (Calico's)
# makes the API server drop them, so reading a block puts them back.
_BLOCK_NULLABLE = ("affinity", "affinity_claim_time")


def _block_convert(obj: dict[str, Any]) -> Converted | None:
    spec = obj.get("spec") or {}
    cidr = spec.get("cidr")
    if not isinstance(cidr, str):
        return None
    value = _unrenamed(spec, _BLOCK_RENAMES)
    if value.get("strictAffinity") is False:
        del value["strictAffinity"]  # only ever written for Calico's CRD (block_object)
    for field in _BLOCK_NULLABLE:
        value.setdefault(field, None)
    return keys.block_key(cidr), value


def affinity_object(node: str, cidr: str, value: Any) -> dict[str, Any]:
    value = _expect_dict(value, keys.affinity_key(node, cidr))
    spec = {k: v for k, v in value.items() if k not in ("state", "deleted")}
    # BlockAffinity.spec.deleted is a string in Calico's CRD.
    spec.update({"state": value.get("state", ""), "node": node, "cidr": cidr,
                 "deleted": "true" if value.get("deleted") else "false", "type": "host"})
    return {"apiVersion": CRD_API_VERSION, "kind": "BlockAffinity",
            "metadata": {"name": affinity_name(node, cidr)}, "spec": spec}


def _affinity_convert(obj: dict[str, Any]) -> Converted | None:
    spec = obj.get("spec") or {}
    node, cidr = spec.get("node"), spec.get("cidr")
    if not isinstance(node, str) or not isinstance(cidr, str) or spec.get("type", "host") != "host":
        return None
    value = {k: v for k, v in spec.items() if k not in ("node", "cidr", "type", "state", "deleted")}
    value["state"] = spec.get("state", "")
    value["deleted"] = str(spec.get("deleted", "false")).lower() == "true"
    return keys.affinity_key(node, cidr), value


def handle_object(handle_id: str, value: Any) -> dict[str, Any]:
    value = _expect_dict(value, keys.handle_key(handle_id))
    spec = dict(value)
    spec["handleID"] = handle_id
    return {"apiVersion": CRD_API_VERSION, "kind": "IPAMHandle",
            "metadata": {"name": handle_name(handle_id)}, "spec": spec}


def _handle_convert(obj: dict[str, Any]) -> Converted | None:
    spec = dict(obj.get("spec") or {})
    handle_id = spec.pop("handleID", None) or _meta(obj).get("name", "")
    return keys.handle_key(handle_id), spec


def ipam_config_object(value: Any) -> dict[str, Any]:
    value = _expect_dict(value, keys.IPAM_CONFIG)
    return {"apiVersion": CRD_API_VERSION, "kind": "IPAMConfig",
            "metadata": {"name": "default"}, "spec": _renamed(value, _CONFIG_RENAMES)}


def _ipam_config_convert(obj: dict[str, Any]) -> Converted | None:
    if _meta(obj).get("name") != "default":
        return None
    return keys.IPAM_CONFIG, _unrenamed(obj.get("spec") or {}, _CONFIG_RENAMES)


# --------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------

def _dig(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)  # type: ignore[assignment]
    return d


def node_value(obj: dict[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    name = meta.get("name", "")
    annotations = meta.get("annotations") or {}
    value: dict[str, Any] = {
        "apiVersion": CALICO_API_VERSION,
        "kind": "Node",
        "metadata": {"name": name},
        "spec": {"orchRefs": [{"nodeName": name, "orchestrator": "k8s"}]},
    }
    if meta.get("labels"):
        value["metadata"]["labels"] = dict(meta["labels"])
    for field in ("uid", "creationTimestamp"):
        if meta.get(field):
            value["metadata"][field] = meta[field]
    for ann, path in NODE_ANNOTATIONS.items():
        if ann in annotations:
            raw: Any = annotations[ann]
            if path[-1] == "asNumber":
                try:
                    raw = int(raw)
                except ValueError:
                    continue
            target = value
            for p in path[:-1]:
                target = target.setdefault(p, {})
            target[path[-1]] = raw
    addresses = []
    for addr in (obj.get("status") or {}).get("addresses") or []:
        if addr.get("type") in ("InternalIP", "ExternalIP") and addr.get("address"):
            addresses.append({"address": addr["address"], "type": addr["type"]})
    ipv4 = _dig(value, ("spec", "bgp", "ipv4Address"))
    if ipv4:
        addresses.append({"address": ipv4, "type": "CalicoNodeIP"})
    if addresses:
        value["spec"]["addresses"] = addresses
    return value


def _node_convert(obj: dict[str, Any]) -> Converted | None:
    return keys.resource_key("nodes", _meta(obj).get("name", "")), node_value(obj)


def node_patch(current: dict[str, Any], value: Any) -> dict[str, Any]:
    """The merge patch that makes the Kubernetes Node `current` carry the Calico Node `value`:
    our annotations set or removed, labels added or changed, and only labels Calico added before
    (recorded in projectcalico.org/labels) ever removed."""
    name = _meta(current).get("name", "")
    value = _expect_dict(value, keys.resource_key("nodes", name))
    annotations: dict[str, Any] = {}
    for ann, path in NODE_ANNOTATIONS.items():
        field = _dig(value, path)
        annotations[ann] = None if field in (None, "") else str(field)
    k8s_labels = _meta(current).get("labels") or {}
    current_ann = _meta(current).get("annotations") or {}
    try:
        managed_before = set(json.loads(current_ann.get(ANN_NODE_LABELS) or "{}"))
    except ValueError:
        managed_before = set()
    wanted = dict(_meta(value).get("labels") or {})
    labels: dict[str, Any] = {k: v for k, v in wanted.items() if k8s_labels.get(k) != v}
    for k in managed_before - set(wanted):
        labels[k] = None
    managed = {k: v for k, v in wanted.items() if k in labels or k in managed_before}
    annotations[ANN_NODE_LABELS] = json.dumps(managed, sort_keys=True) if managed else None
    patch: dict[str, Any] = {"metadata": {"annotations": annotations}}
    if labels:
        patch["metadata"]["labels"] = labels
    return patch


# --------------------------------------------------------------------------------------------
# Pods -> WorkloadEndpoints
# --------------------------------------------------------------------------------------------

def _pod_ip_networks(annotations: dict[str, Any]) -> list[str]:
    raw = annotations.get(ANN_POD_IPS) or annotations.get(ANN_POD_IP) or ""
    nets = []
    for item in str(raw).split(","):
        item = item.strip()
        if not item:
            continue
        try:
            iface = ipaddress.ip_interface(item)
        except ValueError:
            continue
        nets.append(str(iface.ip) + ("/32" if iface.version == 4 else "/128"))
    return nets


def _pod_key(obj: dict[str, Any]) -> str | None:
    meta = _meta(obj)
    node = (obj.get("spec") or {}).get("nodeName")
    if not node or not meta.get("name") or not meta.get("namespace"):
        return None
    return keys.resource_key("workloadendpoints", names.workload_endpoint_name(node, meta["name"]), meta["namespace"])


def wep_value(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The WorkloadEndpoint a Pod stands for, or None: not scheduled, host-networked, finished, or
    not networked by us (no IPs recorded by the CNI plugin)."""
    meta = _meta(obj)
    spec = obj.get("spec") or {}
    node = spec.get("nodeName")
    name, namespace = meta.get("name"), meta.get("namespace")
    annotations = meta.get("annotations") or {}
    if not node or not name or not namespace or spec.get("hostNetwork"):
        return None
    if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None
    nets = _pod_ip_networks(annotations)
    if not nets:
        return None
    labels = dict(meta.get("labels") or {})
    labels["projectcalico.org/namespace"] = namespace
    labels["projectcalico.org/orchestrator"] = "k8s"
    account = spec.get("serviceAccountName")
    if account:
        labels["projectcalico.org/serviceaccount"] = account
    ports = []
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if not port.get("name") and not port.get("hostPort"):
                continue
            entry: dict[str, Any] = {"protocol": port.get("protocol") or "TCP", "port": port.get("containerPort", 0)}
            if port.get("name"):
                entry["name"] = port["name"]
            if port.get("hostPort"):
                entry["hostPort"] = port["hostPort"]
                if port.get("hostIP"):
                    entry["hostIP"] = port["hostIP"]
            ports.append(entry)
    wep_spec: dict[str, Any] = {
        "orchestrator": "k8s",
        "node": node,
        "pod": name,
        "endpoint": "eth0",
        "ipNetworks": nets,
        "profiles": [PROFILE_PREFIX + namespace],
        "interfaceName": names.workload_iface_name(namespace, name),
        "ports": ports,
    }
    if annotations.get(ANN_CONTAINER_ID):
        wep_spec["containerID"] = annotations[ANN_CONTAINER_ID]
    if account:
        wep_spec["serviceAccountName"] = account
    return {
        "apiVersion": CALICO_API_VERSION,
        "kind": "WorkloadEndpoint",
        "metadata": {"name": names.workload_endpoint_name(node, name), "namespace": namespace, "labels": labels},
        "spec": wep_spec,
    }


def _pod_convert(obj: dict[str, Any]) -> Converted | None:
    key = _pod_key(obj)
    value = wep_value(obj)
    return None if key is None or value is None else (key, value)


def wep_patch(value: Any, key: str) -> dict[str, Any]:
    """The Pod annotations that record a WorkloadEndpoint written by the CNI plugin."""
    spec = _expect_dict(value, key).get("spec") or {}
    nets = [str(n) for n in spec.get("ipNetworks") or []]
    if not nets:
        raise MappingError(f"{key}: a WorkloadEndpoint in the Kubernetes datastore needs spec.ipNetworks")
    return {"metadata": {"annotations": {
        ANN_POD_IP: nets[0],
        ANN_POD_IPS: ",".join(nets),
        ANN_CONTAINER_ID: spec.get("containerID") or None,
    }}}


WEP_REMOVE_PATCH: dict[str, Any] = {"metadata": {"annotations": {a: None for a in WEP_ANNOTATIONS}}}


# --------------------------------------------------------------------------------------------
# Namespaces -> Profiles, NetworkPolicies -> Calico NetworkPolicies
# --------------------------------------------------------------------------------------------

# Namespace annotations the CNI plugin acts on (ipv4pools, ipFamilies); only these are carried to
# the Profile, so that large unrelated annotations (last-applied-configuration) stay out of it.
CNI_ANNOTATION_PREFIX = "cni.projectcalico.org/"


def profile_value(obj: dict[str, Any]) -> dict[str, Any]:
    meta = _meta(obj)
    ns = meta.get("name", "")
    labels = {f"pcns.{k}": v for k, v in (meta.get("labels") or {}).items()}
    labels["pcns.projectcalico.org/name"] = ns
    metadata: dict[str, Any] = {"name": PROFILE_PREFIX + ns}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k.startswith(CNI_ANNOTATION_PREFIX)}
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": CALICO_API_VERSION,
        "kind": "Profile",
        "metadata": metadata,
        "spec": {"ingress": [{"action": "Allow"}], "egress": [{"action": "Allow"}], "labelsToApply": labels},
    }


def _namespace_convert(obj: dict[str, Any]) -> Converted | None:
    return keys.resource_key("profiles", PROFILE_PREFIX + _meta(obj).get("name", "")), profile_value(obj)


def sa_profile_name(namespace: str, account: str) -> str:
    return f"{SA_PROFILE_PREFIX}{namespace}.{account}"


def sa_profile_value(obj: dict[str, Any]) -> dict[str, Any]:
    """The ksa.<ns>.<sa> Profile of a ServiceAccount, as libcalico-go's KDD exposes it: no rules
    (the namespace profile carries the allow-all), its labels as pcsa.<key> plus
    pcsa.projectcalico.org/name."""
    meta = _meta(obj)
    labels = {f"pcsa.{k}": v for k, v in (meta.get("labels") or {}).items()}
    labels["pcsa.projectcalico.org/name"] = meta.get("name", "")
    return {
        "apiVersion": CALICO_API_VERSION,
        "kind": "Profile",
        "metadata": {"name": sa_profile_name(meta.get("namespace", ""), meta.get("name", ""))},
        "spec": {"labelsToApply": labels},
    }


def _sa_convert(obj: dict[str, Any]) -> Converted | None:
    meta = _meta(obj)
    if not meta.get("name") or not meta.get("namespace"):
        return None
    return keys.resource_key("profiles", sa_profile_name(meta["namespace"], meta["name"])), sa_profile_value(obj)


def _k8s_np_key(obj: dict[str, Any]) -> str | None:
    meta = _meta(obj)
    if not meta.get("name"):
        return None
    return keys.resource_key("networkpolicies", K8S_NP_PREFIX + meta["name"], meta.get("namespace") or "default")


def _k8s_np_convert(obj: dict[str, Any]) -> Converted | None:
    from policy.k8s import convert_k8s_networkpolicy

    key = _k8s_np_key(obj)
    if key is None:
        return None
    full = dict(obj)
    full.setdefault("apiVersion", "networking.k8s.io/v1")
    full.setdefault("kind", "NetworkPolicy")
    try:
        return key, convert_k8s_networkpolicy(full)
    except ValueError:
        # The API server validated it; a policy we cannot express is dropped (Calico reports
        # unconvertible rules the same way). kube.py logs it once per resourceVersion.
        return None


# --------------------------------------------------------------------------------------------
# Services and EndpointSlices (BGP service advertisement), read-only
# --------------------------------------------------------------------------------------------

SERVICE_PLURAL = "kubernetesservices"
ENDPOINT_SLICE_PLURAL = "kubernetesendpointslices"


def service_value(obj: dict[str, Any]) -> dict[str, Any]:
    """A Service as the BGP controller reads it (bgp.services.ServiceInfo): only the fields that
    decide its advertisement, so that nothing else about it is stored or watched for."""
    meta, spec = _meta(obj), obj.get("spec") or {}
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    kept = {k: spec[k] for k in ("type", "clusterIP", "clusterIPs", "externalIPs", "externalTrafficPolicy")
            if spec.get(k) not in (None, "", [])}
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": meta.get("name", ""), "namespace": meta.get("namespace", "")},
            "spec": kept,
            "status": {"loadBalancer": {"ingress": [{"ip": i["ip"]} for i in ingress
                                                    if isinstance(i, dict) and i.get("ip")]}}}


def endpoint_slice_value(obj: dict[str, Any]) -> dict[str, Any]:
    """An EndpointSlice as the BGP controller reads it: its Service, and each endpoint's
    addresses, node and readiness."""
    meta = _meta(obj)
    service = (meta.get("labels") or {}).get("kubernetes.io/service-name")
    endpoints = []
    for endpoint in obj.get("endpoints") or []:
        if not isinstance(endpoint, dict):
            continue
        kept: dict[str, Any] = {"addresses": list(endpoint.get("addresses") or [])}
        if endpoint.get("nodeName"):
            kept["nodeName"] = endpoint["nodeName"]
        ready = (endpoint.get("conditions") or {}).get("ready")
        if ready is not None:
            kept["conditions"] = {"ready": bool(ready)}
        endpoints.append(kept)
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": meta.get("name", ""), "namespace": meta.get("namespace", ""),
                         "labels": {"kubernetes.io/service-name": service} if service else {}},
            "addressType": obj.get("addressType", "IPv4"), "endpoints": endpoints}


def _namespaced_key(plural: str) -> Callable[[dict[str, Any]], str | None]:
    def key_of(obj: dict[str, Any]) -> str | None:
        meta = _meta(obj)
        if not meta.get("name") or not meta.get("namespace"):
            return None
        return keys.resource_key(plural, meta["name"], meta["namespace"])
    return key_of


def _service_convert(obj: dict[str, Any]) -> Converted | None:
    key = _namespaced_key(SERVICE_PLURAL)(obj)
    return None if key is None else (key, service_value(obj))


def _endpoint_slice_convert(obj: dict[str, Any]) -> Converted | None:
    key = _namespaced_key(ENDPOINT_SLICE_PLURAL)(obj)
    return None if key is None else (key, endpoint_slice_value(obj))


# --------------------------------------------------------------------------------------------
# The kinds, and where a key lives
# --------------------------------------------------------------------------------------------

def _resource_kind(plural: str) -> Kind:
    convert = _resource_convert(plural)
    return Kind(
        id=f"crd/{plural}", api=CRD_API, resource=plural, namespaced=CRD_RESOURCES[plural][1],
        key_prefix=keys.resource_prefix(plural), convert=convert,
        key_of=lambda obj: (convert(obj) or ("", None))[0] or None,
    )


def _simple(kid: str, api: str, resource: str, namespaced: bool, prefix: str,
            convert: Callable[[dict[str, Any]], Converted | None], *, writable: bool = True,
            derived: bool = False, key_of: Callable[[dict[str, Any]], str | None] | None = None) -> Kind:
    return Kind(id=kid, api=api, resource=resource, namespaced=namespaced, key_prefix=prefix, convert=convert,
                key_of=key_of or (lambda obj: (convert(obj) or ("", None))[0] or None),
                writable=writable, derived=derived)


RESOURCE_KINDS = {plural: _resource_kind(plural) for plural in CRD_RESOURCES}
BLOCKS = _simple("crd/ipamblocks", CRD_API, "ipamblocks", False, keys.BLOCKS, _block_convert)
AFFINITIES = _simple("crd/blockaffinities", CRD_API, "blockaffinities", False, keys.HOSTS, _affinity_convert)
HANDLES = _simple("crd/ipamhandles", CRD_API, "ipamhandles", False, keys.HANDLES, _handle_convert)
IPAM_CONFIG = _simple("crd/ipamconfigs", CRD_API, "ipamconfigs", False, keys.IPAM_CONFIG, _ipam_config_convert)
NODES = _simple("core/nodes", CORE_API, "nodes", False, keys.resource_prefix("nodes"), _node_convert, derived=True)
PODS = _simple("core/pods", CORE_API, "pods", True, keys.resource_prefix("workloadendpoints"), _pod_convert,
               derived=True, key_of=_pod_key)
NAMESPACES = _simple("core/namespaces", CORE_API, "namespaces", False, keys.resource_prefix("profiles"),
                     _namespace_convert, writable=False, derived=True)
SERVICE_ACCOUNTS = _simple("core/serviceaccounts", CORE_API, "serviceaccounts", True, keys.resource_prefix("profiles"),
                           _sa_convert, writable=False, derived=True)
K8S_NETWORK_POLICIES = _simple("networking/networkpolicies", NETWORKING_API, "networkpolicies", True,
                               keys.resource_prefix("networkpolicies"), _k8s_np_convert, writable=False,
                               derived=True, key_of=_k8s_np_key)
# derived: a Service or EndpointSlice carries more than the fields kept, and changes to the rest
# are no-ops for us.
SERVICES = _simple("core/services", CORE_API, "services", True, keys.resource_prefix(SERVICE_PLURAL),
                   _service_convert, writable=False, derived=True, key_of=_namespaced_key(SERVICE_PLURAL))
ENDPOINT_SLICES = _simple("discovery/endpointslices", DISCOVERY_API, "endpointslices", True,
                          keys.resource_prefix(ENDPOINT_SLICE_PLURAL), _endpoint_slice_convert, writable=False,
                          derived=True, key_of=_namespaced_key(ENDPOINT_SLICE_PLURAL))

ALL_KINDS: tuple[Kind, ...] = (
    *RESOURCE_KINDS.values(), BLOCKS, AFFINITIES, HANDLES, IPAM_CONFIG, NODES, PODS, NAMESPACES,
    K8S_NETWORK_POLICIES, SERVICE_ACCOUNTS, SERVICES, ENDPOINT_SLICES,
)


def kinds_for_prefix(prefix: str) -> list[Kind]:
    return [k for k in ALL_KINDS if k.overlaps(prefix)]


@dataclass(frozen=True, slots=True)
class Location:
    """Where a key is stored: the kind, the object's namespace and name, and what the key says."""

    kind: Kind
    name: str
    namespace: str | None
    parsed: keys.ParsedKey


def locate(key: str) -> Location:
    parsed = keys.parse_key(key)
    if parsed.kind == "resource":
        if parsed.plural in RESOURCE_KINDS:
            namespaced = CRD_RESOURCES[parsed.plural][1]
            if namespaced != (parsed.namespace is not None):
                raise MappingError(f"{key}: wrong key shape for {parsed.plural}")
            if parsed.plural == "networkpolicies" and parsed.name.startswith(K8S_NP_PREFIX):
                return Location(K8S_NETWORK_POLICIES, parsed.name[len(K8S_NP_PREFIX):], parsed.namespace, parsed)
            return Location(RESOURCE_KINDS[parsed.plural], parsed.name, parsed.namespace, parsed)
        if parsed.plural == "nodes" and parsed.namespace is None:
            return Location(NODES, parsed.name, None, parsed)
        if parsed.plural == "workloadendpoints" and parsed.namespace is not None:
            wep = names.parse_workload_endpoint_name(parsed.name)
            if wep is None or wep[1] != "k8s":
                raise MappingError(f"{key}: not a Kubernetes pod's WorkloadEndpoint name (<node>-k8s-<pod>-eth0)")
            return Location(PODS, wep[2], parsed.namespace, parsed)
        if parsed.plural == "profiles" and parsed.namespace is None and parsed.name.startswith(PROFILE_PREFIX):
            return Location(NAMESPACES, parsed.name[len(PROFILE_PREFIX):], None, parsed)
        if parsed.plural == "profiles" and parsed.namespace is None and parsed.name.startswith(SA_PROFILE_PREFIX):
            namespace, dot, account = parsed.name[len(SA_PROFILE_PREFIX):].partition(".")
            if dot and namespace and account:
                return Location(SERVICE_ACCOUNTS, account, namespace, parsed)
        if parsed.plural == SERVICE_PLURAL and parsed.namespace is not None:
            return Location(SERVICES, parsed.name, parsed.namespace, parsed)
        if parsed.plural == ENDPOINT_SLICE_PLURAL and parsed.namespace is not None:
            return Location(ENDPOINT_SLICES, parsed.name, parsed.namespace, parsed)
    elif parsed.kind == "block":
        return Location(BLOCKS, cidr_to_name(parsed.name), None, parsed)
    elif parsed.kind == "affinity":
        return Location(AFFINITIES, affinity_name(parsed.node, parsed.name), None, parsed)
    elif parsed.kind == "handle":
        return Location(HANDLES, handle_name(parsed.name), None, parsed)
    elif parsed.kind == "ipamconfig":
        return Location(IPAM_CONFIG, "default", None, parsed)
    raise MappingError(f"{key}: the Kubernetes datastore has no place for this key")


def object_for(loc: Location, value: Any) -> dict[str, Any]:
    """The API object a CRD-backed key is written as."""
    p = loc.parsed
    if loc.kind is BLOCKS:
        return block_object(p.name, value)
    if loc.kind is AFFINITIES:
        return affinity_object(p.node, p.name, value)
    if loc.kind is HANDLES:
        return handle_object(p.name, value)
    if loc.kind is IPAM_CONFIG:
        return ipam_config_object(value)
    return resource_object(p.plural, p.name, p.namespace, value)
