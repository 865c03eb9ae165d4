#!/usr/bin/env python3
"""Datastore load on etcd: requests and watch events at idle and per pod add/delete (root).

    sudo .venv/bin/python benchmarks/bench_datastore_load.py [--nodes 3] [--pods 10] [--idle 60]

Brings up `felixpy-lab up --nodes N --name dsload` (etcd datastore) and reads etcd's own
Prometheus counters (`/metrics` on the client port, from the lab's fabric namespace):
grpc_server_handled_total per method (Range = get/list, Put, Txn, DeleteRange, LeaseGrant,
Watch streams opened) and grpc_server_msg_sent_total for Watch (events pushed to the watchers).
It reports the rates at idle (N agents, nothing changing) and the counts per `pod add` and per
`pod del` (everything that touched etcd: the lab CLI, the CNI plugin's request, the agents'
IPAM and their watches). Same-run baseline: the writes one pod needs at least (its
WorkloadEndpoint, its IPAM handle, the block's allocation = 3 writes; a delete the same 3).
The Kubernetes datastore's numbers are `benchmarks/bench_kube.py` (the API server's audit log).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from collections import Counter

BIN = os.path.dirname(sys.executable)
LAB = os.path.join(BIN, "felixpy-lab")
METRIC = re.compile(r'^(grpc_server_handled_total|grpc_server_msg_sent_total)\{([^}]*)\}\s+([0-9.e+]+)$')
MIN_WRITES_PER_POD = 3


def lab(name: str, *args: str, timeout: float = 600) -> str:
    done = subprocess.run([LAB, "--name", name, *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"felixpy-lab {' '.join(args)}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    return done.stdout


def scrape(name: str) -> Counter[str]:
    from felixpy.lab import topology

    text = subprocess.run(["ip", "netns", "exec", topology.fabric_netns(name), "curl", "-sf",
                           f"{topology.ETCD_ENDPOINT}/metrics"], capture_output=True, text=True, check=True,
                          timeout=30).stdout
    out: Counter[str] = Counter()
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(kv.split("=", 1) for kv in m.group(2).split(","))
        method = labels.get("grpc_method", "").strip('"')
        if m.group(1) == "grpc_server_handled_total":
            out[method] += int(float(m.group(3)))
        elif method == "Watch":
            out["watch events sent"] += int(float(m.group(3)))
    return out


def diff(after: Counter[str], before: Counter[str]) -> Counter[str]:
    return Counter({k: after[k] - before[k] for k in after if after[k] - before[k]})


def show(what: str, delta: Counter[str], per: float, unit: str) -> None:
    parts = ", ".join(f"{k} {v / per:.2f}" for k, v in sorted(delta.items()))
    print(f"  {what}: {parts or 'nothing'} {unit}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--pods", type=int, default=10)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--name", default="dsload")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_datastore_load: needs root (network namespaces)", file=sys.stderr)
        return 1
    print(f"{args.nodes} nodes, etcd datastore; load average at start {os.getloadavg()[0]:.2f} (2 cores, shared)")
    try:
        lab(args.name, "up", "--nodes", str(args.nodes), "--mode", "routes")
        lab(args.name, "ns", "add", "load")
        time.sleep(10)  # the agents' first sync and apply are done
        idle0 = scrape(args.name)
        t0 = time.monotonic()
        time.sleep(args.idle)
        idle = diff(scrape(args.name), idle0)
        window = time.monotonic() - t0
        print("etcd requests by method (all clients; 'Watch' = watch streams opened):")
        show(f"idle, {args.nodes} agents, {window:.0f} s", idle, window * args.nodes, "per second per agent")
        nodes = [f"n{i % args.nodes + 1}" for i in range(args.pods)]
        before = scrape(args.name)
        for i, node in enumerate(nodes):
            lab(args.name, "pod", "add", f"load/p{i}", "--node", node)
        added = diff(scrape(args.name), before)
        show(f"per pod add ({args.pods})", added, args.pods, "per pod")
        before = scrape(args.name)
        for i in range(args.pods):
            lab(args.name, "pod", "del", f"load/p{i}")
        deleted = diff(scrape(args.name), before)
        show(f"per pod del ({args.pods})", deleted, args.pods, "per pod")
        writes = sum(added[m] for m in ("Put", "Txn", "DeleteRange")) / args.pods
        print(f"writes (Put + Txn + DeleteRange) per pod add {writes:.1f}; baseline: the {MIN_WRITES_PER_POD} "
              f"writes a pod needs at least; ratio {writes / MIN_WRITES_PER_POD:.2f}x (no target in #12: measured)")
    finally:
        subprocess.run([LAB, "--name", args.name, "down"], capture_output=True, timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
