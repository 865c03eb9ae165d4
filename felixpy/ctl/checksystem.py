"""`felixctl node checksystem`: does this host have what felixpy-node needs? Each check PASS or FAIL,
and every FAIL says why and how to fix it.

calicoctl's checksystem looks for kernel modules only; this one checks what felixpy actually uses:

* kernel features, from the kernel configuration (`-f FILE`, else /proc/config.gz, else
  /boot/config-<release>) and the module tree (/proc/modules, /lib/modules/<release>/
  modules.builtin and modules.dep): ipip (IPIP pools), vxlan (VXLAN pools), veth (every pod),
  ip_set with the hash types felixpy's policy sets use, xt_set, conntrack, NAT and MASQUERADE
  (natOutgoing), the iptables matches felixpy's rules use (comment, multiport, mark), an
  iptables backend (nf_tables with nft_compat, or legacy ip_tables), TCP MD5 (BGP passwords);
* the userspace programs the agent runs (ipset, iptables-<backend>-restore/-save);
* sysctls: net.ipv4.ip_forward, and the neighbour-table limits (gc_thresh1/2/3) against the
  entries a node of this cluster needs: one per local pod, one per other node on the link and
  one more per node for VXLAN's VTEP entries. Those limits exist only in the host's network
  namespace (they are global); run in a node's namespace, they are read from the first of PID 1's
  and our ancestors' namespaces that has them.

A feature found loaded, built in, or installed as a module passes; one the configuration says is
not set, or that is nowhere to be found, fails. Pure reading: nothing is loaded or changed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from felixpy.datastore.api import Datastore

DEFAULT_MAX_PODS = 110  # kubelet's default --max-pods


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    ok: bool
    detail: str  # what was found
    fix: str = ""  # how to fix it (FAIL only)
    needed_for: str = ""


@dataclass(frozen=True, slots=True)
class KernelFeature:
    name: str  # module name, as modprobe knows it
    configs: tuple[str, ...]  # any of these CONFIG_ options provides it
    needed_for: str
    modules: tuple[str, ...] = ()  # other module names that provide it (older kernels)


FEATURES: tuple[KernelFeature, ...] = (
    KernelFeature("ipip", ("CONFIG_NET_IPIP",), "IP pools with ipipMode Always or CrossSubnet (tunl0)"),
    KernelFeature("vxlan", ("CONFIG_VXLAN",), "IP pools with vxlanMode Always or CrossSubnet (vxlan.calico)"),
    KernelFeature("veth", ("CONFIG_VETH",), "every pod (the cali* veth pairs)"),
    KernelFeature("ip_set", ("CONFIG_IP_SET",), "policy: selectors and CIDRs as IP sets"),
    KernelFeature("ip_set_hash_ip", ("CONFIG_IP_SET_HASH_IP",), "policy: hash:ip sets (endpoint selectors)"),
    KernelFeature("ip_set_hash_net", ("CONFIG_IP_SET_HASH_NET",), "policy: hash:net sets (CIDRs, IP pools)"),
    KernelFeature("ip_set_hash_ipport", ("CONFIG_IP_SET_HASH_IPPORT",), "policy: hash:ip,port sets (named ports)"),
    KernelFeature("xt_set", ("CONFIG_NETFILTER_XT_SET",), "policy: iptables -m set"),
    KernelFeature("nf_conntrack", ("CONFIG_NF_CONNTRACK",), "policy: replies of allowed connections"),
    KernelFeature("xt_conntrack", ("CONFIG_NETFILTER_XT_MATCH_CONNTRACK",), "policy: -m conntrack --ctstate"),
    KernelFeature("nf_nat", ("CONFIG_NF_NAT",), "natOutgoing"),
    KernelFeature("xt_MASQUERADE", ("CONFIG_NETFILTER_XT_TARGET_MASQUERADE", "CONFIG_IP_NF_TARGET_MASQUERADE"),
                  "natOutgoing (-j MASQUERADE)", ("ipt_MASQUERADE",)),
    KernelFeature("xt_comment", ("CONFIG_NETFILTER_XT_MATCH_COMMENT",), "every rule (the cali: hash comment)"),
    KernelFeature("xt_multiport", ("CONFIG_NETFILTER_XT_MATCH_MULTIPORT",), "policy: rules with several ports"),
    KernelFeature("xt_mark", ("CONFIG_NETFILTER_XT_MARK", "CONFIG_NETFILTER_XT_MATCH_MARK"), "policy: -m mark"),
    KernelFeature("tcp_md5", ("CONFIG_TCP_MD5SIG",), "BGP passwords (TCP MD5 signatures)"),
)
NFT_BACKEND = (KernelFeature("nf_tables", ("CONFIG_NF_TABLES",), ""),
               KernelFeature("nft_compat", ("CONFIG_NFT_COMPAT",), ""))
LEGACY_BACKEND = (KernelFeature("ip_tables", ("CONFIG_IP_NF_IPTABLES",), ""),
                  KernelFeature("iptable_filter", ("CONFIG_IP_NF_FILTER",), ""),
                  KernelFeature("iptable_nat", ("CONFIG_IP_NF_NAT",), ""))


# -- reading the host -------------------------------------------------------------------------------


class Host:
    """Everything checksystem reads, relative to `root` (tests point it at a fake tree)."""

    def __init__(self, root: str = "/", *, kernel_config: str | None = None,
                 release: str | None = None, which: Callable[[str], str | None] = shutil.which,
                 init_netns_sysctl: Callable[[str], str | None] | None = None) -> None:
        self.root = root
        self.release = release or os.uname().release
        self._which = which
        self._init_netns_sysctl = init_netns_sysctl
        self.config_source, self.config = self._load_config(kernel_config)
        self.loaded = self._module_names(self._read_lines("proc/modules"), first_field=True)
        module_dir = f"lib/modules/{self.release}"
        self.module_dir = self._path(module_dir)
        self.builtin = self._module_names(self._read_lines(f"{module_dir}/modules.builtin"))
        self.available = self._module_names(line.split(":", 1)[0]
                                            for line in self._read_lines(f"{module_dir}/modules.dep"))

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, rel.lstrip("/"))

    def _read_lines(self, rel: str) -> list[str]:
        try:
            with open(self._path(rel), errors="replace") as f:
                return f.read().splitlines()
        except OSError:
            return []

    @staticmethod
    def _module_names(lines: Iterable[str], *, first_field: bool = False) -> set[str]:
        names = set()
        for line in lines:
            text = line.split()[0] if first_field and line.split() else line.strip()
            base = os.path.basename(text)
            for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
                if base.endswith(suffix):
                    base = base[: -len(suffix)]
            if base:
                names.add(base.replace("-", "_"))
        return names

    def _load_config(self, explicit: str | None) -> tuple[str | None, dict[str, str]]:
        candidates = [explicit] if explicit else [self._path("proc/config.gz"),
                                                  self._path(f"boot/config-{self.release}")]
        for path in candidates:
            if path is None:
                continue
            try:
                opener = gzip.open if path.endswith(".gz") else open
                with opener(path, "rt", errors="replace") as f:
                    text = f.read()
            except OSError:
                if explicit:
                    raise
                continue
            config: dict[str, str] = {}
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("CONFIG_") and "=" in line:
                    key, value = line.split("=", 1)
                    config[key] = value
                elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
                    config[line[2:-len(" is not set")]] = "n"
            return path if explicit else path.replace(self.root.rstrip("/"), "", 1) or path, config
        return None, {}

    def which(self, program: str) -> str | None:
        return self._which(program)

    def sysctl(self, key: str) -> tuple[str | None, str]:
        """(value, where it was read); None when it exists nowhere we can read."""
        rel = "proc/sys/" + key.replace(".", "/")
        try:
            with open(self._path(rel)) as f:
                return f.read().strip(), "this network namespace"
        except OSError:
            pass
        if self._init_netns_sysctl is not None:
            value = self._init_netns_sysctl(key)
            if value is not None:
                return value, "the host's network namespace"
        return None, ""


def _candidate_netns() -> list[str]:
    """Network namespaces that may be the host's: PID 1's, then our ancestors' (a node's namespace
    is entered from the host's, and PID 1's may not be ours to enter, e.g. in a container)."""
    paths = ["/proc/1/ns/net"]
    pid = os.getppid()
    for _ in range(32):
        if pid <= 1:
            break
        paths.append(f"/proc/{pid}/ns/net")
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return paths


def read_init_netns_sysctl(key: str) -> str | None:
    """A sysctl of the host's network namespace. The neighbour-table limits exist only there (the
    kernel keeps them global), so the first namespace that has the file is the host's."""
    from felixpy.kernel.netns import NetnsError, run_in_netns

    def read() -> str | None:
        try:
            with open("/proc/sys/" + key.replace(".", "/")) as f:
                return f.read().strip()
        except OSError:
            return None

    for path in _candidate_netns():
        try:
            value = run_in_netns(path, read)
        except (NetnsError, OSError):
            continue
        if value is not None:
            return value
    return None


# -- the checks -------------------------------------------------------------------------------------


def feature_status(host: Host, feature: KernelFeature) -> tuple[bool, str]:
    names = (feature.name, *feature.modules)
    for name in names:
        if name in host.loaded:
            return True, f"module {name} loaded"
    for option in feature.configs:
        if host.config.get(option) == "y":
            return True, f"built in ({option}=y)"
    for name in names:
        if name in host.builtin:
            return True, f"built in (modules.builtin lists {name})"
        if name in host.available:
            return True, f"module {name} installed (loaded on first use)"
    for option in feature.configs:
        if host.config.get(option) == "m":
            return False, (f"{option}=m but module {feature.name} is not installed under "
                           f"{host.module_dir}")
    where = host.config_source
    if where is not None and all(host.config.get(o, "n") == "n" for o in feature.configs):
        return False, f"{' / '.join(feature.configs)} is not set in {where}"
    return False, (f"module {feature.name} is not loaded, not built in and not installed under "
                   f"{host.module_dir} (no kernel configuration found to say more)")


def _feature_fix(feature: KernelFeature, detail: str) -> str:
    if "not installed" in detail:
        return f"install the kernel's modules package (modprobe {feature.name} must work)"
    fix = f"use a kernel built with {feature.configs[0]}=m or =y"
    if feature.name == "ipip":
        fix += ", or give IP pools vxlanMode instead of ipipMode (felixpy leaves IPIP routes out otherwise)"
    return fix


def check_features(host: Host) -> list[CheckResult]:
    results = []
    for feature in FEATURES:
        ok, detail = feature_status(host, feature)
        results.append(CheckResult(feature.name, ok, detail, "" if ok else _feature_fix(feature, detail),
                                   feature.needed_for))
    return results


def check_iptables(host: Host, backend: str) -> list[CheckResult]:
    """The kernel side and the programs of the iptables backend felixpy will use."""
    kernel = {}
    for name, features in (("nft", NFT_BACKEND), ("legacy", LEGACY_BACKEND)):
        states = [(f.name, *feature_status(host, f)) for f in features]
        kernel[name] = ([n for n, ok, _ in states if not ok], "; ".join(d for _, ok, d in states if not ok))
    programs = {b: [p for p in (f"iptables-{b}-restore", f"iptables-{b}-save") if host.which(p) is None]
                for b in ("nft", "legacy")}
    wanted = ("nft", "legacy") if backend == "auto" else (backend,)
    usable = [b for b in wanted if not kernel[b][0] and not programs[b]]
    needed_for = "every iptables rule (FELIX_IPTABLESBACKEND=" + backend + ")"
    if usable:
        return [CheckResult("iptables", True, f"backend {', '.join(usable)}: kernel support and "
                            f"iptables-{usable[0]}-restore/-save present", needed_for=needed_for)]
    reasons = []
    for b in wanted:
        missing = kernel[b][0] + programs[b]
        reasons.append(f"{b}: missing {', '.join(missing)}" + (f" ({kernel[b][1]})" if kernel[b][1] else ""))
    return [CheckResult("iptables", False, "; ".join(reasons),
                        "install the iptables package (Debian: apt-get install iptables) and use a kernel with "
                        "CONFIG_NF_TABLES and CONFIG_NFT_COMPAT (or CONFIG_IP_NF_IPTABLES for legacy)", needed_for)]


def check_programs(host: Host) -> list[CheckResult]:
    path = host.which("ipset")
    if path:
        return [CheckResult("ipset", True, f"{path}", needed_for="policy: ipset restore")]
    return [CheckResult("ipset", False, "ipset is not on PATH", "install the ipset package (apt-get install ipset)",
                        "policy: ipset restore")]


def neighbour_limits(nodes: int, max_pods: int) -> int:
    """Neighbour entries a node of this cluster may hold: one per local pod, and per other node one
    on the link plus one permanent VXLAN VTEP entry."""
    return max_pods + 2 * max(nodes - 1, 0)


def _power_of_two_at_least(n: int) -> int:
    return 1 << max(7, math.ceil(math.log2(max(n, 1))))


def check_sysctls(host: Host, *, nodes: int | None, nodes_source: str, max_pods: int) -> list[CheckResult]:
    results = []
    forward, where = host.sysctl("net.ipv4.ip_forward")
    if forward == "1":
        results.append(CheckResult("net.ipv4.ip_forward", True, f"1 ({where})", needed_for="routing pod traffic"))
    else:
        results.append(CheckResult(
            "net.ipv4.ip_forward", False, f"{forward if forward is not None else 'unreadable'} ({where or '-'})",
            "sysctl -w net.ipv4.ip_forward=1 (felixpy-node also sets it when it starts)", "routing pod traffic"))
    name = "neighbour table"
    needed_for = "ARP/neighbour entries for local pods, other nodes and VXLAN VTEPs"
    values = {}
    for i in (1, 2, 3):
        value, where = host.sysctl(f"net.ipv4.neigh.default.gc_thresh{i}")
        values[i] = int(value) if value is not None and value.isdigit() else None
    if None in values.values():
        return results + [CheckResult(name, False, "net.ipv4.neigh.default.gc_thresh1/2/3 cannot be read here or in "
                                      "the host's network namespace", "run felixctl node checksystem as root on the host",
                                      needed_for)]
    if nodes is None:
        return results + [CheckResult(
            name, False, f"gc_thresh1/2/3 = {values[1]}/{values[2]}/{values[3]}, but the cluster's size is unknown "
            f"({nodes_source})", "pass --nodes N (the number of nodes in the cluster)", needed_for)]
    needed = neighbour_limits(nodes, max_pods)
    detail = (f"gc_thresh1/2/3 = {values[1]}/{values[2]}/{values[3]} ({where}); this node may need {needed} entries "
              f"({nodes} nodes {nodes_source}, up to {max_pods} pods here)")
    assert values[2] is not None and values[3] is not None
    if values[2] >= needed and values[3] >= 2 * needed:
        return results + [CheckResult(name, True, detail, needed_for=needed_for)]
    why = ("above gc_thresh3 the kernel refuses new entries (\"No buffer space available\", \"neighbour table "
           "overflow\")" if values[3] < needed else
           "above gc_thresh2 the kernel garbage-collects entries still in use after 5 s, and gc_thresh3 leaves "
           "less than twice that as headroom")
    thresh2 = _power_of_two_at_least(needed)
    fix = (f"sysctl -w net.ipv4.neigh.default.gc_thresh1={thresh2 // 2} "
           f"net.ipv4.neigh.default.gc_thresh2={thresh2} net.ipv4.neigh.default.gc_thresh3={thresh2 * 2}")
    return results + [CheckResult(name, False, f"{detail}: {why}", fix, needed_for)]


def run_checks(host: Host, *, backend: str = "auto", nodes: int | None = None, nodes_source: str = "",
               max_pods: int = DEFAULT_MAX_PODS) -> list[CheckResult]:
    return (check_features(host) + check_iptables(host, backend) + check_programs(host)
            + check_sysctls(host, nodes=nodes, nodes_source=nodes_source, max_pods=max_pods))


# -- felixctl ---------------------------------------------------------------------------------------


def render_text(host: Host, results: Sequence[CheckResult]) -> str:
    width = max(len(r.name) for r in results)
    source = host.config_source or "no kernel configuration found"
    lines = [f"Kernel {host.release} (configuration: {source})"]
    for r in results:
        lines.append(f"{'PASS' if r.ok else 'FAIL'}  {r.name:<{width}}  {r.detail}")
        if not r.ok:
            if r.needed_for:
                lines.append(f"      {'':<{width}}  needed for: {r.needed_for}")
            lines.append(f"      {'':<{width}}  fix: {r.fix}")
    failed = sum(not r.ok for r in results)
    if failed:
        lines.append(f"System doesn't meet {failed} of felixpy's {len(results)} requirements.")
    else:
        lines.append(f"System meets all {len(results)} of felixpy's requirements.")
    return "\n".join(lines) + "\n"


def render_json(host: Host, results: Sequence[CheckResult]) -> str:
    return json.dumps({"kernel": host.release, "kernelConfig": host.config_source,
                       "checks": [{"name": r.name, "result": "PASS" if r.ok else "FAIL", "detail": r.detail,
                                   "fix": r.fix, "neededFor": r.needed_for} for r in results],
                       "ok": all(r.ok for r in results)}, indent=2) + "\n"


def cluster_size(env: Mapping[str, str], open_store: Callable[[], "Datastore"]) -> tuple[int | None, str]:
    """(number of Calico Nodes, where that came from) from the datastore the environment names."""
    if not (env.get("ETCD_ENDPOINTS") or env.get("DATASTORE_TYPE") or env.get("KUBECONFIG")
            or env.get("K8S_API_ENDPOINT")):
        return None, "no datastore configured"
    from felixpy.datastore import keys
    from felixpy.datastore.api import DatastoreError

    try:
        store = open_store()
    except (DatastoreError, ValueError) as err:
        return None, f"datastore: {str(err).splitlines()[0]}"
    try:
        kvs, _ = store.list(keys.resource_prefix("nodes"))
        return len(kvs), "in the datastore"
    except DatastoreError as err:
        return None, f"datastore unreachable: {str(err).splitlines()[0]}"
    finally:
        store.close()


def add_parser(node_sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:  # noqa: SLF001
    p = node_sub.add_parser(
        "checksystem", help="check this host's kernel, programs and sysctls for felixpy-node",
        description="Each check PASS or FAIL with the fix; exit 1 when any fails. The cluster's size for the "
                    "neighbour-table check comes from --nodes, else from the datastore the environment names.")
    p.add_argument("-f", "--kernel-config", metavar="FILE",
                   help="kernel configuration to read (default /proc/config.gz, else /boot/config-<release>)")
    p.add_argument("--nodes", type=int, metavar="N", help="number of nodes in the cluster")
    p.add_argument("--max-pods", type=int, default=DEFAULT_MAX_PODS, metavar="N",
                   help=f"pods per node (kubelet --max-pods, default {DEFAULT_MAX_PODS})")
    p.add_argument("-o", "--output", default="text", choices=("text", "json"))


def run(args: argparse.Namespace, open_store: Callable[[], "Datastore"], env: Mapping[str, str]) -> int:
    from felixpy.ctl.errors import UserError

    if args.nodes is not None and args.nodes < 1:
        raise UserError(f"--nodes {args.nodes}: expected a number of nodes >= 1")
    if args.max_pods < 0:
        raise UserError(f"--max-pods {args.max_pods}: expected a number >= 0")
    try:
        host = Host(kernel_config=args.kernel_config, init_netns_sysctl=read_init_netns_sysctl)
    except OSError as err:
        raise UserError(f"--kernel-config {args.kernel_config}: cannot read: {err.strerror or err}") from None
    if args.nodes is not None:
        nodes, source = args.nodes, "from --nodes"
    else:
        nodes, source = cluster_size(env, open_store)
    backend = (env.get("FELIX_IPTABLESBACKEND") or "auto").strip().lower()
    if backend not in ("auto", "nft", "legacy"):
        backend = "auto"
    results = run_checks(host, backend=backend, nodes=nodes, nodes_source=source, max_pods=args.max_pods)
    render = render_json if args.output == "json" else render_text
    print(render(host, results), end="")
    return 0 if all(r.ok for r in results) else 1
