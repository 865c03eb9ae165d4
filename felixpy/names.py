"""Every kernel name, prefix, mark and limit felixpy uses, built and length-checked in one place.

Everything felixpy creates in the kernel carries one of these marks, and only marked objects are
ever removed: routes carry ROUTE_PROTO, iptables chains start with CHAIN_PREFIX, ipsets with
IPSET_PREFIX, and every rule we write carries a hash comment starting with RULE_HASH_PREFIX.
"""

from __future__ import annotations

import hashlib

IFNAMSIZ = 15  # usable characters of a Linux interface name (IFNAMSIZ 16 with the NUL)
MAX_CHAIN_NAME = 28  # iptables allows 28 usable characters
MAX_IPSET_NAME = 31

# Calico's Felix uses proto 80 for the routes it owns besides workload routes (which use 3, "boot",
# shared with other software). felixpy uses 80 for every route it programs, workload routes included,
# so that "ours" is never ambiguous: the route driver only ever deletes routes carrying this number.
ROUTE_PROTO = 80

WORKLOAD_IFACE_PREFIX = "cali"
VXLAN_DEVICE = "vxlan.calico"
VXLAN_VNI = 4096
VXLAN_PORT = 4789
IPIP_DEVICE = "tunl0"

CHAIN_PREFIX = "cali-"
IPSET_PREFIX = "cali40"
RULE_HASH_PREFIX = "cali:"

# The pod's default gateway: never configured anywhere, the host side answers ARP for it (proxy_arp).
POD_GATEWAY = "169.254.1.1"
HOST_VETH_MAC = "ee:ee:ee:ee:ee:ee"

DEFAULT_NETWORK_NAME = "k8s-pod-network"


def workload_iface_name(namespace: str, pod: str, prefix: str = WORKLOAD_IFACE_PREFIX) -> str:
    """Host-side veth of a pod: prefix + the first 11 hex chars of sha1("<namespace>.<pod>")."""
    digest = hashlib.sha1(f"{namespace}.{pod}".encode()).hexdigest()
    name = prefix + digest[: IFNAMSIZ - len(prefix)]
    return check_iface_name(name)


def check_iface_name(name: str) -> str:
    if not name or len(name) > IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must be 1..{IFNAMSIZ} characters")
    return name


def check_chain_name(name: str) -> str:
    if not name or len(name) > MAX_CHAIN_NAME:
        raise ValueError(f"chain name {name!r} must be 1..{MAX_CHAIN_NAME} characters")
    return name


def check_ipset_name(name: str) -> str:
    if not name or len(name) > MAX_IPSET_NAME:
        raise ValueError(f"ipset name {name!r} must be 1..{MAX_IPSET_NAME} characters")
    return name


def ipam_handle(container_id: str, network: str = DEFAULT_NETWORK_NAME) -> str:
    """IPAM handle of a pod's allocation, as Calico's CNI plugin names it."""
    return f"{network}.{container_id}"


def tunnel_handle(kind: str, node: str) -> str:
    """IPAM handle of a node's tunnel address: kind is "ipip" or "vxlan"."""
    return f"{kind}-tunnel-addr-{node}"
