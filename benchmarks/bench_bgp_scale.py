#!/usr/bin/env python3
"""BGP at scale: 10,000 routes through our sidecar and ExaBGP to and from a BIRD 2 peer, and memory.

Two namespaces joined by a veth (198.51.100.0/24), iBGP AS 64512:
  * A: ExaBGP 5 with our sidecar as its API process (`python -m bgp.sidecar`), rendered by
    bgp.config exactly as the agent renders it; this process is the agent-like client
    (bgp.client.SidecarClient + bgp.rib.Rib, the two things the agent holds per route);
  * B: BIRD 2 importing everything, and a static protocol it exports to A.

Announce: the client pipelines `announce attributes next-hop A nlri ...` batches (what the agent
sends, bgp.protocol.announce_routes) and times until BIRD's table holds every route
(`birdc show route count`, polled). Receive: BIRD's static protocol gets --routes /26s
(include file + `birdc configure`) and the client times until its Rib has them all as best paths.
RSS (VmRSS from /proc) of ExaBGP, the sidecar and this process at idle, after the announce and
after the receive.

    sudo .venv/bin/python benchmarks/bench_bgp_scale.py [--routes 10000]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from procstat import children, rss_mib  # benchmarks/procstat.py, beside this script

BIN = os.path.dirname(sys.executable)
A_IP, B_IP = "198.51.100.1", "198.51.100.2"
AS_NUMBER = 64512

BIRD_CONF = """
router id {me};
protocol device {{ scan time 10; }}
protocol static bench {{
  ipv4;
  include "{static}";
}}
protocol bgp exabgp {{
  local {me} as {asn}; neighbor {peer} as {asn}; direct;
  ipv4 {{ import all; export where proto = "bench"; next hop self; }};
}}
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


def prefixes(count: int, base: str) -> list[str]:
    """`count` consecutive /26s from `base` (a /8 holds 262,144 of them)."""
    first = int(ipaddress.IPv4Address(base))
    return [f"{ipaddress.IPv4Address(first + i * 64)}/26" for i in range(count)]


@dataclass(frozen=True)
class Memory:
    exabgp: float
    sidecar: float
    client: float


class Setup:
    """The namespaces, BIRD in B, ExaBGP + sidecar in A; `close()` removes all of it."""

    def __init__(self) -> None:
        prefix = "bgs" + secrets.token_hex(2)
        self.a, self.b = prefix + "a", prefix + "b"
        self.work = tempfile.mkdtemp(prefix="bench-bgp-scale-")
        self.static = f"{self.work}/bird.static"
        self.bird_ctl = f"{self.work}/bird.ctl"
        self.socket = f"{self.work}/sidecar.sock"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.namespaces: list[str] = []
        self.exabgp_pid = 0

    def start(self) -> None:
        from bgp.config import SpeakerConfig, render_exabgp_conf, render_exabgp_env
        from bgp.peers import Peer, PeerType

        for ns in (self.a, self.b):
            sh("ip", "netns", "add", ns)
            self.namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", self.a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", self.b)
        for ns, ip in ((self.a, A_IP), (self.b, B_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

        open(self.static, "w").close()
        with open(f"{self.work}/bird.conf", "w") as f:
            f.write(BIRD_CONF.format(me=B_IP, peer=A_IP, asn=AS_NUMBER, static=self.static))
        self.procs.append(subprocess.Popen(
            ["ip", "netns", "exec", self.b, "bird", "-f", "-c", f"{self.work}/bird.conf", "-s", self.bird_ctl],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        peer = Peer(address=B_IP, as_number=AS_NUMBER, type=PeerType.GLOBAL, name="Global_198_51_100_2",
                    source_address=A_IP)
        with open(f"{self.work}/exabgp.conf", "w") as f:
            f.write(render_exabgp_conf(SpeakerConfig(node_name="bench", router_id=A_IP, local_address=A_IP,
                                                     as_number=AS_NUMBER, peers=(peer,),
                                                     sidecar_socket=self.socket, python=sys.executable)))
        with open(f"{self.work}/exabgp.env", "w") as f:
            f.write(render_exabgp_env(log_destination=f"{self.work}/exabgp.log"))
        env = {**os.environ, "exabgp_daemon_pid": f"{self.work}/exabgp.pid"}
        with open(f"{self.work}/exabgp.out", "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.a, os.path.join(BIN, "exabgp"), "--env-file",
                                     f"{self.work}/exabgp.env", "server", f"{self.work}/exabgp.conf"],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        # `ip netns exec` execs in place, so the Popen pid is ExaBGP's own.
        self.exabgp_pid = proc.pid

    def sidecar_pid(self) -> int:
        kids = children(self.exabgp_pid)
        return kids[0] if kids else 0

    def bird_routes(self) -> int:
        """Routes in BIRD's table (`show route count`: "N of N routes for N networks ...")."""
        out = subprocess.run(["birdc", "-s", self.bird_ctl, "show", "route", "count"],
                             capture_output=True, text=True, timeout=10, check=False).stdout
        for line in out.splitlines():
            words = line.split()
            if "routes" in words and words[0].isdigit():
                return int(words[0])
        return 0

    def bird_configure(self, routes: list[str]) -> None:
        with open(self.static, "w") as f:
            f.writelines(f"route {p} blackhole;\n" for p in routes)
        sh("birdc", "-s", self.bird_ctl, "configure")

    def memory(self) -> Memory:
        return Memory(rss_mib(self.exabgp_pid), rss_mib(self.sidecar_pid()), rss_mib(os.getpid()))

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(self.work, ignore_errors=True)


def wait_session(client: object, rib: object, timeout: float) -> None:
    """Feed events into the Rib until the replay is done and the BIRD session is up."""
    from bgp.client import SidecarClient
    from bgp.protocol import ReplayDone, StateChange
    from bgp.rib import Rib

    assert isinstance(client, SidecarClient) and isinstance(rib, Rib)
    deadline = time.monotonic() + timeout
    replayed = up = False
    while not (replayed and up):
        if time.monotonic() > deadline:
            raise SystemExit(f"no BGP session with BIRD after {timeout:.0f} s")
        event = client.next_event(timeout=0.5)
        if event is None:
            continue
        replayed = replayed or isinstance(event, ReplayDone)
        up = up or (isinstance(event, StateChange) and event.peer == B_IP and event.state == "up")
        rib.apply(event, now=time.monotonic())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=10000)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds each direction may take")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_bgp_scale: needs root (network namespaces)", file=sys.stderr)
        return 1
    if shutil.which("bird") is None or not os.path.exists(os.path.join(BIN, "exabgp")):
        print("bench_bgp_scale: needs bird (bird2) and exabgp in this Python environment", file=sys.stderr)
        return 1
    from bgp.client import SidecarClient
    from bgp.protocol import announce_routes
    from bgp.rib import Rib

    setup = Setup()
    try:
        setup.start()
        client = SidecarClient(setup.socket)
        client.connect(timeout=30)
        rib = Rib()
        wait_session(client, rib, timeout=60)
        time.sleep(1.0)  # let the session's first keepalives and our client's imports settle
        idle = setup.memory()

        # Announce: client -> sidecar -> ExaBGP -> BIRD.
        ours = prefixes(args.routes, "10.96.0.0")
        commands = announce_routes(ours, A_IP)
        started = time.monotonic()
        client.commands(commands, timeout=args.timeout)
        acked = time.monotonic() - started
        deadline = started + args.timeout
        while (count := setup.bird_routes()) < args.routes:
            if time.monotonic() > deadline:
                raise SystemExit(f"BIRD has {count} of {args.routes} routes after {args.timeout:.0f} s")
            time.sleep(0.02)
        in_bird = time.monotonic() - started
        announced = setup.memory()

        # Receive: BIRD -> ExaBGP -> sidecar -> client's Rib.
        theirs = prefixes(args.routes, "10.160.0.0")
        want = set(theirs)
        started = time.monotonic()
        setup.bird_configure(theirs)
        deadline = started + args.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SystemExit(f"the Rib has {len(want & set(rib.best_routes()))} of {args.routes} "
                                 f"routes after {args.timeout:.0f} s")
            event = client.next_event(timeout=min(0.5, remaining))
            if event is None or not rib.apply(event, now=time.monotonic()):
                continue
            best = rib.best_routes()
            if len(best) >= len(want) and want <= best.keys():
                break
        in_rib = time.monotonic() - started
        received = setup.memory()
        client.close()
    finally:
        setup.close()

    n = args.routes
    print(f"BGP scale: {n} /26 routes, ExaBGP 5 + felixpy sidecar <-> BIRD 2 (iBGP over a veth)")
    print(f"  announce (client -> sidecar -> ExaBGP -> BIRD): {len(commands)} commands acked in {acked:.2f} s; "
          f"all in BIRD after {in_bird:.2f} s = {n / in_bird:,.0f} routes/s")
    print(f"  receive  (BIRD -> ExaBGP -> sidecar -> Rib):    all best paths in the client's Rib after "
          f"{in_rib:.2f} s = {n / in_rib:,.0f} routes/s")
    print("  RSS (MiB)              ExaBGP   sidecar   client (SidecarClient + Rib, this process)")
    for label, mem in (("idle, session up", idle), (f"{n} announced", announced), (f"+{n} received", received)):
        print(f"  {label:22s} {mem.exabgp:6.1f}   {mem.sidecar:7.1f}   {mem.client:6.1f}")
    print(f"  client peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
