"""Read-modify-write of one key: create-only or compare-and-swap writes, bounded retries.

Every write felixpy makes to shared datastore state goes through compare_and_swap (directly or
through read_modify_write): the new value is computed from the value it replaces and written only
if that value is still the stored one; a race means a re-read and another try, never a lost update.

`expected` lets a caller that already holds the current KV (the IPAM block cache, a KV it just
wrote) skip the first read: the hot path is then one round trip. A stale `expected` costs one
failed write and a re-read, never a wrong write, because the write is conditional on it.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Final, Literal, TypeVar

from felixpy.datastore.api import KV, AlreadyExists, Conflict, Datastore, NotFound

R = TypeVar("R")


class TooManyConflicts(Conflict):
    pass


class _Marker(enum.Enum):
    KEEP = "keep"
    DELETE = "delete"
    READ = "read"


KEEP: Final = _Marker.KEEP  # change() result: write nothing
DELETE: Final = _Marker.DELETE  # change() result: delete the key (nothing to do if it is absent)
READ: Final = _Marker.READ  # `expected` default: read the key first


def compare_and_swap(
    store: Datastore,
    key: str,
    change: Callable[[Any], tuple[Any, R]],
    *,
    expected: KV | None | Literal[_Marker.READ] = READ,
    retries: int = 10,
    what: str = "",
    error: Callable[[str], Exception] = TooManyConflicts,
) -> tuple[KV | None, R]:
    """Apply change to key's value, re-reading and trying again when someone else wrote first.

    change(value) gets the stored value (None when the key is absent) and returns
    (new value, result): a new value is created (key absent) or swapped in against the revision it
    was computed from; KEEP writes nothing; DELETE deletes against that revision. It may be called
    once per attempt, so any side effect must be safe to repeat; exceptions it raises pass through.

    expected: the KV the caller believes is stored, or None to believe the key absent (the write
    is then a create-only attempt). Left out, the key is read first. A KEEP decided on `expected`
    is returned without a read: only writes are checked against the datastore.

    Returns (the KV stored afterwards, None when absent or deleted; the last result of change).
    After `retries` lost races raises error(f"could not {what}: too many concurrent updates").
    """
    current = _read(store, key) if isinstance(expected, _Marker) else expected
    for attempt in range(retries):
        new, result = change(None if current is None else current.value)
        try:
            if new is KEEP:
                return current, result
            if new is DELETE:
                if current is not None:
                    store.delete(key, current.revision)
                return None, result
            if current is None:
                return store.create(key, new), result
            return store.update(key, new, current.revision), result
        except (AlreadyExists, Conflict, NotFound):
            if attempt + 1 < retries:
                current = _read(store, key)
    raise error(f"could not {what or 'update ' + key}: too many concurrent updates ({retries} attempts)")


def read_modify_write(
    store: Datastore,
    key: str,
    change: Callable[[Any], Any],
    *,
    retries: int = 10,
) -> KV | None:
    """Write change(current value or None) to key, create-only or CAS, re-reading on a race.

    change() may be called several times and must not have side effects. Returning the current
    value unchanged writes nothing (returns the current KV).
    """

    def decide(value: Any) -> tuple[Any, None]:
        new = change(value)
        return (KEEP if value is not None and new == value else new), None

    kv, _ = compare_and_swap(store, key, decide, retries=retries)
    return kv


def _read(store: Datastore, key: str) -> KV | None:
    try:
        return store.get(key)
    except NotFound:
        return None
