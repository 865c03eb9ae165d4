"""Read-modify-write of one key with compare-and-swap and bounded retries."""

from __future__ import annotations

from typing import Any, Callable

from felixpy.datastore.api import KV, AlreadyExists, Conflict, Datastore, NotFound


class TooManyConflicts(Conflict):
    pass


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
    for _ in range(retries):
        try:
            current: KV | None = store.get(key)
        except NotFound:
            current = None
        value = change(None if current is None else current.value)
        if current is not None and value == current.value:
            return current
        try:
            if current is None:
                return store.create(key, value)
            return store.update(key, value, current.revision)
        except (AlreadyExists, Conflict, NotFound):
            continue
    raise TooManyConflicts(f"{key}: kept changing under {retries} attempts to update it")
