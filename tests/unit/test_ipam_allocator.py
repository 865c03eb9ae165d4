"""The IPAM allocator, `ipam check` and `felixctl ipam` on the in-memory datastore."""

from __future__ import annotations

import argparse
import importlib.util
import io
import ipaddress
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from felixpy.ctl import ipam_cmd
from felixpy.datastore import keys
from felixpy.datastore.api import KV, NotFound
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam import check as ipam_check
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.block import Block
from felixpy.ipam.config import IPAMConfig
from felixpy.ipam.errors import (
    AddressInUseError,
    BlockLimitError,
    HandleInUseError,
    IPAMError,
    NoQualifiedPoolError,
    PoolExhaustedError,
    StrictAffinityError,
)

IP = ipaddress.IPv4Address
HAVE_SELECTORS = importlib.util.find_spec("policy.selectors") is not None


def add_pool(store: MemoryDatastore, name: str, cidr: str, block_size: int = 26, **spec: Any) -> None:
    store.create(
        keys.resource_key("ippools", name),
        {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
         "spec": {"cidr": cidr, "blockSize": block_size, **spec}},
    )


def set_pool(store: MemoryDatastore, name: str, **spec: Any) -> None:
    kv = store.get(keys.resource_key("ippools", name))
    kv.value["spec"].update(spec)
    store.update(kv.key, kv.value, kv.revision)


def block_of(store: MemoryDatastore, cidr: str) -> Block:
    return Block.from_json(store.get(keys.block_key(cidr)).value)


@pytest.fixture
def store() -> MemoryDatastore:
    return MemoryDatastore()


def new_ipam(store: Any, **kw: Any) -> IPAM:
    return IPAM(store, cache_ttl=0, rng=random.Random(7), **kw)


def assign(ipam: IPAM, handle: str, node: str = "n1", num: int = 1, **kw: Any) -> list[IP]:
    return ipam.auto_assign(num=num, handle=handle, attrs={"node": node, "pod": handle}, node=node, **kw)


class RecordingStore(MemoryDatastore):
    """Records (operation, key) of every single-key call, to count round trips."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, str]] = []

    def get(self, key: str) -> Any:
        self.ops.append(("get", key))
        return super().get(key)

    def create(self, key: str, value: Any) -> Any:
        self.ops.append(("create", key))
        return super().create(key, value)

    def update(self, key: str, value: Any, revision: int) -> Any:
        self.ops.append(("update", key))
        return super().update(key, value, revision)


def test_hot_path_writes_the_cached_block_without_reading_it() -> None:
    store = RecordingStore()
    add_pool(store, "p", "10.0.0.0/24", 26)
    ipam = IPAM(store, cache_ttl=60, pipeline_handle_writes=False)
    assign(ipam, "h1")
    (cidr,) = ipam.affine_blocks("n1")
    store.ops.clear()
    assign(ipam, "h2")
    # One create-only handle write, then one CAS of the block against its cached revision.
    assert store.ops == [("create", keys.handle_key("h2")), ("update", keys.block_key(cidr))]


def test_hot_path_after_another_writer_costs_one_conflict_and_one_read() -> None:
    store = RecordingStore()
    add_pool(store, "p", "10.0.0.0/24", 26)
    ipam = IPAM(store, cache_ttl=60, pipeline_handle_writes=False)
    other = IPAM(store, cache_ttl=60, pipeline_handle_writes=False)
    assign(ipam, "h1")
    assign(other, "h2")  # the same node's block, written by another process
    (cidr,) = ipam.affine_blocks("n1")
    store.ops.clear()
    got = assign(ipam, "h3")
    bkey = keys.block_key(cidr)
    assert store.ops == [("create", keys.handle_key("h3")), ("update", bkey), ("get", bkey), ("update", bkey)]
    assert len({*got, *ipam.ips_by_handle("h1"), *ipam.ips_by_handle("h2")}) == 3


# -- affinity and blocks ------------------------------------------------------------------------
def test_first_allocation_claims_a_confirmed_block_and_reuses_it(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    first = assign(ipam, "h1")
    (cidr,) = ipam.affine_blocks("n1")
    assert first[0] in ipaddress.ip_network(cidr)
    assert store.get(keys.affinity_key("n1", cidr)).value == {"state": "confirmed", "deleted": False}
    blk = block_of(store, cidr)
    assert blk.affinity == "host:n1" and blk.affinity_claim_time
    rest = [ip for i in range(15) for ip in assign(ipam, f"h{i + 2}")]
    assert all(ip in ipaddress.ip_network(cidr) for ip in rest)
    assert len(set(first + rest)) == 16
    # The 17th address needs a second block.
    assign(ipam, "h17")
    assert len(ipam.affine_blocks("n1")) == 2


def test_nodes_start_at_different_seeded_blocks(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/16", 26)
    ipam = new_ipam(store)
    blocks = {}
    for node in ("node-a", "node-b", "node-c"):
        assign(ipam, f"h-{node}", node)
        blocks[node] = ipam.affine_blocks(node)[0]
    assert len(set(blocks.values())) == 3
    # Deterministic: the same node name gets the same first block in a fresh store.
    other = MemoryDatastore()
    add_pool(other, "p", "10.0.0.0/16", 26)
    assign(new_ipam(other), "x", "node-b")
    assert new_ipam(other).affine_blocks("node-b") == [blocks["node-b"]]


def test_confirmed_affinity_without_block_is_recreated(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    ip = assign(ipam, "h1")[0]
    (cidr,) = ipam.affine_blocks("n1")
    kv = store.get(keys.block_key(cidr))
    store.delete(kv.key)
    store.delete(keys.handle_key("h1"))
    again = new_ipam(store)
    got = assign(again, "h2")[0]
    assert got == ip  # the recreated block starts from its first address again
    assert again.affine_blocks("n1") == [cidr]


def test_pending_affinity_left_by_a_crash_is_reused(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    store.create(keys.affinity_key("n1", "10.0.0.0/28"), {"state": "pending", "deleted": False})
    ipam = new_ipam(store)
    assign(ipam, "h1")
    assert ipam.affine_blocks("n1") == ["10.0.0.0/28"]


def test_block_claimed_by_another_node_drops_our_pending_affinity(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/27", 28)
    store.create(keys.block_key("10.0.0.0/28"), Block.new("10.0.0.0/28", "host:n2").to_json())
    store.create(keys.affinity_key("n2", "10.0.0.0/28"), {"state": "confirmed", "deleted": False})
    ipam = new_ipam(store)
    # Force n1 to try the taken block first by asking it to claim it directly.
    assert ipam.affinities.claim("n1", "10.0.0.0/28") is False
    with pytest.raises(NotFound):
        store.get(keys.affinity_key("n1", "10.0.0.0/28"))
    ip = assign(ipam, "h1")[0]
    assert ip in ipaddress.ip_network("10.0.0.16/28")


# -- borrowing and strict affinity ----------------------------------------------------------------
def test_borrows_from_another_nodes_block_when_pool_is_full(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/27", 28)
    ipam = new_ipam(store)
    assign(ipam, "a", "n1", num=16)
    assign(ipam, "b", "n2", num=1)
    (n2_block,) = ipam.affine_blocks("n2")
    borrowed = assign(ipam, "c", "n1")[0]
    assert borrowed in ipaddress.ip_network(n2_block)
    assignment = ipam.get_assignment(borrowed)
    assert assignment is not None and assignment.attrs["node"] == "n1" and assignment.handle == "c"
    assert block_of(store, n2_block).affinity == "host:n2"  # borrowing never moves the block


def test_strict_affinity_never_borrows(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/27", 28)
    ipam = new_ipam(store)
    ipam.set_config(IPAMConfig(strict_affinity=True))
    assign(ipam, "a", "n1", num=16)
    assign(ipam, "b", "n2", num=1)
    with pytest.raises(PoolExhaustedError, match="pool exhausted"):
        assign(ipam, "c", "n1")


def test_assign_ip_checks_strict_affinity_and_use(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    ipam.assign_ip("10.0.0.5", handle="h1", attrs={"pod": "a"}, node="n1")
    assert ipam.affine_blocks("n1") == ["10.0.0.0/28"]
    assert ipam.ips_by_handle("h1") == [IP("10.0.0.5")]
    with pytest.raises(AddressInUseError):
        ipam.assign_ip("10.0.0.5", handle="h2", attrs={}, node="n1")
    assert ipam.ips_by_handle("h2") == []
    with pytest.raises(NotFound):
        store.get(keys.handle_key("h2"))
    ipam.set_config(IPAMConfig(strict_affinity=True))
    with pytest.raises(StrictAffinityError):
        ipam.assign_ip("10.0.0.6", handle="h3", attrs={}, node="n2")
    with pytest.raises(NoQualifiedPoolError):
        ipam.assign_ip("192.168.0.1", handle="h4", attrs={}, node="n1")


# -- handles ------------------------------------------------------------------------------------
def test_handle_records_counts_per_block_and_release_by_handle(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    assign(ipam, "other", num=10)
    ips = assign(ipam, "h", num=10)  # 6 from the first block, 4 from a second one
    value = store.get(keys.handle_key("h")).value
    assert value["deleted"] is False
    assert sorted(value["block"].values()) == [4, 6]
    assert sorted(ipam.ips_by_handle("h")) == sorted(ips)
    assert sorted(ipam.release_by_handle("h")) == sorted(ips)
    with pytest.raises(NotFound):
        store.get(keys.handle_key("h"))
    assert ipam.release_by_handle("h") == []  # idempotent
    assert ipam.release_by_handle("never-existed") == []
    assert all(ipam.get_assignment(ip) is None for ip in ips)
    assert len(ipam.ips_by_handle("other")) == 10


@pytest.mark.parametrize("pipeline", [True, False])
def test_new_handle_is_created_with_the_block_write_and_a_repeat_assigns_nothing(pipeline: bool) -> None:
    store = RecordingStore()
    add_pool(store, "p", "10.0.0.0/24", 26)
    ipam = IPAM(store, cache_ttl=60, pipeline_handle_writes=pipeline)
    assign(ipam, "h1", new_handle=True)
    (cidr,) = ipam.affine_blocks("n1")
    store.ops.clear()
    (ip,) = assign(ipam, "h2", new_handle=True)
    # No read of the handle first: its create-only write is the check.
    assert sorted(store.ops) == [("create", keys.handle_key("h2")), ("update", keys.block_key(cidr))]
    assert store.get(keys.handle_key("h2")).value == {"block": {cidr: 1}, "deleted": False}
    block_before = store.get(keys.block_key(cidr)).value
    with pytest.raises(HandleInUseError):
        assign(ipam, "h2", new_handle=True)
    # The block write that went out with the failed create was taken back; h2 is as it was.
    after = store.get(keys.block_key(cidr)).value
    assert Block.from_json(after).ips_for_handle("h2") == [ip]
    assert Block.from_json(after).free_count() == Block.from_json(block_before).free_count()
    assert store.get(keys.handle_key("h2")).value == {"block": {cidr: 1}, "deleted": False}


def test_new_handle_spanning_two_blocks_counts_up_after_its_create(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    assign(ipam, "other", num=10)
    ips = assign(ipam, "h", num=10, new_handle=True)  # 6 from the first block, 4 from a second one
    assert sorted(store.get(keys.handle_key("h")).value["block"].values()) == [4, 6]
    assert sorted(ipam.release_by_handle("h")) == sorted(ips)


def test_release_ips_reports_unallocated_and_decrements_handles(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    a, b = assign(ipam, "h", num=2)
    assert ipam.release_ips([a, IP("10.0.0.200"), IP("172.16.0.1")]) == [IP("10.0.0.200"), IP("172.16.0.1")]
    assert list(store.get(keys.handle_key("h")).value["block"].values()) == [1]
    assert ipam.release_ips([b]) == []
    with pytest.raises(NotFound):
        store.get(keys.handle_key("h"))


# -- configuration and limits ---------------------------------------------------------------------
def test_config_defaults_validation_and_storage(store: MemoryDatastore) -> None:
    ipam = new_ipam(store)
    assert ipam.get_config() == IPAMConfig(False, True, 0)
    assert IPAMConfig().block_cap == 20
    with pytest.raises(IPAMError, match="requires strict affinity"):
        ipam.set_config(IPAMConfig(strict_affinity=False, max_blocks_per_host=4))
    with pytest.raises(IPAMError, match="requires strict affinity"):
        ipam.set_config(IPAMConfig(strict_affinity=False, auto_allocate_blocks=False))
    ipam.set_config(IPAMConfig(strict_affinity=True, max_blocks_per_host=4))
    assert store.get(keys.IPAM_CONFIG).value == {
        "strict_affinity": True, "auto_allocate_blocks": True, "maxBlocksPerHost": 4}
    assert ipam.get_config().max_blocks_per_host == 4


def test_max_blocks_per_host_limits_claims_and_rolls_back(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    ipam.set_config(IPAMConfig(strict_affinity=True, max_blocks_per_host=1))
    assign(ipam, "a", num=10)
    with pytest.raises(BlockLimitError, match="limit of 1 blocks"):
        assign(ipam, "b", num=10)
    # The failed request released the 6 it had got.
    assert ipam.ips_by_handle("b") == []
    assert block_of(store, ipam.affine_blocks("n1")[0]).in_use_count() == 10
    assert len(assign(ipam, "c", num=6)) == 6  # the cap never limits allocation from owned blocks


def test_zero_max_blocks_means_twenty_then_borrow(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 30)  # 64 blocks of 4
    ipam = new_ipam(store)
    assign(ipam, "a", num=80)
    assert len(ipam.affine_blocks("n1")) == 20
    assert len(ipam.affine_blocks("n2")) == 0
    assign(ipam, "b", "n2", num=1)
    assert len(ipam.affine_blocks("n2")) == 1


def test_auto_allocate_blocks_false_uses_only_owned_blocks(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    ipam.set_config(IPAMConfig(strict_affinity=True, auto_allocate_blocks=False))
    with pytest.raises(PoolExhaustedError, match="auto_allocate_blocks is false"):
        assign(ipam, "a")
    ipam.assign_ip("10.0.0.1", handle="x", attrs={}, node="n1")  # claims the block explicitly
    assert assign(ipam, "a")[0] in ipaddress.ip_network("10.0.0.0/28")


def test_pool_exhaustion_message(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    ipam = new_ipam(store)
    assign(ipam, "a", num=16)
    with pytest.raises(PoolExhaustedError) as err:
        assign(ipam, "b")
    assert str(err.value).startswith("pool exhausted: no free IPv4 address in pools [10.0.0.0/28] for node n1")
    assert "\n" not in str(err.value)


# -- pools --------------------------------------------------------------------------------------
def test_disabled_pools_get_no_new_allocations(store: MemoryDatastore) -> None:
    add_pool(store, "old", "10.0.0.0/24", 28)
    add_pool(store, "new", "10.1.0.0/24", 28)
    ipam = new_ipam(store)
    first = assign(ipam, "a", pools=["old"])[0]
    assert first in ipaddress.ip_network("10.0.0.0/24")
    set_pool(store, "old", disabled=True)
    assert assign(ipam, "b")[0] in ipaddress.ip_network("10.1.0.0/24")  # affine block in old pool skipped
    with pytest.raises(NoQualifiedPoolError):
        assign(ipam, "c", pools=["10.0.0.0/24"])
    set_pool(store, "new", disabled=True)
    with pytest.raises(NoQualifiedPoolError):
        assign(ipam, "d")
    assert ipam.release_ips([first]) == []  # releasing from a disabled pool still works


def test_requested_pools_by_name_or_cidr(store: MemoryDatastore) -> None:
    add_pool(store, "a", "10.0.0.0/24", 28)
    add_pool(store, "b", "10.1.0.0/24", 28)
    ipam = new_ipam(store)
    assert assign(ipam, "x", pools=["b"])[0] in ipaddress.ip_network("10.1.0.0/24")
    assert assign(ipam, "y", pools=["10.0.0.0/24"])[0] in ipaddress.ip_network("10.0.0.0/24")
    with pytest.raises(NoQualifiedPoolError):
        assign(ipam, "z", pools=["nope"])


def test_manual_pools_only_serve_explicit_requests(store: MemoryDatastore) -> None:
    add_pool(store, "m", "10.0.0.0/24", 28, assignmentMode="Manual")
    ipam = new_ipam(store)
    with pytest.raises(NoQualifiedPoolError):
        assign(ipam, "x")
    assert assign(ipam, "x", pools=["m"])


@pytest.mark.skipif(not HAVE_SELECTORS, reason="policy.selectors not available")
def test_node_selector_chooses_pools(store: MemoryDatastore) -> None:
    add_pool(store, "a", "10.0.0.0/24", 28, nodeSelector="zone == 'a'")
    add_pool(store, "b", "10.1.0.0/24", 28, nodeSelector="zone == 'b'")
    add_pool(store, "all", "10.2.0.0/24", 28, nodeSelector="all()", disabled=True)
    ipam = new_ipam(store)
    assert assign(ipam, "x", node_labels={"zone": "b"})[0] in ipaddress.ip_network("10.1.0.0/24")
    with pytest.raises(NoQualifiedPoolError):
        assign(ipam, "y", node_labels={"zone": "c"})
    # Without explicit labels the Node resource's labels are used.
    store.create(keys.resource_key("nodes", "n1"), {"metadata": {"name": "n1", "labels": {"zone": "a"}}, "spec": {}})
    assert assign(ipam, "z")[0] in ipaddress.ip_network("10.0.0.0/24")


# -- releasing blocks ---------------------------------------------------------------------------
def test_release_affinity_and_empty_blocks(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    a = assign(ipam, "a", num=16)
    b = assign(ipam, "b", num=16)
    c = assign(ipam, "c", num=1)
    assert len(ipam.affine_blocks("n1")) == 3
    block_c = str(ipaddress.ip_network(f"{c[0]}/28", strict=False))
    with pytest.raises(IPAMError, match="not empty"):
        ipam.release_affinity("n1", block_c)
    assert store.get(keys.affinity_key("n1", block_c)).value["state"] == "confirmed"
    ipam.release_ips(a + b)
    released = ipam.release_empty_affine_blocks("n1")
    assert len(released) == 2
    assert ipam.affine_blocks("n1") == [block_c]
    for cidr in released:
        with pytest.raises(NotFound):
            store.get(keys.block_key(cidr))
        with pytest.raises(NotFound):
            store.get(keys.affinity_key("n1", cidr))
    ipam.release_ips(c)
    assert ipam.release_empty_affine_blocks("n1") == []  # the last block is kept
    assert ipam.release_empty_affine_blocks("n1", keep_last=False) == [block_c]


def test_release_host_affinities_keeps_used_blocks_unowned(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    ip = assign(ipam, "a", num=20)[0]
    assign(ipam, "a2", num=1)
    ipam.release_ips(ipam.ips_by_handle("a")[16:])  # second block holds only a2 now
    assert len(ipam.release_host_affinities("n1")) == 2
    assert ipam.affine_blocks("n1") == []
    assert ipam.get_assignment(ip) is not None
    kept = block_of(store, str(ipaddress.ip_network(f"{ip}/28", strict=False)))
    assert kept.affinity is None


def test_empty_block_of_another_node_is_reclaimed_after_a_minute(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/28", 28)
    now = [1_000_000.0]
    ipam = new_ipam(store, clock=lambda: now[0])
    ipam.set_config(IPAMConfig(strict_affinity=True))  # otherwise n1 would simply borrow
    ip = assign(ipam, "a", "n2")[0]
    ipam.release_ips([ip])
    with pytest.raises(PoolExhaustedError):
        assign(ipam, "b", "n1")  # empty, but claimed too recently
    now[0] += 61
    assert assign(ipam, "b", "n1")
    assert ipam.affine_blocks("n1") == ["10.0.0.0/28"]
    assert ipam.affine_blocks("n2") == []


# -- concurrency --------------------------------------------------------------------------------
class ContendedStore:
    """Wraps MemoryDatastore: before some block updates, a rival writes the block first."""

    def __init__(self, inner: MemoryDatastore, every: int) -> None:
        self.inner = inner
        self.every = every
        self.updates = 0
        self.conflicts_caused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update(self, key: str, value: Any, revision: int) -> KV:
        if "/assignment/" in key or "/handle/" in key:
            self.updates += 1
            if self.updates % self.every:
                current = self.inner.get(key)
                self.inner.update(key, current.value, current.revision)  # bumps the revision
                self.conflicts_caused += 1
        return self.inner.update(key, value, revision)


def test_cas_retries_under_injected_conflicts(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    contended = ContendedStore(store, every=3)
    ipam = new_ipam(contended)
    ips = [ip for i in range(40) for ip in assign(ipam, f"h{i}")]
    assert len(set(ips)) == 40
    assert contended.conflicts_caused > 20
    ipam.release_ips(ips[:10])
    assert ipam_check.check(store).of_kind(ipam_check.HANDLE_COUNT) == []
    assert len(ipam_check.check(store).leaked_ips()) == 30


def test_too_many_conflicts_is_an_error_not_a_hang(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    assign(ipam, "warm")
    contended = ContendedStore(store, every=10**9)
    with pytest.raises(IPAMError, match="too many concurrent updates"):
        IPAM(contended, retries=5, cache_ttl=0).auto_assign(handle="x", attrs={}, node="n1")


def test_many_threads_many_instances_no_duplicates(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    results: dict[str, list[IP]] = {}
    errors: list[BaseException] = []

    def worker(name: str, node: str) -> None:
        ipam = IPAM(store, cache_ttl=1.0)
        try:
            for i in range(30):
                results[f"{name}-{i}"] = assign(ipam, f"{name}-{i}", node)
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(f"w{i}", f"n{i % 2}")) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    all_ips = [ip for ips in results.values() for ip in ips]
    assert len(all_ips) == 240 and len(set(all_ips)) == 240
    report = ipam_check.check(store)
    assert len(report.leaked_ips()) == 240  # no WorkloadEndpoints in this test
    assert [p for p in report.problems if p.kind != ipam_check.LEAK] == []
    for handle, ips in results.items():
        assert IPAM(store).ips_by_handle(handle) == ips


# -- check and felixctl ipam ----------------------------------------------------------------------
def add_wep(store: MemoryDatastore, name: str, ip: IP, node: str = "n1") -> None:
    store.create(
        keys.resource_key("workloadendpoints", name, "default"),
        {"apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
         "metadata": {"name": name, "namespace": "default"},
         "spec": {"node": node, "ipNetworks": [f"{ip}/32"]}},
    )


def test_check_finds_each_kind_of_problem(store: MemoryDatastore) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    used = assign(ipam, "used")[0]
    leaked = assign(ipam, "leaked")[0]
    tunnel = assign(ipam, "ipip-tunnel-addr-n1")[0]
    add_wep(store, "used", used)
    store.create(keys.resource_key("nodes", "n1"),
                 {"metadata": {"name": "n1"}, "spec": {"bgp": {"ipv4IPIPTunnelAddr": str(tunnel)}}})
    report = ipam_check.check(store)
    assert report.leaked_ips() == [str(leaked)]
    assert len(report.problems) == 1
    # Now break things in every other way.
    add_wep(store, "ghost", IP("10.0.0.250"))
    add_wep(store, "outside", IP("192.168.1.1"))
    add_wep(store, "twin", used)
    store.create(keys.handle_key("empty"), {"block": {"10.0.0.0/28": 1}, "deleted": False})
    kv = store.get(keys.handle_key("leaked"))
    store.delete(kv.key)
    kv = store.get(keys.handle_key("used"))
    used_block = next(iter(kv.value["block"]))
    store.update(kv.key, {"block": {used_block: 5}, "deleted": False}, kv.revision)
    store.create(keys.affinity_key("n9", "10.0.0.128/28"), {"state": "confirmed", "deleted": False})
    store.create(keys.block_key("10.0.0.64/28"), Block.new("10.0.0.64/28", "host:n8").to_json())
    report = ipam_check.check(store)
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == sorted([
        ipam_check.LEAK, ipam_check.NOT_ALLOCATED, ipam_check.NOT_ALLOCATED, ipam_check.OUTSIDE_POOLS,
        ipam_check.MULTIPLE_OWNERS, ipam_check.EMPTY_HANDLE, ipam_check.MISSING_HANDLE,
        ipam_check.HANDLE_COUNT, ipam_check.AFFINITY_WITHOUT_BLOCK, ipam_check.BLOCK_AFFINITY_NOT_CONFIRMED,
    ])
    assert report.lines()[-1] == f"Check complete; found {len(kinds)} problems."


def ctl(store: MemoryDatastore, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="felixctl")
    ipam_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = ipam_cmd.run(args, store, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_felixctl_ipam_show_check_release_configure(store: MemoryDatastore, tmp_path: Path) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    used = assign(ipam, "used", num=3)
    for i, ip in enumerate(used):
        add_wep(store, f"pod{i}", ip)
    leaked = assign(ipam, "leaked")[0]

    code, out, _ = ctl(store, "ipam", "show", "--show-blocks")
    assert code == 0
    assert "| GROUPING |" in out and "IPS IN USE" in out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    assert rows[0] == ["GROUPING", "CIDR", "IPS TOTAL", "IPS IN USE", "IPS RESERVED", "IPS FREE"]
    assert rows[1] == ["IP Pool", "10.0.0.0/24", "256", "4 (2%)", "0 (0%)", "252 (98%)"]
    assert rows[2][0] == "Block" and rows[2][2:] == ["16", "4 (25%)", "0 (0%)", "12 (75%)"]

    code, out, _ = ctl(store, "ipam", "show", f"--ip={leaked}")
    assert code == 0 and f"IP {leaked} is in use" in out and "Handle: leaked" in out
    code, out, _ = ctl(store, "ipam", "show", "--ip=10.0.0.200")
    assert "is not assigned" in out

    report_file = tmp_path / "report.json"
    code, out, _ = ctl(store, "ipam", "check", "-o", str(report_file))
    assert code == 0 and out.splitlines()[-2] == "Check complete; found 1 problems."
    assert json.loads(report_file.read_text())["leakedIPs"] == [str(leaked)]

    code, out, _ = ctl(store, "ipam", "release", f"--ip={leaked}")
    assert code == 0 and f"Successfully released IP address {leaked}" in out
    code, _, err = ctl(store, "ipam", "release", f"--ip={leaked}")
    assert code == 1 and err == f"error: IP address {leaked} is not assigned\n"
    code, out, _ = ctl(store, "ipam", "check")
    assert out.splitlines()[-1] == "Check complete; found 0 problems."

    code, _, err = ctl(store, "ipam", "configure", "--strictaffinity=false", "--max-blocks-per-host=3")
    assert code == 1 and err.count("\n") == 1 and "requires strict affinity" in err
    code, out, _ = ctl(store, "ipam", "configure", "--strictaffinity=true", "--max-blocks-per-host=3")
    assert code == 0
    code, out, _ = ctl(store, "ipam", "show", "--show-configuration")
    assert "| StrictAffinity     | true  |" in out and "| MaxBlocksPerHost   | 3     |" in out


def test_felixctl_release_from_report(store: MemoryDatastore, tmp_path: Path) -> None:
    add_pool(store, "p", "10.0.0.0/24", 28)
    ipam = new_ipam(store)
    leaks = assign(ipam, "leaked", num=2)
    report_file = tmp_path / "r.json"
    ctl(store, "ipam", "check", "-o", str(report_file))
    add_wep(store, "now-used", leaks[1])  # in use since the report: must not be released
    code, out, _ = ctl(store, "ipam", "release", "--from-report", str(report_file))
    assert code == 0 and "Released 1 of 2" in out
    assert ipam.get_assignment(leaks[0]) is None
    assert ipam.get_assignment(leaks[1]) is not None
