"""Long-lived traffic for `felixpy-lab chaos`: TCP flows and pings that count what they lose.

Runs inside a pod's network namespace, one process per pod:

    python -m felixpy.lab.traffic --lab LAB --listen 7000 --flow 10.244.1.2:7000 --ping 10.244.1.2 ...

It binds an echo server on --listen and prints `ready`; on a `go` line on stdin it opens one TCP
connection per --flow and pings every --ping target; on `stop` (or stdin closing, or after
--max-seconds) it stops sending, waits for what is still in flight, and prints one JSON summary;
it then goes on echoing for the other pods' flows until `exit` (or stdin closing).

A flow sends a 16-byte message (sequence number, send time) every --flow-interval and checks that
the echo comes back byte for byte, in order, on the same connection: the flow is kept when the
connection never broke. TCP retransmits across a short outage, so a flow only breaks when the
kernel gives up (TCP_USER_TIMEOUT, --user-timeout) or the connection is reset. Every stall (no
echo for longer than a second while messages were outstanding) is reported with its start and end.

Pings are ICMP echo requests on a raw socket, every --ping-interval per target; a request with no
reply within --ping-wait is lost, and its send time is reported, so that the chaos driver can tell
a loss during a deliberate link cut from any other. Times are CLOCK_MONOTONIC, which every process
on the machine shares. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MESSAGE = struct.Struct("!Qd")  # sequence number, send time
ICMP_ECHO_REQUEST = 8
ICMP_ECHO_REPLY = 0
STALL_SECONDS = 1.0
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def icmp_echo(ident: int, seq: int, payload: bytes) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, _checksum(header + payload), ident, seq) + payload


@dataclass
class Flow:
    target: tuple[str, int]
    sock: socket.socket | None = None
    connected_at: float | None = None
    sent: int = 0
    sent_bytes: bytearray = field(default_factory=bytearray)  # what is still to be echoed
    echoed_bytes: int = 0
    broken: str | None = None
    last_echo: float = 0.0
    stall_started: float | None = None
    stalls: list[tuple[float, float]] = field(default_factory=list)
    max_stall: float = 0.0

    @property
    def echoed(self) -> int:
        return self.echoed_bytes // MESSAGE.size

    def summary(self) -> dict[str, Any]:
        return {"target": f"{self.target[0]}:{self.target[1]}", "connected": self.connected_at is not None,
                "sent": self.sent, "echoed": self.echoed, "broken": self.broken,
                "maxStall": round(self.max_stall, 3), "stalls": [[round(a, 3), round(b, 3)] for a, b in self.stalls]}


@dataclass
class Pinger:
    target: str
    seq: int = 0
    sent: int = 0
    received: int = 0
    outstanding: dict[int, float] = field(default_factory=dict)  # seq -> send time
    lost: list[float] = field(default_factory=list)  # send times of the lost requests

    def summary(self) -> dict[str, Any]:
        return {"target": self.target, "sent": self.sent, "received": self.received,
                "lost": [round(t, 3) for t in self.lost]}


class Traffic:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", args.listen))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.peers: dict[int, tuple[socket.socket, bytearray]] = {}  # echo server side
        self.flows = [Flow(_parse_target(t)) for t in args.flow]
        self.pingers = [Pinger(t) for t in args.ping]
        self.icmp: socket.socket | None = None
        self.ident = os.getpid() & 0xFFFF
        self.running = False  # sending (between go and stop)
        self.stop_requested = False
        self._stdin = bytearray()

    # -- the echo server ------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self.peers[conn.fileno()] = (conn, bytearray())

    def _serve(self, fd: int) -> None:
        conn, pending = self.peers[fd]
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            conn.close()
            del self.peers[fd]
            return
        pending += data
        self._flush_peer(fd)

    def _flush_peer(self, fd: int) -> None:
        conn, pending = self.peers[fd]
        try:
            n = conn.send(pending)
            del pending[:n]
        except BlockingIOError:
            pass
        except OSError:
            conn.close()
            del self.peers[fd]

    # -- flows ----------------------------------------------------------------------------
    def _connect(self, flow: Flow) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(self.args.user_timeout * 1000))
        sock.settimeout(self.args.connect_timeout)
        try:
            sock.connect(flow.target)
        except OSError as e:
            sock.close()
            flow.broken = f"connect failed: {e}"
            return
        sock.setblocking(False)
        flow.sock = sock
        flow.connected_at = flow.last_echo = time.monotonic()

    def _send_flow(self, flow: Flow, now: float) -> None:
        if flow.sock is None or flow.broken:
            return
        message = MESSAGE.pack(flow.sent, now)
        try:
            # Tiny messages on a socket whose buffer never fills up in practice; if it ever did,
            # the flow is recorded as broken rather than silently skipping a message.
            if flow.sock.send(message) != len(message):
                self._break(flow, "short send")
                return
        except OSError as e:
            self._break(flow, f"send: {e}")
            return
        flow.sent += 1
        flow.sent_bytes += message

    def _receive_flow(self, flow: Flow, now: float) -> None:
        assert flow.sock is not None
        try:
            data = flow.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self._break(flow, f"recv: {e}")
            return
        if not data:
            self._break(flow, "closed by the peer")
            return
        if bytes(flow.sent_bytes[:len(data)]) != data:
            self._break(flow, "echo does not match what was sent")
            return
        del flow.sent_bytes[:len(data)]
        flow.echoed_bytes += len(data)
        flow.last_echo = now
        if flow.stall_started is not None:
            flow.stalls.append((flow.stall_started, now))
            flow.max_stall = max(flow.max_stall, now - flow.stall_started)
            flow.stall_started = None

    def _break(self, flow: Flow, why: str) -> None:
        flow.broken = why
        if flow.sock is not None:
            flow.sock.close()
            flow.sock = None

    def _watch_stalls(self, now: float) -> None:
        for flow in self.flows:
            if flow.sock is not None and flow.sent_bytes and flow.stall_started is None \
                    and now - flow.last_echo > STALL_SECONDS:
                flow.stall_started = flow.last_echo

    # -- pings ----------------------------------------------------------------------------
    def _send_ping(self, pinger: Pinger, now: float) -> None:
        assert self.icmp is not None
        pinger.seq = (pinger.seq + 1) & 0xFFFF
        try:
            self.icmp.sendto(icmp_echo(self.ident, pinger.seq, MESSAGE.pack(pinger.seq, now)), (pinger.target, 0))
        except OSError:
            pass  # e.g. no route at this instant: the request is lost like any other
        pinger.sent += 1
        pinger.outstanding[pinger.seq] = now

    def _receive_pings(self) -> None:
        assert self.icmp is not None
        while True:
            try:
                packet, (source, _) = self.icmp.recvfrom(2048)
            except BlockingIOError:
                return
            header_len = (packet[0] & 0x0F) * 4
            icmp = packet[header_len:header_len + 8]
            if len(icmp) < 8:
                continue
            kind, _code, _sum, ident, seq = struct.unpack("!BBHHH", icmp)
            if kind != ICMP_ECHO_REPLY or ident != self.ident:
                continue
            for pinger in self.pingers:
                if pinger.target == source and pinger.outstanding.pop(seq, None) is not None:
                    pinger.received += 1
                    break

    def _expire_pings(self, now: float, wait: float) -> None:
        for pinger in self.pingers:
            for seq, sent_at in list(pinger.outstanding.items()):
                if now - sent_at > wait:
                    del pinger.outstanding[seq]
                    pinger.lost.append(sent_at)

    # -- the loop -------------------------------------------------------------------------
    def _control(self) -> None:
        # os.read, not readline: a buffered reader would hide a second line from select().
        data = os.read(sys.stdin.fileno(), 1024)
        if not data:
            self.stop_requested = True  # the driver went away
            return
        self._stdin += data
        while b"\n" in self._stdin:
            line, _, rest = bytes(self._stdin).partition(b"\n")
            self._stdin = bytearray(rest)
            command = line.decode(errors="replace").strip()
            if command == "go" and not self.running and not self.stop_requested:
                self._go()
            elif command == "stop":
                self.stop_requested = True

    def _go(self) -> None:
        for flow in self.flows:
            self._connect(flow)
        if self.pingers:
            self.icmp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
            self.icmp.setblocking(False)
        self.running = True

    def run(self) -> dict[str, Any]:
        print("ready", flush=True)
        deadline = time.monotonic() + self.args.max_seconds
        next_flow = next_ping = time.monotonic()
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if now > deadline:
                self.stop_requested = True
            if self.stop_requested and drain_until is None:
                # Stop sending; give what is in flight the time a reply may take.
                drain_until = now + max(self.args.ping_wait, 2.0)
                self.running = False
            if drain_until is not None and (now >= drain_until or self._drained()):
                break
            if self.running:
                if now >= next_flow:
                    for flow in self.flows:
                        self._send_flow(flow, now)
                    next_flow = now + self.args.flow_interval
                if now >= next_ping:
                    for pinger in self.pingers:
                        self._send_ping(pinger, now)
                    next_ping = now + self.args.ping_interval
            self._watch_stalls(now)
            self._expire_pings(now, self.args.ping_wait)
            readable: list[Any] = [self.listener, *(c for c, _ in self.peers.values())]
            readable += [f.sock for f in self.flows if f.sock is not None]
            if self.icmp is not None:
                readable.append(self.icmp)
            if drain_until is None:
                readable.append(sys.stdin)
            writable = [c for c, pending in self.peers.values() if pending]
            wait = max(0.0, min(next_flow, next_ping) - now) if self.running else 0.1
            ready_r, ready_w, _ = select.select(readable, writable, [], min(wait, 0.1))
            now = time.monotonic()
            for r in ready_r:
                if r is sys.stdin:
                    self._control()
                elif r is self.listener:
                    self._accept()
                elif r is self.icmp:
                    self._receive_pings()
                else:
                    owner = next((f for f in self.flows if f.sock is r), None)
                    if owner is not None:
                        self._receive_flow(owner, now)
                    elif r.fileno() in self.peers:
                        self._serve(r.fileno())
            for w in ready_w:
                if w.fileno() in self.peers:
                    self._flush_peer(w.fileno())
        now = time.monotonic()
        self._expire_pings(now, 0.0)
        for flow in self.flows:
            if flow.stall_started is not None:
                flow.stalls.append((flow.stall_started, now))
                flow.max_stall = max(flow.max_stall, now - flow.stall_started)
            if flow.broken is None and flow.sent_bytes:
                flow.broken = f"{len(flow.sent_bytes) // MESSAGE.size} messages never echoed"
        return {"flows": [f.summary() for f in self.flows], "pings": [p.summary() for p in self.pingers]}

    def serve_until_exit(self, seconds: float) -> None:
        """After the summary: keep echoing for the other pods' flows until `exit` or stdin closes.

        Every process stops sending at its own pace; one that closed its server at once would
        break the flows of the others still draining theirs ("closed by the peer")."""
        deadline = time.monotonic() + seconds
        self._stdin = bytearray()
        while time.monotonic() < deadline:
            readable = [self.listener, sys.stdin, *(c for c, _ in self.peers.values())]
            writable = [c for c, pending in self.peers.values() if pending]
            ready_r, ready_w, _ = select.select(readable, writable, [], 0.5)
            for r in ready_r:
                if r is sys.stdin:
                    data = os.read(sys.stdin.fileno(), 1024)
                    if not data or b"exit" in data:
                        return
                elif r is self.listener:
                    self._accept()
                elif r.fileno() in self.peers:
                    self._serve(r.fileno())
            for w in ready_w:
                if w.fileno() in self.peers:
                    self._flush_peer(w.fileno())

    def _drained(self) -> bool:
        return not any(p.outstanding for p in self.pingers) and \
            not any(f.sent_bytes for f in self.flows if f.sock is not None)


def _parse_target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="felixpy.lab.traffic")
    parser.add_argument("--lab", default="", help="only marks the process as the lab's")
    parser.add_argument("--pod", default="", help="only marks the process as the pod's")
    parser.add_argument("--listen", type=int, required=True, help="TCP port of the echo server")
    parser.add_argument("--flow", action="append", default=[], metavar="IP:PORT")
    parser.add_argument("--ping", action="append", default=[], metavar="IP")
    parser.add_argument("--flow-interval", type=float, default=0.1)
    parser.add_argument("--ping-interval", type=float, default=0.2)
    parser.add_argument("--ping-wait", type=float, default=2.0, help="a reply later than this is a loss")
    parser.add_argument("--user-timeout", type=float, default=30.0, help="TCP_USER_TIMEOUT of a flow")
    parser.add_argument("--connect-timeout", type=float, default=5.0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop by itself after this")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    traffic = Traffic(args)
    try:
        summary = traffic.run()
    except KeyboardInterrupt:
        return 130
    print(json.dumps(summary), flush=True)
    try:
        traffic.serve_until_exit(args.max_seconds)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
