"""The datastore contract (api.py), run against the in-memory fake and a real etcd alike."""

from __future__ import annotations

import threading
import time

import pytest

from felixpy.datastore.api import AlreadyExists, Compacted, Conflict, NotFound
from felixpy.datastore.memory import MemoryDatastore


@pytest.fixture(params=["memory", "etcd"])
def store(request):
    if request.param == "memory":
        yield MemoryDatastore()
    else:
        yield request.getfixturevalue("etcd_store")


def test_create_get_update_delete(store):
    kv = store.create("/calico/t/a", {"x": 1})
    assert store.get("/calico/t/a").value == {"x": 1}
    assert store.get("/calico/t/a").revision == kv.revision
    with pytest.raises(AlreadyExists):
        store.create("/calico/t/a", {"x": 2})
    kv2 = store.update("/calico/t/a", {"x": 2}, kv.revision)
    assert kv2.revision > kv.revision
    with pytest.raises(Conflict):
        store.update("/calico/t/a", {"x": 3}, kv.revision)
    with pytest.raises(Conflict):
        store.delete("/calico/t/a", kv.revision)
    store.delete("/calico/t/a", kv2.revision)
    with pytest.raises(NotFound):
        store.get("/calico/t/a")
    with pytest.raises(NotFound):
        store.update("/calico/t/a", {}, kv2.revision)
    with pytest.raises(NotFound):
        store.delete("/calico/t/a")


def test_list_is_sorted_and_prefix_bounded(store):
    for name in ("b", "a", "c"):
        store.create(f"/calico/t/{name}", {"n": name})
    store.create("/calico/u/z", {})
    items, rev = store.list("/calico/t/")
    assert [kv.key for kv in items] == ["/calico/t/a", "/calico/t/b", "/calico/t/c"]
    assert rev >= max(kv.revision for kv in items)


def test_watch_replays_from_revision_in_order(store):
    kv = store.create("/calico/t/a", {"v": 1})
    store.update("/calico/t/a", {"v": 2}, kv.revision)
    store.delete("/calico/t/a")
    watch = store.watch("/calico/t/", kv.revision)
    seen = []
    done = threading.Event()

    def consume():
        for batch in watch:
            seen.extend(batch)
            if len(seen) >= 4:
                done.set()
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    store.create("/calico/t/b", {"v": 9})
    assert done.wait(5), seen
    watch.close()
    assert [(e.key, e.value) for e in seen] == [
        ("/calico/t/a", {"v": 1}),
        ("/calico/t/a", {"v": 2}),
        ("/calico/t/a", None),
        ("/calico/t/b", {"v": 9}),
    ]
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)


def test_watch_from_compacted_revision_raises(store):
    kv = store.create("/calico/t/a", {"v": 1})
    for i in range(3):
        kv = store.update("/calico/t/a", {"v": i}, kv.revision)
    store.compact(kv.revision)
    with pytest.raises(Compacted):
        watch = store.watch("/calico/t/", kv.revision - 2)
        for _ in watch:  # memory raises on iteration start, etcd on creation
            break


def test_concurrent_cas_increments_lose_nothing(store):
    store.create("/calico/t/counter", {"n": 0})

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                kv = store.get("/calico/t/counter")
                try:
                    store.update(kv.key, {"n": kv.value["n"] + 1}, kv.revision)
                    break
                except Conflict:
                    time.sleep(0)

    threads = [threading.Thread(target=bump, args=(25,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert store.get("/calico/t/counter").value == {"n": 100}
