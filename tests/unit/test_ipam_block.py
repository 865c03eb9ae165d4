"""Block arithmetic: Calico's AllocationBlock layout, FIFO reuse, attribute compaction."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felixpy.ipam.block import AddressInUse, AddressNotInBlock, Block, BlockError, host_affinity

IP = ipaddress.IPv4Address


def test_new_block_layout_matches_calico() -> None:
    b = Block.new("10.0.1.0/26", host_affinity("n1"), "2024-01-01T00:00:00Z")
    value = b.to_json()
    assert value["cidr"] == "10.0.1.0/26"
    assert value["affinity"] == "host:n1"
    assert value["allocations"] == [None] * 64
    assert value["unallocated"] == list(range(64))
    assert value["attributes"] == []
    assert value["sequenceNumber"] == 0
    assert value["sequenceNumberForAllocation"] == {}
    assert value["deleted"] is False
    assert b.host == "n1"


def test_assign_takes_fifo_front_and_records_attributes() -> None:
    b = Block.new("10.0.1.0/28")
    ips = b.assign(2, "h1", {"node": "n1", "pod": "a"})
    assert ips == [IP("10.0.1.0"), IP("10.0.1.1")]
    v = b.to_json()
    assert v["allocations"][:3] == [0, 0, None]
    assert v["attributes"] == [{"handle_id": "h1", "secondary": {"node": "n1", "pod": "a"}}]
    assert v["sequenceNumberForAllocation"] == {"0": 0, "1": 1}
    assert v["sequenceNumber"] == 2
    # Released addresses go to the back of the FIFO: the longest-free address is reused first.
    b.release([IP("10.0.1.0")])
    assert b.unallocated[-1] == 0
    assert b.assign(1, "h2", {})[0] == IP("10.0.1.2")


def test_identical_attributes_are_shared_and_compacted_on_release() -> None:
    b = Block.new("10.0.1.0/28")
    b.assign(1, "h1", {"pod": "a"})
    b.assign(1, "h2", {"pod": "b"})
    b.assign(1, "h1", {"pod": "a"})
    assert len(b.attributes) == 2
    assert b.allocations[:3] == [0, 1, 0]
    b.release_by_handle("h1")
    assert b.attributes == [{"handle_id": "h2", "secondary": {"pod": "b"}}]
    assert b.allocations[1] == 0
    assert b.ips_for_handle("h2") == [IP("10.0.1.1")]


def test_release_reports_unallocated_and_counts_by_handle() -> None:
    b = Block.new("10.0.1.0/28")
    b.assign(3, "h1", {})
    missing, counts = b.release_counting([IP("10.0.1.0"), IP("10.0.1.1"), IP("10.0.1.9"), IP("10.0.1.1")])
    assert missing == [IP("10.0.1.9"), IP("10.0.1.1")]
    assert counts == {"h1": 2}
    with pytest.raises(AddressNotInBlock):
        b.release([IP("10.0.2.1")])


def test_assign_specific_ip() -> None:
    b = Block.new("10.0.1.0/28")
    b.assign_ip("10.0.1.5", "h1", {"pod": "a"})
    assert 5 not in b.unallocated
    alloc = b.allocation("10.0.1.5")
    assert alloc is not None and alloc.handle == "h1" and alloc.attrs == {"pod": "a"}
    with pytest.raises(AddressInUse):
        b.assign_ip("10.0.1.5", "h2", {})
    assert b.allocation("10.0.1.6") is None


def test_from_json_keeps_unknown_fields_and_rejects_bad_values() -> None:
    value = Block.new("10.0.1.0/30").to_json()
    value["hostAffinity"] = "legacy"
    assert Block.from_json(value).to_json()["hostAffinity"] == "legacy"
    with pytest.raises(BlockError):
        Block.from_json({"cidr": "10.0.1.0/30", "allocations": [None]})
    with pytest.raises(BlockError):
        Block.from_json({"allocations": []})


ops = st.lists(
    st.one_of(
        st.tuples(st.just("assign"), st.integers(0, 20), st.sampled_from(["h1", "h2", "h3"])),
        st.tuples(st.just("release"), st.lists(st.integers(0, 31), max_size=8), st.just("")),
        st.tuples(st.just("release_handle"), st.just(0), st.sampled_from(["h1", "h2", "h3"])),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_block_invariants_under_random_operations(script: list[tuple[str, object, str]]) -> None:
    b = Block.new("10.9.0.0/27")
    live: dict[IP, str] = {}  # model: address -> handle
    for op, arg, handle in script:
        if op == "assign":
            assert isinstance(arg, int)
            got = b.assign(arg, handle, {"pod": handle})
            assert len(got) == min(arg, 32 - len(live))
            for ip in got:
                assert ip not in live, "an address was handed out twice"
                live[ip] = handle
        elif op == "release":
            assert isinstance(arg, list)
            ips = [b.address(o) for o in arg]
            missing = b.release(ips)
            expected_missing = []
            for ip in ips:  # a duplicate in one request counts as not allocated the second time
                if ip in live:
                    del live[ip]
                else:
                    expected_missing.append(ip)
            assert missing == expected_missing
        else:
            released = b.release_by_handle(handle)
            assert sorted(released) == sorted(ip for ip, h in live.items() if h == handle)
            for ip in released:
                del live[ip]
        # Counts add up, and the FIFO and allocations agree.
        assert b.in_use_count() == len(live)
        assert b.free_count() + b.in_use_count() == b.size
        assert sorted(b.unallocated) == [o for o, a in enumerate(b.allocations) if a is None]
        assert b.is_empty() == (not live)
        counts: dict[str, int] = {}
        for h in live.values():
            counts[h] = counts.get(h, 0) + 1
        assert b.handle_counts() == counts
        # Attributes are compact: every entry is used.
        assert {a for a in b.allocations if a is not None} == set(range(len(b.attributes)))
        # JSON round trip (through real JSON text) is lossless.
        again = Block.from_json(json.loads(json.dumps(b.to_json())))
        assert again.to_json() == b.to_json()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 32))
def test_released_addresses_become_allocatable_again(n: int) -> None:
    b = Block.new("10.9.0.0/27")
    first = b.assign(32, "h", {})
    assert b.assign(1, "h", {}) == []
    b.release(first[:n])
    again = b.assign(32, "h2", {})
    assert sorted(again) == sorted(first[:n])
