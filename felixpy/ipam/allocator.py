"""Calico-style block IPAM on the datastore: every write is create-only or a compare-and-swap.

The algorithm is libcalico-go's (calico-reference.md §2):

* A node allocates from blocks it has a *confirmed* affinity to
  (/calico/ipam/v2/host/<node>/ipv4/block/<cidr>). An affinity without its block is crash debris
  of a claim and the block is recreated.
* When those are full it claims a new block, in two phases so that a crash never leaves a block
  nobody owns: affinity `pending` -> create the block (create-only: exactly one node wins) ->
  affinity `confirmed`. A node walks its pools' block CIDRs from a start point derived from its
  name, so nodes spread over the pool instead of racing for the same first block.
* When it may not claim (block cap, auto_allocate_blocks false, pool full) and strict affinity is
  off, it borrows free addresses from other nodes' blocks.
* The handle (/calico/ipam/v2/handle/<id>) is incremented *before* the block is written, as
  Calico does: a crash in between leaves a handle count too high (harmless, `check` reports it)
  rather than an address no handle knows about (a leak release_by_handle cannot find).

Concurrency: several processes (and threads) may allocate for the same node at once. Nothing here
relies on in-process state for correctness; the caches below only save round trips and every
cached value is used as the expected revision of a CAS, so a stale cache costs one Conflict and a
re-read, never a duplicate address.

Caches (per IPAM instance):
* the last KV of every block we read or wrote: the hot path writes a block with one CAS and no
  read;
* the node's affine block list: used to find space fast. Before claiming a new block the list is
  always re-read, so a stale list can only delay using a block, not cause a wrong claim;
* pools and IPAM configuration for `cache_ttl` seconds (default 1 s; 0 disables). A pool that was
  disabled less than cache_ttl ago may still serve this process, like Calico's informer caches.

MaxBlocksPerHost: 0 in the configuration means 20 (current Calico; older releases treated 0 as
unlimited). The cap limits claims only, never allocation from blocks already owned. As in
Calico's SetIPAMConfig, maxBlocksPerHost > 0 requires strict_affinity, and strict_affinity=false
together with auto_allocate_blocks=false is rejected.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

from felixpy.datastore import keys
from felixpy.datastore.api import KV, AlreadyExists, Conflict, Datastore, NotFound
from felixpy.ipam.block import Block, BlockError, host_affinity

log = logging.getLogger(__name__)

T = TypeVar("T")

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network

DEFAULT_BLOCK_SIZE = 26
DEFAULT_MAX_BLOCKS_PER_HOST = 20  # what maxBlocksPerHost = 0 means
EMPTY_BLOCK_MIN_RECLAIM_AGE = 60.0  # seconds before another node may take over an empty block

AFFINITY_PENDING = "pending"
AFFINITY_CONFIRMED = "confirmed"
AFFINITY_PENDING_DELETION = "pendingDeletion"


# -- errors -------------------------------------------------------------------------------------
class IPAMError(Exception):
    """Base of every IPAM failure; str() is one line for the user."""


class PoolExhaustedError(IPAMError):
    pass


class BlockLimitError(IPAMError):
    pass


class NoQualifiedPoolError(IPAMError):
    pass


class StrictAffinityError(IPAMError):
    pass


class AddressInUseError(IPAMError):
    pass


class InvalidConfigError(IPAMError):
    pass


class TooManyConflictsError(IPAMError):
    pass


# -- values -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class IPAMConfig:
    strict_affinity: bool = False
    auto_allocate_blocks: bool = True
    max_blocks_per_host: int = 0

    @property
    def block_cap(self) -> int:
        return self.max_blocks_per_host or DEFAULT_MAX_BLOCKS_PER_HOST

    def validate(self) -> None:
        if self.max_blocks_per_host < 0:
            raise InvalidConfigError(f"maxBlocksPerHost must be >= 0, not {self.max_blocks_per_host}")
        if self.max_blocks_per_host > 0 and not self.strict_affinity:
            raise InvalidConfigError("maxBlocksPerHost > 0 requires strict affinity to be enabled")
        if not self.strict_affinity and not self.auto_allocate_blocks:
            raise InvalidConfigError("auto_allocate_blocks=false requires strict affinity to be enabled")

    def to_json(self) -> dict[str, Any]:
        return {
            "strict_affinity": self.strict_affinity,
            "auto_allocate_blocks": self.auto_allocate_blocks,
            "maxBlocksPerHost": self.max_blocks_per_host,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> IPAMConfig:
        return cls(
            strict_affinity=bool(value.get("strict_affinity", False)),
            auto_allocate_blocks=bool(value.get("auto_allocate_blocks", True)),
            max_blocks_per_host=int(value.get("maxBlocksPerHost") or 0),
        )


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


@dataclass(frozen=True, slots=True)
class Assignment:
    handle: str | None
    attrs: Mapping[str, str]
    block_cidr: str


@dataclass
class _Progress:
    """What one auto_assign call has got so far (released again if the call fails)."""

    need: int
    ips: list[IPv4Address] = field(default_factory=list)
    cap_hit: bool = False  # a claim was wanted but the node owns block_cap blocks
    pool_full: bool = False  # a claim was tried and found no free block CIDR


def _now_rfc3339(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _ipv4(ip: str | IPv4Address) -> IPv4Address:
    addr = ipaddress.ip_address(str(ip).split("/")[0]) if not isinstance(ip, IPv4Address) else ip
    if not isinstance(addr, IPv4Address):
        raise IPAMError(f"{ip} is not an IPv4 address")
    return addr


class IPAM:
    def __init__(
        self,
        store: Datastore,
        *,
        retries: int = 100,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        cache_ttl: float = 1.0,
        pipeline_handle_writes: bool = True,
    ) -> None:
        self._store = store
        self._retries = retries
        self._rng = rng or random.Random()
        self._clock = clock
        self._cache_ttl = cache_ttl
        self._lock = threading.Lock()
        self._blocks: dict[str, KV] = {}  # block cidr -> last KV seen
        self._affine: dict[str, list[str]] = {}  # node -> confirmed affine block cidrs
        self._pools: tuple[float, list[Pool]] | None = None
        self._config: tuple[float, IPAMConfig] | None = None
        self._pipeline = pipeline_handle_writes
        self._helpers: ThreadPoolExecutor | None = None

    # -- cached reads ------------------------------------------------------------------------
    def _fresh(self, stamp: float) -> bool:
        return self._cache_ttl > 0 and time.monotonic() - stamp < self._cache_ttl

    def pools(self) -> list[Pool]:
        cached = self._pools
        if cached is not None and self._fresh(cached[0]):
            return cached[1]
        kvs, _ = self._store.list(keys.resource_prefix("ippools"))
        pools = [p for p in (parse_pool(kv.value) for kv in kvs) if p is not None]
        self._pools = (time.monotonic(), pools)
        return pools

    def get_config(self) -> IPAMConfig:
        try:
            kv = self._store.get(keys.IPAM_CONFIG)
        except NotFound:
            return IPAMConfig()
        return IPAMConfig.from_json(kv.value or {})

    def _cached_config(self) -> IPAMConfig:
        cached = self._config
        if cached is not None and self._fresh(cached[0]):
            return cached[1]
        config = self.get_config()
        self._config = (time.monotonic(), config)
        return config

    def set_config(self, config: IPAMConfig) -> None:
        config.validate()
        for _ in range(self._retries):
            try:
                kv = self._store.get(keys.IPAM_CONFIG)
            except NotFound:
                try:
                    self._store.create(keys.IPAM_CONFIG, config.to_json())
                    break
                except AlreadyExists:
                    continue
            value = dict(kv.value or {})
            value.update(config.to_json())
            try:
                self._store.update(keys.IPAM_CONFIG, value, kv.revision)
                break
            except (Conflict, NotFound):
                continue
        else:
            raise TooManyConflictsError("could not write the IPAM configuration: too many concurrent updates")
        self._config = None
        log.info("IPAM configuration set config=%s", config.to_json())

    def _node_labels(self, node: str) -> dict[str, str]:
        try:
            kv = self._store.get(keys.resource_key("nodes", node))
        except NotFound:
            return {}
        return dict(((kv.value or {}).get("metadata") or {}).get("labels") or {})

    def _resolve_pools(
        self, requested: Sequence[str] | None, node: str, node_labels: Mapping[str, str] | None
    ) -> list[Pool]:
        all_pools = self.pools()
        labels_cache: list[Mapping[str, str]] = []

        def labels() -> Mapping[str, str]:
            if not labels_cache:
                labels_cache.append(node_labels if node_labels is not None else self._node_labels(node))
            return labels_cache[0]

        def selected(pool: Pool) -> bool:
            if pool.node_selector.strip() in ("", "all()"):
                return True
            return pool.selects(labels())

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

    # -- block and handle primitives ----------------------------------------------------------
    def _read_block(self, cidr: str, *, use_cache: bool = True) -> KV | None:
        if use_cache:
            with self._lock:
                cached = self._blocks.get(cidr)
            if cached is not None:
                return cached
        try:
            kv = self._store.get(keys.block_key(cidr))
        except NotFound:
            self._forget_block(cidr)
            return None
        if kv.value is None or kv.value.get("deleted"):
            self._forget_block(cidr)
            return None
        self._remember_block(cidr, kv)
        return kv

    def _remember_block(self, cidr: str, kv: KV) -> None:
        with self._lock:
            self._blocks[cidr] = kv

    def _forget_block(self, cidr: str) -> None:
        with self._lock:
            self._blocks.pop(cidr, None)

    def _handle_add(self, handle: str, cidr: str, delta: int) -> None:
        """Add delta to the handle's count for a block; the handle is deleted when it reaches zero."""
        if delta == 0:
            return
        key = keys.handle_key(handle)
        may_be_new = delta > 0  # handles are usually new: try the create-only write first
        for _ in range(self._retries):
            if may_be_new:
                try:
                    self._store.create(key, {"block": {cidr: delta}, "deleted": False})
                    return
                except AlreadyExists:
                    may_be_new = False
            try:
                kv = self._store.get(key)
            except NotFound:
                if delta < 0:
                    return
                may_be_new = True
                continue
            value = dict(kv.value or {})
            counts = {} if value.get("deleted") else dict(value.get("block") or {})
            count = int(counts.get(cidr, 0)) + delta
            if count > 0:
                counts[cidr] = count
            else:
                counts.pop(cidr, None)
            try:
                if counts:
                    value.update({"block": counts, "deleted": False})
                    self._store.update(key, value, kv.revision)
                else:
                    self._store.delete(key, kv.revision)
                return
            except (Conflict, NotFound):
                continue
        raise TooManyConflictsError(f"could not update handle {handle}: too many concurrent updates")

    def _handle_drop_blocks(self, handle: str, cidrs: Iterable[str]) -> None:
        """Remove whole block entries from a handle (after releasing everything it had there)."""
        drop = set(cidrs)
        key = keys.handle_key(handle)
        for _ in range(self._retries):
            try:
                kv = self._store.get(key)
            except NotFound:
                return
            value = dict(kv.value or {})
            counts = {c: n for c, n in (value.get("block") or {}).items() if c not in drop}
            try:
                if counts and not value.get("deleted"):
                    value["block"] = counts
                    self._store.update(key, value, kv.revision)
                else:
                    self._store.delete(key, kv.revision)
                return
            except (Conflict, NotFound):
                continue
        raise TooManyConflictsError(f"could not update handle {handle}: too many concurrent updates")

    def _assign_from_block(
        self,
        cidr: str,
        num: int,
        handle: str,
        attrs: Mapping[str, str],
        *,
        owner: str | None,
    ) -> list[IPv4Address]:
        """Assign up to num addresses from one existing block with CAS; [] if it has no room.

        owner: when given, the block must still be affine to that node (the affine and claim
        paths); None for borrowing, which takes from any block.

        The handle is incremented before the block is written (Calico's order). The first
        increment is sent on a helper thread at the same time as the block CAS: the two round
        trips overlap, which nearly halves the latency of the common one-address request. Both
        requests are on the wire before either answer is awaited, so the crash window in which
        a block write could land without its handle write is the few microseconds between the
        two sends. If the handle write fails, the addresses are released again.
        """
        counted = 0  # what the handle has been (or is being) incremented by for this block
        in_flight: Future[None] | None = None
        try:
            kv = self._read_block(cidr)
            for _ in range(self._retries):
                if kv is None or kv.value.get("unallocated") == []:
                    return []  # full (judged without parsing: full blocks are skipped often)
                block = Block.from_json(kv.value)
                if owner is not None and block.affinity != host_affinity(owner):
                    self._forget_block(cidr)
                    return []
                take = min(num, block.free_count())
                if take == 0:
                    return []
                if take > counted:
                    if counted == 0 and in_flight is None and self._pipeline:
                        in_flight = self._executor().submit(self._handle_add, handle, cidr, take)
                    else:
                        in_flight = self._settle(in_flight)
                        self._handle_add(handle, cidr, take - counted)
                    counted = take
                ips = block.assign(take, handle, attrs)
                try:
                    new_kv = self._store.update(kv.key, block.to_json(), kv.revision)
                except Conflict:
                    kv = self._read_block(cidr, use_cache=False)
                    continue
                except NotFound:
                    self._forget_block(cidr)
                    return []
                self._remember_block(cidr, new_kv)
                try:
                    in_flight = self._settle(in_flight)
                except BaseException:
                    counted = 0  # the increment never happened: only the block needs undoing
                    self._release_in_block(cidr, ips)
                    raise
                if take < counted:
                    self._handle_add(handle, cidr, take - counted)
                counted = 0
                return ips
            raise TooManyConflictsError(f"could not assign from block {cidr}: too many concurrent updates")
        finally:
            if in_flight is not None:
                try:
                    in_flight.result()
                except Exception:
                    counted = 0  # the increment failed, so there is nothing to take back
            if counted:
                self._handle_add(handle, cidr, -counted)

    @staticmethod
    def _settle(in_flight: Future[None] | None) -> None:
        """Wait for an in-flight handle write; re-raises its failure."""
        if in_flight is not None:
            in_flight.result()
        return None

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._helpers is None:
                self._helpers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ipam-handle")
            return self._helpers

    def close(self) -> None:
        """Stop the helper threads (the datastore is the caller's to close)."""
        with self._lock:
            helpers, self._helpers = self._helpers, None
        if helpers is not None:
            helpers.shutdown(wait=True)

    # -- affinities ---------------------------------------------------------------------------
    def _list_affinities(self, node: str) -> list[KV]:
        kvs, _ = self._store.list(keys.host_affinity_prefix(node))
        return [kv for kv in kvs if not (kv.value or {}).get("deleted")]

    def affine_blocks(self, node: str) -> list[str]:
        """Block CIDRs the node has a confirmed affinity to."""
        out = []
        for kv in self._list_affinities(node):
            if (kv.value or {}).get("state") == AFFINITY_CONFIRMED:
                out.append(keys.parse_key(kv.key).name)
        with self._lock:
            self._affine[node] = list(out)
        return out

    def _claim_block(self, node: str, cidr: str) -> bool:
        """Two-phase claim of one block CIDR for node; False when another node owns it."""
        akey = keys.affinity_key(node, cidr)
        pending = {"state": AFFINITY_PENDING, "deleted": False}
        # Phase 1: a pending affinity (or reset a leftover non-confirmed one to pending).
        akv: KV | None = None
        for _ in range(self._retries):
            try:
                akv = self._store.create(akey, pending)
                break
            except AlreadyExists:
                pass
            try:
                existing = self._store.get(akey)
            except NotFound:
                continue
            if (existing.value or {}).get("state") == AFFINITY_CONFIRMED and not existing.value.get("deleted"):
                akv = existing  # another process of this node claimed it meanwhile
                break
            try:
                akv = self._store.update(akey, pending, existing.revision)
                break
            except (Conflict, NotFound):
                continue
        if akv is None:
            raise TooManyConflictsError(f"could not claim block {cidr}: too many concurrent updates")
        # Phase 2: create the block; create-only, so exactly one claimant wins.
        fresh = Block.new(cidr, host_affinity(node), _now_rfc3339(self._clock))
        try:
            bkv = self._store.create(keys.block_key(cidr), fresh.to_json())
            self._remember_block(cidr, bkv)
        except AlreadyExists:
            bkv_read = self._read_block(cidr, use_cache=False)
            if bkv_read is None or Block.from_json(bkv_read.value).affinity != host_affinity(node):
                if (akv.value or {}).get("state") != AFFINITY_CONFIRMED:
                    try:
                        self._store.delete(akey, akv.revision)
                    except (Conflict, NotFound):
                        pass
                log.debug("block claimed by someone else node=%s cidr=%s", node, cidr)
                return False
        # Phase 3: confirm.
        for _ in range(self._retries):
            if (akv.value or {}).get("state") == AFFINITY_CONFIRMED:
                break
            try:
                akv = self._store.update(akey, {"state": AFFINITY_CONFIRMED, "deleted": False}, akv.revision)
                break
            except Conflict:
                akv = self._store.get(akey)
            except NotFound:
                akv = self._store.create(akey, {"state": AFFINITY_CONFIRMED, "deleted": False})
                break
        with self._lock:
            affine = self._affine.setdefault(node, [])
            if cidr not in affine:
                affine.append(cidr)
        log.info("claimed block node=%s cidr=%s", node, cidr)
        return True

    def _ensure_affine_block(self, node: str, cidr: str) -> None:
        """Recreate the block of a confirmed affinity whose block is missing (crash recovery)."""
        if self._read_block(cidr) is not None:
            return
        fresh = Block.new(cidr, host_affinity(node), _now_rfc3339(self._clock))
        try:
            self._remember_block(cidr, self._store.create(keys.block_key(cidr), fresh.to_json()))
            log.info("recreated missing block of confirmed affinity node=%s cidr=%s", node, cidr)
        except AlreadyExists:
            self._read_block(cidr, use_cache=False)

    @staticmethod
    def _seeded_order(pool: Pool, node: str) -> Iterator[IPv4Network]:
        """The pool's block CIDRs from a start point derived from the node name, wrapping round."""
        count = pool.block_count
        seed = int.from_bytes(hashlib.sha256(f"{node}/{pool.cidr}".encode()).digest()[:8], "big")
        start = random.Random(seed).randrange(count)
        for i in range(count):
            yield pool.block_cidr((start + i) % count)

    def _find_and_claim(self, node: str, pools: list[Pool], owned: set[str]) -> str | None:
        """Claim one block for node in the given pools; None when every block CIDR is taken."""
        kvs, _ = self._store.list(keys.block_prefix(4))
        existing: dict[str, Block] = {}
        for kv in kvs:
            if (kv.value or {}).get("deleted"):
                continue
            try:
                existing[keys.parse_key(kv.key).name] = Block.from_json(kv.value)
            except BlockError:
                continue
        for pool in pools:
            for net in self._seeded_order(pool, node):
                cidr = str(net)
                block = existing.get(cidr)
                if cidr in owned:
                    continue
                if block is None or (block.affinity == host_affinity(node) and block.free_count() > 0):
                    if self._claim_block(node, cidr):
                        return cidr
        # Nothing free: take over an empty block another node has held for long enough.
        now = self._clock()
        for pool in pools:
            for net in self._seeded_order(pool, node):
                cidr = str(net)
                block = existing.get(cidr)
                if block is None or block.host in (None, node) or not block.is_empty():
                    continue
                claimed = _parse_rfc3339(block.affinity_claim_time)
                if claimed is not None and now - claimed < EMPTY_BLOCK_MIN_RECLAIM_AGE:
                    continue
                if self._reclaim_empty(block.host or "", cidr) and self._claim_block(node, cidr):
                    return cidr
        return None

    def _reclaim_empty(self, other: str, cidr: str) -> bool:
        """Delete another node's empty block (guarded by its revision) and that node's affinity."""
        kv = self._read_block(cidr, use_cache=False)
        if kv is None:
            return True
        if not Block.from_json(kv.value).is_empty():
            return False
        try:
            self._store.delete(kv.key, kv.revision)
        except (Conflict, NotFound):
            return False
        self._forget_block(cidr)
        try:
            self._store.delete(keys.affinity_key(other, cidr))
        except NotFound:
            pass
        log.info("reclaimed empty block from node=%s cidr=%s", other, cidr)
        return True

    # -- public allocation API ----------------------------------------------------------------
    def auto_assign(
        self,
        *,
        num: int = 1,
        handle: str,
        attrs: Mapping[str, str],
        node: str,
        node_labels: Mapping[str, str] | None = None,
        pools: Sequence[str] | None = None,
    ) -> list[IPv4Address]:
        if num < 1:
            raise IPAMError(f"cannot assign {num} addresses")
        if not handle:
            raise IPAMError("an IPAM handle is required")
        config = self._cached_config()
        chosen = self._resolve_pools(pools, node, node_labels)
        progress = _Progress(need=num)
        try:
            self._assign_affine(progress, handle, attrs, node, chosen, config)
            if progress.need:
                self._raise_if_short(progress, node, chosen, config)
        except BaseException:
            if progress.ips:
                log.warning("releasing partial allocation handle=%s ips=%s", handle, progress.ips)
                self.release_ips(progress.ips)
            raise
        log.debug("assigned handle=%s node=%s ips=%s", handle, node, progress.ips)
        return progress.ips

    def _take(self, progress: _Progress, cidr: str, handle: str, attrs: Mapping[str, str], owner: str | None) -> None:
        got = self._assign_from_block(cidr, progress.need, handle, attrs, owner=owner)
        progress.ips.extend(got)
        progress.need -= len(got)

    def _assign_affine(
        self, progress: _Progress, handle: str, attrs: Mapping[str, str], node: str,
        pools: list[Pool], config: IPAMConfig,
    ) -> None:
        def in_pools(cidr: str) -> bool:
            net = IPv4Network(cidr)
            return any(net.subnet_of(p.cidr) for p in pools)

        # Fast path: the blocks we already know are ours, with their cached KVs.
        with self._lock:
            known = list(self._affine.get(node, []))
        for cidr in known:
            if progress.need and in_pools(cidr):
                self._take(progress, cidr, handle, attrs, node)
        if not progress.need:
            return
        # Authoritative pass: the confirmed affinities and their blocks as they are now (another
        # process may have released addresses our cached copies still show as taken).
        owned = self.affine_blocks(node)
        for cidr in owned:
            self._forget_block(cidr)
        for cidr in owned:
            if progress.need and in_pools(cidr):
                self._ensure_affine_block(node, cidr)
                self._take(progress, cidr, handle, attrs, node)
        # Claim new blocks while allowed.
        if config.auto_allocate_blocks:
            owned_set = set(owned)
            while progress.need:
                if len(owned_set) >= config.block_cap:
                    progress.cap_hit = True
                    break
                claimed = self._find_and_claim(node, pools, owned_set)
                if claimed is None:
                    progress.pool_full = True
                    break
                owned_set.add(claimed)
                self._take(progress, claimed, handle, attrs, node)
        # Borrow from other blocks.
        if progress.need and not config.strict_affinity:
            self._borrow(progress, handle, attrs, node, pools)

    def _borrow(
        self, progress: _Progress, handle: str, attrs: Mapping[str, str], node: str, pools: list[Pool]
    ) -> None:
        kvs, _ = self._store.list(keys.block_prefix(4))
        candidates = []
        for kv in kvs:
            if (kv.value or {}).get("deleted"):
                continue
            try:
                block = Block.from_json(kv.value)
            except BlockError:
                continue
            if block.free_count() and any(block.cidr.subnet_of(p.cidr) for p in pools):
                self._remember_block(str(block.cidr), kv)
                candidates.append(str(block.cidr))
        self._rng.shuffle(candidates)  # spread borrowers over the blocks, as Calico's random walk
        for cidr in candidates:
            if not progress.need:
                return
            self._take(progress, cidr, handle, attrs, None)
            if progress.ips:
                log.info("borrowed addresses node=%s block=%s", node, cidr)

    def _raise_if_short(self, progress: _Progress, node: str, pools: list[Pool], config: IPAMConfig) -> None:
        pool_text = ", ".join(str(p.cidr) for p in pools)
        got = f"assigned {len(progress.ips)} of {len(progress.ips) + progress.need} addresses"
        if progress.cap_hit and not progress.pool_full:
            raise BlockLimitError(f"limit of {config.block_cap} blocks reached for node {node} ({got})")
        reason = "; auto_allocate_blocks is false" if not config.auto_allocate_blocks else ""
        raise PoolExhaustedError(
            f"pool exhausted: no free IPv4 address in pools [{pool_text}] for node {node} ({got}{reason})"
        )

    def assign_ip(self, ip: str | IPv4Address, *, handle: str, attrs: Mapping[str, str], node: str) -> None:
        """Assign one specific address (claiming its block for node if nobody has it)."""
        addr = _ipv4(ip)
        config = self._cached_config()
        pool = next((p for p in self.pools() if addr in p.cidr), None)
        if pool is None:
            raise NoQualifiedPoolError(f"address {addr} is not in any configured pool")
        cidr = str(pool.block_for(addr))
        if self._read_block(cidr, use_cache=False) is None:
            self._claim_block(node, cidr)
        counted = False
        try:
            kv = self._read_block(cidr)
            for _ in range(self._retries):
                if kv is None:
                    raise IPAMError(f"block {cidr} of {addr} vanished while assigning")
                block = Block.from_json(kv.value)
                if config.strict_affinity and block.affinity != host_affinity(node):
                    raise StrictAffinityError(
                        f"address {addr} is in block {cidr} affine to {block.affinity}, not node {node}"
                        " (strict affinity)"
                    )
                try:
                    block.assign_ip(addr, handle, attrs)
                except BlockError as err:
                    raise AddressInUseError(str(err)) from None
                if not counted:
                    self._handle_add(handle, cidr, 1)
                    counted = True
                try:
                    new_kv = self._store.update(kv.key, block.to_json(), kv.revision)
                except (Conflict, NotFound):
                    kv = self._read_block(cidr, use_cache=False)
                    continue
                self._remember_block(cidr, new_kv)
                counted = False
                return
            raise TooManyConflictsError(f"could not assign {addr}: too many concurrent updates")
        finally:
            if counted:
                self._handle_add(handle, cidr, -1)

    # -- release -------------------------------------------------------------------------------
    def _block_of(self, addr: IPv4Address, pools: list[Pool], blocks: list[KV] | None) -> str | None:
        for pool in pools:
            if addr in pool.cidr:
                return str(pool.block_for(addr))
        # Not in any current pool (deleted pool): find the block by listing.
        for kv in blocks or []:
            cidr = keys.parse_key(kv.key).name
            if addr in IPv4Network(cidr):
                return cidr
        return None

    def release_ips(self, ips: Iterable[str | IPv4Address]) -> list[IPv4Address]:
        """Release addresses; returns those that were not allocated."""
        addrs = [_ipv4(ip) for ip in ips]
        pools = self.pools()
        listed: list[KV] | None = None
        if any(not any(a in p.cidr for p in pools) for a in addrs):
            listed, _ = self._store.list(keys.block_prefix(4))
        by_block: dict[str, list[IPv4Address]] = {}
        not_allocated: list[IPv4Address] = []
        for addr in addrs:
            cidr = self._block_of(addr, pools, listed)
            if cidr is None:
                not_allocated.append(addr)
            else:
                by_block.setdefault(cidr, []).append(addr)
        for cidr, block_ips in by_block.items():
            missing, per_handle = self._release_in_block(cidr, block_ips)
            not_allocated.extend(missing)
            for handle, count in per_handle.items():
                self._handle_add(handle, cidr, -count)
        if not_allocated:
            log.info("release of addresses that were not allocated ips=%s", not_allocated)
        order = {addr: i for i, addr in reversed(list(enumerate(addrs)))}
        return sorted(not_allocated, key=lambda a: order.get(a, len(addrs)))

    def _modify_block(self, cidr: str, change: Callable[[Block], tuple[T, bool]], absent: T,
                      what: str) -> T:
        """Apply change(block) -> (result, changed) to a stored block with CAS, re-reading on a race.

        Nothing is written when change reports no change; a missing block gives `absent`.
        """
        kv = self._read_block(cidr)
        for _ in range(self._retries):
            if kv is None:
                return absent
            block = Block.from_json(kv.value)
            result, changed = change(block)
            if not changed:
                return result
            try:
                self._remember_block(cidr, self._store.update(kv.key, block.to_json(), kv.revision))
                return result
            except (Conflict, NotFound):
                kv = self._read_block(cidr, use_cache=False)
        raise TooManyConflictsError(f"could not {what} in block {cidr}: too many concurrent updates")

    def _release_in_block(self, cidr: str, ips: list[IPv4Address]) -> tuple[list[IPv4Address], dict[str, int]]:
        def change(block: Block) -> tuple[tuple[list[IPv4Address], dict[str, int]], bool]:
            missing, per_handle = block.release_counting(ips)
            return (missing, per_handle), bool(per_handle) or len(missing) != len(ips)

        nothing: dict[str, int] = {}
        return self._modify_block(cidr, change, (list(ips), nothing), "release addresses")

    def release_by_handle(self, handle: str) -> list[IPv4Address]:
        """Release every address of a handle; a missing handle is success (returns [])."""
        try:
            kv = self._store.get(keys.handle_key(handle))
        except NotFound:
            return []
        if (kv.value or {}).get("deleted"):
            return []
        released: list[IPv4Address] = []
        cidrs = list((kv.value or {}).get("block") or {})
        for cidr in cidrs:
            released.extend(self._release_handle_in_block(cidr, handle))
        self._handle_drop_blocks(handle, cidrs)
        log.info("released by handle handle=%s ips=%s", handle, released)
        return released

    def _release_handle_in_block(self, cidr: str, handle: str) -> list[IPv4Address]:
        def change(block: Block) -> tuple[list[IPv4Address], bool]:
            ips = block.release_by_handle(handle)
            return ips, bool(ips)

        return self._modify_block(cidr, change, [], f"release handle {handle}")

    # -- queries -------------------------------------------------------------------------------
    def ips_by_handle(self, handle: str) -> list[IPv4Address]:
        try:
            kv = self._store.get(keys.handle_key(handle))
        except NotFound:
            return []
        out: list[IPv4Address] = []
        for cidr in (kv.value or {}).get("block") or {}:
            bkv = self._read_block(cidr, use_cache=False)
            if bkv is not None:
                out.extend(Block.from_json(bkv.value).ips_for_handle(handle))
        return out

    def get_assignment(self, ip: str | IPv4Address) -> Assignment | None:
        addr = _ipv4(ip)
        pools = self.pools()
        listed = None
        if not any(addr in p.cidr for p in pools):
            listed, _ = self._store.list(keys.block_prefix(4))
        cidr = self._block_of(addr, pools, listed)
        if cidr is None:
            return None
        kv = self._read_block(cidr, use_cache=False)
        if kv is None:
            return None
        found = Block.from_json(kv.value).allocation(addr)
        if found is None:
            return None
        return Assignment(handle=found.handle, attrs=found.attrs, block_cidr=cidr)

    # -- affinity release ------------------------------------------------------------------------
    def release_affinity(self, node: str, cidr: str, *, must_be_empty: bool = True) -> None:
        """Give up node's block: pendingDeletion -> delete the (empty) block -> delete the affinity.

        With must_be_empty=False a block that still holds addresses is kept but loses its
        affinity (its addresses stay valid; the block becomes borrowable by anyone).
        """
        akey = keys.affinity_key(node, cidr)
        try:
            akv = self._store.get(akey)
        except NotFound:
            akv = None
        if akv is not None:
            try:
                akv = self._store.update(akey, {"state": AFFINITY_PENDING_DELETION, "deleted": False}, akv.revision)
            except (Conflict, NotFound):
                raise IPAMError(f"block {cidr} of node {node} changed while releasing its affinity") from None
        with self._lock:
            if cidr in self._affine.get(node, []):
                self._affine[node].remove(cidr)
        for _ in range(self._retries):
            kv = self._read_block(cidr, use_cache=False)
            if kv is None:
                break
            block = Block.from_json(kv.value)
            if block.affinity != host_affinity(node):
                break
            try:
                if block.is_empty():
                    self._store.delete(kv.key, kv.revision)
                    self._forget_block(cidr)
                elif must_be_empty:
                    if akv is not None:
                        self._restore_affinity(akey, akv)
                    raise IPAMError(f"block {cidr} of node {node} is not empty")
                else:
                    block.affinity = None
                    block.affinity_claim_time = None
                    self._remember_block(cidr, self._store.update(kv.key, block.to_json(), kv.revision))
                break
            except (Conflict, NotFound):
                continue
        else:
            raise TooManyConflictsError(f"could not release block {cidr}: too many concurrent updates")
        if akv is not None:
            try:
                self._store.delete(akey, akv.revision)
            except (Conflict, NotFound):
                pass
        log.info("released block affinity node=%s cidr=%s", node, cidr)

    def _restore_affinity(self, akey: str, akv: KV) -> None:
        try:
            self._store.update(akey, {"state": AFFINITY_CONFIRMED, "deleted": False}, akv.revision)
        except (Conflict, NotFound):
            pass

    def release_empty_affine_blocks(self, node: str, *, keep_last: bool = True) -> list[str]:
        """Release node's empty blocks; with keep_last a node keeps one block, as Calico's GC does."""
        owned = self.affine_blocks(node)
        released: list[str] = []
        for cidr in owned:
            if keep_last and len(owned) - len(released) <= 1:
                break
            kv = self._read_block(cidr, use_cache=False)
            if kv is not None and not Block.from_json(kv.value).is_empty():
                continue
            try:
                self.release_affinity(node, cidr, must_be_empty=True)
                released.append(cidr)
            except IPAMError as err:
                log.info("kept block node=%s cidr=%s reason=%s", node, cidr, err)
        return released

    def release_host_affinities(self, node: str) -> list[str]:
        """Drop every affinity of node (node removal): empty blocks go, others become unowned."""
        released = []
        for kv in self._list_affinities(node):
            cidr = keys.parse_key(kv.key).name
            self.release_affinity(node, cidr, must_be_empty=False)
            released.append(cidr)
        with self._lock:
            self._affine.pop(node, None)
        return released
