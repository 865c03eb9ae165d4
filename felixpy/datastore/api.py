"""The datastore contract every backend (etcd v3, Kubernetes, in-memory) implements.

Keys are Calico's etcd paths (see keys.py); values are JSON-compatible dicts. Every write that
depends on what was read is a compare-and-swap on the key's revision: `update` and `delete` take
the revision the caller read, and fail with Conflict when someone wrote in between. The caller
re-reads and retries a bounded number of times.

Watching: `list(prefix)` returns a snapshot and the store revision it was taken at; `watch(prefix,
start_revision)` then yields every change after it, in order. When the history has been compacted
away the watch raises Compacted and the caller lists again (see syncer.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol


class DatastoreError(Exception):
    """Base of every datastore failure; the message says what was attempted."""


class NotFound(DatastoreError):
    pass


class AlreadyExists(DatastoreError):
    pass


class Conflict(DatastoreError):
    """Compare-and-swap failed: the key changed (or vanished) since it was read."""


class Unavailable(DatastoreError):
    """The datastore could not be reached."""


class Compacted(DatastoreError):
    """A watch asked for history the datastore no longer keeps: list again."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: Any
    revision: int  # the key's modification revision: what update/delete compare against


@dataclass(frozen=True, slots=True)
class WatchEvent:
    key: str
    value: Any  # None when the key was deleted
    revision: int


class Watch(Protocol):
    def __iter__(self) -> Iterator[list[WatchEvent]]:
        """Batches of events in revision order; raises Compacted or Unavailable."""
        ...

    def close(self) -> None: ...


class Datastore(Protocol):
    def get(self, key: str) -> KV:
        """Raises NotFound."""
        ...

    def list(self, prefix: str) -> tuple[list[KV], int]:
        """All keys under prefix (sorted by key) and the store revision of the snapshot."""
        ...

    def create(self, key: str, value: Any) -> KV:
        """Raises AlreadyExists."""
        ...

    def update(self, key: str, value: Any, revision: int) -> KV:
        """Write only if the key's revision is still `revision`; raises Conflict (or NotFound)."""
        ...

    def delete(self, key: str, revision: int | None = None) -> None:
        """Delete, only if unchanged since `revision` when given; raises NotFound / Conflict."""
        ...

    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Changes under prefix with revision >= start_revision."""
        ...

    def close(self) -> None: ...
