"""IP pools as IPAM sees them: parsing, which pools may serve a request, and a node's block order.

Which pools an automatic assignment may use (libcalico-go's determinePools, then its filter by use):

* pools the request names (CNI `ipam.ipv4_pools`, or the `cni.projectcalico.org/ipv4pools` pod or
  namespace annotation), by name or CIDR: each must exist and be enabled; as in Calico, their
  node and namespace selectors and assignmentMode are not consulted;
* otherwise every enabled pool with assignmentMode Automatic whose nodeSelector selects the node
  and whose namespaceSelector selects the pod's namespace (both must match; a request without a
  namespace, like a tunnel address, is matched against no labels);
* of those, only pools whose allowedUses include the request's use (`Workload` for pods, `Tunnel`
  for tunnel addresses; Calico's default is both). A `[LoadBalancer]` pool never serves either.

Each request is for one IP family (Calico's AutoAssign takes IPv4 and IPv6 counts and resolves the
pools of each family apart): only that family's pools are considered, and a requested pool of the
other family is skipped, as libcalico-go's determinePools sorts them into v4 and v6 lists.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

from felixpy.datastore import keys
from felixpy.datastore.api import KV, Datastore
from felixpy.ipam.errors import NoQualifiedPoolError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_BLOCK_SIZE = 26
DEFAULT_BLOCK_SIZE_V6 = 122  # Calico's: 64 addresses, as a /26 holds

USE_WORKLOAD = "Workload"
USE_TUNNEL = "Tunnel"
USE_LOAD_BALANCER = "LoadBalancer"
DEFAULT_ALLOWED_USES = frozenset({USE_WORKLOAD, USE_TUNNEL})


@dataclass(frozen=True, slots=True)
class Pool:
    """The parts of a projectcalico.org/v3 IPPool that IPAM needs."""

    name: str
    cidr: IPNetwork
    block_size: int = DEFAULT_BLOCK_SIZE
    disabled: bool = False
    node_selector: str = ""
    manual: bool = False  # assignmentMode: Manual pools only serve explicit requests
    namespace_selector: str = ""
    allowed_uses: frozenset[str] = DEFAULT_ALLOWED_USES

    @property
    def version(self) -> int:
        return self.cidr.version

    @property
    def block_count(self) -> int:
        return 1 << (self.block_size - self.cidr.prefixlen)

    def block_cidr(self, index: int) -> IPNetwork:
        step = 1 << (self.cidr.max_prefixlen - self.block_size)
        return ipaddress.ip_network((self.cidr.network_address + index * step, self.block_size))

    def block_for(self, ip: IPAddress) -> IPNetwork:
        return ipaddress.ip_network((ip, self.block_size), strict=False)

    def selects(self, labels: Mapping[str, str]) -> bool:
        return selector_matches(self.node_selector, labels)

    def selects_namespace(self, labels: Mapping[str, str]) -> bool:
        return selector_matches(self.namespace_selector, labels, what="namespaceSelector")

    def allows(self, use: str) -> bool:
        return use in self.allowed_uses


def parse_pool(resource: Mapping[str, Any]) -> Pool | None:
    """A Pool from an IPPool resource (either family); None for a malformed pool (logged)."""
    name = str((resource.get("metadata") or {}).get("name", ""))
    spec = resource.get("spec") or {}
    try:
        net = ipaddress.ip_network(str(spec.get("cidr", "")), strict=False)
    except ValueError:
        log.warning("ignoring IP pool with invalid cidr pool=%s cidr=%s", name, spec.get("cidr"))
        return None
    default = DEFAULT_BLOCK_SIZE if net.version == 4 else DEFAULT_BLOCK_SIZE_V6
    block_size = int(spec.get("blockSize") or default)
    if not net.prefixlen <= block_size <= net.max_prefixlen:
        log.warning("ignoring IP pool with invalid blockSize pool=%s blockSize=%s", name, block_size)
        return None
    return Pool(
        name=name,
        cidr=net,
        block_size=block_size,
        disabled=bool(spec.get("disabled", False)),
        node_selector=str(spec.get("nodeSelector") or ""),
        manual=spec.get("assignmentMode") == "Manual",
        namespace_selector=str(spec.get("namespaceSelector") or ""),
        allowed_uses=frozenset(str(u) for u in spec.get("allowedUses") or DEFAULT_ALLOWED_USES),
    )


def list_pools(store: Datastore) -> list[Pool]:
    kvs, _ = store.list(keys.resource_prefix("ippools"))
    return [p for p in (parse_pool(kv.value) for kv in kvs) if p is not None]


def selector_matches(selector: str, labels: Mapping[str, str], *, what: str = "nodeSelector") -> bool:
    text = selector.strip()
    if text in ("", "all()"):
        return True
    try:
        from policy.selectors import parse  # imported lazily: policy/ must not be needed otherwise
    except ImportError:
        raise NoQualifiedPoolError(f"cannot evaluate {what} {text!r}: policy.selectors is unavailable") from None
    try:
        return bool(parse(text).evaluate(dict(labels)))
    except Exception as err:  # a bad selector disqualifies the pool, it must not break allocation
        log.warning("invalid pool %s selector=%r error=%s", what, text, err)
        return False


def _trivial(selector: str) -> bool:
    return selector.strip() in ("", "all()")


def resolve_pools(
    all_pools: Sequence[Pool], requested: Sequence[str] | None, node: str,
    node_labels: Callable[[], Mapping[str, str]], *, use: str = USE_WORKLOAD,
    namespace: str | None = None, namespace_labels: Callable[[], Mapping[str, str]] | None = None,
    version: int = 4,
) -> list[Pool]:
    """The pools of IP family `version` a request may use, in order (see the module docstring).

    node_labels and namespace_labels are called only if a selector needs them; a request without
    namespace_labels (a tunnel address) is matched against no namespace labels, as in Calico.
    """
    if requested:
        chosen: list[Pool] = []
        for want in requested:
            # libcalico-go looks requested pools up among the enabled pools of the request's
            # family: a pool of the other family is as good as missing.
            match = [p for p in all_pools if want in (p.name, str(p.cidr)) and p.version == version]
            if not match or match[0].disabled:
                raise NoQualifiedPoolError(
                    f"the requested pool {want} does not exist or is not an enabled IPv{version} pool")
            if match[0] not in chosen:
                chosen.append(match[0])
        return _by_use(chosen, use, f"of the requested pools [{', '.join(requested)}]")
    all_pools = [p for p in all_pools if p.version == version]

    node_cache: list[Mapping[str, str]] = []
    ns_cache: list[Mapping[str, str]] = []

    def selects_node(pool: Pool) -> bool:
        if _trivial(pool.node_selector):
            return True
        if not node_cache:
            node_cache.append(node_labels())
        return pool.selects(node_cache[0])

    def selects_namespace(pool: Pool) -> bool:
        if _trivial(pool.namespace_selector):
            return True
        if not ns_cache:
            ns_cache.append(namespace_labels() if namespace_labels is not None else {})
        return pool.selects_namespace(ns_cache[0])

    chosen = [p for p in all_pools if not p.disabled and not p.manual and selects_node(p) and selects_namespace(p)]
    if not chosen:
        where = f" and namespace {namespace}" if namespace else ""
        raise NoQualifiedPoolError(f"no enabled IPv{version} pool selects node {node}{where}")
    return _by_use(chosen, use, f"of the pools selecting node {node}")


def _by_use(pools: list[Pool], use: str, which: str) -> list[Pool]:
    allowed = [p for p in pools if p.allows(use)]
    if not allowed:
        names = ", ".join(f"{p.name} {sorted(p.allowed_uses)}" for p in pools)
        raise NoQualifiedPoolError(f"none {which} allows use {use} (allowedUses: {names})")
    return allowed


def seeded_block_order(pool: Pool, node: str) -> Iterator[IPNetwork]:
    """The pool's block CIDRs from a start point derived from the node name, wrapping round.

    Nodes start their search for a free block at different places, so they spread over the pool
    instead of racing for the same first block.
    """
    count = pool.block_count
    seed = int.from_bytes(hashlib.sha256(f"{node}/{pool.cidr}".encode()).digest()[:8], "big")
    start = random.Random(seed).randrange(count)
    for i in range(count):
        yield pool.block_cidr((start + i) % count)


def block_of(addr: IPAddress, pools: Sequence[Pool], blocks: Sequence[KV] | None) -> str | None:
    """The block CIDR addr belongs to: from its pool, else (a deleted pool) from the listed blocks."""
    for pool in pools:
        if addr in pool.cidr:
            return str(pool.block_for(addr))
    for kv in blocks or []:
        cidr = keys.parse_key(kv.key).name
        if addr in ipaddress.ip_network(cidr):
            return cidr
    return None
