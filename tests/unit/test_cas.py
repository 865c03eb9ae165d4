"""compare_and_swap and read_modify_write: create-only or CAS, re-read on a race, bounded."""

from __future__ import annotations

import pytest

from felixpy.datastore.api import NotFound
from felixpy.datastore.cas import DELETE, KEEP, TooManyConflicts, compare_and_swap, read_modify_write
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


# -- compare_and_swap: the helper read_modify_write and every IPAM write are built on ------------
class CountingStore(MemoryDatastore):
    """Records the datastore operations, to show which round trips a call made."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def get(self, key):
        self.ops.append("get")
        return super().get(key)

    def create(self, key, value):
        self.ops.append("create")
        return super().create(key, value)

    def update(self, key, value, revision):
        self.ops.append("update")
        return super().update(key, value, revision)

    def delete(self, key, revision=None):
        self.ops.append("delete")
        return super().delete(key, revision)


def bump(value):
    return {"n": (value or {"n": 0})["n"] + 1}, "bumped"


def test_expected_kv_skips_the_first_read():
    store = CountingStore()
    held = store.create("/calico/k", {"n": 1})
    store.ops.clear()
    kv, result = compare_and_swap(store, "/calico/k", bump, expected=held)
    assert store.ops == ["update"] and result == "bumped"
    assert kv is not None and kv.value == {"n": 2} and store.get("/calico/k").value == {"n": 2}


def test_a_stale_expected_costs_one_conflict_and_a_re_read_never_a_lost_update():
    store = CountingStore()
    stale = store.create("/calico/k", {"n": 1})
    store.update("/calico/k", {"n": 10}, stale.revision)  # someone else wrote after we cached
    store.ops.clear()
    kv, _ = compare_and_swap(store, "/calico/k", bump, expected=stale)
    assert store.ops == ["update", "get", "update"]
    assert kv is not None and store.get("/calico/k").value == {"n": 11}


def test_expected_none_tries_a_create_first_and_falls_back_to_a_swap():
    store = CountingStore()
    kv, _ = compare_and_swap(store, "/calico/new", bump, expected=None)
    assert store.ops == ["create"] and kv is not None and kv.value == {"n": 1}
    store.ops.clear()
    compare_and_swap(store, "/calico/new", bump, expected=None)  # it exists now
    assert store.ops == ["create", "get", "update"]
    assert store.get("/calico/new").value == {"n": 2}


def test_keep_writes_nothing_and_returns_the_stored_kv():
    store = CountingStore()
    held = store.create("/calico/k", {"n": 1})
    store.ops.clear()
    kv, result = compare_and_swap(store, "/calico/k", lambda value: (KEEP, value["n"]))
    assert store.ops == ["get"] and kv == held and result == 1


def test_delete_is_conditional_on_the_revision_read_and_a_no_op_when_absent():
    store = CountingStore()
    held = store.create("/calico/k", {"n": 1})
    store.update("/calico/k", {"n": 2}, held.revision)
    seen = []

    def delete(value):
        seen.append(value)
        return DELETE, None

    store.ops.clear()
    kv, _ = compare_and_swap(store, "/calico/k", delete, expected=held)  # stale: conflict, re-read, delete
    assert kv is None and seen == [{"n": 1}, {"n": 2}]
    assert store.ops == ["delete", "get", "delete"]
    with pytest.raises(NotFound):
        store.get("/calico/k")
    store.ops.clear()
    assert compare_and_swap(store, "/calico/k", delete) == (None, None)
    assert store.ops == ["get"]


def test_keep_trusts_expected_without_a_read():
    # The IPAM hot path skips a block its cache shows full without asking the datastore.
    store = CountingStore()
    held = store.create("/calico/k", {"n": 1})
    store.update("/calico/k", {"n": 2}, held.revision)
    store.ops.clear()
    assert compare_and_swap(store, "/calico/k", lambda value: (KEEP, value), expected=held) == (held, {"n": 1})
    assert store.ops == []


def test_errors_raised_by_change_pass_through_and_nothing_is_written():
    store = MemoryDatastore()
    store.create("/calico/k", {"n": 1})

    def refuse(value):
        raise ValueError("no")

    with pytest.raises(ValueError):
        compare_and_swap(store, "/calico/k", refuse)
    assert store.get("/calico/k").value == {"n": 1}


def test_gives_up_with_the_callers_error_type_and_a_one_line_message():
    store = CountingStore()
    store.create("/calico/k", {"n": 0})

    class Mine(Exception):
        pass

    def always_raced(value):
        kv = MemoryDatastore.get(store, "/calico/k")
        MemoryDatastore.update(store, "/calico/k", {"n": kv.value["n"] + 1}, kv.revision)
        return {"n": -1}, None

    store.ops.clear()
    with pytest.raises(Mine) as err:
        compare_and_swap(store, "/calico/k", always_raced, retries=3, what="bump k", error=Mine)
    assert str(err.value) == "could not bump k: too many concurrent updates (3 attempts)"
    assert store.ops.count("update") == 3 and store.ops.count("get") == 3  # no read after the last try
