"""The agent's Prometheus metrics (`felixpy_*`), served as text exposition format 0.0.4 on /metrics.

Served on FELIX_PROMETHEUSMETRICSHOST:FELIX_PROMETHEUSMETRICSPORT (all interfaces, 9091) when
FELIX_PROMETHEUSMETRICSENABLED=true. The names are documented in docs/operations.md.

The exposition is our own (counters, gauges and histograms, with labels, in ~150 lines) rather
than prometheus-client: that package is not a dependency, and the agent only needs to render a
dozen series. Every metric is thread-safe: the agent loop, the CNI server threads and the HTTP
thread touch them concurrently.

The agent calls:

    metrics = Metrics()
    metrics.observe_apply(seconds)          # each dataplane apply
    metrics.resync()                        # each forced full resync of the dataplane
    metrics.routes_programmed(n)            # after each apply: routes we own in the kernel
    metrics.iptables_rules(n)               # after each apply: rules in our chains
    metrics.bgp_sessions({"Established": 2, ...})
    metrics.observe_cni("ADD", seconds)     # the CNI server, per request
    usage = IPAMUsage("node-1", metrics)    # registered with the agent's dispatcher: IPAM block updates
    metrics.start_http(9091)
"""

from __future__ import annotations

import abc
import math
import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from felixpy.calc.updates import Kind, Update
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


class _Metric(abc.ABC):
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    @abc.abstractmethod
    def samples(self) -> list[str]:
        """The metric's sample lines."""

    def render(self) -> list[str]:
        return self.header() + self.samples()


class _Scalar(_Metric):
    """One float per label set: what counters and gauges share."""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {} if labelnames else {(): 0.0}

    def get(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.labelnames, k)} {format_value(v)}" for k, v in items]


class Counter(_Scalar):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        super().__init__(name, help_text, labelnames)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Scalar):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
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
                out.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.labelnames, key)} {format_value(total)}")
            out.append(f"{self.name}_count{_labels(self.labelnames, key)} {n}")
        return out


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def register(self, metric: _Metric) -> Any:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


class Metrics:
    """The agent's metrics and the methods the agent, the CNI server and BGP call."""

    def __init__(self) -> None:
        r = self.registry = Registry()
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
        self.bgp: Gauge = r.register(Gauge(
            "felixpy_bgp_sessions", "BGP sessions of this node by state.", ("state",)))
        self.cni_seconds: Histogram = r.register(Histogram(
            "felixpy_cni_request_seconds", "Duration of CNI requests served by the agent.", CNI_BUCKETS,
            ("command",)))
        self.bgp_sessions({})
        for command in CNI_COMMANDS:  # present from the start, so rate() works on the first request
            self.cni_seconds.touch(command=command)

    def observe_apply(self, seconds: float) -> None:
        self.apply_seconds.observe(seconds)

    def resync(self) -> None:
        self.resyncs.inc()

    def routes_programmed(self, n: int) -> None:
        self.routes.set(n)

    def iptables_rules(self, n: int) -> None:
        self.rules.set(n)

    def ipam(self, *, blocks: int, in_use: int, borrowed: int) -> None:
        self.ipam_blocks.set(blocks)
        self.ipam_in_use.set(in_use)
        self.ipam_borrowed.set(borrowed)

    def bgp_sessions(self, counts: Mapping[str, int]) -> None:
        """Sessions per state; states not given are 0 (every known state is always exported)."""
        for state in (*BGP_STATES, *sorted(set(counts) - set(BGP_STATES))):
            self.bgp.set(counts.get(state, 0), state=state)

    def observe_cni(self, command: str, seconds: float) -> None:
        self.cni_seconds.observe(seconds, command=command.upper())

    def render(self) -> str:
        return self.registry.render()

    def start_http(self, port: int = DEFAULT_METRICS_PORT, host: str = "") -> TextServer:
        """Serve /metrics; returns the started server (stop() it on exit)."""
        def metrics() -> Response:
            return Response(200, self.render(), CONTENT_TYPE)

        server = TextServer(host, port, {"/metrics": metrics}, name="metrics")
        server.start()
        return server


class IPAMUsage:
    """Keeps felixpy_ipam_* up to date from the IPAM block updates the agent's syncer delivers.

    Per block it remembers this node's share (affine?, addresses allocated to the node), so an
    update costs one block parse, not a walk over every block.
    """

    def __init__(self, node: str, metrics: Metrics) -> None:
        self._node = node
        self._affinity = host_affinity(node)
        self._metrics = metrics
        self._lock = threading.Lock()
        self._blocks: dict[str, tuple[bool, int]] = {}  # block key -> (affine to us, our addresses)
        self._totals = [0, 0, 0]  # blocks, in use, borrowed

    def register_with(self, dispatcher: Dispatcher) -> None:
        dispatcher.register(Kind.IPAM_BLOCK, self.on_block)

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
