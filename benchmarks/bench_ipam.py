"""IPAM allocation rate against a real etcd it starts itself.

    python benchmarks/bench_ipam.py [--count 1000] [--block-size 26] [--processes 4]

etcd keeps its data under $TMPDIR (see tests/support/etcd_server.py); the fsync cost of the
disk behind it dominates write latency, which is why the baseline is measured in the same run.

Prints, each as allocations per second:
  baseline           bare etcd create-only puts of a handle-sized value (one round trip each)
  affine             auto_assign within blocks this node already owns (one process)
  with claims        auto_assign from an empty pool, one new block claim every 2^(32-block size)
  concurrent         N processes on N/2 nodes allocating at once (total rate), then a duplicate
                     check over everything allocated
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from felixpy.datastore import keys  # noqa: E402
from felixpy.datastore.etcd import EtcdDatastore  # noqa: E402
from felixpy.ipam.allocator import IPAM  # noqa: E402
from tests.support.etcd_server import start_etcd  # noqa: E402


def add_pool(store: EtcdDatastore, name: str, cidr: str, block_size: int) -> None:
    store.create(
        keys.resource_key("ippools", name),
        {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
         "spec": {"cidr": cidr, "blockSize": block_size}},
    )


def allocate(endpoint: str, node: str, prefix: str, count: int, pool: str) -> tuple[float, list[str]]:
    store = EtcdDatastore([endpoint])
    ipam = IPAM(store)
    ips: list[str] = []
    start = time.perf_counter()
    for i in range(count):
        got = ipam.auto_assign(handle=f"{prefix}-{i}", attrs={"node": node, "pod": f"{prefix}-{i}"},
                               node=node, pools=[pool])
        ips.extend(str(ip) for ip in got)
    elapsed = time.perf_counter() - start
    store.close()
    return elapsed, ips


def _worker(args: tuple[str, str, str, int, str]) -> tuple[float, list[str]]:
    return allocate(*args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--block-size", type=int, default=26)
    parser.add_argument("--processes", type=int, default=4)
    args = parser.parse_args()
    per_block = 1 << (32 - args.block_size)
    if args.count > 20 * per_block:
        # One node may claim 20 blocks (maxBlocksPerHost 0); beyond that it would need to borrow.
        parser.error(f"--count must be at most {20 * per_block} for /{args.block_size} blocks")

    server = start_etcd()
    try:
        store = EtcdDatastore([server.endpoint])
        n = args.count

        start = time.perf_counter()
        for i in range(n):
            store.create(f"/calico/bench/{i}", {"block": {"10.0.0.0/26": 1}, "deleted": False})
        base = n / (time.perf_counter() - start)
        print(f"baseline      etcd create-only put          {base:8.0f} /s  ({1000 / base:.2f} ms each)")

        # Affine: pre-claim enough blocks, release everything, then measure allocation only.
        add_pool(store, "affine", "10.10.0.0/16", args.block_size)
        warm = IPAM(store)
        handles = [f"warm-{i}" for i in range(n)]
        for h in handles:
            warm.auto_assign(handle=h, attrs={}, node="bench-a", pools=["affine"])
        for h in handles:
            warm.release_by_handle(h)
        elapsed, ips = allocate(server.endpoint, "bench-a", "affine", n, "affine")
        print(f"affine        auto_assign, owned blocks     {n / elapsed:8.0f} /s  "
              f"({1000 * elapsed / n:.2f} ms each)")

        add_pool(store, "claims", "10.20.0.0/16", args.block_size)
        elapsed, ips = allocate(server.endpoint, "bench-b", "claims", n, "claims")
        print(f"with claims   auto_assign, 1 claim per {per_block:<4} {n / elapsed:8.0f} /s  "
              f"({1000 * elapsed / n:.2f} ms each)")

        add_pool(store, "conc", "10.30.0.0/16", args.block_size)
        per_proc = n // args.processes
        jobs = [(server.endpoint, f"bench-c{i % max(1, args.processes // 2)}", f"conc{i}", per_proc, "conc")
                for i in range(args.processes)]
        start = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            results: list[Any] = pool.map(_worker, jobs)
        wall = time.perf_counter() - start
        all_ips = [ip for _, got in results for ip in got]
        dupes = len(all_ips) - len(set(all_ips))
        rate = len(all_ips) / max(t for t, _ in results)
        print(f"concurrent    {args.processes} processes, {max(1, args.processes // 2)} nodes        "
              f"{rate:8.0f} /s total  ({len(all_ips)} IPs, {dupes} duplicates, wall {wall:.1f} s)")
        store.close()
        return 1 if dupes else 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
