"""bgp.rib: best-path selection, deltas, peer-down flush vs graceful-restart stale handling."""

from __future__ import annotations

import itertools

from hypothesis import given, strategies as st

from bgp.protocol import EndOfRib, OpenReceived, PathAttributes, ReceivedRoute, RoutesReceived, StateChange
from bgp.rib import Rib

P = "10.244.1.0/26"
A, B = "192.0.2.11", "192.0.2.12"


def route(next_hop: str, prefix: str = P, **attrs: object) -> ReceivedRoute:
    return ReceivedRoute(prefix, next_hop, PathAttributes(**attrs))  # type: ignore[arg-type]


def up(rib: Rib, peer: str, *, restart: int | None = None, router_id: str | None = None, now: float = 0.0) -> None:
    rib.open(peer, router_id=router_id or peer, graceful_restart_time=restart)
    rib.peer_up(peer, now=now)


def test_announce_withdraw_deltas():
    rib = Rib()
    up(rib, A)
    assert rib.update(A, [route(A)]) == {P: A}
    assert rib.update(A, [route(A)]) == {}  # same next hop again: nothing to program
    assert rib.best_routes() == {P: A}
    assert rib.update(A, withdrawn=[P]) == {P: None}
    assert rib.update(A, withdrawn=[P]) == {}
    assert rib.best_routes() == {}


def test_best_path_order():
    cases = [
        ({"local_preference": 200}, {"local_preference": 100}),
        ({"as_path": (1,)}, {"as_path": (1, 2)}),
        ({"origin": "igp"}, {"origin": "incomplete"}),
        ({"origin": "egp"}, {"origin": "incomplete"}),
        ({"med": 5}, {"med": 10}),
        # Local-pref beats a shorter AS path; AS path beats origin; origin beats MED.
        ({"local_preference": 200, "as_path": (1, 2, 3)}, {"as_path": (1,)}),
        ({"as_path": (1,), "origin": "incomplete"}, {"as_path": (1, 2), "origin": "igp"}),
        ({"origin": "igp", "med": 100}, {"origin": "egp", "med": 0}),
    ]
    for better, worse in cases:
        for better_first in (True, False):  # arrival order must not matter
            rib = Rib()
            up(rib, A)
            up(rib, B)
            updates = [(A, route("10.0.0.1", **better)), (B, route("10.0.0.2", **worse))]
            for peer, r in (updates if better_first else updates[::-1]):
                rib.update(peer, [r])
            assert rib.best_routes()[P] == "10.0.0.1", (better, worse)


def test_router_id_then_originator_id_tie_break():
    rib = Rib()
    up(rib, A, router_id="10.0.0.9")
    up(rib, B, router_id="10.0.0.1")
    rib.update(A, [route("10.1.1.1")])
    rib.update(B, [route("10.2.2.2")])
    assert rib.best_routes()[P] == "10.2.2.2"  # lower BGP identifier
    # A reflected route compares its ORIGINATOR_ID instead of the reflector's identifier.
    rib.update(A, [route("10.1.1.1", originator_id="10.0.0.0")])
    assert rib.best_routes()[P] == "10.1.1.1"


def test_failover_to_second_best_and_back():
    rib = Rib()
    up(rib, A)
    up(rib, B)
    rib.update(A, [route("10.0.0.1", local_preference=200)])
    rib.update(B, [route("10.0.0.2")])
    assert rib.update(A, withdrawn=[P]) == {P: "10.0.0.2"}
    assert rib.update(A, [route("10.0.0.1", local_preference=200)]) == {P: "10.0.0.1"}


def test_same_next_hop_from_two_peers_changes_nothing_on_failover():
    rib = Rib()
    up(rib, A)
    up(rib, B)
    rib.update(A, [route("10.0.0.7")])
    rib.update(B, [route("10.0.0.7")])
    assert rib.update(A, withdrawn=[P]) == {}
    assert rib.best(P).peer == B  # type: ignore[union-attr]


def test_peer_down_without_graceful_restart_flushes():
    rib = Rib()
    up(rib, A)
    rib.update(A, [route(A), route(A, "10.244.2.0/26")])
    assert rib.peer_down(A, now=10) == {P: None, "10.244.2.0/26": None}
    assert rib.adj_rib_in(A) == {}
    assert not rib.is_up(A)


def test_graceful_restart_keeps_stale_until_end_of_rib():
    rib = Rib()
    up(rib, A, restart=120)
    rib.update(A, [route(A), route(A, "10.244.2.0/26")])
    assert rib.peer_down(A, now=10) == {}
    assert all(p.stale for p in rib.adj_rib_in(A).values())
    assert rib.next_deadline() == 130
    assert rib.best_routes() == {P: A, "10.244.2.0/26": A}
    up(rib, A, restart=120, now=20)
    assert rib.update(A, [route(A)]) == {}  # refreshed, still the same next hop
    assert not rib.adj_rib_in(A)[P].stale
    assert rib.end_of_rib(A) == {"10.244.2.0/26": None}  # not re-announced before End-of-RIB
    assert rib.best_routes() == {P: A}
    assert rib.next_deadline() is None


def test_graceful_restart_timer_expiry():
    rib = Rib()
    up(rib, A, restart=30)
    rib.update(A, [route(A)])
    rib.peer_down(A, now=100)
    assert rib.expire(129) == {}
    assert rib.expire(130) == {P: None}
    assert rib.next_deadline() is None


def test_second_down_while_restarting_keeps_the_original_deadline():
    rib = Rib()
    up(rib, A, restart=30)
    rib.update(A, [route(A)])
    rib.peer_down(A, now=100)
    rib.peer_down(A, now=120)  # a failed reconnect attempt
    assert rib.next_deadline() == 130


def test_restarted_peer_without_graceful_restart_drops_stale_at_up():
    rib = Rib()
    up(rib, A, restart=120)
    rib.update(A, [route(A)])
    rib.peer_down(A, now=0)
    rib.open(A, router_id=A, graceful_restart_time=None)
    assert rib.peer_up(A, now=1) == {P: None}


def test_stale_path_timer_when_end_of_rib_never_comes():
    rib = Rib(stale_path_time=60)
    up(rib, A, restart=120)
    rib.update(A, [route(A)])
    rib.peer_down(A, now=0)
    rib.peer_up(A, now=5)
    assert rib.next_deadline() == 65
    assert rib.expire(65) == {P: None}


def test_stale_path_loses_to_nothing_but_keeps_best_until_dropped():
    rib = Rib()
    up(rib, A, restart=120)
    up(rib, B)
    rib.update(A, [route("10.0.0.1", local_preference=200)])
    rib.update(B, [route("10.0.0.2")])
    rib.peer_down(A, now=0)
    assert rib.best_routes()[P] == "10.0.0.1"
    assert rib.expire(200) == {P: "10.0.0.2"}


def test_apply_events_and_local_graceful_restart_switch():
    rib = Rib()
    events = [OpenReceived(A, A, 64512, 90, 120), StateChange(A, B, 64512, 64512, "up"),
              RoutesReceived(A, (route(A),)), StateChange(A, B, 64512, 64512, "down")]
    deltas = [rib.apply(e, now=0) for e in events]
    assert deltas == [{}, {}, {P: A}, {}]  # GR negotiated: kept stale
    assert rib.apply(EndOfRib(A), now=1) == {P: None}

    rib = Rib()
    deltas = [rib.apply(e, now=0, local_graceful_restart=False) for e in events]
    assert deltas[-1] == {P: None}  # we did not advertise GR: flush


def test_suspend_then_replay_keeps_routes_and_sweeps_the_rest():
    rib = Rib()
    up(rib, A)
    rib.update(A, [route(A), route(A, "10.244.2.0/26")])
    assert rib.suspend(now=0, hold=30) == {}
    # Replay from the sidecar: routes first, then state and End-of-RIB.
    replay = [OpenReceived(A, A, 64512, 90, None), RoutesReceived(A, (route(A),)),
              StateChange(A, B, 64512, 64512, "up"), EndOfRib(A)]
    deltas = [rib.apply(e, now=1) for e in replay]
    assert deltas == [{}, {}, {"10.244.2.0/26": None}, {}]  # up without GR drops what was not replayed
    assert rib.best_routes() == {P: A}


def test_remove_peer():
    rib = Rib()
    up(rib, A)
    rib.update(A, [route(A)])
    assert rib.remove_peer(A) == {P: None}
    assert not rib.is_up(A)


ops = st.lists(st.tuples(st.sampled_from([A, B, "192.0.2.13"]), st.sampled_from(["10.0.0.0/24", "10.0.1.0/24"]),
                         st.sampled_from(["ann", "wd"]), st.integers(50, 250)), max_size=30)


@given(ops)
def test_deltas_always_reproduce_the_best_routes(sequence):
    """Applying every returned delta to a dict gives exactly best_routes(), whatever the sequence."""
    rib = Rib()
    for peer in (A, B, "192.0.2.13"):
        up(rib, peer)
    kernel: dict[str, str] = {}
    for peer, prefix, op, pref in sequence:
        if op == "ann":
            delta = rib.update(peer, [route(f"10.9.{pref}.1", prefix, local_preference=pref)])
        else:
            delta = rib.update(peer, withdrawn=[prefix])
        for p, nh in delta.items():
            if nh is None:
                kernel.pop(p, None)
            else:
                kernel[p] = nh
        assert kernel == rib.best_routes()
        # The best path is the minimum of every candidate, independent of arrival order.
        for p, path in ((p, rib.best(p)) for p in kernel):
            candidates = [rib.adj_rib_in(x).get(p) for x in (A, B, "192.0.2.13")]
            assert path == min((c for c in candidates if c), key=lambda c: c.sort_key())


def test_prefix_normalisation():
    rib = Rib()
    up(rib, A)
    assert rib.update(A, [route(A, "10.244.1.0/26")]) == {P: A}
    assert list(itertools.islice(rib.best_routes(), 1)) == [P]
