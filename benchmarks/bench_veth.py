"""Benchmark pod plumbing: p50/p99 of veth.setup_workload (+ teardown_workload) over N pods (root).

Baseline measured in the same run: the reference CNI plugins `ptp` + `host-local` doing ADD and
DEL for the same number of pods (when /usr/lib/cni/ptp exists). Also runs the same workload from
several threads at once, as the agent's CNI server does.

    python benchmarks/bench_veth.py [--pods 100] [--threads 4]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from felixpy.kernel import veth

CNI_DIR = "/usr/lib/cni"


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def report(label: str, samples: list[float]) -> None:
    print(f"{label:<44} n={len(samples):<4} p50={percentile(samples, 50):7.2f} ms  "
          f"p99={percentile(samples, 99):7.2f} ms  mean={statistics.mean(samples):7.2f} ms")


def plumb_once(prefix: str, i: int) -> tuple[float, float]:
    """(setup ms, teardown ms) of one pod."""
    ns = f"/run/netns/{prefix}{i}"
    start = time.perf_counter()
    veth.setup_workload(
        netns_path=ns, host_iface=f"{prefix}{i}", mtu=1450,
        ips=[ipaddress.IPv4Interface(f"10.{200 + i // 65536 % 50}.{i // 256 % 256}.{i % 256}/32")],
    )
    mid = time.perf_counter()
    veth.teardown_workload(host_iface=f"{prefix}{i}", netns_path=ns)
    end = time.perf_counter()
    return (mid - start) * 1000, (end - mid) * 1000


def bench_felixpy(prefix: str, pods: int, threads: int) -> None:
    for label, workers in (("sequential", 1), (f"{threads} threads", threads)):
        with ThreadPoolExecutor(max_workers=workers) as pool:
            pairs = list(pool.map(lambda i: plumb_once(prefix, i), range(pods)))
        report(f"felixpy setup, {label}", [s for s, _ in pairs])
        report(f"felixpy setup+teardown, {label}", [s + t for s, t in pairs])


def bench_ptp(prefix: str, pods: int) -> None:
    conf = {
        "cniVersion": "1.0.0", "name": f"{prefix}net", "type": "ptp", "mtu": 1450,
        "ipam": {"type": "host-local", "subnet": "10.250.0.0/16",
                 "dataDir": tempfile.mkdtemp(prefix=f"{prefix}-ipam-")},
    }
    stdin = json.dumps(conf).encode()
    adds, totals = [], []
    for i in range(pods):
        env = {"PATH": os.environ.get("PATH", ""), "CNI_PATH": CNI_DIR,
               "CNI_CONTAINERID": f"{prefix}{i}", "CNI_NETNS": f"/run/netns/{prefix}{i}",
               "CNI_IFNAME": "eth0"}
        start = time.perf_counter()
        for command in ("ADD", "DEL"):
            subprocess.run([f"{CNI_DIR}/ptp"], input=stdin, env={**env, "CNI_COMMAND": command},
                           check=True, capture_output=True)
            if command == "ADD":
                adds.append((time.perf_counter() - start) * 1000)
        totals.append((time.perf_counter() - start) * 1000)
    report("baseline ptp+host-local ADD, sequential", adds)
    report("baseline ptp+host-local ADD+DEL, sequential", totals)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_veth: needs root (network namespaces)", file=sys.stderr)
        return 2
    prefix = "fxb" + secrets.token_hex(3)[:5]
    created = []
    try:
        for i in range(args.pods):
            subprocess.run(["ip", "netns", "add", f"{prefix}{i}"], check=True)
            created.append(f"{prefix}{i}")
        bench_felixpy(prefix, args.pods, args.threads)
        if os.path.exists(f"{CNI_DIR}/ptp"):
            bench_ptp(prefix, args.pods)
    finally:
        for name in created:
            subprocess.run(["ip", "link", "del", name], capture_output=True)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
