"""The datastore contract (api.py), run against the in-memory fake, a real etcd, the fake Kubernetes
API server and a real kube-apiserver alike."""

from __future__ import annotations

import threading
import time

import pytest

from felixpy.datastore.api import AlreadyExists, Compacted, Conflict, NotFound
from felixpy.datastore.memory import MemoryDatastore


@pytest.fixture
def kube_store(tmp_path):
    from felixpy.datastore.kube import KubeDatastore, load_settings
    from tests.support.fake_kube_api import FakeKubeAPI

    api = FakeKubeAPI(bookmark_interval=0.2).start()
    path = tmp_path / "kubeconfig"
    path.write_text(api.kubeconfig())
    store = KubeDatastore(load_settings(kubeconfig=str(path)))
    store.compact = api.compact  # the contract tests compact through the store
    try:
        yield store
    finally:
        store.close()
        api.stop()


@pytest.fixture
def realkube_store(kube):
    """The real API server (tests/support/kube_cluster.py). Its watch cache, not etcd, answers
    watches: history older than the cache is what a restarted API server no longer has, so
    "compacting" restarts it."""
    store = kube.store()
    store.compact = lambda revision: kube.restart_apiserver()
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["memory", "etcd", "kube", "realkube"])
def store(request):
    if request.param == "memory":
        yield MemoryDatastore()
    else:
        yield request.getfixturevalue(f"{request.param}_store")


def test_create_get_update_delete(store):
    kv = store.create("/calico/ipam/v2/handle/t-a", {"x": 1})
    assert store.get("/calico/ipam/v2/handle/t-a").value == {"x": 1}
    assert store.get("/calico/ipam/v2/handle/t-a").revision == kv.revision
    with pytest.raises(AlreadyExists):
        store.create("/calico/ipam/v2/handle/t-a", {"x": 2})
    kv2 = store.update("/calico/ipam/v2/handle/t-a", {"x": 2}, kv.revision)
    assert kv2.revision > kv.revision
    with pytest.raises(Conflict):
        store.update("/calico/ipam/v2/handle/t-a", {"x": 3}, kv.revision)
    with pytest.raises(Conflict):
        store.delete("/calico/ipam/v2/handle/t-a", kv.revision)
    store.delete("/calico/ipam/v2/handle/t-a", kv2.revision)
    with pytest.raises(NotFound):
        store.get("/calico/ipam/v2/handle/t-a")
    with pytest.raises(NotFound):
        store.update("/calico/ipam/v2/handle/t-a", {}, kv2.revision)
    with pytest.raises(NotFound):
        store.delete("/calico/ipam/v2/handle/t-a")


def test_list_is_sorted_and_prefix_bounded(store):
    for name in ("b", "a", "c"):
        store.create(f"/calico/ipam/v2/handle/t-{name}", {"n": name})
    store.create("/calico/ipam/v2/handle/u-z", {})
    items, rev = store.list("/calico/ipam/v2/handle/t-")
    assert [kv.key for kv in items] == ["/calico/ipam/v2/handle/t-a", "/calico/ipam/v2/handle/t-b", "/calico/ipam/v2/handle/t-c"]
    assert rev >= max(kv.revision for kv in items)


def test_watch_replays_from_revision_in_order(store):
    kv = store.create("/calico/ipam/v2/handle/t-a", {"v": 1})
    store.update("/calico/ipam/v2/handle/t-a", {"v": 2}, kv.revision)
    store.delete("/calico/ipam/v2/handle/t-a")
    watch = store.watch("/calico/ipam/v2/handle/t-", kv.revision)
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
    store.create("/calico/ipam/v2/handle/t-b", {"v": 9})
    assert done.wait(5), seen
    watch.close()
    assert [(e.key, e.value) for e in seen] == [
        ("/calico/ipam/v2/handle/t-a", {"v": 1}),
        ("/calico/ipam/v2/handle/t-a", {"v": 2}),
        ("/calico/ipam/v2/handle/t-a", None),
        ("/calico/ipam/v2/handle/t-b", {"v": 9}),
    ]
    assert [e.revision for e in seen] == sorted(e.revision for e in seen)


def test_watch_from_compacted_revision_raises(store):
    kv = store.create("/calico/ipam/v2/handle/t-a", {"v": 1})
    for i in range(3):
        kv = store.update("/calico/ipam/v2/handle/t-a", {"v": i}, kv.revision)
    store.compact(kv.revision)
    with pytest.raises(Compacted):
        watch = store.watch("/calico/ipam/v2/handle/t-", kv.revision - 2)
        for _ in watch:  # memory raises on iteration start, etcd on creation
            break


def test_concurrent_cas_increments_lose_nothing(store):
    store.create("/calico/ipam/v2/handle/t-counter", {"n": 0})

    def bump(times: int) -> None:
        for _ in range(times):
            while True:
                kv = store.get("/calico/ipam/v2/handle/t-counter")
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
    assert store.get("/calico/ipam/v2/handle/t-counter").value == {"n": 100}
