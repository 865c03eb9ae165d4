"""Helpers for the e2e tests: drive one felixpy-lab cluster through its real CLI.

Everything is driven the way a user would: subprocesses of `python -m felixpy.lab.cli`; the tests
read the lab's state file only to find pids and pod IPs, and use `ip -n` only inside the lab's
own namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

E2E_TIMEOUT = 120.0


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "e2e tests need root (network namespaces)"
    for tool in ("etcd", "ip", "ping"):
        if not shutil.which(tool):
            return f"e2e tests need {tool}"
    return None


class Lab:
    """One running lab, driven through its CLI."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cli(self, *args: str, check: bool = True, timeout: float = E2E_TIMEOUT) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "felixpy.lab.cli", *args, "--name", self.name]
        if "--" in args:  # --name must come before the command of exec
            cut = args.index("--")
            argv = [sys.executable, "-m", "felixpy.lab.cli", *args[:cut], "--name", self.name, *args[cut:]]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def state(self) -> dict[str, Any]:
        with open(f"/run/felixpy-lab/{self.name}/state.json") as f:
            data: dict[str, Any] = json.load(f)
        return data

    def pod_ip(self, ref: str) -> str:
        ns, name = ref.split("/")
        for pod in self.state()["pods"]:
            if pod["namespace"] == ns and pod["name"] == name:
                ip: str = pod["ips"][0]
                return ip
        raise KeyError(ref)

    def netns(self, node_or_pod: str) -> str:
        if "/" in node_or_pod:
            ns, name = node_or_pod.split("/")
            return f"{self.name}-{ns}-{name}"
        return f"{self.name}-{node_or_pod}"

    def ip(self, node_or_pod: str, *args: str) -> str:
        """`ip` inside one of the lab's namespaces (never the root one)."""
        done = subprocess.run(["ip", "-n", self.netns(node_or_pod), *args], capture_output=True,
                              text=True, timeout=10, check=True)
        return done.stdout

    def kube_get(self, path: str) -> Any:
        """GET `path` from a `--datastore kubernetes` lab's API server, as its admin, from inside the
        fabric where the server listens."""
        code = (f"from felixpy.lab import kube; import json; "
                f"print(json.dumps(kube.control_plane({self.name!r}).request('GET', {path!r})))")
        return json.loads(self.cli("exec", "fabric", "--", sys.executable, "-c", code).stdout)

    def agent_log(self, node: str) -> str:
        try:
            with open(f"/run/felixpy-lab/{self.name}/{node}/agent.log", errors="replace") as f:
                return "".join(f.readlines()[-30:])
        except FileNotFoundError:
            return ""


def blocked_pairs(matrix: dict[str, Any]) -> list[str]:
    """Every blocked pair of a `matrix -o json` answer ("tcp6/80: x/a -> x/b"): [] when fully connected."""
    return [f"{key}: {src} -> {dst}" for key, table in matrix["results"].items()
            for src, row in table.items() for dst, ok in row.items() if not ok]


def wait_for(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> float:
    """Poll until predicate() is true; returns the seconds it took, fails the test after timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def ping_summary(output: str) -> tuple[int, int]:
    """(transmitted, received) from ping's statistics line."""
    for line in output.splitlines():
        if "packets transmitted" in line:
            parts = line.split(",")
            sent = int(parts[0].split()[0])
            received = int(parts[1].split()[0])
            return sent, received
    raise AssertionError(f"no ping statistics in:\n{output}")


def start_ping(lab: Lab, src: str, dst_ip: str, interval: float, count: int) -> subprocess.Popen[str]:
    """A ping running in the background inside a pod (or node) of the lab."""
    argv = [sys.executable, "-m", "felixpy.lab.cli", "exec", src, "--name", lab.name, "--",
            "ping", "-n", "-q", "-i", str(interval), "-c", str(count), "-W", "1", dst_ip]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_ping(proc: subprocess.Popen[str], timeout: float) -> tuple[int, int]:
    """Wait (bounded) for a start_ping; (transmitted, received)."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return ping_summary(out)
