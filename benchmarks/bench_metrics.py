#!/usr/bin/env python3
"""What metrics cost: one /metrics render of the agent and of felixpy-controllers, and the command
observer on every iptables/ipset run, each against a baseline measured in the same run (no root).

  * agent render with P BGP peers (every series the agent exports, summaries with full windows,
    peers read from a status file on disk) vs prometheus_client rendering the same families and
    series (the library felixpy does not depend on; skipped when it is not installed);
  * controllers render over B blocks of 64 addresses on N nodes vs parsing those blocks once
    (Block.from_json: what any reader of the blocks pays);
  * commands.run(["true"]) with the metrics observer vs without.

    .venv/bin/python benchmarks/bench_metrics.py [--peers 100] [--blocks 2000] [--nodes 200] [--repeat 50]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from felixpy.controllers.metrics import ControllerMetrics  # noqa: E402
from felixpy.datastore import keys  # noqa: E402
from felixpy.ipam.block import Block  # noqa: E402
from felixpy.kernel import commands  # noqa: E402
from felixpy.node.bgp import read_status  # noqa: E402
from felixpy.node.health import HealthServer  # noqa: E402
from felixpy.node.metrics import Metrics  # noqa: E402


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, p90) in milliseconds."""
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def agent(peers: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bgp-status.json")
        rows = [{"peer": f"10.{i // 250}.{i % 250}.1", "type": "mesh", "node": f"n{i}", "state": "Established",
                 "since": 1.7e9, "routesReceived": 3} for i in range(peers)]
        with open(path, "w") as f:
            json.dump({"sidecar": "connected", "peers": rows}, f)
        m = Metrics(host="n1", bgp_status=lambda: read_status(path), health=HealthServer())
        for i in range(2048):  # full summary windows: the worst case for the quantiles
            m.observe_apply(0.001 * (i % 50))
            m.observe_calc_update("workloadendpoints", 0.0001)
            m.observe_route_resync(0.002)
        text = m.render()
        ours = timed(m.render, repeat)
        print(f"agent /metrics, {peers} peers: {len(text.splitlines())} lines, {len(text) / 1024:.0f} KiB; "
              f"render {ours[0]:.2f} ms p50, {ours[1]:.2f} ms p90")
        try:
            import prometheus_client as pc
        except ImportError:
            print("  baseline prometheus_client: not installed (pip install prometheus-client)")
            return
        registry = pc.CollectorRegistry()
        families = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                families[name] = kind
        gauges = [pc.Gauge(n.replace(":", "_"), "h", ["peer", "type", "peer_node"], registry=registry)
                  for n, k in families.items() if k == "gauge" and "bgp_peer" in n]
        for gauge in gauges:
            for row in rows:
                gauge.labels(row["peer"], row["type"], row["node"]).set(1)
        summaries = [pc.Summary(n + "_pc", "h", registry=registry) for n, k in families.items() if k == "summary"]
        for summary in summaries:
            for i in range(2048):
                summary.observe(0.001 * (i % 50))
        others = [pc.Gauge(n + "_pc", "h", registry=registry) for n, k in families.items()
                  if k == "gauge" and "bgp_peer" not in n]
        for gauge in others:
            gauge.set(1)
        pc.ProcessCollector(registry=registry)
        base = timed(lambda: pc.generate_latest(registry), repeat)
        print(f"  baseline prometheus_client, same series (its summaries have no quantiles): "
              f"{base[0]:.2f} ms p50, {base[1]:.2f} ms p90 -> ours/baseline {ours[0] / base[0]:.2f}x")


def controllers(blocks: int, nodes: int, repeat: int) -> None:
    m = ControllerMetrics()
    m.on_update(keys.resource_key("ippools", "p1"), {"spec": {"cidr": "10.0.0.0/8"}})
    values = []
    for n in range(nodes):
        m.on_update(keys.resource_key("nodes", f"n{n}"), {"spec": {}})
    for b in range(blocks):
        net = f"10.{b // 1024}.{(b // 4) % 256}.{(b % 4) * 64}/26"
        block = Block.new(net, affinity=f"host:n{b % nodes}")
        block.assign(64, f"h{b}", {"node": f"n{b % nodes}", "namespace": "x", "pod": f"p{b}"})
        value = block.to_json()
        values.append(value)
        m.on_update(keys.block_key(net), value)
    ours = timed(m.render, repeat)
    base = timed(lambda: [Block.from_json(v) for v in values], max(3, repeat // 10))
    print(f"controllers /metrics, {blocks} blocks x 64 addresses, {nodes} nodes: render {ours[0]:.1f} ms p50, "
          f"{ours[1]:.1f} ms p90; baseline parsing the blocks once {base[0]:.1f} ms "
          f"-> ours/baseline {ours[0] / base[0]:.2f}x")


def observer(repeat: int) -> None:
    bare = timed(lambda: commands.run(["true"]), repeat)
    m = Metrics()
    commands.add_observer(m.observe_command)
    try:
        observed = timed(lambda: commands.run(["true"]), repeat)
    finally:
        commands.remove_observer(m.observe_command)
    print(f"commands.run(['true']): {observed[0]:.3f} ms p50 with the metrics observer, baseline without "
          f"{bare[0]:.3f} ms -> {observed[0] / bare[0]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--blocks", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    for peers in sorted({0, args.peers}):
        agent(peers, args.repeat)
    controllers(args.blocks, args.nodes, args.repeat)
    observer(args.repeat * 4)


if __name__ == "__main__":
    main()
