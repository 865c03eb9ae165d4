"""bgp.sidecar + bgp.client over a real unix socket, with a scripted fake ExaBGP on the pipes.

No root and no network: the "ExaBGP" side is two pipes the test writes JSON lines into and reads
commands from, exactly as ExaBGP talks to its API process.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from bgp.client import CommandFailed, SidecarClient, SidecarUnavailable
from bgp.protocol import (EndOfRib, Event, OpenReceived, ReceivedRoute, ReplayDone, RoutesReceived,
                          StateChange)
from bgp.sidecar import RouteCache, run

PEER = "192.0.2.1"


def exa_state(state: str, peer: str = PEER) -> str:
    return json.dumps({"exabgp": "5.0.0", "time": 1.0, "type": "state", "neighbor": {
        "address": {"local": "192.0.2.11", "peer": peer}, "asn": {"local": 64512, "peer": 64512},
        "state": state}})


def exa_open(restart: int | None, peer: str = PEER) -> str:
    caps: dict[str, object] = {"1": {"name": "multiprotocol", "families": ["ipv4/unicast"]}}
    if restart is not None:
        caps["64"] = {"name": "graceful restart", "time": restart, "address-family-flags": {"ipv4/unicast": []}}
    return json.dumps({"exabgp": "5.0.0", "time": 1.0, "type": "open", "neighbor": {
        "address": {"local": "192.0.2.11", "peer": peer}, "asn": {"local": 64512, "peer": 64512},
        "direction": "receive", "open": {"asn": 64512, "hold_time": 90, "router_id": peer, "capabilities": caps}}})


def exa_update(announce: list[str] = [], withdraw: list[str] = [], peer: str = PEER) -> str:
    update: dict[str, object] = {"attribute": {"origin": "igp", "local-preference": 100}}
    if announce:
        update["announce"] = {"ipv4 unicast": {peer: [{"nlri": p} for p in announce]}}
    if withdraw:
        update["withdraw"] = {"ipv4 unicast": [{"nlri": p} for p in withdraw]}
    return json.dumps({"exabgp": "5.0.0", "time": 1.0, "type": "update", "neighbor": {
        "address": {"local": "192.0.2.11", "peer": peer}, "asn": {"local": 64512, "peer": 64512},
        "direction": "receive", "message": {"update": update}}})


def exa_eor(peer: str = PEER) -> str:
    return json.dumps({"exabgp": "5.0.0", "time": 1.0, "type": "update", "neighbor": {
        "address": {"local": "192.0.2.11", "peer": peer}, "asn": {"local": 64512, "peer": 64512},
        "direction": "receive", "message": {"eor": {"afi": "ipv4", "safi": "unicast"}}}})


class FakeExaBGP:
    """The ExaBGP end of the API pipes, running the real sidecar loop in a thread."""

    def __init__(self, socket_path: str, max_backlog: int = 1000) -> None:
        to_sidecar_r, self._to_sidecar_w = os.pipe()
        self._from_sidecar_r, from_sidecar_w = os.pipe()
        self.writer = io.open(self._to_sidecar_w, "w", buffering=1)
        self.reader = io.open(self._from_sidecar_r, "r")
        stdin = io.open(to_sidecar_r, "r")
        stdout = io.open(from_sidecar_w, "w", buffering=1)
        ready = threading.Event()
        self.thread = threading.Thread(target=run, args=(socket_path, stdin, stdout),
                                       kwargs={"max_backlog": max_backlog, "on_ready": ready.set}, daemon=True)
        self.thread.start()
        assert ready.wait(5)

    def send(self, *lines: str) -> None:
        self.writer.write("".join(line + "\n" for line in lines))

    def answer(self, reply: str = "done", output: tuple[str, ...] = ()) -> str:
        """Read one command from the sidecar and answer it."""
        command = self.reader.readline().rstrip("\n")
        self.send(*output, reply)
        return command

    def close(self) -> None:
        self.writer.close()  # EOF: the sidecar must exit
        self.thread.join(5)
        self.reader.close()


@pytest.fixture
def exa(tmp_path: Path) -> Iterator[FakeExaBGP]:
    fake = FakeExaBGP(str(tmp_path / "s.sock"))
    yield fake
    if fake.thread.is_alive():
        fake.close()


def events_until(client: SidecarClient, predicate, timeout: float = 5.0) -> list[Event]:
    got: list[Event] = []
    deadline = time.monotonic() + timeout
    while not (got and predicate(got[-1])):
        assert time.monotonic() < deadline, f"timed out; got {got}"
        event = client.next_event(0.2)
        if event is not None:
            got.append(event)
    return got


def test_route_cache_snapshot_orders_routes_before_state_and_sweeps_on_eor():
    cache = RouteCache()
    r1, r2 = ReceivedRoute("10.0.0.0/24", PEER), ReceivedRoute("10.0.1.0/24", PEER)
    up = StateChange(PEER, "192.0.2.11", 64512, 64512, "up")
    opened = OpenReceived(PEER, PEER, 64512, 90, 120)
    for event in (opened, up, RoutesReceived(PEER, (r1, r2)), EndOfRib(PEER)):
        cache.apply(event)
    assert cache.snapshot() == [opened, RoutesReceived(PEER, (r1, r2)), up, EndOfRib(PEER)]
    # Graceful restart: down keeps the routes; after up, End-of-RIB drops the ones not re-announced.
    down = StateChange(PEER, "192.0.2.11", 64512, 64512, "down", "hold timer")
    cache.apply(down)
    assert cache.routes(PEER) == {r1.prefix: r1, r2.prefix: r2}
    cache.apply(StateChange(PEER, "192.0.2.11", 64512, 64512, "connected"))
    cache.apply(up)
    cache.apply(RoutesReceived(PEER, (r2,)))
    cache.apply(EndOfRib(PEER))
    assert cache.routes(PEER) == {r2.prefix: r2}


def test_route_cache_down_without_graceful_restart_forgets_routes():
    cache = RouteCache()
    cache.apply(OpenReceived(PEER, PEER, 64512, 90, None))
    cache.apply(RoutesReceived(PEER, (ReceivedRoute("10.0.0.0/24", PEER),)))
    cache.apply(StateChange(PEER, "192.0.2.11", 64512, 64512, "down"))
    assert cache.routes(PEER) == {}


def test_events_commands_acks_and_replay(exa: FakeExaBGP, tmp_path: Path):
    client = SidecarClient(str(tmp_path / "s.sock"))
    client.connect(timeout=5)
    assert events_until(client, lambda e: isinstance(e, ReplayDone)) == [ReplayDone()]  # nothing cached yet

    exa.send(exa_open(120), exa_state("connected"), exa_state("up"), exa_update(["10.0.0.0/24", "10.0.1.0/24"]))
    got = events_until(client, lambda e: isinstance(e, RoutesReceived))
    assert [type(e).__name__ for e in got] == ["OpenReceived", "StateChange", "StateChange", "RoutesReceived"]

    answered: list[str] = []
    helper = threading.Thread(target=lambda: answered.append(exa.answer("done")))
    helper.start()
    assert client.announce("10.244.1.0/26", "192.0.2.11").ok
    helper.join(5)
    assert answered == ["announce route 10.244.1.0/26 next-hop 192.0.2.11"]

    helper = threading.Thread(target=lambda: answered.append(exa.answer("error")))
    helper.start()
    with pytest.raises(CommandFailed, match="withdraw route 10.9.0.0/24"):
        client.withdraw("10.9.0.0/24")
    helper.join(5)

    helper = threading.Thread(target=lambda: exa.answer("done", output=("line one", "line two")))
    helper.start()
    result = client.command("show adj-rib in")
    helper.join(5)
    assert result.output == ("line one", "line two")

    # The agent goes away; updates keep flowing into the cache; a new agent gets the replay.
    client.close()
    exa.send(exa_update(withdraw=["10.0.0.0/24"]), exa_update(["10.0.2.0/24"]), exa_eor())
    time.sleep(0.2)
    again = SidecarClient(str(tmp_path / "s.sock"))
    again.connect(timeout=5)
    replay = events_until(again, lambda e: isinstance(e, ReplayDone))
    assert isinstance(replay[0], OpenReceived)
    routes = {r.prefix for e in replay if isinstance(e, RoutesReceived) for r in e.announced}
    assert routes == {"10.0.1.0/24", "10.0.2.0/24"}
    assert [e.state for e in replay if isinstance(e, StateChange)] == ["up"]
    assert isinstance(replay[-2], EndOfRib)
    again.close()


def test_pipelined_commands_get_their_own_results_in_order(exa: FakeExaBGP, tmp_path: Path):
    client = SidecarClient(str(tmp_path / "s.sock"))
    client.connect(timeout=5)
    prefixes = [f"10.1.{i}.0/24" for i in range(5)]

    def answer_all() -> None:
        for i in range(2):
            exa.answer("done" if i == 0 else "error")

    helper = threading.Thread(target=answer_all)
    helper.start()
    futures = [client.submit(c) for c in (f"announce attributes next-hop 192.0.2.11 nlri {' '.join(prefixes)}",
                                          "bogus command")]
    results = [f.result(timeout=5) for f in futures]
    helper.join(5)
    assert [r.ok for r in results] == [True, False]
    client.close()


def test_slow_agent_never_blocks_exabgp_and_is_cut_off(tmp_path: Path):
    exa = FakeExaBGP(str(tmp_path / "s.sock"), max_backlog=500)
    try:
        stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect(str(tmp_path / "s.sock"))  # connected, but never reads
        exa.send(exa_open(None), exa_state("up"))
        start = time.monotonic()
        for i in range(3000):  # ~1.5 MB: far beyond what the socket buffers hold
            exa.send(exa_update([f"10.{i // 256}.{i % 256}.0/24"]))
        exa.send(exa_eor())
        elapsed = time.monotonic() - start
        assert elapsed < 5, f"feeding the sidecar blocked for {elapsed:.1f}s"

        # The sidecar gave up on it: draining what was buffered ends in EOF.
        stalled.settimeout(10)
        while stalled.recv(65536):
            pass
        stalled.close()

        fresh = SidecarClient(str(tmp_path / "s.sock"))
        fresh.connect(timeout=5)
        # Replay, then whatever the sidecar had not parsed yet arrives live; the End-of-RIB is last.
        got = events_until(fresh, lambda e: isinstance(e, ReplayDone), timeout=10)
        if not any(isinstance(e, EndOfRib) for e in got):
            got += events_until(fresh, lambda e: isinstance(e, EndOfRib), timeout=10)
        routes = {r.prefix for e in got if isinstance(e, RoutesReceived) for r in e.announced}
        assert len(routes) == 3000
        fresh.close()
    finally:
        exa.close()


def test_sidecar_exits_and_removes_socket_on_exabgp_eof(exa: FakeExaBGP, tmp_path: Path):
    client = SidecarClient(str(tmp_path / "s.sock"))
    client.connect(timeout=5)
    exa.close()
    assert not exa.thread.is_alive()
    assert not (tmp_path / "s.sock").exists()
    with pytest.raises(SidecarUnavailable):
        while True:
            client.next_event(1)


def test_client_errors_when_nothing_listens(tmp_path: Path):
    client = SidecarClient(str(tmp_path / "missing.sock"))
    with pytest.raises(SidecarUnavailable, match="cannot connect"):
        client.connect(timeout=0.2)
    with pytest.raises(SidecarUnavailable):
        client.submit("announce eor ipv4 unicast")
