#!/usr/bin/env python3
"""The Kubernetes datastore on a real kube-apiserver against etcd, same run, same machine.

1. Pod add → reachable. Two 3-node labs side by side (mode routes): one on etcd (`felixpy-lab up`),
   one on a real control plane (`--datastore kubernetes`: the Pod created and bound through the
   API, CNI ADD, the WorkloadEndpoint written as the Pod's annotations, pods/status). Each trial
   times `felixpy-lab pod add` of a pod on n1 (the CLI's own start-up included, the same for
   both), then, from a pod already running on n2, TCP connects to the new pod until one succeeds
   (a prober waiting in that pod's namespace, 20 ms per attempt). Trials alternate between the
   labs so that machine load hits both alike.
2. The agents' load on the API server at idle: the kubernetes lab's API server writes an audit
   log (FELIXPY_KUBE_AUDIT_POLICY); after the trials, nothing happens for --idle seconds and the
   requests of the felixpy-node ServiceAccount (3 agents) are counted by verb, next to those of
   kube-controller-manager and of the lab's stand-in kubelets (Lease renewals) in the same window.

    sudo .venv/bin/python benchmarks/bench_kube.py [--trials 20] [--idle 330]
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

LAB_CLI = [sys.executable, "-m", "felixpy.lab.cli"]
PROBER = r"""
import socket, sys, time
ip = sys.stdin.readline().strip()
start = time.monotonic()
while time.monotonic() - start < 20:
    s = socket.socket()
    s.settimeout(0.02)
    try:
        s.connect((ip, 80))
        print(f"{time.monotonic() - start:.6f}", flush=True)
        sys.exit(0)
    except OSError:
        time.sleep(0.002)
    finally:
        s.close()
print("timeout", flush=True)
"""
AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
"""


def lab(name: str, *args: str, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    done = subprocess.run([*LAB_CLI, *args, "--name", name], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if done.returncode != 0:
        raise SystemExit(f"felixpy-lab {' '.join(args)} --name {name}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def trial(name: str, i: int) -> tuple[float, float]:
    """(pod add seconds, add-returned → first TCP connect seconds)."""
    prober = subprocess.Popen(["ip", "netns", "exec", f"{name}-b-base", sys.executable, "-c", PROBER],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    out = lab(name, "pod", "add", f"b/p{i}", "--node", "n1", "--serve", "tcp:80")
    added = time.monotonic() - t0
    # "pod b/p0 on n1: 10.244.1.2, serving tcp:80": the IP, the moment the command returned.
    ip = out.split(": ", 1)[1].split(",")[0].strip()
    answer, _ = prober.communicate(ip + "\n", timeout=30)
    if answer.strip() == "timeout":
        raise SystemExit(f"lab {name}: b/p{i} ({ip}) never became reachable")
    return added, float(answer.strip())


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def audit_counts(path: str, since: float, until: float) -> dict[str, dict[str, int]]:
    """Requests per user group and verb whose response completed in [since, until] (epoch s)."""
    import datetime

    counts: dict[str, dict[str, int]] = {}
    with open(path) as f:
        for line in f:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("stage") not in ("ResponseComplete", "ResponseStarted"):
                continue
            if ev.get("stage") == "ResponseStarted" and ev.get("verb") != "watch":
                continue  # a watch is counted when it starts; anything else when it completes
            if ev.get("verb") == "watch" and ev.get("stage") == "ResponseComplete":
                continue
            stamp = ev.get("stageTimestamp", "")
            when = datetime.datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(
                tzinfo=datetime.timezone.utc).timestamp()
            if not since <= when < until:
                continue
            user = ev.get("user", {}).get("username", "")
            if user == "system:serviceaccount:kube-system:felixpy-node":
                who = "felixpy-node (3 agents)"
            elif user == "system:kube-controller-manager" or (
                    user.startswith("system:serviceaccount:kube-system:") and "felixpy" not in user):
                who = "kube-controller-manager"
            elif ev.get("objectRef", {}).get("resource") == "leases" and ev.get("objectRef", {}).get(
                    "namespace") == "kube-node-lease":
                who = "lab kubelets (Lease renewals)"
            else:
                continue
            verb = ev.get("verb", "?")
            counts.setdefault(who, {})
            counts[who][verb] = counts[who].get(verb, 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    # Longer than the agents' watch timeout (300 s): every watch is re-opened once in the window.
    parser.add_argument("--idle", type=float, default=330.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespaces)")
    suffix = secrets.token_hex(2)
    labs = {"etcd": f"bke{suffix}", "kubernetes": f"bkk{suffix}"}
    policy = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    policy.write(AUDIT_POLICY)
    policy.close()
    try:
        env = {**os.environ, "FELIXPY_KUBE_AUDIT_POLICY": policy.name}
        for store, name in labs.items():
            extra = ["--datastore", "kubernetes"] if store == "kubernetes" else []
            t0 = time.monotonic()
            lab(name, "up", "--nodes", "3", "--mode", "routes", *extra, env=env)
            print(f"{store}: lab up in {time.monotonic() - t0:.1f} s", flush=True)
            lab(name, "ns", "add", "b")
            lab(name, "pod", "add", "b/base", "--node", "n2", "--serve", "tcp:80")
        results: dict[str, list[tuple[float, float]]] = {store: [] for store in labs}
        trials_start = time.time()
        for i in range(args.trials):
            for store, name in labs.items():
                results[store].append(trial(name, i))
        print(f"\npod add -> reachable from another node, {args.trials} pods per datastore (3 nodes, mode routes)")
        print(f"{'datastore':<12}{'add p50':>10}{'add p90':>10}{'then TCP p50':>14}{'total p50':>11}{'total p90':>11}")
        for store, rows in results.items():
            adds = [a for a, _ in rows]
            reach = [r for _, r in rows]
            totals = [a + r for a, r in rows]
            print(f"{store:<12}{pct(adds, .5) * 1000:>8.0f}ms{pct(adds, .9) * 1000:>8.0f}ms"
                  f"{pct(reach, .5) * 1000:>12.1f}ms{pct(totals, .5) * 1000:>9.0f}ms{pct(totals, .9) * 1000:>9.0f}ms")
        kube_total = statistics.median(a + r for a, r in results["kubernetes"])
        etcd_total = statistics.median(a + r for a, r in results["etcd"])
        print(f"kubernetes / etcd (median total): {kube_total / etcd_total:.2f}x")

        trials_end = time.time()
        # Idle load: let the trials' effects settle, then count a quiet window.
        time.sleep(10)
        start = time.time()
        time.sleep(args.idle)
        end = time.time()
        audit = f"/run/felixpy-lab/{labs['kubernetes']}/kube/audit.log"
        time.sleep(2)  # the audit backend flushes in batches (1 s)
        busy = audit_counts(audit, trials_start, trials_end).get("felixpy-node (3 agents)", {})
        print(f"\nfelixpy-node requests per pod add (CNI ADD on the agent, during the trials): "
              f"{sum(busy.values()) / args.trials:.1f} ("
              + ", ".join(f"{v} {n / args.trials:.1f}" for v, n in sorted(busy.items())) + ")")
        counts = audit_counts(audit, start, end)
        print(f"\nAPI requests at idle over {args.idle:.0f} s (kubernetes lab, 3 agents, audit log)")
        for who in ("felixpy-node (3 agents)", "kube-controller-manager", "lab kubelets (Lease renewals)"):
            verbs = counts.get(who, {})
            total = sum(verbs.values())
            detail = ", ".join(f"{v} {n}" for v, n in sorted(verbs.items()))
            print(f"  {who:<32}{total / args.idle:>7.2f} req/s  ({detail or 'none'})")
    finally:
        for name in labs.values():
            subprocess.run([*LAB_CLI, "down", "--name", name], capture_output=True, timeout=120)
        os.unlink(policy.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
