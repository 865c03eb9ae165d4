"""Calico-style block IPAM on the datastore: the IPAM facade, assignment and release.

The algorithm is libcalico-go's (calico-reference.md §2); the package is split as its lib/ipam is:

* errors.py      IPAMError and its subclasses (one-line messages for users)
* config.py      IPAMConfig: strict affinity, auto-allocate, maxBlocksPerHost
* pools.py       which pools may serve a request (selectors, allowedUses), and the order a node
                 walks a pool's blocks in
* reservations.py  IPReservations: addresses automatic assignment skips
* block.py       pure block arithmetic (the JSON layout of Calico's AllocationBlock)
* blockstore.py  block KVs in the datastore, with the last-seen KV cache
* handles.py     handle counts, incremented before and decremented after the block write
* affinity.py    the two-phase block claim, reclaiming empty blocks, releasing affinities
* allocator.py   this module: auto_assign / assign_ip / release / queries over the above
* check.py       `felixctl ipam check`

Assignment: a node allocates from blocks it has a confirmed affinity to; when those are full it
claims a new block; when it may not claim (block cap, auto_allocate_blocks false, pool full) and
strict affinity is off, it borrows free addresses from other nodes' blocks.

Concurrency: several processes (and threads) may allocate for the same node at once. Every write
is create-only or a compare-and-swap (datastore/cas.compare_and_swap); nothing relies on
in-process state for correctness. The caches only save round trips and every cached value is
used as the expected revision of a CAS, so a stale cache costs one Conflict and a re-read, never
a duplicate address. Caches (per IPAM instance):

* the last KV of every block we read or wrote (BlockStore): the hot path writes a block with one
  CAS and no read;
* the node's affine block list (Affinities.known): used to find space fast;
* pools, IPReservations and IPAM configuration for `cache_ttl` seconds (default 1 s; 0 disables).
  A pool that was disabled (or an address reserved) less than cache_ttl ago may still serve this
  process, like Calico's informer caches.

Release: `release_ips` frees addresses; `release` takes ReleaseOptions that may also name the
handle and sequence number the caller saw (Calico's ReleaseOptions), and then frees an address
only while it is still that allocation: a leak found by a scan cannot free an address that was
released and assigned to someone else before the release ran.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from felixpy.datastore import keys
from felixpy.datastore.api import KV, Datastore, NotFound
from felixpy.datastore.cas import KEEP
from felixpy.ipam.affinity import Affinities
from felixpy.ipam.block import Block, BlockError, ReleaseGuard, StaleRelease, host_affinity
from felixpy.ipam.blockstore import BlockStore, live
from felixpy.ipam.config import IPAMConfig, read_config, write_config
from felixpy.ipam.errors import (
    AddressInUseError,
    BlockLimitError,
    IPAMError,
    NoQualifiedPoolError,
    PoolExhaustedError,
    StaleReleaseError,
    StrictAffinityError,
)
from felixpy.ipam.handles import Handles
from felixpy.ipam.lock import GuardedStore
from felixpy.ipam.pools import USE_WORKLOAD, Pool, block_of, list_pools, resolve_pools
from felixpy.ipam.reservations import Reservations, list_reservations

log = logging.getLogger(__name__)

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network


Labels = Mapping[str, str] | Callable[[], Mapping[str, str]]


@dataclass(frozen=True, slots=True)
class Assignment:
    handle: str | None
    attrs: Mapping[str, str]
    block_cidr: str
    sequence_number: int | None = None  # the allocation's; a guarded release names it


@dataclass(frozen=True, slots=True)
class ReleaseOptions:
    """One address to release; handle / sequence_number, when given, must still be its own."""

    address: str | IPv4Address
    handle: str | None = None
    sequence_number: int | None = None


@dataclass(frozen=True, slots=True)
class ReleaseOutcome:
    released: tuple[IPv4Address, ...]
    not_allocated: tuple[IPv4Address, ...]
    stale: tuple[str, ...]  # one line per block whose release was refused (StaleRelease)


@dataclass
class _Progress:
    """What one auto_assign call has got so far (released again if the call fails)."""

    need: int
    ips: list[IPv4Address] = field(default_factory=list)
    cap_hit: bool = False  # a claim was wanted but the node owns block_cap blocks
    pool_full: bool = False  # a claim was tried and found no free block CIDR
    fresh_handle: bool = False  # the handle must not exist yet (until this call first writes it)


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
        write_guard: Callable[[], None] | None = None,
    ) -> None:
        if write_guard is not None:
            # The migration lock (ipam/lock.py): every IPAM write below goes through this store.
            store = GuardedStore(store, write_guard)
        self._store = store
        self._retries = retries
        self._rng = rng or random.Random()
        self._cache_ttl = cache_ttl
        self._lock = threading.Lock()
        self.blocks = BlockStore(store, retries=retries)
        self.handles = Handles(store, retries=retries)
        self.affinities = Affinities(store, self.blocks, retries=retries, clock=clock)
        self._pools: tuple[float, list[Pool]] | None = None
        self._reservations: tuple[float, Reservations] | None = None
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
        pools = list_pools(self._store)
        self._pools = (time.monotonic(), pools)
        return pools

    def reservations(self) -> Reservations:
        cached = self._reservations
        if cached is not None and self._fresh(cached[0]):
            return cached[1]
        reserved = list_reservations(self._store)
        self._reservations = (time.monotonic(), reserved)
        return reserved

    def get_config(self) -> IPAMConfig:
        return read_config(self._store)

    def _cached_config(self) -> IPAMConfig:
        cached = self._config
        if cached is not None and self._fresh(cached[0]):
            return cached[1]
        config = self.get_config()
        self._config = (time.monotonic(), config)
        return config

    def set_config(self, config: IPAMConfig) -> None:
        write_config(self._store, config, retries=self._retries)
        self._config = None
        log.info("IPAM configuration set config=%s", config.to_json())

    def _node_labels(self, node: str) -> dict[str, str]:
        try:
            kv = self._store.get(keys.resource_key("nodes", node))
        except NotFound:
            return {}
        return dict(((kv.value or {}).get("metadata") or {}).get("labels") or {})

    def _resolve_pools(
        self, requested: Sequence[str] | None, node: str, node_labels: Mapping[str, str] | None,
        use: str, namespace: str | None, namespace_labels: Labels | None,
    ) -> list[Pool]:
        def labels() -> Mapping[str, str]:
            return node_labels if node_labels is not None else self._node_labels(node)

        def ns_labels() -> Mapping[str, str]:
            if namespace_labels is None:
                return {}
            return namespace_labels() if callable(namespace_labels) else namespace_labels

        return resolve_pools(self.pools(), requested, node, labels, use=use, namespace=namespace,
                             namespace_labels=ns_labels)

    # -- automatic assignment -----------------------------------------------------------------
    def auto_assign(
        self,
        *,
        num: int = 1,
        handle: str,
        attrs: Mapping[str, str],
        node: str,
        node_labels: Mapping[str, str] | None = None,
        pools: Sequence[str] | None = None,
        use: str = USE_WORKLOAD,
        namespace_labels: Labels | None = None,
        new_handle: bool = False,
    ) -> list[IPv4Address]:
        """Assign num addresses (pools.py says which pools qualify; reservations are skipped).

        use: the pools' allowedUses must include it (Workload for pods, Tunnel for tunnel
        addresses). namespace_labels: the pod's namespace labels for namespaceSelectors, or a
        callable returning them (called only when a pool has a namespaceSelector).
        new_handle: the caller expects the handle not to exist (a CNI ADD): its first write is
        then create-only, and an existing handle raises HandleInUseError with nothing assigned,
        instead of a read before every assignment to find out.
        """
        if num < 1:
            raise IPAMError(f"cannot assign {num} addresses")
        if not handle:
            raise IPAMError("an IPAM handle is required")
        config = self._cached_config()
        chosen = self._resolve_pools(pools, node, node_labels, use, attrs.get("namespace"), namespace_labels)
        reserved = self.reservations()
        progress = _Progress(need=num, fresh_handle=new_handle)
        try:
            self._assign_affine(progress, handle, attrs, node, chosen, config, reserved)
            if progress.need:
                self._raise_if_short(progress, node, chosen, config)
        except BaseException:
            if progress.ips:
                log.warning("releasing partial allocation handle=%s ips=%s", handle, progress.ips)
                self.release_ips(progress.ips)
            raise
        log.debug("assigned handle=%s node=%s ips=%s", handle, node, progress.ips)
        return progress.ips

    def _assign_affine(
        self, progress: _Progress, handle: str, attrs: Mapping[str, str], node: str,
        pools: list[Pool], config: IPAMConfig, reserved: Reservations,
    ) -> None:
        def in_pools(cidr: str) -> bool:
            net = IPv4Network(cidr)
            return any(net.subnet_of(p.cidr) for p in pools)

        # Fast path: the blocks we already know are ours, with their cached KVs.
        for cidr in self.affinities.known(node):
            if progress.need and in_pools(cidr):
                self._take(progress, cidr, handle, attrs, node, reserved)
        if not progress.need:
            return
        # Authoritative pass: the confirmed affinities and their blocks as they are now (another
        # process may have released addresses our cached copies still show as taken).
        owned = self.affinities.confirmed(node)
        for cidr in owned:
            self.blocks.forget(cidr)
        for cidr in owned:
            if progress.need and in_pools(cidr):
                self.affinities.ensure_block(node, cidr)
                self._take(progress, cidr, handle, attrs, node, reserved)
        # Claim new blocks while allowed.
        if config.auto_allocate_blocks:
            owned_set = set(owned)
            while progress.need:
                if len(owned_set) >= config.block_cap:
                    progress.cap_hit = True
                    break
                claimed = self.affinities.find_and_claim(node, pools, owned_set, reserved)
                if claimed is None:
                    progress.pool_full = True
                    break
                owned_set.add(claimed)
                self._take(progress, claimed, handle, attrs, node, reserved)
        # Borrow from other blocks.
        if progress.need and not config.strict_affinity:
            self._borrow(progress, handle, attrs, node, pools, reserved)

    def _borrow(
        self, progress: _Progress, handle: str, attrs: Mapping[str, str], node: str, pools: list[Pool],
        reserved: Reservations,
    ) -> None:
        candidates = []
        for kv, block in self.blocks.list_blocks():
            if block.free_count(reserved.overlapping(block.cidr)) and any(block.cidr.subnet_of(p.cidr) for p in pools):
                self.blocks.remember(str(block.cidr), kv)
                candidates.append(str(block.cidr))
        self._rng.shuffle(candidates)  # spread borrowers over the blocks, as Calico's random walk
        for cidr in candidates:
            if not progress.need:
                return
            self._take(progress, cidr, handle, attrs, None, reserved)
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

    def _take(self, progress: _Progress, cidr: str, handle: str, attrs: Mapping[str, str], owner: str | None,
              reserved: Reservations) -> None:
        skip = reserved.overlapping(IPv4Network(cidr)) if reserved else None
        first = self.handles.create if progress.fresh_handle else self.handles.add
        got = self._assign_from_block(cidr, progress.need, handle, attrs, owner=owner, skip=skip,
                                      first_count=first)
        progress.ips.extend(got)
        progress.need -= len(got)
        if got:
            progress.fresh_handle = False  # it exists now: later blocks count up

    def _assign_from_block(
        self,
        cidr: str,
        num: int,
        handle: str,
        attrs: Mapping[str, str],
        *,
        owner: str | None,
        skip: Reservations | None = None,
        first_count: Callable[[str, str, int], None] | None = None,
    ) -> list[IPv4Address]:
        """Assign up to num addresses from one existing block with CAS; [] if it has no room.

        first_count: the handle write of the first increment (default Handles.add; create-only
        Handles.create for a handle that must be new, whose failure undoes the block write).

        owner: when given, the block must still be affine to that node (the affine and claim
        paths); None for borrowing, which takes from any block. skip: reserved addresses.

        The handle is incremented before the block is written (Calico's order). The first
        increment is sent on a helper thread at the same time as the block CAS: the two round
        trips overlap, which nearly halves the latency of the common one-address request. Both
        requests are on the wire before either answer is awaited, so the crash window in which
        a block write could land without its handle write is the few microseconds between the
        two sends. If the handle write fails, the addresses are released again.
        """
        counted = 0  # what the handle has been (or is being) incremented by for this block
        in_flight: Future[None] | None = None
        first = first_count or self.handles.add

        def take(value: Any) -> tuple[Any, list[IPv4Address] | None]:
            """-> (write, the addresses taken; None when the block is no longer owner's).

            Called again after a lost race: the handle is only ever counted up by the difference
            between what this attempt takes and what earlier attempts counted.
            """
            nonlocal counted, in_flight
            if not live(value) or value.get("unallocated") == []:
                return KEEP, []  # gone or full (judged without parsing: full blocks are skipped often)
            block = Block.from_json(value)
            if owner is not None and block.affinity != host_affinity(owner):
                return KEEP, None
            want = min(num, block.free_count(skip))
            if want == 0:
                return KEEP, []
            if want > counted:
                if counted == 0 and in_flight is None and self._pipeline:
                    in_flight = self._executor().submit(first, handle, cidr, want)
                else:
                    in_flight = self._settle(in_flight)
                    (first if counted == 0 else self.handles.add)(handle, cidr, want - counted)
                counted = want
            ips = block.assign(want, handle, attrs, skip)
            return block.to_json(), ips

        try:
            _, ips = self.blocks.swap(cidr, take, what=f"assign from block {cidr}")
            if ips is None:
                self.blocks.forget(cidr)  # not ours any more: re-read it next time
                return []
            if not ips:
                return []
            try:
                in_flight = self._settle(in_flight)
            except BaseException:
                counted = 0  # the increment never happened: only the block needs undoing
                self._release_in_block(cidr, ips)
                raise
            if len(ips) < counted:
                self.handles.add(handle, cidr, len(ips) - counted)
            counted = 0
            return ips
        finally:
            if in_flight is not None:
                try:
                    in_flight.result()
                except Exception:
                    counted = 0  # the increment failed, so there is nothing to take back
            if counted:
                self.handles.add(handle, cidr, -counted)

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

    # -- assignment of a given address ----------------------------------------------------------
    def assign_ip(self, ip: str | IPv4Address, *, handle: str, attrs: Mapping[str, str], node: str,
                  use: str | None = None) -> None:
        """Assign one specific address (claiming its block for node if nobody has it).

        As Calico's AssignIP: the address must be in an enabled pool, whose allowedUses must
        include use when one is given; reservations do not apply (they only keep automatic
        assignment away).
        """
        addr = _ipv4(ip)
        config = self._cached_config()
        pool = next((p for p in self.pools() if addr in p.cidr and not p.disabled), None)
        if pool is None:
            raise NoQualifiedPoolError(f"address {addr} is not in any enabled IP pool")
        if use is not None and not pool.allows(use):
            raise NoQualifiedPoolError(
                f"address {addr} is in IP pool {pool.name}, which does not allow use {use} "
                f"(allowedUses: {sorted(pool.allowed_uses)})")
        cidr = str(pool.block_for(addr))
        if self.blocks.read(cidr, fresh=True) is None:
            self.affinities.claim(node, cidr)
        counted = False

        def assign(value: Any) -> tuple[Any, None]:
            nonlocal counted
            if not live(value):
                raise IPAMError(f"block {cidr} of {addr} vanished while assigning")
            block = Block.from_json(value)
            if config.strict_affinity and block.affinity != host_affinity(node):
                raise StrictAffinityError(
                    f"address {addr} is in block {cidr} affine to {block.affinity}, not node {node}"
                    " (strict affinity)"
                )
            try:
                block.assign_ip(addr, handle, attrs)
            except BlockError as err:
                raise AddressInUseError(str(err)) from None
            if not counted:  # the handle first, as in _assign_from_block
                self.handles.add(handle, cidr, 1)
                counted = True
            return block.to_json(), None

        try:
            self.blocks.swap(cidr, assign, what=f"assign {addr}")
            counted = False
        finally:
            if counted:
                self.handles.add(handle, cidr, -1)

    # -- release -------------------------------------------------------------------------------
    def release_ips(self, ips: Iterable[str | IPv4Address]) -> list[IPv4Address]:
        """Release addresses; returns those that were not allocated."""
        return list(self.release([ReleaseOptions(ip) for ip in ips], strict=True).not_allocated)

    def release(self, options: Sequence[ReleaseOptions], *, strict: bool = False) -> ReleaseOutcome:
        """Release addresses, each only if it still has the handle / sequence number given.

        A block whose addresses do not all match is left untouched and named in `stale`; the
        other blocks are released. strict=True raises StaleReleaseError instead, after the
        other blocks were released.
        """
        addrs = [_ipv4(o.address) for o in options]
        guards = {_ipv4(o.address): ReleaseGuard(o.handle, o.sequence_number) for o in options
                  if o.handle is not None or o.sequence_number is not None}
        pools = self.pools()
        listed: list[KV] | None = None
        if any(not any(a in p.cidr for p in pools) for a in addrs):
            listed = self.blocks.list_kvs()
        by_block: dict[str, list[IPv4Address]] = {}
        not_allocated: list[IPv4Address] = []
        released: list[IPv4Address] = []
        stale: list[str] = []
        for addr in addrs:
            cidr = block_of(addr, pools, listed)
            if cidr is None:
                not_allocated.append(addr)
            else:
                by_block.setdefault(cidr, []).append(addr)
        for cidr, block_ips in by_block.items():
            block_guards = {a: guards[a] for a in block_ips if a in guards}
            try:
                missing, per_handle = self._release_in_block(cidr, block_ips, block_guards)
            except StaleRelease as err:
                log.warning("release refused block=%s reason=%s", cidr, err)
                stale.append(str(err))
                continue
            not_allocated.extend(missing)
            released.extend(a for a in block_ips if a not in missing)
            for handle, count in per_handle.items():
                self.handles.add(handle, cidr, -count)
        if not_allocated:
            log.info("release of addresses that were not allocated ips=%s", not_allocated)
        order = {addr: i for i, addr in reversed(list(enumerate(addrs)))}
        outcome = ReleaseOutcome(
            released=tuple(dict.fromkeys(released)),
            not_allocated=tuple(sorted(not_allocated, key=lambda a: order.get(a, len(addrs)))),
            stale=tuple(stale),
        )
        if strict and stale:
            raise StaleReleaseError(stale[0])
        return outcome

    def _release_in_block(
        self, cidr: str, ips: list[IPv4Address], guards: Mapping[IPv4Address, ReleaseGuard] | None = None,
    ) -> tuple[list[IPv4Address], dict[str, int]]:
        """-> (the addresses that were not allocated, released count per handle)."""

        def release(value: Any) -> tuple[Any, tuple[list[IPv4Address], dict[str, int]]]:
            if not live(value):
                return KEEP, (list(ips), {})
            block = Block.from_json(value)
            missing, per_handle = block.release_counting(ips, guards)
            changed = bool(per_handle) or len(missing) != len(ips)
            return (block.to_json() if changed else KEEP), (missing, per_handle)

        _, outcome = self.blocks.swap(cidr, release, what=f"release addresses in block {cidr}")
        return outcome

    def release_by_handle(self, handle: str) -> list[IPv4Address]:
        """Release every address of a handle; a missing handle is success (returns [])."""
        kv = self.handles.read(handle)
        cidrs = self.handles.blocks_of(kv)
        if not cidrs:
            return []
        released: list[IPv4Address] = []
        for cidr in cidrs:
            released.extend(self._release_handle_in_block(cidr, handle))
        # The block writes left the handle as read: delete it against that revision, no re-read.
        self.handles.drop_blocks(handle, cidrs, current=kv)
        log.info("released by handle handle=%s ips=%s", handle, released)
        return released

    def _release_handle_in_block(self, cidr: str, handle: str) -> list[IPv4Address]:
        def release(value: Any) -> tuple[Any, list[IPv4Address]]:
            if not live(value):
                return KEEP, []
            block = Block.from_json(value)
            ips = block.release_by_handle(handle)
            return (block.to_json() if ips else KEEP), ips

        _, ips = self.blocks.swap(cidr, release, what=f"release handle {handle} in block {cidr}")
        return ips

    # -- queries -------------------------------------------------------------------------------
    def ips_by_handle(self, handle: str) -> list[IPv4Address]:
        out: list[IPv4Address] = []
        for cidr in self.handles.blocks(handle):
            bkv = self.blocks.read(cidr, fresh=True)
            if bkv is not None:
                out.extend(Block.from_json(bkv.value).ips_for_handle(handle))
        return out

    def get_assignment(self, ip: str | IPv4Address) -> Assignment | None:
        addr = _ipv4(ip)
        pools = self.pools()
        listed = None
        if not any(addr in p.cidr for p in pools):
            listed = self.blocks.list_kvs()
        cidr = block_of(addr, pools, listed)
        if cidr is None:
            return None
        kv = self.blocks.read(cidr, fresh=True)
        if kv is None:
            return None
        found = Block.from_json(kv.value).allocation(addr)
        if found is None:
            return None
        return Assignment(handle=found.handle, attrs=found.attrs, block_cidr=cidr,
                          sequence_number=found.sequence_number)

    # -- affinities (affinity.Affinities does the work) ------------------------------------------
    def affine_blocks(self, node: str) -> list[str]:
        """Block CIDRs the node has a confirmed affinity to."""
        return self.affinities.confirmed(node)

    def release_affinity(self, node: str, cidr: str, *, must_be_empty: bool = True) -> None:
        """Give up node's block (see Affinities.release)."""
        self.affinities.release(node, cidr, must_be_empty=must_be_empty)

    def release_empty_affine_blocks(self, node: str, *, keep_last: bool = True) -> list[str]:
        """Release node's empty blocks; with keep_last a node keeps one block, as Calico's GC does."""
        return self.affinities.release_empty(node, keep_last=keep_last)

    def release_host_affinities(self, node: str) -> list[str]:
        """Drop every affinity of node (node removal): empty blocks go, others become unowned."""
        return self.affinities.release_host(node)
