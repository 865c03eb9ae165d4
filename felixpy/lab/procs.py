"""The lab's kernel and process work: namespaces, the fabric bridge, etcd, agents, and teardown.

Nothing here touches the root network namespace: every `ip` command names its namespace (`-n`),
and every process is started with `ip netns exec`. Every process the lab starts carries
FELIXPY_LAB=<lab> in its environment, which is how `down` finds processes even when the state
file or a namespace is already gone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Mapping

from felixpy.lab import topology

log = logging.getLogger(__name__)

LAB_ENV = "FELIXPY_LAB"
CLONE_NEWNET = 0x40000000


@dataclass
class LabCommandError(Exception):
    """A command the lab ran failed; carries what was run and what it said.

    Not frozen: raising sets __traceback__ on the exception, which a frozen dataclass refuses."""

    argv: tuple[str, ...]
    returncode: int
    stderr: str

    def __str__(self) -> str:
        detail = self.stderr.strip().splitlines()[-1] if self.stderr.strip() else f"exit {self.returncode}"
        return f"{' '.join(self.argv)}: {detail}"


def bin_dir() -> str:
    """Where this Python's console scripts (felixpy-cni, felixctl) live."""
    return os.path.dirname(sys.executable)


def run(argv: list[str], *, input: str | None = None, env: Mapping[str, str] | None = None,
        timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(argv, input=input, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabCommandError(tuple(argv), -1, f"no answer within {timeout:g} s") from None
    except FileNotFoundError:
        raise LabCommandError(tuple(argv), 127, f"{argv[0]}: command not found") from None
    if check and done.returncode != 0:
        raise LabCommandError(tuple(argv), done.returncode, done.stderr or done.stdout)
    return done


def ip(netns: str, *args: str) -> None:
    run(["ip", "-n", netns, *args])


# --- namespaces ---------------------------------------------------------------------------------

def kernel_has_ipip(lab: str) -> bool:
    """Whether this kernel has IPIP: once the ipip module is in, every new netns gets a tunl0."""
    probe = f"{lab}-ipipcheck"
    try:
        netns_add(probe)
    except LabCommandError:
        return False
    try:
        return subprocess.run(["ip", "-n", probe, "link", "show", "tunl0"], capture_output=True).returncode == 0
    finally:
        netns_del(probe)


def netns_list() -> set[str]:
    try:
        return {n for n in os.listdir("/run/netns")}
    except FileNotFoundError:
        return set()


def netns_add(name: str) -> None:
    run(["ip", "netns", "add", name])
    ip(name, "link", "set", "lo", "up")


def netns_del(name: str) -> None:
    run(["ip", "netns", "del", name], check=False)


def netns_pids(name: str) -> set[int]:
    done = run(["ip", "netns", "pids", name], check=False)
    return {int(p) for p in done.stdout.split() if p.isdigit()}


def enter_netns(name: str) -> None:
    """Move the calling thread into a named netns; threads it creates afterwards inherit it.

    The lab CLI does this once, before it opens the datastore, because the lab's etcd listens
    only on the fabric network.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into netns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


NEIGH_SYSCTL = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"


def neighbour_limits_needed(nodes: int) -> int:
    """gc_thresh2 for a lab of `nodes` namespaces: every node may hold a neighbour entry for
    every other node and its pods, and the limits count the entries of all namespaces together
    (sandbox.md: 30 nodes behind 2 reflectors overflow the defaults). Twice that, as a power of
    two, leaves room for the host and other labs."""
    entries = 2 * ((nodes + 2) ** 2 + 4 * nodes)
    return 1 << max(entries - 1, 1).bit_length()


def raise_neighbour_limits(nodes: int) -> tuple[tuple[int, int, int], tuple[int, int, int]] | None:
    """Raise net.ipv4.neigh.default.gc_thresh1/2/3 (never lower them) when gc_thresh2 is below
    what `nodes` need; returns (before, after), or None when nothing changed."""
    before = tuple(int(open(NEIGH_SYSCTL.format(i), encoding="ascii").read()) for i in (1, 2, 3))
    thresh2 = neighbour_limits_needed(nodes)
    if before[1] >= thresh2 and before[2] >= 2 * thresh2:
        return None
    after = (max(before[0], thresh2 // 2), max(before[1], thresh2), max(before[2], 2 * thresh2))
    for i, value in zip((3, 2, 1), (after[2], after[1], after[0])):
        with open(NEIGH_SYSCTL.format(i), "w", encoding="ascii") as f:
            f.write(str(value))
    return (before[0], before[1], before[2]), after


def build_fabric(lab: str, cross_subnet: bool = False, ipv6: bool = False) -> None:
    """The fabric netns: bridge fabric0 on 192.0.2.0/24 (etcd listens there).

    With `cross_subnet` a second bridge, fabric1 on 198.51.100.0/24, and IP forwarding: the
    namespace is then the router between the two node subnets (and etcd is reached through it).
    """
    ns = topology.fabric_netns(lab)
    netns_add(ns)
    bridges = [(topology.FABRIC_BRIDGE, topology.FABRIC_IP, topology.FABRIC_SUBNET.prefixlen)]
    if cross_subnet:
        bridges.append((topology.FABRIC_B_BRIDGE, topology.FABRIC_B_IP, topology.FABRIC_B_SUBNET.prefixlen))
        # net.ipv4.ip_forward is per network namespace: this affects the lab's fabric only.
        run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    for bridge, address, prefixlen in bridges:
        ip(ns, "link", "add", bridge, "type", "bridge")
        ip(ns, "addr", "add", f"{address}/{prefixlen}", "dev", bridge)
        ip(ns, "link", "set", bridge, "up")
    if ipv6:
        ip(ns, "addr", "add", f"{topology.FABRIC6_IP}/{topology.FABRIC6_SUBNET.prefixlen}", "dev",
           topology.FABRIC_BRIDGE, "nodad")
        if cross_subnet:
            ip(ns, "addr", "add", f"{topology.FABRIC6_B_IP}/{topology.FABRIC6_B_SUBNET.prefixlen}", "dev",
               topology.FABRIC_B_BRIDGE, "nodad")
            run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])


def build_node(lab: str, node: str, cross_subnet: bool = False, ipv6: bool = False) -> None:
    """A node netns with eth0 on its fabric bridge; the fabric side of the veth is named after the node."""
    fabric = topology.fabric_netns(lab)
    ns = topology.node_netns(lab, node)
    link = topology.node_link(node, cross_subnet)
    netns_add(ns)
    ip(fabric, "link", "add", node, "type", "veth", "peer", "name", topology.NODE_IFACE, "netns", ns)
    ip(fabric, "link", "set", node, "master", link.bridge, "up")
    ip(ns, "addr", "add", f"{link.ip}/{link.prefixlen}", "dev", topology.NODE_IFACE)
    if ipv6:
        # nodad: the address is the node's from the first moment (IP6 autodetection finds it).
        ip(ns, "addr", "add", f"{topology.node_ip6(node, cross_subnet)}/{topology.FABRIC6_SUBNET.prefixlen}",
           "dev", topology.NODE_IFACE, "nodad")
    ip(ns, "link", "set", topology.NODE_IFACE, "up")
    ip(ns, "route", "add", "default", "via", link.gateway)
    if ipv6 and cross_subnet:
        ip(ns, "-6", "route", "add", "default", "via", topology.node_gateway6(node, cross_subnet))


# --- processes ----------------------------------------------------------------------------------

def _spawn(lab: str, netns: str, argv: list[str], env: dict[str, str], log_path: str) -> int:
    env = {**env, LAB_ENV: lab}
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, *argv], env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # `ip netns exec` execs the command, so this pid is the process itself.
    return proc.pid


def spawn_in_fabric(lab: str, argv: list[str], log_path: str) -> int:
    """A process of the lab in its fabric namespace (the ToR's bgpd), marked as the lab's."""
    return _spawn(lab, topology.fabric_netns(lab), argv, base_env(), log_path)


def base_env() -> dict[str, str]:
    env = {"PATH": f"{bin_dir()}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}",
           "PYTHONUNBUFFERED": "1", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def start_etcd(lab: str) -> int:
    data_dir = f"{topology.run_dir(lab)}/etcd"
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    peer = "http://127.0.0.1:2380"
    argv = ["etcd", "--name", lab, "--data-dir", data_dir,
            "--listen-client-urls", topology.ETCD_ENDPOINT,
            "--advertise-client-urls", topology.ETCD_ENDPOINT,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"{lab}={peer}", "--initial-cluster-state", "new",
            "--logger", "zap", "--log-level", "warn"]
    if not shutil.which("etcd"):
        raise LabCommandError(("etcd",), 127, "etcd is not installed (apt-get install etcd-server)")
    return _spawn(lab, topology.fabric_netns(lab), argv, base_env(), f"{topology.run_dir(lab)}/etcd.log")


def wait_tcp(host: str, port: int, timeout: float) -> bool:
    """Connect from the current netns until it works; the caller must already be in the fabric."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def exabgp_paths(lab: str, node: str) -> dict[str, str]:
    d = topology.exabgp_dir(lab, node)
    return {"config": f"{d}/exabgp.conf", "env": f"{d}/exabgp.env", "pid": f"{d}/exabgp.pid",
            "socket": f"{d}/sidecar.sock", "log": f"{d}/exabgp.log"}


def datastore_env(lab: str, datastore: str) -> dict[str, str]:
    """How the lab's agents reach the datastore: the lab's etcd, or (kubernetes) the lab's API
    server with a token of the felixpy-node ServiceAccount, as a DaemonSet pod would."""
    if datastore == "kubernetes":
        from felixpy.lab import kube

        return {"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": kube.node_kubeconfig(lab)}
    return {"DATASTORE_TYPE": "etcdv3", "ETCD_ENDPOINTS": topology.ETCD_ENDPOINT}


def agent_env(lab: str, node: str, pool: str, block_size: int,
              outer_env: Mapping[str, str] | None = None, mode: str = "routes",
              cross_subnet: bool = False, datastore: str = "etcd", ip_family: str = "ipv4") -> dict[str, str]:
    outer = os.environ if outer_env is None else outer_env
    nd = topology.node_dir(lab, node)
    env = base_env()
    env.update({"FELIX_ROUTEREFRESHINTERVAL": "10", "FELIX_LOGSEVERITYSCREEN": "INFO"})
    # The lab's own FELIX_* settings reach every agent, e.g. FELIX_ROUTEREFRESHINTERVAL=5 felixpy-lab up.
    env.update({k: v for k, v in outer.items() if k.upper().startswith("FELIX_")})
    env.update({
        "NODENAME": node,
        **datastore_env(lab, datastore),
        "IP": "autodetect",
        "IP_AUTODETECTION_METHOD": f"interface={topology.NODE_IFACE}",
        "CALICO_IPV4POOL_CIDR": pool,
        "CALICO_IPV4POOL_BLOCK_SIZE": str(block_size),
        "CALICO_IPV4POOL_IPIP": "Never",
        "CALICO_IPV4POOL_VXLAN": "Never",
        # "vxlan" is calico-node's "no BGP" backend: the agent programs routes to other nodes'
        # blocks from the datastore, which is the lab's routes mode while the pool has no encap.
        "CALICO_NETWORKING_BACKEND": "vxlan",
        "FELIXPY_CNI_SOCKET": topology.cni_socket(lab, node),
        "FELIXPY_STATE_DIR": f"{nd}/lib",
        "FELIXPY_SECRETS_DIR": f"{nd}/secrets",  # the lab's stand-in for a mounted secret volume
    })
    if ip_family == "ipv4":
        # calico-node's manifest for IPv4 clusters: no IPv6 pool, no IPv6 routes or rules.
        env.setdefault("FELIX_IPV6SUPPORT", "false")
    else:
        env.update({
            "IP6": "autodetect",
            "IP6_AUTODETECTION_METHOD": f"interface={topology.NODE_IFACE}",
            "CALICO_IPV6POOL_CIDR": topology.POOL6,
            "CALICO_IPV6POOL_BLOCK_SIZE": str(topology.POOL6_BLOCK_SIZE),
            # Mode vxlan: IPv6 pods' traffic between nodes goes through vxlan-v6.calico.
            "CALICO_IPV6POOL_VXLAN": "Always" if mode == "vxlan" else "Never",
        })
    if ip_family == "ipv6":
        # IPv6 only: the Node has no IPv4 address and there is no IPv4 pool (the agent still
        # reaches etcd over the IPv4 fabric, the lab's control network).
        env.update({"IP": "none", "CALICO_IPV4POOL_CIDR": "none"})
    if mode == "ipip":
        # IPIP without BGP: the agents route other nodes' blocks via tunl0 from the datastore.
        env["CALICO_IPV4POOL_IPIP"] = "Always"
    if mode == "vxlan":
        # Calico's VXLAN-only setup (calico-vxlan.yaml): no BGP, the pool encapsulates every
        # node-to-node packet in vxlan.calico; each agent allocates its VTEP address at startup.
        env["CALICO_IPV4POOL_VXLAN"] = "Always"
    if cross_subnet:
        # Nodes on two subnets: encapsulate only toward the other subnet. In mode bgp this is
        # Calico's BGP + VXLAN CrossSubnet: same-subnet routes come from BGP, while the fabric
        # router knows no pod routes, so other-subnet blocks go through vxlan.calico.
        env["CALICO_IPV4POOL_VXLAN"] = "CrossSubnet"
        if ip_family != "ipv4":
            env["CALICO_IPV6POOL_VXLAN"] = "CrossSubnet"  # the same for IPv6 (vxlan-v6.calico)
    if mode == "bgp":
        paths = exabgp_paths(lab, node)
        env.update({
            "CALICO_NETWORKING_BACKEND": "bird",
            "FELIXPY_EXABGP_CONFIG": paths["config"],
            "FELIXPY_EXABGP_PIDFILE": paths["pid"],
            "FELIXPY_BGP_SOCKET": paths["socket"],
            "FELIXPY_BGP_STATUS": topology.bgp_status_file(lab, node),
            # A node whose Node gets a routeReflectorClusterID runs BIRD for its sessions, started by
            # its agent (docs/bgp.md): it inherits the lab's mark, so `down` stops it too.
            "FELIXPY_BIRD_CONFIG": f"{topology.bird_dir(lab, node)}/bird.conf",
            "FELIXPY_BIRD_SOCKET": f"{topology.bird_dir(lab, node)}/bird.ctl",
            "FELIXPY_BIRD_START": "true",
        })
    return env


def start_exabgp(lab: str, node: str, address: str | None = None) -> int:
    """Mode bgp: the node's ExaBGP, whose API process is our sidecar (`python -m bgp.sidecar`).

    The agent renders exabgp.conf from the datastore and reloads ExaBGP (SIGUSR1 to the pid in
    exabgp.pid, which ExaBGP writes itself). Before the agent's first render the file holds the
    process stanza only (no neighbours), rendered with the very same interpreter and socket, so
    that the agent's first reload keeps the sidecar running.
    """
    from bgp.config import SpeakerConfig, render_exabgp_conf, render_exabgp_env

    paths = exabgp_paths(lab, node)
    os.makedirs(topology.exabgp_dir(lab, node), exist_ok=True)
    exabgp = os.path.join(bin_dir(), "exabgp")
    if not os.path.exists(exabgp):
        raise LabCommandError((exabgp,), 127, "exabgp is not installed in this Python environment "
                                              "(pip install exabgp==5.0.15)")
    with open(paths["env"], "w") as f:
        f.write(render_exabgp_env(log_destination=paths["log"]))
    if not os.path.exists(paths["config"]):
        address = address or topology.node_ip(node)
        with open(paths["config"], "w") as f:
            f.write(render_exabgp_conf(SpeakerConfig(
                node_name=node, router_id=address, local_address=address, as_number=64512, peers=(),
                sidecar_socket=paths["socket"], python=sys.executable)))
    for stale in (paths["socket"], paths["pid"]):
        try:
            os.unlink(stale)  # a stale socket would look ready; a stale pid file would get signals
        except FileNotFoundError:
            pass
    env = {**base_env(), "exabgp_daemon_pid": paths["pid"], "FELIXPY_SIDECAR_LOG": "INFO"}
    return _spawn(lab, topology.node_netns(lab, node),
                  [exabgp, "--env-file", paths["env"], "server", paths["config"]], env,
                  f"{topology.exabgp_dir(lab, node)}/exabgp.out")


def wait_exabgp(lab: str, node: str, pid: int, timeout: float) -> str | None:
    """None once the sidecar's socket exists (ExaBGP started its API process), else why not."""
    path = exabgp_paths(lab, node)["socket"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return None
        if not alive(pid):
            return f"ExaBGP on {node} exited; see {topology.exabgp_dir(lab, node)}/exabgp.out"
        time.sleep(0.05)
    return f"ExaBGP on {node} not ready after {timeout:g} s; see {topology.exabgp_dir(lab, node)}/exabgp.out"


def start_agent(lab: str, node: str, pool: str, block_size: int, mode: str = "routes",
                cross_subnet: bool = False, datastore: str = "etcd", ip_family: str = "ipv4") -> int:
    nd = topology.node_dir(lab, node)
    os.makedirs(f"{nd}/lib", exist_ok=True)
    try:
        os.unlink(topology.cni_socket(lab, node))  # a stale socket would look ready
    except FileNotFoundError:
        pass
    argv = [sys.executable, "-m", "felixpy.node.main"]
    return _spawn(lab, topology.node_netns(lab, node), argv,
                  agent_env(lab, node, pool, block_size, mode=mode, cross_subnet=cross_subnet,
                            datastore=datastore, ip_family=ip_family),
                  f"{nd}/agent.log")


def bird_paths(lab: str, node: str) -> dict[str, str]:
    d = topology.bird_dir(lab, node)
    return {"config": f"{d}/bird.conf", "socket": f"{d}/bird.ctl", "out": f"{d}/bird.out"}


def start_bird(lab: str, node: str) -> int:
    """A reflector's BIRD 2 in the foreground (so the lab owns its pid), on the config felixpy-node renders.

    Before felixpy-node's first rendering the file holds a peer-less reflector configuration; later
    starts read whatever felixpy-node wrote last.
    """
    from bgp.bird import render_bird_reflector

    paths = bird_paths(lab, node)
    os.makedirs(topology.bird_dir(lab, node), exist_ok=True)
    if not shutil.which("bird"):
        raise LabCommandError(("bird",), 127, "bird is not installed (apt-get install bird2)")
    if not os.path.exists(paths["config"]):
        address = topology.node_ip(node)
        with open(paths["config"], "w") as f:
            f.write(render_bird_reflector(router_id=address, as_number=64512,
                                          cluster_id=topology.RR_CLUSTER_ID, peers=()))
    try:
        os.unlink(paths["socket"])  # a stale socket would look ready
    except FileNotFoundError:
        pass
    return _spawn(lab, topology.node_netns(lab, node),
                  ["bird", "-f", "-c", paths["config"], "-s", paths["socket"]], base_env(), paths["out"])


def wait_bird(lab: str, node: str, pid: int, timeout: float) -> str | None:
    """None once BIRD's control socket exists, else why not."""
    paths = bird_paths(lab, node)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(paths["socket"]):
            return None
        if not alive(pid):
            return f"BIRD on {node} exited; see {paths['out']}"
        time.sleep(0.05)
    return f"BIRD on {node} not ready after {timeout:g} s; see {paths['out']}"


def reflector_env(lab: str, node: str, pool: str, block_size: int, datastore: str = "etcd",
                  ip_family: str = "ipv4") -> dict[str, str]:
    """felixpy-node in route-reflector mode: the agent's environment plus BIRD's paths (and with
    --ip-family ipv6 / dual the node's IPv6 address, for the clients' IPv6 sessions)."""
    paths = bird_paths(lab, node)
    env = agent_env(lab, node, pool, block_size, mode="routes", datastore=datastore, ip_family=ip_family)
    env.update({
        "CALICO_NETWORKING_BACKEND": "bird",
        "FELIXPY_ROUTE_REFLECTOR": "true",
        "FELIXPY_BIRD_CONFIG": paths["config"],
        "FELIXPY_BIRD_SOCKET": paths["socket"],
        "FELIXPY_BIRD_START": "false",  # the lab owns BIRD (`speaker stop rr1` must stay stopped)
        "FELIXPY_BGP_STATUS": topology.bgp_status_file(lab, node),
    })
    return env


def start_reflector(lab: str, node: str, pool: str, block_size: int, datastore: str = "etcd",
                    ip_family: str = "ipv4") -> int:
    nd = topology.node_dir(lab, node)
    os.makedirs(f"{nd}/lib", exist_ok=True)
    argv = [sys.executable, "-m", "felixpy.node.main"]
    return _spawn(lab, topology.node_netns(lab, node), argv,
                  reflector_env(lab, node, pool, block_size, datastore, ip_family),
                  f"{nd}/agent.log")


def wait_reflector(lab: str, node: str, pid: int, timeout: float) -> str | None:
    """None once the reflector's status file is its own and says BIRD answers, else why not."""
    import json

    path = topology.bgp_status_file(lab, node)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("pid") == pid and data.get("sidecar") == "connected":
                return None
        except (OSError, ValueError):
            pass
        if not alive(pid):
            return f"reflector on {node} exited; see {topology.node_dir(lab, node)}/agent.log"
        time.sleep(0.1)
    return f"reflector on {node} not ready after {timeout:g} s; see {topology.node_dir(lab, node)}/agent.log"


def socket_accepts(path: str) -> bool:
    """True when the agent's CNI socket accepts a connection.

    The agent answers every connection once its peer has finished sending, so the probe sends
    nothing (half-close) and reads that answer before closing: the agent never writes to a
    closed socket on our account.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False
        try:
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
        except OSError:
            pass
        return True


def alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            # A zombie is dead for our purposes.
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def wait_agent(lab: str, node: str, pid: int, timeout: float) -> str | None:
    """None when the agent's CNI socket accepts connections, else why not."""
    path = topology.cni_socket(lab, node)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_accepts(path):
            return None
        if not alive(pid):
            return f"agent on {node} exited; see {topology.node_dir(lab, node)}/agent.log"
        time.sleep(0.1)
    return f"agent on {node} not ready after {timeout:g} s; see {topology.node_dir(lab, node)}/agent.log"


def log_tail(path: str, lines: int = 5) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-lines:]
    except FileNotFoundError:
        return []


def stop_pids(pids: set[int], timeout: float = 5.0) -> None:
    """SIGTERM, wait (bounded), then SIGKILL whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        pids = {p for p in pids if alive(p)}
        if not pids:
            return


def _own_lineage() -> set[int]:
    pids = set()
    pid = os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def marked_pids(lab: str) -> set[int]:
    """Every process whose environment carries FELIXPY_LAB=<lab>."""
    marker = f"{LAB_ENV}={lab}".encode()
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.add(int(entry))
        except OSError:
            continue
    return found


def lab_netns(lab: str, recorded: list[str]) -> list[str]:
    """The lab's namespaces that exist: recorded ones plus the fixed names, pods last, fabric very last."""
    existing = netns_list()
    names = set(recorded) | {n for n in existing if topology.is_node_netns(lab, n)}
    names.add(topology.fabric_netns(lab))
    ordered = sorted(n for n in names if n in existing and n != topology.fabric_netns(lab))
    if topology.fabric_netns(lab) in existing:
        ordered.append(topology.fabric_netns(lab))
    return ordered


def teardown(lab: str, recorded_netns: list[str]) -> tuple[int, int]:
    """Kill every process of the lab, delete its namespaces; returns (processes, namespaces).

    Processes are found by their FELIXPY_LAB mark (which covers every pid the state file records,
    without trusting a recorded pid that may have been reused) and by living in a lab namespace.
    """
    namespaces = lab_netns(lab, recorded_netns)
    pids = marked_pids(lab)
    for ns in namespaces:
        pids |= netns_pids(ns)
    pids -= _own_lineage()
    pids = {p for p in pids if alive(p)}
    stop_pids(pids)
    for ns in namespaces:
        netns_del(ns)
    return len(pids), len(namespaces)
