"""IPAM against a real etcd: several allocating processes, exhaustion, a crashed CNI's leak."""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.ctl import ipam_cmd
from felixpy.datastore import keys
from felixpy.ipam import check as ipam_check
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.errors import PoolExhaustedError
from felixpy.ipam.block import Block

pytestmark = pytest.mark.etcd

WORKER = Path(__file__).with_name("ipam_worker.py")
REPO = Path(__file__).resolve().parents[2]
WORKER_TIMEOUT = 40.0


def add_pool(store: Any, name: str, cidr: str, block_size: int) -> None:
    store.create(
        keys.resource_key("ippools", name),
        {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
         "spec": {"cidr": cidr, "blockSize": block_size}},
    )


@pytest.fixture
def run_id() -> str:
    return "fxt" + secrets.token_hex(3)[:5]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    try:
        yield started
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)


def start_worker(procs: list[subprocess.Popen[str]], endpoint: str, node: str, count: int, prefix: str,
                 pool: str | None = None, hold_after: int = 0) -> subprocess.Popen[str]:
    argv = [sys.executable, str(WORKER), endpoint, "--node", node, "--count", str(count), "--prefix", prefix]
    if pool:
        argv += ["--pool", pool]
    if hold_after:
        argv += ["--hold-after", str(hold_after)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    procs.append(p)
    return p


def finish(p: subprocess.Popen[str]) -> dict[str, Any]:
    out, err = p.communicate(timeout=WORKER_TIMEOUT)
    assert p.returncode == 0, err
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert result["error"] is None, result["error"]
    return result


def run_workers(procs: list[subprocess.Popen[str]], endpoint: str, run_id: str, count: int,
                pool: str) -> dict[str, str]:
    workers = [start_worker(procs, endpoint, f"{run_id}-n{i % 2}", count, f"{run_id}-{pool}-w{i}", pool)
               for i in range(4)]
    handles: dict[str, str] = {}
    for w in workers:
        handles.update(finish(w)["handles"])
    return handles


def assert_consistent(store: Any, handles: dict[str, str]) -> None:
    ips = list(handles.values())
    assert len(ips) == len(set(ips)), "an address was handed out twice"
    ipam = IPAM(store)
    for handle, ip in handles.items():
        assignment = ipam.get_assignment(ip)
        assert assignment is not None and assignment.handle == handle
    report = ipam_check.check(store)
    assert report.problems == (), "\n".join(report.lines())


def test_four_processes_two_nodes_small_blocks_then_exhaustion(etcd_store: Any, etcd_endpoint: str,
                                                              run_id: str, procs: list[Any]) -> None:
    add_pool(etcd_store, "small", "10.77.0.0/24", 28)
    handles = run_workers(procs, etcd_endpoint, run_id, 60, "small")
    assert len(handles) == 240
    assert_consistent(etcd_store, handles)
    # Fill the rest from one node: it must claim what is left and then borrow from the other node.
    ipam = IPAM(etcd_store)
    node = f"{run_id}-n0"
    more = ipam.auto_assign(num=16, handle="fill", attrs={"node": node}, node=node, pools=["small"])
    assert len(set(more) | {ipaddress.IPv4Address(ip) for ip in handles.values()}) == 256
    with pytest.raises(PoolExhaustedError, match="pool exhausted"):
        ipam.auto_assign(handle="one-too-many", attrs={"node": node}, node=node)
    # Borrowing happened: some addresses belong to a node other than their block's owner.
    borrowed = 0
    for kv in etcd_store.list(keys.block_prefix(4))[0]:
        block = Block.from_json(kv.value)
        borrowed += sum(1 for a in block.allocated() if a.attrs.get("node") != block.host)
    assert borrowed > 0
    assert len(ipam.affine_blocks(f"{run_id}-n0")) + len(ipam.affine_blocks(f"{run_id}-n1")) == 16


def test_four_processes_500_each_from_a_20(etcd_store: Any, etcd_endpoint: str, run_id: str,
                                           procs: list[Any]) -> None:
    add_pool(etcd_store, "big", "10.78.0.0/20", 26)
    handles = run_workers(procs, etcd_endpoint, run_id, 500, "big")
    assert len(handles) == 2000
    assert_consistent(etcd_store, handles)


def felixctl_ipam(store: Any, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="felixctl")
    ipam_cmd.add_parser(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    code = ipam_cmd.run(parser.parse_args(["ipam", *argv]), store, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_killed_worker_leaks_and_release_cleans_up(etcd_store: Any, etcd_endpoint: str, run_id: str,
                                                   procs: list[Any]) -> None:
    add_pool(etcd_store, "p", "10.79.0.0/24", 26)
    steady = start_worker(procs, etcd_endpoint, f"{run_id}-n1", 30, f"{run_id}-steady")
    victim = start_worker(procs, etcd_endpoint, f"{run_id}-n0", 30, f"{run_id}-victim", hold_after=7)
    assert victim.stdout is not None
    line = victim.stdout.readline()  # bounded: the worker holds after 7 allocations
    assert line.startswith("HOLD "), line
    leaked_ip = line.split()[1]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    finish(steady)

    report = ipam_check.check(etcd_store)
    assert report.leaked_ips() == [leaked_ip]
    assert [p.kind for p in report.problems] == [ipam_check.LEAK]

    code, out, _ = felixctl_ipam(etcd_store, "check")
    assert code == 0 and out.splitlines()[-1] == "Check complete; found 1 problems."
    code, out, err = felixctl_ipam(etcd_store, "release", f"--ip={leaked_ip}")
    assert code == 0, err
    code, out, _ = felixctl_ipam(etcd_store, "check")
    assert out.splitlines()[-1] == "Check complete; found 0 problems."
    assert IPAM(etcd_store).get_assignment(leaked_ip) is None


def apply(store: Any, *docs: dict[str, Any]) -> None:
    from felixpy.model.store import apply_resources

    apply_resources(store, [dict(d) for d in docs], "apply")


def test_reservations_and_allowed_uses_hold_under_four_processes(etcd_store: Any, etcd_endpoint: str,
                                                                  run_id: str, procs: list[Any]) -> None:
    # The only workload pool has a quarter reserved; a LoadBalancer pool sits next to it.
    apply(etcd_store,
          {"kind": "IPPool", "metadata": {"name": "pods"}, "spec": {"cidr": "10.80.0.0/24", "blockSize": 28}},
          {"kind": "IPPool", "metadata": {"name": "lb"},
           "spec": {"cidr": "10.81.0.0/24", "blockSize": 28, "allowedUses": ["LoadBalancer"]}},
          {"kind": "IPReservation", "metadata": {"name": "r"},
           "spec": {"reservedCIDRs": ["10.80.0.0/27", "10.80.0.64/28", "10.80.0.130", "10.80.0.255"]}})
    workers = [start_worker(procs, etcd_endpoint, f"{run_id}-n{i % 2}", 47, f"{run_id}-w{i}") for i in range(4)]
    handles: dict[str, str] = {}
    for w in workers:
        handles.update(finish(w)["handles"])
    reserved = [ipaddress.ip_network(n) for n in ("10.80.0.0/27", "10.80.0.64/28", "10.80.0.130/32", "10.80.0.255/32")]
    ips = [ipaddress.IPv4Address(ip) for ip in handles.values()]
    assert len(ips) == 188 == 256 - 32 - 16 - 2 - 18  # every unreserved address but 18, each once
    assert not any(ip in net for ip in ips for net in reserved)
    assert all(ip in ipaddress.ip_network("10.80.0.0/24") for ip in ips)
    assert_consistent(etcd_store, handles)
    # Fully reserved block CIDRs were never claimed.
    claimed = {keys.parse_key(kv.key).name for kv in etcd_store.list(keys.block_prefix(4))[0]}
    assert not claimed & {"10.80.0.0/28", "10.80.0.16/28", "10.80.0.64/28"}
    ipam = IPAM(etcd_store, cache_ttl=0)
    node = f"{run_id}-n0"
    rest = ipam.auto_assign(num=18, handle="rest", attrs={"node": node}, node=node)
    assert len(set(rest) | set(ips)) == 206
    with pytest.raises(PoolExhaustedError):  # the LoadBalancer pool is still empty, and stays so
        ipam.auto_assign(handle="one-more", attrs={"node": node}, node=node)


def test_a_guarded_release_cannot_free_a_reassigned_address(etcd_store: Any) -> None:
    from felixpy.ipam.allocator import ReleaseOptions

    add_pool(etcd_store, "p", "10.82.0.0/24", 28)
    scanner, cni = IPAM(etcd_store, cache_ttl=0), IPAM(etcd_store, cache_ttl=0)
    (ip,) = cni.auto_assign(handle="old", attrs={"node": "n1"}, node="n1")
    seen = scanner.get_assignment(ip)
    assert seen is not None
    cni.release_by_handle("old")
    cni.assign_ip(ip, handle="new", attrs={"node": "n1"}, node="n1")  # same address, new allocation
    outcome = scanner.release([ReleaseOptions(ip, seen.handle, seen.sequence_number)])
    assert outcome.released == () and len(outcome.stale) == 1
    assert cni.ips_by_handle("new") == [ip]
    now = scanner.get_assignment(ip)
    assert now is not None and now.sequence_number != seen.sequence_number
    assert scanner.release([ReleaseOptions(ip, "new", now.sequence_number)]).released == (ip,)
