"""An in-memory datastore with etcd's revision semantics: the stateful fake for unit tests.

It behaves like the etcd backend for everything the contract in api.py promises: one global
revision counter, per-key modification revisions, create-only and compare-and-swap writes,
watches that replay history from a revision, and compaction. Thread-safe, so concurrency tests of
the IPAM allocator can run against it without root.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any, Iterator

from felixpy.datastore.api import (
    KV,
    AlreadyExists,
    Compacted,
    Conflict,
    NotFound,
    Unavailable,
    WatchEvent,
)


class MemoryDatastore:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._data: dict[str, KV] = {}
        self._history: list[WatchEvent] = []
        self._compacted_before = 1  # history before this revision is gone
        self._revision = 1
        self.available = True  # tests flip this to simulate an outage

    # -- helpers ---------------------------------------------------------------------------
    def _check(self) -> None:
        if not self.available:
            raise Unavailable("memory datastore is marked unavailable")

    def _write(self, key: str, value: Any) -> KV:
        self._revision += 1
        # Round-trip through JSON: callers must never share mutable state with the store,
        # and values must be serialisable exactly as they would be for etcd.
        stored = json.loads(json.dumps(value)) if value is not None else None
        self._history.append(WatchEvent(key, stored, self._revision))
        if stored is None:
            self._data.pop(key, None)
            kv = KV(key, None, self._revision)
        else:
            kv = KV(key, stored, self._revision)
            self._data[key] = kv
        self._cond.notify_all()
        return KV(kv.key, copy.deepcopy(kv.value), kv.revision)

    # -- the contract ----------------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._revision

    def get(self, key: str) -> KV:
        with self._cond:
            self._check()
            kv = self._data.get(key)
            if kv is None:
                raise NotFound(f"get {key}: not found")
            return KV(kv.key, copy.deepcopy(kv.value), kv.revision)

    def list(self, prefix: str) -> tuple[list[KV], int]:
        with self._cond:
            self._check()
            items = [
                KV(k, copy.deepcopy(kv.value), kv.revision)
                for k, kv in sorted(self._data.items())
                if k.startswith(prefix)
            ]
            return items, self._revision

    def create(self, key: str, value: Any) -> KV:
        with self._cond:
            self._check()
            if key in self._data:
                raise AlreadyExists(f"create {key}: already exists")
            return self._write(key, value)

    def update(self, key: str, value: Any, revision: int) -> KV:
        with self._cond:
            self._check()
            kv = self._data.get(key)
            if kv is None:
                raise NotFound(f"update {key}: not found")
            if kv.revision != revision:
                raise Conflict(f"update {key}: revision {revision} is stale (now {kv.revision})")
            return self._write(key, value)

    def delete(self, key: str, revision: int | None = None) -> None:
        with self._cond:
            self._check()
            kv = self._data.get(key)
            if kv is None:
                raise NotFound(f"delete {key}: not found")
            if revision is not None and kv.revision != revision:
                raise Conflict(f"delete {key}: revision {revision} is stale (now {kv.revision})")
            self._write(key, None)

    def compact(self, revision: int) -> None:
        with self._cond:
            self._history = [e for e in self._history if e.revision >= revision]
            self._compacted_before = max(self._compacted_before, revision)

    def watch(self, prefix: str, start_revision: int) -> "MemoryWatch":
        with self._cond:
            self._check()
            if start_revision < self._compacted_before:
                raise Compacted(f"watch {prefix} from {start_revision}: compacted before {self._compacted_before}")
        return MemoryWatch(self, prefix, start_revision)

    def close(self) -> None:
        pass


class MemoryWatch:
    def __init__(self, store: MemoryDatastore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = start_revision
        self._closed = False

    def __iter__(self) -> Iterator[list[WatchEvent]]:
        store = self._store
        while True:
            with store._cond:
                while not self._closed and store.available and store._revision < self._next:
                    store._cond.wait(timeout=0.5)
                if self._closed:
                    return
                if not store.available:
                    raise Unavailable("memory datastore is marked unavailable")
                if self._next < store._compacted_before:
                    raise Compacted(f"watch {self._prefix}: compacted")
                batch = [
                    WatchEvent(e.key, copy.deepcopy(e.value), e.revision)
                    for e in store._history
                    if e.revision >= self._next and e.key.startswith(self._prefix)
                ]
                self._next = store._revision + 1
            if batch:
                yield batch

    def close(self) -> None:
        with self._store._cond:
            self._closed = True
            self._store._cond.notify_all()
