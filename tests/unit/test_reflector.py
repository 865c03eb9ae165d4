"""felixpy-node's route-reflector mode with a fake BIRD: the rendering from the datastore, live
`birdc configure` only when the text changes, retries while BIRD is down, `show protocols all`
parsing and the status file in the agent's format."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.datastore.syncer import KVUpdate, SyncStatus
from felixpy.node.bgp import read_status
from felixpy.node.reflector import (Reflector, ReflectorPaths, parse_show_protocols, parse_show_route,
                                    reflector_mode, run_reflector)

RR1, RR2, N1, N2 = "192.0.2.221", "192.0.2.222", "192.0.2.11", "192.0.2.12"
CLUSTER = "244.0.0.1"

SHOW = """BIRD 2.0.12 ready.
Name       Proto      Table      State  Since         Info
device1    Device     ---        up     17:30:14.539
Node_192_0_2_11 BGP        ---        up     17:30:15.000  Established
  BGP state:          Established
    Neighbor address: 192.0.2.11
  Channel ipv4
    State:          UP
    Routes:         2 imported, 3 exported, 2 preferred
Node_192_0_2_12 BGP        ---        start  17:30:16.000  Active        Socket: Connection refused
  BGP state:          Active
  Channel ipv4
    State:          DOWN
Node_192_0_2_222 BGP        ---        down   17:30:14.540  Error: Invalid next hop
"""


STATUS = """BIRD 2.0.12 ready.
BIRD 2.0.12
Router ID is 192.0.2.221
Hostname is rr1
Current server time is 2026-12-01 10:00:03.123
Last reboot on 2026-12-01 09:59:00.000
Last reconfiguration on 2026-12-01 10:00:01.000
Daemon is up and running
"""


class FakeBird:
    def __init__(self) -> None:
        self.up = True
        self.configures = 0
        self.starts = 0
        self.show = SHOW

    def configure(self) -> tuple[bool, str]:
        if not self.up:
            return False, "Unable to connect to server control socket"
        self.configures += 1
        return True, "Reconfigured"

    def show_protocols(self) -> str | None:
        return self.show if self.up else None

    def start(self) -> None:
        self.starts += 1
        self.up = True

    def stop(self) -> None:
        self.up = False

    def show_status(self) -> str | None:
        return STATUS if self.up else None

    def show_routes(self) -> str | None:
        return ROUTES if self.up else None

# `birdc show route` of BIRD 2.0.12 (the layout measured on this machine): n1's block from n1
# (best) and from rr2 (reflected), n2's from n2, a connected route from `protocol direct`.
ROUTES = """BIRD 2.0.12 ready.
Table master4:
10.244.1.0/26        unicast [Node_192_0_2_11 10:00:00.123] * (100) [i]
\tvia 192.0.2.11 on eth0
                     unicast [Node_192_0_2_222 10:00:00.456 from 192.0.2.222] (100) [i]
\tvia 192.0.2.11 on eth0
10.244.2.0/26        unicast [Node_192_0_2_12 10:00:01.000] * (100) [i]
\tvia 192.0.2.12 on eth0
192.0.2.0/24         unicast [direct1 09:59:00.000] * (240)
\tdev eth0
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def node(name: str, ip: str, labels: dict[str, str] | None = None, **bgp: Any) -> KVUpdate:
    value = {"kind": "Node", "metadata": {"name": name, "labels": labels or {}},
             "spec": {"bgp": {"ipv4Address": f"{ip}/24", **bgp}}}
    return KVUpdate(keys.resource_key("nodes", name), value, 1)


def reflector_node(name: str, ip: str) -> KVUpdate:
    return node(name, ip, {"route-reflector": "true"}, routeReflectorClusterID=CLUSTER)


def cluster_setup() -> list[KVUpdate]:
    return [
        KVUpdate(keys.resource_key("bgpconfigurations", "default"),
                 {"kind": "BGPConfiguration", "metadata": {"name": "default"},
                  "spec": {"nodeToNodeMeshEnabled": False}}, 1),
        KVUpdate(keys.resource_key("bgppeers", "to-rr"),
                 {"kind": "BGPPeer", "metadata": {"name": "to-rr"},
                  "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}}, 1),
        reflector_node("rr1", RR1), reflector_node("rr2", RR2), node("n1", N1),
    ]


@pytest.fixture
def paths(tmp_path: Path) -> ReflectorPaths:
    return ReflectorPaths(config=str(tmp_path / "bird" / "bird.conf"), socket=str(tmp_path / "bird.ctl"),
                          status=str(tmp_path / "lib" / "bgp-status.json"))


def make(paths: ReflectorPaths, bird: FakeBird, clock: Clock | None = None) -> Reflector:
    clock = clock or Clock()
    r = Reflector("rr1", paths, bird=bird, wall_clock=clock, clock=clock)
    for update in cluster_setup():
        r.on_update(update)
    return r


def test_mode_from_env() -> None:
    assert reflector_mode({"FELIXPY_ROUTE_REFLECTOR": "true"})
    assert not reflector_mode({"FELIXPY_ROUTE_REFLECTOR": "false"})
    assert not reflector_mode({})


def test_paths_from_env_rejects_relative_and_bad_bool(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="FELIXPY_BIRD_CONFIG"):
        ReflectorPaths.from_env({"FELIXPY_BIRD_CONFIG": "bird.conf"}, str(tmp_path))
    with pytest.raises(ValueError, match="FELIXPY_BIRD_START"):
        ReflectorPaths.from_env({"FELIXPY_BIRD_START": "maybe"}, str(tmp_path))
    p = ReflectorPaths.from_env({}, "/state")
    assert p.start_bird and p.status == "/state/bgp-status.json" and p.config.endswith("/bird.conf")
    assert not ReflectorPaths.from_env({"FELIXPY_BIRD_START": "false"}, "/state").start_bird


def test_nothing_before_sync_then_clients_and_the_other_reflector(paths: ReflectorPaths) -> None:
    bird = FakeBird()
    r = make(paths, bird)
    r.sync()
    assert bird.configures == 0 and not Path(paths.config).exists()
    r.datastore_in_sync()
    r.sync()
    text = Path(paths.config).read_text()
    assert bird.configures == 1
    peers = {p.address: p for p in r.peers}
    assert set(peers) == {N1, RR2}
    assert peers[N1].rr_client and not peers[RR2].rr_client
    assert "protocol bgp Node_192_0_2_11" in text and f"rr cluster id {CLUSTER};" in text
    rr2_block = text.split("protocol bgp Node_192_0_2_222")[1]
    assert "rr client" not in rr2_block


def test_configure_only_when_the_text_changes(paths: ReflectorPaths) -> None:
    bird = FakeBird()
    r = make(paths, bird)
    r.datastore_in_sync()
    r.sync()
    r.on_update(node("n1", N1, {"unrelated": "label"}))  # no effect on the rendering
    r.sync()
    assert bird.configures == 1
    r.on_update(node("n2", N2))  # a node comes: a new client, live
    r.sync()
    assert bird.configures == 2 and "Node_192_0_2_12" in Path(paths.config).read_text()
    r.on_update(KVUpdate(keys.resource_key("nodes", "n2"), None, 3))  # and goes
    r.sync()
    assert bird.configures == 3 and "Node_192_0_2_12" not in Path(paths.config).read_text()


def test_bird_down_retries_and_reapplies_when_back(paths: ReflectorPaths) -> None:
    bird, clock = FakeBird(), Clock()
    r = make(paths, bird, clock)
    r.datastore_in_sync()
    bird.up = False
    r.sync()
    r.poll()
    assert read_status(paths.status)["sidecar"] == "disconnected"  # type: ignore[index]
    r.on_update(node("n2", N2))
    r.sync()  # written, not applied; retry waits a second
    assert "Node_192_0_2_12" in Path(paths.config).read_text() and bird.configures == 0
    bird.up = True
    r.sync()
    assert bird.configures == 0
    clock.now += 1.5
    r.sync()
    assert bird.configures == 1
    # BIRD restarted behind our back: configure once more after it answers again.
    bird.up = False
    r.poll()
    bird.up = True
    r.poll()
    r.sync()
    assert bird.configures == 2 and bird.starts == 0


def test_starts_bird_when_asked(paths: ReflectorPaths) -> None:
    bird = FakeBird()
    bird.up = False
    r = Reflector("rr1", ReflectorPaths(paths.config, paths.socket, paths.status, start_bird=True), bird=bird)
    for update in cluster_setup():
        r.on_update(update)
    r.datastore_in_sync()
    r.sync()
    assert bird.starts == 1


def test_invalid_peer_leaves_config_and_reports(paths: ReflectorPaths) -> None:
    bird = FakeBird()
    r = make(paths, bird)
    r.datastore_in_sync()
    r.sync()
    before = Path(paths.config).read_text()
    r.on_update(KVUpdate(keys.resource_key("bgppeers", "bad"),
                         {"kind": "BGPPeer", "metadata": {"name": "bad"}, "spec": {"peerIP": "300.1.1.1",
                                                                                   "asNumber": 64512}}, 2))
    r.sync()
    r.poll()
    assert Path(paths.config).read_text() == before and bird.configures == 1
    assert "peerIP" in read_status(paths.status)["configError"]  # type: ignore[index]


def test_parse_show_protocols() -> None:
    found = parse_show_protocols(SHOW)
    assert set(found) == {"Node_192_0_2_11", "Node_192_0_2_12", "Node_192_0_2_222"}
    assert found["Node_192_0_2_11"].state == "Established" and found["Node_192_0_2_11"].routes_received == 2
    assert found["Node_192_0_2_12"].state == "Connect" and "Connection refused" in found["Node_192_0_2_12"].info
    assert found["Node_192_0_2_222"].state == "Idle" and "Invalid next hop" in found["Node_192_0_2_222"].info


def test_status_file_in_the_agents_format(paths: ReflectorPaths) -> None:
    bird, clock = FakeBird(), Clock()
    r = make(paths, bird, clock)
    r.datastore_in_sync()
    r.sync()
    r.poll()
    data = read_status(paths.status)
    assert data is not None
    assert data["node"] == "rr1" and data["routeReflector"] is True and data["sidecar"] == "connected"
    assert data["clusterID"] == CLUSTER and data["learned"] == 2
    rows = {p["peer"]: p for p in data["peers"]}
    assert rows[N1] == {"peer": N1, "type": "node", "rrClient": True, "asNumber": 64512,
                        "state": "Established", "since": 1000.0, "info": "", "routesReceived": 2,
                        "node": "n1"}
    assert rows[RR2]["state"] == "Idle" and rows[RR2]["rrClient"] is False
    clock.now += 5
    bird.up = False
    r.poll()
    data = json.loads(Path(paths.status).read_text())
    assert data["sidecar"] == "disconnected"
    assert {p["state"] for p in data["peers"]} == {"Idle"}
    assert {p["peer"]: p["since"] for p in data["peers"]}[N1] == 1005.0


def test_parse_show_route() -> None:
    routes = parse_show_route(ROUTES)
    assert [(r.prefix, r.protocol, r.best, r.via) for r in routes] == [
        ("10.244.1.0/26", "Node_192_0_2_11", True, "192.0.2.11"),
        ("10.244.1.0/26", "Node_192_0_2_222", False, "192.0.2.11"),
        ("10.244.2.0/26", "Node_192_0_2_12", True, "192.0.2.12"),
    ]  # the connected route has no `via`


class ScriptedSyncer:
    """Posts the given updates and IN_SYNC once started, like the Syncer's first list."""

    def __init__(self, updates: list[KVUpdate]) -> None:
        self.updates = updates

    def __call__(self, _store: Any, post: Callable[[Any], None]) -> "ScriptedSyncer":
        self.post = post
        return self

    def start(self) -> None:
        self.post(self.updates)
        self.post(SyncStatus.IN_SYNC)

    def stop(self) -> None:
        pass


def test_dedicated_reflector_fills_its_calico_node_status(paths: ReflectorPaths) -> None:
    store = MemoryDatastore()
    key = keys.resource_key("caliconodestatuses", "rr1-status")
    request = {"apiVersion": "projectcalico.org/v3", "kind": "CalicoNodeStatus", "metadata": {"name": "rr1-status"},
               "spec": {"node": "rr1", "classes": ["Agent", "BGP", "Routes"], "updatePeriodSeconds": 0}}
    store.create(key, request)
    stop = threading.Event()
    kernel = [{"dst": "192.0.2.0/24", "interface": "eth0", "type": "unicast", "scope": "link"}]
    loop = threading.Thread(target=run_reflector, args=(store, "rr1", paths, stop), kwargs={
        "syncer_factory": ScriptedSyncer([*cluster_setup(), KVUpdate(key, request, 1)]),
        "kernel_routes": lambda: kernel, "bird": FakeBird()})
    loop.start()
    try:
        deadline = time.monotonic() + 10
        while "status" not in store.get(key).value:
            assert time.monotonic() < deadline, "no status written"
            time.sleep(0.02)
    finally:
        stop.set()
        loop.join(timeout=10)
    status = store.get(key).value["status"]
    assert status["agent"]["birdV4"]["state"] == "Ready" and status["agent"]["birdV4"]["routerID"] == RR1
    assert status["agent"]["birdV4"]["version"] == "BIRD 2.0.12"
    peers = {p["peerIP"]: p["state"] for p in status["bgp"]["peersV4"]}
    assert peers == {N1: "Established", RR2: "Idle"}
    routes = {(r["type"], r["destination"], r["gateway"], r["learnedFrom"].get("peerIP", r["learnedFrom"]["sourceType"]))
              for r in status["routes"]["routesV4"]}
    # What BIRD holds (RIB: a reflector programs none of it) and the kernel's connected route (FIB).
    assert routes == {("FIB", "192.0.2.0/24", "N/A", "Direct"), ("RIB", "10.244.1.0/26", N1, N1),
                      ("RIB", "10.244.1.0/26", N1, RR2)}
