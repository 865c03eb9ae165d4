"""read_modify_write: create-only or CAS, re-read on a race, bounded."""

from __future__ import annotations

import pytest

from felixpy.datastore.cas import TooManyConflicts, read_modify_write
from felixpy.datastore.memory import MemoryDatastore


def test_creates_then_updates_and_skips_no_op_writes():
    store = MemoryDatastore()
    kv = read_modify_write(store, "/calico/k", lambda old: {"n": 1})
    assert store.get("/calico/k").value == {"n": 1}
    again = read_modify_write(store, "/calico/k", lambda old: old)
    assert again is not None and again.revision == kv.revision  # nothing written
    read_modify_write(store, "/calico/k", lambda old: {"n": old["n"] + 1})
    assert store.get("/calico/k").value == {"n": 2}


def test_retries_after_a_concurrent_write():
    store = MemoryDatastore()
    store.create("/calico/k", {"n": 0})
    calls = []

    def change(old):
        calls.append(old["n"])
        if len(calls) == 1:  # someone else writes between our read and our CAS
            kv = store.get("/calico/k")
            store.update("/calico/k", {"n": 10}, kv.revision)
        return {"n": old["n"] + 1}

    read_modify_write(store, "/calico/k", change)
    assert calls == [0, 10]
    assert store.get("/calico/k").value == {"n": 11}


def test_gives_up_after_bounded_attempts():
    store = MemoryDatastore()
    store.create("/calico/k", {"n": 0})

    def always_raced(old):
        kv = store.get("/calico/k")
        store.update("/calico/k", {"n": kv.value["n"] + 1}, kv.revision)
        return {"n": -1}

    with pytest.raises(TooManyConflicts):
        read_modify_write(store, "/calico/k", always_raced, retries=3)
