#!/usr/bin/env python3
"""Reflector scale: 1,000 light BGP clients on one felixpy-driven BIRD 2 reflector, then +100 (root).

Two network namespaces joined by one veth, 10.200.0.0/16:
  * R: BIRD 2 (started by this script) and its control socket; felixpy's route-reflector loop
    (`felixpy.node.reflector.run_reflector`, the code felixpy-node runs with
    FELIXPY_ROUTE_REFLECTOR=true) runs in this process on a MemoryDatastore holding the lab's
    reflector recipe (BGPConfiguration mesh off, BGPPeer all() -> route-reflector == 'true') and
    one Calico Node per client. It renders bird.conf and runs `birdc configure`.
  * C: one worker process (this script, --worker) holding every client: a raw BGP-4 speaker per
    client address (asyncio, no RIB beyond the set of prefixes it received), each announcing
    one /26 with itself as next hop. Who dials is Calico's rule (bgp.peers: the lexically higher
    address initiates, the other side is `passive on`): BIRD dials the clients below its address
    (`connect delay time 2` after a peer appears in its configuration; one listener on port 179
    takes them), the clients above it dial BIRD every 0.2 s until it accepts them (a connection
    without BIRD's OPEN within 3 s is dropped and dialled again). Neighbour entries are permanent on both sides, so the
    host-wide ARP table limits (sandbox.md) do not apply.

"Converged" means: every client's session is Established and every client has received every
other client's /26 (N-1 prefixes each; BIRD does not send a client its own route back).

Measured, for N clients and then N+100:
  felixpy   t0 = the Node resources are written to the datastore → converged;
  baseline  the same bird.conf text felixpy rendered, written by hand + `birdc configure` on a
            fresh BIRD and fresh clients → converged. Same machine, same run.
Both sides include the clients' own parsing (one Python process), so the ratio is what felixpy
adds on top of BIRD. Target: felixpy ≤ 2× the baseline for both steps (the issue sets no
absolute number; the clients' parsing bounds both).

    sudo .venv/bin/python benchmarks/bench_reflector_scale.py [--clients 1000] [--add 100]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from procstat import rss_mib  # benchmarks/procstat.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

AS_NUMBER = 64512
RR_ADDRESS = "10.200.255.254"
CLUSTER_ID = "244.0.0.1"
PREFIX_BASE = int(ipaddress.IPv4Address("172.16.0.0"))
HOLD_TIME = 240
KEEPALIVE_EVERY = 60.0
DIAL_EVERY = 0.2  # seconds between a client's attempts while BIRD does not know it yet
OPEN_TIMEOUT = 3.0  # seconds a dialled connection may wait for BIRD's OPEN before it is dropped


def client_address(i: int) -> str:
    return f"10.200.{i // 250}.{i % 250 + 1}"


def client_prefix(i: int) -> tuple[str, bytes]:
    """The /26 client i announces: its text and its NLRI encoding (length byte + 4 bytes)."""
    net = PREFIX_BASE + 64 * i
    return str(ipaddress.IPv4Network((net, 26))), bytes([26]) + net.to_bytes(4, "big")


# -- the worker: every client in one asyncio process -------------------------------------------

KEEPALIVE = b"\xff" * 16 + struct.pack("!HB", 19, 4)


def open_message(address: str) -> bytes:
    caps = (bytes([1, 4, 0, 1, 0, 1])  # multiprotocol: IPv4 unicast
            + bytes([65, 4]) + struct.pack("!I", AS_NUMBER))  # four-octet AS
    params = bytes([2, len(caps)]) + caps
    body = struct.pack("!BHH4sB", 4, AS_NUMBER, HOLD_TIME, socket.inet_aton(address), len(params)) + params
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), 1) + body


def update_message(address: str, nlri: bytes) -> bytes:
    attrs = (bytes([0x40, 1, 1, 0])  # ORIGIN IGP
             + bytes([0x40, 2, 0])  # AS_PATH empty (iBGP)
             + bytes([0x40, 3, 4]) + socket.inet_aton(address)  # NEXT_HOP itself
             + bytes([0x40, 5, 4]) + struct.pack("!I", 100))  # LOCAL_PREF
    body = struct.pack("!H", 0) + struct.pack("!H", len(attrs)) + attrs + nlri
    return b"\xff" * 16 + struct.pack("!HB", 19 + len(body), 2) + body


def prefixes_in(data: bytes, start: int, end: int) -> list[bytes]:
    out = []
    while start < end:
        length = (data[start] + 7) // 8
        out.append(data[start:start + 1 + length])
        start += 1 + length
    return out


class Worker:
    def __init__(self) -> None:
        self.clients: dict[int, Client] = {}
        self.by_address: dict[str, Client] = {}
        self.expected = 0  # prefixes each client must hold (active clients - 1)
        self.complete = 0  # clients holding `expected` prefixes
        self.established = 0
        self.reported = (-1, -1)

    def report(self) -> None:
        if self.clients and self.established == len(self.clients) and self.reported[0] != len(self.clients):
            self.reported = (len(self.clients), self.reported[1])
            print(f"established {len(self.clients)} {time.monotonic():.6f}", flush=True)
        if self.clients and self.complete == len(self.clients) and self.reported[1] != len(self.clients):
            self.reported = (self.reported[0], len(self.clients))
            print(f"converged {len(self.clients)} {time.monotonic():.6f}", flush=True)

    def add(self, first: int, count: int) -> None:
        loop = asyncio.get_running_loop()
        for i in range(first, first + count):
            client = Client(self, i)
            self.clients[i] = client
            self.by_address[client.address] = client
        self.expected = len(self.clients) - 1
        self.complete = sum(len(c.received) >= self.expected for c in self.clients.values())
        for i in range(first, first + count):
            if self.clients[i].address > RR_ADDRESS:  # confd compares the strings
                loop.create_task(self.clients[i].dial())

    async def keepalives(self) -> None:
        while True:
            await asyncio.sleep(KEEPALIVE_EVERY)
            for client in self.clients.values():
                if client.transport is not None:
                    client.transport.write(KEEPALIVE)


class Client(asyncio.Protocol):
    """One client's state; it is also the protocol of the session BIRD opened to its address."""

    def __init__(self, worker: Worker, index: int) -> None:
        self.worker = worker
        self.index = index
        self.address = client_address(index)
        self.nlri = client_prefix(index)[1]
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.up = False
        self.received: set[bytes] = set()
        self.closed: asyncio.Future[None] | None = None

    async def dial(self) -> None:
        """Until established: BIRD closes connections from peers it is not configured for."""
        loop = asyncio.get_running_loop()
        while not self.up:
            if self.transport is None:
                self.closed = loop.create_future()
                try:
                    await loop.create_connection(lambda: self, RR_ADDRESS, 179, local_addr=(self.address, 0))
                except OSError:
                    self.closed = None
                else:
                    # A connection BIRD took while it was reconfiguring can stay open with no
                    # OPEN back: give up on it like a connect-retry timer would.
                    try:
                        await asyncio.wait_for(asyncio.shield(self.closed), OPEN_TIMEOUT)
                    except asyncio.TimeoutError:
                        if not self.up and self.transport is not None:
                            self.transport.abort()
                            await self.closed
            await asyncio.sleep(DIAL_EVERY)

    def connection_made(self, transport: Any) -> None:
        if self.transport is not None:  # BIRD dialled again while a session is open: keep that one
            transport.close()
            return
        self.transport = transport
        transport.write(open_message(self.address))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up:
            print(f"error session {self.address} went down after Established", flush=True)
        self.transport = None
        self.buffer = b""
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data if self.buffer else data
        pos, size = 0, len(buf)
        while size - pos >= 19:
            length = (buf[pos + 16] << 8) | buf[pos + 17]
            if size - pos < length:
                break
            kind = buf[pos + 18]
            if kind == 2:
                self.on_update(buf, pos + 19, pos + length)
            elif kind == 1:
                assert self.transport is not None
                self.transport.write(KEEPALIVE)
            elif kind == 4 and not self.up:
                self.up = True
                self.worker.established += 1
                assert self.transport is not None
                self.transport.write(update_message(self.address, self.nlri))
                self.worker.report()
            elif kind == 3:
                print(f"error notification from the reflector to {self.address}: {buf[pos + 19:pos + 21].hex()}",
                      flush=True)
            pos += length
        self.buffer = buf[pos:]

    def on_update(self, buf: bytes, start: int, end: int) -> None:
        withdrawn_len = (buf[start] << 8) | buf[start + 1]
        for p in prefixes_in(buf, start + 2, start + 2 + withdrawn_len):
            self.received.discard(p)
        attrs = start + 2 + withdrawn_len
        attr_len = (buf[attrs] << 8) | buf[attrs + 1]
        before = len(self.received)
        self.received.update(prefixes_in(buf, attrs + 2 + attr_len, end))
        expected = self.worker.expected
        if before < expected <= len(self.received):
            self.worker.complete += 1
            self.worker.report()


class Accepted(asyncio.Protocol):
    """A connection BIRD opened: handed to the client whose address it reached."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.client: Client | None = None

    def connection_made(self, transport: Any) -> None:
        client = self.worker.by_address.get(transport.get_extra_info("sockname")[0])
        if client is None or client.transport is not None:
            transport.close()
            return
        self.client = client
        client.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.client is not None:
            self.client.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.client is not None and self.client.transport is not None:
            self.client.connection_lost(exc)


async def worker_main() -> None:
    worker = Worker()
    loop = asyncio.get_running_loop()
    loop.create_task(worker.keepalives())
    await loop.create_server(lambda: Accepted(worker), "0.0.0.0", 179, backlog=4096, reuse_address=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while True:
        line = (await reader.readline()).decode().split()
        if not line or line[0] == "quit":
            return
        if line[0] == "add":
            worker.add(int(line[1]), int(line[2]))
        elif line[0] == "counts":
            sizes = sorted(len(c.received) for c in worker.clients.values())
            print(f"counts expected={worker.expected} complete={worker.complete} established={worker.established} "
                  f"min={sizes[0] if sizes else 0} max={sizes[-1] if sizes else 0}", flush=True)
        elif line[0] == "rss":
            print(f"rss {rss_mib(os.getpid()):.1f}", flush=True)


# -- the driver --------------------------------------------------------------------------------

def sh(*argv: str, input: str | None = None) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120, input=input).stdout


class WorkerProcess:
    """The client worker in namespace C; lines from its stdout, with a deadline."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, os.path.abspath(__file__),
                                      "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.expect("ready", 30)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float, count: int | None = None) -> list[str]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.proc.stdout], [], [], remaining)[0]:
                if word != "counts":
                    self.send("counts")
                    print(" ".join(self.expect("counts", 10)), file=sys.stderr)
                raise TimeoutError(f"no '{word}' from the client worker within {timeout:.0f} s")
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the client worker exited")
            parts = line.split()
            if parts[0] == "error":
                raise RuntimeError(line.strip())
            if parts[0] == word and (count is None or int(parts[1]) == count):
                return parts

    def stop(self) -> None:
        try:
            self.send("quit")
            self.proc.wait(10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)


class Lab:
    """Namespaces R and C, the veth, addresses and permanent neighbours for `total` clients."""

    def __init__(self, prefix: str, total: int) -> None:
        self.r, self.c = f"{prefix}r", f"{prefix}c"
        self.dir = tempfile.mkdtemp(prefix=f"{prefix}-")
        sh("ip", "netns", "add", self.r)
        sh("ip", "netns", "add", self.c)
        sh("ip", "link", "add", f"{prefix}a", "netns", self.r, "type", "veth", "peer", f"{prefix}b", "netns", self.c)
        sh("ip", "-n", self.r, "link", "set", f"{prefix}a", "name", "eth0")
        sh("ip", "-n", self.c, "link", "set", f"{prefix}b", "name", "eth0")
        for ns in (self.r, self.c):
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.r, "addr", "add", f"{RR_ADDRESS}/16", "dev", "eth0")
        r_mac = self.mac(self.r)
        c_mac = self.mac(self.c)
        sh("ip", "-n", self.c, "neigh", "replace", RR_ADDRESS, "lladdr", r_mac, "dev", "eth0", "nud", "permanent")
        sh("ip", "-n", self.c, "-batch", "-",
           input="".join(f"addr add {client_address(i)}/16 dev eth0\n" for i in range(total)))
        sh("ip", "-n", self.r, "-batch", "-",
           input="".join(f"neigh replace {client_address(i)} lladdr {c_mac} dev eth0 nud permanent\n"
                         for i in range(total)))
        self.bird: subprocess.Popen[bytes] | None = None

    def mac(self, ns: str) -> str:
        return sh("ip", "-n", ns, "-br", "link", "show", "eth0").split()[2]

    @property
    def config(self) -> str:
        return f"{self.dir}/bird.conf"

    @property
    def socket(self) -> str:
        return f"{self.dir}/bird.ctl"

    def start_bird(self) -> None:
        """A fresh BIRD in R reading self.config (foreground, so this script owns its pid)."""
        self.stop_bird()
        self.bird = subprocess.Popen(["ip", "netns", "exec", self.r, "bird", "-f", "-c", self.config,
                                      "-s", self.socket], stdout=subprocess.DEVNULL,
                                     stderr=open(f"{self.dir}/bird.out", "ab"))
        deadline = time.monotonic() + 20
        while subprocess.run(["birdc", "-s", self.socket, "show", "status"], capture_output=True).returncode:
            if time.monotonic() > deadline or self.bird.poll() is not None:
                raise RuntimeError(f"bird did not start (see {self.dir}/bird.out)")
            time.sleep(0.05)

    def bird_pid(self) -> int:
        """BIRD's own pid (the child of `ip netns exec`, which execs it: the same pid)."""
        assert self.bird is not None
        return self.bird.pid

    def stop_bird(self) -> None:
        if self.bird is not None:
            self.bird.terminate()
            try:
                self.bird.wait(10)
            except subprocess.TimeoutExpired:
                self.bird.kill()
                self.bird.wait(10)
            self.bird = None

    def close(self) -> None:
        self.stop_bird()
        for ns in (self.r, self.c):
            subprocess.run(["ip", "netns", "del", ns], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def node(i: int) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": f"client{i}"},
            "spec": {"bgp": {"ipv4Address": f"{client_address(i)}/16"}}}


def recipe() -> list[dict[str, Any]]:
    """The lab's reflector recipe (felixpy/lab/cli.py), the clients' pool, this script's reflector Node."""
    return [
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": False, "asNumber": AS_NUMBER}},
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "peer-with-route-reflectors"},
         "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'"}},
        # The reflector passes on routes inside IP pools only (confd's calico_export_to_bgp_peers).
        {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "clients"},
         "spec": {"cidr": f"{ipaddress.IPv4Address(PREFIX_BASE)}/14", "blockSize": 26}},
        {"apiVersion": "projectcalico.org/v3", "kind": "Node",
         "metadata": {"name": "rr", "labels": {"route-reflector": "true"}},
         "spec": {"bgp": {"ipv4Address": f"{RR_ADDRESS}/16", "routeReflectorClusterID": CLUSTER_ID}}},
    ]


def wait_file_text(path: str, predicate: Callable[[str], bool], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if predicate(text):
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.01)
    raise TimeoutError(f"{path} not as expected within {timeout:.0f} s")


def run_felixpy(lab: Lab, clients: int, add: int, timeout: float) -> tuple[dict[str, float], list[str]]:
    """felixpy-driven: returns the timings and the two bird.conf texts it rendered."""
    from felixpy.datastore.memory import MemoryDatastore
    from felixpy.model.store import apply_resources
    from felixpy.node.reflector import ReflectorPaths, run_reflector

    store = MemoryDatastore()
    apply_resources(store, recipe(), "apply")
    paths = ReflectorPaths(config=lab.config, socket=lab.socket, status=f"{lab.dir}/bgp-status.json",
                           start_bird=False)
    stop = threading.Event()
    thread = threading.Thread(target=run_reflector, args=(store, "rr", paths, stop), daemon=True)
    thread.start()
    worker: WorkerProcess | None = None
    try:
        wait_file_text(lab.config, lambda t: "router id" in t, 30)  # the reflector's first rendering
        lab.start_bird()
        worker = WorkerProcess(lab.c)
        times: dict[str, float] = {}
        texts = []
        for first, count, step in ((0, clients, "initial"), (clients, add, "added")):
            total = first + count
            worker.send(f"add {first} {count}")
            time.sleep(0.5)  # the worker knows the new addresses before BIRD can dial them
            t0 = time.monotonic()
            apply_resources(store, [node(i) for i in range(first, total)], "apply")
            texts.append(wait_file_text(lab.config, lambda t: t.count("protocol bgp ") == total, timeout))
            times[f"{step} written"] = time.monotonic() - t0
            times[f"{step} established"] = float(worker.expect("established", timeout, total)[2]) - t0
            times[f"{step} converged"] = float(worker.expect("converged", timeout, total)[2]) - t0
        worker.send("rss")
        times["worker rss"] = float(worker.expect("rss", 10)[1])
        times["bird rss"] = rss_mib(lab.bird_pid())
        return times, texts
    finally:
        stop.set()
        thread.join(10)
        if worker is not None:
            worker.stop()
        lab.stop_bird()


def run_bare(lab: Lab, clients: int, add: int, texts: list[str], timeout: float) -> dict[str, float]:
    """The same texts by hand: write bird.conf, `birdc configure`."""
    from bgp.bird import render_bird_reflector

    empty = render_bird_reflector(router_id=RR_ADDRESS, as_number=AS_NUMBER, cluster_id=CLUSTER_ID, peers=[])
    with open(lab.config, "w", encoding="utf-8") as f:
        f.write(empty)
    lab.start_bird()
    worker = WorkerProcess(lab.c)
    try:
        times: dict[str, float] = {}
        for (first, count, step), text in zip(((0, clients, "initial"), (clients, add, "added")), texts):
            total = first + count
            worker.send(f"add {first} {count}")
            time.sleep(0.5)
            t0 = time.monotonic()
            with open(f"{lab.config}.tmp", "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(f"{lab.config}.tmp", lab.config)
            out = sh("birdc", "-s", lab.socket, "configure")
            assert "Reconfigur" in out, out
            times[f"{step} written"] = time.monotonic() - t0
            times[f"{step} established"] = float(worker.expect("established", timeout, total)[2]) - t0
            times[f"{step} converged"] = float(worker.expect("converged", timeout, total)[2]) - t0
        times["bird rss"] = rss_mib(lab.bird_pid())
        return times
    finally:
        worker.stop()
        lab.stop_bird()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--add", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per step before giving up")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(worker_main())
        return 0
    if os.geteuid() != 0:
        print("bench_reflector_scale: needs root (network namespaces)", file=sys.stderr)
        return 1
    if shutil.which("bird") is None or shutil.which("birdc") is None:
        print("bench_reflector_scale: needs BIRD 2 (apt-get install bird2)", file=sys.stderr)
        return 1
    total = args.clients + args.add
    if total > 4096:  # one /26 each inside the clients' /14 pool
        print("bench_reflector_scale: at most 4096 clients", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # clean up (finally) when killed
    # The reflector logs that BIRD is not up yet before this script starts it: expected here.
    logging.getLogger("felixpy").setLevel(logging.ERROR)
    prefix = "fxr" + secrets.token_hex(3)[:5]
    print(f"{args.clients} clients + {args.add}, one BIRD reflector; load average at start "
          f"{os.getloadavg()[0]:.2f} (2 cores, shared)")
    lab = Lab(prefix, total)
    try:
        felix, texts = run_felixpy(lab, args.clients, args.add, args.timeout)
        bare = run_bare(lab, args.clients, args.add, texts, args.timeout)
    finally:
        lab.close()
    print(f"{'step':<34} {'felixpy':>10} {'bare BIRD':>10} {'ratio':>7}")
    for step, what in (("initial", f"{args.clients} clients"), ("added", f"+{args.add} clients")):
        for phase in ("written", "established", "converged"):
            key = f"{step} {phase}"
            f, b = felix[key], bare[key]
            label = {"written": "bird.conf in place", "established": "all sessions Established",
                     "converged": "every client has every route"}[phase]
            print(f"{what + ': ' + label:<34.34} {f:9.2f}s {b:9.2f}s {f / b:6.2f}x")
    print(f"target: converged <= 2x bare BIRD: {args.clients} clients "
          f"{felix['initial converged'] / bare['initial converged']:.2f}x, +{args.add} "
          f"{felix['added converged'] / bare['added converged']:.2f}x")
    print(f"RSS: BIRD with {total} clients {felix['bird rss']:.1f} MiB (bare run {bare['bird rss']:.1f} MiB); "
          f"the client worker {felix['worker rss']:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
