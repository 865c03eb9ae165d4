#!/usr/bin/env python3
"""BGP convergence: a new block's claim on node A → the route in node B's kernel, p50 / p99.

felixpy: a 2-node felixpy-lab in mode bgp. Each trial writes a confirmed block affinity for n1
to etcd (what IPAM's claim does) and times until `ip monitor route` in n2's namespace shows the
route: etcd watch → n1's agent → its BGP controller → sidecar → ExaBGP → TCP → n2's ExaBGP →
sidecar → n2's agent (RIB, route driver) → kernel. The affinity is then deleted and the withdraw
timed the same way.

Anchor, same run, same machine: two BIRD 2 speakers in their own namespaces (iBGP over a veth);
A's block appears as a static route (static include file re-rendered + `birdc configure`, Calico's
confd path minus confd) and B's kernel protocol installs it.

    sudo .venv/bin/python benchmarks/bench_bgp.py [--trials 50]
"""

from __future__ import annotations

import argparse
import os
import queue
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = os.path.dirname(sys.executable)


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout


class RouteMonitor:
    """`ip monitor route` in a namespace; `wait(text)` returns the monotonic time a line had it."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(["ip", "-n", netns, "monitor", "route"], stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(0.2)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line))

    def drain(self) -> None:
        while not self.lines.empty():
            self.lines.get_nowait()

    def wait(self, text: str, deleted: bool, timeout: float = 10.0) -> float:
        deadline = time.monotonic() + timeout
        while True:
            at, line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            if text in line and line.startswith("Deleted") == deleted:
                return at

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def report(name: str, values: list[float]) -> None:
    ms = [v * 1000 for v in values]
    print(f"{name:44s} n={len(ms):3d}  p50 {statistics.median(ms):6.1f} ms  p99 {pct(ms, 99):6.1f} ms  "
          f"min {min(ms):5.1f}  max {max(ms):6.1f}")


def bench_felixpy(trials: int, spacing: float) -> tuple[list[float], list[float]]:
    lab = "bgpb" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "felixpy.lab.cli"]
    subprocess.run([*cli, "up", "--nodes", "2", "--mode", "bgp", "--name", lab], check=True,
                   capture_output=True, timeout=120)
    monitor = None
    try:
        from felixpy.datastore import keys
        from felixpy.lab import pods

        store = pods.open_datastore(lab)
        deadline = time.monotonic() + 30
        while "Established" not in sh("cat", f"/run/felixpy-lab/{lab}/n2/lib/bgp-status.json"):
            if time.monotonic() > deadline:
                raise SystemExit("sessions did not come up")
            time.sleep(0.2)
        monitor = RouteMonitor(f"{lab}-n2")
        announce, withdraw = [], []
        for i in range(trials):
            cidr = f"10.244.{200 + i // 4}.{(i % 4) * 64}/26"
            key = keys.affinity_key("n1", cidr)
            monitor.drain()
            start = time.monotonic()
            store.create(key, {"state": "confirmed", "deleted": False})
            announce.append(monitor.wait(cidr, deleted=False) - start)
            time.sleep(spacing)
            monitor.drain()
            start = time.monotonic()
            store.delete(key)
            withdraw.append(monitor.wait(cidr, deleted=True) - start)
            time.sleep(spacing)
        store.close()
        return announce, withdraw
    finally:
        if monitor is not None:
            monitor.stop()
        subprocess.run([*cli, "down", "--name", lab], capture_output=True, timeout=60)


BIRD_CONF = """
router id {me};
protocol device {{ scan time 10; }}
protocol kernel {{ ipv4 {{ export all; }}; }}
protocol static blocks {{
  ipv4;
  include "{static}";
}}
protocol bgp peer {{
  local {me} as 64512; neighbor {other} as 64512; direct;
  ipv4 {{ import all; export where proto = "blocks"; next hop self; }};
}}
"""


def bench_bird(trials: int, spacing: float) -> tuple[list[float], list[float]]:
    prefix = "bgb" + secrets.token_hex(2)
    a, b = prefix + "a", prefix + "b"
    work = tempfile.mkdtemp(prefix="bench-bgp-")
    procs: list[subprocess.Popen[bytes]] = []
    monitor = None
    try:
        for ns in (a, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns, ip in ((a, "192.0.2.101"), (b, "192.0.2.102")):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        ctl = {}
        for ns, me, other in ((a, "192.0.2.101", "192.0.2.102"), (b, "192.0.2.102", "192.0.2.101")):
            static = f"{work}/{ns}.static"
            open(static, "w").close()
            conf = f"{work}/{ns}.conf"
            with open(conf, "w") as f:
                f.write(BIRD_CONF.format(me=me, other=other, static=static))
            ctl[ns] = f"{work}/{ns}.ctl"
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-f", "-c", conf, "-s", ctl[ns]],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while "Established" not in subprocess.run(["birdc", "-s", ctl[a], "show", "protocols", "peer"],
                                                  capture_output=True, text=True).stdout:
            if time.monotonic() > deadline:
                raise SystemExit("BIRD session did not come up")
            time.sleep(0.2)
        monitor = RouteMonitor(b)
        announce, withdraw = [], []
        static = f"{work}/{a}.static"
        for i in range(trials):
            cidr = f"10.245.{i // 4}.{(i % 4) * 64}/26"
            monitor.drain()
            start = time.monotonic()
            with open(static, "w") as f:
                f.write(f"route {cidr} blackhole;\n")
            sh("birdc", "-s", ctl[a], "configure")
            announce.append(monitor.wait(cidr, deleted=False) - start)
            time.sleep(spacing)
            monitor.drain()
            start = time.monotonic()
            open(static, "w").close()
            sh("birdc", "-s", ctl[a], "configure")
            withdraw.append(monitor.wait(cidr, deleted=True) - start)
            time.sleep(spacing)
        return announce, withdraw
    finally:
        if monitor is not None:
            monitor.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=5)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between steps")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_bgp: needs root (network namespaces)", file=sys.stderr)
        return 1
    bird = bench_bird(args.trials, args.spacing) if shutil.which("bird") else None
    announce, withdraw = bench_felixpy(args.trials, args.spacing)
    print(f"BGP convergence, block claim on A -> route in B's kernel ({args.trials} trials)")
    report("felixpy (etcd -> agent -> ExaBGP -> ExaBGP -> agent)", announce)
    report("felixpy withdraw (affinity deleted)", withdraw)
    if bird is not None:
        report("BIRD 2 -> BIRD 2 (static + birdc configure)", bird[0])
        report("BIRD 2 withdraw", bird[1])
        ratio = statistics.median(announce) / statistics.median(bird[0])
        print(f"felixpy p50 / BIRD p50 = {ratio:.1f}x (target <= 3x, and p50 <= 20 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
