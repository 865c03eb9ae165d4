"""The agent's Prometheus metrics, served as text exposition format 0.0.4 on /metrics.

Served on FELIX_PROMETHEUSMETRICSHOST:FELIX_PROMETHEUSMETRICSPORT (all interfaces, 9091) when
FELIX_PROMETHEUSMETRICSENABLED=true. Two families of names, both documented in docs/operations.md:

* Felix's own names, types and labels (`felix_*`, `process_*`) for everything felixpy has a real
  equivalent of, so an operator's Calico dashboards and alerts keep working. Felix's counters
  carry no `_total` suffix and its timings are summaries with the 0.5/0.9/0.99 quantiles over a
  10-minute window (libcalico-go's DefObjectives): both are copied as they are.
* felixpy's own `felixpy_*` metrics, kept beside them (histograms, BGP sessions per peer).

The exposition is our own (counters, gauges, histograms and summaries, with labels) rather than
prometheus-client: that package is not a dependency, and the agent renders a few dozen series.
Every metric is thread-safe: the agent loop, the CNI server threads, the datastore probe and the
HTTP thread touch them concurrently. Values that are cheapest to read when asked (the process's
own counters, the BGP sessions in the status file the BGP controller writes) are collected at
scrape time by `Collector`s; everything else is pushed by the loop:

    metrics = Metrics(host="node-1", bgp_status="/var/lib/calico/bgp-status.json")
    stats = DatastoreStats("node-1", metrics)   # registered with the agent's dispatcher
    metrics.sync_status("IN_SYNC")              # every SyncStatus
    metrics.observe_calc_update("workloadendpoints", seconds)
    metrics.observe_apply(seconds) / metrics.apply_failed()
    metrics.dataplane_counts(tables=[filter, nat], ipsets=ipsets, local_endpoints=3, ...)
    metrics.observe_command(argv, input, seconds, ok)   # felixpy.kernel.commands observer
    metrics.observe_cni("ADD", seconds)         # the CNI server, per request
    metrics.start_http(9091)
"""

from __future__ import annotations

import abc
import collections
import math
import os
import resource
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Protocol, Sequence

from felixpy.calc.updates import Kind, Update
from felixpy.datastore import keys
from felixpy.ipam.block import Block, host_affinity
from felixpy.node.health import Response, TextServer

if TYPE_CHECKING:
    from felixpy.calc.dispatcher import Dispatcher

DEFAULT_METRICS_PORT = 9091
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

APPLY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CNI_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BGP_STATES = ("Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established")
CNI_COMMANDS = ("ADD", "DEL", "CHECK")
# libcalico-go's DefObjectives (quantile -> allowed error); we compute exact quantiles.
SUMMARY_QUANTILES = (0.5, 0.9, 0.99)
SUMMARY_MAX_AGE = 600.0  # client_golang's default MaxAge
SUMMARY_WINDOW = 2048  # observations kept per series for the quantiles
# Felix's felix_resync_state values (api.SyncStatus).
RESYNC_STATE = {"WAIT_FOR_DATASTORE": 1, "RESYNC": 2, "IN_SYNC": 3}
MAIN_ROUTE_TABLE = "IPv4:254"  # Felix's `table` label of the main IPv4 routing table
IP_VERSION = "4"  # the family whose series exist from the start (IPv6 ones appear once programmed)
IPSET_FAMILY = "inet"
IPSET_FAMILIES = {4: "inet", 6: "inet6"}  # the label of felix_ipsets_calico per IP version

LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Metric(abc.ABC):
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 const_labels: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        # Constant labels (client_golang's ConstLabels) go first on every sample.
        self._const_names = tuple((const_labels or {}).keys())
        self._const_values = tuple((const_labels or {}).values())
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _label_text(self, key: LabelValues, extra: str = "") -> str:
        return _labels(self._const_names + self.labelnames, self._const_values + key, extra)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    @abc.abstractmethod
    def samples(self) -> list[str]:
        """The metric's sample lines."""

    def render(self) -> list[str]:
        return self.header() + self.samples()


class _Scalar(Metric):
    """One float per label set: what counters and gauges share."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (),
                 const_labels: Mapping[str, str] | None = None) -> None:
        super().__init__(name, help_text, labelnames, const_labels)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{self._label_text(k)} {format_value(v)}" for k, v in items]


class Counter(_Scalar):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), *,
                 calico_name: bool = False, const_labels: Mapping[str, str] | None = None) -> None:
        # Our own counters follow the Prometheus convention; Calico's keep their names as
        # Calico exports them (felix_ipset_calls, ipam_allocations_gc_reclamations, ...).
        if not calico_name and not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, help_text, labelnames, const_labels)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def touch(self, **labels: str) -> None:
        """Create the series at 0, so rate() has a starting point before the first event."""
        key = self._key(labels)
        with self._lock:
            self._values.setdefault(key, 0.0)


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def replace(self, values: Mapping[Any, float]) -> None:
        """Set every series at once; series not given disappear (a peer that went away)."""
        for key in values:
            if len(key) != len(self.labelnames):
                raise ValueError(f"{self.name}: label values {key} do not match {self.labelnames}")
        with self._lock:
            self._values = {tuple(k): float(v) for k, v in values.items()}


class Histogram(Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Sequence[float], labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        if list(buckets) != sorted(set(buckets)) or not buckets:
            raise ValueError(f"{name}: buckets must be increasing")
        self.buckets = tuple(float(b) for b in buckets)
        # label values -> (per-bucket counts, non-cumulative, last = +Inf; sum; count)
        self._data: dict[LabelValues, tuple[list[int], float, int]] = {}
        if not labelnames:
            self._data[()] = ([0] * (len(self.buckets) + 1), 0.0, 0)

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        index = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        with self._lock:
            counts, total, n = self._data.get(key) or ([0] * (len(self.buckets) + 1), 0.0, 0)
            counts[index] += 1
            self._data[key] = (counts, total + value, n + 1)

    def touch(self, **labels: str) -> None:
        """Create the series with zero observations, so it is exported before its first one."""
        key = self._key(labels)
        with self._lock:
            self._data.setdefault(key, ([0] * (len(self.buckets) + 1), 0.0, 0))

    def count(self, **labels: str) -> int:
        with self._lock:
            data = self._data.get(self._key(labels))
        return data[2] if data else 0

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s, n)) for k, (c, s, n) in self._data.items())
        out = []
        for key, (counts, total, n) in items:
            running = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                running += count
                le = 'le="' + format_value(bound) + '"'
                out.append(f"{self.name}_bucket{self._label_text(key, le)} {running}")
            out.append(f"{self.name}_sum{self._label_text(key)} {format_value(total)}")
            out.append(f"{self.name}_count{self._label_text(key)} {n}")
        return out


class _Window:
    """The recent observations of one summary series (time-stamped, bounded)."""

    __slots__ = ("values", "total", "count")

    def __init__(self) -> None:
        self.values: collections.deque[tuple[float, float]] = collections.deque(maxlen=SUMMARY_WINDOW)
        self.total = 0.0
        self.count = 0


class Summary(Metric):
    """client_golang's Summary with libcalico-go's default objectives (Felix's timings).

    Quantiles are exact over the last SUMMARY_WINDOW observations younger than max_age (Go keeps
    a 10-minute window too, estimated with CKMS); with no recent observation a quantile is NaN,
    as in Go. _sum and _count cover the whole life of the process.
    """

    kind = "summary"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = (), *,
                 quantiles: Sequence[float] = SUMMARY_QUANTILES, max_age: float = SUMMARY_MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(name, help_text, labelnames)
        self.quantiles = tuple(quantiles)
        self._max_age = max_age
        self._clock = clock
        self._data: dict[LabelValues, _Window] = {} if labelnames else {(): _Window()}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        now = self._clock()
        with self._lock:
            window = self._data.get(key)
            if window is None:
                window = self._data[key] = _Window()
            window.values.append((now, value))
            window.total += value
            window.count += 1

    def count(self, **labels: str) -> int:
        with self._lock:
            window = self._data.get(self._key(labels))
            return window.count if window else 0

    def samples(self) -> list[str]:
        horizon = self._clock() - self._max_age
        with self._lock:
            items = sorted((k, ([v for t, v in w.values if t >= horizon], w.total, w.count))
                           for k, w in self._data.items())
        out = []
        for key, (recent, total, n) in items:
            recent.sort()
            for q in self.quantiles:
                if recent:
                    value = recent[min(len(recent) - 1, max(0, math.ceil(q * len(recent)) - 1))]
                else:
                    value = math.nan
                quantile = 'quantile="' + format_value(q) + '"'
                out.append(f"{self.name}{self._label_text(key, quantile)} {format_value(value)}")
            out.append(f"{self.name}_sum{self._label_text(key)} {format_value(total)}")
            out.append(f"{self.name}_count{self._label_text(key)} {n}")
        return out


class Collector(Protocol):
    """Produces metrics when /metrics is scraped (values cheapest to read when asked)."""

    def collect(self) -> Iterable[Metric]: ...


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Collector] = []

    def register(self, metric: Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def register_collector(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def render(self) -> str:
        lines: list[str] = []
        seen = set(self._metrics)
        for metric in self._metrics.values():
            lines.extend(metric.render())
        for collector in self._collectors:
            for metric in collector.collect():
                if metric.name in seen:
                    raise ValueError(f"metric {metric.name} collected twice")
                seen.add(metric.name)
                lines.extend(metric.render())
        return "\n".join(lines) + "\n"

    def start_http(self, port: int, host: str = "", *, name: str = "metrics",
                   extra_routes: Mapping[str, Callable[[], Response]] | None = None) -> TextServer:
        """Serve /metrics (and any extra routes); returns the started server (stop() it on exit)."""
        def metrics() -> Response:
            return Response(200, self.render(), CONTENT_TYPE)

        server = TextServer(host, port, {"/metrics": metrics, **(extra_routes or {})}, name=name)
        server.start()
        return server


# -- collectors ---------------------------------------------------------------------------------


class ProcessCollector:
    """client_golang's process collector (`process_*`), read from /proc/self at scrape time."""

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc
        self._ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._page = resource.getpagesize()

    def _stat(self) -> list[str] | None:
        try:
            with open(f"{self._proc}/self/stat") as f:
                text = f.read()
        except OSError:
            return None
        # The command name (field 2) may contain spaces: split after its closing parenthesis.
        return text[text.rindex(")") + 2:].split()

    def _boot_time(self) -> float | None:
        try:
            with open(f"{self._proc}/stat") as f:
                for line in f:
                    if line.startswith("btime "):
                        return float(line.split()[1])
        except OSError:
            pass
        return None

    def collect(self) -> Iterable[Metric]:
        fields = self._stat()
        out: list[Metric] = []
        if fields is not None:
            # Fields counted from 3 (state): utime 14, stime 15, starttime 22, vsize 23, rss 24.
            utime, stime = int(fields[11]), int(fields[12])
            cpu = Counter("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.")
            cpu.inc((utime + stime) / self._ticks)
            out.append(cpu)
            vsize = Gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.")
            vsize.set(int(fields[20]))
            rss = Gauge("process_resident_memory_bytes", "Resident memory size in bytes.")
            rss.set(int(fields[21]) * self._page)
            out += [vsize, rss]
            btime = self._boot_time()
            if btime is not None:
                start = Gauge("process_start_time_seconds",
                              "Start time of the process since unix epoch in seconds.")
                start.set(btime + int(fields[19]) / self._ticks)
                out.append(start)
        try:
            open_fds = len(os.listdir(f"{self._proc}/self/fd"))
        except OSError:
            open_fds = -1
        if open_fds >= 0:
            fds = Gauge("process_open_fds", "Number of open file descriptors.")
            fds.set(open_fds)
            out.append(fds)
        max_fds = Gauge("process_max_fds", "Maximum number of open file descriptors.")
        max_fds.set(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        out.append(max_fds)
        return out


class HealthResults(Protocol):
    def results(self) -> tuple[bool, bool, dict[str, bool]]: ...


class HealthCollector:
    """The health checks as metrics (felixpy's own: Felix has none), so an alert can say which
    agent is not ready and why without probing every node: the same checks /liveness and
    /readiness answer from."""

    def __init__(self, health: HealthResults) -> None:
        self._health = health

    def collect(self) -> Iterable[Metric]:
        live, ready, checks = self._health.results()
        live_gauge = Gauge("felixpy_agent_live", "1 while the agent is live (what /liveness answers).")
        live_gauge.set(int(live))
        ready_gauge = Gauge("felixpy_agent_ready", "1 while the agent is ready (what /readiness answers).")
        ready_gauge.set(int(ready))
        per_check = Gauge("felixpy_agent_readiness_check", "1 while the readiness check passes.", ("check",))
        per_check.replace({(name,): int(ok) for name, ok in checks.items()})
        return [live_gauge, ready_gauge, per_check]


class BGPStatusCollector:
    """BGP sessions per peer, read at scrape time from the status file the BGP controller (or the
    route reflector) writes; the same file `felixctl node status` reads, so the two always agree.

    `felixpy_bgp_sessions{state}` is always exported (0 without BGP); felixpy_bgp_speaker_up only
    with BGP (an alert on it must not fire on a VXLAN-only node); the per-peer series exist while
    the peer is configured.
    """

    def __init__(self, read_status: Callable[[], Mapping[str, Any] | None] | None) -> None:
        self._read = read_status

    def collect(self) -> Iterable[Metric]:
        status = (self._read() if self._read is not None else None) or {}
        peers = [p for p in status.get("peers") or [] if isinstance(p, Mapping)]
        counts: dict[str, int] = {}
        for peer in peers:
            state = str(peer.get("state") or "Idle")
            counts[state] = counts.get(state, 0) + 1
        sessions = Gauge("felixpy_bgp_sessions", "BGP sessions of this node by state.", ("state",))
        for state in (*BGP_STATES, *sorted(set(counts) - set(BGP_STATES))):
            sessions.set(counts.get(state, 0), state=state)
        speakers: list[Metric] = []
        if self._read is not None:
            speaker = Gauge("felixpy_bgp_speaker_up",
                            "1 while the BGP speaker (ExaBGP sidecar, or BIRD on a route reflector) answers.")
            speaker.set(1 if status.get("sidecar") == "connected" else 0)
            speakers.append(speaker)
        labels = ("peer", "type", "peer_node")
        up = Gauge("felixpy_bgp_peer_up", "1 while the BGP session with the peer is Established.", labels)
        routes = Gauge("felixpy_bgp_peer_routes_received", "Routes received from the peer (adj-RIB-in).",
                       labels)
        since = Gauge("felixpy_bgp_peer_state_change_timestamp_seconds",
                      "Unix time of the session's last state change; changes() over it counts flaps.",
                      labels)
        for peer in peers:
            key = {"peer": str(peer.get("peer", "")), "type": str(peer.get("type", "")),
                   "peer_node": str(peer.get("node") or "")}
            up.set(1 if peer.get("state") == "Established" else 0, **key)
            routes.set(float(peer.get("routesReceived") or 0), **key)
            since.set(float(peer.get("since") or 0), **key)
        return [sessions, *speakers, up, routes, since]


# -- the agent's metrics ---------------------------------------------------------------------------


class TableCounts(Protocol):
    """What dataplane_counts reads from an iptables Table driver."""

    name: str
    ip_version: int

    def counts(self) -> tuple[int, int]: ...


class IPSetCounts(Protocol):
    def counts(self) -> tuple[int, int | None]: ...


class Metrics:
    """The agent's metrics and the methods the agent, the CNI server and BGP call."""

    def __init__(self, *, host: str = "", bgp_status: Callable[[], Mapping[str, Any] | None] | None = None,
                 health: HealthResults | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        r = self.registry = Registry()
        # -- felixpy's own
        self.apply_seconds: Histogram = r.register(Histogram(
            "felixpy_dataplane_apply_seconds", "Duration of one dataplane apply (routes, ipsets, iptables).",
            APPLY_BUCKETS))
        self.resyncs: Counter = r.register(Counter(
            "felixpy_resyncs_total", "Forced full resyncs of the dataplane against the kernel."))
        self.routes: Gauge = r.register(Gauge(
            "felixpy_routes_programmed", "Routes the agent owns in the kernel after the last apply."))
        self.rules: Gauge = r.register(Gauge(
            "felixpy_iptables_rules", "iptables rules in the agent's chains after the last apply."))
        self.ipam_blocks: Gauge = r.register(Gauge(
            "felixpy_ipam_blocks", "IPAM blocks affine to this node."))
        self.ipam_in_use: Gauge = r.register(Gauge(
            "felixpy_ipam_ips_in_use", "Addresses allocated to this node (its own blocks and borrowed)."))
        self.ipam_borrowed: Gauge = r.register(Gauge(
            "felixpy_ipam_ips_borrowed", "Addresses allocated to this node from blocks not affine to it."))
        self.cni_seconds: Histogram = r.register(Histogram(
            "felixpy_cni_request_seconds", "Duration of CNI requests served by the agent.", CNI_BUCKETS,
            ("command",)))
        # -- Felix's names (felix/calc, felix/dataplane/linux, felix/iptables, felix/ipsets,
        # felix/routetable, felix/daemon), with Felix's help texts where they describe what we do.
        self.host: Gauge = r.register(Gauge(
            "felix_host", "Configured Felix hostname (as a label), typically used in grouping/aggregating "
            "stats; the value of the gauge is always set to 1.", const_labels={"host": host}))
        self.host.set(1)
        self.resync_state: Gauge = r.register(Gauge(
            "felix_resync_state", "Current datastore state (1 wait for datastore, 2 resyncing, 3 in sync)."))
        self.resyncs_started: Counter = r.register(Counter(
            "felix_resyncs_started", "Number of times the agent started a resync with the datastore.",
            calico_name=True))
        self.calc_updates: Counter = r.register(Counter(
            "felix_calc_graph_updates_processed", "Number of datastore updates processed by the calculation "
            "graph.", ("type",), calico_name=True))
        self.calc_update_time: Summary = r.register(Summary(
            "felix_calc_graph_update_time_seconds",
            "Seconds to update calculation graph for each datastore OnUpdate call.", clock=clock))
        self.active_endpoints: Gauge = r.register(Gauge(
            "felix_active_local_endpoints", "Number of active endpoints on this host."))
        self.active_policies: Gauge = r.register(Gauge(
            "felix_active_local_policies", "Number of active policies on this host."))
        self.active_selectors: Gauge = r.register(Gauge(
            "felix_active_local_selectors", "Number of active selectors on this host."))
        self.cluster_hosts: Gauge = r.register(Gauge(
            "felix_cluster_num_hosts", "Total number of calico hosts in the cluster."))
        self.cluster_weps: Gauge = r.register(Gauge(
            "felix_cluster_num_workload_endpoints", "Total number of workload endpoints cluster-wide."))
        self.cluster_policies: Gauge = r.register(Gauge(
            "felix_cluster_num_policies", "Total number of policies cluster-wide."))
        self.cluster_profiles: Gauge = r.register(Gauge(
            "felix_cluster_num_profiles", "Total number of profiles cluster-wide."))
        self.dataplane_failures: Counter = r.register(Counter(
            "felix_int_dataplane_failures", "Number of times dataplane updates failed and will be retried.",
            calico_name=True))
        self.initial_resync: Gauge = r.register(Gauge(
            "felix_int_dataplane_initial_resync_time_seconds",
            "Time in seconds that it took to do the initial resync with the dataplane and bring the "
            "dataplane into sync for the first time."))
        self.apply_time: Summary = r.register(Summary(
            "felix_int_dataplane_apply_time_seconds",
            "Time in seconds for each incremental update to the dataplane.", clock=clock))
        self.restore_calls: Counter = r.register(Counter(
            "felix_iptables_restore_calls", "Number of iptables-restore calls.", calico_name=True))
        self.restore_errors: Counter = r.register(Counter(
            "felix_iptables_restore_errors", "Number of iptables-restore errors.", calico_name=True))
        self.save_calls: Counter = r.register(Counter(
            "felix_iptables_save_calls", "Number of iptables-save calls.", calico_name=True))
        self.save_errors: Counter = r.register(Counter(
            "felix_iptables_save_errors", "Number of iptables-save errors.", calico_name=True))
        self.iptables_chains: Gauge = r.register(Gauge(
            "felix_iptables_chains", "Number of active iptables chains.", ("ip_version", "table")))
        self.iptables_rule_count: Gauge = r.register(Gauge(
            "felix_iptables_rules", "Number of active iptables rules.", ("ip_version", "table")))
        self.iptables_lines: Counter = r.register(Counter(
            "felix_iptables_lines_executed", "Number of iptables rule updates executed.",
            ("ip_version", "table"), calico_name=True))
        self.ipsets_calico: Gauge = r.register(Gauge(
            "felix_ipsets_calico", "Number of active Calico IP sets.", ("ip_version",)))
        self.ipsets_total: Gauge = r.register(Gauge(
            "felix_ipsets_total", "Total number of active IP sets."))
        self.ipset_calls: Counter = r.register(Counter(
            "felix_ipset_calls", "Number of ipset commands executed.", calico_name=True))
        self.ipset_errors: Counter = r.register(Counter(
            "felix_ipset_errors", "Number of ipset command failures.", calico_name=True))
        self.ipset_lines: Counter = r.register(Counter(
            "felix_ipset_lines_executed", "Number of ipset operations executed.", calico_name=True))
        self.route_resync: Summary = r.register(Summary(
            "felix_route_table_resync_seconds", "Time taken to list all the routes during a resync.",
            clock=clock))
        self.route_count: Gauge = r.register(Gauge(
            "felix_route_table_num_routes",
            "Number of routes that Felix is managing in the particular routing table.", ("table",)))
        self.route_count.set(0, table=MAIN_ROUTE_TABLE)
        for table in ("filter", "nat"):
            self.iptables_chains.set(0, ip_version=IP_VERSION, table=table)
            self.iptables_rule_count.set(0, ip_version=IP_VERSION, table=table)
            self.iptables_lines.touch(ip_version=IP_VERSION, table=table)
        self.ipsets_calico.set(0, ip_version=IPSET_FAMILY)
        self.resync_state.set(RESYNC_STATE["WAIT_FOR_DATASTORE"])
        for command in CNI_COMMANDS:  # present from the start, so rate() works on the first request
            self.cni_seconds.touch(command=command)
        r.register_collector(ProcessCollector())
        r.register_collector(BGPStatusCollector(bgp_status))
        if health is not None:
            r.register_collector(HealthCollector(health))
        self._started = clock()
        self._clock = clock

    # -- the dataplane --------------------------------------------------------------------------
    def observe_apply(self, seconds: float) -> None:
        self.apply_seconds.observe(seconds)
        self.apply_time.observe(seconds)

    def apply_failed(self) -> None:
        self.dataplane_failures.inc()

    def first_apply_done(self) -> None:
        """The dataplane is in sync for the first time (time since the Metrics were created)."""
        self.initial_resync.set(self._clock() - self._started)

    def resync(self) -> None:
        self.resyncs.inc()

    def routes_programmed(self, n: int) -> None:
        self.routes.set(n)
        self.route_count.set(n, table=MAIN_ROUTE_TABLE)

    def observe_route_resync(self, seconds: float) -> None:
        self.route_resync.observe(seconds)

    def iptables_rules(self, n: int) -> None:
        self.rules.set(n)

    def dataplane_counts(self, *, tables: Iterable[TableCounts], ipsets: IPSetCounts | None,
                         local_endpoints: int, active_policies: int, active_selectors: int,
                         ipsets6: IPSetCounts | None = None) -> None:
        """After each successful apply: what the dataplane now holds (iptables and ip6tables tables,
        each under its ip_version as Felix labels them; our rules of both in felixpy_iptables_rules)."""
        rules_total = 0
        for table in tables:
            chains, rules = table.counts()
            rules_total += rules
            self.iptables_chains.set(chains, ip_version=str(table.ip_version), table=table.name)
            self.iptables_rule_count.set(rules, ip_version=str(table.ip_version), table=table.name)
        self.rules.set(rules_total)
        kernel_sets: int | None = 0  # the sets of ours each driver last read back, both families
        for version, sets in ((4, ipsets), (6, ipsets6)):
            if sets is None:
                continue
            ours, total = sets.counts()
            self.ipsets_calico.set(ours, ip_version=IPSET_FAMILIES[version])
            kernel_sets = kernel_sets + total if kernel_sets is not None and total is not None else None
        if kernel_sets is not None and ipsets is not None:
            self.ipsets_total.set(kernel_sets)
        self.active_endpoints.set(local_endpoints)
        self.active_policies.set(active_policies)
        self.active_selectors.set(active_selectors)

    def observe_command(self, argv: Sequence[str], input: str | bytes | None, seconds: float, ok: bool) -> None:
        """felixpy.kernel.commands observer: iptables-restore/-save and ipset calls, as Felix counts them."""
        tool = os.path.basename(str(argv[0])) if argv else ""
        text = input.decode(errors="replace") if isinstance(input, bytes) else (input or "")
        ip_version = "6" if tool.startswith("ip6tables") else "4"
        if tool.startswith(("iptables", "ip6tables")) and tool.endswith("-restore"):
            self.restore_calls.inc()
            if not ok:
                self.restore_errors.inc()
                return
            table = ""
            lines = 0
            for line in text.splitlines():
                if line.startswith("*"):
                    table = line[1:].strip()
                elif line.startswith(("-", ":")):
                    lines += 1
            if table:
                self.iptables_lines.inc(lines, ip_version=ip_version, table=table)
        elif tool.startswith(("iptables", "ip6tables")) and tool.endswith("-save"):
            self.save_calls.inc()
            if not ok:
                self.save_errors.inc()
        elif tool == "ipset":
            self.ipset_calls.inc()
            if not ok:
                self.ipset_errors.inc()
            elif text:
                self.ipset_lines.inc(sum(1 for line in text.splitlines() if line.strip()))
            elif len(argv) > 1 and argv[1] not in ("save", "list"):
                self.ipset_lines.inc()

    # -- the datastore and the calculation graph ------------------------------------------------
    def sync_status(self, status: str) -> None:
        """Every SyncStatus of the syncer, by name (WAIT_FOR_DATASTORE, RESYNC, IN_SYNC)."""
        if status in RESYNC_STATE:
            self.resync_state.set(RESYNC_STATE[status])
        if status == "RESYNC":
            self.resyncs_started.inc()

    def observe_calc_update(self, kind: str, seconds: float) -> None:
        self.calc_updates.inc(type=kind)
        self.calc_update_time.observe(seconds)

    def cluster(self, *, hosts: int, workload_endpoints: int, policies: int, profiles: int) -> None:
        self.cluster_hosts.set(hosts)
        self.cluster_weps.set(workload_endpoints)
        self.cluster_policies.set(policies)
        self.cluster_profiles.set(profiles)

    def ipam(self, *, blocks: int, in_use: int, borrowed: int) -> None:
        self.ipam_blocks.set(blocks)
        self.ipam_in_use.set(in_use)
        self.ipam_borrowed.set(borrowed)

    # -- CNI --------------------------------------------------------------------------------------
    def observe_cni(self, command: str, seconds: float) -> None:
        self.cni_seconds.observe(seconds, command=command.upper())

    # -- exposition -------------------------------------------------------------------------------
    def render(self) -> str:
        return self.registry.render()

    def start_http(self, port: int = DEFAULT_METRICS_PORT, host: str = "") -> TextServer:
        """Serve /metrics; returns the started server (stop() it on exit)."""
        return self.registry.start_http(port, host)


def update_kind(key: str) -> str:
    """The `type` label of felix_calc_graph_updates_processed for a datastore key: the resource
    plural (workloadendpoints, nodes, ...) or the IPAM object (block, affinity, handle, ipamconfig)."""
    parsed = keys.parse_key(key)
    return parsed.plural or parsed.kind


_POLICY_KINDS = (Kind.NETWORK_POLICY, Kind.GLOBAL_NETWORK_POLICY)
_COUNTED_KINDS = (Kind.NODE, Kind.WORKLOAD_ENDPOINT, Kind.PROFILE, *_POLICY_KINDS)


class DatastoreStats:
    """Cluster-wide counts (felix_cluster_num_*) and this node's IPAM usage (felixpy_ipam_*), kept
    up to date from the updates the agent's syncer delivers.

    Per IPAM block it remembers this node's share (affine?, addresses allocated to the node), so an
    update costs one block parse, not a walk over every block.
    """

    def __init__(self, node: str, metrics: Metrics) -> None:
        self._node = node
        self._affinity = host_affinity(node)
        self._metrics = metrics
        self._lock = threading.Lock()
        self._blocks: dict[str, tuple[bool, int]] = {}  # block key -> (affine to us, our addresses)
        self._totals = [0, 0, 0]  # blocks, in use, borrowed
        self._resources: dict[Kind, set[str]] = {kind: set() for kind in _COUNTED_KINDS}

    def register_with(self, dispatcher: Dispatcher) -> None:
        dispatcher.register(Kind.IPAM_BLOCK, self.on_block)
        for kind in _COUNTED_KINDS:
            dispatcher.register(kind, self.on_resource)

    def on_resource(self, update: Update[Any]) -> None:
        """A counted resource (node, endpoint, policy, profile); value None: deleted or invalid."""
        with self._lock:
            members = self._resources[update.kind]
            if update.value is None:
                members.discard(update.key)
            else:
                members.add(update.key)
            r = self._resources
            counts = (len(r[Kind.NODE]), len(r[Kind.WORKLOAD_ENDPOINT]),
                      sum(len(r[k]) for k in _POLICY_KINDS), len(r[Kind.PROFILE]))
        self._metrics.cluster(hosts=counts[0], workload_endpoints=counts[1], policies=counts[2],
                              profiles=counts[3])

    def on_block(self, update: Update[Block]) -> None:
        """One IPAM block update (value None: deleted, being released, or invalid)."""
        key = update.key
        share = (False, 0)
        block = update.value
        if block is not None:
            mine = sum(1 for a in block.allocated() if a.attrs.get("node") == self._node)
            share = (block.affinity == self._affinity, mine)
        with self._lock:
            old = self._blocks.pop(key, (False, 0))
            if share != (False, 0):
                self._blocks[key] = share
            for (affine, mine), sign in ((old, -1), (share, 1)):
                self._totals[0] += sign * int(affine)
                self._totals[1] += sign * mine
                self._totals[2] += sign * (0 if affine else mine)
            blocks, in_use, borrowed = self._totals
        self._metrics.ipam(blocks=blocks, in_use=in_use, borrowed=borrowed)


def reflector_registry(host: str, bgp_status: Callable[[], Mapping[str, Any] | None],
                       health: HealthResults | None = None) -> Registry:
    """What a route reflector (felixpy-node driving BIRD) exports: it programs no dataplane, so only
    felix_host, the process and its BGP sessions -- the same names as on every other node."""
    registry = Registry()
    felix_host = registry.register(Gauge(
        "felix_host", "Configured Felix hostname (as a label), typically used in grouping/aggregating "
        "stats; the value of the gauge is always set to 1.", const_labels={"host": host}))
    felix_host.set(1)
    registry.register_collector(ProcessCollector())
    registry.register_collector(BGPStatusCollector(bgp_status))
    if health is not None:
        registry.register_collector(HealthCollector(health))
    return registry
