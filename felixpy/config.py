"""The agent's configuration, read from calico-node's environment variables into typed values.

`load_config(env)` is pure: it reads only the mapping it is given (never the process environment,
the filesystem or the network) and returns a frozen `Config`, or raises `ConfigError` whose message
is one line naming the variable and what it accepts. Anything that needs the host (the default pool
CIDR, the node name from the nodename file, IP autodetection) is decided later, in node/startup.py.

Every variable is described once, in `VARIABLES`; error messages quote its `accepts` text and
docs/configuration.md is generated from it (`python -m felixpy.config > docs/configuration.md`;
a unit test checks the file is current).

Names, values and defaults are calico-node's (calico-reference.md §1). Where felixpy differs, the
description says so.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import sys
import types
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, TypeVar
from urllib.parse import urlsplit

from felixpy import names

log = logging.getLogger(__name__)

T = TypeVar("T")


class ConfigError(ValueError):
    """An environment variable has a value felixpy cannot use; str() is one line for the user."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


# --------------------------------------------------------------------------------------------
# The variables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variable:
    """One environment variable: what it means, its default, and what it accepts (for errors)."""

    name: str
    group: str
    default: str
    accepts: str
    description: str


ENCAP_ACCEPTS = 'accepted values are Always, CrossSubnet, Never (case-insensitive; also "", off, cross-subnet)'
BOOL_ACCEPTS = "accepted values are true, false (case-insensitive; also 1, 0, yes, no, y, n, t, f)"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR", "FATAL")  # Felix's
LOG_LEVEL_ACCEPTS = "accepted values are TRACE, DEBUG, INFO, WARNING, ERROR, FATAL (case-insensitive)"
SECONDS_ACCEPTS = "expected a number of seconds >= 0 (0 disables)"
MTU_ACCEPTS = "expected 0 (auto) or an MTU from 68 to 65535"
FAILSAFE_ACCEPTS = 'expected a comma-separated list of PROTOCOL:PORT (tcp, udp or sctp; e.g. "tcp:22,udp:68") or none'
DEFAULT_FAILSAFE_INBOUND = (("tcp", 22), ("udp", 68), ("tcp", 179), ("tcp", 2379), ("tcp", 2380),
                            ("tcp", 5473), ("tcp", 6443), ("tcp", 6666), ("tcp", 6667))
DEFAULT_FAILSAFE_OUTBOUND = (("udp", 53), ("udp", 67), ("tcp", 179), ("tcp", 2379), ("tcp", 2380),
                             ("tcp", 5473), ("tcp", 6443), ("tcp", 6666), ("tcp", 6667))
ABS_PATH_ACCEPTS = "expected an absolute path"
AUTODETECT_ACCEPTS = (
    "accepted values are first-found, interface=REGEX[,REGEX...], skip-interface=REGEX[,REGEX...], "
    "cidr=CIDR[,CIDR...], can-reach=IP|HOSTNAME, kubernetes-internal-ip"
)

# calico-node's default MTUIfacePattern: the names systemd and older kernels give physical NICs.
DEFAULT_MTU_IFACE_PATTERN = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)"
DEFAULT_NODENAME_FILE = "/var/lib/calico/nodename"
DEFAULT_STATE_DIR = "/var/lib/calico"
DEFAULT_CNI_SOCKET = "/var/run/calico/felixpy-cni.sock"
DEFAULT_IPV4_POOL_CIDR = "192.168.0.0/16"

_VARS: list[Variable] = [
    # -- node identity and addressing (§1.3, §1.4)
    Variable("NODENAME", "Node", "(see description)", 'expected a lowercase RFC 1123 name (a-z, 0-9, "-", "."; at most 253 characters)',
             "Node name. Precedence: `NODENAME`, then the nodename file, then `HOSTNAME` lower-cased, "
             "then the OS hostname lower-cased. The chosen name is cached into the nodename file."),
    Variable("CALICO_NODENAME_FILE", "Node", "`$FELIXPY_STATE_DIR/nodename` (`/var/lib/calico/nodename`)", ABS_PATH_ACCEPTS,
             "Where the node name is cached between restarts."),
    Variable("HOSTNAME", "Node", "unset", "any value (lower-cased before use)",
             "Fallback node name when neither `NODENAME` nor the nodename file gives one."),
    Variable("IP", "Node", "unset", 'expected "", autodetect, none, an IPv4 address or an IPv4 CIDR (e.g. 192.0.2.10 or 192.0.2.10/24)',
             "Node IPv4 address, stored as a CIDR in `Node.spec.bgp.ipv4Address`. Unset or `\"\"`: keep the "
             "Node's address, autodetect if it has none. `autodetect`: detect on every start. `none`: no IPv4. "
             "An address without a prefix gets the prefix of the local interface that carries it."),
    Variable("IP_AUTODETECTION_METHOD", "Node", "`first-found`", AUTODETECT_ACCEPTS,
             "How the IPv4 address is detected. Regexes are searched (unanchored) in interface names. "
             "`first-found` and `skip-interface` exclude docker, veth, cali, tunl, vxlan.calico, lo and "
             "similar interfaces. `kubernetes-internal-ip` takes the first InternalIP of the Kubernetes Node "
             "named like this node (read from the Kubernetes API: KUBECONFIG, or the pod's service "
             "account, also with the etcd datastore) with the prefix of the local interface carrying it; "
             "startup stops with one line when there is no API, no such Node, no InternalIP or no such "
             "local address."),
    Variable("IP6", "Node", "unset", 'expected "", autodetect, none, an IPv6 address or an IPv6 CIDR',
             "Node IPv6 address, stored as a CIDR in `Node.spec.bgp.ipv6Address`. As `IP`, except that "
             "unset never autodetects (it keeps the Node's address, or none): only `autodetect` does. "
             "Other nodes route to this node's IPv6 blocks over it (vxlan backend: unencapsulated or "
             "vxlan-v6.calico; bird backend: the node's IPv6 BGP sessions run between these addresses)."),
    Variable("IP6_AUTODETECTION_METHOD", "Node", "`first-found`", AUTODETECT_ACCEPTS,
             "How the IPv6 address is detected when `IP6=autodetect` (global unicast addresses only)."),
    Variable("AS", "Node", "unset (keep the Node's value, else the global AS)",
             "expected an AS number from 1 to 4294967295, or asdot A.B with A and B from 0 to 65535",
             "The node's BGP AS number (`Node.spec.bgp.asNumber`)."),
    Variable("DISABLE_NODE_IP_CHECK", "Node", "`false`", BOOL_ACCEPTS,
             "`true` skips the check that no other Node has the same IPv4 address."),
    Variable("CALICO_NETWORKING_BACKEND", "Node", "`bird`", "accepted values are bird, vxlan, none (case-insensitive; bgp means bird)",
             "Networking backend. `bird` (BGP), `vxlan`, or `none` (policy only: a missing IPv4 address is "
             "not fatal). Legacy `CALICO_NETWORKING=false` means `none` when this is unset."),
    Variable("CLUSTER_TYPE", "Node", '`""`', "any comma-separated list",
             "Free-form; written to `ClusterInformation.spec.clusterType`."),
    # -- default IPv4 pool (§1.2)
    Variable("CALICO_IPV4POOL_CIDR", "IPv4 pool", "`192.168.0.0/16`, or the first of `172.16.0.0/16`..`172.31.0.0/16` not overlapping a host network",
             'expected an IPv4 CIDR such as 10.244.0.0/16, at least as large as the block size, or "none"',
             "CIDR of the default pool `default-ipv4-ippool`, created only when no IPv4 pool exists (never "
             "updated). `none` creates no IPv4 pool."),
    Variable("CALICO_IPV4POOL_BLOCK_SIZE", "IPv4 pool", "`26`", "expected an integer from 20 to 32",
             "Prefix length of the IPAM blocks of the default pool."),
    Variable("CALICO_IPV4POOL_IPIP", "IPv4 pool", "`Never`", ENCAP_ACCEPTS,
             "`ipipMode` of the default pool (calico-node's code default; its manifest sets `Always`)."),
    Variable("CALICO_IPV4POOL_VXLAN", "IPv4 pool", "`Never`", ENCAP_ACCEPTS,
             "`vxlanMode` of the default pool. IPIP and VXLAN cannot both be enabled."),
    Variable("CALICO_IPV4POOL_NAT_OUTGOING", "IPv4 pool", "`true`", "false, 0, no, n, f (case-insensitive) mean false; any other value means true",
             "`natOutgoing` of the default pool."),
    Variable("CALICO_IPV4POOL_NODE_SELECTOR", "IPv4 pool", "`all()`", 'expected a Calico selector such as all() or zone == "a"',
             "`nodeSelector` of the default pool."),
    Variable("CALICO_IPV4POOL_DISABLE_BGP_EXPORT", "IPv4 pool", "`false`", BOOL_ACCEPTS,
             "`disableBGPExport` of the default pool."),
    Variable("NO_DEFAULT_POOLS", "IPv4 pool", "`false`", BOOL_ACCEPTS,
             "`true` creates no default pool; an error together with `CALICO_IPV4POOL_CIDR` or "
             "`CALICO_IPV6POOL_CIDR`."),
    # -- default IPv6 pool (§1.2)
    Variable("CALICO_IPV6POOL_CIDR", "IPv6 pool", "a random RFC 4193 ULA /48 (`fdXX:XXXX:XXXX::/48`)",
             'expected an IPv6 CIDR such as fd00:10:244::/48, at least as large as the block size, or "none"',
             "CIDR of the default pool `default-ipv6-ippool`, created only when no IPv6 pool exists (never "
             "updated) and IPv6 is supported (`FELIX_IPV6SUPPORT` true and the kernel has IPv6). `none` "
             "creates no IPv6 pool."),
    Variable("CALICO_IPV6POOL_BLOCK_SIZE", "IPv6 pool", "`122`", "expected an integer from 116 to 128",
             "Prefix length of the IPAM blocks of the default IPv6 pool."),
    Variable("CALICO_IPV6POOL_VXLAN", "IPv6 pool", "`Never`", ENCAP_ACCEPTS,
             "`vxlanMode` of the default IPv6 pool (IPv6 pools have no IPIP)."),
    Variable("CALICO_IPV6POOL_NAT_OUTGOING", "IPv6 pool", "`false`",
             "false, 0, no, n, f (case-insensitive) mean false; any other value means true",
             "`natOutgoing` of the default IPv6 pool."),
    Variable("CALICO_IPV6POOL_NODE_SELECTOR", "IPv6 pool", "`all()`", 'expected a Calico selector such as all() or zone == "a"',
             "`nodeSelector` of the default IPv6 pool."),
    Variable("CALICO_IPV6POOL_DISABLE_BGP_EXPORT", "IPv6 pool", "`false`", BOOL_ACCEPTS,
             "`disableBGPExport` of the default IPv6 pool."),
    # -- datastore (§1.5)
    Variable("DATASTORE_TYPE", "Datastore", "`etcdv3` if `ETCD_ENDPOINTS` is set, else `kubernetes`", "accepted values are etcdv3, kubernetes",
             "Datastore backend. Like every datastore variable also read as `CALICO_DATASTORE_TYPE` "
             "(the `CALICO_` spelling wins when both are set)."),
    Variable("ETCD_ENDPOINTS", "Datastore", "unset", "expected a comma-separated list of http(s)://HOST:PORT URLs",
             "etcd v3 endpoints."),
    Variable("ETCD_KEY_FILE", "Datastore", "unset", "expected an absolute path, set together with ETCD_CERT_FILE",
             "Client TLS key for etcd."),
    Variable("ETCD_CERT_FILE", "Datastore", "unset", "expected an absolute path, set together with ETCD_KEY_FILE",
             "Client TLS certificate for etcd."),
    Variable("ETCD_CA_CERT_FILE", "Datastore", "unset", ABS_PATH_ACCEPTS,
             "CA bundle that verifies the etcd servers."),
    Variable("KUBECONFIG", "Datastore", "unset", "any path",
             "kubeconfig for the Kubernetes datastore."),
    Variable("WAIT_FOR_DATASTORE", "Datastore", "`false`", 'only the literal "true" enables waiting',
             "`true`: at startup, retry until the datastore answers."),
    # -- Felix parameters (§1.8, §1.9): FELIX_<NAME>, case-insensitive
    Variable("FELIX_ROUTEREFRESHINTERVAL", "Felix", "`90`", SECONDS_ACCEPTS,
             "Seconds between full route table resyncs."),
    Variable("FELIX_IPTABLESREFRESHINTERVAL", "Felix", "`180`", SECONDS_ACCEPTS,
             "Seconds between full iptables resyncs."),
    Variable("FELIX_IPSETSREFRESHINTERVAL", "Felix", "`90`", SECONDS_ACCEPTS,
             "Seconds between full ipset resyncs."),
    Variable("FELIX_LOGSEVERITYSCREEN", "Felix", "`INFO`", LOG_LEVEL_ACCEPTS,
             "Log level of the agent on stderr (Calico's line format, see docs/operations.md). felixpy "
             "has no trace-level messages: TRACE shows what DEBUG shows."),
    Variable("FELIX_LOGFILEPATH", "Felix", "`none`", 'expected an absolute path, or "none"',
             "Also log to this file (reopened when logrotate moves it). Felix's own default is "
             "`/var/log/calico/felix.log`; calico-node sets `none`, and so does felixpy-node."),
    Variable("FELIX_LOGSEVERITYFILE", "Felix", "`INFO`", LOG_LEVEL_ACCEPTS,
             "Log level of the log file."),
    Variable("FELIX_LOGDEBUGFILENAMEREGEX", "Felix", "unset", "expected a regular expression",
             "Debug (and trace) lines are kept only from source files whose base name matches, "
             "e.g. `bgp\\.py|secrets\\.py`; other levels are not filtered."),
    Variable("FELIX_IPV6SUPPORT", "Felix", "`true`", BOOL_ACCEPTS,
             "Program IPv6 as well as IPv4: routes to IPv6 pods and blocks, vxlan-v6.calico, ip6tables "
             "and IPv6 ipsets. `false` leaves every IPv6 route, rule and set alone and creates no "
             "default IPv6 pool (calico-node's manifest sets `false`; felixpy's lab does not)."),
    Variable("FELIX_VXLANMTU", "Felix", "`0`", MTU_ACCEPTS,
             "Pod MTU when VXLAN is in use; 0 = host MTU - 50."),
    Variable("FELIX_VXLANMTUV6", "Felix", "`0`", MTU_ACCEPTS,
             "MTU of vxlan-v6.calico and the pod MTU when IPv6 VXLAN is in use; 0 = host MTU - 70."),
    Variable("FELIX_IPINIPMTU", "Felix", "`0`", MTU_ACCEPTS,
             "Pod MTU when IPIP is in use; 0 = host MTU - 20."),
    Variable("FELIX_VXLANVNI", "Felix", "`4096`", "expected an integer from 1 to 16777215",
             "VNI of vxlan.calico (a change recreates the device)."),
    Variable("FELIX_VXLANPORT", "Felix", "`4789`", "expected a UDP port from 1 to 65535",
             "UDP port of vxlan.calico (a change recreates the device)."),
    Variable("FELIX_MTUIFACEPATTERN", "Felix", f"`{DEFAULT_MTU_IFACE_PATTERN}`", "expected a regular expression",
             "Interfaces whose smallest MTU is the host MTU (1460 when none is up)."),
    Variable("FELIX_IPTABLESBACKEND", "Felix", "`auto`", "accepted values are auto, legacy, nft (case-insensitive)",
             "Which iptables binaries to use."),
    Variable("FELIX_CHAININSERTMODE", "Felix", "`insert`", "accepted values are insert, append (case-insensitive)",
             "Where felixpy's jump rules go in the kernel's built-in chains (INPUT, FORWARD, OUTPUT, "
             "POSTROUTING): `insert` at the top, `append` at the bottom, after everyone else's rules."),
    Variable("FELIX_NATOUTGOINGADDRESS", "Felix", "unset", 'expected an IPv4 address, or "none"',
             "natOutgoing traffic leaves with this source address (SNAT) instead of the outgoing "
             "interface's (MASQUERADE)."),
    Variable("FELIX_NATPORTRANGE", "Felix", "unset", 'expected MIN:MAX or one port (1-65535), or "none"',
             "Source ports natOutgoing uses for TCP and UDP."),
    Variable("FELIX_DEFAULTENDPOINTTOHOSTACTION", "Felix", "`DROP`", "accepted values are DROP, RETURN, ACCEPT (case-insensitive)",
             "What happens to traffic from a pod to its own host."),
    Variable("FELIX_HEALTHENABLED", "Felix", "`false`", BOOL_ACCEPTS, "Serve /liveness and /readiness."),
    Variable("FELIX_HEALTHPORT", "Felix", "`9099`", "expected a TCP port from 1 to 65535", "Port of the health endpoints."),
    Variable("FELIX_HEALTHHOST", "Felix", "`localhost`", "expected a host name or IP address",
             "Address the health endpoints listen on."),
    Variable("FELIX_PROMETHEUSMETRICSENABLED", "Felix", "`false`", BOOL_ACCEPTS,
             "Serve Prometheus metrics (`felixpy_*`, see docs/operations.md)."),
    Variable("FELIX_PROMETHEUSMETRICSPORT", "Felix", "`9091`", "expected a TCP port from 1 to 65535",
             "Port of the metrics endpoint."),
    Variable("FELIX_PROMETHEUSMETRICSHOST", "Felix", "`\"\"` (all addresses)", "expected a host name or IP address",
             "Address the metrics endpoint listens on."),
    Variable("FELIX_FAILSAFEINBOUNDHOSTPORTS", "Felix",
             "`tcp:22,udp:68,tcp:179,tcp:2379,tcp:2380,tcp:5473,tcp:6443,tcp:6666,tcp:6667`", FAILSAFE_ACCEPTS,
             "Inbound host ports felixpy policy never blocks (`none` for no failsafes)."),
    Variable("FELIX_FAILSAFEOUTBOUNDHOSTPORTS", "Felix",
             "`udp:53,udp:67,tcp:179,tcp:2379,tcp:2380,tcp:5473,tcp:6443,tcp:6666,tcp:6667`", FAILSAFE_ACCEPTS,
             "Outbound host ports felixpy policy never blocks (`none` for no failsafes)."),
    Variable("FELIX_INTERFACEPREFIX", "Felix", "`cali`",
             'expected a comma-separated list of interface name prefixes (1-14 of a-z, A-Z, 0-9, ".", "-", "_")',
             "Host-side names of pod interfaces start with one of these."),
    Variable("FELIX_*", "Felix", "", "any value",
             "Every other `FELIX_` variable is kept (case-insensitively) in `Config.felix.params` and "
             "logged at startup when felixpy does not use it. Each parameter above can also be set in "
             "the FelixConfiguration resources `node.<name>` and `default` (see the precedence above)."),
    # -- felixpy's own
    Variable("FELIXPY_CNI_SOCKET", "felixpy", f"`{DEFAULT_CNI_SOCKET}`", ABS_PATH_ACCEPTS,
             "Unix socket the `felixpy-cni` plugin talks to."),
    Variable("FELIXPY_STATE_DIR", "felixpy", f"`{DEFAULT_STATE_DIR}`", ABS_PATH_ACCEPTS,
             "Directory of the `nodename` and `mtu` files (the CNI plugin reads `mtu`)."),
    Variable("FELIXPY_LOG_FORMAT", "felixpy", "`text`", "accepted values are text, json",
             "`text`: key=value lines; `json`: one JSON object per line."),
    # Read by felixpy/node/bgp.py (backend bird); documented here with everything else.
    Variable("FELIXPY_EXABGP_CONFIG", "felixpy", "`/var/run/calico/exabgp/exabgp.conf`", ABS_PATH_ACCEPTS,
             "Where the agent renders ExaBGP's configuration (the ExaBGP sidecar reads it)."),
    Variable("FELIXPY_EXABGP_PIDFILE", "felixpy", "`/var/run/calico/exabgp/exabgp.pid`", ABS_PATH_ACCEPTS,
             "ExaBGP's pid file: the agent sends SIGUSR1 there after rewriting the configuration."),
    Variable("FELIXPY_BGP_SOCKET", "felixpy", "`/var/run/calico/exabgp/sidecar.sock`", ABS_PATH_ACCEPTS,
             "Unix socket of the ExaBGP sidecar's API process (`python -m bgp.sidecar`)."),
    Variable("FELIXPY_BGP_STATUS", "felixpy", "`<FELIXPY_STATE_DIR>/bgp-status.json`", ABS_PATH_ACCEPTS,
             "Where the agent writes its BGP sessions for `felixctl node status` and the lab."),
    Variable("FELIXPY_BGP_SYNC_TIMEOUT", "felixpy", "`10`", "expected seconds >= 0",
             "How long the first dataplane apply waits for the sidecar's replay of learned routes."),
]

VARIABLES: Mapping[str, Variable] = types.MappingProxyType({v.name: v for v in _VARS})

# The FELIX_ parameters felixpy reads (lower-cased, without the prefix); others are kept but unused.
USED_FELIX_PARAMS = frozenset(
    v.name[len("FELIX_"):].lower() for v in _VARS if v.name.startswith("FELIX_") and v.name != "FELIX_*"
)


# --------------------------------------------------------------------------------------------
# The typed configuration
# --------------------------------------------------------------------------------------------

AUTODETECT_KINDS = ("first-found", "interface", "skip-interface", "cidr", "can-reach", "kubernetes-internal-ip")


@dataclass(frozen=True, slots=True)
class AutodetectMethod:
    """A parsed IP_AUTODETECTION_METHOD: kind is one of AUTODETECT_KINDS, args its comma list."""

    kind: str = "first-found"
    args: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.kind}={','.join(self.args)}" if self.args else self.kind


@dataclass(frozen=True, slots=True)
class AddressSetting:
    """IP / IP6: mode is unset, autodetect, none or explicit (then address is set)."""

    mode: str = "unset"
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None
    has_prefix: bool = False  # False: the prefix comes from the local interface carrying the address


@dataclass(frozen=True, slots=True)
class NodeConfig:
    name: str | None
    nodename_file: str
    hostname: str | None
    ip: AddressSetting
    ip_autodetection_method: AutodetectMethod
    ip6: AddressSetting
    ip6_autodetection_method: AutodetectMethod
    as_number: int | None
    disable_node_ip_check: bool
    networking_backend: str  # bird | vxlan | none
    cluster_type: str


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A default pool (IPv4 or IPv6); cidr None means "choose at startup" (IPv4: it depends on
    host addresses; IPv6: a random ULA prefix)."""

    create: bool  # False when CALICO_IPV<n>POOL_CIDR=none or NO_DEFAULT_POOLS=true
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    block_size: int
    ipip_mode: str  # Always | CrossSubnet | Never
    vxlan_mode: str
    nat_outgoing: bool
    node_selector: str
    disable_bgp_export: bool


@dataclass(frozen=True, slots=True)
class DatastoreConfig:
    type: str  # etcdv3 | kubernetes
    etcd_endpoints: tuple[str, ...]
    etcd_key_file: str | None
    etcd_cert_file: str | None
    etcd_ca_cert_file: str | None
    kubeconfig: str | None
    wait_for_datastore: bool


@dataclass(frozen=True, slots=True)
class FelixConfig:
    """Felix's parameters, merged from their sources (see FELIX_PARAMS and felix_config())."""

    # Every FELIX_* variable: lower-cased parameter name (without "felix_") -> raw value.
    params: Mapping[str, str]
    route_refresh_interval: float
    iptables_refresh_interval: float
    ipsets_refresh_interval: float
    log_severity_screen: str  # TRACE | DEBUG | INFO | WARNING | ERROR | FATAL
    log_file_path: str | None  # None: no log file ("none")
    log_severity_file: str
    log_debug_filename_regex: str | None
    ipv6_support: bool
    vxlan_mtu: int  # 0 = auto
    vxlan_mtu_v6: int  # 0 = auto
    ipip_mtu: int  # 0 = auto
    vxlan_vni: int
    vxlan_port: int
    mtu_iface_pattern: str
    iptables_backend: str  # auto | legacy | nft
    chain_insert_mode: str  # insert | append
    default_endpoint_to_host_action: str  # DROP | RETURN | ACCEPT
    nat_outgoing_address: str | None
    nat_port_range: tuple[int, int] | None
    health_enabled: bool
    health_port: int
    health_host: str
    prometheus_metrics_enabled: bool
    prometheus_metrics_port: int
    prometheus_metrics_host: str
    failsafe_inbound: tuple[tuple[str, int], ...]
    failsafe_outbound: tuple[tuple[str, int], ...]
    interface_prefixes: tuple[str, ...]
    # Where each value above came from: Felix's source names ("environment variable",
    # "datastore (per-host)", "datastore (global)", "default"), by attribute.
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)

    def unused_params(self) -> list[str]:
        """FELIX_* parameters that were set but that felixpy does not read (logged at startup)."""
        return sorted(p for p in self.params if p not in USED_FELIX_PARAMS)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    cni_socket: str
    state_dir: str
    log_format: str  # text | json

    @property
    def mtu_file(self) -> str:
        return f"{self.state_dir.rstrip('/')}/mtu"


@dataclass(frozen=True, slots=True)
class Config:
    node: NodeConfig
    ipv4_pool: PoolConfig
    no_default_pools: bool
    ipv6_pool: PoolConfig
    datastore: DatastoreConfig
    felix: FelixConfig
    agent: AgentConfig
    raw: Mapping[str, str] = field(repr=False, default_factory=dict)


# --------------------------------------------------------------------------------------------
# Value parsers: each returns the typed value or raises ConfigError quoting VARIABLES[name].accepts
# --------------------------------------------------------------------------------------------


def _fail(name: str, value: str, detail: str = "") -> ConfigError:
    text = VARIABLES[_registry_name(name)].accepts
    # json.dumps quotes and escapes, so a value with a newline still gives a one-line message.
    message = f"{name}={json.dumps(value)}: {text}"
    if detail:
        message += f" ({detail})"
    return ConfigError(name, message)


def _registry_name(name: str) -> str:
    upper = name.upper()
    if upper in VARIABLES:
        return upper
    if upper.startswith("CALICO_") and upper[len("CALICO_"):] in VARIABLES:
        return upper[len("CALICO_"):]
    return upper


_TRUE = frozenset({"true", "1", "yes", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "n", "f"})


def parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _fail(name, value)


def parse_encap_mode(name: str, value: str) -> str:
    """calico-node's IPIP/VXLAN mode parsing: case-insensitive, "" and off mean Never."""
    lowered = value.strip().lower()
    if lowered in ("", "off", "never"):
        return "Never"
    if lowered in ("crosssubnet", "cross-subnet"):
        return "CrossSubnet"
    if lowered == "always":
        return "Always"
    raise _fail(name, value)


def _parse_int(name: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value.strip(), 10)
    except ValueError:
        raise _fail(name, value) from None
    if not low <= number <= high:
        raise _fail(name, value)
    return number


def _parse_seconds(name: str, value: str) -> float:
    text = value.strip()
    # Felix takes plain seconds; a trailing "s" is accepted because Go durations are common in docs.
    if text.endswith("s"):
        text = text[:-1]
    try:
        seconds = float(text)
    except ValueError:
        raise _fail(name, value) from None
    if not seconds >= 0 or seconds == float("inf"):
        raise _fail(name, value)
    return seconds


def _parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Case-insensitive choice; returns the spelling in `choices`."""
    lowered = value.strip().lower()
    for choice in choices:
        if choice.lower() == lowered:
            return choice
    raise _fail(name, value)


def _parse_abs_path(name: str, value: str) -> str:
    if not value.startswith("/") or "\n" in value or "\0" in value:
        raise _fail(name, value)
    return value


def _parse_log_file(name: str, value: str) -> str | None:
    """FELIX_LOGFILEPATH: an absolute path, or "none" (Felix's spelling) for no file."""
    if value.strip().lower() == "none":
        return None
    return _parse_abs_path(name, value.strip())


_DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def is_valid_node_name(name: str) -> bool:
    """Kubernetes and Calico node names are lowercase RFC 1123 subdomains."""
    return len(name) <= 253 and _DNS_NAME.match(name) is not None


def parse_address_setting(name: str, value: str, version: int) -> AddressSetting:
    text = value.strip()
    lowered = text.lower()
    if lowered == "":
        return AddressSetting("unset")
    if lowered == "autodetect":
        return AddressSetting("autodetect")
    if lowered == "none":
        return AddressSetting("none")
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise _fail(name, value) from None
    if iface.version != version:
        raise _fail(name, value, f"not an IPv{version} address")
    if iface.ip.is_unspecified or iface.ip.is_multicast or iface.ip.is_loopback:
        raise _fail(name, value, "not a unicast host address")
    return AddressSetting("explicit", iface, has_prefix="/" in text)


_HOSTNAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*\.?$")


def parse_autodetection_method(name: str, value: str) -> AutodetectMethod:
    text = value.strip()
    if text == "" or text == "first-found":
        return AutodetectMethod("first-found")
    if text == "kubernetes-internal-ip":
        return AutodetectMethod("kubernetes-internal-ip")
    kind, sep, rest = text.partition("=")
    if not sep or kind not in ("interface", "skip-interface", "cidr", "can-reach"):
        raise _fail(name, value)
    if kind == "can-reach":
        target = rest.strip()
        try:
            ipaddress.ip_address(target)
        except ValueError:
            if not target or len(target) > 253 or not _HOSTNAME.match(target):
                raise _fail(name, value, f"{target!r} is neither an IP address nor a hostname") from None
        return AutodetectMethod(kind, (target,))
    items = tuple(item.strip() for item in rest.split(",") if item.strip())
    if not items:
        raise _fail(name, value, f"{kind}= needs at least one value")
    for item in items:
        if kind == "cidr":
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise _fail(name, value, f"invalid CIDR {item!r}") from None
        else:
            try:
                re.compile(item)
            except re.error as exc:
                raise _fail(name, value, f"invalid regex {item!r}: {exc}") from None
    return AutodetectMethod(kind, items)


def parse_as_number(name: str, value: str) -> int:
    text = value.strip()
    if "." in text:
        high, sep, low = text.partition(".")
        if not (high.isdigit() and low.isdigit()):
            raise _fail(name, value)
        a, b = int(high), int(low)
        if a > 0xFFFF or b > 0xFFFF:
            raise _fail(name, value)
        number = (a << 16) | b
    else:
        if not text.isdigit():
            raise _fail(name, value)
        number = int(text)
    if not 1 <= number <= 0xFFFFFFFF:
        raise _fail(name, value)
    return number


_LINK_LOCAL = {4: ipaddress.ip_network("169.254.0.0/16"), 6: ipaddress.ip_network("fe80::/10")}


def parse_pool_cidr(name: str, value: str, block_size: int,
                    version: int = 4) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        network = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise _fail(name, value) from None
    if network.version != version:
        raise _fail(name, value, f"not an IPv{version} CIDR")
    if network.prefixlen > block_size:
        raise _fail(name, value, f"smaller than the block size /{block_size}")
    if network.is_multicast or network.is_loopback or network.overlaps(_LINK_LOCAL[version]):  # type: ignore[arg-type]
        raise _fail(name, value, "multicast, loopback and link-local ranges cannot be pools")
    return network


def parse_node_selector(name: str, value: str) -> str:
    text = value.strip()
    if text == "":
        return "all()"
    try:
        from policy.selectors import parse as parse_selector
    except ImportError:  # the selector grammar ships with felixpy; only a broken install lacks it
        return text
    try:
        parse_selector(text)
    except ValueError as exc:
        raise _fail(name, value, str(exc).splitlines()[0] if str(exc) else "") from None
    return text


def parse_etcd_endpoints(name: str, value: str) -> tuple[str, ...]:
    endpoints = tuple(item.strip() for item in value.split(",") if item.strip())
    for endpoint in endpoints:
        try:
            parts = urlsplit(endpoint)
            port = parts.port
        except ValueError:
            raise _fail(name, value, f"bad endpoint {endpoint!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None or port == 0:
            raise _fail(name, value, f"bad endpoint {endpoint!r}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise _fail(name, value, f"bad endpoint {endpoint!r}")
    return endpoints


_IFACE_PREFIX = re.compile(r"^[A-Za-z0-9._-]{1,14}$")


def _parse_interface_prefixes(name: str, value: str) -> tuple[str, ...]:
    prefixes = tuple(p.strip() for p in value.split(","))
    if not prefixes or not all(_IFACE_PREFIX.match(p) for p in prefixes):
        raise _fail(name, value)
    return prefixes


def _parse_host(name: str, value: str) -> str:
    host = value.strip()
    if any(c.isspace() for c in host) or "/" in host:
        raise _fail(name, value)
    return host


def _parse_failsafe_ports(name: str, value: str) -> tuple[tuple[str, int], ...]:
    text = value.strip()
    if text.lower() == "none":
        return ()
    ports = []
    for item in text.split(","):
        proto, sep, port = item.strip().rpartition(":")
        if not sep or proto.lower() not in ("tcp", "udp", "sctp") or not port.isdigit() \
                or not 1 <= int(port) <= 65535:
            raise _fail(name, value, f"bad entry {item.strip()!r}")
        ports.append((proto.lower(), int(port)))
    return tuple(ports)


def _parse_regex(name: str, value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise _fail(name, value, str(exc)) from None
    return value


# --------------------------------------------------------------------------------------------
# load_config
# --------------------------------------------------------------------------------------------


def _set(env: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None when it is unset or blank (both mean "use the default")."""
    value = env.get(name)
    return value if value is not None and value.strip() != "" else None


def _calico(env: Mapping[str, str], name: str) -> tuple[str, str | None]:
    """(variable, value) of a datastore setting read with envconfig prefix CALICO_.

    As in calico-node, the prefixed spelling wins and the bare one is the fallback.
    """
    prefixed = "CALICO_" + name
    if _set(env, prefixed) is not None:
        return prefixed, env[prefixed]
    return name, _set(env, name)


def _felix_params(env: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """lower-cased param -> (variable name as given, value), for every FELIX_* variable."""
    params: dict[str, tuple[str, str]] = {}
    for key in sorted(env):
        if not key.lower().startswith("felix_") or len(key) == len("felix_"):
            continue
        param = key[len("felix_"):].lower()
        if param in params:
            other = params[param][0]
            raise ConfigError(key, f"{other} and {key} are both set: Felix parameters are case-insensitive, set only one")
        params[param] = (key, env[key])
    return params


def _load_node(env: Mapping[str, str], state_dir: str) -> NodeConfig:
    name = _set(env, "NODENAME")
    if name is not None and not is_valid_node_name(name.strip()):
        raise _fail("NODENAME", name)
    nodename_file = _set(env, "CALICO_NODENAME_FILE")
    backend_value = _set(env, "CALICO_NETWORKING_BACKEND")
    if backend_value is None:
        # rc.local's legacy switch: CALICO_NETWORKING=false meant policy-only.
        backend = "none" if env.get("CALICO_NETWORKING", "").strip().lower() == "false" else "bird"
    else:
        backend = _parse_choice("CALICO_NETWORKING_BACKEND", backend_value, ("bird", "vxlan", "none", "bgp"))
        backend = "bird" if backend == "bgp" else backend
    as_value = _set(env, "AS")
    check_value = _set(env, "DISABLE_NODE_IP_CHECK")
    ip6 = parse_address_setting("IP6", env.get("IP6", ""), 6)
    return NodeConfig(
        name=name.strip() if name else None,
        nodename_file=(
            _parse_abs_path("CALICO_NODENAME_FILE", nodename_file) if nodename_file else f"{state_dir.rstrip('/')}/nodename"
        ),
        hostname=_set(env, "HOSTNAME"),
        ip=parse_address_setting("IP", env.get("IP", ""), 4),
        ip_autodetection_method=parse_autodetection_method(
            "IP_AUTODETECTION_METHOD", env.get("IP_AUTODETECTION_METHOD", "")),
        ip6=ip6,
        ip6_autodetection_method=parse_autodetection_method(
            "IP6_AUTODETECTION_METHOD", env.get("IP6_AUTODETECTION_METHOD", "")),
        as_number=parse_as_number("AS", as_value) if as_value else None,
        disable_node_ip_check=parse_bool("DISABLE_NODE_IP_CHECK", check_value) if check_value else False,
        networking_backend=backend,
        cluster_type=env.get("CLUSTER_TYPE", "").strip(),
    )


def _load_pool(env: Mapping[str, str]) -> tuple[PoolConfig, bool]:
    block_value = _set(env, "CALICO_IPV4POOL_BLOCK_SIZE")
    block_size = _parse_int("CALICO_IPV4POOL_BLOCK_SIZE", block_value, 20, 32) if block_value else 26
    ipip = parse_encap_mode("CALICO_IPV4POOL_IPIP", env.get("CALICO_IPV4POOL_IPIP", ""))
    vxlan = parse_encap_mode("CALICO_IPV4POOL_VXLAN", env.get("CALICO_IPV4POOL_VXLAN", ""))
    if ipip != "Never" and vxlan != "Never":
        raise ConfigError(
            "CALICO_IPV4POOL_IPIP",
            f"CALICO_IPV4POOL_IPIP={json.dumps(env['CALICO_IPV4POOL_IPIP'])} and "
            f"CALICO_IPV4POOL_VXLAN={json.dumps(env['CALICO_IPV4POOL_VXLAN'])}: "
            "ipipMode and vxlanMode cannot both be enabled (set one of them to Never)",
        )
    # calico-node: only the "false" spellings disable NAT; any other value, even garbage, enables it.
    nat_outgoing = env.get("CALICO_IPV4POOL_NAT_OUTGOING", "").strip().lower() not in _FALSE
    no_pools_value = _set(env, "NO_DEFAULT_POOLS")
    no_default_pools = parse_bool("NO_DEFAULT_POOLS", no_pools_value) if no_pools_value else False
    cidr_value = _set(env, "CALICO_IPV4POOL_CIDR")
    if no_default_pools and cidr_value:
        raise ConfigError(
            "NO_DEFAULT_POOLS",
            f"NO_DEFAULT_POOLS={json.dumps(no_pools_value)}: cannot be combined with "
            f"CALICO_IPV4POOL_CIDR={json.dumps(cidr_value)} (unset one of them)",
        )
    skip = cidr_value is not None and cidr_value.strip().lower() == "none"
    cidr = None
    if cidr_value and not skip:
        cidr = parse_pool_cidr("CALICO_IPV4POOL_CIDR", cidr_value, block_size)
    v6_cidr_value = _set(env, "CALICO_IPV6POOL_CIDR")
    if no_default_pools and v6_cidr_value:
        raise ConfigError(
            "NO_DEFAULT_POOLS",
            f"NO_DEFAULT_POOLS={json.dumps(no_pools_value)}: cannot be combined with "
            f"CALICO_IPV6POOL_CIDR={json.dumps(v6_cidr_value)} (unset one of them)",
        )
    export_value = _set(env, "CALICO_IPV4POOL_DISABLE_BGP_EXPORT")
    pool = PoolConfig(
        create=not no_default_pools and not skip,
        cidr=cidr,
        block_size=block_size,
        ipip_mode=ipip,
        vxlan_mode=vxlan,
        nat_outgoing=nat_outgoing,
        node_selector=parse_node_selector(
            "CALICO_IPV4POOL_NODE_SELECTOR", env.get("CALICO_IPV4POOL_NODE_SELECTOR", "")),
        disable_bgp_export=parse_bool("CALICO_IPV4POOL_DISABLE_BGP_EXPORT", export_value) if export_value else False,
    )
    return pool, no_default_pools


def _load_ipv6_pool(env: Mapping[str, str], no_default_pools: bool) -> PoolConfig:
    """The default IPv6 pool (calico-node's configureIPPools): the same rules as IPv4, Calico's
    IPv6 defaults (block /122, no NAT) and no IPIP; whether IPv6 is supported is startup's call."""
    block_value = _set(env, "CALICO_IPV6POOL_BLOCK_SIZE")
    block_size = _parse_int("CALICO_IPV6POOL_BLOCK_SIZE", block_value, 116, 128) if block_value else 122
    vxlan = parse_encap_mode("CALICO_IPV6POOL_VXLAN", env.get("CALICO_IPV6POOL_VXLAN", ""))
    cidr_value = _set(env, "CALICO_IPV6POOL_CIDR")
    skip = cidr_value is not None and cidr_value.strip().lower() == "none"
    cidr = None
    if cidr_value and not skip:
        cidr = parse_pool_cidr("CALICO_IPV6POOL_CIDR", cidr_value, block_size, version=6)
    export_value = _set(env, "CALICO_IPV6POOL_DISABLE_BGP_EXPORT")
    nat_value = env.get("CALICO_IPV6POOL_NAT_OUTGOING", "").strip().lower()
    return PoolConfig(
        create=not no_default_pools and not skip,
        cidr=cidr,
        block_size=block_size,
        ipip_mode="Never",
        vxlan_mode=vxlan,
        # calico-node's evaluateENVBool with default false: unset is false, a "false" spelling is
        # false, any other value (even "") is true.
        nat_outgoing="CALICO_IPV6POOL_NAT_OUTGOING" in env and nat_value not in _FALSE,
        node_selector=parse_node_selector(
            "CALICO_IPV6POOL_NODE_SELECTOR", env.get("CALICO_IPV6POOL_NODE_SELECTOR", "")),
        disable_bgp_export=parse_bool("CALICO_IPV6POOL_DISABLE_BGP_EXPORT", export_value) if export_value else False,
    )


def _load_datastore(env: Mapping[str, str]) -> DatastoreConfig:
    endpoints_var, endpoints_value = _calico(env, "ETCD_ENDPOINTS")
    endpoints = parse_etcd_endpoints(endpoints_var, endpoints_value) if endpoints_value else ()
    type_var, type_value = _calico(env, "DATASTORE_TYPE")
    if type_value is None:
        ds_type = "etcdv3" if endpoints else "kubernetes"
    else:
        ds_type = _parse_choice(type_var, type_value, ("etcdv3", "kubernetes"))
    if ds_type == "etcdv3" and not endpoints:
        raise ConfigError(
            endpoints_var,
            f"{endpoints_var} is not set: DATASTORE_TYPE=etcdv3 needs a comma-separated list of http(s)://HOST:PORT URLs",
        )
    files: dict[str, str | None] = {}
    for name in ("ETCD_KEY_FILE", "ETCD_CERT_FILE", "ETCD_CA_CERT_FILE"):
        var, value = _calico(env, name)
        files[name] = _parse_abs_path(var, value) if value else None
    if bool(files["ETCD_KEY_FILE"]) != bool(files["ETCD_CERT_FILE"]):
        given, missing = (
            ("ETCD_KEY_FILE", "ETCD_CERT_FILE") if files["ETCD_KEY_FILE"] else ("ETCD_CERT_FILE", "ETCD_KEY_FILE"))
        raise _fail(given, files[given] or "", f"{missing} is not set")
    return DatastoreConfig(
        type=ds_type,
        etcd_endpoints=endpoints,
        etcd_key_file=files["ETCD_KEY_FILE"],
        etcd_cert_file=files["ETCD_CERT_FILE"],
        etcd_ca_cert_file=files["ETCD_CA_CERT_FILE"],
        kubeconfig=_calico(env, "KUBECONFIG")[1],
        # calico-node compares with the literal "true".
        wait_for_datastore=env.get("WAIT_FOR_DATASTORE") == "true",
    )


def _choice(*choices: str) -> Callable[[str, str], str]:
    return lambda name, value: _parse_choice(name, value, choices)


def _int_range(low: int, high: int) -> Callable[[str, str], int]:
    return lambda name, value: _parse_int(name, value, low, high)


def _load_felix(env: Mapping[str, str]) -> FelixConfig:
    return felix_config(env)


# -- Felix's parameters and their sources -------------------------------------------------------------

SOURCE_ENV = "environment variable"
SOURCE_HOST = "datastore (per-host)"
SOURCE_GLOBAL = "datastore (global)"
SOURCE_DEFAULT = "default"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def _duration_text(value: object) -> str:
    """A FelixConfiguration duration ("90s", "1m30s", "500ms") as the seconds Felix's v1 key holds."""
    text = str(value).strip()
    if text == "0":
        return "0"
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return text  # not a duration: the parser refuses it and names the field
    return repr(sum(float(n) * _GO_DURATION_UNITS[u] for n, u in parts))


def _ports_text(value: object) -> str:
    """failsafe*HostPorts ([{protocol, port}]) as Felix's "tcp:22,udp:68" (protocol defaults to tcp)."""
    if not isinstance(value, list):
        return str(value)
    if not value:
        return "none"
    return ",".join(f"{str(item.get('protocol') or 'tcp').lower()}:{item.get('port')}" if isinstance(item, dict)
                    else str(item) for item in value)


def _parse_ipv4(name: str, value: str) -> str | None:
    text = value.strip()
    if text.lower() == "none":
        return None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise _fail(name, value) from None


def _parse_port_range(name: str, value: str) -> tuple[int, int] | None:
    """Felix's portrange: "MIN:MAX" or one port; "none" for no range."""
    text = value.strip()
    if text.lower() == "none":
        return None
    low, sep, high = text.partition(":")
    if not low.isdigit() or (sep and not high.isdigit()):
        raise _fail(name, value)
    lo, hi = int(low), int(high) if sep else int(low)
    if not 1 <= lo <= hi <= 65535:
        raise _fail(name, value)
    return lo, hi


@dataclass(frozen=True, slots=True)
class FelixParam:
    """One Felix parameter felixpy reads: from FELIX_<NAME>, else FelixConfiguration `field`
    (node.<name>, then default), else `default`. A FelixConfiguration value goes through the same
    parser as the variable, as the text Felix's v1 config keys hold (`to_text`)."""

    attr: str  # the FelixConfig attribute
    name: str  # lower-case parameter name: the variable is FELIX_<NAME>
    field: str | None  # the FelixConfiguration spec field; None: the environment only
    parse: Callable[[str, str], object]
    default: object
    to_text: Callable[[object], str] = _text

    @property
    def variable(self) -> str:
        return "FELIX_" + self.name.upper()


FELIX_PARAMS: tuple[FelixParam, ...] = (
    FelixParam("route_refresh_interval", "routerefreshinterval", "routeRefreshInterval", _parse_seconds, 90.0,
               _duration_text),
    FelixParam("iptables_refresh_interval", "iptablesrefreshinterval", "iptablesRefreshInterval", _parse_seconds,
               180.0, _duration_text),
    FelixParam("ipsets_refresh_interval", "ipsetsrefreshinterval", "ipsetsRefreshInterval", _parse_seconds, 90.0,
               _duration_text),
    FelixParam("log_severity_screen", "logseverityscreen", "logSeverityScreen", _choice(*LOG_LEVELS), "INFO"),
    FelixParam("log_file_path", "logfilepath", "logFilePath", lambda n, v: _parse_log_file(n, v), None),
    FelixParam("log_severity_file", "logseverityfile", "logSeverityFile", _choice(*LOG_LEVELS), "INFO"),
    FelixParam("log_debug_filename_regex", "logdebugfilenameregex", "logDebugFilenameRegex", _parse_regex, None),
    FelixParam("ipv6_support", "ipv6support", "ipv6Support", parse_bool, True),
    FelixParam("vxlan_mtu", "vxlanmtu", "vxlanMTU", lambda n, v: _parse_mtu(n, v), 0),
    FelixParam("vxlan_mtu_v6", "vxlanmtuv6", "vxlanMTUV6", lambda n, v: _parse_mtu(n, v), 0),
    FelixParam("ipip_mtu", "ipinipmtu", "ipipMTU", lambda n, v: _parse_mtu(n, v), 0),
    FelixParam("vxlan_vni", "vxlanvni", "vxlanVNI", _int_range(1, 16777215), names.VXLAN_VNI),
    FelixParam("vxlan_port", "vxlanport", "vxlanPort", _int_range(1, 65535), names.VXLAN_PORT),
    FelixParam("mtu_iface_pattern", "mtuifacepattern", "mtuIfacePattern", _parse_regex, DEFAULT_MTU_IFACE_PATTERN),
    FelixParam("iptables_backend", "iptablesbackend", "iptablesBackend", _choice("auto", "legacy", "nft"), "auto"),
    FelixParam("chain_insert_mode", "chaininsertmode", "chainInsertMode", _choice("insert", "append"), "insert"),
    FelixParam("default_endpoint_to_host_action", "defaultendpointtohostaction", "defaultEndpointToHostAction",
               _choice("DROP", "RETURN", "ACCEPT"), "DROP"),
    FelixParam("nat_outgoing_address", "natoutgoingaddress", "natOutgoingAddress", _parse_ipv4, None),
    FelixParam("nat_port_range", "natportrange", "natPortRange", _parse_port_range, None),
    FelixParam("health_enabled", "healthenabled", "healthEnabled", parse_bool, False),
    FelixParam("health_port", "healthport", "healthPort", _int_range(1, 65535), 9099),
    FelixParam("health_host", "healthhost", "healthHost", _parse_host, "localhost"),
    FelixParam("prometheus_metrics_enabled", "prometheusmetricsenabled", "prometheusMetricsEnabled", parse_bool,
               False),
    FelixParam("prometheus_metrics_port", "prometheusmetricsport", "prometheusMetricsPort", _int_range(1, 65535),
               9091),
    FelixParam("prometheus_metrics_host", "prometheusmetricshost", "prometheusMetricsHost", _parse_host, ""),
    FelixParam("failsafe_inbound", "failsafeinboundhostports", "failsafeInboundHostPorts", _parse_failsafe_ports,
               DEFAULT_FAILSAFE_INBOUND, _ports_text),
    FelixParam("failsafe_outbound", "failsafeoutboundhostports", "failsafeOutboundHostPorts",
               _parse_failsafe_ports, DEFAULT_FAILSAFE_OUTBOUND, _ports_text),
    FelixParam("interface_prefixes", "interfaceprefix", "interfacePrefix", _parse_interface_prefixes, ("cali",)),
)


def felix_config(env: Mapping[str, str], global_spec: Mapping[str, object] | None = None,
                 host_spec: Mapping[str, object] | None = None) -> FelixConfig:
    """Felix's parameters with Felix's precedence: the environment (FELIX_<NAME>), then the
    FelixConfiguration `node.<name>` (`host_spec`), then `default` (`global_spec`), then the
    built-in default. felixpy has no config file (Felix's /etc/calico/felix.cfg sits between the
    environment and the datastore). A bad variable raises ConfigError; a bad datastore value is
    logged and replaced by the default, as Felix does ("Replacing invalid value with default")."""
    params = _felix_params(env)
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for param in FELIX_PARAMS:
        if param.name in params and params[param.name][1].strip() != "":
            var, raw = params[param.name]
            values[param.attr], sources[param.attr] = param.parse(var, raw), SOURCE_ENV
            continue
        values[param.attr], sources[param.attr] = param.default, SOURCE_DEFAULT
        for source, spec in ((SOURCE_HOST, host_spec), (SOURCE_GLOBAL, global_spec)):
            if param.field is None or not spec or spec.get(param.field) is None:
                continue
            try:
                values[param.attr] = param.parse(param.variable, param.to_text(spec[param.field]))
            except ConfigError as err:
                log.warning("replacing invalid FelixConfiguration value with the default field=%s source=%s "
                            "default=%r error=%s", param.field, source, param.default, err)
            sources[param.attr] = source
            break
    return FelixConfig(params=types.MappingProxyType({p: v for p, (_, v) in params.items()}),
                       sources=types.MappingProxyType(sources), **values)  # type: ignore[arg-type]


def felix_changes(old: FelixConfig, new: FelixConfig) -> list[tuple[FelixParam, object, object]]:
    """The parameters whose value differs between two configurations, in FELIX_PARAMS order."""
    return [(p, getattr(old, p.attr), getattr(new, p.attr)) for p in FELIX_PARAMS
            if getattr(old, p.attr) != getattr(new, p.attr)]


def with_datastore_config(config: Config, global_spec: Mapping[str, object] | None,
                          host_spec: Mapping[str, object] | None) -> Config:
    """`config` with its Felix parameters merged with FelixConfiguration default / node.<name>."""
    return replace(config, felix=felix_config(config.raw, global_spec, host_spec))


def load_config(env: Mapping[str, str]) -> Config:
    """Parse the agent's configuration from `env`; raises ConfigError (one line) on a bad value."""
    state_dir_value = _set(env, "FELIXPY_STATE_DIR")
    state_dir = _parse_abs_path("FELIXPY_STATE_DIR", state_dir_value) if state_dir_value else DEFAULT_STATE_DIR
    socket_value = _set(env, "FELIXPY_CNI_SOCKET")
    format_value = _set(env, "FELIXPY_LOG_FORMAT")
    agent = AgentConfig(
        cni_socket=_parse_abs_path("FELIXPY_CNI_SOCKET", socket_value) if socket_value else DEFAULT_CNI_SOCKET,
        state_dir=state_dir,
        log_format=_parse_choice("FELIXPY_LOG_FORMAT", format_value, ("text", "json")) if format_value else "text",
    )
    pool, no_default_pools = _load_pool(env)
    return Config(
        node=_load_node(env, state_dir),
        ipv4_pool=pool,
        no_default_pools=no_default_pools,
        ipv6_pool=_load_ipv6_pool(env, no_default_pools),
        datastore=_load_datastore(env),
        felix=_load_felix(env),
        agent=agent,
        raw=types.MappingProxyType(dict(env)),
    )


def _parse_mtu(name: str, value: str) -> int:
    number = _parse_int(name, value, 0, 65535)
    if 0 < number < 68:
        raise _fail(name, value)
    return number


# --------------------------------------------------------------------------------------------
# Documentation
# --------------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_docs() -> str:
    """docs/configuration.md, generated from VARIABLES."""
    lines = [
        "# Configuration: the agent's environment variables",
        "",
        "<!-- Generated by `python -m felixpy.config > docs/configuration.md`; edit felixpy/config.py instead. -->",
        "",
        "`felixpy-node` reads calico-node's variables with calico-node's values and defaults",
        "(see `../shared/docs/calico-reference.md` §1). An invalid value stops the agent at startup with",
        "one line naming the variable and what it accepts, for example:",
        "",
        "```",
        'CALICO_IPV4POOL_IPIP="sometimes": ' + ENCAP_ACCEPTS,
        "```",
        "",
    ]
    group = None
    for var in _VARS:
        if var.group != group:
            group = var.group
            lines += ["", f"## {group}", "", "| Variable | Default | Accepts | Meaning |", "|---|---|---|---|"]
        lines.append(f"| `{var.name}` | {_cell(var.default)} | {_cell(var.accepts)} | {_cell(var.description)} |")
    lines += [
        "",
        "## FelixConfiguration: Felix's parameters from the datastore",
        "",
        "The Felix parameters below are read as Felix reads them, from four places; the first that",
        "has a value wins (Felix's `config.Source` order, `felix/config/config_params.go`):",
        "",
        "1. the environment variable `FELIX_<NAME>` (a bad value stops the agent);",
        "2. Felix's config file, `/etc/calico/felix.cfg`: felixpy has none;",
        "3. the FelixConfiguration `node.<nodename>` (startup creates it in etcd mode with",
        "   `defaultEndpointToHostAction: Return`, as calico-node does);",
        "4. the FelixConfiguration `default`;",
        "",
        "and otherwise the default. A datastore value that does not parse is logged and replaced",
        "by the default, as Felix does (`Replacing invalid value with default`); felixctl refuses such",
        "values on write. Every source is logged at startup (`felix parameter param=… source=…`).",
        "",
        "**Changes.** Felix applies none of these parameters live: a change of any of them in",
        "FelixConfiguration makes Felix exit, and its supervisor starts it again (only",
        "ClusterInformation's ClusterGUID, ClusterType and CalicoVersion and HealthTimeoutOverrides are",
        "handled live, `felix/daemon/daemon.go`). felixpy-node does the same: it logs",
        "`configuration changed; restarting to apply it, as Felix does param=… old=… new=…`, stops the",
        "agent with the dataplane left as it is, and starts itself afresh (exec, same pid: the lab and",
        "a container without an init system have no supervisor that restarts at once). The new",
        "process reconciles the dataplane without flushing what is still right. A process younger",
        "than 10 s waits 2 s first, as Felix does, so a flapping setting cannot spin.",
        "",
        "**The migration lock.** While ClusterInformation `default` has `datastoreReady: false`",
        "(`felixctl datastore migrate lock`), felixpy-node waits at startup (as Felix does); a running",
        "agent keeps its dataplane and refuses CNI ADD and DEL with Calico's `Calico is currently not",
        "ready to process requests` (CNI STATUS answers not available), its IPAM writes stop, and",
        "felixpy-controllers skip their IPAM pass, as kube-controllers do. Felix itself would restart",
        "and wait; felixpy-node stays up because it also serves the CNI plugin, which can then give",
        "Calico's error instead of \"agent not reachable\". A datastore without ClusterInformation",
        "is not locked.",
        "",
        "| FelixConfiguration field | Variable | Default |",
        "|---|---|---|",
    ]
    for param in FELIX_PARAMS:
        default = VARIABLES[param.variable].default if param.variable in VARIABLES else ""
        lines.append(f"| `{param.field}` | `{param.variable}` | {_cell(default)} |")
    lines += ["", "Every other FelixConfiguration field is refused at validation or honoured as `docs/fields.md`",
              "says (switches of features felixpy does not have are accepted when off)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_docs())
