#!/usr/bin/env python3
"""CNI ADD/DEL latency of felixpy against the reference plugins, whether a pod is reachable from
another node the moment ADD returns, where ADD's time goes, and the agent's memory.

Brings up a two-node felixpy-lab (BGP mode, the lab's default). From inside n1's network namespace
(where kubelet would run) it times N pod ADDs and then N DELs with:
  * felixpy (static C plugin): cni-shim/, what install-cni ships;
  * felixpy (lean -IS plugin): the same protocol in Python, for hosts that have Python;
  * felixpy-cni (console script): the same through the pip entry point (site-packages start-up);
  * ptp + host-local (reference): containernetworking-plugins, the baseline of the same run.
Right after each felixpy ADD returns, one ICMP echo is sent to the pod from n2's namespace (the
other node); the pod counts as reachable when that very first echo is answered (within 1 s), so a
route or policy programmed after ADD returned shows up as unreachable. The probes are sent from
a thread, so they never delay the next ADD.

The reference runs before and after the felixpy plugins; its two passes are pooled.
Printed: p50/p99 per plugin, the ratios to the baseline with the targets of issue #12 (ADD p50
<= 2x, p99 <= 3x, DEL p50 <= 1.5x), the fraction reachable, the median time of each stage of the
agent's ADD and DEL (from its log lines), a no-op iptables-nft-restore in n1's namespace (the
floor under each of the agent's filter-table writes), and the agent's RSS idle and with N local pods.

`--family 4,6,dual` also times the static C plugin for IPv6-only and dual-stack pods in the same
run (the lab is then dual-stack, still BGP mode: IPv6 blocks travel on IPv6 sessions; the network
config's ipam.assign_ipv4 / assign_ipv6 pick the families), beside IPv4 and the same reference baseline.
Every address a felixpy ADD returns is probed (ICMPv6 echo for IPv6), so a dual-stack pod counts
two probes.

    sudo .venv/bin/python benchmarks/bench_cni.py [--pods 60] [--family 4,6,dual]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)
REFERENCE = "ptp + host-local (reference)"
PRIMARY = "felixpy (static C plugin)"
TARGETS = {"ADD p50": 2.0, "ADD p99": 3.0, "DEL p50": 1.5}
PROBE_WAIT = 1.0  # seconds an echo may take to come back
FAMILY_NAMES = {"4": "IPv4", "6": "IPv6", "dual": "dual-stack"}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def lab(*args: str) -> str:
    out = subprocess.run([os.path.join(BIN, "felixpy-lab"), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"felixpy-lab {' '.join(args)} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout


def agent_rss_kb(lab_name: str) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            environ = open(f"/proc/{pid}/environ", "rb").read()
        except OSError:
            continue
        if b"felixpy.node.main" in cmdline and f"/run/felixpy-lab/{lab_name}/n1".encode() in environ:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    raise SystemExit("agent process not found")


# -- inside n1's namespace ------------------------------------------------------------------------

class Prober:
    """ICMP and ICMPv6 echoes from the other node's namespace; remembers which were answered in time."""

    def __init__(self, netns_path: str) -> None:
        from felixpy.kernel import netns

        self.sock = netns.run_in_netns(
            netns_path, lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
        # The kernel fills in an ICMPv6 checksum itself, and hands over no IPv6 header.
        self.sock6 = netns.run_in_netns(
            netns_path, lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6))
        self.ident = os.getpid() & 0xFFFF
        self.sent: dict[int, float] = {}
        self.answered: dict[int, float] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._receive, args=(sock, v6), daemon=True)
                         for sock, v6 in ((self.sock, False), (self.sock6, True))]
        for sock, thread in zip((self.sock, self.sock6), self._threads):
            sock.settimeout(0.2)
            thread.start()

    @staticmethod
    def _checksum(data: bytes) -> int:
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    def send(self, seq: int, ip: str) -> None:
        if ":" in ip:
            self.sent[seq] = time.monotonic()
            self.sock6.sendto(struct.pack("!BBHHH", 128, 0, 0, self.ident, seq) + b"felixpy!", (ip, 0))
            return
        header = struct.pack("!BBHHH", 8, 0, 0, self.ident, seq) + b"felixpy!"
        packet = header[:2] + struct.pack("!H", self._checksum(header)) + header[4:]
        self.sent[seq] = time.monotonic()
        self.sock.sendto(packet, (ip, 0))

    def _receive(self, sock: socket.socket, v6: bool) -> None:
        reply = 129 if v6 else 0
        while not self._stop.is_set():
            try:
                data = sock.recv(2048)
            except OSError:
                continue
            offset = 0 if v6 else (data[0] & 0x0F) * 4
            if len(data) < offset + 8:
                continue
            kind, _code, _sum, ident, seq = struct.unpack_from("!BBHHH", data, offset)
            if kind == reply and ident == self.ident and seq not in self.answered:
                self.answered[seq] = time.monotonic()

    def reachable(self, seqs: list[int]) -> tuple[int, list[float]]:
        """(how many of seqs were answered within PROBE_WAIT, their round trips in ms)."""
        deadline = max(self.sent[s] for s in seqs) + PROBE_WAIT
        while time.monotonic() < deadline and not all(s in self.answered for s in seqs):
            time.sleep(0.01)
        rtts = [(self.answered[s] - self.sent[s]) * 1000 for s in seqs
                if s in self.answered and self.answered[s] - self.sent[s] <= PROBE_WAIT]
        return len(rtts), rtts

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        self.sock.close()
        self.sock6.close()


def run_plugin(plugin: str, command: str, cid: str, netns: str, conf: dict[str, Any], pod: str,
               cni_path: str) -> tuple[float, dict[str, Any]]:
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path, "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={pod}",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    started = time.perf_counter()
    out = subprocess.run([plugin], input=json.dumps(conf), env=env, capture_output=True, text=True)
    elapsed = (time.perf_counter() - started) * 1000
    if out.returncode != 0:
        raise SystemExit(f"{plugin} {command} failed: {out.stdout} {out.stderr}")
    return elapsed, (json.loads(out.stdout) if out.stdout.strip() else {})


def restore_floor(times: int = 15) -> float:
    """Median ms of a no-op `iptables-nft-restore --noflush` here (n1's namespace, the pods' chains
    in place): what the agent's apply for a new pod pays at least for its filter-table write."""
    took = []
    for _ in range(times):
        started = time.perf_counter()
        subprocess.run(["iptables-nft-restore", "--noflush", "--wait"], input="*filter\nCOMMIT\n", text=True,
                       check=True)
        took.append((time.perf_counter() - started) * 1000)
    return statistics.median(took)


def inner(args: argparse.Namespace) -> None:
    """Runs inside n1's netns: times each plugin on fresh pod namespaces."""
    from felixpy.cni.install import install_plugin

    tmp = tempfile.mkdtemp(prefix="fxbench-")
    lean = install_plugin(tmp)
    shim_dir = os.path.join(tmp, "shim")
    subprocess.run(["make", "-s", "-C", os.path.join(HERE, "..", "cni-shim"), f"BUILD_DIR={shim_dir}"],
                   check=True)
    felixpy_conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "felixpy",
                    "agent_socket": args.socket, "mtu": 0}
    # One more static C plugin run per extra family, its network config asking for those families.
    family_runs = [
        (f"{PRIMARY[:-1]}, {FAMILY_NAMES[f]})", os.path.join(shim_dir, "felixpy-cni"),
         {**felixpy_conf, "ipam": {"type": "calico-ipam", "assign_ipv4": str(f != "6").lower(),
                                   "assign_ipv6": str(f != "4").lower()}}, BIN)
        for f in args.family.split(",") if f != "4"]
    ref_conf = {"cniVersion": "1.0.0", "name": "bench-ref", "type": "ptp", "mtu": 1500,
                "ipam": {"type": "host-local", "subnet": "10.99.0.0/16", "dataDir": os.path.join(tmp, "hl"),
                         "routes": [{"dst": "0.0.0.0/0"}]}}
    reference = (REFERENCE, "/usr/lib/cni/ptp", ref_conf, "/usr/lib/cni")
    # The reference runs first and last and its two passes are pooled: on a machine whose load
    # drifts during the run, the baseline then brackets the felixpy plugins instead of
    # catching only one end of the drift (each pass's p50 is printed too).
    runs = [
        reference,
        (PRIMARY, os.path.join(shim_dir, "felixpy-cni"), felixpy_conf, BIN),  # runs[1]: also warms up
        ("felixpy (lean -IS plugin)", lean, felixpy_conf, BIN),
        ("felixpy-cni (console script)", os.path.join(BIN, "felixpy-cni"), felixpy_conf, BIN),
        *family_runs,
        reference,
    ]
    prober = Prober(args.probe_netns)
    # Warm up: the node's first block (of each family timed) is claimed and announced to n2
    # before anything is timed.
    warm = f"/run/netns/{args.prefix}{args.pods}"
    warm_conf = felixpy_conf if not family_runs else {
        **felixpy_conf, "ipam": {"type": "calico-ipam", "assign_ipv4": "true", "assign_ipv6": "true"}}
    run_plugin(runs[1][1], "ADD", "warm" * 16, warm, warm_conf, "warm", BIN)
    results: dict[str, Any] = {}
    for r, (label, plugin, conf, cni_path) in enumerate(runs):
        adds, dels, seqs, cids = [], [], [], []
        for i in range(args.pods):
            cid = secrets.token_hex(32)
            took, result = run_plugin(plugin, "ADD", cid, f"/run/netns/{args.prefix}{i}", conf, f"p{i}", cni_path)
            if label != REFERENCE:
                for k, entry in enumerate(result["ips"]):  # every family the pod got
                    seq = r * 2000 + i * 2 + k
                    prober.send(seq, entry["address"].split("/")[0])
                    seqs.append(seq)
            adds.append(took)
            cids.append(cid)
            if label == PRIMARY and i == args.pods - 1:
                results["rss_with_pods_kb"] = agent_rss_kb(args.lab)
                results["restore_floor_ms"] = restore_floor()
        reachable, rtts = prober.reachable(seqs) if seqs else (0, [])
        for i, cid in enumerate(cids):
            dels.append(run_plugin(plugin, "DEL", cid, f"/run/netns/{args.prefix}{i}", conf, f"p{i}", cni_path)[0])
        done = results.setdefault(label, {"adds": [], "dels": [], "probed": 0, "reachable": 0, "rtts": [],
                                          "passes": []})
        done["adds"] += adds
        done["dels"] += dels
        done["probed"] += len(seqs)
        done["reachable"] += reachable
        done["rtts"] += rtts
        done["passes"].append([statistics.median(adds), statistics.median(dels)])
    run_plugin(runs[1][1], "DEL", "warm" * 16, warm, warm_conf, "warm", BIN)
    prober.close()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results))


# -- outside --------------------------------------------------------------------------------------

def stage_medians(log_path: str, command: str) -> dict[str, float]:
    """Median of each stage the agent logged for command ('cni ADD ok ... ipam=1.23ms ...')."""
    stages: dict[str, list[float]] = {}
    pattern = re.compile(rf"cni {command} ok .*? seconds=([0-9.]+)((?: \w+=[0-9.]+ms)*)")
    with open(log_path, errors="replace") as f:
        for line in f:
            match = pattern.search(line)
            if not match or "pod=bench/p" not in line:
                continue
            stages.setdefault("total", []).append(float(match.group(1)) * 1000)
            for name, ms in re.findall(r"(\w+)=([0-9.]+)ms", match.group(2)):
                stages.setdefault(name, []).append(float(ms))
    return {name: statistics.median(values) for name, values in stages.items()}


def report(results: dict[str, Any], pods: int, rss_idle: int, rss_pods: int, log_path: str,
           restore_floor_ms: float) -> None:
    print(f"\nCNI latency over {pods} pods (ms), measured from n1's netns:")
    print(f"{'plugin':44} {'ADD p50':>8} {'ADD p99':>8} {'DEL p50':>8} {'DEL p99':>8}  reachable at ADD return")
    for label, r in results.items():
        reach = (f"{r['reachable']}/{r['probed']} (first echo rtt p50 {statistics.median(r['rtts']):.1f} ms)"
                 if r["probed"] and r["rtts"] else (f"0/{r['probed']}" if r["probed"] else "-"))
        print(f"{label:44} {statistics.median(r['adds']):8.1f} {percentile(r['adds'], 99):8.1f} "
              f"{statistics.median(r['dels']):8.1f} {percentile(r['dels'], 99):8.1f}  {reach}")
    ref = results[REFERENCE]
    print(f"{REFERENCE} by pass (before, after felixpy): "
          + ", ".join(f"ADD p50 {a:.1f} / DEL p50 {d:.1f}" for a, d in ref["passes"]))
    base = {"ADD p50": statistics.median(ref["adds"]), "ADD p99": percentile(ref["adds"], 99),
            "DEL p50": statistics.median(ref["dels"])}
    print(f"\nratio to {REFERENCE} (target in brackets):")
    for label, r in results.items():
        if label == REFERENCE:
            continue
        got = {"ADD p50": statistics.median(r["adds"]), "ADD p99": percentile(r["adds"], 99),
               "DEL p50": statistics.median(r["dels"])}
        cells = []
        for what, target in TARGETS.items():
            ratio = got[what] / base[what]
            cells.append(f"{what} {ratio:.2f}x (<= {target:g}x {'ok' if ratio <= target else 'MISSED'})")
        print(f"  {label:44} " + "  ".join(cells))
    for command in ("ADD", "DEL"):
        medians = stage_medians(log_path, command)
        if medians:
            print(f"agent {command} stages, median ms over every felixpy {command}: "
                  + "  ".join(f"{name}={ms:.2f}" for name, ms in medians.items()))
    print(f"a no-op iptables-nft-restore in n1's namespace with {pods} pods (the floor of each of the "
          f"agent's filter writes): {restore_floor_ms:.1f} ms")
    print(f"\nagent RSS: idle {rss_idle / 1024:.1f} MB, with {pods} local pods {rss_pods / 1024:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=60)
    parser.add_argument("--agent-log", help="keep a copy of n1's agent log here (for profiling; "
                        "FELIX_LOGSEVERITYSCREEN=DEBUG adds each apply's duration)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--lab", help=argparse.SUPPRESS)
    parser.add_argument("--probe-netns", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="4",
                        help="comma list of 4, 6, dual: pod address families to time (default 4)")
    args = parser.parse_args()
    families = args.family.split(",")
    if not families or any(f not in FAMILY_NAMES for f in families):
        raise SystemExit(f"--family {args.family}: expected a comma list of 4, 6, dual")
    if args.inner:
        inner(args)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces)")
    name = "bench" + secrets.token_hex(2)
    dual = families != ["4"]
    print(f"bringing up lab {name} (2 nodes, mode bgp{', dual-stack' if dual else ''}) ...", flush=True)
    lab("up", "--name", name, "--nodes", "2", *(("--ip-family", "dual") if dual else ()))
    try:
        # The namespace's profile (kns.bench, allow all): without it a pod's policy drops everything.
        lab("ns", "add", "bench", "--name", name)
        rss_idle = agent_rss_kb(name)
        sock = f"/run/felixpy-lab/{name}/n1/cni.sock"
        for i in range(args.pods + 1):  # + the warm-up pod
            subprocess.run(["ip", "netns", "add", f"{name}-bp{i}"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", f"{name}-n1", sys.executable, os.path.abspath(__file__), "--inner",
             "--pods", str(args.pods), "--socket", sock, "--prefix", f"{name}-bp", "--lab", name,
             "--probe-netns", f"/run/netns/{name}-n2", "--family", args.family],
            capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"benchmark failed: {out.stderr.strip()}")
        results = json.loads(out.stdout.strip().splitlines()[-1])
        log_copy = tempfile.NamedTemporaryFile(prefix="fxbench-agent-", suffix=".log", delete=False).name
        shutil.copy(f"/run/felixpy-lab/{name}/n1/agent.log", log_copy)
        if args.agent_log:
            shutil.copy(log_copy, args.agent_log)
    finally:
        lab("down", "--name", name)  # also deletes the lab-named pod namespaces
        for i in range(args.pods + 1):
            if os.path.exists(f"/run/netns/{name}-bp{i}"):
                subprocess.run(["ip", "netns", "del", f"{name}-bp{i}"])
    rss_pods = results.pop("rss_with_pods_kb")
    restore_floor_ms = results.pop("restore_floor_ms")
    try:
        report(results, args.pods, rss_idle, rss_pods, log_copy, restore_floor_ms)
    finally:
        os.unlink(log_copy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
