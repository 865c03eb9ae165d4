"""The agent's BGP controller with a fake sidecar link: config rendering and reload, announcements
(affinities, borrowed /32s, disableBGPExport), learned routes merged into the route manager, and
the replay after an agent or sidecar restart."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from bgp.protocol import (CommandResult, EndOfRib, Event, OpenReceived, ReceivedRoute, ReplayDone,
                          RoutesReceived, StateChange)
from felixpy.calc.dispatcher import Dispatcher
from felixpy.calc.graph import CalcGraph
from felixpy.dataplane.drivers.routes import ApplyResult, RouteTable
from felixpy.dataplane.managers.routes import RouteManager, merge_learned
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.messages import CalcRoutes, LearnedRoutes, Route
from felixpy.node.bgp import (AdjRibOut, BGPController, BGPPaths, SidecarConnected, SidecarEvent,
                              SidecarLost, parse_adj_rib_out)
from tests.fakes.clock import FakeClock
from tests.fakes.netlink import FakeNetlink

N1, N2, N3 = "192.0.2.11", "192.0.2.12", "192.0.2.13"


class FakeLink:
    def __init__(self) -> None:
        self.commands: list[str] = []
        self.outputs: dict[str, tuple[str, ...]] = {}

    def connect(self, timeout: float = 10.0) -> None:
        pass

    def close(self) -> None:
        pass

    def submit(self, command: str) -> "Future[CommandResult]":
        self.commands.append(command)
        future: Future[CommandResult] = Future()
        future.set_result(CommandResult(len(self.commands), True, self.outputs.get(command, ())))
        return future

    def next_event(self, timeout: float | None = None) -> Event | None:
        return None

    def take(self) -> list[str]:
        taken, self.commands = self.commands, []
        return taken


def feed(consumer: Any, *updates: KVUpdate) -> None:
    Dispatcher(consumer).on_updates(updates)


def node(name: str, ip: str, **bgp: Any) -> KVUpdate:
    value = {"kind": "Node", "metadata": {"name": name}, "spec": {"bgp": {"ipv4Address": f"{ip}/24", **bgp}}}
    return KVUpdate(keys.resource_key("nodes", name), value, 1)


def peer(name: str, **spec: Any) -> KVUpdate:
    return KVUpdate(keys.resource_key("bgppeers", name), {"kind": "BGPPeer", "metadata": {"name": name},
                                                           "spec": spec}, 1)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[BGPController, FakeLink, FakeClock, list[int], list[Any]]:
    link, clock = FakeLink(), FakeClock()
    reloads: list[int] = []
    posted: list[Any] = []

    def reload() -> bool:
        reloads.append(1)
        return True

    paths = BGPPaths(config=str(tmp_path / "exabgp.conf"), pid_file=str(tmp_path / "pid"),
                     socket=str(tmp_path / "s.sock"), status=str(tmp_path / "status.json"),
                     python="/usr/bin/python3", sync_timeout=10.0)
    ctl = BGPController("n1", paths, link=link, reload=reload, clock=clock)
    ctl._post = posted.append  # what start() sets, without the link thread
    ctl._started_at = clock.now
    feed(ctl, node("n1", N1), node("n2", N2))
    ctl.datastore_in_sync()
    return ctl, link, clock, reloads, posted


def connect(ctl: BGPController, generation: int, *events: Event) -> None:
    ctl.on_message(SidecarConnected(generation))
    for event in (*events, ReplayDone()):
        ctl.on_message(SidecarEvent(generation, event))


def state(peer_ip: str, value: str) -> StateChange:
    return StateChange(peer_ip, N1, 64512, 64512, value)


def test_config_rendered_written_and_reloaded_only_on_change(setup: Any, tmp_path: Path) -> None:
    ctl, link, _, reloads, _ = setup
    ctl.sync()
    text = (tmp_path / "exabgp.conf").read_text()
    assert f"neighbor {N2} {{" in text and "local-as 64512;" in text and "router-id 192.0.2.11;" in text
    assert "run /usr/bin/python3 -m bgp.sidecar --socket" in text
    assert reloads == [1]
    ctl.sync()
    assert reloads == [1]  # unchanged: no reload
    feed(ctl, node("n3", N3))
    ctl.sync()
    assert f"neighbor {N3} {{" in (tmp_path / "exabgp.conf").read_text()
    assert reloads == [1, 1]
    assert [p.address for p in ctl.peers] == [N2, N3]
    assert link.take() == []  # nothing announced before the sidecar's replay


def test_invalid_bgppeer_keeps_the_previous_config(setup: Any, tmp_path: Path) -> None:
    ctl, _, _, reloads, _ = setup
    ctl.sync()
    before = (tmp_path / "exabgp.conf").read_text()
    feed(ctl, peer("bad", peerIP="300.1.1.1", asNumber=65000))
    ctl.sync()
    assert (tmp_path / "exabgp.conf").read_text() == before and reloads == [1]
    assert "spec.peerIP" in ctl.status()["configError"]


def test_announces_after_replay_then_diffs_and_withdraws(setup: Any) -> None:
    ctl, link, _, _, _ = setup
    ctl.set_announcements({"10.244.1.0/26"})
    ctl.sync()
    assert link.take() == []
    connect(ctl, 1)
    ctl.sync()
    assert link.take() == [
        f"announce attributes next-hop {N1} nlri 10.244.1.0/26",
        "show adj-rib out",
    ]
    ctl.set_announcements({"10.244.1.0/26", "10.244.2.7/32"})
    ctl.sync()
    assert link.take() == [f"announce attributes next-hop {N1} nlri 10.244.2.7/32"]
    ctl.set_announcements({"10.244.2.7/32"})
    ctl.sync()
    assert link.take() == [f"withdraw attributes next-hop {N1} nlri 10.244.1.0/26"]
    ctl.sync()
    assert link.take() == []


def test_peer_up_gets_announcements_and_end_of_rib(setup: Any) -> None:
    ctl, link, _, _, _ = setup
    ctl.set_announcements({"10.244.1.0/26"})
    ctl.sync()
    connect(ctl, 1)
    ctl.sync()
    link.take()
    ctl.on_message(SidecarEvent(1, state(N2, "up")))
    ctl.sync()
    assert link.take() == [
        f"neighbor {N2} announce attributes next-hop {N1} nlri 10.244.1.0/26",
        f"neighbor {N2} announce eor ipv4 unicast",
    ]
    assert ctl.status()["peers"][0]["state"] == "Established"


def test_learned_routes_and_graceful_restart_flush(setup: Any) -> None:
    ctl, _, clock, _, _ = setup
    ctl.sync()
    connect(ctl, 1, OpenReceived(N2, N2, 64512, 90, None), state(N2, "up"),
            RoutesReceived(N2, (ReceivedRoute("10.244.2.0/26", N2),)))
    assert ctl.ready_for_dataplane()
    assert ctl.routes_dirty
    assert ctl.learned_routes() == {"10.244.2.0/26": N2}
    assert not ctl.routes_dirty
    # No graceful restart offered by the peer: its routes go with the session.
    ctl.on_message(SidecarEvent(1, state(N2, "down")))
    assert ctl.learned_routes() == {}


def test_sidecar_restart_keeps_routes_and_reannounces(setup: Any) -> None:
    ctl, link, clock, _, _ = setup
    ctl.set_announcements({"10.244.1.0/26"})
    ctl.sync()
    route = RoutesReceived(N2, (ReceivedRoute("10.244.2.0/26", N2),))
    connect(ctl, 1, OpenReceived(N2, N2, 64512, 90, 120), state(N2, "up"), route, EndOfRib(N2))
    ctl.sync()
    link.take()
    # ExaBGP (and its sidecar) dies: the RIB keeps everything as stale, the kernel keeps the routes.
    ctl.on_message(SidecarLost(1, "gone"))
    assert ctl.learned_routes() == {"10.244.2.0/26": N2}
    ctl.sync()
    assert link.take() == []
    clock.now += 5
    # The new ExaBGP's sidecar has an empty cache; the peer comes back and re-announces.
    connect(ctl, 2)
    ctl.sync()
    assert link.take() == [f"announce attributes next-hop {N1} nlri 10.244.1.0/26", "show adj-rib out"]
    assert ctl.learned_routes() == {"10.244.2.0/26": N2}
    for event in (OpenReceived(N2, N2, 64512, 90, 120), state(N2, "up"), route, EndOfRib(N2)):
        ctl.on_message(SidecarEvent(2, event))
    ctl.sync()
    assert link.take()[-1] == f"neighbor {N2} announce eor ipv4 unicast"
    assert ctl.learned_routes() == {"10.244.2.0/26": N2}
    # Messages of the dead connection are ignored.
    ctl.on_message(SidecarEvent(1, state(N2, "down")))
    assert ctl.status()["peers"][0]["state"] == "Established"


def test_agent_restart_replay_sends_end_of_rib_and_withdraws_leftovers(setup: Any) -> None:
    ctl, link, _, _, posted = setup
    link.outputs["show adj-rib out"] = (
        f"neighbor {N2} ipv4 unicast 10.244.1.0/26 next-hop {N1}",
        f"neighbor {N2} ipv4 unicast 10.244.9.0/26 next-hop {N1}",
    )
    ctl.set_announcements({"10.244.1.0/26"})
    ctl.sync()
    connect(ctl, 1, OpenReceived(N2, N2, 64512, 90, 120), state(N2, "up"),
            RoutesReceived(N2, (ReceivedRoute("10.244.2.0/26", N2),)), EndOfRib(N2))
    ctl.sync()
    # The established peer is refreshed on its own (no broadcast of the same routes first).
    assert link.take() == [
        f"neighbor {N2} announce attributes next-hop {N1} nlri 10.244.1.0/26",
        f"neighbor {N2} announce eor ipv4 unicast",
        "show adj-rib out",
    ]
    assert ctl.learned_routes() == {"10.244.2.0/26": N2}
    # What the previous agent announced and nobody wants any more is withdrawn.
    ctl.on_message(posted[-1])
    ctl.sync()
    assert link.take() == [f"withdraw attributes next-hop {N1} nlri 10.244.9.0/26"]


def test_adj_rib_out_leftovers_are_withdrawn(setup: Any) -> None:
    ctl, link, _, _, posted = setup
    link.outputs["show adj-rib out"] = (f"neighbor {N2} ipv4 unicast 10.244.9.0/26 next-hop {N1}",)
    ctl.set_announcements({"10.244.1.0/26"})
    ctl.sync()
    connect(ctl, 1)
    ctl.sync()
    link.take()
    assert posted == [AdjRibOut(1, frozenset({"10.244.9.0/26"}))]
    ctl.on_message(posted[0])
    ctl.sync()
    assert link.take() == [f"withdraw attributes next-hop {N1} nlri 10.244.9.0/26"]


def test_first_apply_waits_for_replay_or_timeout(setup: Any) -> None:
    ctl, _, clock, _, _ = setup
    assert not ctl.ready_for_dataplane()
    assert ctl.next_deadline() == clock.now + 10.0
    clock.now += 10.0
    assert ctl.ready_for_dataplane()
    assert ctl.next_deadline() is None  # no busy loop once the wait is over


def test_removed_peer_is_forgotten(setup: Any) -> None:
    ctl, _, _, _, _ = setup
    ctl.sync()
    connect(ctl, 1, OpenReceived(N2, N2, 64512, 90, 120), state(N2, "up"),
            RoutesReceived(N2, (ReceivedRoute("10.244.2.0/26", N2),)))
    assert ctl.learned_routes()
    feed(ctl, KVUpdate(keys.resource_key("nodes", "n2"), None, 2))
    ctl.sync()
    assert ctl.learned_routes() == {} and ctl.status()["peers"] == []


def test_status_file_written(setup: Any, tmp_path: Path) -> None:
    import json

    ctl, _, _, _, _ = setup
    ctl.sync()
    data = json.loads((tmp_path / "status.json").read_text())
    assert data["node"] == "n1" and data["peers"][0]["peer"] == N2
    assert data["peers"][0]["state"] == "Idle" and data["sidecar"] == "disconnected"


def test_parse_adj_rib_out() -> None:
    assert parse_adj_rib_out([f"neighbor {N2} ipv4 unicast 10.1.0.0/26 next-hop {N1}", "garbage"]) == \
        frozenset({"10.1.0.0/26"})


# -- what the calc graph announces ------------------------------------------------------------------

def _pool(name: str, cidr: str, **spec: Any) -> KVUpdate:
    return KVUpdate(keys.resource_key("ippools", name), {"spec": {"cidr": cidr, **spec}}, 1)


def _affinity(node_name: str, cidr: str) -> KVUpdate:
    return KVUpdate(keys.affinity_key(node_name, cidr), {"state": "confirmed"}, 1)


def _wep(name: str, node_name: str, ip: str) -> KVUpdate:
    return KVUpdate(keys.resource_key("workloadendpoints", name, "ns"),
                    {"metadata": {"namespace": "ns"},
                     "spec": {"node": node_name, "pod": name, "interfaceName": f"cali{name}",
                              "ipNetworks": [f"{ip}/32"]}}, 1)


def test_announcements_blocks_borrowed_and_disable_bgp_export() -> None:
    calc = CalcGraph("n1", remote_routes_from_datastore=False)
    for update in (
        _pool("p", "10.244.0.0/16"), _pool("quiet", "10.99.0.0/16", disableBGPExport=True),
        _affinity("n1", "10.244.1.0/26"), _affinity("n2", "10.244.2.0/26"), _affinity("n1", "10.99.0.0/26"),
        _wep("own", "n1", "10.244.1.5"),  # inside our block: the block covers it
        _wep("borrowed", "n1", "10.244.2.9"),  # from n2's block: a /32
        _wep("remote", "n2", "10.244.2.3"),  # not ours
        _wep("quiet-borrowed", "n1", "10.99.5.5"),  # pool does not export
    ):
        feed(calc, update)
    assert calc.bgp_announcements() == frozenset({"10.244.1.0/26", "10.244.2.9/32"})
    # Block released: no longer announced.
    feed(calc, KVUpdate(keys.affinity_key("n1", "10.244.1.0/26"), None, 2))
    assert "10.244.1.0/26" not in calc.bgp_announcements()
    assert "10.244.1.5/32" in calc.bgp_announcements()  # now a pod outside our blocks


# -- merging learned routes -------------------------------------------------------------------------

def test_learned_routes_never_override_own_routes() -> None:
    own = frozenset({Route("10.244.1.0/26", type="blackhole"), Route("10.244.1.5/32", iface="caliA")})
    learned = {"10.244.1.0/26": N2, "10.244.1.5/32": N2, "10.244.1.9/32": N2, "10.244.3.0/26": N3,
               "10.244.4.0/26": N1}
    merged = merge_learned(own, learned, frozenset({N1}))
    assert merged == own | {Route("10.244.1.9/32", gateway=N2), Route("10.244.3.0/26", gateway=N3)}


def test_route_manager_merges_and_only_rewrites_on_change() -> None:
    nl = FakeNetlink()
    table = RouteTable(netlink=nl)
    mgr = RouteManager(table)
    mgr.on_update(CalcRoutes(frozenset({Route("10.244.1.0/26", type="blackhole")})))
    mgr.on_update(LearnedRoutes({"10.244.2.0/26": N2}, frozenset({N1})))
    mgr.complete_deferred_work()
    table.apply()
    assert sorted(nl.ours()) == ["10.244.1.0/26", "10.244.2.0/26"]
    nl.calls.clear()
    mgr.on_update(LearnedRoutes({"10.244.2.0/26": N2}, frozenset({N1})))
    mgr.complete_deferred_work()
    assert table.apply() == ApplyResult() and nl.calls == []  # nothing changed, nothing re-declared


def test_bgp_readiness_follows_calicos_bird_ready_rules() -> None:
    from felixpy.node.bgp import bgp_readiness

    up = {"peer": "192.0.2.12", "state": "Established"}
    down = {"peer": "192.0.2.13", "state": "Idle"}
    assert bgp_readiness(None, uptime=1)[0] is False
    assert bgp_readiness({"sidecar": "disconnected", "peers": [up]}, uptime=100)[0] is False
    assert bgp_readiness({"sidecar": "connected", "peers": []}, uptime=1) == (True, "no BGP peers")
    # Right after start every peer must be up; later one is enough; none up is never ready.
    ok, why = bgp_readiness({"sidecar": "connected", "peers": [up, down]}, uptime=5)
    assert not ok and "192.0.2.13" in why
    assert bgp_readiness({"sidecar": "connected", "peers": [up, down]}, uptime=60)[0] is True
    assert bgp_readiness({"sidecar": "connected", "peers": [down]}, uptime=60)[0] is False
    assert bgp_readiness({"sidecar": "connected", "peers": [up]}, uptime=5)[0] is True


# -- Calico's BGP fields through the controller -----------------------------------------------------

def _config(**spec: Any) -> KVUpdate:
    return KVUpdate(keys.resource_key("bgpconfigurations", "default"),
                    {"kind": "BGPConfiguration", "metadata": {"name": "default"}, "spec": spec}, 1)


def test_log_severity_sets_the_speaker_log_level(setup: Any) -> None:
    import logging

    ctl, *_ = setup
    feed(ctl, _config(logSeverityScreen="Debug"))
    ctl.sync()
    assert logging.getLogger("bgp").level == logging.DEBUG
    assert logging.getLogger("felixpy.node.bgp").level == logging.DEBUG
    feed(ctl, _config(logSeverityScreen="Warning"))
    ctl.sync()
    assert logging.getLogger("bgp").level == logging.WARNING
    feed(ctl, _config())
    ctl.sync()
    assert logging.getLogger("bgp").level == logging.INFO


def test_communities_services_and_export_filters_reach_the_commands(setup: Any) -> None:
    ctl, link, *_ = setup
    feed(ctl, _config(serviceClusterIPs=[{"cidr": "10.96.0.0/12"}],
                      prefixAdvertisements=[{"cidr": "10.244.0.0/16", "communities": ["65000:1", "1:2:3"]}]),
         KVUpdate(keys.resource_key("bgpfilters", "tor"), {"kind": "BGPFilter", "metadata": {"name": "tor"}, "spec": {
             "exportV4": [{"action": "Reject", "matchOperator": "Equal", "cidr": "10.244.1.0/26"}]}}, 1),
         peer("tor", peerIP="198.51.100.1", asNumber=65001, filters=["tor"]))
    ctl.set_announcements({"10.244.1.0/26"})
    ctl.sync()
    connect(ctl, 1)
    ctl.sync()
    commands = link.take()
    assert f"announce attributes next-hop {N1} nlri 10.96.0.0/12" in commands  # the range, to both
    assert (f"neighbor {N2} announce attributes next-hop {N1} community [ 65000:1 ] large-community [ 1:2:3 ] "
            "nlri 10.244.1.0/26") in commands  # the block, not to the ToR
    # A learned route inside the Service range is not programmed (kube-proxy's business).
    ctl.on_message(SidecarEvent(1, RoutesReceived(N2, (ReceivedRoute("10.96.0.10/32", N2),
                                                       ReceivedRoute("10.244.2.0/26", N2)))))
    assert ctl.learned_routes() == {"10.244.2.0/26": N2}


class FakeBird:
    def __init__(self) -> None:
        self.configures = 0
        self.stopped = 0
        self.started = 0

    def configure(self) -> tuple[bool, str]:
        self.configures += 1
        return True, "Reconfigured"

    def show_protocols(self) -> str | None:
        return None

    def show_status(self) -> str | None:
        return None

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1


def test_reflector_mode_puts_bird_in_front_of_exabgp(tmp_path: Path) -> None:
    from felixpy.node.reflector import ReflectorPaths

    link, clock, bird = FakeLink(), FakeClock(), FakeBird()
    paths = BGPPaths(config=str(tmp_path / "exabgp.conf"), pid_file=str(tmp_path / "pid"),
                     socket=str(tmp_path / "s.sock"), status=str(tmp_path / "status.json"), python="/usr/bin/python3")
    bird_paths = ReflectorPaths(config=str(tmp_path / "bird.conf"), socket=str(tmp_path / "bird.ctl"),
                                status=str(tmp_path / "unused.json"), start_bird=True)
    ctl = BGPController("n1", paths, link=link, reload=lambda: True, clock=clock, bird_paths=bird_paths, bird=bird)
    feed(ctl, node("n1", N1, routeReflectorClusterID="244.0.0.1"), node("n2", N2),
         peer("to-rr", nodeSelector="all()", peerSelector="has(routeReflectorClusterID) || name == 'x'"))
    ctl.datastore_in_sync()
    ctl.sync()
    assert ctl.reflector_mode and bird.configures == 1
    exabgp = (tmp_path / "exabgp.conf").read_text()
    assert f"neighbor {N1} {{" in exabgp and "local-address 127.0.0.2;" in exabgp and "listen 1790;" in exabgp
    assert f"router-id {N1};" not in exabgp  # a BGP identifier of its own, not BIRD's
    assert "protocol bgp Local_Agent" in (tmp_path / "bird.conf").read_text()
    assert ctl.status()["routeReflector"] is True
    # The cluster ID goes: BIRD (started by the agent) is stopped and ExaBGP has the sessions again.
    feed(ctl, node("n1", N1))
    ctl.sync()
    assert not ctl.reflector_mode and bird.stopped == 1
    assert f"neighbor {N2} {{" in (tmp_path / "exabgp.conf").read_text()
