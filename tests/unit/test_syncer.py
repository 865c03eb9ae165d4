"""Syncer behaviour against the in-memory datastore: snapshot, watch, outage and compaction."""

from __future__ import annotations

import queue
import time

from felixpy.datastore.memory import MemoryDatastore
from felixpy.datastore.syncer import KVUpdate, Syncer, SyncStatus


class Collector:
    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()
        self.state: dict[str, object] = {}
        self.statuses: list[SyncStatus] = []

    def __call__(self, event) -> None:
        self.q.put(event)

    def drain_until(self, pred, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                event = self.q.get(timeout=0.05)
            except queue.Empty:
                if pred():
                    return
                continue
            if isinstance(event, SyncStatus):
                self.statuses.append(event)
            else:
                for u in event:
                    assert isinstance(u, KVUpdate)
                    if u.value is None:
                        self.state.pop(u.key, None)
                    else:
                        self.state[u.key] = u.value
            if pred():
                return
        raise AssertionError(f"condition not met; state={self.state} statuses={self.statuses}")


def test_snapshot_then_watch():
    store = MemoryDatastore()
    store.create("/calico/a", {"v": 1})
    c = Collector()
    s = Syncer(store, c, retry_interval=0.05)
    s.start()
    try:
        c.drain_until(lambda: SyncStatus.IN_SYNC in c.statuses)
        assert c.state == {"/calico/a": {"v": 1}}
        store.create("/calico/b", {"v": 2})
        store.delete("/calico/a")
        c.drain_until(lambda: c.state == {"/calico/b": {"v": 2}})
    finally:
        s.stop()


def test_outage_then_catch_up_emits_only_differences():
    store = MemoryDatastore()
    store.create("/calico/a", {"v": 1})
    store.create("/calico/keep", {"v": 1})
    c = Collector()
    s = Syncer(store, c, retry_interval=0.05)
    s.start()
    try:
        c.drain_until(lambda: SyncStatus.IN_SYNC in c.statuses)
        store.available = False
        c.drain_until(lambda: SyncStatus.RESYNC in c.statuses)
        # Changes made while the syncer cannot see them, then history compacted away.
        store.available = True
        s_rev = store.revision
        store.available = False
        store._data.pop("/calico/a")  # deleted "behind its back"
        store.available = True
        store.create("/calico/new", {"v": 3})
        store.compact(store.revision + 1)
        c.drain_until(lambda: c.state == {"/calico/keep": {"v": 1}, "/calico/new": {"v": 3}}
                      and c.statuses[-1] == SyncStatus.IN_SYNC)
        assert s_rev < store.revision
    finally:
        s.stop()
