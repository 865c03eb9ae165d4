#!/usr/bin/env python3
"""CNI ADD/DEL latency of felixpy against the reference plugins, and the agent's memory.

Brings up a one-node felixpy-lab, then from inside the node's network namespace (where kubelet
would run) times N pod ADDs and DELs with:
  * felixpy: the static C plugin (cni-shim/, what install-cni ships) talking to the agent, which does
    IPAM (etcd), the veth pair, the WorkloadEndpoint and waits for the pod's route;
  * the same through the lean Python plugin (`python -IS`, for hosts that have Python);
  * felixpy-cni: the same through the pip console script (site-packages start-up);
  * baseline: the reference `ptp` + `host-local` plugins from containernetworking-plugins.
Also prints the agent's RSS idle and with N local pods.

`--family 4,6,dual` also times the static C plugin for IPv6-only and dual-stack pods in the same
run (the lab is then dual-stack, mode routes; the network config's ipam.assign_ipv4 /
assign_ipv6 pick the families), beside IPv4 and the same reference baseline.

    sudo .venv/bin/python benchmarks/bench_cni.py [--pods 100] [--family 4,6,dual]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BIN = os.path.dirname(sys.executable)


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
        if b"felixpy.node.main" in cmdline and f"/run/felixpy-lab/{lab_name}/".encode() in environ:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    raise SystemExit("agent process not found")


def run_plugin(plugin: str, command: str, cid: str, netns: str, conf: dict, ns: str, pod: str,
               cni_path: str) -> float:
    env = {
        "CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
        "CNI_PATH": cni_path,
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={pod}",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    started = time.perf_counter()
    out = subprocess.run([plugin], input=json.dumps(conf), env=env, capture_output=True, text=True)
    elapsed = (time.perf_counter() - started) * 1000
    if out.returncode != 0:
        raise SystemExit(f"{plugin} {command} failed: {out.stdout} {out.stderr}")
    return elapsed


def inner(args: argparse.Namespace) -> None:
    """Runs inside the node's netns: times each plugin on fresh pod namespaces."""
    from felixpy.cni.install import install_plugin

    tmp = tempfile.mkdtemp(prefix="fxbench-")
    lean = install_plugin(tmp)
    shim_dir = os.path.join(tmp, "shim")
    subprocess.run(["make", "-s", "-C", os.path.join(HERE, "..", "cni-shim"), f"BUILD_DIR={shim_dir}"],
                   check=True)
    felixpy_conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "felixpy",
                    "agent_socket": args.socket, "mtu": 0}
    family_confs = {
        family: {**felixpy_conf, "ipam": {"type": "calico-ipam", "assign_ipv4": str(family != "6").lower(),
                                          "assign_ipv6": str(family != "4").lower()}}
        for family in args.family.split(",")}
    ref_conf = {"cniVersion": "1.0.0", "name": "bench-ref", "type": "ptp", "mtu": 1500,
                "ipam": {"type": "host-local", "subnet": "10.99.0.0/16", "dataDir": os.path.join(tmp, "hl"),
                         "routes": [{"dst": "0.0.0.0/0"}]}}
    shim = os.path.join(shim_dir, "felixpy-cni")
    names = {"4": "IPv4", "6": "IPv6", "dual": "dual-stack"}
    runs = [
        ("felixpy (static C plugin)", shim, felixpy_conf, BIN),
        *((f"felixpy (static C plugin, {names[f]})", shim, conf, BIN) for f, conf in family_confs.items()
          if f != "4"),
        ("felixpy (lean -IS plugin)", lean, felixpy_conf, BIN),
        ("felixpy-cni (console script)", os.path.join(BIN, "felixpy-cni"), felixpy_conf, BIN),
        ("ptp + host-local (reference)", "/usr/lib/cni/ptp", ref_conf, "/usr/lib/cni"),
    ]
    results = {}
    # The pod namespaces were created by the outer process: `ip netns add` run in here would
    # mount them only in this private mount namespace (ip netns exec unshares one), invisible to
    # the agent.
    for label, plugin, conf, cni_path in runs:
        adds, dels = [], []
        for i in range(args.pods):
            netns = f"/run/netns/{args.prefix}{i}"
            cid = secrets.token_hex(32)
            adds.append(run_plugin(plugin, "ADD", cid, netns, conf, "bench", f"p{i}", cni_path))
            if label == "felixpy (static C plugin)" and i == args.pods - 1:
                results["rss_with_pods_kb"] = args.rss_probe()
            dels.append(cid)
        del_times = []
        for i, cid in enumerate(dels):
            del_times.append(run_plugin(plugin, "DEL", cid, f"/run/netns/{args.prefix}{i}", conf,
                                        "bench", f"p{i}", cni_path))
        results[label] = (adds, del_times)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({k: v for k, v in results.items()}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--lab", help=argparse.SUPPRESS)
    parser.add_argument("--family", default="4",
                        help="comma list of 4, 6, dual: pod address families to time (default 4)")
    args = parser.parse_args()
    families = args.family.split(",")
    if not families or any(f not in ("4", "6", "dual") for f in families):
        raise SystemExit(f"--family {args.family}: expected a comma list of 4, 6, dual")
    if args.inner:
        args.rss_probe = lambda: agent_rss_kb(args.lab)
        inner(args)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root (network namespaces)")
    name = "bench" + secrets.token_hex(2)
    dual = families != ["4"]
    print(f"bringing up lab {name} (1 node{', dual-stack' if dual else ''}) ...", flush=True)
    lab("up", "--name", name, "--nodes", "1", *(("--mode", "routes", "--ip-family", "dual") if dual else ()))
    try:
        time.sleep(2)
        rss_idle = agent_rss_kb(name)
        sock = f"/run/felixpy-lab/{name}/n1/cni.sock"
        for i in range(args.pods):
            subprocess.run(["ip", "netns", "add", f"{name}-bp{i}"], check=True)
        out = subprocess.run(
            ["ip", "netns", "exec", f"{name}-n1", sys.executable, os.path.abspath(__file__), "--inner",
             "--pods", str(args.pods), "--socket", sock, "--prefix", f"{name}-bp", "--lab", name,
             "--family", args.family],
            capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"benchmark failed: {out.stderr.strip()}")
        results = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        lab("down", "--name", name)  # also deletes the lab-named pod namespaces
        for i in range(args.pods):
            if os.path.exists(f"/run/netns/{name}-bp{i}"):
                subprocess.run(["ip", "netns", "del", f"{name}-bp{i}"])
    rss_pods = results.pop("rss_with_pods_kb")
    print(f"\nCNI latency over {args.pods} pods (ms), measured from the node's netns:")
    print(f"{'plugin':44} {'ADD p50':>8} {'ADD p99':>8} {'DEL p50':>8} {'DEL p99':>8}")
    for label, (adds, dels) in results.items():
        print(f"{label:44} {statistics.median(adds):8.1f} {percentile(adds, 99):8.1f} "
              f"{statistics.median(dels):8.1f} {percentile(dels, 99):8.1f}")
    print(f"\nagent RSS: idle {rss_idle / 1024:.1f} MB, with {args.pods} local pods {rss_pods / 1024:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
