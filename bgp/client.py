"""The agent's side of the sidecar socket: send ExaBGP commands, wait for their acks, receive events.

Commands follow style habit 8: one command, flushed, answered by one `CommandResult` (ExaBGP's
`done`/`error`). `command()` waits for it; `submit()` pipelines many and returns futures, which is
how bulk announces reach ExaBGP's parser without a round trip per line.

Events (bgp.protocol: `StateChange`, `OpenReceived`, `RoutesReceived`, `EndOfRib`, `Notification`,
then `ReplayDone` after the cached state the sidecar replays on every connect) are read by a
background thread into a queue; `next_event()` takes them. When the connection drops, pending
commands fail with `SidecarUnavailable`, `next_event()` raises it once the queue is drained, and
`connect()` starts over (and the replay follows).
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import threading
import time
from concurrent.futures import Future
from typing import Iterable

from bgp.protocol import (NO_ATTRIBUTES, Attributes, CommandResult, Event, ProtocolError, announce_route,
                          announce_routes, decode_event, encode_command, end_of_rib, withdraw_route,
                          withdraw_routes)

log = logging.getLogger(__name__)


class SidecarUnavailable(ConnectionError):
    """The sidecar socket is not connected (or the connection dropped)."""


class CommandFailed(RuntimeError):
    """ExaBGP answered `error` (the reason is only in ExaBGP's log)."""

    def __init__(self, command: str) -> None:
        super().__init__(f"ExaBGP rejected command: {command}")
        self.command = command


_CLOSED = object()  # end-of-stream marker in an event queue


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.events: queue.Queue[object] = queue.Queue()
        self.pending: dict[int, tuple[str, Future[CommandResult]]] = {}
        self.lock = threading.Lock()
        self.alive = True


class SidecarClient:
    """One connection at a time to the sidecar at `socket_path`."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._conn: _Connection | None = None
        self._next_id = 1
        self._id_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._conn.alive

    def connect(self, timeout: float = 10.0) -> None:
        """(Re)connect, retrying while the socket is missing or refused, up to `timeout` seconds."""
        self.close()
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
                break
            except OSError as exc:
                sock.close()
                if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED) or time.monotonic() >= deadline:
                    raise SidecarUnavailable(f"cannot connect to BGP sidecar at {self.socket_path}: "
                                             f"{exc.strerror}") from None
                time.sleep(0.05)
        conn = _Connection(sock)
        self._conn = conn
        threading.Thread(target=self._read, args=(conn,), name="bgp-client-reader", daemon=True).start()
        log.info("connected to bgp sidecar socket=%s", self.socket_path)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.sock.close()

    # -- commands --------------------------------------------------------------------------------

    def submit(self, command: str) -> Future[CommandResult]:
        """Send one command without waiting; the future resolves to its CommandResult."""
        conn = self._conn
        if conn is None or not conn.alive:
            raise SidecarUnavailable("not connected to the BGP sidecar")
        with self._id_lock:
            command_id, self._next_id = self._next_id, self._next_id + 1
        future: Future[CommandResult] = Future()
        line = (encode_command(command_id, command) + "\n").encode()
        with conn.lock:
            conn.pending[command_id] = (command, future)
            try:
                conn.sock.sendall(line)
            except OSError as exc:
                del conn.pending[command_id]
                raise SidecarUnavailable(f"BGP sidecar connection lost: {exc}") from None
        return future

    def command(self, command: str, *, timeout: float = 10.0, check: bool = True) -> CommandResult:
        """Send one command and wait for ExaBGP's answer; raise CommandFailed on `error` if `check`."""
        return self._wait(command, self.submit(command), timeout, check)

    def commands(self, commands: Iterable[str], *, timeout: float = 60.0, check: bool = True) -> list[CommandResult]:
        """Pipeline several commands, then wait for every answer (in order)."""
        sent = [(c, self.submit(c)) for c in commands]
        deadline = time.monotonic() + timeout
        return [self._wait(c, f, max(0.0, deadline - time.monotonic()), check) for c, f in sent]

    @staticmethod
    def _wait(command: str, future: Future[CommandResult], timeout: float, check: bool) -> CommandResult:
        try:
            result = future.result(timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer from ExaBGP within {timeout:.1f}s to: {command}") from None
        if check and not result.ok:
            raise CommandFailed(command)
        return result

    def announce(self, prefix: str, next_hop: str, *, neighbor: str | None = None,
                 attributes: Attributes = NO_ATTRIBUTES, timeout: float = 10.0) -> CommandResult:
        return self.command(announce_route(prefix, next_hop, neighbor=neighbor, attributes=attributes),
                            timeout=timeout)

    def withdraw(self, prefix: str, *, neighbor: str | None = None, timeout: float = 10.0) -> CommandResult:
        return self.command(withdraw_route(prefix, neighbor=neighbor), timeout=timeout)

    def announce_many(self, prefixes: Iterable[str], next_hop: str, *, neighbor: str | None = None,
                      attributes: Attributes = NO_ATTRIBUTES, timeout: float = 120.0) -> list[CommandResult]:
        return self.commands(announce_routes(prefixes, next_hop, neighbor=neighbor, attributes=attributes),
                             timeout=timeout)

    def withdraw_many(self, prefixes: Iterable[str], next_hop: str, *, neighbor: str | None = None,
                      timeout: float = 120.0) -> list[CommandResult]:
        return self.commands(withdraw_routes(prefixes, next_hop, neighbor=neighbor), timeout=timeout)

    def end_of_rib(self, *, neighbor: str | None = None, timeout: float = 10.0) -> CommandResult:
        return self.command(end_of_rib(neighbor=neighbor), timeout=timeout)

    # -- events ----------------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None after `timeout` seconds. Raises SidecarUnavailable when the
        connection has dropped and every event received before that was taken."""
        conn = self._conn
        if conn is None:
            raise SidecarUnavailable("not connected to the BGP sidecar")
        try:
            item = conn.events.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _CLOSED:
            conn.events.put(_CLOSED)  # keep raising on later calls
            raise SidecarUnavailable("BGP sidecar connection lost")
        return item  # type: ignore[return-value]

    def _read(self, conn: _Connection) -> None:
        try:
            with conn.sock.makefile("r", encoding="utf-8", newline="\n") as stream:
                for line in stream:
                    try:
                        event = decode_event(line)
                    except ProtocolError as exc:
                        log.warning("ignoring sidecar line error=%s", exc)
                        continue
                    if isinstance(event, CommandResult):
                        with conn.lock:
                            entry = conn.pending.pop(event.id, None)
                        if entry is not None:
                            entry[1].set_result(event)
                        continue
                    conn.events.put(event)
        except (OSError, ValueError) as exc:
            log.info("bgp sidecar connection lost error=%s", exc)
        finally:
            conn.alive = False
            with conn.lock:
                pending, conn.pending = conn.pending, {}
            for command, future in pending.values():
                future.set_exception(SidecarUnavailable(f"BGP sidecar connection lost before answering: {command}"))
            conn.events.put(_CLOSED)
