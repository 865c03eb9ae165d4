"""Every kernel name, prefix, mark and limit felixpy uses, built and length-checked in one place,
and the datastore names derived from a pod (its WorkloadEndpoint, its IPAM handle).

Everything felixpy creates in the kernel carries one of these marks, and only marked objects are
ever removed: routes carry ROUTE_PROTO, iptables chains start with CHAIN_PREFIX, ipsets with
IPSET_PREFIX, and every rule we write carries a hash comment starting with RULE_HASH_PREFIX.
"""

from __future__ import annotations

import hashlib
import re

# Re-exported, so that every kernel name is reachable from this one module.
from policy.names import CHAIN_PREFIX as CHAIN_PREFIX
from policy.names import IPSET_PREFIX as IPSET_PREFIX
from policy.names import IPSET_PREFIX_V6 as IPSET_PREFIX_V6
from policy.names import MAX_CHAIN_NAME as MAX_CHAIN_NAME
from policy.names import MAX_IPSET_NAME as MAX_IPSET_NAME
from policy.names import RULE_HASH_PREFIX as RULE_HASH_PREFIX
from policy.names import check_chain_name as check_chain_name
from policy.names import check_ipset_name as check_ipset_name

IFNAMSIZ = 15  # usable characters of a Linux interface name (IFNAMSIZ 16 with the NUL)

# Calico's Felix uses proto 80 for the routes it owns besides workload routes (which use 3, "boot",
# shared with other software). felixpy uses 80 for every route it programs, workload routes included,
# so that "ours" is never ambiguous: the route driver only ever deletes routes carrying this number.
ROUTE_PROTO = 80

WORKLOAD_IFACE_PREFIX = "cali"
VXLAN_DEVICE = "vxlan.calico"
VXLAN_V6_DEVICE = "vxlan-v6.calico"  # Felix's: same VNI and port as vxlan.calico, over the node's IPv6 address
VXLAN_VNI = 4096
VXLAN_PORT = 4789
IPIP_DEVICE = "tunl0"


# The pod's default gateway: never configured anywhere, the host side answers ARP for it (proxy_arp).
POD_GATEWAY = "169.254.1.1"
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"
# The pod's IPv6 default gateway: the host veth's own link-local address, which the kernel derives
# (EUI-64) from HOST_VETH_MAC, so every pod's is the same (Calico's CNI plugin routes via it).
POD_GATEWAY_V6 = "fe80::ecee:eeff:feee:eeee"

DEFAULT_NETWORK_NAME = "k8s-pod-network"
DEFAULT_POD_IFACE = "eth0"


def workload_iface_name(namespace: str, pod: str, prefix: str = WORKLOAD_IFACE_PREFIX) -> str:
    """Host-side veth of a pod: prefix + the first 11 hex chars of sha1("<namespace>.<pod>")."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    name = prefix + digest[: IFNAMSIZ - len(prefix)]
    return check_iface_name(name)


def check_iface_name(name: str) -> str:
    if not name or len(name) > IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ} characters")
    return name


# The Profiles that stand for Kubernetes Namespaces and ServiceAccounts, as Calico's
# kube-controllers (etcd) and libcalico-go's KDD conversion (Kubernetes) name them.
NAMESPACE_PROFILE_PREFIX = "kns."
SERVICE_ACCOUNT_PROFILE_PREFIX = "ksa."


def namespace_profile(namespace: str) -> str:
    return f"{NAMESPACE_PROFILE_PREFIX}{namespace}"


def service_account_profile(namespace: str, account: str) -> str:
    return f"{SERVICE_ACCOUNT_PROFILE_PREFIX}{namespace}.{account}"


def ipam_handle(container_id: str, network: str = DEFAULT_NETWORK_NAME) -> str:
    """IPAM handle of a pod's allocation, as Calico's CNI plugin names it."""
    return f"{network}.{container_id}"


def tunnel_handle(kind: str, node: str) -> str:
    """IPAM handle of a node's tunnel address: kind is "ipip", "vxlan" or "vxlan-v6"."""
    return f"{kind}-tunnel-addr-{node}"


def workload_endpoint_name(node: str, pod: str, endpoint: str = DEFAULT_POD_IFACE,
                           orchestrator: str = "k8s") -> str:
    """Calico's WorkloadEndpoint name `<node>-k8s-<pod>-<endpoint>`, each '-' inside a part doubled.

    endpoint is the interface name inside the pod (CNI_IFNAME). The CNI plugin, the Kubernetes
    datastore mapping and the lab all name endpoints with this, so they always agree.
    """
    return "-".join(part.replace("-", "--") for part in (node, orchestrator, pod, endpoint))


def parse_workload_endpoint_name(name: str) -> tuple[str, str, str, str] | None:
    """(node, orchestrator, pod, endpoint) of a WorkloadEndpoint name, or None."""
    parts = re.split(r"(?<!-)-(?!-)", name)
    # A single '-' separates parts; '--' is an escaped '-'. A run of three or more dashes (a part
    # that starts or ends with '-') is ambiguous and never split, so such a name is refused:
    # Kubernetes node and pod names cannot start or end with '-', so no real endpoint has one.
    if len(parts) != 4:
        return None
    node, orchestrator, pod, endpoint = (p.replace("--", "-") for p in parts)
    return node, orchestrator, pod, endpoint
