"""Helpers for the integration tests that run real BGP daemons in network namespaces.

One L2 segment (a bridge in its own namespace), hosts on it as namespaces with eth0, daemons
started per host and stopped in teardown; every name carries a per-run prefix and every wait is
bounded. `Node` is an ExaBGP + sidecar speaker driven by a plain client and RIB (test_bgp_daemons);
`AgentNode` is one driven by the agent's real BGPController (test_bgp_fields).
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from bgp.client import SidecarClient
from bgp.config import SpeakerConfig, render_exabgp_conf, render_exabgp_env
from bgp.peers import Peer
from bgp.protocol import RoutesReceived, StateChange
from bgp.rib import Rib

EXABGP = str(Path(sys.executable).with_name("exabgp"))
HAVE_EXABGP = Path(EXABGP).exists()
HAVE_BIRD = shutil.which("bird") is not None
FRR_BGPD = "/usr/lib/frr/bgpd"
HAVE_FRR = Path(FRR_BGPD).exists() and shutil.which("vtysh") is not None
HAVE_GOBGP = shutil.which("gobgpd") is not None and shutil.which("gobgp") is not None

AS_NODES = 64512
TOR_PREFIX = "198.51.100.0/24"
MD5 = "s3cret-md5"


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: rc={done.returncode} {done.stderr.strip()}")
    return done.stdout


def wait_for(what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemons:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, ns: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        out = open(log, "ab")
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=str(log.parent))
        out.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)


@dataclass
class Node:
    """A netns node running ExaBGP + sidecar, with an agent-side client feeding a RIB."""

    name: str
    ns: str
    address: str
    socket: str
    proc: subprocess.Popen[bytes]
    client: SidecarClient
    rib: Rib = field(default_factory=Rib)
    states: dict[str, str] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)  # prefix → monotonic time of last announce
    withdrawn_at: dict[str, float] = field(default_factory=dict)

    def pump(self, timeout: float = 0.05) -> None:
        """Apply every event available within `timeout` to the RIB."""
        event = self.client.next_event(timeout)
        while event is not None:
            now = time.monotonic()
            if isinstance(event, StateChange) and event.state in ("up", "down"):
                self.states[event.peer] = event.state
            if isinstance(event, RoutesReceived):
                for route in event.announced:
                    self.received_at[route.prefix] = now
                for prefix in event.withdrawn:
                    self.withdrawn_at[prefix] = now
            self.rib.apply(event, now=time.time())
            event = self.client.next_event(0)

    def wait(self, what: str, predicate: Callable[[], object], timeout: float = 15.0) -> object:
        def check() -> object:
            self.pump()
            return predicate()
        return wait_for(f"{self.name}: {what}", check, timeout, interval=0)


class Lab:
    def __init__(self, root: Path) -> None:
        self.prefix = "fxt" + secrets.token_hex(3)[:5]
        self.root = root
        self.daemons = Daemons()
        self.namespaces: list[str] = []
        self.sw = self.prefix + "sw"
        self._add_ns(self.sw)
        sh("ip", "-n", self.sw, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.sw, "link", "set", "br0", "up")

    def _add_ns(self, ns: str) -> None:
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")

    def host(self, role: str, address: str) -> str:
        ns = self.prefix + role
        self._add_ns(ns)
        outside, inside = ns, ns + "x"  # prefix (8) + role (<= 4) + "x" fits IFNAMSIZ
        assert len(inside) <= 15, role
        sh("ip", "link", "add", outside, "type", "veth", "peer", "name", inside)
        sh("ip", "link", "set", outside, "netns", self.sw)
        sh("ip", "-n", self.sw, "link", "set", outside, "master", "br0", "up")
        sh("ip", "link", "set", inside, "netns", ns)
        sh("ip", "-n", ns, "link", "set", inside, "name", "eth0")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        return ns

    def dir(self, role: str) -> Path:
        path = self.root / role
        path.mkdir(exist_ok=True)
        return path

    def bird(self, role: str, ns: str, config: str) -> tuple[subprocess.Popen[bytes], str]:
        d = self.dir(role)
        (d / "bird.conf").write_text(config)
        sh("bird", "-p", "-c", str(d / "bird.conf"))
        ctl = str(d / "bird.ctl")
        proc = self.daemons.start(ns, ["bird", "-f", "-c", str(d / "bird.conf"), "-s", ctl], d / "bird.out")
        wait_for(f"{role} bird control socket", lambda: os.path.exists(ctl), 5)
        return proc, ctl

    def node(self, name: str, address: str, peers: list[Peer]) -> Node:
        ns = self.host(name, address)
        d = self.dir(name)
        sock = str(d / "sidecar.sock")
        cfg = SpeakerConfig(node_name=name, router_id=address, local_address=address, as_number=AS_NODES,
                            peers=tuple(peers), sidecar_socket=sock)
        (d / "exabgp.conf").write_text(render_exabgp_conf(cfg))
        (d / "exabgp.env").write_text(render_exabgp_env(log_destination=str(d / "exabgp.log"), log_level="INFO"))
        sh(EXABGP, "--env-file", str(d / "exabgp.env"), "validate", str(d / "exabgp.conf"))
        proc = self.daemons.start(ns, [EXABGP, "--env-file", str(d / "exabgp.env"), "server",
                                       str(d / "exabgp.conf")], d / "exabgp.out")
        client = SidecarClient(sock)
        client.connect(timeout=15)
        return Node(name, ns, address, sock, proc, client)

    def close(self) -> None:
        self.daemons.stop_all()
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)


def birdc(ctl: str, *command: str) -> str:
    return sh("birdc", "-s", ctl, *command)


def bird_route(ctl: str, prefix: str) -> str:
    return sh("birdc", "-s", ctl, "show", "route", "for", prefix, "all", check=False)


def bird_established(ctl: str, protocol: str) -> bool:
    return "Established" in birdc(ctl, "show", "protocols", protocol)


def frr_json(ns: str, vty: str, command: str) -> Any:
    """A vtysh `... json` command's answer, {} when FRR is not answering (yet)."""
    out = sh("ip", "netns", "exec", ns, "vtysh", "--vty_socket", vty, "-c", command, check=False)
    try:
        return json.loads(out)
    except ValueError:
        return {}


def wait_pumping(nodes: "list[AgentNode]", what: str, predicate: Callable[[], object],
                 timeout: float) -> object:
    """wait_for, pumping every agent node's events between checks (their loops run on this thread)."""
    def check() -> object:
        for node in nodes:
            node.pump(0.02)
        return predicate()
    return wait_for(what, check, timeout, interval=0)


class AgentNode:
    """A netns node whose ExaBGP is driven by the agent's real BGPController (node/bgp.py).

    The test plays the agent's loop: datastore updates go through a Dispatcher, the controller's
    messages (sidecar events, BIRD polls) are pumped from its queue, and `sync()` runs after each
    batch, exactly as node/agent.py does. ExaBGP writes its pid file, so the controller's
    SIGUSR1 reloads reach it.
    """

    def __init__(self, lab: "Lab", name: str, address: str, *, bird_paths: Any = None) -> None:
        from felixpy.calc.dispatcher import Dispatcher
        from felixpy.node.bgp import BGPController, BGPPaths
        from felixpy.node.secrets import SecretResolver

        self.name, self.address = name, address
        self.ns = lab.host(name, address)
        d = lab.dir(name)
        self.dir = d
        self.paths = BGPPaths(config=str(d / "exabgp.conf"), pid_file=str(d / "exabgp.pid"),
                              socket=str(d / "sidecar.sock"), status=str(d / "status.json"), python=sys.executable)
        # The process stanza only, as the lab writes it before the agent's first render.
        (d / "exabgp.conf").write_text(render_exabgp_conf(SpeakerConfig(
            node_name=name, router_id=address, local_address=address, as_number=AS_NODES, peers=(),
            sidecar_socket=self.paths.socket)))
        (d / "exabgp.env").write_text(render_exabgp_env(log_destination=str(d / "exabgp.log"), log_level="INFO"))
        self.proc = lab.daemons.start(self.ns, ["env", f"exabgp_daemon_pid={self.paths.pid_file}", EXABGP,
                                                "--env-file", str(d / "exabgp.env"), "server",
                                                str(d / "exabgp.conf")], d / "exabgp.out")
        wait_for(f"{name} sidecar socket", lambda: os.path.exists(self.paths.socket), 15)
        self.events: "queue.Queue[Any]" = queue.Queue()
        self.ctl = BGPController(name, self.paths, bird_paths=bird_paths, secrets=SecretResolver())
        self.dispatcher = Dispatcher(self.ctl)
        self.ctl.start(self.events.put)

    def feed(self, *updates: Any) -> None:
        self.dispatcher.on_updates(updates)
        self.ctl.datastore_in_sync()
        self.ctl.sync()

    def pump(self, timeout: float = 0.05) -> None:
        try:
            message = self.events.get(timeout=timeout)
        except queue.Empty:
            message = None
        while message is not None:
            self.ctl.on_message(message)
            try:
                message = self.events.get_nowait()
            except queue.Empty:
                message = None
        deadline = self.ctl.next_deadline()
        if deadline is not None and time.monotonic() >= deadline:
            self.ctl.expire()
        self.ctl.sync()

    def wait(self, what: str, predicate: Callable[[], object], timeout: float = 20.0) -> object:
        def check() -> object:
            self.pump()
            return predicate()
        return wait_for(f"{self.name}: {what}", check, timeout, interval=0)

    def session_up(self, peer: str) -> bool:
        return any(row["peer"] == peer and row["state"] == "Established" for row in self.ctl.status()["peers"])

    def close(self) -> None:
        self.ctl.stop()
