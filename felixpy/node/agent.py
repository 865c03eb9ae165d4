"""The agent: syncer → dispatcher → calc graph → dataplane managers → drivers, on one loop, plus the CNI server.

Thread ownership: the main loop (`Agent.run`) is the only thread that touches the dispatcher, the
calc graph, the managers and the drivers. The syncer thread, the CNI server threads and the clock
only put events on the queue or read the small thread-safe snapshots the loop publishes
(`node_labels`, the endpoint waiter).

Input: every datastore update goes through one Dispatcher (calc/dispatcher.py draws who gets
what): it is decoded once, an invalid value becomes a deletion there, and the typed update is
handed to the handlers registered for its kind — the CalcGraph (routes, NAT, encapsulation, BGP
announcements), the PolicyCalc (endpoints, policies, profiles), the BGP controller's resources,
the IPAM usage metrics, and the loop itself (WorkloadEndpoint revisions for the CNI waiter).

Output: each apply sends the outputs of the calcs that changed (felixpy/messages.py: CalcRoutes,
EncapState, LearnedRoutes, NatState, FilterState) to every dataplane manager (`on_update`), then
runs the steps of APPLY_ORDER: managers turn their desired state into driver calls
(`complete_deferred_work`), drivers reconcile the kernel (`apply`). Dependencies first, deletions
last: a tunnel device must exist before a route goes through it, so the links step comes first
and tells the route manager which tunnel devices are usable (TunnelDevices); a set must exist
before a rule references it, and can only be destroyed once no rule does.

Encapsulation: the calc graph's EncapState (pools' ipipMode / vxlanMode, this node's tunnel
addresses and VTEP MAC, the other nodes' VTEPs) feeds the TunnelManager, which drives the links
driver (vxlan.calico, tunl0, FDB and neighbour entries). The periodic route resync also re-reads
the tunnel devices, so a device, FDB or neighbour entry deleted by hand is repaired.

Policy: the loop applies as soon as its queue is drained, so a policy change reaches the kernel
within one apply of the datastore write.

Failure: nothing is written to the kernel before the first IN_SYNC, so a restarted agent first
learns the whole desired state and then reconciles; routes and rules that are still right are
never touched. A failed apply (a driver raised, or individual routes or tunnel devices failed) is
retried with backoff through one path; a datastore outage leaves the dataplane as it is (the
syncer just stops delivering updates until it has relisted). A pod's WorkloadEndpoint counts as
programmed (the CNI waiter) once the route driver holds each of its routes, compared by value; the
CNI path writes a new pod's route itself and hands it over first (adopt_routes), so that apply
usually writes no route at all.

BGP (backend "bird"): one BGPController (node/bgp.py) registered with the dispatcher for its
peering resources; the loop feeds it the calc graph's announcements and the sidecar messages
its link thread queues, and asks it for learned routes, which the route manager merges with the
calc graph's. The first apply also waits until the controller has the sidecar's replay (or gave
up waiting), so a restarted agent never deletes a BGP route it simply has not heard about yet.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher, Registrant
from felixpy.calc.graph import CalcGraph
from felixpy.calc.policy import PolicyCalc
from felixpy.calc.updates import Kind, Update, WorkloadEndpoint
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.iptables import Backend, InsertMode, Table
from felixpy.dataplane.drivers.links import TunnelLinks
from felixpy.dataplane.drivers.routes import RouteTable
from felixpy.dataplane.managers import Manager
from felixpy.dataplane.managers.masq import MasqManager, NatSettings
from felixpy.dataplane.managers.policy import PolicyManager
from felixpy.dataplane.managers.routes import RouteManager
from felixpy.dataplane.managers.tunnels import TunnelManager
from felixpy.datastore.api import Datastore
from felixpy.datastore.syncer import Syncer, SyncStatus
from felixpy.kernel.netlink import KernelRoute
from felixpy.messages import CalcRoutes, LearnedRoutes, Message, Route, TunnelDevices
from felixpy.node.bgp import BGPController, SidecarMessage
from felixpy.node.metrics import DatastoreStats, Metrics, update_kind
from policy.render import RenderConfig

log = logging.getLogger(__name__)

RETRY_MIN = 0.2
RETRY_MAX = 10.0
PENDING_RETRY = 0.5  # routes waiting for an interface are retried this often

# The steps of one apply, in order (see the module docstring for why this order).
APPLY_ORDER: tuple[str, ...] = (
    "links",            # TunnelManager → tunnel devices; then which of them routes may use
    "deferred-work",    # every manager hands its desired state to its drivers (no I/O)
    "ipsets",           # creations and member changes, before the rules that reference them
    "routes",
    "filter",
    "mangle",           # host endpoints' preDNAT policy and DNAT'd host output
    "raw",              # host endpoints' doNotTrack policy
    "nat",
    "ipset-deletions",  # once no rule references them
)


class EndpointWaiter:
    """Lets a CNI request wait until the dataplane has programmed its WorkloadEndpoint."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._programmed: dict[str, int] = {}  # WEP key -> datastore revision programmed

    def mark_programmed(self, programmed: dict[str, int]) -> None:
        with self._cond:
            self._programmed = programmed
            self._cond.notify_all()

    def wait(self, key: str, revision: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._programmed.get(key, -1) < revision:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


@dataclass(frozen=True)
class _AdoptRoutes:
    """Routes the CNI path has written for a new pod (see RouteTable.adopt), for the loop."""

    routes: tuple[KernelRoute, ...]
    hold: float
    iface: str | None = None


@dataclass
class AgentStatus:
    """What the loop publishes for health checks and the CNI server (read-only elsewhere)."""

    in_sync: bool = False
    ever_in_sync: bool = False
    last_apply_ok: bool = False
    last_apply_error: str = ""
    applies: int = 0
    resyncs: int = 0
    node_labels: dict[str, str] = field(default_factory=dict)
    last_tick: float = field(default_factory=time.monotonic)  # liveness heartbeat (health.py)


@dataclass
class _ApplyOutcome:
    """What the steps of one apply report, beyond exceptions."""

    failed: dict[str, str] = field(default_factory=dict)  # route dst or tunnel device -> error
    failed_steps: list[str] = field(default_factory=list)
    pending: set[str] = field(default_factory=set)  # route dsts waiting for their interface
    step_seconds: list[tuple[str, float]] = field(default_factory=list)  # for the debug log

    def report(self, step: str, failed: dict[str, str]) -> None:
        if failed:
            self.failed.update(failed)
            self.failed_steps.append(step)


@dataclass
class _Timer:
    interval: float  # 0 disables
    due: float = 0.0

    def schedule(self, now: float) -> None:
        self.due = now + self.interval if self.interval > 0 else float("inf")


class Agent:
    def __init__(
        self,
        *,
        store: Datastore,
        node_name: str,
        networking_backend: str,
        route_refresh_interval: float,
        iptables_refresh_interval: float,
        ipsets_refresh_interval: float | None = None,
        iptables_backend: Backend | None = None,
        chain_insert_mode: InsertMode = "insert",
        nat_settings: NatSettings = NatSettings(),
        route_table: RouteTable | None = None,
        nat_table: Table | None = None,
        filter_table: Table | None = None,
        mangle_table: Table | None = None,
        raw_table: Table | None = None,
        ipsets: IPSets | None = None,
        render_config: RenderConfig | None = None,
        on_first_apply: Callable[[], None] | None = None,
        metrics: Metrics | None = None,
        bgp: BGPController | None = None,
        links: TunnelLinks | None = None,
        vxlan_mtu: int = 0,
        ipip_mtu: int = 0,
        vxlan_vni: int = names.VXLAN_VNI,
        vxlan_port: int = names.VXLAN_PORT,
        config_watch: Registrant | None = None,
        ipv6: bool = True,
        vxlan_mtu_v6: int = 0,
        nat6_table: Table | None = None,
        ipsets6: IPSets | None = None,
        filter6_table: Table | None = None,
        mangle6_table: Table | None = None,
        raw6_table: Table | None = None,
    ) -> None:
        self.metrics = metrics
        self.store = store
        self.node_name = node_name
        self.status = AgentStatus()
        self.waiter = EndpointWaiter()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._syncer = Syncer(store, self._queue.put)
        # Without BGP ("vxlan" backend) the agent itself routes to other nodes' blocks from the
        # datastore; with BGP ("bird") those routes come from the BGP speaker instead, and with
        # "none" (policy-only) nobody routes them.
        # ipv6: Felix's Ipv6Support; off, nothing IPv6 is computed, read back or programmed.
        self.calc = CalcGraph(node_name, remote_routes_from_datastore=networking_backend == "vxlan", ipv6=ipv6)
        # Policy is rendered for ip6tables too whenever there are IPv6 tables to write it to:
        # the real ones, or a test's own.
        policy6 = ipv6 and (nat_table is None or filter6_table is not None)
        self.policy_calc = PolicyCalc(node_name, render_config, ipv6=policy6)
        self._stats = DatastoreStats(node_name, metrics) if metrics is not None else None
        self._bgp = bgp
        self._wep_revisions: dict[str, int] = {}
        # (key, routes) of the local endpoints, kept between applies until the calc changes.
        self._endpoint_routes: list[tuple[str, tuple[Route, ...]]] | None = None
        self.dispatcher = Dispatcher(self.calc, self.policy_calc)
        self.dispatcher.register(Kind.WORKLOAD_ENDPOINT, self._on_endpoint)
        if bgp is not None:
            bgp.register_with(self.dispatcher)
        if self._stats is not None:
            self._stats.register_with(self.dispatcher)
        if config_watch is not None:
            # FelixConfiguration and ClusterInformation (node/config_watch.py).
            config_watch.register_with(self.dispatcher)

        self._routes = route_table or RouteTable(
            observe_read_back=metrics.observe_route_resync if metrics is not None else None, ipv6=ipv6)
        self._nat = nat_table or Table("nat", backend=iptables_backend, insert_mode=chain_insert_mode)
        # The filter table is real whenever the nat table is: a caller that injects its own
        # drivers (tests with fakes) and no filter table runs without policy rather than
        # writing to the host's real filter table behind its back.
        if filter_table is None and nat_table is None:
            filter_table = Table("filter", backend=iptables_backend, insert_mode=chain_insert_mode)
            mangle_table = mangle_table or Table("mangle", backend=iptables_backend, insert_mode=chain_insert_mode)
            raw_table = raw_table or Table("raw", backend=iptables_backend, insert_mode=chain_insert_mode)
        self._filter = filter_table
        self._policy_tables = tuple(t for t in (mangle_table, raw_table) if t is not None)
        self._ipsets = ipsets or IPSets()
        # IPv6: ip6tables' nat (natOutgoing), filter, mangle and raw tables (policy) and the
        # cali60 sets, real whenever the IPv4 nat table is (a test injecting fakes passes its own
        # or runs without).
        if ipv6 and nat_table is None:
            nat6_table = nat6_table or Table("nat", backend=iptables_backend, insert_mode=chain_insert_mode,
                                             ip_version=6)
            ipsets6 = ipsets6 or IPSets(ip_version=6)
            filter6_table = filter6_table or Table("filter", backend=iptables_backend,
                                                   insert_mode=chain_insert_mode, ip_version=6)
            mangle6_table = mangle6_table or Table("mangle", backend=iptables_backend,
                                                   insert_mode=chain_insert_mode, ip_version=6)
            raw6_table = raw6_table or Table("raw", backend=iptables_backend, insert_mode=chain_insert_mode,
                                             ip_version=6)
        self._nat6 = nat6_table if ipv6 else None
        self._filter6 = filter6_table if policy6 else None
        self._ipsets6 = ipsets6 if ipv6 and (nat6_table is not None or filter6_table is not None) else None
        self._policy_tables6 = tuple(t for t in (mangle6_table, raw6_table) if t is not None and policy6)
        # Like the filter table: real tunnel devices whenever the route driver is real, none
        # when a caller (a test) injects its own route driver but no links driver.
        if links is None and route_table is None:
            links = TunnelLinks()
        self._links = links
        self._tunnel_mgr = (TunnelManager(links, vxlan_mtu=vxlan_mtu, ipip_mtu=ipip_mtu,
                                          vxlan_vni=vxlan_vni, vxlan_port=vxlan_port, vxlan_mtu_v6=vxlan_mtu_v6)
                            if links is not None else None)
        self._route_mgr = RouteManager(self._routes)
        self._policy_mgr = (PolicyManager(self._filter, self._ipsets, mangle_table=mangle_table, raw_table=raw_table)
                            if self._filter is not None else None)
        # The same policy for ip6tables (Felix renders every policy once per IP version).
        self._policy6_mgr = (PolicyManager(self._filter6, self._ipsets6, mangle_table=mangle6_table if policy6 else None,
                                           raw_table=raw6_table if policy6 else None, ip_version=6)
                             if self._filter6 is not None and self._ipsets6 is not None else None)
        self._managers: tuple[Manager, ...] = tuple(
            m for m in (self._tunnel_mgr, self._route_mgr, MasqManager(self._nat, self._ipsets, nat_settings),
                        MasqManager(self._nat6, self._ipsets6, nat_settings, ip_version=6)
                        if self._nat6 is not None and self._ipsets6 is not None else None,
                        self._policy_mgr, self._policy6_mgr) if m is not None)
        nat6, ipsets6_ = self._nat6, self._ipsets6
        filter_apply = self._filter.apply if self._filter is not None else None
        mangle6 = mangle6_table if self._policy6_mgr is not None else None
        raw6 = raw6_table if self._policy6_mgr is not None else None
        steps: dict[str, Callable[[_ApplyOutcome], object] | None] = {
            "links": self._apply_links if self._tunnel_mgr is not None else None,
            "deferred-work": self._complete_deferred_work,
            "ipsets": lambda _: (self._ipsets.apply(), ipsets6_.apply() if ipsets6_ is not None else None),
            "routes": self._apply_routes,
            "filter": self._apply_filters if filter_apply is not None else None,
            "mangle": (lambda _: (mangle_table.apply(), mangle6.apply() if mangle6 is not None else None))
            if mangle_table is not None else None,
            "raw": (lambda _: (raw_table.apply(), raw6.apply() if raw6 is not None else None))
            if raw_table is not None else None,
            "nat": lambda _: (self._nat.apply(), nat6.apply() if nat6 is not None else None),
            "ipset-deletions": lambda _: (self._ipsets.apply_deletions(),
                                          ipsets6_.apply_deletions() if ipsets6_ is not None else None),
        }
        self._steps = tuple((name, step) for name in APPLY_ORDER if (step := steps[name]) is not None)

        self._route_timer = _Timer(route_refresh_interval)
        self._iptables_timer = _Timer(iptables_refresh_interval)
        # Felix's IpsetsRefreshInterval; None: resync the ipsets with the iptables tables.
        self._ipsets_timer = _Timer(iptables_refresh_interval if ipsets_refresh_interval is None
                                    else ipsets_refresh_interval)
        self._retry_at = float("inf")
        self._retry_delay = RETRY_MIN
        self.on_first_apply = on_first_apply

    # -- lifecycle -------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)

    def adopt_routes(self, routes: tuple[KernelRoute, ...], hold: float, iface: str | None = None) -> None:
        """Thread-safe: hand routes the CNI path wrote to the route driver (RouteTable.adopt).

        Queued, so the loop sees them before any later event, such as the WorkloadEndpoint the
        CNI path writes next."""
        self._queue.put(_AdoptRoutes(routes, hold, iface))

    def run(self) -> None:
        log.info("agent starting node=%s", self.node_name)
        self._syncer.start()
        if self._bgp is not None:
            self._bgp.start(self._queue.put)
        now = time.monotonic()
        self._route_timer.schedule(now)
        self._iptables_timer.schedule(now)
        self._ipsets_timer.schedule(now)
        try:
            while not self._stop.is_set():
                self.status.last_tick = time.monotonic()
                self._process(self._next_batch())
                if self.status.ever_in_sync and self._dataplane_ready() and self._apply_due():
                    self._apply()
        finally:
            self._syncer.stop()
            if self._bgp is not None:
                self._bgp.stop()
            log.info("agent stopped node=%s (dataplane left as it is)", self.node_name)

    # -- event handling --------------------------------------------------------------------
    def _next_batch(self) -> list[Any]:
        due = min(self._route_timer.due, self._iptables_timer.due, self._ipsets_timer.due, self._retry_at)
        if self._bgp is not None:
            due = min(due, self._bgp.next_deadline() or due)
        timeout = max(0.0, due - time.monotonic())
        try:
            batch = [self._queue.get(timeout=min(timeout, 1.0))]
        except queue.Empty:
            return []
        # Coalesce whatever else is already queued into the same apply.
        while len(batch) < 10000:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _process(self, batch: list[Any]) -> None:
        for event in batch:
            if event is None:
                continue
            if isinstance(event, _AdoptRoutes):
                self._routes.adopt(event.routes, event.hold, event.iface)
                continue
            if isinstance(event, SidecarMessage):
                if self._bgp is not None:
                    self._bgp.on_message(event)
                continue
            if isinstance(event, SyncStatus):
                self.status.in_sync = event == SyncStatus.IN_SYNC
                if self.metrics is not None:
                    self.metrics.sync_status(event.name)
                if self.status.in_sync and not self.status.ever_in_sync:
                    log.info("datastore in sync; first apply of the dataplane")
                    self.status.ever_in_sync = True
                    if self._bgp is not None:
                        self._bgp.datastore_in_sync()
                continue
            for update in event:
                started = time.perf_counter()
                self.dispatcher.on_update(update)
                if self.metrics is not None:
                    self.metrics.observe_calc_update(update_kind(update.key), time.perf_counter() - started)
        self.status.node_labels = self.calc.node_labels()
        if self._bgp is not None and self.status.ever_in_sync:
            # IPv6 prefixes go out on the IPv6 sessions only (bgp.advertise.exports).
            self._bgp.set_announcements(self.calc.bgp_announcements(), self.calc.local_endpoints)
            self._bgp.sync()

    def _on_endpoint(self, update: Update[WorkloadEndpoint]) -> None:
        if update.value is None:
            self._wep_revisions.pop(update.key, None)
        else:
            self._wep_revisions[update.key] = update.revision

    def _dataplane_ready(self) -> bool:
        return self._bgp is None or self._bgp.ready_for_dataplane()

    def _apply_due(self) -> bool:
        now = time.monotonic()
        if self._bgp is not None:
            deadline = self._bgp.next_deadline()
            if deadline is not None and now >= deadline:
                self._bgp.expire()
            if self._bgp.routes_dirty:
                self.calc.dirty = True
        if now >= self._route_timer.due:
            self._routes.queue_resync()
            if self._links is not None:
                self._links.queue_resync()
            self._route_timer.schedule(now)
            self.status.resyncs += 1
            if self.metrics is not None:
                self.metrics.resync()
            self.calc.dirty = True
        if now >= self._iptables_timer.due:
            self._nat.queue_resync()
            if self._nat6 is not None:
                self._nat6.queue_resync()
            if self._filter is not None:
                self._filter.queue_resync()
            if self._filter6 is not None:
                self._filter6.queue_resync()
            for table in (*self._policy_tables, *self._policy_tables6):
                table.queue_resync()
            self._iptables_timer.schedule(now)
            self.calc.dirty = True
        if now >= self._ipsets_timer.due:
            self._ipsets.queue_resync()
            if self._ipsets6 is not None:
                self._ipsets6.queue_resync()
            self._ipsets_timer.schedule(now)
            self.calc.dirty = True
        return self.calc.dirty or self.policy_calc.dirty or now >= self._retry_at

    # -- the dataplane ---------------------------------------------------------------------
    def _apply(self) -> None:
        started = time.monotonic()
        outcome = _ApplyOutcome()
        step = "messages"
        try:
            for message in self._desired_state():
                self._send(message)
            for step, run in self._steps:
                step_started = time.monotonic()
                run(outcome)
                outcome.step_seconds.append((step, time.monotonic() - step_started))
        except Exception as err:  # every driver error: keep running, retry with backoff
            self._back_off(str(err), step)
            self.calc.dirty = True
            self.policy_calc.dirty = True  # memoised: recomputing on retry is cheap
            return
        if outcome.failed:
            # Individual routes or tunnel devices failed (or the read-back did).
            self._back_off("; ".join(f"{what}: {e}" for what, e in sorted(outcome.failed.items())),
                           ",".join(outcome.failed_steps))
        else:
            waiting = outcome.pending or (self._links is not None and self._links.dirty)
            self._retry_at = time.monotonic() + PENDING_RETRY if waiting else float("inf")
            self._retry_delay = RETRY_MIN
            self.status.last_apply_ok = True
            self.status.last_apply_error = ""
        self.status.applies += 1
        if self.metrics is not None:
            self.metrics.observe_apply(time.monotonic() - started)
            self.metrics.routes_programmed(len(self._routes.programmed))
            self.metrics.dataplane_counts(
                tables=[t for t in (self._filter, self._nat, *self._policy_tables,
                                    self._filter6, self._nat6, *self._policy_tables6) if t is not None],
                ipsets=self._ipsets, ipsets6=self._ipsets6,
                local_endpoints=len(self.calc.local_endpoints()),
                active_policies=len(self.policy_calc.active_policies()),
                active_selectors=len(self.policy_calc.ipsets()))
        self._publish_programmed()
        if log.isEnabledFor(logging.DEBUG):  # where an apply's time went, step by step
            log.debug("dataplane apply ok seconds=%.4f pending=%d steps=%s", time.monotonic() - started,
                      len(outcome.pending), ",".join(f"{name}:{secs:.4f}" for name, secs in outcome.step_seconds))
        if self.status.applies == 1 and self.on_first_apply is not None:
            self.on_first_apply()

    def _desired_state(self) -> Iterator[Message]:
        """The calc's outputs for the managers, each only when its calc changed (the managers keep
        the last state: a policy change at 1,000 pods does not recompute 1,000 routes)."""
        if self.calc.dirty:  # also set by the resync timers, learned-route changes and failures
            self.calc.dirty = False
            self._endpoint_routes = None
            yield CalcRoutes(frozenset(self.calc.routes()))
            if self._tunnel_mgr is not None:
                yield self.calc.encap()
            if self._bgp is not None:
                yield LearnedRoutes(self._bgp.learned_routes(), frozenset(self._bgp.local_addresses()))
            yield self.calc.nat()
        if self._policy_mgr is not None and self.policy_calc.dirty:
            self.policy_calc.dirty = False
            yield self.policy_calc.filter_state()
            if self._policy6_mgr is not None:
                yield self.policy_calc.filter_state(6)

    def _send(self, message: Message) -> None:
        for manager in self._managers:
            manager.on_update(message)

    def _apply_links(self, outcome: _ApplyOutcome) -> None:
        assert self._tunnel_mgr is not None and self._links is not None
        self._tunnel_mgr.complete_deferred_work()
        result = self._links.apply()
        outcome.report("links", result.failed)
        if result.devices_changed:
            self._routes.queue_resync()  # the kernel took the routes through a deleted device along
        self._send(TunnelDevices(self._tunnel_mgr.blocked_devices()))

    def _apply_filters(self, outcome: _ApplyOutcome) -> None:
        assert self._filter is not None
        self._filter.apply()
        if self._filter6 is not None:
            self._filter6.apply()

    def _complete_deferred_work(self, outcome: _ApplyOutcome) -> None:
        for manager in self._managers:
            manager.complete_deferred_work()

    def _apply_routes(self, outcome: _ApplyOutcome) -> None:
        result = self._routes.apply()
        outcome.pending.update(result.pending)
        outcome.report("routes", result.failed)

    def _back_off(self, error: str, step: str) -> None:
        """The one retry path of a failed apply, whether a step raised or reported failures."""
        self.status.last_apply_ok = False
        self.status.last_apply_error = error
        log.error("dataplane apply failed step=%s, retry in %.1fs: %s", step, self._retry_delay, error)
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        if self.metrics is not None:
            self.metrics.apply_failed()

    def _publish_programmed(self) -> None:
        """WorkloadEndpoints whose routes the route driver holds, exactly as desired."""
        if self._endpoint_routes is None:
            # Rebuilt only after a calc change: at 5,000 local endpoints building them on every
            # apply took about half of a policy-only change (benchmarks/bench_policy.py).
            self._endpoint_routes = [(ep.key, ep.routes) for ep in self.calc.local_endpoints()]
        programmed = self._routes.programmed
        self.waiter.mark_programmed({
            key: self._wep_revisions.get(key, 0)
            for key, routes in self._endpoint_routes
            if all(programmed.get(route.dst) == route for route in routes)
        })
