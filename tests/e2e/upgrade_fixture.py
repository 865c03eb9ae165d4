"""The datastore a previous release wrote, as test data: make it once, load it into a fresh lab.

    # once, with the previous release's lab (its own worktree and venv):
    git worktree add /tmp/prev be5aee6 && python3 -m venv /tmp/prev/.venv && /tmp/prev/.venv/bin/pip install -e /tmp/prev
    python -m tests.e2e.upgrade_fixture make --release /tmp/prev --out tests/data/upgrade/be5aee6-etcd.json
    # in a test, inside the lab's fabric namespace (where etcd listens):
    python -m tests.e2e.upgrade_fixture load tests/data/upgrade/be5aee6-etcd.json

`make` brings up a 2-node bgp lab from the release's checkout (its venv's Python, run in its
directory, so that release's felixpy-lab, agents and CNI plugin), adds a namespace, two pods, a Kubernetes NetworkPolicy, a Calico
NetworkPolicy and a GlobalNetworkPolicy, dumps every key under /calico/ with its value exactly as
stored, and tears the lab down. `load` writes those keys into an etcd that holds no /calico/ key.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
from typing import Any

from felixpy.lab import topology

NAMESPACE = "upg"
PODS = {"upg/web": ("n1", "app=web"), "upg/db": ("n2", "app=db")}
POLICIES = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: upg}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 80, protocol: TCP}]
---
apiVersion: projectcalico.org/v3
kind: NetworkPolicy
metadata: {name: web-egress, namespace: upg}
spec:
  selector: app == 'web'
  order: 100
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination: {ports: [80]}
  - action: Allow
    protocol: ICMP
---
apiVersion: projectcalico.org/v3
kind: GlobalNetworkPolicy
metadata: {name: deny-81}
spec:
  selector: app != 'db'  # db's ingress is the Kubernetes policy's alone (a Pass here would skip it)
  order: 10
  types: [Ingress]
  ingress:
  - action: Deny
    protocol: TCP
    destination: {ports: [81]}
  - action: Pass
"""


def _client(endpoint: str) -> Any:
    import etcd3

    host, _, port = endpoint.removeprefix("http://").partition(":")
    return etcd3.client(host=host, port=int(port or 2379), timeout=10)


def dump(endpoint: str) -> dict[str, str]:
    client = _client(endpoint)
    try:
        return {meta.key.decode(): value.decode() for value, meta in client.get_prefix("/calico/")}
    finally:
        client.close()


def load(endpoint: str, data: dict[str, str]) -> None:
    client = _client(endpoint)
    try:
        if list(client.get_prefix("/calico/", keys_only=True)):
            raise SystemExit("upgrade_fixture: etcd already holds /calico/ keys")
        for key, value in sorted(data.items()):
            client.put(key, value)
    finally:
        client.close()


def make(release: str, out: str) -> None:
    name = "upg" + secrets.token_hex(2)
    lab_python = f"{release}/.venv/bin/python"
    # -m and -c put the working directory first on sys.path: run in the release's checkout, with
    # nothing of this one in the environment, or this checkout's felixpy is what runs.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def cli(*args: str) -> str:
        done = subprocess.run([lab_python, "-m", "felixpy.lab.cli", *args, "--name", name],
                              capture_output=True, text=True, timeout=180, cwd=release, env=env)
        if done.returncode != 0:
            raise SystemExit(f"felixpy-lab {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    try:
        cli("up", "--nodes", "2", "--mode", "bgp")
        cli("ns", "add", NAMESPACE, "--labels", "team=a")
        for ref, (node, labels) in PODS.items():
            cli("pod", "add", ref, "--node", node, "--labels", labels, "--serve", "tcp:80,tcp:81")
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
            f.write(POLICIES)
            f.flush()
            cli("apply", "-f", f.name)
        where = subprocess.run([lab_python, "-c", "import felixpy; print(felixpy.__file__)"], cwd=release, env=env,
                               capture_output=True, text=True, timeout=30).stdout.strip()
        if not where.startswith(os.path.realpath(release)) and not where.startswith(release):
            raise SystemExit(f"the release's Python imports felixpy from {where}, not from {release}")
        commit = subprocess.run(["git", "-C", release, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=30).stdout.strip()
        done = subprocess.run(["ip", "netns", "exec", topology.fabric_netns(name), sys.executable, "-m",
                               "tests.e2e.upgrade_fixture", "dump"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "ETCD_ENDPOINTS": topology.ETCD_ENDPOINT})
        if done.returncode != 0:
            raise SystemExit(f"dump: {done.stderr.strip()}")
        keys = json.loads(done.stdout)
        with open(out, "w") as f:
            json.dump({"release": commit, "written by": "felixpy-lab up --nodes 2 --mode bgp; "
                       "tests/e2e/upgrade_fixture.py make", "keys": keys}, f, indent=1, sort_keys=True)
            f.write("\n")
    finally:
        subprocess.run([lab_python, "-m", "felixpy.lab.cli", "down", "--name", name],
                       capture_output=True, text=True, timeout=120, cwd=release, env=env)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.upgrade_fixture")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("make")
    p.add_argument("--release", required=True, help="a checkout of the release with its .venv")
    p.add_argument("--out", required=True)
    sub.add_parser("dump")
    p = sub.add_parser("load")
    p.add_argument("file")
    args = parser.parse_args()
    endpoint = os.environ.get("ETCD_ENDPOINTS", topology.ETCD_ENDPOINT).split(",")[0]
    if args.what == "make":
        make(args.release, args.out)
    elif args.what == "dump":
        print(json.dumps(dump(endpoint), indent=1, sort_keys=True))
    else:
        with open(args.file) as f:
            load(endpoint, json.load(f)["keys"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
