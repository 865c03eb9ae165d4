"""felixpy-controllers: entry point and reconcile loop of the cluster controllers (one replica).

A pass runs the IPAM garbage collector, then the node/block cleanup (so a deleted node's
addresses are gone before its blocks are looked at). Passes run:

* every reconcile period (FELIXPY_CONTROLLER_RECONCILE_PERIOD, default 5m, Calico's
  reconcilerPeriod), the safety net;
* soon after a Node or WorkloadEndpoint is deleted (watched through two Syncers), at most one
  pass per FELIXPY_CONTROLLER_MIN_PASS_INTERVAL (default 5s) so that pod churn cannot turn into
  a storm of full listings;
* when the oldest leak candidate's grace period ends, so a leak is released shortly after its
  grace period rather than up to a whole period later.

A pass that fails on the datastore is retried after RETRY_INTERVAL; nothing else stops the loop.

Health and metrics (FELIXPY_CONTROLLERS_METRICS_PORT, default 9094, Calico's prometheusMetricsPort
of kube-controllers) are served on one port: GET /metrics (kube-controllers' IPAM metrics,
controllers/metrics.py), /healthz (live: the loop has run within LIVENESS_TIMEOUT) and /readyz
(ready: the datastore answers and the last pass succeeded).

In etcd mode with a Kubernetes API configured, the mirror (mirror.py) runs beside the loop on its
own threads, resyncing every reconcile period.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from felixpy import __version__
from felixpy.datastore.api import Datastore, DatastoreError

log = logging.getLogger("felixpy.controllers")

DEFAULT_RECONCILE_PERIOD = 5 * 60.0
MIN_PASS_INTERVAL = 5.0
RETRY_INTERVAL = 10.0
DEFAULT_METRICS_PORT = 9094  # kube-controllers' prometheusMetricsPort
TICK_INTERVAL = 10.0  # the loop wakes at least this often, so /healthz sees it alive
LIVENESS_TIMEOUT = 90.0
CONFIRM_SLACK = 0.5  # run just after a grace period ends, not just before

DURATION_ACCEPTS = 'expected a duration such as 15m, 90s, 1h30m or a number of seconds (0 disables)'
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


class ControllerConfigError(ValueError):
    """A bad environment variable; the message is one line naming it."""


def parse_duration(name: str, value: str) -> float:
    """Seconds from a Go-style duration ("15m", "1h30m", "90s") or a plain number of seconds."""
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        match = _DURATION.match(text)
        if not text or match is None or not any(match.groups()):
            raise ControllerConfigError(f'{name}="{value}": {DURATION_ACCEPTS}') from None
        h, m, s = (float(g) if g else 0.0 for g in match.groups())
        seconds = h * 3600 + m * 60 + s
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise ControllerConfigError(f'{name}="{value}": {DURATION_ACCEPTS}')
    return seconds


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    grace_period: float  # FELIXPY_IPAM_GC_GRACE_PERIOD; 0 disables leak GC of pod addresses
    reconcile_period: float  # FELIXPY_CONTROLLER_RECONCILE_PERIOD
    min_pass_interval: float  # FELIXPY_CONTROLLER_MIN_PASS_INTERVAL
    log_level: str  # LOG_LEVEL (kube-controllers' name)
    log_format: str  # FELIXPY_LOG_FORMAT
    metrics_port: int = DEFAULT_METRICS_PORT  # FELIXPY_CONTROLLERS_METRICS_PORT; 0 disables
    metrics_host: str = ""  # FELIXPY_CONTROLLERS_METRICS_HOST; "" = every address


def load_config(env: Mapping[str, str]) -> ControllerConfig:
    from felixpy.controllers.ipam_gc import DEFAULT_GRACE_PERIOD

    def duration(name: str, default: float) -> float:
        raw = env.get(name, "")
        return parse_duration(name, raw) if raw.strip() else default

    period = duration("FELIXPY_CONTROLLER_RECONCILE_PERIOD", DEFAULT_RECONCILE_PERIOD)
    if period <= 0:
        raise ControllerConfigError(
            f'FELIXPY_CONTROLLER_RECONCILE_PERIOD="{env["FELIXPY_CONTROLLER_RECONCILE_PERIOD"]}": '
            "expected a duration greater than 0 such as 5m")
    level = (env.get("LOG_LEVEL") or "info").strip().upper()
    level = {"WARN": "WARNING", "FATAL": "CRITICAL", "PANIC": "CRITICAL"}.get(level, level)
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ControllerConfigError(
            f'LOG_LEVEL="{env.get("LOG_LEVEL")}": accepted values are debug, info, warning, error, fatal')
    fmt = (env.get("FELIXPY_LOG_FORMAT") or "text").strip().lower()
    if fmt not in ("text", "json"):
        raise ControllerConfigError(f'FELIXPY_LOG_FORMAT="{env.get("FELIXPY_LOG_FORMAT")}": accepted values are text, json')
    raw_port = (env.get("FELIXPY_CONTROLLERS_METRICS_PORT") or "").strip()
    try:
        port = int(raw_port) if raw_port else DEFAULT_METRICS_PORT
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise ControllerConfigError(f'FELIXPY_CONTROLLERS_METRICS_PORT="{raw_port}": expected a TCP port from '
                                    "1 to 65535, or 0 to serve no health and metrics endpoint") from None
    return ControllerConfig(
        grace_period=duration("FELIXPY_IPAM_GC_GRACE_PERIOD", DEFAULT_GRACE_PERIOD),
        reconcile_period=period,
        min_pass_interval=duration("FELIXPY_CONTROLLER_MIN_PASS_INTERVAL", MIN_PASS_INTERVAL),
        log_level=level,
        log_format=fmt,
        metrics_port=port,
        metrics_host=(env.get("FELIXPY_CONTROLLERS_METRICS_HOST") or "").strip(),
    )


class Controllers:
    """The reconcile loop around the collector and the node cleanup."""

    def __init__(
        self,
        store: Datastore,
        *,
        grace_period: float,
        reconcile_period: float = DEFAULT_RECONCILE_PERIOD,
        min_pass_interval: float = MIN_PASS_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        metrics: Any = None,
    ) -> None:
        from felixpy.controllers.ipam_gc import IPAMGarbageCollector
        from felixpy.controllers.nodes import NodeCleanup
        from felixpy.controllers.pods import WorkloadEndpointIndex
        from felixpy.ipam.allocator import IPAM
        from felixpy.ipam.lock import ClusterLock

        self._store = store
        # kube-controllers skip their IPAM sync while a migration holds the datastore locked; the
        # guard also stops a write of a pass that was under way when the lock came.
        self._cluster_lock = ClusterLock(store, ttl=0)
        ipam = IPAM(store, cache_ttl=0, write_guard=self._cluster_lock.check)
        self.gc = IPAMGarbageCollector(store, WorkloadEndpointIndex(store), grace_period=grace_period,
                                       clock=clock, ipam=ipam)
        self.nodes = NodeCleanup(store, empty_block_age=reconcile_period, clock=clock, ipam=ipam)
        self._period = reconcile_period
        self._min_interval = min_pass_interval
        self._clock = clock
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._syncers: list[Any] = []
        self.passes = 0
        self.last_pass_ok = False
        self.last_pass_at: float | None = None
        self.last_tick = clock()  # liveness: stamped on every loop iteration
        self.metrics = metrics  # felixpy.controllers.metrics.ControllerMetrics, or None

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def trigger(self) -> None:
        """Ask for a pass soon (rate-limited to one per min_pass_interval)."""
        self._wake.set()

    def _on_sync_event(self, event: Any) -> None:
        if self.metrics is not None:
            self.metrics.on_event(event)
        # Only deletions can make something collectable; the initial listing is not a change.
        if isinstance(event, list) and any(u.value is None for u in event):
            self._wake.set()

    def run_once(self) -> bool:
        from felixpy.ipam.lock import DatastoreLockedError

        try:
            if self._cluster_lock.is_locked():
                raise DatastoreLockedError()
            result = self.gc.reconcile()
            self.nodes.reconcile()
        except (DatastoreError, DatastoreLockedError) as err:
            log.warning("reconcile pass failed, retrying in %.0fs: %s", RETRY_INTERVAL, err)
            self.last_pass_ok = False
            if self.metrics is not None:
                self.metrics.pass_done(False, time.time())
            return False
        self.passes += 1
        self.last_pass_ok = True
        self.last_pass_at = self._clock()
        if self.metrics is not None:
            self.metrics.reclaimed(result.released_nodes)
            self.metrics.set_candidates(ip for ip, _handle in self.gc.candidates())
            self.metrics.pass_done(True, time.time())
        return True

    def run(self) -> None:
        from felixpy.datastore import keys
        from felixpy.datastore.syncer import Syncer

        for plural in ("nodes", "workloadendpoints"):
            syncer = Syncer(self._store, self._on_sync_event, prefix=keys.resource_prefix(plural))
            syncer.start()
            self._syncers.append(syncer)
        if self.metrics is not None:
            # Blocks and pools only feed the metrics: they never trigger a pass.
            for prefix in (keys.BLOCKS, keys.resource_prefix("ippools")):
                syncer = Syncer(self._store, self.metrics.on_event, prefix=prefix)
                syncer.start()
                self._syncers.append(syncer)
        log.info("controllers running grace_period=%.0fs reconcile_period=%.0fs",
                 self.gc.grace_period, self._period)
        try:
            next_due = self._clock()
            while not self._stop.is_set():
                self.last_tick = self._clock()
                delay = max(0.0, next_due - self._clock())
                if self._wake.wait(min(delay, TICK_INTERVAL)):
                    self._wake.clear()
                    if self._stop.is_set():
                        break
                    # Rate limit change-triggered passes; a later due time stays as it is.
                    if self.last_pass_at is not None:
                        earliest = self.last_pass_at + self._min_interval
                        if self._clock() < earliest:
                            next_due = min(next_due, earliest)
                            continue
                elif self._clock() < next_due:
                    continue
                if self.run_once():
                    next_due = self._clock() + self._period
                    pending = self.gc.candidates()
                    if pending and self.gc.enabled:
                        soonest = min(pending.values()) + self.gc.grace_period + CONFIRM_SLACK
                        next_due = min(next_due, max(soonest, self._clock() + self._min_interval))
                else:
                    next_due = self._clock() + RETRY_INTERVAL
        finally:
            for syncer in self._syncers:
                syncer.stop()
            log.info("controllers stopped")


def open_mirror_for(store: Datastore, env: Mapping[str, str], resync_period: float) -> Any:
    """The Kubernetes → etcd mirror (controllers/mirror.py) when the datastore is etcd and a
    Kubernetes API is configured, else None: with the Kubernetes datastore the agents read
    Namespaces, Pods and NetworkPolicies straight from the API and there is nothing to mirror."""
    from felixpy.datastore.factory import datastore_type

    if datastore_type(env) != "etcdv3":
        return None
    from felixpy.controllers.mirror import open_mirror

    mirror = open_mirror(store, env, resync_period=resync_period)
    if mirror is None:
        log.info("no Kubernetes API configured: not mirroring Kubernetes into etcd")
    return mirror


def fail(message: str) -> int:
    sys.stderr.write(f"felixpy-controllers: {message}\n")
    return 1


def serve_health_and_metrics(controllers: Controllers, store: Datastore, metrics: Any,
                             host: str, port: int) -> tuple[Any, Any]:
    """/metrics, /healthz and /readyz on one port; returns (server, datastore probe) to stop on exit.

    Raises OSError (one line naming the address) when the port cannot be bound."""
    from felixpy.node.health import DatastoreProbe, HealthServer, heartbeat_check

    checks = HealthServer()  # only its checks and answers: the metrics server serves them
    checks.add_liveness("reconcile-loop", heartbeat_check(lambda: controllers.last_tick, LIVENESS_TIMEOUT,
                                                                 what="reconcile loop"))
    from felixpy.datastore import keys

    # A Node get: inside the controllers' RBAC (an absent name answers NotFound, which is fine).
    probe = DatastoreProbe(store, key=keys.resource_key("nodes", "felixpy-controllers-probe")).start()
    checks.add_readiness("datastore", probe.check)

    def last_pass() -> tuple[bool, str]:
        if controllers.last_pass_ok:
            return True, ""
        return False, "last reconcile pass failed" if controllers.passes else "first reconcile pass not done yet"

    checks.add_readiness("reconcile", last_pass)
    try:
        server = metrics.registry.start_http(port, host, name="controllers-http",
                                             extra_routes={"/healthz": checks.liveness, "/readyz": checks.readiness})
    except OSError:
        probe.stop()
        raise
    return server, probe


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-v", "--version", "version"):
        print(f"felixpy-controllers {__version__}")
        return 0
    if args:
        return fail(f"unexpected argument {args[0]!r}: configure with environment variables (docs/operations.md)")
    try:
        config = load_config(os.environ)
    except ControllerConfigError as err:
        return fail(str(err))

    from felixpy.datastore.factory import DatastoreConfigError, open_datastore
    from felixpy.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    try:
        store = open_datastore(os.environ)
    except (DatastoreConfigError, ValueError) as err:
        return fail(str(err))
    from felixpy.controllers.metrics import ControllerMetrics

    metrics = ControllerMetrics()
    controllers = Controllers(store, grace_period=config.grace_period, reconcile_period=config.reconcile_period,
                              min_pass_interval=config.min_pass_interval, metrics=metrics)
    http: Any = None
    probe: Any = None
    if config.metrics_port:
        try:
            http, probe = serve_health_and_metrics(controllers, store, metrics, config.metrics_host,
                                                   config.metrics_port)
        except OSError as err:
            store.close()
            return fail(str(err))
    try:
        mirror = open_mirror_for(store, os.environ, config.reconcile_period)
    except ValueError as err:  # a named but unusable kubeconfig
        if http is not None:
            http.stop()
            probe.stop()
        store.close()
        return fail(str(err))

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %s received: stopping", signal.Signals(signum).name)
        controllers.stop()
        if mirror is not None:
            mirror.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("felixpy-controllers %s", __version__)
    if mirror is not None:
        mirror.start()
    try:
        controllers.run()
    finally:
        if mirror is not None:
            mirror.stop()
            mirror.join()
        if http is not None:
            http.stop()
            probe.stop()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
