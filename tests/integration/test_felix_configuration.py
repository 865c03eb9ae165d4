"""FelixConfiguration on a real agent: read at startup with Felix's precedence, its parameters in the
kernel, a change applied by restarting the agent, and the migration lock on the CNI socket.

`felixpy-node` runs in a network namespace of its own with its own etcd (as in
test_health_metrics.py); resources are written with `felixctl apply` inside that namespace, and
the kernel is read there with iptables-save and `ip -d link`. Needs root.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
import yaml

POOL = "10.232.0.0/16"
NODE_IP = "192.0.2.10"


@dataclass
class Node:
    """A node namespace with its own etcd; `start()` runs felixpy-node in it."""

    netns: str
    name: str
    workdir: str
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]]
    agent: subprocess.Popen[bytes] | None = None

    def start(self) -> subprocess.Popen[bytes]:
        with open(os.path.join(self.workdir, "agent.log"), "ab") as out:
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "felixpy.node.main"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(self.agent)
        return self.agent

    def run(self, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True,
                              timeout=30, env=self.env, input=input)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
        return done

    def apply(self, *docs: dict[str, Any]) -> None:
        path = pathlib.Path(self.workdir, f"apply-{secrets.token_hex(3)}.yaml")
        path.write_text(yaml.safe_dump_all([{"apiVersion": "projectcalico.org/v3", **d} for d in docs]))
        self.run(sys.executable, "-m", "felixpy.ctl.main", "apply", "-f", str(path))

    def log(self) -> str:
        return pathlib.Path(self.workdir, "agent.log").read_text(errors="replace")

    def fetch(self, port: int, path: str) -> tuple[int, str]:
        script = (
            "import json, urllib.request, urllib.error\n"
            "try:\n"
            f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=3)\n"
            "    print(json.dumps([r.status, r.read().decode()]))\n"
            "except urllib.error.HTTPError as e:\n"
            "    print(json.dumps([e.code, e.read().decode()]))\n"
            "except OSError as e:\n"
            "    print(json.dumps([0, str(e)]))\n"
        )
        code, body = json.loads(self.run(sys.executable, "-c", script).stdout)
        return int(code), str(body)

    def cni(self, command: str, netns: str = "/var/run/netns/none", container: str = "c0ffee") -> dict[str, Any]:
        """One request straight to the agent's CNI socket (what felixpy-cni sends)."""
        request = {"env": {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": netns,
                           "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"},
                   "config": {"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "felixpy-cni"}}
        script = (
            "import json, socket, sys\n"
            "s = socket.socket(socket.AF_UNIX); s.settimeout(20)\n"
            f"s.connect({self.env['FELIXPY_CNI_SOCKET']!r})\n"
            "s.sendall(sys.stdin.read().encode()); s.shutdown(socket.SHUT_WR)\n"
            "data = b''\n"
            "while chunk := s.recv(65536): data += chunk\n"
            "print(data.decode())\n"
        )
        return dict(json.loads(self.run(sys.executable, "-c", script, input=json.dumps(request)).stdout))


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def wait_for(what: str, cond: Callable[[], bool], timeout: float, node: Node) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if cond():
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n--- agent log ---\n{node.log()[-6000:]}")


@pytest.fixture
def node(needs_root: None) -> Iterator[Node]:
    """etcd and felixctl in a fresh namespace; the agent starts once the test has seeded the datastore."""
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed")
    prefix = "fxc" + secrets.token_hex(3)[:5]
    netns = prefix + "n"
    workdir = tempfile.mkdtemp(prefix=prefix + "-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _run("ip", "netns", "add", netns)
        _run("ip", "-n", netns, "link", "set", "lo", "up")
        _run("ip", "-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", prefix + "e")
        _run("ip", "-n", netns, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        _run("ip", "-n", netns, "link", "set", prefix + "e", "up")
        _run("ip", "-n", netns, "link", "set", "eth0", "up")
        with open(os.path.join(workdir, "etcd.log"), "wb") as out:
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", netns, "etcd", "--name", prefix, "--data-dir", f"{workdir}/etcd",
                 "--listen-client-urls", "http://127.0.0.1:2379", "--advertise-client-urls", "http://127.0.0.1:2379",
                 "--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                 "--initial-cluster", f"{prefix}=http://127.0.0.1:2380", "--log-level", "error"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONUNBUFFERED": "1",
            "NODENAME": prefix + "x", "DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": "http://127.0.0.1:2379",
            "WAIT_FOR_DATASTORE": "true", "IP": f"{NODE_IP}/24", "CALICO_IPV4POOL_CIDR": POOL,
            "CALICO_IPV4POOL_VXLAN": "Always", "CALICO_NETWORKING_BACKEND": "vxlan",
            "FELIXPY_CNI_SOCKET": f"{workdir}/cni.sock", "FELIXPY_STATE_DIR": f"{workdir}/lib",
            # The environment beats the datastore (Felix's precedence): FelixConfiguration sets 7 s.
            "FELIX_ROUTEREFRESHINTERVAL": "30",
        }
        if "PYTHONPATH" in os.environ:
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        os.makedirs(f"{workdir}/lib")
        node = Node(netns, prefix + "x", workdir, env, procs)
        wait_for("etcd", lambda: node.run(sys.executable, "-c",
                                          "import socket; socket.create_connection(('127.0.0.1', 2379), 1)",
                                          check=False).returncode == 0, 30, node)
        yield node
    finally:
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)


def _builtin(node: Node, table: str, chain: str, backend: str = "legacy") -> list[str]:
    out = node.run(f"iptables-{backend}-save", "-t", table).stdout
    return [line for line in out.splitlines() if line.startswith(f"-A {chain} ")]


def _vxlan(node: Node) -> str:
    return node.run("ip", "-d", "link", "show", "vxlan.calico", check=False).stdout


NODE_SPEC: dict[str, Any] = {
    "chainInsertMode": "Append", "iptablesBackend": "Legacy", "logSeverityScreen": "Debug",
    "defaultEndpointToHostAction": "Accept", "natOutgoingAddress": NODE_IP, "natPortRange": "32768:33000",
    "vxlanPort": 4790, "vxlanMTU": 1370, "healthEnabled": True, "healthHost": "127.0.0.1", "healthPort": 9202,
    "ipsetsRefreshInterval": "60s", "failsafeInboundHostPorts": [{"protocol": "TCP", "port": 2222}],
    "failsafeOutboundHostPorts": [{"protocol": "UDP", "port": 5353}], "ipForwarding": "Enabled",
    "logSeverityFile": "Warning",
}


def test_felix_configuration_reaches_the_kernel_and_a_change_restarts_the_agent(node: Node) -> None:
    # A foreign rule already in FORWARD: in append mode our jump goes after it.
    node.run("iptables-legacy", "-A", "FORWARD", "-s", "198.51.100.0/24", "-j", "ACCEPT")
    node.apply(
        {"kind": "FelixConfiguration", "metadata": {"name": "default"},
         "spec": {"logSeverityScreen": "Info", "reportingInterval": "0s", "chainInsertMode": "Insert",
                  "vxlanVNI": 4097, "prometheusMetricsEnabled": True, "prometheusMetricsPort": 9201,
                  "prometheusMetricsHost": "127.0.0.1", "logFilePath": f"{node.workdir}/log/felix.log",
                  "iptablesRefreshInterval": "45s", "routeRefreshInterval": "7s"}},
        {"kind": "FelixConfiguration", "metadata": {"name": f"node.{node.name}"}, "spec": NODE_SPEC},
    )
    agent = node.start()
    wait_for("agent ready on the FelixConfiguration health port",
             lambda: node.fetch(9202, "/readiness") == (200, "ready\n"), 90, node)

    # Sources: node.<name> beats default, the environment beats both.
    log = node.log()
    assert "param=chainInsertMode value='append' source=datastore (per-host)" in log
    assert "param=vxlanVNI value=4097 source=datastore (global)" in log
    assert "param=iptablesRefreshInterval value=45.0 source=datastore (global)" in log
    assert "param=routeRefreshInterval value=30.0 source=environment variable" in log
    assert "[DEBUG]" in log  # logSeverityScreen Debug (node.<name>) over Info (default)

    # chainInsertMode Append + iptablesBackend Legacy: our jump after the foreign rule, in legacy.
    forward = _builtin(node, "filter", "FORWARD")
    assert "198.51.100.0/24" in forward[0] and "cali-FORWARD" in forward[-1], forward
    # natOutgoingAddress + natPortRange: SNAT to the address, TCP and UDP on the port range.
    nat = _builtin(node, "nat", "cali-nat-outgoing")
    ranged = [r for r in nat if f"--to-source {NODE_IP}:32768-33000" in r]
    assert {"tcp", "udp"} == {p for r in ranged for p in ("tcp", "udp") if f"-p {p}" in r}, nat
    assert any(re.search(rf"-j SNAT --to-source {re.escape(NODE_IP)}( |$)", r) for r in nat), nat
    # defaultEndpointToHostAction Accept, failsafe inbound port 2222 only.
    assert any("-j ACCEPT" in r for r in _builtin(node, "filter", "cali-wl-to-host"))
    failsafe = _builtin(node, "filter", "cali-failsafe-in")
    assert len(failsafe) == 1 and "-p tcp" in failsafe[0] and "--dports 2222" in failsafe[0], failsafe
    failsafe = _builtin(node, "filter", "cali-failsafe-out")
    assert len(failsafe) == 1 and "-p udp" in failsafe[0] and "--dports 5353" in failsafe[0], failsafe
    assert node.run("cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"  # ipForwarding Enabled
    # vxlanVNI (default) / vxlanPort / vxlanMTU (node.<name>): the device and the pod MTU file.
    wait_for("vxlan.calico", lambda: "vxlan id" in _vxlan(node), 30, node)
    link = _vxlan(node)
    assert "vxlan id 4097" in link and "dstport 4790" in link and " mtu 1370 " in link, link
    assert pathlib.Path(node.workdir, "lib", "mtu").read_text() == "1370"
    # prometheusMetricsEnabled/Port (default).
    assert node.fetch(9201, "/metrics")[0] == 200

    # A change: felixpy-node logs it, restarts (exec: same pid), and runs with the new values.
    node.apply({"kind": "FelixConfiguration", "metadata": {"name": f"node.{node.name}"},
                "spec": {**NODE_SPEC, "chainInsertMode": "Insert", "prometheusMetricsPort": 9203}})
    wait_for("the restart line", lambda: "restarting felixpy-node for the configuration change" in node.log(),
             30, node)
    assert "configuration changed; restarting to apply it, as Felix does param=chainInsertMode " \
           "old='append' new='insert'" in node.log()
    wait_for("metrics on the new port", lambda: node.fetch(9203, "/metrics")[0] == 200, 60, node)
    assert agent.poll() is None
    assert node.log().count("startup complete") == 2  # a second startup, in the same process
    # logFilePath (default) and logSeverityFile Warning (node.<name>): warnings only, both processes'.
    felix_log = pathlib.Path(node.workdir, "log", "felix.log").read_text()
    assert "[WARNING]" in felix_log and "restarting felixpy-node for the configuration change" in felix_log
    assert "[INFO]" not in felix_log and "[DEBUG]" not in felix_log
    wait_for("our jump moved to the top of FORWARD",
             lambda: "cali-FORWARD" in _builtin(node, "filter", "FORWARD")[0], 30, node)
    assert "198.51.100.0/24" in _builtin(node, "filter", "FORWARD")[-1]


def test_migration_lock_refuses_cni_until_unlocked(node: Node) -> None:
    agent = node.start()
    wait_for("the CNI socket", lambda: os.path.exists(node.env["FELIXPY_CNI_SOCKET"]), 90, node)
    wait_for("CNI STATUS ready", lambda: "error" not in node.cni("STATUS"), 30, node)
    node.run(sys.executable, "-m", "felixpy.ctl.main", "datastore", "migrate", "lock")
    wait_for("CNI ADD refused", lambda: node.cni("ADD").get("error", {}).get("msg")
             == "Calico is currently not ready to process requests", 30, node)
    refused = node.cni("DEL")["error"]
    assert refused["code"] == 11 and "datastoreReady=false" in refused["details"]
    assert node.cni("STATUS")["error"]["code"] == 50
    assert "datastore locked for migration" in node.log()
    node.run(sys.executable, "-m", "felixpy.ctl.main", "datastore", "migrate", "unlock")
    wait_for("CNI STATUS ready again", lambda: "error" not in node.cni("STATUS"), 30, node)
    assert agent.poll() is None  # the lock never stopped the agent
