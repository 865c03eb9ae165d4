#!/usr/bin/env python3
"""Pod→pod TCP throughput across nodes, against node→node on the same link, with and without policy.

Brings up a 2-node felixpy-lab (routes mode), two pods per node, applies --policies Kubernetes
NetworkPolicies selecting pod b (the last one allows a, so b's ingress chain holds all of them),
and runs iperf3 (one stream, --seconds each) round-robin, --rounds times, so that all three see the
same machine load:
  * node→node: n1's eth0 → n2's eth0, the baseline (the same veth/bridge path the pods use);
  * pod→pod:   pod c on n1 → pod d on n2, which no policy selects;
  * pod→pod with policies: pod a on n1 → pod b on n2.
Prints medians and the ratios the design targets (≥ 0.95 × node→node; ≥ 0.9 × no policy).

    sudo .venv/bin/python benchmarks/bench_throughput.py [--seconds 5] [--rounds 3] [--policies 500]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time

BIN = os.path.dirname(sys.executable)


def lab(name: str, *args: str) -> str:
    argv = [os.path.join(BIN, "felixpy-lab"), *args]
    if "--" in args:
        cut = args.index("--")
        argv = [os.path.join(BIN, "felixpy-lab"), *args[:cut], "--name", name, *args[cut:]]
    else:
        argv.append("--name")
        argv.append(name)
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"felixpy-lab {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def iperf(client_ns: str, server_ip: str, seconds: int) -> float:
    out = subprocess.run(["ip", "netns", "exec", client_ns, "iperf3", "-J", "-c", server_ip, "-t", str(seconds)],
                         capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise SystemExit(f"iperf3 to {server_ip} failed: {out.stdout[-300:]} {out.stderr[-300:]}")
    return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"]) / 1e9


def policies_yaml(count: int) -> str:
    docs = []
    for i in range(count - 1):
        docs.append({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"bench-{i:04d}", "namespace": "bench"},
            "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": f"nobody-{i}"}}}],
                                  "ports": [{"port": 5201}]}]},
        })
    docs.append({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bench-allow-a", "namespace": "bench"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]},
    })
    return "\n---\n".join(json.dumps(d) for d in docs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", type=int, default=500)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces)")
    name = "tput" + secrets.token_hex(2)
    servers: list[subprocess.Popen[bytes]] = []
    print(f"bringing up lab {name} (2 nodes, routes mode) ...", flush=True)
    lab(name, "up", "--nodes", "2", "--mode", "routes")
    try:
        lab(name, "ns", "add", "bench")
        for pod, node in (("a", "n1"), ("b", "n2"), ("c", "n1"), ("d", "n2")):
            lab(name, "pod", "add", f"bench/{pod}", "--node", node, "--labels", f"pod={pod}")
        status = json.loads(lab(name, "status", "-o", "json"))
        ips = {p["name"]: p["ips"][0] for p in status["pods"]}
        node2_ip = next(n["ip"] for n in status["nodes"] if n["name"] == "n2")
        for ns in (f"{name}-n2", f"{name}-bench-b", f"{name}-bench-d"):
            servers.append(subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s"],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(policies_yaml(args.policies))
        started = time.monotonic()
        lab(name, "apply", "-f", f.name)
        os.unlink(f.name)
        rules = subprocess.run(["ip", "netns", "exec", f"{name}-n2", "iptables-save", "-t", "filter"],
                               capture_output=True, text=True).stdout.count("\n-A cali-")
        print(f"applied {args.policies} policies in {time.monotonic() - started:.1f} s; "
              f"n2 has {rules} cali rules", flush=True)
        time.sleep(2)
        key = f"pod→pod, {args.policies} policies"
        results: dict[str, list[float]] = {"node→node": [], "pod→pod": [], key: []}
        for _ in range(args.rounds):
            results["node→node"].append(iperf(f"{name}-n1", node2_ip, args.seconds))
            results["pod→pod"].append(iperf(f"{name}-bench-c", ips["d"], args.seconds))
            results[key].append(iperf(f"{name}-bench-a", ips["b"], args.seconds))
    finally:
        for proc in servers:
            proc.terminate()
        lab(name, "down")
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nTCP throughput, one iperf3 stream, {args.seconds} s x {args.rounds} rounds (Gbit/s, median):")
    for k, v in med.items():
        print(f"  {k:28} {v:7.2f}   (runs: {', '.join(f'{x:.2f}' for x in results[k])})")
    print(f"\n  pod→pod / node→node                     {med['pod→pod'] / med['node→node']:.2f}  (target ≥ 0.95)")
    print(f"  pod→pod with policies / without          {med[key] / med['pod→pod']:.2f}  (target ≥ 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
