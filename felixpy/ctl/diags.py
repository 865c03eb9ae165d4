"""`felixctl node diags` and `felixctl cluster diags`: one tarball an operator can attach to a ticket.

node diags (calicoctl's, run on the node as root) collects what the node's kernel and agent hold:

    version.txt        felixpy, kernel, host, time
    network/           ip -d addr / link, routes of every table, ip rule, neighbours, bridge fdb, ss
    iptables/          iptables-save -c of every backend present (nft, legacy; IPv4 and IPv6)
    ipsets/            ipset list
    sysctl.txt         forwarding, rp_filter, neighbour-table limits
    checksystem.txt    felixctl node checksystem
    bgp/               the agent's bgp-status.json, `node status`, exabgp.conf, bird.conf,
                       `birdc show protocols all`, ExaBGP's log
    agent/             the agent's environment (felixpy's variables only) and its logs: its
                       stderr when that is a file, FELIX_LOGFILEPATH, and --log-dir
    MANIFEST.txt       every file, and every command that failed and why

The running agent is found through the BGP status file's pid, else by its command line in this
network namespace; its environment says where its files are (FELIXPY_EXABGP_CONFIG, ...).

cluster diags collects what the datastore holds: every projectcalico.org/v3 resource, the IPAM
blocks, affinities and handles, `ipam check`, and -- with a Kubernetes API -- the logs of the
felixpy-node and felixpy-controllers pods (--since, --max-logs per component, --focus-nodes first).

Secrets: every file passes a redactor before it is written. It replaces BGP passwords in the
ExaBGP (`md5-password ...;`) and BIRD (`password "...";`) configurations, every value of the
secret files under FELIXPY_SECRETS_DIR (and their base64 forms), and environment variables whose
names say PASSWORD, TOKEN, SECRET or KEY.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import socket
import tarfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import felixpy
from felixpy.logs import REDACTED, Redactor

if TYPE_CHECKING:
    from felixpy.datastore.api import Datastore

MAX_LOG_BYTES = 10 * 1024 * 1024  # per log file: its last 10 MiB
AGENT_ENV_PREFIXES = ("FELIX_", "FELIXPY_", "CALICO_", "ETCD_", "DATASTORE_TYPE", "NODENAME", "IP",
                      "KUBECONFIG", "K8S_", "CNI_", "WAIT_FOR_DATASTORE", "AS", "CLUSTER_TYPE")
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|KEY", re.IGNORECASE)
_EXABGP_MD5 = re.compile(r"(md5-password\s+)[^;\s]+")
_BIRD_PASSWORD = re.compile(r'(password\s+)"[^"\n]*"')
DEFAULT_LOG_DIR = "/var/log/calico"  # calicoctl node diags' --log-dir
DEFAULT_NAMESPACE = "kube-system"
COMPONENT_LABELS = {"felixpy-node": "app.kubernetes.io/name=felixpy-node",
                    "felixpy-controllers": "app.kubernetes.io/name=felixpy-controllers"}


# -- the tarball --------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """Files for the tarball, every one redacted on the way in."""

    prefix: str
    redactor: Redactor
    files: dict[str, bytes] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, name: str, text: str) -> None:
        self.files[name] = redact_text(text, self.redactor).encode()

    def problem(self, what: str, why: str) -> None:
        self.problems.append(f"{what}: {why}")

    def write(self, path: str) -> None:
        manifest = ["Files:", *(f"  {name}" for name in sorted(self.files))]
        if self.problems:
            manifest += ["", "Not collected:", *(f"  {p}" for p in self.problems)]
        self.add("MANIFEST.txt", "\n".join(manifest) + "\n")
        now = time.time()
        tmp = f"{path}.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for name, data in sorted(self.files.items()):
                info = tarfile.TarInfo(f"{self.prefix}/{name}")
                info.size, info.mtime, info.mode = len(data), int(now), 0o600
                tar.addfile(info, io.BytesIO(data))
        os.chmod(tmp, 0o600)  # diagnostics describe the node: not for everyone's eyes
        os.replace(tmp, path)


def redact_text(text: str, redactor: Redactor) -> str:
    text = _EXABGP_MD5.sub(lambda m: m.group(1) + REDACTED, text)
    text = _BIRD_PASSWORD.sub(lambda m: m.group(1) + f'"{REDACTED}"', text)
    return redactor.redact(text)


def secret_redactor(secrets_dirs: Iterable[str]) -> Redactor:
    """A redactor that knows every value under the mounted secret directories (name/key files)."""
    redactor = Redactor()
    for directory in secrets_dirs:
        for base, _dirs, files in os.walk(directory):
            for name in files:
                try:
                    with open(os.path.join(base, name), "rb") as f:
                        value = f.read(4096).decode(errors="replace")
                except OSError:
                    continue
                redactor.register(value)
    return redactor


def _tail(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - limit))
        data = f.read()
    text = data.decode(errors="replace")
    if size > limit:
        text = f"[first {size - limit} bytes left out]\n" + text.split("\n", 1)[-1]
    return text


# -- the running agent -----------------------------------------------------------------------------


def _proc_env(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        raw = f.read()
    env = {}
    for item in raw.split(b"\0"):
        if b"=" in item:
            key, value = item.split(b"=", 1)
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _same_netns(pid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def find_agent(status_file: str | None) -> int | None:
    """The pid of this node's felixpy-node: the BGP status file's, else a command line match in
    this network namespace (several labs' agents share one host)."""
    if status_file:
        from felixpy.node.bgp import read_status

        status = read_status(status_file)
        pid = (status or {}).get("pid")
        if isinstance(pid, int) and os.path.exists(f"/proc/{pid}"):
            return pid
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        words = [os.path.basename(a.decode(errors="replace")) for a in argv]
        if ("felixpy-node" in words or "felixpy.node.main" in words) and _same_netns(int(entry)):
            return int(entry)
    return None


def _status_file(env: Mapping[str, str]) -> str:
    if env.get("FELIXPY_BGP_STATUS"):
        return env["FELIXPY_BGP_STATUS"]
    from felixpy.config import DEFAULT_STATE_DIR
    from felixpy.node.bgp import STATUS_FILE_NAME

    return f"{(env.get('FELIXPY_STATE_DIR') or DEFAULT_STATE_DIR).rstrip('/')}/{STATUS_FILE_NAME}"


def agent_env_text(env: Mapping[str, str]) -> str:
    lines = []
    for key in sorted(env):
        if not key.startswith(AGENT_ENV_PREFIXES):
            continue
        value = REDACTED if _SECRET_NAME.search(key) else env[key]
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


# -- node diags ------------------------------------------------------------------------------------


Runner = Callable[[list[str]], str]


def _run_text(argv: list[str]) -> str:
    from felixpy.kernel import commands

    return commands.run(argv, timeout=30).stdout


NODE_COMMANDS: tuple[tuple[str, list[str]], ...] = (
    ("network/ip-addr.txt", ["ip", "-d", "addr", "show"]),
    ("network/ip-link.txt", ["ip", "-d", "-s", "link", "show"]),
    ("network/ip-route.txt", ["ip", "-4", "route", "show", "table", "all"]),
    ("network/ip6-route.txt", ["ip", "-6", "route", "show", "table", "all"]),
    ("network/ip-rule.txt", ["ip", "rule", "show"]),
    ("network/ip-neigh.txt", ["ip", "neigh", "show"]),
    ("network/bridge-fdb.txt", ["bridge", "fdb", "show"]),
    ("network/ss.txt", ["ss", "-a", "-n"]),
    ("iptables/iptables-nft-save.txt", ["iptables-nft-save", "-c"]),
    ("iptables/iptables-legacy-save.txt", ["iptables-legacy-save", "-c"]),
    ("iptables/ip6tables-nft-save.txt", ["ip6tables-nft-save", "-c"]),
    ("iptables/ip6tables-legacy-save.txt", ["ip6tables-legacy-save", "-c"]),
    ("ipsets/ipset-list.txt", ["ipset", "list"]),
    ("conntrack-stats.txt", ["conntrack", "-S"]),
)
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv4.conf.default.rp_filter",
           "net.ipv4.neigh.default.gc_thresh1", "net.ipv4.neigh.default.gc_thresh2",
           "net.ipv4.neigh.default.gc_thresh3", "net.netfilter.nf_conntrack_max",
           "net.netfilter.nf_conntrack_count")


def collect_node(env: Mapping[str, str], *, log_dirs: Iterable[str], run: Runner = _run_text,
                 max_log_bytes: int = MAX_LOG_BYTES) -> Bundle:
    status_file = _status_file(env)
    pid = find_agent(status_file)
    agent_env: dict[str, str] = {}
    if pid is not None:
        try:
            agent_env = _proc_env(pid)
        except OSError:
            agent_env = {}
    # The agent's settings win over ours: felixctl may run with none of them set.
    merged = {**env, **agent_env}
    status_file = _status_file(merged)
    secret_dirs = [d for d in {env.get("FELIXPY_SECRETS_DIR"), agent_env.get("FELIXPY_SECRETS_DIR")} if d]
    node = merged.get("NODENAME") or socket.gethostname()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    bundle = Bundle(f"felixpy-node-diags-{node}-{stamp}", secret_redactor(secret_dirs))
    uname = os.uname()
    bundle.add("version.txt", "\n".join([
        f"felixpy {felixpy.__version__}", f"kernel {uname.sysname} {uname.release} {uname.version} {uname.machine}",
        f"host {uname.nodename}", f"node {node}", f"collected {datetime.datetime.now().isoformat()}",
        f"agent pid {pid if pid is not None else 'not found'}"]) + "\n")
    for name, argv in NODE_COMMANDS:
        try:
            bundle.add(name, run(argv))
        except Exception as err:  # a missing tool or a failing command: say so, collect the rest
            bundle.problem(" ".join(argv), str(err).splitlines()[0] if str(err) else type(err).__name__)
    sysctl_lines = []
    for key in SYSCTLS:
        try:
            with open("/proc/sys/" + key.replace(".", "/")) as f:
                sysctl_lines.append(f"{key} = {f.read().strip()}")
        except OSError:
            sysctl_lines.append(f"{key}: not readable in this network namespace")
    bundle.add("sysctl.txt", "\n".join(sysctl_lines) + "\n")
    bundle.add("checksystem.txt", _checksystem_text())
    _collect_bgp(bundle, merged, status_file, run, max_log_bytes)
    _collect_agent(bundle, pid, agent_env, log_dirs, max_log_bytes)
    return bundle


def _checksystem_text() -> str:
    from felixpy.ctl.checksystem import Host, read_init_netns_sysctl, render_text, run_checks

    try:
        host = Host(init_netns_sysctl=read_init_netns_sysctl)
    except OSError as err:
        return f"checksystem failed: {err}\n"
    return render_text(host, run_checks(host, nodes=None, nodes_source="not looked up by diags"))


def _read_file(bundle: Bundle, name: str, path: str | None, max_bytes: int) -> None:
    if not path:
        return
    try:
        bundle.add(name, _tail(path, max_bytes))
    except OSError as err:
        bundle.problem(path, err.strerror or str(err))


def _collect_bgp(bundle: Bundle, env: Mapping[str, str], status_file: str, run: Runner, max_bytes: int) -> None:
    from felixpy.node.bgp import read_status

    status = read_status(status_file)
    if status is None:
        bundle.problem(status_file, "no BGP status (no BGP, or the agent has not written it)")
    else:
        bundle.add("bgp/bgp-status.json", json.dumps(status, indent=1) + "\n")
        bundle.add("bgp/node-status.txt", _node_status_table(status))
    _read_file(bundle, "bgp/exabgp.conf", env.get("FELIXPY_EXABGP_CONFIG"), max_bytes)
    exabgp_dir = os.path.dirname(env.get("FELIXPY_EXABGP_CONFIG") or "")
    for log in ("exabgp.log", "exabgp.out"):
        if exabgp_dir and os.path.exists(os.path.join(exabgp_dir, log)):
            _read_file(bundle, f"bgp/{log}", os.path.join(exabgp_dir, log), max_bytes)
    _read_file(bundle, "bgp/bird.conf", env.get("FELIXPY_BIRD_CONFIG"), max_bytes)
    socket_path = env.get("FELIXPY_BIRD_SOCKET")
    if socket_path and os.path.exists(socket_path):
        try:
            bundle.add("bgp/birdc-show-protocols.txt", run(["birdc", "-s", socket_path, "show", "protocols", "all"]))
        except Exception as err:
            bundle.problem("birdc show protocols all", str(err).splitlines()[0])


def _node_status_table(status: Mapping[str, Any]) -> str:
    lines = [f"node {status.get('node')} speaker {status.get('sidecar')} learned {status.get('learned')}",
             "PEER ADDRESS      TYPE        STATE         SINCE                 INFO"]
    for peer in status.get("peers") or []:
        since = datetime.datetime.fromtimestamp(float(peer.get("since") or 0)).isoformat(timespec="seconds")
        lines.append(f"{peer.get('peer', ''):<17} {peer.get('type', ''):<11} {peer.get('state', ''):<13} "
                     f"{since:<21} {peer.get('info', '')}")
    return "\n".join(lines) + "\n"


def _collect_agent(bundle: Bundle, pid: int | None, agent_env: Mapping[str, str], log_dirs: Iterable[str],
                   max_bytes: int) -> None:
    if pid is None:
        bundle.problem("felixpy-node", "no running agent found (status file pid or command line)")
    else:
        bundle.add("agent/environment.txt", agent_env_text(agent_env))
        try:
            stderr = os.path.realpath(f"/proc/{pid}/fd/2")
            if os.path.isfile(stderr):
                _read_file(bundle, "agent/stderr.log", stderr, max_bytes)
        except OSError as err:
            bundle.problem(f"/proc/{pid}/fd/2", err.strerror or str(err))
    log_file = agent_env.get("FELIX_LOGFILEPATH", "")
    if log_file and log_file.lower() != "none":
        _read_file(bundle, "agent/felix.log", log_file, max_bytes)
    for directory in log_dirs:
        if not os.path.isdir(directory):
            continue
        for base, _dirs, files in os.walk(directory):
            for name in sorted(files):
                if ".log" in name:
                    path = os.path.join(base, name)
                    rel = os.path.relpath(path, directory)
                    _read_file(bundle, f"logs/{rel}", path, max_bytes)


# -- cluster diags ---------------------------------------------------------------------------------


def collect_cluster(store: "Datastore", env: Mapping[str, str], *, since: float | None, max_logs: int,
                    focus_nodes: list[str], kube_http: Any | None = None) -> Bundle:
    import yaml

    from felixpy.datastore import keys
    from felixpy.ipam import check as ipam_check
    from felixpy.model import resources as r
    from felixpy.model import store as ms

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    secret_dirs = [env["FELIXPY_SECRETS_DIR"]] if env.get("FELIXPY_SECRETS_DIR") else []
    bundle = Bundle(f"felixpy-cluster-diags-{stamp}", secret_redactor(secret_dirs))
    bundle.add("version.txt", f"felixctl {felixpy.__version__}\ncollected {datetime.datetime.now().isoformat()}\n")
    _register_referenced_secrets(bundle.redactor, store, env)
    for kind in sorted(r.KINDS):
        try:
            items, _ = ms.list_resources(store, kind)
        except Exception as err:  # a kind this datastore does not serve: say so, go on
            bundle.problem(kind, str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        if items:
            bundle.add(f"datastore/{r.KINDS[kind].plural}.yaml", yaml.safe_dump_all(items, sort_keys=False))
    for prefix, name in ((keys.BLOCKS, "ipam/blocks.json"), (keys.HANDLES, "ipam/handles.json"),
                         (keys.HOSTS, "ipam/affinities.json")):
        kvs, _ = store.list(prefix)
        bundle.add(name, json.dumps({kv.key: kv.value for kv in kvs}, indent=1, sort_keys=True) + "\n")
    try:
        report = ipam_check.check(store)
        bundle.add("ipam/check.txt", "\n".join(report.lines()) + "\n")
        bundle.add("ipam/check.json", json.dumps(report.to_json(), indent=1) + "\n")
    except Exception as err:  # the rest of the bundle is still worth having
        bundle.problem("ipam check", str(err).splitlines()[0] if str(err) else type(err).__name__)
    if kube_http is None:
        bundle.problem("pod logs", "no Kubernetes API configured (KUBECONFIG, K8S_API_ENDPOINT or in-cluster)")
    else:
        _collect_pod_logs(bundle, kube_http, env, since=since, max_logs=max_logs, focus_nodes=focus_nodes)
    return bundle


def _register_referenced_secrets(redactor: Redactor, store: "Datastore", env: Mapping[str, str]) -> None:
    """The BGP passwords the datastore references, resolved as the agents resolve them (Kubernetes
    Secrets included), so their exact values are redacted wherever they turn up."""
    from felixpy.model import store as ms
    from felixpy.node.secrets import SecretResolver

    resolver = SecretResolver.from_env(env)
    if not resolver.configured:
        return
    refs = []
    for kind, field_name in (("BGPPeer", "password"), ("BGPConfiguration", "nodeMeshPassword")):
        try:
            items, _ = ms.list_resources(store, kind)
        except Exception:  # listed again below, where a failure is reported
            continue
        refs += [((item.get("spec") or {}).get(field_name), f"{kind} {(item.get('metadata') or {}).get('name')}")
                 for item in items]
    for ref, what in refs:
        if ref:
            redactor.register(resolver.resolve_ref(ref, what=f"{what} (diags redaction)"))


def _collect_pod_logs(bundle: Bundle, http: Any, env: Mapping[str, str], *, since: float | None, max_logs: int,
                      focus_nodes: list[str]) -> None:
    namespace = (env.get("FELIXPY_NAMESPACE") or DEFAULT_NAMESPACE).strip()
    for component, selector in COMPONENT_LABELS.items():
        try:
            pods = http.request("GET", f"/api/v1/namespaces/{namespace}/pods",
                                query={"labelSelector": selector}).get("items") or []
        except Exception as err:
            bundle.problem(f"{component} pods", str(err).splitlines()[0] if str(err) else type(err).__name__)
            continue
        # Pods on the focus nodes first, then the rest, up to max_logs.
        pods.sort(key=lambda p: (((p.get("spec") or {}).get("nodeName") not in focus_nodes),
                                 (p.get("metadata") or {}).get("name", "")))
        for pod in pods[:max_logs]:
            name = (pod.get("metadata") or {}).get("name", "")
            node = (pod.get("spec") or {}).get("nodeName", "")
            containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or []] or [""]
            for container in containers:
                query: dict[str, str] = {"timestamps": "true"}
                if container:
                    query["container"] = container
                if since is not None:
                    query["sinceSeconds"] = str(int(since))
                try:
                    text = http.request_text("GET", f"/api/v1/namespaces/{namespace}/pods/{name}/log", query=query)
                except Exception as err:
                    bundle.problem(f"log {namespace}/{name}/{container}",
                                   str(err).splitlines()[0] if str(err) else type(err).__name__)
                    continue
                bundle.add(f"logs/{component}/{node or 'unscheduled'}/{name}/{container or 'log'}.log", text)


# -- felixctl ---------------------------------------------------------------------------------------


_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")


def parse_since(text: str) -> float:
    from felixpy.ctl.errors import UserError

    match = _DURATION.match(text.strip())
    if not text.strip() or match is None or not any(match.groups()):
        raise UserError(f"--since {text!r}: expected a duration such as 30m, 2h or 90s")
    h, m, s = (int(g) if g else 0 for g in match.groups())
    return float(h * 3600 + m * 60 + s)


def _output_path(args: argparse.Namespace, bundle: Bundle) -> str:
    return args.output or os.path.join(os.getcwd(), f"{bundle.prefix}.tar.gz")


def add_node_parser(node_sub: Any) -> None:
    p = node_sub.add_parser("diags", help="collect this node's diagnostics into a tarball (run as root)",
                            description="Routes, rules, IP sets, BGP state, the agent's configuration and logs, "
                                        "redacted, in one tarball (docs/operations.md).")
    p.add_argument("--log-dir", action="append", metavar="DIR",
                   help=f"also collect *.log files under DIR (default {DEFAULT_LOG_DIR}; repeatable)")
    p.add_argument("--output", metavar="FILE", help="where to write the tarball (default ./<name>.tar.gz)")
    p.add_argument("--max-log-bytes", type=int, default=MAX_LOG_BYTES, metavar="N",
                   help="keep the last N bytes of each log file (default 10 MiB)")


def add_cluster_parser(cluster_sub: Any) -> None:
    p = cluster_sub.add_parser("diags", help="collect the datastore's objects and the felixpy pods' logs into a tarball",
                               description="Every v3 resource, the IPAM data and `ipam check`, and with a Kubernetes "
                                           "API the felixpy-node and felixpy-controllers pods' logs, redacted.")
    p.add_argument("--since", default="", metavar="DURATION", help="only logs newer than this (e.g. 30m)")
    p.add_argument("--max-logs", type=int, default=5, metavar="N",
                   help="logs of at most N pods per component (default 5)")
    p.add_argument("--focus-nodes", default="", metavar="NODES", help="comma-separated nodes whose logs come first")
    p.add_argument("--output", metavar="FILE", help="where to write the tarball (default ./<name>.tar.gz)")


def run_node(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from felixpy.ctl.errors import UserError

    if args.max_log_bytes < 1:
        raise UserError(f"--max-log-bytes {args.max_log_bytes}: expected a number of bytes >= 1")
    bundle = collect_node(env, log_dirs=args.log_dir or [DEFAULT_LOG_DIR], max_log_bytes=args.max_log_bytes)
    path = _output_path(args, bundle)
    try:
        bundle.write(path)
    except OSError as err:
        raise UserError(f"--output {path}: cannot write: {err.strerror or err}") from None
    for problem in bundle.problems:
        print(f"not collected: {problem}")
    print(f"Diags saved to {path}")
    return 0


def run_cluster(args: argparse.Namespace, open_store: Callable[[], "Datastore"], env: Mapping[str, str]) -> int:
    from felixpy.ctl.errors import UserError
    from felixpy.node.k8s_node import open_kube_http

    since = parse_since(args.since) if args.since else None
    if args.max_logs < 0:
        raise UserError(f"--max-logs {args.max_logs}: expected a number >= 0")
    focus = [n.strip() for n in args.focus_nodes.split(",") if n.strip()]
    try:
        kube = open_kube_http(env)
    except ValueError as err:
        raise UserError(str(err).splitlines()[0]) from None
    store = open_store()
    try:
        bundle = collect_cluster(store, env, since=since, max_logs=args.max_logs, focus_nodes=focus,
                                 kube_http=_TextHttp(kube) if kube is not None else None)
    finally:
        store.close()
    path = _output_path(args, bundle)
    try:
        bundle.write(path)
    except OSError as err:
        raise UserError(f"--output {path}: cannot write: {err.strerror or err}") from None
    for problem in bundle.problems:
        print(f"not collected: {problem}")
    print(f"Diags saved to {path}")
    return 0


class _TextHttp:
    """The Kubernetes datastore's HTTP layer, plus plain-text GETs (pod logs are not JSON)."""

    def __init__(self, http: Any) -> None:
        self._http = http

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._http.request(method, path, **kwargs)

    def request_text(self, method: str, path: str, *, query: Mapping[str, str]) -> str:
        from felixpy.datastore.kube import _ApiError

        pool, host = self._http._pool, self._http.host  # noqa: SLF001 - same connection settings
        resp = pool.request(method, host + path, fields=dict(query), headers=self._http._headers(None),
                            timeout=30.0)
        if not 200 <= resp.status < 300:
            raise _ApiError(resp.status, "Error", resp.data[:200].decode(errors="replace"))
        return str(resp.data.decode(errors="replace"))
