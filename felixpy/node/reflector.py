"""felixpy-node in route-reflector mode: the datastore drives a BIRD 2 reflector, reconfigured live.

ExaBGP cannot reflect routes (exabgp-notes §6), so a reflector node runs BIRD 2 instead of the
ExaBGP sidecar, and felixpy-node (with `FELIXPY_ROUTE_REFLECTOR=true`) runs this loop instead of
the agent: it programs no routes and serves no CNI requests.

    datastore ─► Syncer ─► Nodes, BGPConfiguration default, BGPPeers
              ─► bgp.peers.select_peers(this node) ─► bgp.bird.render_bird_reflector
              ─► bird.conf (atomic write) ─► `birdc -s <socket> configure` when the text changed
    every second: `birdc show protocols all` ─► status file (the agent's format, bgp-status.json)

The reflector's clients are the nodes selected by BGPPeers whose `peerSelector` matches this
node (reverse peering in `select_peers`); another reflector with the same cluster ID is a plain
iBGP peer. BIRD is never restarted: `configure` keeps unchanged sessions up and only adds or
removes the protocols of nodes that came or went. When BIRD is not running the rendering waits
on disk and is applied when BIRD answers again (it reads the same file when it starts).
By default (`FELIXPY_BIRD_START=true`) the reflector starts `bird` itself when it does not answer;
where BIRD is its own process (a second container in the DaemonSet pod sharing the config and
socket directory, or the lab's process) `FELIXPY_BIRD_START=false` leaves that to the deployment.

BGP passwords (BGPPeer `password`, BGPConfiguration `nodeMeshPassword`) are resolved by the same
SecretResolver as the agent's (node/secrets.py, from the same environment), and the same
SecretWatcher triggers a render when one of them changes: BIRD restarts only the sessions whose
password changed, at `birdc configure`, and BIRD itself keeps running.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from bgp.advertise import community_rules
from bgp.bird import LocalAgent, hashed_router_id, local_agent_name, render_bird_reflector
from bgp.filters import FilterError
from bgp.peers import NodeInfo, Peer, PeerType, PeeringError, address_key, select_peers
from bgp.services import ServiceSettings
from felixpy.kernel import commands
from felixpy.calc.updates import Kind, decode
from felixpy.node.bgp import BGPResources, StatusFile, apply_log_level, resolve_peering
from felixpy.node.nodestatus import (KernelRoutes, NodeStatusReporter, PathView, Snapshot, StatusWriter,
                                     parse_bird_status)
from felixpy.node.secrets import SecretRef, SecretResolver, SecretWatcher
from felixpy.datastore.syncer import KVUpdate, SyncEvent, SyncStatus

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/var/run/calico/bird"
STATUS_FILE_NAME = "bgp-status.json"
STATUS_INTERVAL = 1.0  # seconds between `birdc show protocols all`
BIRDC_TIMEOUT = 5.0
CONFIGURE_RETRY = 1.0  # seconds between `birdc configure` attempts while BIRD does not take it
TRUE_VALUES = ("true", "1", "yes", "on")

_ROUTES_RE = re.compile(r"^\s+Routes:\s+(\d+) imported")


def reflector_mode(env: Mapping[str, str]) -> bool:
    """True when felixpy-node should run as a route reflector (`FELIXPY_ROUTE_REFLECTOR=true`)."""
    return env.get("FELIXPY_ROUTE_REFLECTOR", "").strip().lower() in TRUE_VALUES


@dataclass(frozen=True)
class ReflectorPaths:
    """Where the reflector finds BIRD and writes its files (all from the environment)."""

    config: str  # bird.conf, rendered by the reflector
    socket: str  # BIRD's control socket (bird -s / birdc -s)
    status: str  # JSON status for felixctl node status / felixpy-lab status
    start_bird: bool = False  # start `bird` when it does not answer
    bird: str = "bird"
    birdc: str = "birdc"

    @classmethod
    def from_env(cls, env: Mapping[str, str], state_dir: str) -> "ReflectorPaths":
        """FELIXPY_BIRD_CONFIG, FELIXPY_BIRD_SOCKET, FELIXPY_BGP_STATUS, FELIXPY_BIRD_START;
        raises ValueError with one line on a bad value."""
        values = {
            "FELIXPY_BIRD_CONFIG": env.get("FELIXPY_BIRD_CONFIG") or f"{DEFAULT_RUN_DIR}/bird.conf",
            "FELIXPY_BIRD_SOCKET": env.get("FELIXPY_BIRD_SOCKET") or f"{DEFAULT_RUN_DIR}/bird.ctl",
            "FELIXPY_BGP_STATUS": env.get("FELIXPY_BGP_STATUS") or f"{state_dir.rstrip('/')}/{STATUS_FILE_NAME}",
        }
        for name, value in values.items():
            if not os.path.isabs(value):
                raise ValueError(f"{name}={json.dumps(value)}: expected an absolute path")
        start = env.get("FELIXPY_BIRD_START", "true").strip().lower()
        if start not in TRUE_VALUES + ("false", "0", "no", "off"):
            raise ValueError(f"FELIXPY_BIRD_START={json.dumps(start)}: expected true or false")
        return cls(config=values["FELIXPY_BIRD_CONFIG"], socket=values["FELIXPY_BIRD_SOCKET"],
                   status=values["FELIXPY_BGP_STATUS"], start_bird=start in TRUE_VALUES)


@dataclass(frozen=True)
class ProtocolState:
    """One `protocol bgp` as `birdc show protocols all` reports it."""

    name: str
    state: str  # Established | Connect | Idle (the agent's vocabulary)
    info: str
    routes_received: int


def parse_show_protocols(text: str) -> dict[str, ProtocolState]:
    """BGP protocols in `birdc show protocols all` output, by protocol name."""
    found: dict[str, ProtocolState] = {}
    current: dict[str, Any] | None = None

    def flush() -> None:
        if current is not None:
            found[current["name"]] = ProtocolState(current["name"], current["state"], current["info"],
                                                   current["routes"])

    for line in text.splitlines():
        if not line.strip() or line.startswith(("BIRD ", "Name ")):
            continue
        if not line[0].isspace():
            flush()
            parts = line.split(None, 5)
            current = None
            if len(parts) >= 4 and parts[1] == "BGP":
                info = parts[5].strip() if len(parts) > 5 else ""
                bird_state = parts[3]
                if bird_state == "up" and info.startswith("Established"):
                    state = "Established"
                elif bird_state == "start" and info.split()[:1] in (["Connect"], ["Active"], ["OpenSent"],
                                                                   ["OpenConfirm"]):
                    state = "Connect"
                else:
                    state = "Idle"
                current = {"name": parts[0], "state": state, "info": "" if state == "Established" else info,
                           "routes": 0}
            continue
        match = _ROUTES_RE.match(line)
        if match and current is not None:
            current["routes"] = int(match.group(1))
    flush()
    return found


@dataclass(frozen=True)
class BirdRoute:
    """One path of `birdc show route`: the prefix, the protocol it came from, best or not, next hop."""

    prefix: str
    protocol: str
    best: bool
    via: str


# `10.244.1.0/26        unicast [Node_192_0_2_11 10:00:00.123 from 192.0.2.11] * (100) [i]`, the
# prefix only on a prefix's first path; the next line is `\tvia 192.0.2.11 on eth0`.
_ROUTE_RE = re.compile(r"^(\S+/\d+)?\s+\w+\s+\[(\S+)[^\]]*\]\s*(\*)?")
_VIA_RE = re.compile(r"^\s+via\s+(\S+)")


def parse_show_route(text: str) -> list[BirdRoute]:
    """The paths in `birdc show route` output (BIRD 2), in BIRD's order."""
    routes: list[BirdRoute] = []
    prefix = ""
    pending: tuple[str, str, bool] | None = None
    for line in text.splitlines():
        match = _ROUTE_RE.match(line)
        if match and "[" in line:
            prefix = match.group(1) or prefix
            pending = (prefix, match.group(2), match.group(3) is not None)
            continue
        via = _VIA_RE.match(line)
        if via and pending is not None:
            routes.append(BirdRoute(pending[0], pending[1], pending[2], via.group(1)))
            pending = None
    return routes


class Bird(Protocol):
    """What the reflector needs from BIRD (tests pass a fake)."""

    def configure(self) -> tuple[bool, str]: ...
    def show_protocols(self) -> str | None: ...
    def show_status(self) -> str | None: ...
    def show_routes(self) -> str | None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...


class BirdControl:
    """BIRD through `birdc -s SOCKET`; `bird` itself only when asked to start it."""

    def __init__(self, paths: ReflectorPaths) -> None:
        self.paths = paths

    def _birdc(self, *args: str) -> tuple[int, str, str] | None:
        """(rc, stdout, stderr) of one birdc command, or None when birdc could not run at all."""
        argv = [self.paths.birdc, "-s", self.paths.socket, *args]
        try:
            done = commands.run(argv, timeout=BIRDC_TIMEOUT)
            return 0, done.stdout, done.stderr
        except commands.CommandFailed as err:
            if err.rc is None or err.rc == 127:  # timed out, or no birdc
                log.warning("birdc failed args=%s error=%s", " ".join(args), err)
                return None
            return err.rc, err.stdout, err.stderr

    def configure(self) -> tuple[bool, str]:
        done = self._birdc("configure")
        if done is None:
            return False, "birdc did not answer"
        rc, stdout, stderr = done
        text = (stdout + stderr).strip()
        # "Reconfigured", "Reconfiguration in progress", "... queueing new config"
        ok = rc == 0 and ("Reconfigur" in text or "queueing" in text)
        return ok, text.splitlines()[-1] if text else f"exit {rc}"

    def show_protocols(self) -> str | None:
        done = self._birdc("show", "protocols", "all")
        if done is None or done[0] != 0:
            return None
        return done[1]

    def show_status(self) -> str | None:
        """`birdc show status`: version, router ID, boot and reconfiguration times."""
        done = self._birdc("show", "status")
        if done is None or done[0] != 0:
            return None
        return done[1]

    def show_routes(self) -> str | None:
        """`birdc show route`: every path BIRD holds."""
        done = self._birdc("show", "route")
        if done is None or done[0] != 0:
            return None
        return done[1]

    def stop(self) -> None:
        """Shut BIRD down (`birdc down`): the node left route-reflector mode."""
        done = self._birdc("down")
        log.info("bird stopped socket=%s answer=%s", self.paths.socket,
                 (done[1].strip().splitlines() or ["-"])[-1] if done else "none")

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.paths.socket), exist_ok=True)
        # bird daemonises itself; it reads the configuration we have just written.
        try:
            commands.run([self.paths.bird, "-c", self.paths.config, "-s", self.paths.socket],
                         timeout=BIRDC_TIMEOUT)
        except commands.CommandFailed as err:
            log.error("bird did not start: %s", err)
        else:
            log.info("bird started config=%s socket=%s", self.paths.config, self.paths.socket)


@dataclass
class _Session:
    state: str = "Idle"
    since: float = field(default_factory=time.time)
    info: str = ""
    routes: int = 0


class Reflector:
    """Datastore → BIRD configuration, and BIRD's sessions → the status file. No threads.

    Two uses: the dedicated reflector (`run_reflector`, its own syncer), and the BIRD of an agent
    whose Node has a cluster ID (node/bgp.py): then `resources` is the agent's index and
    `local_agent` adds the session to the node's own ExaBGP.
    """

    def __init__(self, node_name: str, paths: ReflectorPaths, *, bird: Bird | None = None,
                 wall_clock: Callable[[], float] = time.time,
                 clock: Callable[[], float] = time.monotonic,
                 secrets: SecretResolver | None = None,
                 resources: BGPResources | None = None,
                 local_agent: LocalAgent | None = None) -> None:
        self.node_name = node_name
        self.paths = paths
        self.secrets = secrets if secrets is not None else SecretResolver.from_env(os.environ)
        self.secret_refs: frozenset[SecretRef] = frozenset()  # the Secrets the last render used
        self.bird: Bird = bird if bird is not None else BirdControl(paths)
        self._wall = wall_clock
        self._clock = clock
        self._retry_at = 0.0
        self._configure_error = ""
        self._resources = resources if resources is not None else BGPResources()
        self._shared = resources is not None
        self.local_agent = local_agent
        self._dirty = True
        self._in_sync = False
        self._peers: dict[str, Peer] = {}
        self._cluster_id: str | None = None
        self._as_number: int | None = None
        self.router_id: str | None = None
        self._text: str | None = None  # last rendering written to disk
        self._applied: str | None = None  # last rendering BIRD accepted
        self._config_error = ""
        self._bird_up = False
        self._sessions: dict[str, _Session] = {}
        self._status_file = StatusFile(self.paths.status)
        self.configures = 0  # successful `birdc configure` calls (tests, logs)
        self.last_configured: float | None = None  # wall time of the last successful configure

    # -- datastore input ---------------------------------------------------------------------
    def on_update(self, update: KVUpdate) -> None:
        if self._resources.on_update(update):
            self._dirty = True

    def mark_dirty(self) -> None:
        """The shared resources changed (the agent's index): render again at the next sync."""
        self._dirty = True

    def datastore_in_sync(self) -> None:
        self._in_sync = True

    def secrets_changed(self) -> None:
        """A password Secret in use changed: render (and configure BIRD) again."""
        self._dirty = True

    @property
    def peers(self) -> list[Peer]:
        return list(self._peers.values())

    # -- the work after each batch -----------------------------------------------------------
    def sync(self) -> None:
        """Render; write and `birdc configure` when the text changed or BIRD has not taken it yet."""
        if not self._in_sync:
            return
        if self._dirty:
            self._dirty = False
            self._render()
        if self._text is not None and self._text != self._applied and self._clock() >= self._retry_at:
            ok, message = self.bird.configure()
            self._retry_at = 0.0 if ok else self._clock() + CONFIGURE_RETRY
            if ok:
                self._applied = self._text
                self.configures += 1
                self.last_configured = self._wall()
                self._bird_up = True
                log.info("bird reconfigured peers=%d clients=%d", len(self._peers),
                         sum(p.rr_client for p in self._peers.values()))
            elif self.paths.start_bird and not self._bird_up:
                log.info("bird not answering (%s); starting it", message)
                self.bird.start()
            elif message != self._configure_error:
                log.warning("bird configure failed (retrying every %g s): %s", CONFIGURE_RETRY, message)
            self._configure_error = "" if ok else message

    def _render(self) -> None:
        try:
            nodes = [NodeInfo.from_resource(v) for v in self._resources.nodes.values()]
            settings, specs, self.secret_refs = resolve_peering(self._resources, self.secrets)
            peers = select_peers(self.node_name, nodes, settings, specs)
            me = next(n for n in nodes if n.name == self.node_name)
            # BIRD's router ID: the node's IPv4, else (IPv6-only) Calico's CALICO_ROUTER_ID=hash.
            router_id = me.ipv4 or hashed_router_id(self.node_name)
            if me.rr_cluster_id is None:
                log.warning("Node %s has no spec.bgp.routeReflectorClusterID: it peers but reflects "
                            "nothing", self.node_name)
            as_number = me.as_number or settings.as_number
            default = self._resources.configs.get("default")
            node_config = self._resources.configs.get(f"node.{self.node_name}")
            filters = list(self._resources.bgp_filters().values())
            rules = community_rules(default, node_config)
            severity = (((node_config or {}).get("spec") or {}).get("logSeverityScreen")
                        or ((default or {}).get("spec") or {}).get("logSeverityScreen") or "Info")
            if not self._shared:
                apply_log_level(severity)
            port = settings.listen_port_of(self.node_name)
            pools = list(self._resources.pools.values())
            services = ServiceSettings.from_resource(default)
            ignored = [str(i) for i in ((default or {}).get("spec") or {}).get("ignoredInterfaces") or ()]
            if self.local_agent is not None:
                # The node's own agent: a session per family the node has (its ExaBGP binds
                # 127.0.0.2 and ::1), each carrying that family's routes, as calico-node's bird
                # and bird6 program the kernel each for its own family.
                agent_sessions = [(self.local_agent.address, me.ipv4, 4),
                                  (self.local_agent.address6, me.ipv6, 6)]
                peers = [*peers, *(Peer(address=address, as_number=as_number, type=PeerType.LOCAL,
                                        name=local_agent_name(version), port=self.local_agent.port,
                                        source_address=source, rr_client=me.rr_cluster_id is not None,
                                        node=self.node_name)
                                   for address, source, version in agent_sessions if address and source)]
            text = render_bird_reflector(
                router_id=router_id, as_number=as_number, cluster_id=me.rr_cluster_id, peers=peers,
                listen_port=port,
                listen_address=me.ipv4 if settings.bind_mode_of(self.node_name) == "NodeIP" else None,
                filters=filters, communities=rules, log_severity=severity,
                export_pools=sorted(p.cidr for p in pools if not p.disable_bgp_export),
                no_export_pools=sorted(p.cidr for p in pools if p.disable_bgp_export),
                service_cidrs=sorted(set(services.load_balancer_cidrs) | set(services.external_cidrs)),
                ignored_interfaces=ignored)
        except (PeeringError, FilterError, ValueError, KeyError, TypeError, StopIteration) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if message != self._config_error:
                log.error("BIRD configuration not changed: %s", message)
            self._config_error = message
            return
        self._config_error = ""
        self._peers = {p.address: p for p in peers if p.type is not PeerType.LOCAL}
        self._cluster_id, self._as_number, self.router_id = me.rr_cluster_id, as_number, router_id
        for address in set(self._sessions) - set(self._peers):
            del self._sessions[address]
        if text != self._text:
            self._write_config(text)
            log.info("BIRD configuration written path=%s peers=%s", self.paths.config,
                     ",".join(self._peers) or "-")

    @property
    def config_error(self) -> str:
        return self._config_error

    @property
    def bird_up(self) -> bool:
        return self._bird_up

    def _write_config(self, text: str) -> None:
        os.makedirs(os.path.dirname(self.paths.config), exist_ok=True)
        tmp = f"{self.paths.config}.tmp"
        # 0600: the configuration carries the BGP MD5 passwords.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
        os.replace(tmp, self.paths.config)
        self._text = text

    # -- status ------------------------------------------------------------------------------
    def poll(self) -> None:
        """Read BIRD's sessions (`show protocols all`) and rewrite the status file if it changed."""
        self.apply_protocols(self.bird.show_protocols())
        self.write_status()

    def apply_protocols(self, text: str | None) -> None:
        """BIRD's `show protocols all` output (None: BIRD did not answer) → the sessions' states."""
        was_up, self._bird_up = self._bird_up, text is not None
        if was_up and not self._bird_up:
            log.warning("bird stopped answering socket=%s", self.paths.socket)
            self._applied = None  # a restarted BIRD read the file; configure again to be sure
            self._retry_at = 0.0
        elif self._bird_up and not was_up:
            log.info("bird answering socket=%s", self.paths.socket)
        protocols = parse_show_protocols(text) if text is not None else {}
        for address, peer in self._peers.items():
            session = self._sessions.setdefault(address, _Session(since=self._wall()))
            proto = protocols.get(peer.name)
            if proto is None:
                state, info, routes = "Idle", ("BIRD not running" if text is None else "not configured yet"), 0
            else:
                state, info, routes = proto.state, proto.info, proto.routes_received
            if state != session.state:
                session.since = self._wall()
            session.state, session.info, session.routes = state, info, routes

    def peer_rows(self) -> list[dict[str, Any]]:
        """The sessions in the status file's format."""
        rows = []
        for address in sorted(self._peers, key=address_key):
            peer = self._peers[address]
            session = self._sessions.get(address) or _Session(since=self._wall())
            rows.append({
                "peer": address, "type": peer.type.value, "rrClient": peer.rr_client,
                "asNumber": peer.as_number, "state": session.state, "since": session.since,
                "info": session.info, "routesReceived": session.routes, "node": peer.node,
            })
        return rows

    @property
    def cluster_id(self) -> str | None:
        return self._cluster_id

    def status(self) -> dict[str, Any]:
        rows = self.peer_rows()
        return {
            "node": self.node_name, "pid": os.getpid(), "updated": self._wall(),
            # The agent's field name; here it says whether BIRD answers on its socket.
            "sidecar": "connected" if self._bird_up else "disconnected",
            "speaker": "bird", "routeReflector": True, "clusterID": self._cluster_id,
            "configError": self._config_error or (self._configure_error if self._bird_up else ""),
            "announced": [],
            "learned": sum(s.routes for s in self._sessions.values()), "peers": rows,
        }

    def write_status(self) -> None:
        self._status_file.write(self.status())

    def status_snapshot(self) -> Snapshot:
        """A dedicated reflector's CalicoNodeStatus: BIRD, its sessions and the paths it holds."""
        rows = self.peer_rows()
        by_name = {peer.name: peer for peer in self._peers.values()}
        best: list[PathView] = []
        others: list[PathView] = []
        for route in parse_show_route(self.bird.show_routes() or ""):
            peer = by_name.get(route.protocol)
            if peer is None:
                continue  # not a BGP session's (direct, static)
            view = PathView(route.prefix, peer.address, route.via, peer.type.value)
            (best if route.best else others).append(view)
        bird = self.bird
        return Snapshot(speaker_ready=self._bird_up, version="BIRD", router_id=self.router_id or "",
                        boot_time=None, reconfigured=self.last_configured, peers=tuple(rows), best=tuple(best),
                        others=tuple(others), own_blocks=frozenset(),
                        speaker=lambda: parse_bird_status(bird.show_status() or ""))


_SECRETS_CHANGED = object()  # posted by the SecretWatcher onto the reflector's queue


def run_reflector(store: Any, node_name: str, paths: ReflectorPaths, stop: threading.Event,
                  *, syncer_factory: Callable[..., Any] | None = None,
                  kernel_routes: KernelRoutes | None = None, bird: Bird | None = None) -> None:
    """The reflector's loop until `stop` is set: syncer batches → sync(); status every second;
    the CalicoNodeStatus resources naming this node when they are due."""
    from felixpy.datastore.syncer import Syncer

    events: "queue.Queue[SyncEvent | object]" = queue.Queue()
    reflector = Reflector(node_name, paths, bird=bird)
    writer = StatusWriter(store, kernel_routes=kernel_routes)
    reporter = NodeStatusReporter(node_name, writer)
    watcher = SecretWatcher(reflector.secrets, lambda: events.put(_SECRETS_CHANGED))
    syncer = (syncer_factory or Syncer)(store, events.put)
    writer.start()
    syncer.start()
    log.info("route reflector running node=%s config=%s socket=%s", node_name, paths.config, paths.socket)
    next_poll = 0.0
    try:
        while not stop.is_set():
            timeout = max(0.0, next_poll - time.monotonic())
            try:
                event: SyncEvent | object | None = events.get(timeout=min(timeout, 0.5))
            except queue.Empty:
                event = None
            while event is not None:
                if event is _SECRETS_CHANGED:
                    reflector.secrets_changed()
                elif isinstance(event, SyncStatus):
                    if event is SyncStatus.IN_SYNC:
                        reflector.datastore_in_sync()
                elif isinstance(event, list):
                    for update in event:
                        reflector.on_update(update)
                        status_request = decode(update, (Kind.CALICO_NODE_STATUS,))
                        if status_request is not None:
                            reporter.on_resource(status_request)
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    event = None
            reflector.sync()
            watcher.watch(reflector.secret_refs)
            if time.monotonic() >= next_poll:
                reflector.poll()
                reflector.sync()  # BIRD came back: hand it the current rendering
                next_poll = time.monotonic() + STATUS_INTERVAL
            due = reporter.next_deadline()
            if due is not None and due <= time.monotonic():
                reporter.report(reflector.status_snapshot)
    finally:
        watcher.stop()
        syncer.stop()
        writer.stop()
