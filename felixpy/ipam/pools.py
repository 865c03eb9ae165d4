"""IP pools as IPAM sees them: parsing, which pools may serve a node, and a node's block order.

A pool serves automatic assignment when it is enabled, not assignmentMode Manual, and its
nodeSelector selects the node; a request naming pools may use Manual pools but still only
enabled ones that select the node (Calico's rules). Only IPv4 pools are used.
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

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DEFAULT_BLOCK_SIZE = 26


@dataclass(frozen=True, slots=True)
class Pool:
    """The parts of a projectcalico.org/v3 IPPool that IPAM needs."""

    name: str
    cidr: IPv4Network
    block_size: int = DEFAULT_BLOCK_SIZE
    disabled: bool = False
    node_selector: str = ""
    manual: bool = False  # assignmentMode: Manual pools only serve explicit requests

    @property
    def block_count(self) -> int:
        return 1 << (self.block_size - self.cidr.prefixlen)

    def block_cidr(self, index: int) -> IPv4Network:
        step = 1 << (32 - self.block_size)
        return IPv4Network((int(self.cidr.network_address) + index * step, self.block_size))

    def block_for(self, ip: IPv4Address) -> IPv4Network:
        return IPv4Network((int(ip) >> (32 - self.block_size) << (32 - self.block_size), self.block_size))

    def selects(self, labels: Mapping[str, str]) -> bool:
        return selector_matches(self.node_selector, labels)


def parse_pool(resource: Mapping[str, Any]) -> Pool | None:
    """An IPv4 Pool from an IPPool resource; None for IPv6 or malformed pools (logged)."""
    name = str((resource.get("metadata") or {}).get("name", ""))
    spec = resource.get("spec") or {}
    try:
        net = ipaddress.ip_network(str(spec.get("cidr", "")), strict=False)
    except ValueError:
        log.warning("ignoring IP pool with invalid cidr pool=%s cidr=%s", name, spec.get("cidr"))
        return None
    if not isinstance(net, IPv4Network):
        return None
    block_size = int(spec.get("blockSize") or DEFAULT_BLOCK_SIZE)
    if not net.prefixlen <= block_size <= 32:
        log.warning("ignoring IP pool with invalid blockSize pool=%s blockSize=%s", name, block_size)
        return None
    return Pool(
        name=name,
        cidr=net,
        block_size=block_size,
        disabled=bool(spec.get("disabled", False)),
        node_selector=str(spec.get("nodeSelector") or ""),
        manual=spec.get("assignmentMode") == "Manual",
    )


def list_pools(store: Datastore) -> list[Pool]:
    kvs, _ = store.list(keys.resource_prefix("ippools"))
    return [p for p in (parse_pool(kv.value) for kv in kvs) if p is not None]


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    text = selector.strip()
    if text in ("", "all()"):
        return True
    try:
        from policy.selectors import parse  # imported lazily: policy/ must not be needed otherwise
    except ImportError:
        raise NoQualifiedPoolError(f"cannot evaluate nodeSelector {text!r}: policy.selectors is unavailable") from None
    try:
        return bool(parse(text).evaluate(dict(labels)))
    except Exception as err:  # a bad selector disqualifies the pool, it must not break allocation
        log.warning("invalid pool nodeSelector selector=%r error=%s", text, err)
        return False


def resolve_pools(
    all_pools: Sequence[Pool], requested: Sequence[str] | None, node: str,
    node_labels: Callable[[], Mapping[str, str]],
) -> list[Pool]:
    """The pools a request may use, in order; node_labels is called only if a selector needs them."""
    labels_cache: list[Mapping[str, str]] = []

    def selected(pool: Pool) -> bool:
        if pool.node_selector.strip() in ("", "all()"):
            return True
        if not labels_cache:
            labels_cache.append(node_labels())
        return pool.selects(labels_cache[0])

    if requested:
        chosen: list[Pool] = []
        for want in requested:
            match = [p for p in all_pools if want in (p.name, str(p.cidr))]
            if not match or match[0].disabled:
                raise NoQualifiedPoolError(f"the requested pool {want} does not exist or is not enabled")
            if not selected(match[0]):
                raise NoQualifiedPoolError(f"the requested pool {want} does not select node {node}")
            chosen.append(match[0])
        return chosen
    chosen = [p for p in all_pools if not p.disabled and not p.manual and selected(p)]
    if not chosen:
        raise NoQualifiedPoolError(f"no enabled IPv4 pool selects node {node}")
    return chosen


def seeded_block_order(pool: Pool, node: str) -> Iterator[IPv4Network]:
    """The pool's block CIDRs from a start point derived from the node name, wrapping round.

    Nodes start their search for a free block at different places, so they spread over the pool
    instead of racing for the same first block.
    """
    count = pool.block_count
    seed = int.from_bytes(hashlib.sha256(f"{node}/{pool.cidr}".encode()).digest()[:8], "big")
    start = random.Random(seed).randrange(count)
    for i in range(count):
        yield pool.block_cidr((start + i) % count)


def block_of(addr: IPv4Address, pools: Sequence[Pool], blocks: Sequence[KV] | None) -> str | None:
    """The block CIDR addr belongs to: from its pool, else (a deleted pool) from the listed blocks."""
    for pool in pools:
        if addr in pool.cidr:
            return str(pool.block_for(addr))
    for kv in blocks or []:
        cidr = keys.parse_key(kv.key).name
        if addr in IPv4Network(cidr):
            return cidr
    return None
