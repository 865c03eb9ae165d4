"""RouteTable against a stateful fake netlink: reconciliation, ownership by proto, drift, failures."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from felixpy import names
from felixpy.dataplane.drivers.routes import RouteTable, kernel_route
from felixpy.kernel.netlink import SCOPE_LINK, KernelRoute
from felixpy.messages import Route
from tests.fakes.netlink import FakeNetlink

PROTO = names.ROUTE_PROTO

def kernel_view(nl: FakeNetlink) -> dict[str, tuple[str, str | None, int | None, bool]]:
    return {dst: (r.type, r.gateway, r.ifindex, r.onlink) for dst, r in nl.ours().items()}


BLOCK = Route("10.244.1.0/26", type="blackhole")
REMOTE = Route("10.244.2.0/26", gateway="192.0.2.12", iface="eth0", onlink=True)
POD = Route("10.244.1.5/32", iface="cali1234567890a")


@pytest.fixture
def nl() -> FakeNetlink:
    return FakeNetlink({"lo": 1, "eth0": 2, "cali1234567890a": 7})


def test_first_apply_programs_everything_and_second_apply_does_no_io(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK, REMOTE, POD])
    result = table.apply()
    assert sorted(result.added) == sorted([BLOCK.dst, REMOTE.dst, POD.dst])
    assert kernel_view(nl) == {
        BLOCK.dst: ("blackhole", None, None, False),
        REMOTE.dst: ("unicast", "192.0.2.12", 2, True),
        POD.dst: ("unicast", None, 7, False),
    }
    assert nl.ours()[POD.dst].scope == SCOPE_LINK
    nl.calls.clear()
    table.set_routes([POD, REMOTE, BLOCK])  # same set, other order
    assert not table.apply().changed
    assert nl.calls == []


def test_incremental_change_touches_only_changed_destinations(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK, REMOTE, POD])
    table.apply()
    nl.calls.clear()
    moved = Route(REMOTE.dst, gateway="192.0.2.13", iface="eth0", onlink=True)
    table.set_routes([BLOCK, moved])
    result = table.apply()
    assert result.replaced == (REMOTE.dst,)
    assert result.deleted == (POD.dst,)
    assert sorted(nl.mutating_calls()) == [("delete_route", POD.dst), ("replace_route", REMOTE.dst)]
    assert kernel_view(nl)[REMOTE.dst][1] == "192.0.2.13"


def test_foreign_routes_are_never_touched(nl: FakeNetlink) -> None:
    foreign = KernelRoute(dst="10.9.0.0/24", gateway="192.0.2.1", ifindex=2, proto=12)
    clash = KernelRoute(dst=BLOCK.dst, gateway="192.0.2.99", ifindex=2, proto=12)
    nl.routes[(254, foreign.dst, 0)] = foreign
    nl.routes[(254, clash.dst, 0)] = clash
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    result = table.apply()
    assert BLOCK.dst in result.failed and "another proto" in result.failed[BLOCK.dst]
    assert nl.routes[(254, clash.dst, 0)] == clash
    table.set_routes([])
    table.queue_resync()
    table.apply()
    assert nl.routes[(254, foreign.dst, 0)] == foreign
    assert nl.routes[(254, clash.dst, 0)] == clash


def test_first_apply_sweeps_our_stale_routes(nl: FakeNetlink) -> None:
    stale = KernelRoute(dst="10.244.9.0/26", type="blackhole", proto=PROTO)
    nl.routes[(254, stale.dst, 0)] = stale
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    result = table.apply()
    assert result.deleted == (stale.dst,)
    assert set(nl.ours()) == {BLOCK.dst}


def test_resync_repairs_drift(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK, REMOTE, POD])
    table.apply()
    del nl.routes[(254, POD.dst, 0)]  # someone deleted it by hand
    nl.routes[(254, REMOTE.dst, 0)] = replace(nl.ours()[REMOTE.dst], gateway="192.0.2.66")
    assert not table.apply().changed  # without a resync the cache is trusted
    table.queue_resync()
    result = table.apply()
    assert result.added == (POD.dst,) and result.replaced == (REMOTE.dst,)
    assert kernel_view(nl)[REMOTE.dst][1] == "192.0.2.12"


def test_route_waits_for_its_interface(nl: FakeNetlink) -> None:
    later = Route("10.244.1.9/32", iface="calinotyet00000")
    table = RouteTable(netlink=nl)
    table.set_routes([later])
    assert table.apply().pending == (later.dst,)
    assert table.apply().pending == (later.dst,)
    nl.add_link("calinotyet00000", 11)
    result = table.apply()
    assert result.added == (later.dst,) and result.pending == ()
    assert kernel_view(nl)[later.dst] == ("unicast", None, 11, False)


def test_programmed_holds_exactly_the_desired_values_the_kernel_has(nl: FakeNetlink) -> None:
    later = Route("10.244.1.9/32", iface="calinotyet00000")
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK, POD, later])
    assert table.programmed == {}  # declared is not programmed
    table.apply()
    assert dict(table.programmed) == {BLOCK.dst: BLOCK, POD.dst: POD}  # `later` waits for its iface
    moved = Route(POD.dst, iface="eth0")
    table.set_routes([BLOCK, moved, later])
    assert table.programmed[POD.dst] != moved  # the kernel still has the old value
    nl.fail_next.add("replace_route")
    table.apply()
    assert POD.dst not in table.programmed  # failed: not claimed either way
    nl.add_link("calinotyet00000", 11)
    table.apply()
    assert dict(table.programmed) == {BLOCK.dst: BLOCK, moved.dst: moved, later.dst: later}
    table.set_routes([BLOCK])
    table.apply()
    assert dict(table.programmed) == {BLOCK.dst: BLOCK}


def test_recreated_interface_gets_its_route_back_after_resync(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([POD])
    table.apply()
    nl.remove_link("cali1234567890a")
    nl.add_link("cali1234567890a", 12)
    table.queue_resync()
    assert table.apply().added == (POD.dst,)
    assert kernel_view(nl)[POD.dst][2] == 12


def test_other_metric_copies_of_ours_are_removed(nl: FakeNetlink) -> None:
    extra = KernelRoute(dst=BLOCK.dst, type="blackhole", proto=PROTO, priority=50)
    nl.routes[(254, BLOCK.dst, 50)] = extra
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    assert [k for k in nl.routes] == [(254, BLOCK.dst, 0)]


@pytest.mark.parametrize(
    "op", ["add_route", "replace_route", "delete_route", "link_index", "list_routes"]
)
def test_failures_are_reported_and_repaired_on_the_next_apply(nl: FakeNetlink, op: str) -> None:
    stale = KernelRoute(dst="10.244.9.0/26", type="blackhole", proto=PROTO)
    wrong = KernelRoute(dst=REMOTE.dst, gateway="192.0.2.66", ifindex=2, proto=PROTO)
    nl.routes[(254, stale.dst, 0)] = stale
    nl.routes[(254, wrong.dst, 0)] = wrong
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK, REMOTE, POD])
    nl.fail_next.add(op)
    first = table.apply()
    assert first.failed, f"injected {op} failure not reported"
    assert all("injected failure" in msg for msg in first.failed.values())
    nl.calls.clear()
    second = table.apply()
    assert not second.failed
    assert ("list_routes", str(PROTO)) in nl.calls  # re-read after an error
    assert kernel_view(nl) == {
        BLOCK.dst: ("blackhole", None, None, False),
        REMOTE.dst: ("unicast", "192.0.2.12", 2, True),
        POD.dst: ("unicast", None, 7, False),
    }


def test_deleting_an_already_gone_route_is_fine(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([POD])
    table.apply()
    nl.remove_link("cali1234567890a")  # the pod went away: the kernel dropped its route
    table.set_routes([])
    result = table.apply()
    assert result.deleted == (POD.dst,) and not result.failed


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dst": "10.0.0.0/24"},
        {"dst": "10.0.0.0/24", "type": "blackhole", "iface": "eth0"},
        {"dst": "10.0.0.0/24", "gateway": "192.0.2.1", "onlink": True},
        {"dst": "10.0.0.0/33", "iface": "eth0"},
        {"dst": "10.0.0.0/24", "type": "multicast", "iface": "eth0"},
    ],
)
def test_invalid_routes_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Route(**kwargs)  # type: ignore[arg-type]


def test_dst_is_normalised_and_conflicting_duplicates_rejected(nl: FakeNetlink) -> None:
    assert Route("10.0.0.7/24", iface="eth0").dst == "10.0.0.0/24"
    table = RouteTable(netlink=nl)
    with pytest.raises(ValueError, match="two desired routes"):
        table.set_routes([Route("10.0.0.0/24", iface="eth0"), Route("10.0.0.0/24", type="blackhole")])


_targets = st.sampled_from(
    [
        {"type": "blackhole"},
        {"gateway": "192.0.2.12", "iface": "eth0", "onlink": True},
        {"gateway": "192.0.2.13", "iface": "eth0", "onlink": True},
        {"iface": "cali1234567890a"},
        {"gateway": "192.0.2.1"},
    ]
)
_desired_sets = st.dictionaries(
    st.sampled_from([f"10.244.{i}.0/26" for i in range(6)]), _targets, max_size=6
)


@settings(max_examples=60, deadline=None)
@given(
    states=st.lists(_desired_sets, min_size=1, max_size=5),
    failures=st.lists(st.sampled_from(["add_route", "replace_route", "delete_route", ""]), max_size=5),
)
def test_converges_to_any_sequence_of_desired_sets(
    states: list[dict[str, dict[str, object]]], failures: list[str]
) -> None:
    nl = FakeNetlink({"eth0": 2, "cali1234567890a": 7})
    table = RouteTable(netlink=nl)
    for i, state in enumerate(states):
        routes = [Route(dst, **kw) for dst, kw in state.items()]  # type: ignore[arg-type]
        table.set_routes(routes)
        if i < len(failures) and failures[i]:
            nl.fail_next.add(failures[i])
        table.apply()
        table.apply()  # any injected failure is repaired by the next apply
        assert set(nl.ours()) == set(state)
        assert set(table.programmed.values()) == set(routes)
        for route in routes:
            got = nl.ours()[route.dst]
            assert got.type == route.type and got.gateway == route.gateway
            if route.iface:
                assert got.ifindex == nl.links[route.iface]


# -- routes the CNI path wrote (RouteTable.adopt) --------------------------------------------------

def cni_route(nl: FakeNetlink, route: Route) -> KernelRoute:
    """Write route into the fake kernel as the CNI path does (kernel_route's value, our proto)."""
    written = kernel_route(route, nl.links[route.iface] if route.iface else None)
    nl.routes[(written.table, written.dst, written.priority)] = written
    return written


def test_adopted_route_is_found_right_and_never_rewritten(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    written = cni_route(nl, POD)
    table.adopt([written], hold=10.0)
    nl.calls.clear()
    table.set_routes([BLOCK, POD])  # the pod's WorkloadEndpoint arrives
    result = table.apply()
    assert nl.mutating_calls() == []
    assert not result.changed and result.failed == {}
    assert table.programmed[POD.dst] == POD


def test_adopted_route_named_with_its_interface_needs_no_link_lookup(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    assert POD.iface is not None
    table.adopt([cni_route(nl, POD)], hold=10.0, iface=POD.iface)
    nl.calls.clear()
    table.set_routes([BLOCK, POD])
    result = table.apply()
    assert nl.calls == [] and not result.changed and table.programmed[POD.dst] == POD
    # Only that first reconcile trusts the CNI path's index: later ones ask the kernel again.
    table.queue_resync()
    table.apply()
    assert ("link_index", POD.iface) in nl.calls


def test_adopted_interface_hint_is_ignored_for_another_interface(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    table.adopt([cni_route(nl, POD)], hold=10.0, iface="cali-other")
    nl.calls.clear()
    table.set_routes([BLOCK, POD])
    table.apply()
    assert ("link_index", POD.iface) in nl.calls and table.programmed[POD.dst] == POD


def test_adopted_route_is_held_until_its_endpoint_arrives(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    table.adopt([cni_route(nl, POD)], hold=10.0)
    table.queue_resync()  # even a full read-back in between does not sweep it
    result = table.apply()
    assert POD.dst in nl.ours() and result.deleted == ()
    assert result.pending == (POD.dst,)  # revisited on the next applies until claimed or expired
    table.set_routes([BLOCK, POD])
    nl.calls.clear()
    assert table.apply().pending == ()
    assert nl.mutating_calls() == [] and table.programmed[POD.dst] == POD


def test_adopted_route_nobody_claims_goes_once_the_hold_ends(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    table.adopt([cni_route(nl, POD)], hold=0.0)  # the ADD gave up without removing its veth
    result = table.apply()
    assert result.deleted == (POD.dst,)
    assert POD.dst not in nl.ours()


def test_adopted_route_whose_veth_went_is_forgotten_quietly(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK])
    table.apply()
    table.adopt([cni_route(nl, POD)], hold=0.0)
    nl.remove_link(POD.iface)  # a failed ADD removed its veth, the kernel the route with it
    result = table.apply()
    assert result.failed == {} and POD.dst not in nl.ours()


def test_adopting_a_re_created_veth_route_keeps_the_endpoint_programmed(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    table.set_routes([BLOCK, POD])
    table.apply()
    # A repeated ADD re-creates the pod's veth under a new index: the old route went with it.
    nl.remove_link(POD.iface)
    nl.add_link(POD.iface, 9)
    table.adopt([cni_route(nl, POD)], hold=10.0)
    nl.calls.clear()
    result = table.apply()
    assert nl.mutating_calls() == [] and result.failed == {}
    assert nl.ours()[POD.dst].ifindex == 9 and table.programmed[POD.dst] == POD


def test_adopt_refuses_a_route_of_another_proto(nl: FakeNetlink) -> None:
    table = RouteTable(netlink=nl)
    with pytest.raises(ValueError):
        table.adopt([replace(kernel_route(POD, 7), proto=3)], hold=1.0)
