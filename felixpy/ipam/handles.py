"""IPAM handles (/calico/ipam/v2/handle/<id>): per block, how many addresses a handle holds there.

A handle is what release_by_handle finds addresses by (a pod's is `<network>.<containerID>`). The
allocator increments it *before* writing the block, as Calico does: a crash in between leaves a
count too high (harmless; `felixctl ipam check` reports it) rather than an address no handle
knows about. A handle whose counts all reach zero is deleted.
"""

from __future__ import annotations

from typing import Any, Iterable

from felixpy.datastore import keys
from felixpy.datastore.api import KV, AlreadyExists, Datastore, NotFound
from felixpy.datastore.cas import DELETE, READ, compare_and_swap
from felixpy.ipam.errors import HandleInUseError, TooManyConflictsError


class Handles:
    def __init__(self, store: Datastore, *, retries: int) -> None:
        self._store = store
        self._retries = retries

    def blocks(self, handle: str) -> list[str]:
        """The block CIDRs the handle has addresses in ([] when it does not exist)."""
        return self.blocks_of(self.read(handle))

    def read(self, handle: str) -> KV | None:
        """The handle's KV, None when it does not exist."""
        try:
            return self._store.get(keys.handle_key(handle))
        except NotFound:
            return None

    @staticmethod
    def blocks_of(kv: KV | None) -> list[str]:
        if kv is None or (kv.value or {}).get("deleted"):
            return []
        return list((kv.value or {}).get("block") or {})

    def create(self, handle: str, cidr: str, count: int) -> None:
        """A new handle holding count addresses of one block: one create-only write.

        Raises HandleInUseError when the handle exists (a caller that expected a fresh handle,
        like a CNI ADD, learns that it is a repeat without reading first)."""
        try:
            self._store.create(keys.handle_key(handle), {"block": {cidr: count}, "deleted": False})
        except AlreadyExists:
            raise HandleInUseError(f"IPAM handle {handle} exists already") from None

    def add(self, handle: str, cidr: str, delta: int) -> None:
        """Add delta to the handle's count for a block; the handle is deleted when it reaches zero."""
        if delta == 0:
            return

        def change(value: Any) -> tuple[Any, None]:
            value = dict(value or {})
            counts = {} if value.get("deleted") else dict(value.get("block") or {})
            count = int(counts.get(cidr, 0)) + delta
            if count > 0:
                counts[cidr] = count
            else:
                counts.pop(cidr, None)
            if not counts:
                return DELETE, None
            return {**value, "block": counts, "deleted": False}, None

        # Handles are usually new when counting up: try the create-only write before any read.
        compare_and_swap(self._store, keys.handle_key(handle), change, expected=None if delta > 0 else READ,
                         retries=self._retries, what=f"update handle {handle}", error=TooManyConflictsError)

    def drop_blocks(self, handle: str, cidrs: Iterable[str], *, current: KV | None = None) -> None:
        """Remove whole block entries from a handle (after releasing everything it had there).

        current: the handle's KV when the caller holds it (saves the read; a stale one costs a
        failed write and a re-read). None: read it first."""
        drop = set(cidrs)

        def change(value: Any) -> tuple[Any, None]:
            value = dict(value or {})
            counts = {c: n for c, n in (value.get("block") or {}).items() if c not in drop}
            if counts and not value.get("deleted"):
                return {**value, "block": counts}, None
            return DELETE, None

        compare_and_swap(self._store, keys.handle_key(handle), change,
                         expected=current if current is not None else READ, retries=self._retries,
                         what=f"update handle {handle}", error=TooManyConflictsError)
