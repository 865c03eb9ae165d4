#!/usr/bin/env python3
"""BGP convergence: a new block's claim on node A → the route in node B's kernel, p50 / p99.

felixpy: a 2-node felixpy-lab in mode bgp. Each trial writes a confirmed block affinity for n1
to etcd (what IPAM's claim does) and times until `ip monitor route` in n2's namespace shows the
route: etcd watch → n1's agent → its BGP controller → sidecar → ExaBGP → TCP → n2's ExaBGP →
sidecar → n2's agent (RIB, route driver) → kernel. The affinity is then deleted and the withdraw
timed the same way.

Reflector: the same trials in a 2-node lab with `--route-reflectors 2` (mesh off, Calico's
recipe): n1's ExaBGP → BIRD reflectors rr1 and rr2 → n2's ExaBGP; the first reflected copy to
reach n2 installs the route.

Reflector node: the same 2-node lab made a reflector cluster with Calico's recipe through felixctl
(n1 gets a cluster ID and the route-reflector=true label, a BGPPeer peers every node with it, the
mesh is turned off): n1 runs pods and reflects, its BIRD holding the session to n2 and its ExaBGP
a local session to that BIRD. Timed both ways: a block of n1 (agent → ExaBGP → BIRD → n2) and a
block of n2 (n2 → BIRD → n1's ExaBGP → n1's agent → kernel).

Anchor, same run, same machine: two BIRD 2 speakers in their own namespaces (iBGP over a veth);
A's block appears as a static route (static include file re-rendered + `birdc configure`, Calico's
confd path minus confd) and B's kernel protocol installs it.

IPv6 (`--family 4,6`): the felixpy labs run dual-stack (`--ip-family dual`; `--family 6` alone:
IPv6-only) and every trial also claims an IPv6 /122 for n1, carried on the IPv6 sessions (n1's
IPv6 next hop), timed the same way beside the IPv4 one.

    sudo .venv/bin/python benchmarks/bench_bgp.py [--trials 50] [--family 4,6] [--no-reflector] [--no-reflector-node]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
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
from typing import Any

from felixpy.datastore import keys

BIN = os.path.dirname(sys.executable)
# The lab's datastore is reached from inside its fabric netns, which the bench process enters
# (felixpy.lab.pods.open_datastore); every later `felixpy-lab up` must start from the host's.
HOST_NETNS = os.open("/proc/self/ns/net", os.O_RDONLY)


def back_to_host_netns() -> None:
    import ctypes

    from felixpy.lab import pods

    if ctypes.CDLL(None, use_errno=True).setns(HOST_NETNS, 0x40000000) != 0:  # CLONE_NEWNET
        raise OSError(ctypes.get_errno(), "setns back to the host netns")
    pods._entered_fabric = None


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


def sessions_up(lab: str, node: str, expected: int) -> bool:
    """The node's status file lists `expected` peers, all Established."""
    try:
        with open(f"/run/felixpy-lab/{lab}/{node}/lib/bgp-status.json", encoding="utf-8") as f:
            peers = json.load(f).get("peers", [])
    except (OSError, ValueError):
        return False
    return len(peers) == expected and all(p.get("state") == "Established" for p in peers)


POOL6 = ipaddress.IPv6Network("fd00:10:244::/64")  # the lab's IPv6 pool


def _cidr(family: int, base: int, i: int) -> str:
    if family == 4:
        return f"10.244.{base + i // 4}.{(i % 4) * 64}/26"
    return str(ipaddress.IPv6Network((int(POOL6.network_address) + (base * 1024 + i) * 64, 122)))


def one_trial(store: Any, monitor: RouteMonitor, owner: str, cidr: str, spacing: float) -> tuple[float, float]:
    """Claim `cidr` for `owner` (a confirmed affinity, as IPAM writes it), time until the route is in
    the monitored kernel; then release it and time until the route is gone: (announce, withdraw)."""
    key = keys.affinity_key(owner, cidr)
    monitor.drain()
    start = time.monotonic()
    store.create(key, {"state": "confirmed", "deleted": False})
    announced = monitor.wait(cidr, deleted=False) - start
    time.sleep(spacing)
    monitor.drain()
    start = time.monotonic()
    store.delete(key)
    withdrawn = monitor.wait(cidr, deleted=True) - start
    time.sleep(spacing)
    return announced, withdrawn


def bench_felixpy(trials: int, spacing: float, reflectors: int = 0,
                  families: tuple[int, ...] = (4,)) -> dict[int, tuple[list[float], list[float]]]:
    """Trials in a 2-node lab: a mesh, or (reflectors > 0) mesh off and that many BIRD reflectors.
    family → (announce, withdraw) times."""
    lab = "bgpb" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "felixpy.lab.cli"]
    monitor = None
    ip_family = {(4,): "ipv4", (6,): "ipv6"}.get(families, "dual")
    back_to_host_netns()
    try:
        up = subprocess.run([*cli, "up", "--nodes", "2", "--mode", "bgp", "--name", lab, "--ip-family", ip_family,
                             *(["--route-reflectors", str(reflectors)] if reflectors else [])],
                            capture_output=True, text=True, timeout=180, check=False)
        if up.returncode != 0:
            raise SystemExit(f"felixpy-lab up failed: {up.stderr.strip()[-300:]}")
        from felixpy.lab import pods

        store = pods.open_datastore(lab)
        deadline = time.monotonic() + 60
        # Mesh: one peer each; with reflectors: one session per reflector, none between the nodes
        # (per family).
        while not all(sessions_up(lab, node, (reflectors or 1) * len(families)) for node in ("n1", "n2")):
            if time.monotonic() > deadline:
                raise SystemExit("sessions did not come up")
            time.sleep(0.2)
        monitor = RouteMonitor(f"{lab}-n2")
        times: dict[int, tuple[list[float], list[float]]] = {f: ([], []) for f in families}
        # A different third octet per setup so no trial can see a leftover of another.
        base = 200 if not reflectors else 100
        for i in range(trials):
            for family in families:  # interleaved: both families see the same load
                announced, withdrawn = one_trial(store, monitor, "n1", _cidr(family, base, i), spacing)
                times[family][0].append(announced)
                times[family][1].append(withdrawn)
        store.close()
        return times
    finally:
        if monitor is not None:
            monitor.stop()
        subprocess.run([*cli, "down", "--name", lab], capture_output=True, timeout=60)


def reflector_node_ready(lab: str) -> bool:
    """n1 reflects (BIRD's session to n2 and ExaBGP's local one Established), n2 peers with n1."""
    try:
        with open(f"/run/felixpy-lab/{lab}/n1/lib/bgp-status.json", encoding="utf-8") as f:
            n1 = json.load(f)
    except (OSError, ValueError):
        return False
    agent = n1.get("agentSession") or {}
    return (bool(n1.get("routeReflector")) and agent.get("state") == "Established"
            and sessions_up(lab, "n1", 1) and sessions_up(lab, "n2", 1))


def bench_reflector_node(trials: int, spacing: float) -> dict[str, tuple[list[float], list[float]]]:
    """Trials in a 2-node lab where n1 is a reflector that runs pods: n1's blocks to n2, n2's to n1."""
    lab = "bgpn" + secrets.token_hex(2)
    cli = [sys.executable, "-m", "felixpy.lab.cli"]
    monitors: dict[str, RouteMonitor] = {}
    work = tempfile.mkdtemp(prefix="bench-bgp-")

    def run(*args: str) -> None:
        # --name is an option of the subcommand, before exec's `--`.
        cut = args.index("--") if "--" in args else len(args)
        argv = [*cli, *args[:cut], "--name", lab, *args[cut:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)
        if done.returncode != 0:
            raise SystemExit(f"felixpy-lab {args[0]} failed: {done.stderr.strip()[-300:]}")

    back_to_host_netns()
    try:
        run("up", "--nodes", "2", "--mode", "bgp")
        # Calico's recipe, through felixctl on a node (calicoctl's verbs).
        felixctl = ("exec", "n1", "--", "felixctl")
        run(*felixctl, "patch", "node", "n1", "-p",
            '{"spec":{"bgp":{"routeReflectorClusterID":"244.0.0.1"}}}')
        run(*felixctl, "label", "node", "n1", "route-reflector=true")
        peer = f"{work}/peer.yaml"
        with open(peer, "w", encoding="utf-8") as f:
            f.write("apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: peer-with-route-reflectors}\n"
                    "spec: {nodeSelector: all(), peerSelector: route-reflector == 'true'}\n")
        run("apply", "-f", peer)
        run(*felixctl, "patch", "bgpconfiguration", "default", "-p",
            '{"spec":{"nodeToNodeMeshEnabled":false}}')
        deadline = time.monotonic() + 60
        while not reflector_node_ready(lab):
            if time.monotonic() > deadline:
                raise SystemExit("n1 did not become a reflector with its sessions up")
            time.sleep(0.2)
        from felixpy.lab import pods

        store = pods.open_datastore(lab)
        monitors = {node: RouteMonitor(f"{lab}-{node}") for node in ("n1", "n2")}
        results: dict[str, tuple[list[float], list[float]]] = {}
        for owner, other, octet in (("n1", "n2", 150), ("n2", "n1", 170)):
            announce, withdraw = [], []
            monitor = monitors[other]
            for i in range(trials):
                announced, withdrawn = one_trial(store, monitor, owner, _cidr(4, octet, i), spacing)
                announce.append(announced)
                withdraw.append(withdrawn)
            results[owner] = (announce, withdraw)
        store.close()
        return results
    finally:
        for monitor in monitors.values():
            monitor.stop()
        subprocess.run([*cli, "down", "--name", lab], capture_output=True, timeout=60)
        shutil.rmtree(work, ignore_errors=True)


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


BIRD_RR_CONF = """
router id {me};
protocol device {{ scan time 10; }}
protocol bgp client_a {{
  local {me} as 64512; neighbor {a} as 64512; direct; rr client; rr cluster id 244.0.0.1;
  ipv4 {{ import all; export all; next hop keep; }};
}}
protocol bgp client_b {{
  local {me} as 64512; neighbor {b} as 64512; direct; rr client; rr cluster id 244.0.0.1;
  ipv4 {{ import all; export all; next hop keep; }};
}}
"""


def bird_established(ctl: str) -> bool:
    out = subprocess.run(["birdc", "-s", ctl, "show", "protocols"], capture_output=True, text=True,
                         check=False).stdout
    return "Established" in out


def bench_bird(trials: int, spacing: float, reflector: bool = False) -> tuple[list[float], list[float]]:
    """BIRD A -> BIRD B directly, or (reflector) A -> BIRD reflector R -> B on one bridge."""
    prefix = "bgb" + secrets.token_hex(2)
    a, b, r = prefix + "a", prefix + "b", prefix + "r"
    ip = {a: "192.0.2.101", b: "192.0.2.102", r: "192.0.2.103"}
    work = tempfile.mkdtemp(prefix="bench-bgp-")
    procs: list[subprocess.Popen[bytes]] = []
    namespaces: list[str] = []
    monitor = None
    try:
        for ns in (a, b, r) if reflector else (a, b):
            sh("ip", "netns", "add", ns)
            namespaces.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        if reflector:
            # R holds the bridge: A, B and R share one subnet, so the reflected next hop (A) is
            # directly reachable from B, as on a cluster's node network.
            sh("ip", "-n", r, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", r, "addr", "add", f"{ip[r]}/24", "dev", "br0")
            sh("ip", "-n", r, "link", "set", "br0", "up")
            for ns, port in ((a, "pa"), (b, "pb")):
                sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", r)
                sh("ip", "-n", r, "link", "set", port, "master", "br0", "up")
        else:
            sh("ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
        for ns in (a, b):
            sh("ip", "-n", ns, "addr", "add", f"{ip[ns]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
        ctl = {}
        for ns, other in ((a, ip[r] if reflector else ip[b]), (b, ip[r] if reflector else ip[a])):
            static = f"{work}/{ns}.static"
            open(static, "w").close()
            with open(f"{work}/{ns}.conf", "w") as f:
                f.write(BIRD_CONF.format(me=ip[ns], other=other, static=static))
        if reflector:
            with open(f"{work}/{r}.conf", "w") as f:
                f.write(BIRD_RR_CONF.format(me=ip[r], a=ip[a], b=ip[b]))
        for ns in namespaces:
            ctl[ns] = f"{work}/{ns}.ctl"
            procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "bird", "-f", "-c", f"{work}/{ns}.conf",
                                           "-s", ctl[ns]], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 30
        while not (bird_established(ctl[a]) and bird_established(ctl[b])):
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
        for ns in namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--spacing", type=float, default=0.1, help="seconds between steps")
    parser.add_argument("--reflectors", type=int, default=2,
                        help="BIRD route reflectors for the reflector run (default 2)")
    parser.add_argument("--no-reflector", action="store_true", help="skip the run through reflectors")
    parser.add_argument("--no-reflector-node", action="store_true",
                        help="skip the run with a reflector node that runs pods")
    parser.add_argument("--family", default="4",
                        help="address families of the felixpy runs: 4, 6 or 4,6 (dual-stack labs)")
    args = parser.parse_args()
    try:
        families = tuple(sorted({int(f) for f in args.family.split(",")}))
        if not families or not set(families) <= {4, 6}:
            raise ValueError
    except ValueError:
        print(f"bench_bgp: --family {args.family}: expected 4, 6 or 4,6", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench_bgp: needs root (network namespaces)", file=sys.stderr)
        return 1
    have_bird = shutil.which("bird") is not None
    bird = bench_bird(args.trials, args.spacing) if have_bird else None
    bird_rr = bench_bird(args.trials, args.spacing, reflector=True) if have_bird and not args.no_reflector else None
    mesh = bench_felixpy(args.trials, args.spacing, families=families)
    announce, withdraw = mesh[families[0]]
    rr_runs = (None if args.no_reflector
               else bench_felixpy(args.trials, args.spacing, reflectors=args.reflectors, families=families))
    rr = rr_runs[families[0]] if rr_runs else None
    # The reflector-node run stays IPv4 (its IPv6 loopback session is exercised by the e2e test).
    rr_node = None if args.no_reflector_node else bench_reflector_node(args.trials, args.spacing)
    print(f"BGP convergence, block claim on A -> route in B's kernel ({args.trials} trials)")
    for family in families:
        tag = "" if family == 4 else " IPv6"
        report("felixpy mesh (etcd -> agent -> ExaBGP -> ExaBGP -> agent)" if family == 4
               else "felixpy mesh IPv6 (over the IPv6 sessions)", mesh[family][0])
        report(f"felixpy mesh{tag} withdraw (affinity deleted)", mesh[family][1])
        if rr_runs is not None:
            report(f"felixpy{tag} via {args.reflectors} BIRD reflectors (mesh off)", rr_runs[family][0])
            report(f"felixpy{tag} via reflectors, withdraw", rr_runs[family][1])
    if rr_node is not None:
        report("reflector node n1 -> n2 (ExaBGP -> local BIRD -> n2)", rr_node["n1"][0])
        report("reflector node n1 -> n2, withdraw", rr_node["n1"][1])
        report("n2 -> reflector node n1 (BIRD -> ExaBGP -> kernel)", rr_node["n2"][0])
        report("n2 -> reflector node n1, withdraw", rr_node["n2"][1])
    if bird is not None:
        report("BIRD 2 -> BIRD 2 (static + birdc configure)", bird[0])
        report("BIRD 2 withdraw", bird[1])
    if bird_rr is not None:
        report("BIRD 2 -> BIRD reflector -> BIRD 2", bird_rr[0])
        report("BIRD 2 via reflector, withdraw", bird_rr[1])
    if bird is not None:
        anchor = statistics.median(bird[0])
        extra = [("IPv6 mesh", mesh[6][0]), ("IPv6 reflector", rr_runs[6][0] if rr_runs else None)] \
            if 6 in families and families != (6,) else []
        for label, values in (("mesh", announce), ("reflector", rr[0] if rr else None), *extra,
                              ("reflector node n1 -> n2", rr_node["n1"][0] if rr_node else None),
                              ("n2 -> reflector node n1", rr_node["n2"][0] if rr_node else None)):
            if values is None:
                continue
            p50 = statistics.median(values)
            verdict = "met" if p50 <= 0.020 and p50 <= 3 * anchor else "MISSED"
            print(f"felixpy {label} p50 / BIRD p50 = {p50 / anchor:.1f}x "
                  f"(target <= 3x and p50 <= 20 ms: {verdict})")
    if bird_rr is not None and rr is not None:
        # Like for like: both paths have the reflector hop.
        print(f"felixpy reflector p50 / BIRD-via-reflector p50 = "
              f"{statistics.median(rr[0]) / statistics.median(bird_rr[0]):.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
