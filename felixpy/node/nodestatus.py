"""CalicoNodeStatus: the agent reports its BGP speaker, sessions and routes when someone asks.

A user creates a CalicoNodeStatus naming a node, the classes of information wanted (Agent, BGP,
Routes) and `updatePeriodSeconds`; the agent of that node fills `status` at once and then every
period (0: once, never refreshed), until the resource is deleted, in Calico's shape
(calico-reference §3.7, Calico's caliconodestatus reference):

    status:
      lastUpdated: "2026-12-04T10:00:00Z"
      agent:  {birdV4: {state: Ready|NotReady, version, routerID, lastBootTime, lastReconfigurationTime},
               birdV6: {...the same, when the node has IPv6 sessions}}
      bgp:    {numberEstablishedV4, numberNotEstablishedV4, numberEstablishedV6, numberNotEstablishedV6,
               peersV4: [{peerIP, type: NodeMesh|NodePeer|GlobalPeer, state, since}], peersV6: [...]}
      routes: {routesV4: [{type: FIB|RIB, destination, gateway, interface,
                           learnedFrom: {sourceType: Kernel|Static|Direct|NodeMesh|BGPPeer, peerIP}}],
               routesV6: [...]}

Calico has two daemons, bird and bird6; felixpy's one ExaBGP carries both families, each on its
own sessions, so `birdV6` repeats the speaker's facts, peers and routes are split by the family
of the address (peersV6: the sessions to IPv6 addresses). The speaker is ExaBGP
(or BIRD on a route-reflector node); its version says which. Routes are the kernel's main table
as BIRD would list it (our BGP routes with the peer they came from, our blackholes as Static,
connected routes as Direct, the rest as Kernel) plus the BGP paths that lost best-path
selection (type RIB).

Threads: the loop indexes the resources and, when one is due, takes a snapshot of the BGP state
(no I/O); a writer thread reads the kernel's routes, asks the speaker for its times and writes the
status with a compare-and-swap, so a slow or unreachable datastore never holds up the loop.
A resource naming another node is ignored; one that disappeared while being written is skipped.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping

from felixpy.calc.updates import Kind, Update
from felixpy.datastore.api import Datastore, DatastoreError
from felixpy.datastore.cas import KEEP, compare_and_swap

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher

log = logging.getLogger(__name__)

PEER_TYPES = {"mesh": "NodeMesh", "global": "GlobalPeer", "node": "NodePeer", "reflector": "NodePeer"}


@dataclass(frozen=True)
class Request:
    key: str
    name: str
    classes: tuple[str, ...]
    period: int  # seconds; 0 = report once


@dataclass(frozen=True)
class PathView:
    prefix: str
    peer: str
    next_hop: str
    peer_type: str  # our PeerType value ("mesh", "node", ...)


@dataclass(frozen=True)
class Snapshot:
    """What the loop knows, copied for the writer thread."""

    speaker_ready: bool
    version: str
    router_id: str
    boot_time: float | None  # wall clock
    reconfigured: float | None
    peers: tuple[Mapping[str, Any], ...]  # status-file rows: peer, type, state, since
    best: tuple[PathView, ...]
    others: tuple[PathView, ...]  # paths that lost best-path selection
    own_blocks: frozenset[str]
    # Asked in the writer thread (it may run birdc or read /proc): the speaker's version, router
    # ID, boot and reconfiguration times, filling in what the loop does not know.
    speaker: Callable[[], "BirdTimes"] | None = None


def _clock_text(when: float | None) -> str:
    if when is None:
        return ""
    return datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")


def _since(when: float | None, now: float) -> str:
    """BIRD's `since` column: the time of day for today, else the date."""
    if when is None:
        return ""
    moment = datetime.datetime.fromtimestamp(when)
    today = datetime.datetime.fromtimestamp(now).date()
    return moment.strftime("%H:%M:%S") if moment.date() == today else moment.strftime("%Y-%m-%d")


def _bird_state(state: str) -> str:
    return state if state in ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established", "Close") \
        else "Idle"


KernelRoutes = Callable[[], list[dict[str, Any]]]  # dst, gateway, interface, type (unicast/blackhole/...), scope


def build_status(snapshot: Snapshot, classes: tuple[str, ...], *, now: float,
                 kernel_routes: KernelRoutes | None) -> dict[str, Any]:
    """The `status` of a CalicoNodeStatus for these classes (pure but for `kernel_routes`)."""
    status: dict[str, Any] = {
        "lastUpdated": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if "Agent" in classes:
        speaker = {
            "state": "Ready" if snapshot.speaker_ready else "NotReady",
            "version": snapshot.version,
            "routerID": snapshot.router_id,
            "lastBootTime": _clock_text(snapshot.boot_time),
            "lastReconfigurationTime": _clock_text(snapshot.reconfigured),
        }
        status["agent"] = {"birdV4": speaker}
        if any(_version(str(p["peer"])) == 6 for p in snapshot.peers):
            status["agent"]["birdV6"] = dict(speaker)
    if "BGP" in classes:
        status["bgp"] = {}
        for version in (4, 6):
            peers = [{"peerIP": str(p["peer"]), "type": PEER_TYPES.get(str(p.get("type")), "NodePeer"),
                      "state": _bird_state(str(p.get("state"))), "since": _since(p.get("since"), now)}
                     for p in snapshot.peers if _version(str(p["peer"])) == version]
            up = sum(p["state"] == "Established" for p in peers)
            status["bgp"].update({f"numberEstablishedV{version}": up,
                                  f"numberNotEstablishedV{version}": len(peers) - up})
            if version == 4 or peers:
                status["bgp"][f"peersV{version}"] = peers
    if "Routes" in classes:
        rows = _routes(snapshot, kernel_routes)
        status["routes"] = {"routesV4": [r for r in rows if _version(r["destination"]) == 4]}
        v6 = [r for r in rows if _version(r["destination"]) == 6]
        if v6:
            status["routes"]["routesV6"] = v6
    return status


def _version(address_or_prefix: str) -> int:
    return ipaddress.ip_network(address_or_prefix, strict=False).version


def _learned_from(path: PathView) -> dict[str, str]:
    return {"sourceType": "NodeMesh" if path.peer_type == "mesh" else "BGPPeer", "peerIP": path.peer}


def _routes(snapshot: Snapshot, kernel_routes: KernelRoutes | None) -> list[dict[str, Any]]:
    best = {p.prefix: p for p in snapshot.best}
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for route in (kernel_routes() if kernel_routes is not None else []):
        dst = str(route.get("dst"))
        seen.add(dst)
        kind = route.get("type", "unicast")
        gateway = route.get("gateway") or "N/A"
        interface = route.get("interface") or ("blackhole" if kind == "blackhole" else
                                               "unreachable" if kind == "unreachable" else "")
        path = best.get(dst)
        if path is not None and route.get("ours"):
            learned = _learned_from(path)
        elif kind == "blackhole" and dst in snapshot.own_blocks:
            learned = {"sourceType": "Static"}
        elif gateway == "N/A" and route.get("scope") == "link" and not route.get("ours"):
            learned = {"sourceType": "Direct"}
        else:
            learned = {"sourceType": "Kernel"}
        rows.append({"type": "FIB", "destination": dst, "gateway": gateway, "interface": interface,
                     "learnedFrom": learned})
    for path in snapshot.best:
        if path.prefix not in seen:  # chosen, not (yet) in the kernel: still in BIRD's table
            rows.append({"type": "RIB", "destination": path.prefix, "gateway": path.next_hop, "interface": "",
                         "learnedFrom": _learned_from(path)})
    for path in snapshot.others:
        rows.append({"type": "RIB", "destination": path.prefix, "gateway": path.next_hop, "interface": "",
                     "learnedFrom": _learned_from(path)})
    return rows


@dataclass
class _Due:
    request: Request
    at: float  # monotonic
    reported: bool = False


class StatusWriter:
    """The writer thread: builds each due status (kernel reads included) and writes it by CAS."""

    def __init__(self, store: Datastore, *, kernel_routes: KernelRoutes | None,
                 wall: Callable[[], float] = time.time) -> None:
        self._store = store
        self._kernel_routes = kernel_routes
        self._wall = wall
        self._lock = threading.Condition()
        self._pending: dict[str, tuple[Request, Snapshot]] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self.writes = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="node-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()

    def submit(self, request: Request, snapshot: Snapshot) -> None:
        with self._lock:
            self._pending[request.key] = (request, snapshot)  # the latest wins
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                batch, self._pending = self._pending, {}
            for request, snapshot in batch.values():
                self.write(request, snapshot)

    def write(self, request: Request, snapshot: Snapshot) -> bool:
        """Write one status now (the thread's work; tests call it directly)."""
        try:
            if snapshot.speaker is not None:
                times = snapshot.speaker()
                snapshot = replace(snapshot, version=times.version or snapshot.version,
                                   router_id=times.router_id or snapshot.router_id,
                                   boot_time=times.boot if times.boot is not None else snapshot.boot_time,
                                   reconfigured=times.reconfigured if times.reconfigured is not None
                                   else snapshot.reconfigured, speaker=None)
            status = build_status(snapshot, request.classes, now=self._wall(), kernel_routes=self._kernel_routes)
        except Exception as err:  # a kernel read that failed must not end the thread
            log.warning("CalicoNodeStatus not built name=%s error=%s", request.name, err)
            return False

        def change(current: Any) -> tuple[Any, bool]:
            if current is None:
                return KEEP, False  # deleted meanwhile
            return {**current, "status": status}, True

        try:
            _, written = compare_and_swap(self._store, request.key, change, retries=5,
                                          what=f"write CalicoNodeStatus {request.name}")
        except DatastoreError as err:
            log.warning("CalicoNodeStatus not written name=%s error=%s", request.name, err)
            return False
        if written:
            self.writes += 1
            log.debug("CalicoNodeStatus written name=%s classes=%s", request.name, ",".join(request.classes))
        return bool(written)


class NodeStatusReporter:
    """The loop's side: which CalicoNodeStatus resources name this node, and when each is due."""

    def __init__(self, node_name: str, writer: StatusWriter | None,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        self.node_name = node_name
        self._writer = writer
        self._clock = clock
        self._requests: dict[str, _Due] = {}

    def register_with(self, dispatcher: "Dispatcher") -> None:
        dispatcher.register(Kind.CALICO_NODE_STATUS, self.on_resource)

    def on_resource(self, update: Update[Any]) -> None:
        value = update.value
        spec = (value or {}).get("spec") or {}
        if value is None or spec.get("node") != self.node_name:
            self._requests.pop(update.key, None)
            return
        try:
            request = Request(update.key, update.name, tuple(str(c) for c in spec.get("classes") or ()),
                              int(spec.get("updatePeriodSeconds", 10)))
        except (TypeError, ValueError):
            self._requests.pop(update.key, None)
            return
        current = self._requests.get(update.key)
        if current is not None and current.request == request:
            return  # our own status write coming back: nothing asked for changed
        self._requests[update.key] = _Due(request, self._clock())

    def next_deadline(self) -> float | None:
        due = [d.at for d in self._requests.values() if not (d.reported and d.request.period == 0)]
        return min(due) if due else None

    def report(self, snapshot: Callable[[], Snapshot]) -> int:
        """Hand every due status to the writer; returns how many."""
        now = self._clock()
        taken: Snapshot | None = None
        count = 0
        for due in self._requests.values():
            if due.at > now or (due.reported and due.request.period == 0):
                continue
            taken = taken or snapshot()
            if self._writer is not None:
                self._writer.submit(due.request, taken)
            due.reported = True
            due.at = now + due.request.period if due.request.period else float("inf")
            count += 1
        return count


def exabgp_start_time(pid_file: str) -> float | None:
    """Wall-clock start of the process in `pid_file` (ExaBGP's), from /proc."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().split()[0])
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started_ticks = int(fields[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


@dataclass
class BirdTimes:
    version: str = ""
    router_id: str = ""
    boot: float | None = None
    reconfigured: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def parse_bird_status(text: str) -> BirdTimes:
    """`birdc show status`: version, router ID, last reboot and reconfiguration."""
    times = BirdTimes()
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("BIRD ") and not line.endswith("ready."):
            times.version = line
        elif line.startswith("Router ID is "):
            times.router_id = line.split()[-1]
        elif line.startswith(("Last reboot on ", "Last reconfiguration on ")):
            stamp = line.split(" on ", 1)[1].split(".")[0]
            try:
                when = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()
            except ValueError:
                continue
            if line.startswith("Last reboot"):
                times.boot = when
            else:
                times.reconfigured = when
    return times
