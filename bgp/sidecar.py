"""The ExaBGP API process: relays between ExaBGP and the agent, caches routes, replays on reconnect.

ExaBGP runs `python -m bgp.sidecar --socket PATH` as its API process (bgp.config renders the
stanza). ExaBGP writes JSON lines to our stdin and reads commands from our stdout; the agent talks
to us over a unix socket with one-line JSON (bgp.protocol: `encode_command` in, `encode_event` out).

Why it is shaped like this (exabgp-notes §7):
- ExaBGP writes to us with *blocking* writes; if we stop reading, its reactor freezes and every
  session dies on the hold timer. So the main thread does nothing but read stdin, parse, update the
  cache and append to the agent's outbox. It never touches the agent socket. A slow agent only
  grows its outbox; past `max_backlog` lines the agent is disconnected (it reconnects and gets a
  compact replay) instead of the sidecar buffering without bound or blocking.
- ExaBGP sends no withdraws when a session drops and a respawned API process gets no replay, so the
  cache (`RouteCache`) holds each peer's received routes, last OPEN and session state, and a newly
  connected agent first receives all of it, then `ReplayDone`.
- Every command gets one `done`/`error` line back, in order; the sidecar matches them FIFO to the
  commands it forwarded and answers each with `CommandResult(id, ok, output)`.
- EOF on stdin means ExaBGP is gone: exit rather than linger as an orphan.

One agent at a time: a new connection replaces the previous one.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, TextIO

from bgp.protocol import (Ack, CommandOutput, CommandResult, EndOfRib, Event, Notification, OpenReceived,
                          ProtocolError, ReceivedRoute, ReplayDone, RoutesReceived, StateChange,
                          decode_command, encode_event, parse_exabgp_line)

log = logging.getLogger(__name__)

DEFAULT_MAX_BACKLOG = 200_000  # lines queued for a slow agent before it is cut off
REPLAY_CHUNK = 1000  # routes per replayed RoutesReceived line


@dataclass
class _PeerCache:
    open: OpenReceived | None = None
    state: StateChange | None = None
    routes: dict[str, ReceivedRoute] = field(default_factory=dict)
    refreshed: set[str] = field(default_factory=set)  # prefixes announced since the last "up"
    eor: EndOfRib | None = None


class RouteCache:
    """What ExaBGP told us, per peer, in the form a reconnecting agent needs (pure)."""

    def __init__(self) -> None:
        self._peers: dict[str, _PeerCache] = {}

    def apply(self, event: Event) -> None:
        if isinstance(event, RoutesReceived):
            peer = self._peers.setdefault(event.peer, _PeerCache())
            for prefix in event.withdrawn:
                peer.routes.pop(prefix, None)
                peer.refreshed.discard(prefix)
            for route in event.announced:
                peer.routes[route.prefix] = route
                peer.refreshed.add(route.prefix)
        elif isinstance(event, OpenReceived):
            self._peers.setdefault(event.peer, _PeerCache()).open = event
        elif isinstance(event, StateChange):
            if event.state not in ("up", "down"):
                return  # "connected" accompanies every reconnect attempt and means nothing
            peer = self._peers.setdefault(event.peer, _PeerCache())
            peer.state, peer.eor, peer.refreshed = event, None, set()
            if event.state == "down" and (peer.open is None or peer.open.graceful_restart_time is None):
                # No graceful restart: the routes are gone for good (the agent's RIB flushes them too).
                peer.routes.clear()
        elif isinstance(event, EndOfRib):
            peer = self._peers.setdefault(event.peer, _PeerCache())
            peer.eor = event
            for prefix in [p for p in peer.routes if p not in peer.refreshed]:
                del peer.routes[prefix]

    def routes(self, peer: str) -> dict[str, ReceivedRoute]:
        cache = self._peers.get(peer)
        return dict(cache.routes) if cache else {}

    def snapshot(self) -> list[Event]:
        """Events that rebuild the state in an empty RIB: per peer OPEN, routes, state, End-of-RIB.

        Routes come before the state so that a RIB holding these paths as stale (after losing the
        sidecar) sees them refreshed before `up`/`down` decides what to do with stale paths.
        """
        events: list[Event] = []
        for address in sorted(self._peers):
            peer = self._peers[address]
            if peer.open is not None:
                events.append(peer.open)
            routes = list(peer.routes.values())
            for start in range(0, len(routes), REPLAY_CHUNK):
                events.append(RoutesReceived(address, tuple(routes[start:start + REPLAY_CHUNK])))
            if peer.state is not None:
                events.append(peer.state)
            if peer.eor is not None:
                events.append(peer.eor)
        return events


class _AgentConnection:
    """One connected agent: an outbox drained by a writer thread, commands read by a reader thread."""

    def __init__(self, sock: socket.socket, max_backlog: int) -> None:
        self.sock = sock
        self._max_backlog = max_backlog
        self._outbox: collections.deque[str] = collections.deque()
        self._cond = threading.Condition()
        self.closed = False

    def push(self, line: str) -> None:
        """Queue a line for the agent. Never blocks (called from the stdin thread)."""
        with self._cond:
            if self.closed:
                return
            if len(self._outbox) >= self._max_backlog:
                log.warning("agent too slow, disconnecting backlog=%d", len(self._outbox))
                self._close_locked()
                return
            self._outbox.append(line)
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._close_locked()

    def _close_locked(self) -> None:
        if not self.closed:
            self.closed = True
            self._outbox.clear()
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._cond.notify_all()

    def writer(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._outbox and not self.closed:
                        self._cond.wait()
                    if self.closed:
                        return
                    batch = list(self._outbox)
                    self._outbox.clear()
                self.sock.sendall(("\n".join(batch) + "\n").encode())
        except OSError as exc:
            log.info("agent connection lost while writing error=%s", exc)
        finally:
            self.close()
            self.sock.close()


@dataclass
class _Pending:
    conn: _AgentConnection | None
    command_id: int
    output: list[str] = field(default_factory=list)


class Sidecar:
    """The relay. `feed_line` is the stdin side; `serve` runs the agent socket in threads."""

    def __init__(self, socket_path: str, exabgp_out: TextIO, *, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        self.socket_path = socket_path
        self._out = exabgp_out
        self._max_backlog = max_backlog
        self.cache = RouteCache()
        self._lock = threading.Lock()  # cache + current agent + pending acks
        self._write_lock = threading.Lock()  # ExaBGP's stdin: pending FIFO order == write order
        self._agent: _AgentConnection | None = None
        self._pending: collections.deque[_Pending] = collections.deque()
        self._server: socket.socket | None = None

    # -- ExaBGP → agent (the stdin thread) -------------------------------------------------------

    def feed_line(self, line: str) -> None:
        try:
            event = parse_exabgp_line(line)
        except ProtocolError as exc:
            log.warning("ignoring ExaBGP line error=%s", exc)
            return
        if event is None:
            return
        with self._lock:
            if isinstance(event, Ack):
                if not self._pending:
                    log.warning("ack without a pending command ok=%s", event.ok)
                    return
                pending = self._pending.popleft()
                if pending.conn is not None and pending.conn is self._agent:
                    result = CommandResult(pending.command_id, event.ok, tuple(pending.output))
                    pending.conn.push(encode_event(result))
                return
            if isinstance(event, CommandOutput):
                if self._pending:
                    self._pending[0].output.append(event.text)
                return
            if isinstance(event, Notification):
                log.info("exabgp notification text=%s", event.text)
            self.cache.apply(event)
            if self._agent is not None:
                self._agent.push(encode_event(event))

    # -- agent → ExaBGP ----------------------------------------------------------------------------

    def _forward(self, conn: _AgentConnection, command_id: int, command: str) -> None:
        with self._write_lock:
            with self._lock:
                self._pending.append(_Pending(conn, command_id))
            self._out.write(command + "\n")
            self._out.flush()

    def _reader(self, conn: _AgentConnection) -> None:
        try:
            with conn.sock.makefile("r", encoding="utf-8", newline="\n") as stream:
                for line in stream:
                    if not line.strip():
                        continue
                    try:
                        command_id, command = decode_command(line)
                    except ProtocolError as exc:
                        log.warning("ignoring agent line error=%s", exc)
                        continue
                    self._forward(conn, command_id, command)
        except (OSError, ValueError) as exc:
            log.info("agent connection lost while reading error=%s", exc)
        finally:
            conn.close()
            with self._lock:
                if self._agent is conn:
                    self._agent = None

    # -- the socket ------------------------------------------------------------------------------

    def listen(self) -> None:
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket drives routing: owner only
        try:
            server.bind(self.socket_path)
        finally:
            os.umask(old_umask)
        server.listen(4)
        self._server = server

    def accept_forever(self) -> None:
        # Its own reference: stop() closes the socket and clears self._server from another thread.
        server = self._server
        assert server is not None
        while True:
            try:
                sock, _ = server.accept()
            except OSError:
                return  # closed by stop()
            self._attach(sock)

    def _attach(self, sock: socket.socket) -> None:
        conn = _AgentConnection(sock, self._max_backlog)
        with self._lock:
            previous, self._agent = self._agent, conn
            replay = self.cache.snapshot()
            # Queued under the lock, so no live event can slip in before or inside the replay.
            for event in replay:
                conn.push(encode_event(event))
            conn.push(encode_event(ReplayDone()))
        if previous is not None:
            previous.close()
        log.info("agent connected replay_events=%d", len(replay))
        threading.Thread(target=conn.writer, name="sidecar-writer", daemon=True).start()
        threading.Thread(target=self._reader, args=(conn,), name="sidecar-reader", daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            agent, self._agent = self._agent, None
        if agent is not None:
            agent.close()
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


def run(socket_path: str, stdin: TextIO, stdout: TextIO, *, max_backlog: int = DEFAULT_MAX_BACKLOG,
        on_ready: Callable[[], None] | None = None) -> int:
    sidecar = Sidecar(socket_path, stdout, max_backlog=max_backlog)
    sidecar.listen()
    threading.Thread(target=sidecar.accept_forever, name="sidecar-accept", daemon=True).start()
    log.info("sidecar ready socket=%s pid=%d", socket_path, os.getpid())
    if on_ready is not None:
        on_ready()
    try:
        # Never anything slow in this loop: ExaBGP blocks while we do not read.
        for line in stdin:
            sidecar.feed_line(line)
        log.info("exabgp closed our stdin, exiting")
    finally:
        sidecar.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bgp.sidecar", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="unix socket to serve the agent on")
    parser.add_argument("--max-backlog", type=int, default=DEFAULT_MAX_BACKLOG)
    parser.add_argument("--log-level", default=os.environ.get("FELIXPY_SIDECAR_LOG", "INFO"))
    args = parser.parse_args(argv)
    # stderr is ExaBGP's stderr (its log); keep lines short and greppable.
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s bgp.sidecar %(levelname)s %(message)s")

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, terminate)
    # ExaBGP passes TERM=dumb and line-oriented pipes; make our writes line-buffered text.
    stdout = open(sys.stdout.fileno(), "w", encoding="utf-8", buffering=1, closefd=False)
    try:
        return run(args.socket, sys.stdin, stdout, max_backlog=args.max_backlog)
    except OSError as exc:
        print(f"bgp.sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
