"""The agent's health endpoints: GET /liveness and GET /readiness, 200 or 503 with a short text body.

What Felix serves on FELIX_HEALTHHOST:FELIX_HEALTHPORT (localhost:9099, calico-reference §4.5),
probed by the kubelet (deploy/felixpy.yaml). Each endpoint aggregates named checks; a check is a
function returning (ok, detail) and must be cheap, because it runs on the HTTP thread:

* liveness: the agent loop has ticked within a timeout (`heartbeat_check`; Felix's dataplane
  watchdog allows 90 s). Before any liveness check is registered (startup, which may wait for the
  datastore) the process counts as live, so the kubelet does not kill an agent that is waiting.
* readiness: in sync with the datastore, the last dataplane apply succeeded, and the datastore
  answers right now (`DatastoreProbe`: a watch on a frozen etcd just goes quiet, so the sync
  status alone would stay "in sync"). BGP plugs in later as one more check. Before any
  readiness check is registered the agent is not ready.

`TextServer` (a threaded stdlib http.server) is shared with the metrics endpoint.

Wiring (felixpy/node/main.py):

    health = HealthServer(host, port)
    health.start()                         # early: liveness answers during startup
    ...
    probe = add_agent_checks(health, agent.status, store=store)
    ...
    probe.stop(); health.stop()            # on exit
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from felixpy.datastore import keys
from felixpy.datastore.api import Datastore, NotFound

log = logging.getLogger(__name__)

DEFAULT_HEALTH_HOST = "localhost"
DEFAULT_HEALTH_PORT = 9099
LIVENESS_TIMEOUT = 90.0  # Felix's dataplane watchdog
PROBE_INTERVAL = 5.0

Check = Callable[[], tuple[bool, str]]


# -- a tiny threaded text HTTP server ----------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: "_HTTPServer"
    protocol_version = "HTTP/1.0"  # one request per connection: probes never hold a thread

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            response = Response(404, "not found\n")
        else:
            try:
                response = route()
            except Exception as err:  # a broken route must answer, not drop the connection
                log.exception("http handler failed path=%s", self.path)
                response = Response(500, f"internal error: {err}\n")
        data = response.body.encode()
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("http %s %s", self.address_string(), format % args)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    routes: Mapping[str, Callable[[], Response]] = {}


class TextServer:
    """Serves GET routes (path -> function returning a Response) on a background thread."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Callable[[], Response]], *, name: str) -> None:
        self._host = host
        self._requested_port = port
        self._routes = dict(routes)
        self._name = name
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0); the requested one before start()."""
        return self._server.server_address[1] if self._server is not None else self._requested_port

    def start(self) -> None:
        """Bind and serve; raises OSError (e.g. port in use) with the address in the message."""
        try:
            server = _HTTPServer((self._host, self._requested_port), _Handler)
        except OSError as err:
            raise OSError(err.errno, f"{self._name}: cannot listen on {self._host}:{self._requested_port}: "
                                     f"{err.strerror}") from None
        server.routes = self._routes
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=self._name, daemon=True)
        self._thread.start()
        log.info("%s listening host=%s port=%d", self._name, self._host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


# -- health -------------------------------------------------------------------------------------
def _run_checks(checks: Mapping[str, Check]) -> list[str]:
    """Failures as "name: detail" lines (a check that raises has failed)."""
    failures = []
    for name, check in list(checks.items()):
        try:
            ok, detail = check()
        except Exception as err:
            ok, detail = False, f"check raised {type(err).__name__}: {err}"
        if not ok:
            failures.append(f"{name}: {detail}" if detail else name)
    return failures


class HealthServer:
    def __init__(self, host: str = DEFAULT_HEALTH_HOST, port: int = DEFAULT_HEALTH_PORT) -> None:
        self._lock = threading.Lock()
        self._liveness: dict[str, Check] = {}
        self._readiness: dict[str, Check] = {}
        self._http = TextServer(host, port, {"/liveness": self.liveness, "/readiness": self.readiness},
                                name="health")

    @property
    def port(self) -> int:
        return self._http.port

    def start(self) -> None:
        self._http.start()

    def stop(self) -> None:
        self._http.stop()

    def add_liveness(self, name: str, check: Check) -> None:
        with self._lock:
            self._liveness[name] = check

    def add_readiness(self, name: str, check: Check) -> None:
        with self._lock:
            self._readiness[name] = check

    def results(self) -> tuple[bool, bool, dict[str, bool]]:
        """(live, ready, readiness check -> ok), for the metrics (felixpy_agent_live/_ready)."""
        with self._lock:
            liveness, readiness = dict(self._liveness), dict(self._readiness)
        live = not _run_checks(liveness)
        per_check = {name: not _run_checks({name: check}) for name, check in readiness.items()}
        return live, bool(per_check) and all(per_check.values()), per_check

    def liveness(self) -> Response:
        with self._lock:
            checks = dict(self._liveness)
        failures = _run_checks(checks)
        if failures:
            return Response(503, "not live: " + "; ".join(failures) + "\n")
        return Response(200, "live\n" if checks else "live (starting)\n")

    def readiness(self) -> Response:
        with self._lock:
            checks = dict(self._readiness)
        if not checks:
            return Response(503, "not ready: starting\n")
        failures = _run_checks(checks)
        if failures:
            return Response(503, "not ready: " + "; ".join(failures) + "\n")
        return Response(200, "ready\n")


def heartbeat_check(last_tick: Callable[[], float], timeout: float = LIVENESS_TIMEOUT,
                    clock: Callable[[], float] = time.monotonic, *, what: str = "agent loop") -> Check:
    """Live while last_tick() (a clock() reading the loop stamps every iteration) is recent."""
    def check() -> tuple[bool, str]:
        age = clock() - last_tick()
        if age > timeout:
            return False, f"{what} has not run for {age:.0f}s (limit {timeout:.0f}s)"
        return True, ""
    return check


class DatastoreProbe:
    """Reads one key every `interval` seconds on its own thread; ready while the reads succeed.

    A frozen datastore makes the read time out (the backend's request timeout), and a probe that
    is itself stuck goes stale after `stale_after` seconds, so readiness flips either way.
    """

    def __init__(self, store: Datastore, *, interval: float = PROBE_INTERVAL, stale_after: float | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 key: str = keys.resource_key("clusterinformations", "default")) -> None:
        """`key` is any key the process may read (NotFound counts as an answer): with the
        Kubernetes datastore a key outside the process's RBAC would read as an outage."""
        self._store = store
        self._key = key
        self._interval = interval
        self._stale_after = stale_after if stale_after is not None else 3 * interval
        self._clock = clock
        self._last_ok: float | None = None
        self._error = "no answer yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def probe_once(self) -> bool:
        try:
            self._store.get(self._key)
        except NotFound:
            pass  # an answer is an answer
        except Exception as err:  # every failure mode of every backend means "not reachable"
            if self._error != str(err):
                log.warning("datastore probe failed: %s", err)
            self._error = str(err) or type(err).__name__
            return False
        if self._last_ok is None or self._error:
            log.info("datastore probe ok")
        self._last_ok = self._clock()
        self._error = ""
        return True

    def start(self) -> "DatastoreProbe":
        def loop() -> None:
            while not self._stop.is_set():
                self.probe_once()
                self._stop.wait(self._interval)
        self._thread = threading.Thread(target=loop, name="datastore-probe", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    def check(self) -> tuple[bool, str]:
        if self._last_ok is None:
            return False, f"datastore not reachable: {self._error}"
        if self._error:
            return False, f"datastore not reachable: {self._error}"
        age = self._clock() - self._last_ok
        if age > self._stale_after:
            return False, f"datastore has not answered for {age:.0f}s"
        return True, ""


class AgentStatusView(Protocol):
    """What the checks read from felixpy.node.agent.AgentStatus."""

    in_sync: bool
    last_apply_ok: bool
    last_apply_error: str
    last_tick: float  # time.monotonic() of the loop's latest iteration


def add_agent_checks(server: HealthServer, status: AgentStatusView, *, store: Datastore | None = None,
                     liveness_timeout: float = LIVENESS_TIMEOUT,
                     probe_interval: float = PROBE_INTERVAL) -> DatastoreProbe | None:
    """Register the agent's checks; returns the started DatastoreProbe (stop it on exit)."""
    server.add_liveness("agent-loop", heartbeat_check(lambda: status.last_tick, liveness_timeout))

    def in_sync() -> tuple[bool, str]:
        return (True, "") if status.in_sync else (False, "not in sync with the datastore")

    def dataplane() -> tuple[bool, str]:
        if status.last_apply_ok:
            return True, ""
        return False, f"last apply failed: {status.last_apply_error}" if status.last_apply_error else "not applied yet"

    server.add_readiness("datastore-sync", in_sync)
    server.add_readiness("dataplane", dataplane)
    if store is None:
        return None
    probe = DatastoreProbe(store, interval=probe_interval).start()
    server.add_readiness("datastore", probe.check)
    return probe
