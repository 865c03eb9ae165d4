#!/usr/bin/env python3
"""Scale on one machine: a felixpy-lab of N nodes behind route reflectors, one pod per node (root).

    sudo .venv/bin/python benchmarks/bench_scale.py [--nodes 50] [--route-reflectors 2] [--name pscale]
                                                    [--idle 30] [--no-matrix]

Brings up `felixpy-lab up --nodes N --route-reflectors R` (mode bgp), adds one pod per node serving
tcp:80, and reports:
  * lab up time; pod adds; time from the last `pod add` until `felixpy-lab matrix` (TCP/80, every
    ordered pair) is fully connected;
  * memory: RSS and PSS (/proc/PID/smaps_rollup) of every agent, ExaBGP + its sidecar, and the
    reflectors (felixpy-node in reflector mode + BIRD), per node and in total;
  * CPU at idle over --idle seconds (utime + stime from /proc/PID/stat) per agent, per speaker,
    per reflector, against the same-run baseline of BIRD's own idle CPU in the same window.
    Target: an idle agent ≤ 1 % of a core.
Then `felixpy-lab down`. `up` raises the host-wide neighbour-table limits when they are too low
for N nodes (sandbox.md) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

from procstat import cpu_ticks, children, memory_kib  # benchmarks/procstat.py, beside this script

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BIN = os.path.dirname(sys.executable)
LAB = os.path.join(BIN, "felixpy-lab")
TICKS = os.sysconf("SC_CLK_TCK")


def lab(name: str, *args: str, timeout: float = 600) -> str:
    done = subprocess.run([LAB, "--name", name, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"felixpy-lab {' '.join(args)}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


@dataclass(frozen=True)
class Proc:
    role: str  # agent | exabgp | sidecar | reflector | bird
    node: str
    pid: int


def lab_processes(name: str) -> list[Proc]:
    from felixpy.lab import state

    st = state.load(name)
    out: list[Proc] = []
    for node in st.nodes:
        if node.route_reflector:
            out += [Proc("reflector", node.name, node.agent_pid), Proc("bird", node.name, node.bird_pid)]
            continue
        out.append(Proc("agent", node.name, node.agent_pid))
        if node.exabgp_pid:
            out.append(Proc("exabgp", node.name, node.exabgp_pid))
            out += [Proc("sidecar", node.name, c) for c in children(node.exabgp_pid)]
    return [p for p in out if p.pid]


def matrix_connected(name: str, timeout: float) -> tuple[int, int]:
    data = json.loads(lab(name, "matrix", "--ports", "80", "--protos", "tcp", "--timeout", str(timeout),
                          "-o", "json", timeout=600))
    rows = data["results"]["tcp/80"]
    pairs = [ok for src in rows.values() for ok in src.values()]
    return sum(pairs), len(pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--route-reflectors", type=int, default=2)
    parser.add_argument("--name", default="pscale")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement")
    parser.add_argument("--matrix-deadline", type=float, default=300.0)
    parser.add_argument("--no-matrix", action="store_true", help="skip the pods and the matrix")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_scale: needs root (network namespaces)", file=sys.stderr)
        return 1
    print(f"{args.nodes} nodes, {args.route_reflectors} route reflectors; load average at start "
          f"{os.getloadavg()[0]:.2f} (2 cores, shared)")
    t0 = time.monotonic()
    try:
        out = lab(args.name, "up", "--nodes", str(args.nodes), "--route-reflectors", str(args.route_reflectors),
                  timeout=1800)
        print("".join(line.strip() + "\n" for line in out.splitlines() if "gc_thresh" in line), end="")
        up = time.monotonic() - t0
        print(f"lab up: {up:.1f} s ({up / args.nodes:.2f} s per node)")
        procs = lab_processes(args.name)

        # Idle first: nothing but the agents' own timers (resyncs, BGP keepalives, status files).
        time.sleep(5)
        before = {p.pid: cpu_ticks(p.pid) for p in procs}
        w0 = time.monotonic()
        time.sleep(args.idle)
        window = time.monotonic() - w0
        cpu = {p.pid: (cpu_ticks(p.pid) - before[p.pid]) / TICKS / window * 100 for p in procs}
        by_role: dict[str, list[float]] = {}
        for p in procs:
            by_role.setdefault(p.role, []).append(cpu[p.pid])
        print(f"idle CPU over {window:.0f} s, % of one core (mean / max per process):")
        for role, values in sorted(by_role.items()):
            print(f"  {role:<10} x{len(values):<3} {sum(values) / len(values):6.2f} / {max(values):6.2f}")
        agent = by_role.get("agent", [0.0])
        bird = by_role.get("bird", [0.0])
        per_node = (sum(agent) + sum(by_role.get("exabgp", [])) + sum(by_role.get("sidecar", []))) / max(1, len(agent))
        bird_mean = sum(bird) / len(bird)
        agent_mean = sum(agent) / len(agent)
        print(f"  per node (agent + ExaBGP + sidecar): {per_node:.2f} %; baseline BIRD reflector idle "
              f"{bird_mean:.2f} % (agent mean / BIRD {agent_mean / bird_mean if bird_mean else float('inf'):.1f}x); "
              f"agent max {max(agent):.2f} % (target <= 1 %: {'met' if max(agent) <= 1 else 'MISSED'})")

        mem: dict[str, list[tuple[int, int]]] = {}
        for p in procs:
            mem.setdefault(p.role, []).append(memory_kib(p.pid))
        print("memory, MiB (RSS mean per process / PSS mean per process / PSS total):")
        total_pss = 0
        for role, sizes in sorted(mem.items()):
            rss = sum(v[0] for v in sizes) / len(sizes) / 1024
            pss = sum(v[1] for v in sizes) / 1024
            total_pss += sum(v[1] for v in sizes)
            print(f"  {role:<10} x{len(sizes):<3} {rss:7.1f} / {pss / len(sizes):7.1f} / {pss:8.1f}")
        nodes = len(mem.get("agent", []))
        print(f"  total PSS {total_pss / 1024:.0f} MiB; per node {total_pss / 1024 / max(1, nodes):.1f} MiB "
              f"(agent + ExaBGP + sidecar, reflectors spread)")

        if not args.no_matrix:
            lab(args.name, "ns", "add", "bench")
            p0 = time.monotonic()
            for node in [p.node for p in procs if p.role == "agent"]:
                lab(args.name, "pod", "add", f"bench/p-{node}", "--node", node, "--serve", "tcp:80")
            p1 = time.monotonic()
            print(f"{nodes} pod adds: {p1 - p0:.1f} s ({(p1 - p0) / max(1, nodes) * 1000:.0f} ms each, sequential)")
            ok = total = 0
            while time.monotonic() - p1 < args.matrix_deadline:
                ok, total = matrix_connected(args.name, 2.0)
                if ok == total:
                    break
            elapsed = time.monotonic() - p1
            print(f"full TCP matrix: {ok}/{total} pairs connected, {elapsed:.1f} s after the last pod add "
                  f"({'reached' if ok == total else 'NOT reached'})")
    finally:
        d0 = time.monotonic()
        subprocess.run([LAB, "--name", args.name, "down"], capture_output=True, timeout=600)
        print(f"lab down: {time.monotonic() - d0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
