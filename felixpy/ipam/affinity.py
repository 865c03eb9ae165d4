"""Block affinities (/calico/ipam/v2/host/<node>/ipv{4,6}/block/<cidr>): claiming and giving up blocks.

A node allocates from blocks it has a *confirmed* affinity to. An affinity without its block is
crash debris of a claim and the block is recreated. A claim has two phases so that a crash never
leaves a block nobody owns: affinity `pending` -> create the block (create-only: exactly one node
wins) -> affinity `confirmed`. Giving a block up runs the other way: `pendingDeletion` -> delete
the (empty) block -> delete the affinity.

When a pool has no unclaimed block left, a node may take over another node's block that has been
empty for EMPTY_BLOCK_MIN_RECLAIM_AGE seconds.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from felixpy.datastore import keys
from felixpy.datastore.api import KV, Conflict, Datastore, NotFound
from felixpy.datastore.cas import DELETE, KEEP, compare_and_swap
from felixpy.ipam.block import Block, host_affinity
from felixpy.ipam.blockstore import BlockStore, live
from felixpy.ipam.errors import IPAMError, TooManyConflictsError
from felixpy.ipam.pools import Pool, seeded_block_order
from felixpy.ipam.reservations import NO_RESERVATIONS, Reservations

log = logging.getLogger(__name__)

AFFINITY_PENDING = "pending"
AFFINITY_CONFIRMED = "confirmed"
AFFINITY_PENDING_DELETION = "pendingDeletion"

EMPTY_BLOCK_MIN_RECLAIM_AGE = 60.0  # seconds before another node may take over an empty block


def _is_confirmed(value: Any) -> bool:
    return bool(value) and value.get("state") == AFFINITY_CONFIRMED and not value.get("deleted")


def _affinity(state: str) -> dict[str, Any]:
    return {"state": state, "deleted": False}


def _now_rfc3339(clock: Callable[[], float]) -> str:
    return datetime.fromtimestamp(clock(), tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class Affinities:
    """Claims and releases of block affinities, and a cache of each node's confirmed blocks.

    The cache (known()) only speeds up finding space: before claiming a new block the allocator
    re-reads the list (confirmed()), so a stale list can delay using a block, never cause a wrong
    claim.
    """

    def __init__(self, store: Datastore, blocks: BlockStore, *, retries: int,
                 clock: Callable[[], float]) -> None:
        self._store = store
        self._blocks = blocks
        self._retries = retries
        self._clock = clock
        self._lock = threading.Lock()
        self._affine: dict[str, list[str]] = {}  # node -> confirmed affine block cidrs

    # -- reading ---------------------------------------------------------------------------
    def list_kvs(self, node: str) -> list[KV]:
        """The node's affinity KVs of both families, in any state."""
        kvs, _ = self._store.list(keys.host_prefix(node))
        return [kv for kv in kvs if not (kv.value or {}).get("deleted")]

    def confirmed(self, node: str) -> list[str]:
        """Block CIDRs the node has a confirmed affinity to, read now (and cached)."""
        out = [keys.parse_key(kv.key).name for kv in self.list_kvs(node) if _is_confirmed(kv.value)]
        with self._lock:
            self._affine[node] = list(out)
        return out

    def known(self, node: str) -> list[str]:
        """The cached confirmed block CIDRs (possibly stale)."""
        with self._lock:
            return list(self._affine.get(node, []))

    def _note_owned(self, node: str, cidr: str) -> None:
        with self._lock:
            affine = self._affine.setdefault(node, [])
            if cidr not in affine:
                affine.append(cidr)

    def _note_released(self, node: str, cidr: str) -> None:
        with self._lock:
            if cidr in self._affine.get(node, []):
                self._affine[node].remove(cidr)

    # -- claiming --------------------------------------------------------------------------
    def claim(self, node: str, cidr: str) -> bool:
        """Two-phase claim of one block CIDR for node; False when another node owns it."""
        akey = keys.affinity_key(node, cidr)

        def pending(value: Any) -> tuple[Any, None]:
            # A confirmed affinity: another process of this node claimed it meanwhile.
            return (KEEP if _is_confirmed(value) else _affinity(AFFINITY_PENDING)), None

        # Phase 1: a pending affinity (or a leftover non-confirmed one reset to pending).
        akv, _ = compare_and_swap(self._store, akey, pending, expected=None, retries=self._retries,
                                  what=f"claim block {cidr}", error=TooManyConflictsError)
        assert akv is not None  # pending() always leaves an affinity behind
        # Phase 2: create the block; create-only, so exactly one claimant wins.
        fresh = Block.new(cidr, host_affinity(node), _now_rfc3339(self._clock))
        if self._blocks.create(fresh) is None:
            existing = self._blocks.read(cidr, fresh=True)
            if existing is None or Block.from_json(existing.value).affinity != host_affinity(node):
                if not _is_confirmed(akv.value):
                    try:
                        self._store.delete(akey, akv.revision)
                    except (Conflict, NotFound):
                        pass
                log.debug("block claimed by someone else node=%s cidr=%s", node, cidr)
                return False

        # Phase 3: confirm.
        def confirm(value: Any) -> tuple[Any, None]:
            return (KEEP if _is_confirmed(value) else _affinity(AFFINITY_CONFIRMED)), None

        compare_and_swap(self._store, akey, confirm, expected=akv, retries=self._retries,
                         what=f"confirm block {cidr}", error=TooManyConflictsError)
        self._note_owned(node, cidr)
        log.info("claimed block node=%s cidr=%s", node, cidr)
        return True

    def ensure_block(self, node: str, cidr: str) -> None:
        """Recreate the block of a confirmed affinity whose block is missing (crash recovery)."""
        if self._blocks.read(cidr) is not None:
            return
        if self._blocks.create(Block.new(cidr, host_affinity(node), _now_rfc3339(self._clock))) is None:
            self._blocks.read(cidr, fresh=True)  # someone else recreated it: cache theirs
        else:
            log.info("recreated missing block of confirmed affinity node=%s cidr=%s", node, cidr)

    def find_and_claim(self, node: str, pools: Sequence[Pool], owned: set[str],
                       reserved: Reservations = NO_RESERVATIONS) -> str | None:
        """Claim one block for node in the given pools; None when every block CIDR is taken.

        A block CIDR that reservations cover entirely is never claimed (it could hold nothing).
        """
        existing = {keys.parse_key(kv.key).name: block for kv, block in self._blocks.list_blocks()}
        for pool in pools:
            for net in seeded_block_order(pool, node):
                cidr = str(net)
                block = existing.get(cidr)
                if cidr in owned:
                    continue
                if reserved and reserved.covers(net):
                    continue
                if block is None or (block.affinity == host_affinity(node)
                                     and block.free_count(reserved.overlapping(net) if reserved else None) > 0):
                    if self.claim(node, cidr):
                        return cidr
        # Nothing free: take over an empty block another node has held for long enough.
        now = self._clock()
        for pool in pools:
            for net in seeded_block_order(pool, node):
                cidr = str(net)
                block = existing.get(cidr)
                if block is None or block.host in (None, node) or not block.is_empty():
                    continue
                claimed = _parse_rfc3339(block.affinity_claim_time)
                if claimed is not None and now - claimed < EMPTY_BLOCK_MIN_RECLAIM_AGE:
                    continue
                if self._reclaim_empty(block.host or "", cidr) and self.claim(node, cidr):
                    return cidr
        return None

    def _reclaim_empty(self, other: str, cidr: str) -> bool:
        """Delete another node's empty block (guarded by its revision) and that node's affinity."""
        kv = self._blocks.read(cidr, fresh=True)
        if kv is None:
            return True
        if not Block.from_json(kv.value).is_empty():
            return False
        try:
            self._blocks.delete(kv)
        except (Conflict, NotFound):
            return False
        try:
            self._store.delete(keys.affinity_key(other, cidr))
        except NotFound:
            pass
        log.info("reclaimed empty block from node=%s cidr=%s", other, cidr)
        return True

    # -- releasing -------------------------------------------------------------------------
    def release(self, node: str, cidr: str, *, must_be_empty: bool = True) -> None:
        """Give up node's block: pendingDeletion -> delete the (empty) block -> delete the affinity.

        With must_be_empty=False a block that still holds addresses is kept but loses its
        affinity (its addresses stay valid; the block becomes borrowable by anyone).
        """
        akey = keys.affinity_key(node, cidr)
        try:
            akv: KV | None = self._store.get(akey)
        except NotFound:
            akv = None
        if akv is not None:
            try:
                akv = self._store.update(akey, _affinity(AFFINITY_PENDING_DELETION), akv.revision)
            except (Conflict, NotFound):
                raise IPAMError(f"block {cidr} of node {node} changed while releasing its affinity") from None
        self._note_released(node, cidr)

        def give_up(value: Any) -> tuple[Any, bool]:
            """-> (write, True when the block is kept because it is not empty)."""
            if not live(value):
                return KEEP, False
            block = Block.from_json(value)
            if block.affinity != host_affinity(node):
                return KEEP, False  # someone else's now: nothing of ours to release
            if block.is_empty():
                return DELETE, False
            if must_be_empty:
                return KEEP, True
            block.affinity = None
            block.affinity_claim_time = None
            return block.to_json(), False

        _, not_empty = self._blocks.swap(cidr, give_up, what=f"release block {cidr}", fresh=True)
        if not_empty:
            if akv is not None:
                self._restore(akey, akv)
            raise IPAMError(f"block {cidr} of node {node} is not empty")
        if akv is not None:
            try:
                self._store.delete(akey, akv.revision)
            except (Conflict, NotFound):
                pass
        log.info("released block affinity node=%s cidr=%s", node, cidr)

    def _restore(self, akey: str, akv: KV) -> None:
        try:
            self._store.update(akey, _affinity(AFFINITY_CONFIRMED), akv.revision)
        except (Conflict, NotFound):
            pass

    def release_empty(self, node: str, *, keep_last: bool = True) -> list[str]:
        """Release node's empty blocks; with keep_last a node keeps one block, as Calico's GC does."""
        owned = self.confirmed(node)
        released: list[str] = []
        for cidr in owned:
            if keep_last and len(owned) - len(released) <= 1:
                break
            kv = self._blocks.read(cidr, fresh=True)
            if kv is not None and not Block.from_json(kv.value).is_empty():
                continue
            try:
                self.release(node, cidr, must_be_empty=True)
                released.append(cidr)
            except IPAMError as err:
                log.info("kept block node=%s cidr=%s reason=%s", node, cidr, err)
        return released

    def release_host(self, node: str) -> list[str]:
        """Drop every affinity of node (node removal): empty blocks go, others become unowned."""
        released = []
        for kv in self.list_kvs(node):
            cidr = keys.parse_key(kv.key).name
            self.release(node, cidr, must_be_empty=False)
            released.append(cidr)
        with self._lock:
            self._affine.pop(node, None)
        return released
