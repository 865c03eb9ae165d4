"""IPAM blocks in the datastore, with the last KV seen of each block kept as the next CAS's guess.

The cache is never trusted for correctness: a cached KV is only ever used as the `expected` value
of a compare-and-swap, so a stale entry costs one failed write and a re-read, never a duplicate
address. What it saves is the read before each write on the hot path (one round trip, not two).
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from felixpy.datastore import keys
from felixpy.datastore.api import KV, AlreadyExists, Datastore, NotFound
from felixpy.datastore.cas import compare_and_swap
from felixpy.ipam.block import Block, BlockError
from felixpy.ipam.errors import TooManyConflictsError

R = TypeVar("R")


def live(value: Any) -> bool:
    """A stored block value that is a block (not a tombstone left by a deletion)."""
    return isinstance(value, dict) and not value.get("deleted")


class BlockStore:
    def __init__(self, store: Datastore, *, retries: int) -> None:
        self._store = store
        self._retries = retries
        self._lock = threading.Lock()
        self._last: dict[str, KV] = {}  # block cidr -> last KV read or written

    def read(self, cidr: str, *, fresh: bool = False) -> KV | None:
        """The block's KV, None when it does not exist; fresh=True always asks the datastore."""
        if not fresh:
            with self._lock:
                cached = self._last.get(cidr)
            if cached is not None:
                return cached
        try:
            kv = self._store.get(keys.block_key(cidr))
        except NotFound:
            kv = None
        return self._note(cidr, kv)

    def remember(self, cidr: str, kv: KV) -> None:
        with self._lock:
            self._last[cidr] = kv

    def forget(self, cidr: str) -> None:
        with self._lock:
            self._last.pop(cidr, None)

    def _note(self, cidr: str, kv: KV | None) -> KV | None:
        if kv is None or not live(kv.value):
            self.forget(cidr)
            return None
        self.remember(cidr, kv)
        return kv

    def swap(self, cidr: str, change: Callable[[Any], tuple[Any, R]], *, what: str,
             fresh: bool = False) -> tuple[KV | None, R]:
        """compare_and_swap on the block, starting from the cached KV unless fresh; caches the outcome.

        change gets the stored value, which may be None or a tombstone (see live()).
        """
        expected: KV | None
        if fresh:
            expected = self.read(cidr, fresh=True)
        else:
            with self._lock:
                cached = self._last.get(cidr)
            expected = cached if cached is not None else self.read(cidr, fresh=True)
        # The hot path tries several cached blocks per request: reuse the cached key rather than
        # rebuilding it from the CIDR, and leave the cache alone when nothing changed.
        key = expected.key if expected is not None else keys.block_key(cidr)
        kv, result = compare_and_swap(self._store, key, change, expected=expected,
                                      retries=self._retries, what=what, error=TooManyConflictsError)
        if kv is expected:
            return kv, result
        return self._note(cidr, kv), result

    def create(self, block: Block) -> KV | None:
        """Create-only write of a new block; None when a block of that CIDR exists already."""
        cidr = str(block.cidr)
        try:
            kv = self._store.create(keys.block_key(cidr), block.to_json())
        except AlreadyExists:
            return None
        self.remember(cidr, kv)
        return kv

    def delete(self, kv: KV) -> None:
        """Delete a block if it is still at kv's revision (raises Conflict / NotFound otherwise)."""
        self._store.delete(kv.key, kv.revision)
        self.forget(keys.parse_key(kv.key).name)

    def list_blocks(self) -> list[tuple[KV, Block]]:
        """Every live, parseable block of both families (malformed ones are skipped: `felixctl
        ipam check` reports them)."""
        kvs, _ = self._store.list(keys.BLOCKS)
        out = []
        for kv in kvs:
            if not live(kv.value):
                continue
            try:
                out.append((kv, Block.from_json(kv.value)))
            except BlockError:
                continue
        return out

    def list_kvs(self) -> list[KV]:
        kvs, _ = self._store.list(keys.BLOCKS)
        return kvs
