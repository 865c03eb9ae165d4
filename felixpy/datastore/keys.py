"""Datastore key layout, the same paths Calico uses in etcd v3.

    /calico/resources/v3/projectcalico.org/<plural>/<name>               cluster-scoped resources
    /calico/resources/v3/projectcalico.org/<plural>/<namespace>/<name>   namespaced resources
    /calico/ipam/v2/assignment/ipv4/block/10.0.1.0-26                    IPAM block
    /calico/ipam/v2/assignment/ipv6/block/fd00:10:244::-122              IPAM block (IPv6)
    /calico/ipam/v2/host/<node>/ipv4/block/10.0.1.0-26                   block affinity
    /calico/ipam/v2/host/<node>/ipv6/block/fd00:10:244::-122             block affinity (IPv6)
    /calico/ipam/v2/handle/<handle id>                                   IPAM handle
    /calico/ipam/v2/config                                               IPAM configuration
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

ROOT = "/calico/"
RESOURCES = "/calico/resources/v3/projectcalico.org/"
IPAM = "/calico/ipam/v2/"
BLOCKS = IPAM + "assignment/"
HOSTS = IPAM + "host/"
HANDLES = IPAM + "handle/"
IPAM_CONFIG = IPAM + "config"


def _version(cidr: str) -> int:
    return ipaddress.ip_network(cidr).version


def cidr_to_key_part(cidr: str) -> str:
    return cidr.replace("/", "-")


def key_part_to_cidr(part: str) -> str:
    addr, _, prefix = part.rpartition("-")
    return f"{addr}/{prefix}"


def resource_prefix(plural: str, namespace: str | None = None) -> str:
    if namespace is None:
        return f"{RESOURCES}{plural}/"
    return f"{RESOURCES}{plural}/{namespace}/"


def resource_key(plural: str, name: str, namespace: str | None = None) -> str:
    return resource_prefix(plural, namespace) + name


def block_key(cidr: str) -> str:
    return f"{BLOCKS}ipv{_version(cidr)}/block/{cidr_to_key_part(cidr)}"


def block_prefix(version: int = 4) -> str:
    return f"{BLOCKS}ipv{version}/block/"


def affinity_key(node: str, cidr: str) -> str:
    return f"{HOSTS}{node}/ipv{_version(cidr)}/block/{cidr_to_key_part(cidr)}"


def host_affinity_prefix(node: str, version: int = 4) -> str:
    return f"{HOSTS}{node}/ipv{version}/block/"


def host_prefix(node: str) -> str:
    """Every affinity of a node, both families."""
    return f"{HOSTS}{node}/"


def handle_key(handle_id: str) -> str:
    return HANDLES + handle_id


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """What a key names. kind is one of: resource, block, affinity, handle, ipamconfig, unknown."""

    kind: str
    plural: str = ""
    namespace: str | None = None
    name: str = ""  # resource name, block/affinity CIDR, or handle id
    node: str = ""  # affinity only


def parse_key(key: str) -> ParsedKey:
    if key.startswith(RESOURCES):
        parts = key[len(RESOURCES):].split("/")
        if len(parts) == 2:
            return ParsedKey("resource", plural=parts[0], name=parts[1])
        if len(parts) == 3:
            return ParsedKey("resource", plural=parts[0], namespace=parts[1], name=parts[2])
    elif key.startswith(BLOCKS):
        parts = key[len(BLOCKS):].split("/")
        if len(parts) == 3 and parts[1] == "block":
            return ParsedKey("block", name=key_part_to_cidr(parts[2]))
    elif key.startswith(HOSTS):
        parts = key[len(HOSTS):].split("/")
        if len(parts) == 4 and parts[2] == "block":
            return ParsedKey("affinity", node=parts[0], name=key_part_to_cidr(parts[3]))
    elif key.startswith(HANDLES):
        return ParsedKey("handle", name=key[len(HANDLES):])
    elif key == IPAM_CONFIG:
        return ParsedKey("ipamconfig")
    return ParsedKey("unknown")
