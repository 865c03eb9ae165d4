"""The syncer: a consistent snapshot of the datastore, then every change after it.

It lists everything under a prefix at one revision, emits it, says IN_SYNC, and watches from the
next revision. When the watch breaks (outage) or its start revision has been compacted away it
lists again and emits only the difference against what it already emitted: changed keys as
updates, vanished keys as deletions. Consumers therefore see a stream that always converges on the
datastore's state, never a flush-and-reload. Nothing downstream forgets state during an outage:
an unreachable datastore simply stops the stream (status RESYNC) until it comes back.
"""

from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

from felixpy.datastore.api import Compacted, Datastore, DatastoreError

log = logging.getLogger(__name__)


class SyncStatus(enum.Enum):
    WAIT_FOR_DATASTORE = "wait-for-datastore"
    RESYNC = "resync"
    IN_SYNC = "in-sync"


@dataclass(frozen=True, slots=True)
class KVUpdate:
    key: str
    value: Any  # None = deleted
    revision: int


SyncEvent = Union[list[KVUpdate], SyncStatus]


class Syncer:
    def __init__(
        self,
        store: Datastore,
        callback: Callable[[SyncEvent], None],
        *,
        prefix: str = "/calico/",
        retry_interval: float = 1.0,
        max_retry_interval: float = 5.0,
    ) -> None:
        self._store = store
        self._callback = callback
        self._prefix = prefix
        self._retry_interval = retry_interval
        self._max_retry_interval = max_retry_interval
        self._known: dict[str, int] = {}  # key -> revision last emitted
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread: threading.Thread | None = None
        self.status = SyncStatus.WAIT_FOR_DATASTORE

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="syncer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _set_status(self, status: SyncStatus) -> None:
        if status != self.status:
            log.info("syncer status=%s", status.value)
            self.status = status
            self._callback(status)

    def _run(self) -> None:
        delay = self._retry_interval
        while not self._stop.is_set():
            try:
                revision = self._resync()
                delay = self._retry_interval
                self._watch_from(revision + 1)
            except Compacted as err:
                log.info("syncer watch compacted, relisting: %s", err)
            except DatastoreError as err:
                if self._stop.is_set():
                    return
                log.warning("syncer datastore error, retrying in %.1fs: %s", delay, err)
                if self.status == SyncStatus.IN_SYNC:
                    self._set_status(SyncStatus.RESYNC)
                self._stop.wait(delay)
                delay = min(delay * 2, self._max_retry_interval)

    def _resync(self) -> int:
        items, revision = self._store.list(self._prefix)
        updates = [KVUpdate(kv.key, kv.value, kv.revision) for kv in items
                   if self._known.get(kv.key) != kv.revision]
        seen = {kv.key for kv in items}
        updates += [KVUpdate(key, None, revision) for key in self._known if key not in seen]
        self._known = {kv.key: kv.revision for kv in items}
        log.info("syncer listed keys=%d changed=%d revision=%d", len(items), len(updates), revision)
        if updates:
            self._callback(updates)
        self._set_status(SyncStatus.IN_SYNC)
        return revision

    def _watch_from(self, revision: int) -> None:
        self._watch = self._store.watch(self._prefix, revision)
        try:
            for batch in self._watch:
                if self._stop.is_set():
                    return
                updates = []
                for ev in batch:
                    if ev.value is None:
                        self._known.pop(ev.key, None)
                    else:
                        self._known[ev.key] = ev.revision
                    updates.append(KVUpdate(ev.key, ev.value, ev.revision))
                self._callback(updates)
        finally:
            self._watch.close()
            self._watch = None
