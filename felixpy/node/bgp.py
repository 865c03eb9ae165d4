"""The agent's BGP controller: datastore → ExaBGP config and announcements; sidecar events → learned routes.

One object, owned by the agent's main loop (`CALICO_NETWORKING_BACKEND=bird`). It does no kernel
I/O: the agent's dispatcher feeds it decoded datastore updates (`register_with`), the prefixes this node should announce
(`set_announcements`, from the calc graph) and sidecar messages (`on_message`), calls `sync()`
after every batch, and asks it for the learned routes (`learned_routes()`), which the route
manager merges with the calc graph's own routes.

    datastore ─► Nodes, BGPConfiguration, BGPPeers ─► bgp.peers.select_peers ─► bgp.config
                 ─► exabgp.conf (atomic write) ─► SIGUSR1 to ExaBGP (pid file) when it changed
    calc.bgp_announcements() ─► announce / withdraw (batched; next hop = the node's IPv4, or its IPv6
                                for IPv6 prefixes, which go out on the IPv6 sessions only)
    link thread: SidecarClient.next_event ─► queue ─► on_message ─► bgp.rib.Rib ─► learned_routes()

Threads: `start(post)` runs one background thread that connects to the sidecar socket (retrying)
and only puts `SidecarMessage`s on the agent's queue. Commands are pipelined from the loop with
`SidecarClient.submit` (never waiting for ExaBGP's answer); failures come back as messages.

Restarts lose no traffic:
- agent restart: the sidecar replays its cache (sessions, OPENs, received routes, End-of-RIBs)
  and `ReplayDone`; the loop's first dataplane apply waits for it (`ready_for_dataplane`), so
  the route driver never deletes a BGP route it simply has not heard about yet. ExaBGP's
  adj-RIB-out is read back (`show adj-rib out`) and anything we no longer want is withdrawn.
- sidecar/ExaBGP restart: the RIB keeps every path as stale (`Rib.suspend`) until the replay and
  the peers' End-of-RIBs refresh them; after the replay everything is announced again and each
  established peer gets our End-of-RIB (neighbours use `manual-eor`, so peers with graceful
  restart keep our routes until then).
- a peer coming up (new neighbour after a reload, or a restarted one) gets every announcement
  addressed to it, then End-of-RIB: ExaBGP only sends API routes to neighbours that existed when
  they were announced.

Status: every change of the sessions is written as JSON to the status file (`bgp-status.json`
in the agent's state dir) that `felixctl node status` and `felixpy-lab status` read.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol

from bgp.advertise import (CommunityRule, LocalRoute, PeerExport, community_rules, exports,
                           import_policy)
from bgp.announcer import Announcer
from bgp.client import SidecarClient, SidecarUnavailable
from bgp.config import SpeakerConfig, render_exabgp_conf
from bgp.filters import BGPFilter, FilterError, resolve
from bgp.bird import LocalAgent, hashed_router_id
from bgp.peers import (BGPPeerSpec, BGPSettings, NodeInfo, Peer, PeerType, PeeringError, address_key,
                       select_peers)
from bgp.protocol import Attributes, CommandResult, Event, Notification, ReplayDone, StateChange
from bgp.rib import Rib
from bgp.services import (EXCLUDE_LABEL, EndpointSliceInfo, ServiceInfo, ServiceRoutes, ServiceSettings,
                          service_routes)
from felixpy.calc.updates import Kind, Update, decode
from felixpy.calc.updates import Node as NodeValue
from felixpy.datastore.syncer import KVUpdate
from felixpy.node.nodestatus import (BirdTimes, KernelRoutes, NodeStatusReporter, PathView, Snapshot, StatusWriter,
                                     exabgp_start_time, parse_bird_status)
from felixpy.node.secrets import SecretRef, SecretResolver, SecretWatcher, secret_ref

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher
    from felixpy.datastore.api import Datastore
    from felixpy.node.reflector import Bird, Reflector, ReflectorPaths

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/var/run/calico/exabgp"
STATUS_FILE_NAME = "bgp-status.json"
# How long the first dataplane apply waits for the sidecar's replay before going ahead without
# BGP routes (ExaBGP not running at all must not keep pods from starting forever).
DEFAULT_SYNC_TIMEOUT = 10.0
# Paths are kept as stale this long after the sidecar connection drops (ExaBGP restarting); the
# replay and the peers' End-of-RIBs refresh what is still valid long before.
SUSPEND_HOLD = 120.0
RECONNECT_MIN = 0.05
RECONNECT_MAX = 2.0
# Reflector mode: the node's ExaBGP peers with its own BIRD over loopback. BIRD holds the BGP port,
# so ExaBGP binds a loopback address of its own and listens on another port, for BIRD to connect
# to when it (re)starts; ExaBGP connects to BIRD's port too.
LOCAL_AGENT_ADDRESS = "127.0.0.2"
LOCAL_AGENT_ADDRESS6 = "::1"  # IPv6 has one loopback address; BIRD's end is the node's IPv6
LOCAL_AGENT_PORT = 1790
LOCAL_BIRD_NAME = "Local_BIRD"
BIRD_POLL_INTERVAL = 1.0

_PREFIX_RE = re.compile(r"\b(\d{1,3}(?:\.\d{1,3}){3}/\d{1,2})\b|(?<![\w:])([0-9a-fA-F]*:[0-9a-fA-F:]*/\d{1,3})\b")
_SELECTED_RE = re.compile(r"neighbor (\S+)")
NODE_CONFIG_PREFIX = "node."
# Python loggers of the BGP speaker side, whose level follows BGPConfiguration logSeverityScreen
# (Calico's BIRD/confd log level; felixpy's speaker logic is this controller, the sidecar client and bgp/).
BGP_LOGGERS = ("felixpy.node.bgp", "felixpy.node.reflector", "bgp")
_LOG_LEVELS = {"Trace": logging.DEBUG, "Debug": logging.DEBUG, "Info": logging.INFO, "Warning": logging.WARNING,
               "Error": logging.ERROR, "Fatal": logging.CRITICAL, "None": logging.CRITICAL + 10}


@dataclass(frozen=True)
class BGPPaths:
    """Where the controller finds ExaBGP and writes its files (all from the environment)."""

    config: str  # ExaBGP's configuration file, rendered by the controller
    pid_file: str  # written by ExaBGP (exabgp.daemon.pid); SIGUSR1 goes to this pid
    socket: str  # the sidecar's unix socket
    status: str  # JSON status for felixctl node status / felixpy-lab status
    python: str = sys.executable  # interpreter of the sidecar (`python -m bgp.sidecar`)
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT

    @classmethod
    def from_env(cls, env: Mapping[str, str], state_dir: str) -> "BGPPaths":
        """FELIXPY_EXABGP_CONFIG, FELIXPY_EXABGP_PIDFILE, FELIXPY_BGP_SOCKET, FELIXPY_BGP_STATUS,
        FELIXPY_BGP_SYNC_TIMEOUT; raises ValueError with one line on a bad value."""
        run_dir = DEFAULT_RUN_DIR
        values = {
            "FELIXPY_EXABGP_CONFIG": env.get("FELIXPY_EXABGP_CONFIG") or f"{run_dir}/exabgp.conf",
            "FELIXPY_EXABGP_PIDFILE": env.get("FELIXPY_EXABGP_PIDFILE") or f"{run_dir}/exabgp.pid",
            "FELIXPY_BGP_SOCKET": env.get("FELIXPY_BGP_SOCKET") or f"{run_dir}/sidecar.sock",
            "FELIXPY_BGP_STATUS": env.get("FELIXPY_BGP_STATUS") or f"{state_dir.rstrip('/')}/{STATUS_FILE_NAME}",
        }
        for name, value in values.items():
            if not os.path.isabs(value):
                raise ValueError(f"{name}={json.dumps(value)}: expected an absolute path")
        raw_timeout = env.get("FELIXPY_BGP_SYNC_TIMEOUT", "")
        try:
            timeout = float(raw_timeout) if raw_timeout else DEFAULT_SYNC_TIMEOUT
            if timeout < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"FELIXPY_BGP_SYNC_TIMEOUT={json.dumps(raw_timeout)}: expected seconds >= 0") from None
        return cls(config=values["FELIXPY_EXABGP_CONFIG"], pid_file=values["FELIXPY_EXABGP_PIDFILE"],
                   socket=values["FELIXPY_BGP_SOCKET"], status=values["FELIXPY_BGP_STATUS"],
                   sync_timeout=timeout)


# -- messages the link thread puts on the agent's queue --------------------------------------------


@dataclass(frozen=True)
class SidecarMessage:
    """Base of everything the controller's thread (or a command callback) queues for the loop."""


@dataclass(frozen=True)
class SidecarConnected(SidecarMessage):
    generation: int


@dataclass(frozen=True)
class SidecarLost(SidecarMessage):
    generation: int
    reason: str


@dataclass(frozen=True)
class SidecarEvent(SidecarMessage):
    generation: int
    event: Event


@dataclass(frozen=True)
class CommandsFailed(SidecarMessage):
    """A pipelined command was rejected or lost: the loop re-announces everything, or, for a
    command addressed to some neighbours, refreshes those when they next come up."""

    generation: int
    command: str
    error: str
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class BirdPolled(SidecarMessage):
    """Reflector mode: BIRD's `show protocols all` (None: BIRD did not answer)."""

    text: str | None


@dataclass(frozen=True)
class SecretsChanged(SidecarMessage):
    """A BGP password Secret in use changed (posted by the SecretWatcher): render again."""


@dataclass(frozen=True)
class AdjRibOut(SidecarMessage):
    """What ExaBGP currently announces (read back after connecting)."""

    generation: int
    prefixes: frozenset[str]


class Link(Protocol):
    """The part of bgp.client.SidecarClient the controller uses (tests pass a fake)."""

    def connect(self, timeout: float = 10.0) -> None: ...
    def close(self) -> None: ...
    def submit(self, command: str) -> "Future[CommandResult]": ...
    def next_event(self, timeout: float | None = None) -> Event | None: ...


@dataclass
class _Session:
    peer: str
    state: str = "Idle"  # Idle | Connect | Established
    since: float = field(default_factory=time.time)
    info: str = ""


def parse_adj_rib_out(lines: Iterable[str]) -> frozenset[str]:
    """Prefixes in ExaBGP's `show adj-rib out` text (`neighbor X ipv4 unicast P next-hop N`, and
    `ipv6 unicast` for the IPv6 sessions)."""
    found = set()
    for line in lines:
        for groups in _PREFIX_RE.findall(line):
            for match in groups:
                if not match:
                    continue
                try:
                    found.add(str(ipaddress.ip_network(match)))
                except ValueError:
                    continue
    return frozenset(found)


def signal_exabgp(pid_file: str) -> bool:
    """SIGUSR1 (reload; never SIGHUP, which stops ExaBGP) to the pid in `pid_file`."""
    try:
        with open(pid_file) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, signal.SIGUSR1)
        return True
    except (OSError, ValueError, IndexError) as err:
        log.warning("cannot signal ExaBGP to reload pid_file=%s error=%s (it reads the new "
                    "configuration when it starts)", pid_file, err)
        return False


class BGPResources:
    """The datastore resources BGP is computed from: Nodes, BGPConfigurations, BGPPeers and
    BGPFilters (peering), and Kubernetes Services and EndpointSlices (service advertisement).

    Shared by the agent's BGP controller (registered with the agent's dispatcher) and the route
    reflector (which feeds it the syncer's updates through `on_update`); both recompute their
    peers when `changed` is set, the agent its service routes when `services_changed` is.
    Values are the stored resources: bgp.peers reads them.
    """

    KINDS = (Kind.NODE, Kind.BGP_CONFIGURATION, Kind.BGP_PEER, Kind.BGP_FILTER, Kind.IP_POOL,
             Kind.KUBERNETES_SERVICE, Kind.KUBERNETES_ENDPOINT_SLICE)

    def __init__(self) -> None:
        self.nodes: dict[str, Mapping[str, Any]] = {}
        self.configs: dict[str, Mapping[str, Any]] = {}
        self.peers: dict[str, Mapping[str, Any]] = {}
        self.filters: dict[str, Mapping[str, Any]] = {}
        self.pools: dict[str, Any] = {}  # name → calc.updates.IPPool (what a reflector exports)
        self.services: dict[str, ServiceInfo] = {}  # by datastore key
        self.slices: dict[str, EndpointSliceInfo] = {}
        self.changed = True
        self.services_changed = True

    def register_with(self, dispatcher: Dispatcher) -> None:
        for kind in self.KINDS:
            dispatcher.register(kind, self.on_resource)

    def on_resource(self, update: Update[Any]) -> None:
        if update.kind in (Kind.KUBERNETES_SERVICE, Kind.KUBERNETES_ENDPOINT_SLICE):
            table: dict[str, Any] = self.services if update.kind is Kind.KUBERNETES_SERVICE else self.slices
            if update.value is None:
                table.pop(update.key, None)
            else:
                table[update.key] = update.value
            self.services_changed = True
            return
        index = {Kind.NODE: self.nodes, Kind.BGP_CONFIGURATION: self.configs, Kind.BGP_PEER: self.peers,
                 Kind.BGP_FILTER: self.filters, Kind.IP_POOL: self.pools}[update.kind]
        value = update.value.resource if isinstance(update.value, NodeValue) else update.value
        if value is None:
            index.pop(update.name, None)
        else:
            index[update.name] = value
        self.changed = True
        if update.kind in (Kind.NODE, Kind.BGP_CONFIGURATION):
            self.services_changed = True  # the node's exclusion label, the service CIDRs

    def on_update(self, update: KVUpdate) -> bool:
        """Index one raw update (the route reflector's syncer); True when it concerned BGP peering."""
        typed = decode(update, self.KINDS)
        if typed is None:
            return False
        self.on_resource(typed)
        return typed.kind not in (Kind.KUBERNETES_SERVICE, Kind.KUBERNETES_ENDPOINT_SLICE)

    def node_configs(self) -> dict[str, Mapping[str, Any]]:
        """node name → its `node.<name>` BGPConfiguration."""
        return {name[len(NODE_CONFIG_PREFIX):]: value for name, value in self.configs.items()
                if name.startswith(NODE_CONFIG_PREFIX)}

    def bgp_filters(self) -> dict[str, BGPFilter]:
        """The BGPFilters by name; raises FilterError (one line) for one that cannot be used."""
        return {name: BGPFilter.from_resource(value) for name, value in sorted(self.filters.items())}


@functools.lru_cache(maxsize=1)
def _exabgp_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("exabgp")
    except PackageNotFoundError:
        return "unknown"


def apply_log_level(severity: str) -> None:
    """BGPConfiguration logSeverityScreen → the level of the BGP speaker's loggers."""
    level = _LOG_LEVELS.get(severity, logging.INFO)
    for name in BGP_LOGGERS:
        logging.getLogger(name).setLevel(level)


def resolve_peering(resources: BGPResources, secrets: SecretResolver
                    ) -> tuple[BGPSettings, list[BGPPeerSpec], frozenset[SecretRef]]:
    """The global settings and the BGPPeers with their passwords resolved, and the Secret refs
    used -- the same for the agent's ExaBGP and the reflector's BIRD."""
    default = resources.configs.get("default")
    mesh_ref = ((default or {}).get("spec") or {}).get("nodeMeshPassword")
    refs = {secret_ref(mesh_ref)}
    settings = BGPSettings.from_resource(default, node_mesh_password=secrets.resolve_ref(
        mesh_ref, what="BGPConfiguration default nodeMeshPassword"), node_configs=resources.node_configs())
    specs = []
    for value in resources.peers.values():
        ref = (value.get("spec") or {}).get("password")
        refs.add(secret_ref(ref))
        password = secrets.resolve_ref(ref, what=f"BGPPeer {(value.get('metadata') or {}).get('name')} password")
        specs.append(BGPPeerSpec.from_resource(value, password=password))
    return settings, specs, frozenset(r for r in refs if r is not None)


class BGPController:
    def __init__(
        self,
        node_name: str,
        paths: BGPPaths,
        *,
        link: Link | None = None,
        reload: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        secrets: SecretResolver | None = None,
        bird_paths: "ReflectorPaths | None" = None,
        bird: "Bird | None" = None,
        status_store: "Datastore | None" = None,
        kernel_routes: "KernelRoutes | None" = None,
    ) -> None:
        self.node_name = node_name
        self.paths = paths
        # BGP passwords: read on every render; the watcher (started with the link thread) asks
        # for a render when a Secret in use changes, so a rotated password needs no restart.
        self._secrets = secrets if secrets is not None else SecretResolver.from_env(os.environ)
        self._secret_watcher: SecretWatcher | None = None
        self._secret_refs: frozenset[SecretRef] = frozenset()
        self._link: Link = link if link is not None else SidecarClient(paths.socket)
        self._reload = reload if reload is not None else (lambda: signal_exabgp(paths.pid_file))
        self._clock = clock
        self._wall = wall_clock
        self._post: Callable[[Any], None] | None = None
        self._thread: threading.Thread | None = None
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()
        self._started_at = clock()
        self.last_reload: float | None = None  # wall time the ExaBGP configuration last changed

        # datastore index
        self._resources = BGPResources()
        self._datastore_synced = False

        # configuration state
        self._peers: dict[str, Peer] = {}  # ExaBGP's sessions
        self._node_ip: str | None = None
        self._node_ip6: str | None = None  # spec.bgp.ipv6Address: next hop of our IPv6 routes
        self._node_as: int | None = None
        self._router_id: str | None = None
        self._config_text: str | None = None
        self._config_error = ""
        self._filters: dict[str, BGPFilter] = {}
        self._community_rules: tuple[CommunityRule, ...] = ()
        self._peer_exports: dict[str, PeerExport] = {}
        self._needs_interfaces = False
        self._static_routes: dict[str, str] = {}  # reachableBy: peer/32 → gateway
        self._service_settings = ServiceSettings()
        self._service_routes = ServiceRoutes(frozenset(), frozenset())
        self._reject_nets: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

        # route reflector mode: this node's Node has a cluster ID, BIRD speaks for it
        self._bird_paths = bird_paths
        self._bird_control = bird
        self._reflector: "Reflector | None" = None
        self.reflector_mode = False
        self._reflector_polling = threading.Event()

        # what to announce
        self._own: frozenset[str] = frozenset()
        self._endpoints: Callable[[], Iterable[Any]] | None = None
        self._desired: dict[str, dict[str, Attributes]] = {}
        self._exports_dirty = True

        # sidecar session state
        self._generation = 0  # of the connection the loop currently trusts
        self._connected = False
        self._replayed = False  # ReplayDone seen on the current connection
        self._ever_replayed = False
        self._announcer = Announcer()
        self._read_back = False
        self._full_announce_needed = True
        self._eor_pending: set[str] = set()  # established peers still owed announcements + EoR
        self._sessions: dict[str, _Session] = {}
        self._next_hop_announced: tuple[str | None, str | None] | None = None

        self.rib = Rib()
        self.routes_dirty = False  # learned routes changed since the loop last asked
        self._status_file = StatusFile(self.paths.status)

        # CalicoNodeStatus: the resources naming this node, written by a thread of their own
        self._status_writer = (StatusWriter(status_store, kernel_routes=kernel_routes, wall=wall_clock)
                               if status_store is not None else None)
        self.node_status = NodeStatusReporter(node_name, self._status_writer, clock=clock)

    # -- lifecycle (thread) --------------------------------------------------------------------
    def start(self, post: Callable[[Any], None]) -> None:
        """Start the link thread; it puts SidecarMessages on the loop's queue via `post`."""
        self._post = post
        self._started_at = self._clock()
        self._secret_watcher = SecretWatcher(self._secrets, lambda: post(SecretsChanged()))
        self._secret_watcher.watch(self._secret_refs)
        self._thread = threading.Thread(target=self._run_link, name="bgp-link", daemon=True)
        self._thread.start()
        if self._bird_paths is not None:
            self._poller = threading.Thread(target=self._run_bird_poller, name="bird-status", daemon=True)
            self._poller.start()
        if self._status_writer is not None:
            self._status_writer.start()
        self.write_status()

    def stop(self) -> None:
        self._stop.set()
        self._reflector_polling.set()
        if self._status_writer is not None:
            self._status_writer.stop()
        if self._secret_watcher is not None:
            self._secret_watcher.stop()
        self._link.close()

    def _run_link(self) -> None:
        delay = RECONNECT_MIN
        generation = 0
        while not self._stop.is_set():
            try:
                self._link.connect(timeout=0)
            except SidecarUnavailable as err:
                if delay >= RECONNECT_MAX:
                    log.debug("bgp sidecar not reachable: %s", err)
                self._stop.wait(delay)
                delay = min(delay * 2, RECONNECT_MAX)
                continue
            delay = RECONNECT_MIN
            generation += 1
            assert self._post is not None
            self._post(SidecarConnected(generation))
            try:
                while not self._stop.is_set():
                    event = self._link.next_event(timeout=1.0)
                    if event is not None:
                        self._post(SidecarEvent(generation, event))
            except SidecarUnavailable as err:
                self._post(SidecarLost(generation, str(err)))

    def _run_bird_poller(self) -> None:
        """Reflector mode only: BIRD's sessions every second, read off the loop (birdc may hang)."""
        while not self._stop.is_set():
            self._reflector_polling.wait()
            if self._stop.is_set():
                return
            reflector = self._reflector
            if reflector is not None and self.reflector_mode and self._post is not None:
                self._post(BirdPolled(reflector.bird.show_protocols()))
            self._stop.wait(BIRD_POLL_INTERVAL)

    # -- datastore input -----------------------------------------------------------------------
    def register_with(self, dispatcher: Dispatcher) -> None:
        self._resources.register_with(dispatcher)
        self.node_status.register_with(dispatcher)

    def set_announcements(self, prefixes: Iterable[str],
                          endpoints: Callable[[], Iterable[Any]] | None = None) -> None:
        """The prefixes this node should announce (calc graph output), and where its local
        endpoints are (`LocalEndpoint`s: the veths of borrowed /32s, for BGPFilter `interface`
        rules; only read when a filter asks). No I/O."""
        own = frozenset(prefixes)
        if own != self._own:
            self._own = own
            self._exports_dirty = True
        self._endpoints = endpoints

    def datastore_in_sync(self) -> None:
        self._datastore_synced = True

    # -- sidecar input -------------------------------------------------------------------------
    def on_message(self, message: SidecarMessage) -> None:
        now = self._clock()
        if isinstance(message, SecretsChanged):
            self._resources.changed = True  # sync() renders with the new value and reloads ExaBGP
            if self._reflector is not None:
                self._reflector.secrets_changed()
            return
        if isinstance(message, BirdPolled):
            if self._reflector is not None and self.reflector_mode:
                was_up = self._reflector.bird_up
                self._reflector.apply_protocols(message.text)
                if self._reflector.bird_up and not was_up:
                    self._reflector.sync()  # BIRD came back: hand it the current rendering
            return
        if isinstance(message, SidecarConnected):
            self._generation = message.generation
            self._connected = True
            self._replayed = False
            self._announcer.reset()
            self._read_back = True
            self._full_announce_needed = True
            log.info("bgp sidecar connected generation=%d", message.generation)
            return
        if getattr(message, "generation", None) != self._generation:
            return  # from a connection we already gave up on
        if isinstance(message, SidecarLost):
            log.warning("bgp sidecar connection lost, keeping learned routes as stale reason=%s",
                        message.reason)
            self._connected = False
            self._replayed = False
            self._announcer.reset()
            self._eor_pending = set()
            self._note_delta(self.rib.suspend(now=now, hold=SUSPEND_HOLD))
            for session in self._sessions.values():
                self._set_state(session, "Idle", "sidecar not connected")
        elif isinstance(message, CommandsFailed):
            if message.peers:
                log.info("bgp command to some neighbours failed; they get everything when they come up "
                         "peers=%s command=%r", ",".join(message.peers), message.command[:120])
                self._announcer.forget(message.peers)
            else:
                log.warning("bgp command failed, re-announcing everything command=%r error=%s",
                            message.command[:120], message.error)
                self._full_announce_needed = True
        elif isinstance(message, AdjRibOut):
            stale = set(message.prefixes) - self._announcer.announced()
            if stale:
                log.info("withdrawing announcements left from before the restart prefixes=%s",
                         ",".join(sorted(stale)))
            self._announcer.seen_announced(message.prefixes)
        elif isinstance(message, SidecarEvent):
            self._on_event(message.event, now)

    def _on_event(self, event: Event, now: float) -> None:
        if isinstance(event, ReplayDone):
            self._replayed = True
            self._ever_replayed = True
            self._full_announce_needed = True
            self._eor_pending = {p for p, s in self._sessions.items() if s.state == "Established"}
            log.info("bgp sidecar replay done established=%d routes=%d",
                     len(self._eor_pending), len(self.rib.best_routes()))
            return
        if isinstance(event, Notification):
            log.info("exabgp notification text=%s", event.text)
            return
        peer_address = getattr(event, "peer", None)
        peer = self._peers.get(peer_address) if peer_address else None
        # The replay may arrive before the configuration is known: a peer we do not know (yet)
        # is assumed to have graceful restart, our default; peers that turn out not to be
        # configured are removed from the RIB when the configuration is computed.
        graceful = peer.max_restart_time > 0 if peer is not None else True
        self._note_delta(self.rib.apply(event, now=now, local_graceful_restart=graceful))
        if peer_address is None:
            return
        session = self._sessions.setdefault(peer_address, _Session(peer_address))
        if isinstance(event, StateChange):
            if event.state == "up":
                self._set_state(session, "Established", "")
                if self._replayed:
                    self._eor_pending.add(peer_address)
            elif event.state == "down":
                self._set_state(session, "Idle", event.reason or "")
                self._eor_pending.discard(peer_address)
            elif event.state == "connected" and session.state != "Established":
                self._set_state(session, "Connect", "")

    def _set_state(self, session: _Session, state: str, info: str) -> None:
        if session.state != state:
            session.since = self._wall()
        session.state = state
        session.info = info

    def _note_delta(self, delta: Mapping[str, str | None]) -> None:
        if delta:
            self.routes_dirty = True

    # -- outputs --------------------------------------------------------------------------------
    def learned_routes(self) -> dict[str, str]:
        """prefix → next hop of every route BGP puts in the kernel: the best paths (stale ones
        included) outside the Service ranges (kube-proxy owns those), and the reachableBy routes
        to peers."""
        self.routes_dirty = False
        routes = {prefix: hop for prefix, hop in self.rib.best_routes().items() if not self._rejected(prefix)}
        routes.update(self._static_routes)
        return routes

    def _rejected(self, prefix: str) -> bool:
        if not self._reject_nets:
            return False
        net = ipaddress.ip_network(prefix)
        return any(net.version == reject.version and net.subnet_of(reject)  # type: ignore[arg-type]
                   for reject in self._reject_nets)

    def ready_for_dataplane(self) -> bool:
        """True once the learned routes are complete (replay done), or the wait timed out."""
        return self._ever_replayed or self._clock() - self._started_at >= self.paths.sync_timeout

    def next_deadline(self) -> float | None:
        """Monotonic time at which `expire()` has work (graceful-restart timers, CalicoNodeStatus)."""
        deadlines = [d for d in (self.rib.next_deadline(), self.node_status.next_deadline()) if d is not None]
        first = self._started_at + self.paths.sync_timeout
        if not self._ever_replayed and self._clock() < first:
            deadlines.append(first)
        return min(deadlines) if deadlines else None

    def expire(self) -> None:
        self._note_delta(self.rib.expire(self._clock()))
        if self._datastore_synced:
            self.node_status.report(self.status_snapshot)

    def status_snapshot(self) -> Snapshot:
        """The BGP state a CalicoNodeStatus reports, copied for its writer thread."""
        peer_types = {p.address: p.type.value for p in self._peers.values()}
        if self.reflector_mode and self._reflector is not None:
            rows = self._reflector.peer_rows()
            peer_types.update({r["peer"]: r["type"] for r in rows})
            bird = self._reflector.bird
            speaker: Callable[[], BirdTimes] | None = lambda: parse_bird_status(bird.show_status() or "")
            ready, version = self._reflector.bird_up, "BIRD"
            router_id = self._reflector.router_id or ""
        else:
            rows = self.status()["peers"]
            pid_file = self.paths.pid_file
            speaker = lambda: BirdTimes(boot=exabgp_start_time(pid_file))  # noqa: E731
            ready, version, router_id = self._connected, f"ExaBGP {_exabgp_version()} (felixpy)", self._router_id or ""
        best: list[PathView] = []
        others: list[PathView] = []
        for prefix in self.rib.prefixes():
            for i, path in enumerate(self.rib.paths(prefix)):
                view = PathView(prefix, path.peer, path.next_hop, peer_types.get(path.peer, "node"))
                (best if i == 0 else others).append(view)
        return Snapshot(speaker_ready=ready, version=version, router_id=router_id, boot_time=None,
                        reconfigured=self.last_reload if not self.reflector_mode or self._reflector is None
                        else self._reflector.last_configured,
                        peers=tuple(rows), best=tuple(best), others=tuple(others),
                        own_blocks=frozenset(p for p in self._own if not p.endswith(("/32", "/128"))), speaker=speaker)

    def local_addresses(self) -> frozenset[str]:
        """This node's addresses: a learned route via one of them is never installed."""
        return frozenset(ip for ip in (self._node_ip, self._node_ip6) if ip)

    @property
    def peers(self) -> list[Peer]:
        """ExaBGP's sessions (in reflector mode: the one to the node's BIRD)."""
        return list(self._peers.values())

    @property
    def reflector(self) -> "Reflector | None":
        return self._reflector if self.reflector_mode else None

    @property
    def router_id(self) -> str | None:
        return self._router_id

    def desired_exports(self) -> dict[str, dict[str, Attributes]]:
        """peer → prefix → attributes this node should announce there (tests, status)."""
        return {peer: dict(routes) for peer, routes in self._desired.items()}

    # -- the work after each batch -------------------------------------------------------------
    def sync(self) -> None:
        """Render/reload ExaBGP's configuration and bring announcements up to date."""
        if not self._datastore_synced:
            return
        if self._resources.changed:
            self._resources.changed = False
            self._update_config()
        if self._resources.services_changed:
            self._resources.services_changed = False
            self._update_services()
        if self.reflector_mode and self._reflector is not None:
            self._reflector.sync()
        if self._exports_dirty:
            self._exports_dirty = False
            self._update_exports()
        if self._connected and self._replayed and (self._node_ip or self._node_ip6):
            self._announce()
        self.write_status()
        due = self.node_status.next_deadline()
        if due is not None and due <= self._clock():
            self.node_status.report(self.status_snapshot)

    def _update_config(self) -> None:
        try:
            nodes = [NodeInfo.from_resource(v) for v in self._resources.nodes.values()]
            settings, specs, self._secret_refs = resolve_peering(self._resources, self._secrets)
            if self._secret_watcher is not None:
                self._secret_watcher.watch(self._secret_refs)
            me = next((n for n in nodes if n.name == self.node_name), None)
            if me is None:
                raise PeeringError(f'Node "{self.node_name}" does not exist')
            filters = self._resources.bgp_filters()
            default = self._resources.configs.get("default")
            node_config = self._resources.configs.get(f"{NODE_CONFIG_PREFIX}{self.node_name}")
            rules = community_rules(default, node_config)
            node_as = me.as_number or settings.as_number
            reflector_mode = me.rr_cluster_id is not None
            if reflector_mode:
                if self._bird_paths is None:
                    raise PeeringError(f'Node "{self.node_name}": spec.bgp.routeReflectorClusterID is set but this '
                                       "agent has no BIRD configured (FELIXPY_BIRD_CONFIG)")
                if me.ipv4 is None:
                    raise PeeringError(f'Node "{self.node_name}": spec.bgp.ipv4Address is not set')
                bird_peers = select_peers(self.node_name, nodes, settings, specs)
                # ExaBGP speaks to the node's BIRD only; BIRD has the real sessions. Distinct BGP
                # identifiers on the two ends: BIRD has the node's address, ExaBGP a hash of the name.
                router_id = hashed_router_id(self.node_name, avoid=me.ipv4)
                peers = [Peer(address=me.ipv4, as_number=node_as, type=PeerType.LOCAL, name=LOCAL_BIRD_NAME,
                              port=settings.listen_port_of(self.node_name), source_address=LOCAL_AGENT_ADDRESS,
                              listen_port=LOCAL_AGENT_PORT, node=self.node_name)]
                if me.ipv6:
                    # The IPv6 routes on an IPv6 session of their own (BIRD's Local_Agent6).
                    peers.append(Peer(address=me.ipv6, as_number=node_as, type=PeerType.LOCAL,
                                      name=f"{LOCAL_BIRD_NAME}6", port=settings.listen_port_of(self.node_name),
                                      source_address=LOCAL_AGENT_ADDRESS6, listen_port=LOCAL_AGENT_PORT,
                                      node=self.node_name))
                static_peers = bird_peers
            else:
                peers = select_peers(self.node_name, nodes, settings, specs)
                # An IPv6-only node still needs a 32-bit BGP identifier: Calico's
                # CALICO_ROUTER_ID=hash, a hash of the node name.
                router_id = me.ipv4 or hashed_router_id(self.node_name)
                static_peers = peers
            local_address = me.ipv4 or me.ipv6
            assert local_address is not None  # select_peers checked it
            text = render_exabgp_conf(SpeakerConfig(
                node_name=self.node_name, router_id=router_id, local_address=local_address,
                as_number=node_as, peers=tuple(peers), sidecar_socket=self.paths.socket, python=self.paths.python))
        except (PeeringError, FilterError, ValueError, KeyError, TypeError) as err:
            message = str(err).splitlines()[0] if str(err) else type(err).__name__
            if message != self._config_error:
                log.error("BGP configuration not changed: %s", message)
            self._config_error = message
            return
        self._config_error = ""
        severity = (((node_config or {}).get("spec") or {}).get("logSeverityScreen")
                    or ((default or {}).get("spec") or {}).get("logSeverityScreen") or "Info")
        apply_log_level(severity)
        if reflector_mode != self.reflector_mode:
            log.info("route reflector mode %s cluster_id=%s", "on" if reflector_mode else "off", me.rr_cluster_id)
            self._switch_reflector(reflector_mode)
        elif reflector_mode and self._reflector is not None:
            self._reflector.mark_dirty()
        old_peers, self._peers = self._peers, {p.address: p for p in peers}
        if (me.ipv4, me.ipv6) != (self._node_ip, self._node_ip6) and (self._node_ip or self._node_ip6):
            self._full_announce_needed = True  # next hop changed
        self._node_ip, self._node_as, self._router_id = me.ipv4, node_as, router_id
        self._node_ip6 = me.ipv6
        self._filters, self._community_rules = filters, rules
        for address in (set(old_peers) | set(self._sessions)) - set(self._peers):
            self._note_delta(self.rib.remove_peer(address))
            self._sessions.pop(address, None)
            self._eor_pending.discard(address)
        for address in self._peers:
            self._sessions.setdefault(address, _Session(address))
        self._announcer.set_peers(self._peers)
        self._peer_exports = {p.address: PeerExport(resolve(p.filters, filters), p.is_ebgp(node_as))
                              for p in peers}
        self._needs_interfaces = any(rule.interface for f in filters.values() for rule in (*f.export_v4, *f.export_v6))
        self._note_delta(self.rib.set_import_policy(import_policy(
            {p.address: resolve(p.filters, filters) for p in peers},
            {p.address: p.is_ebgp(node_as) for p in peers},
            {p.address: p.local_as_for(node_as) for p in peers},
            {p.address: p.num_allowed_local_as for p in peers})))
        static = {f"{p.address}/{32 if p.version == 4 else 128}": p.reachable_by
                  for p in static_peers if p.reachable_by}
        if static != self._static_routes:
            self._static_routes = static
            self.routes_dirty = True
        self._exports_dirty = True
        self._resources.services_changed = True  # the node's labels may have changed
        if text != self._read_config():
            if reflector_mode:
                # ExaBGP gives the BGP port up to BIRD once it has reloaded.
                log.info("ExaBGP configuration: one session, to this node's BIRD")
            self._write_config(text)
            log.info("ExaBGP configuration written path=%s peers=%s", self.paths.config,
                     ",".join(self._peers) or "-")
            self._reload()
            self.last_reload = self._wall()
        self._config_text = text

    def _switch_reflector(self, on: bool) -> None:
        """Enter or leave route-reflector mode (BIRD for the node's sessions, ExaBGP behind it)."""
        from felixpy.node.reflector import Reflector

        if on:
            if self._reflector is None:
                assert self._bird_paths is not None
                self._reflector = Reflector(self.node_name, self._bird_paths, bird=self._bird_control,
                                            wall_clock=self._wall, clock=self._clock, secrets=self._secrets,
                                            resources=self._resources,
                                            local_agent=LocalAgent(LOCAL_AGENT_ADDRESS, LOCAL_AGENT_PORT,
                                                                   LOCAL_AGENT_ADDRESS6))
                self._reflector.datastore_in_sync()
            self._reflector.mark_dirty()
            self.reflector_mode = True
            self._reflector_polling.set()
        else:
            self.reflector_mode = False
            self._reflector_polling.clear()
            if self._reflector is not None and self._bird_paths is not None and self._bird_paths.start_bird:
                # We started it: stop it before ExaBGP wants the BGP port back.
                self._reflector.bird.stop()

    def _update_services(self) -> None:
        default = self._resources.configs.get("default")
        try:
            settings = ServiceSettings.from_resource(default)
        except (ValueError, TypeError, AttributeError) as err:
            log.error("service advertisement not changed: BGPConfiguration default: %s", err)
            return
        me = self._resources.nodes.get(self.node_name) or {}
        labels = (me.get("metadata") or {}).get("labels") or {}
        routes = service_routes(settings, self._resources.services.values(), self._resources.slices.values(),
                                node=self.node_name, excluded=labels.get(EXCLUDE_LABEL) == "true")
        if routes.reject != self._service_routes.reject:
            self._reject_nets = tuple(ipaddress.ip_network(c) for c in sorted(routes.reject))
            self.routes_dirty = True
        if routes.announce != self._service_routes.announce:
            self._exports_dirty = True
            log.info("service routes announce=%s", ",".join(sorted(routes.announce)) or "-")
        self._service_settings, self._service_routes = settings, routes

    def _update_exports(self) -> None:
        interfaces: dict[str, str] = {}
        if self._needs_interfaces and self._endpoints is not None:
            interfaces = {f"{ip}/{128 if ':' in ip else 32}": ep.iface for ep in self._endpoints() for ip in ep.ips}
        routes = [LocalRoute(prefix, interfaces.get(prefix)) for prefix in sorted(self._own)]
        routes += [LocalRoute(prefix) for prefix in sorted(self._service_routes.announce - self._own)]
        self._desired = exports(routes, self._community_rules, self._peer_exports)

    def _read_config(self) -> str | None:
        if self._config_text is not None:
            return self._config_text
        try:
            with open(self.paths.config) as f:
                return f.read()
        except OSError:
            return None

    def _write_config(self, text: str) -> None:
        os.makedirs(os.path.dirname(self.paths.config), exist_ok=True)
        tmp = f"{self.paths.config}.tmp"
        # 0600: the configuration carries the BGP MD5 passwords.
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(text)
        os.replace(tmp, self.paths.config)
        self._config_text = text

    def _announce(self) -> None:
        refresh: set[str] = set()
        hops = (self._node_ip, self._node_ip6)
        if self._full_announce_needed or self._next_hop_announced != hops:
            self._full_announce_needed = False
            refresh = set(self._peers)
            self._next_hop_announced = hops
        eor = self._eor_pending & set(self._peers)
        self._eor_pending = set()
        next_hops = {v: ip for v, ip in ((4, self._node_ip), (6, self._node_ip6)) if ip}
        commands = self._announcer.commands(self._desired, next_hops, refresh=refresh, eor=eor)
        if commands:
            log.debug("bgp commands count=%d", len(commands))
        self._submit(commands)
        if self._read_back:
            # First announce on this connection: read ExaBGP's adj-RIB-out back, so that routes
            # announced by a previous agent and no longer wanted get withdrawn.
            self._read_back = False
            self._submit_show_adj_rib_out()

    def _submit(self, commands: list[str]) -> None:
        generation = self._generation
        for command in commands:
            try:
                future = self._link.submit(command)
            except SidecarUnavailable as err:
                # The link thread reports the loss; the replay after reconnecting re-announces.
                log.info("bgp sidecar unavailable while sending commands: %s", err)
                return
            future.add_done_callback(functools.partial(self._check_result, command=command,
                                                       generation=generation))

    def _check_result(self, future: "Future[CommandResult]", command: str, generation: int) -> None:
        # Runs on the client's reader thread: only post.
        try:
            result = future.result()
        except Exception as err:  # SidecarUnavailable: the link thread posts SidecarLost
            log.debug("bgp command lost command=%r error=%s", command[:120], err)
            return
        if result.ok or self._post is None:
            return
        if command.startswith("neighbor ") and "announce eor" in command:
            # ExaBGP refuses EoR for a session that just went down again; its next "up" retries.
            log.info("End-of-RIB not sent command=%r", command)
            return
        if not self._peers:
            return  # nothing to announce to: ExaBGP rejects announces without neighbours
        head = re.split(r" (?:announce|withdraw) ", command, maxsplit=1)[0]
        peers = tuple(_SELECTED_RE.findall(head)) if command.startswith("neighbor ") else ()
        self._post(CommandsFailed(generation, command, "ExaBGP answered error", peers))

    def _submit_show_adj_rib_out(self) -> None:
        generation = self._generation
        try:
            future = self._link.submit("show adj-rib out")
        except SidecarUnavailable:
            return

        def done(f: "Future[CommandResult]") -> None:
            try:
                result = f.result()
            except Exception:
                return
            if result.ok and self._post is not None:
                self._post(AdjRibOut(generation, parse_adj_rib_out(result.output)))

        future.add_done_callback(done)

    # -- status -----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        received: dict[str, int] = {}
        for address in self._sessions:
            received[address] = len(self.rib.adj_rib_in(address))
        rows = []
        for address in sorted(self._peers, key=address_key):
            peer = self._peers[address]
            session = self._sessions.get(address) or _Session(address)
            rows.append({
                "peer": address, "type": peer.type.value, "asNumber": peer.as_number,
                "state": session.state, "since": session.since, "info": session.info,
                "routesReceived": received.get(address, 0),
                "node": peer.node,
            })
        data: dict[str, Any] = {
            "node": self.node_name, "pid": os.getpid(), "updated": self._wall(),
            "sidecar": "connected" if self._connected else "disconnected",
            "configError": self._config_error, "announced": sorted(self._announcer.announced()),
            "learned": len(self.rib.best_routes()), "peers": rows,
        }
        if self.reflector_mode and self._reflector is not None:
            # The node's sessions are BIRD's; ExaBGP's sessions to BIRD are `agentSessions` (one per
            # family; `agentSession` is the first, IPv4 when the node has it).
            data.update({"routeReflector": True, "speaker": "bird", "clusterID": self._reflector.cluster_id,
                         "peers": self._reflector.peer_rows(), "agentSession": rows[0] if rows else None,
                         "agentSessions": rows,
                         "bird": "running" if self._reflector.bird_up else "not answering",
                         "configError": self._config_error or self._reflector.config_error})
        return data

    def write_status(self) -> None:
        self._status_file.write(self.status())


class StatusFile:
    """The BGP status JSON felixctl node status and the lab read: written atomically, and only
    when something other than its timestamp changed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._last = ""

    def write(self, data: dict[str, Any]) -> None:
        comparable = json.dumps({k: v for k, v in data.items() if k != "updated"}, sort_keys=True)
        if comparable == self._last:
            return
        self._last = comparable
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
            os.replace(tmp, self.path)
        except OSError as err:
            log.warning("cannot write BGP status path=%s error=%s", self.path, err)


def read_status(path: str) -> dict[str, Any] | None:
    """The status file the controller writes, or None when there is none (felixctl, the lab)."""
    try:
        with open(path) as f:
            data: dict[str, Any] = json.load(f)
        return data
    except (OSError, ValueError):
        return None


BGP_READY_GRACE = 30.0  # calico-node's --threshold-time: all peers must be up this soon after start


def bgp_readiness(status: dict[str, Any] | None, *, uptime: float,
                  grace: float = BGP_READY_GRACE) -> tuple[bool, str]:
    """Calico's BIRD readiness, for the agent's BGP: no peers → ready; within `grace` seconds of
    start-up every peer must be Established; afterwards one Established peer suffices."""
    if status is None:
        return False, "no BGP status yet"
    if status.get("sidecar") != "connected":
        return False, "BGP sidecar not connected"
    peers = status.get("peers") or []
    if not peers:
        return True, "no BGP peers"
    down = [p["peer"] for p in peers if p.get("state") != "Established"]
    if uptime < grace:
        return (not down, f"BGP not established with {', '.join(down)}" if down else "all BGP peers up")
    if len(down) < len(peers):
        return True, f"{len(peers) - len(down)}/{len(peers)} BGP peers up"
    return False, f"BGP not established with {', '.join(down)}"
