"""Node startup, run once before the agent syncs: name, Node resource, default pool and config.

This is calico-node's `startup.Run` (calico-reference.md §1.1–§1.7) for the etcd datastore:

1. decide the node name (NODENAME > nodename file > HOSTNAME > OS hostname, lower-cased);
2. optionally wait for the datastore (WAIT_FOR_DATASTORE=true), and wait while a migration
   holds it locked (ClusterInformation datastoreReady=false), as Felix waits;
3. decide the node's IPv4/IPv6 address (IP / IP6 semantics: keep, autodetect, none, explicit)
   and refuse an address another Node already has (unless DISABLE_NODE_IP_CHECK=true);
4. create or compare-and-swap the Node resource, keeping what others wrote into it;
5. create the default IPv4 pool when no IPv4 pool exists, and the default IPv6 pool when no IPv6
   pool exists and IPv6 is supported (FELIX_IPV6SUPPORT and /proc/sys/net/ipv6; create-only);
6. create the default FelixConfiguration, per-node FelixConfiguration, BGPConfiguration,
   ClusterInformation and IPAM configuration when missing (create-only);
7. allocate the node's tunnel addresses (calico-reference §2.5): for VXLAN when an enabled IPv4
   pool has vxlanMode Always/CrossSubnet, for IPv6 VXLAN when an enabled IPv6 pool does, for IPIP
   likewise (IPv4 only), one address each from IPAM with handle `vxlan-tunnel-addr-<node>` /
   `vxlan-v6-tunnel-addr-<node>` / `ipip-tunnel-addr-<node>`, written to the Node with a VTEP MAC
   per VXLAN family; kept across restarts, released when no pool needs it any more;
8. read FelixConfiguration `default` and `node.<name>` and merge them into the configuration
   with Felix's precedence (environment > node.<name> > default > built-in default), before
   anything below uses a Felix parameter;
9. write the nodename file and the pod MTU file the CNI plugin reads.

Every datastore write is create-only (AlreadyExists means someone else did it, which is fine) or
compare-and-swap with bounded retries, so two agents starting at once, or an agent restarting while
felixctl edits its Node, never lose each other's writes. Kernel access is injected (`detect`,
`interfaces`) so the whole sequence runs against the in-memory store in unit tests and inside a
test namespace in integration tests.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
import logging
import os
import random
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import felixpy
from felixpy import names
from felixpy.config import (
    FELIX_PARAMS,
    SOURCE_DEFAULT,
    AutodetectMethod,
    Config,
    PoolConfig,
    is_valid_node_name,
    with_datastore_config,
)
from felixpy.datastore import keys
from felixpy.datastore.api import AlreadyExists, Conflict, Datastore, DatastoreError, NotFound, Unavailable
from felixpy.kernel import addresses
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.errors import IPAMError
from felixpy.ipam.pools import USE_TUNNEL, selector_matches
from felixpy.kernel.addresses import AutodetectError, Interface, IPInterface
from felixpy.model import resources

log = logging.getLogger(__name__)

API_VERSION = "projectcalico.org/v3"
DEFAULT_IPV4_POOL_NAME = "default-ipv4-ippool"
DEFAULT_IPV6_POOL_NAME = "default-ipv6-ippool"
HOSTNAME_LABEL = "kubernetes.io/hostname"
CAS_RETRIES = 10
# calico-node probes readiness with a Get of a Node that need not exist.
_PROBE_KEY = keys.resource_key("nodes", "foo")

DetectFn = Callable[[AutodetectMethod, int], IPInterface]
InterfacesFn = Callable[[], list[Interface]]
KubeNodeFn = Callable[[str], Mapping[str, Any]]  # the Kubernetes Node object of that name


class StartupError(Exception):
    """Startup cannot continue; str() is one line for the user."""


@dataclass(frozen=True, slots=True)
class StartupResult:
    node_name: str
    node: dict[str, Any]  # the Node resource as stored
    ipv4: ipaddress.IPv4Interface | None
    mtu: int
    # The configuration with FelixConfiguration `default` and `node.<name>` merged in (Felix's
    # precedence, felixpy/config.py: felix_config), and the two specs it was merged from.
    config: Config | None = None
    felix_global: Mapping[str, Any] | None = None
    felix_host: Mapping[str, Any] | None = None
    ipv6: ipaddress.IPv6Interface | None = None


def startup(
    store: Datastore,
    config: Config,
    *,
    detect: DetectFn = addresses.autodetect,
    interfaces: InterfacesFn = addresses.list_interfaces,
    os_hostname: Callable[[], str] = socket.gethostname,
    datastore_wait_timeout: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    lock_timeout: float | None = None,
    kube_node: KubeNodeFn | None = None,
) -> StartupResult:
    """Run the startup sequence; raises StartupError with a one-line message.

    A datastore outage (Unavailable) is passed through unchanged, so the caller can retry the
    whole sequence (every step is idempotent); with WAIT_FOR_DATASTORE=true startup itself waits
    for the datastore first, as calico-node does.
    """
    for param in config.felix.unused_params():
        log.info("felix parameter not used by felixpy param=%s", param)
    try:
        return _startup(store, config, detect, interfaces, os_hostname, datastore_wait_timeout, sleep, lock_timeout,
                        kube_node)
    except Unavailable:
        raise
    except (DatastoreError, AutodetectError, resources.ValidationError) as exc:
        raise StartupError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    except OSError as exc:
        raise StartupError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc


def _startup(
    store: Datastore,
    config: Config,
    detect: DetectFn,
    interfaces: InterfacesFn,
    os_hostname: Callable[[], str],
    wait_timeout: float | None,
    sleep: Callable[[float], None],
    lock_timeout: float | None,
    kube_node: KubeNodeFn | None,
) -> StartupResult:
    name = determine_node_name(config, os_hostname)
    log.info("node name name=%s", name)
    if config.datastore.wait_for_datastore:
        wait_for_datastore(store, wait_timeout, sleep)
    wait_while_locked(store, lock_timeout, sleep)

    key = keys.resource_key("nodes", name)
    existing = _get(store, key)
    detect = _with_kubernetes_internal_ip(detect, name, config, interfaces, kube_node)
    ipv4, ipv6 = _resolve_addresses(config, existing.value if existing else None, detect, interfaces)
    if not config.node.disable_node_ip_check:
        for addr in (ipv4, ipv6):
            if addr is not None:
                _check_duplicate_ip(store, config, name, addr, existing)
    node = _write_node(store, key, name, ipv4, ipv6, config)
    log.info("node written name=%s ipv4=%s ipv6=%s", name, ipv4, ipv6)

    if config.ipv4_pool.create:
        ensure_default_ipv4_pool(store, config, interfaces)
    if config.ipv6_pool.create and ipv6_supported(config):
        ensure_default_ipv6_pool(store, config)
    ensure_default_config(store, config, name)
    felix_global, felix_host = read_felix_configuration(store, name)
    config = with_datastore_config(config, felix_global, felix_host)
    log_felix_config(config)
    if ipv4 is not None or ipv6 is not None:
        node = ensure_tunnel_addresses(store, name)

    _write_file(config.node.nodename_file, name)
    mtu = _pod_mtu(store, config, interfaces)
    _write_file(config.agent.mtu_file, str(mtu))
    log.info("startup complete name=%s mtu=%d mtu_file=%s", name, mtu, config.agent.mtu_file)
    return StartupResult(node_name=name, node=node, ipv4=ipv4 if isinstance(ipv4, ipaddress.IPv4Interface) else None,
                         mtu=mtu, config=config, felix_global=felix_global, felix_host=felix_host,
                         ipv6=ipv6 if isinstance(ipv6, ipaddress.IPv6Interface) else None)


# --------------------------------------------------------------------------------------------
# Node name
# --------------------------------------------------------------------------------------------


def determine_node_name(config: Config, os_hostname: Callable[[], str] = socket.gethostname) -> str:
    """NODENAME, else the cached nodename file, else HOSTNAME, else the OS hostname (lower-cased)."""
    if config.node.name:
        return config.node.name
    try:
        with open(config.node.nodename_file, encoding="utf-8") as f:
            cached = f.read().strip()
    except FileNotFoundError:
        cached = ""
    if cached:
        if not is_valid_node_name(cached):
            raise StartupError(
                f'{config.node.nodename_file}: "{cached}" is not a valid node name; delete the file or set NODENAME')
        return cached
    source, name = ("HOSTNAME", config.node.hostname) if config.node.hostname else ("the OS hostname", os_hostname())
    name = name.strip().lower()
    if not is_valid_node_name(name):
        raise StartupError(
            f'{source} "{name}" is not a valid node name (lowercase RFC 1123); set NODENAME')
    return name


def wait_for_datastore(store: Datastore, timeout: float | None, sleep: Callable[[float], None]) -> None:
    """Retry a read until the datastore answers (forever unless `timeout`), like calico-node."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            store.get(_PROBE_KEY)
            return
        except NotFound:
            return
        except Unavailable as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise StartupError(f"datastore still unavailable after {timeout:g}s: {exc}") from exc
            log.info("waiting for datastore error=%s", str(exc).splitlines()[0] if str(exc) else "unavailable")
            sleep(1.0)


# --------------------------------------------------------------------------------------------
# Addresses
# --------------------------------------------------------------------------------------------


def _stored_address(node: dict[str, Any] | None, field: str) -> IPInterface | None:
    text = ((node or {}).get("spec") or {}).get("bgp", {}).get(field)
    if not text:
        return None
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        log.warning("ignoring invalid stored node address field=%s value=%s", field, text)
        return None


def _with_interface_prefix(addr: IPInterface, has_prefix: bool, ifaces: Sequence[Interface], var: str) -> IPInterface:
    found = addresses.find_interface_address(ifaces, addr.ip)
    if found is None:
        # calico-node only warns: the address may be configured later (e.g. a VIP), and the user said so.
        log.warning("address not found on any local interface variable=%s address=%s", var, addr)
        return addr
    iface, local = found
    if has_prefix:
        return addr
    log.info("using interface prefix variable=%s interface=%s address=%s", var, iface.name, local)
    return local


def _resolve_one(
    version: int, config: Config, node: dict[str, Any] | None, detect: DetectFn, interfaces: InterfacesFn,
) -> IPInterface | None:
    if version == 4:
        setting, method, var, field = config.node.ip, config.node.ip_autodetection_method, "IP", "ipv4Address"
    else:
        setting, method, var, field = config.node.ip6, config.node.ip6_autodetection_method, "IP6", "ipv6Address"
    if setting.mode == "none":
        return None
    if setting.mode == "explicit":
        assert setting.address is not None
        return _with_interface_prefix(setting.address, setting.has_prefix, interfaces(), var)
    if setting.mode == "unset":
        stored = _stored_address(node, field)
        if stored is not None:
            if addresses.find_interface_address(interfaces(), stored.ip) is None:
                log.warning("stored node address is not on any local interface field=%s address=%s", field, stored)
            return stored
        if version == 6:
            return None  # IPv6 is only detected when IP6=autodetect
    try:
        found = detect(method, version)
    except AutodetectError:
        if version == 4 and config.node.networking_backend == "none":
            log.warning("no IPv4 address detected; continuing because CALICO_NETWORKING_BACKEND=none")
            return None
        raise
    if found.version != version:
        raise StartupError(f"{var}: autodetection returned {found}, not an IPv{version} address")
    return found


def _kube_node_reader(env: Mapping[str, str]) -> KubeNodeFn:
    """GET /api/v1/nodes/<name> on the Kubernetes API the environment names (the Kubernetes
    datastore's configuration rules, also in etcd mode: calico-node reads the Node whenever a
    kubeconfig is usable)."""
    from felixpy.datastore.kube import KubeConfigError
    from felixpy.node.k8s_node import open_kube_http

    try:
        http = open_kube_http(env)
    except KubeConfigError as exc:
        raise AutodetectError(f"kubernetes-internal-ip: {str(exc).splitlines()[0]}") from None
    if http is None:
        raise AutodetectError("IP_AUTODETECTION_METHOD=kubernetes-internal-ip needs the Kubernetes API: "
                              "set KUBECONFIG (or run in a pod with a service account)")
    return lambda name: dict(http.request("GET", f"/api/v1/nodes/{name}"))


def kubernetes_internal_ip(node_name: str, version: int, read_node: KubeNodeFn,
                           ifaces: Sequence[Interface]) -> IPInterface:
    """calico-node's kubernetes-internal-ip: the first InternalIP of the family in the Kubernetes
    Node's status.addresses, with the prefix of the local interface that carries it."""
    try:
        k8s_node = read_node(node_name)
    except AutodetectError:
        raise
    except Exception as exc:  # the API layer's errors: one line, whatever their type
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AutodetectError(f"kubernetes-internal-ip: cannot read the Kubernetes Node {node_name}: {first}") from None
    for item in (k8s_node.get("status") or {}).get("addresses") or []:
        if not isinstance(item, Mapping) or item.get("type") != "InternalIP":
            continue
        try:
            ip = ipaddress.ip_address(str(item.get("address", "")))
        except ValueError:
            continue
        if ip.version != version:
            continue
        found = addresses.find_interface_address(ifaces, ip)
        if found is None:
            raise AutodetectError(f"kubernetes-internal-ip: InternalIP {ip} of the Kubernetes Node {node_name} "
                                  "is not on any local interface")
        iface, local = found
        log.info("using the Kubernetes Node's InternalIP node=%s interface=%s address=%s", node_name, iface.name, local)
        return local
    raise AutodetectError(f"kubernetes-internal-ip: the Kubernetes Node {node_name} has no IPv{version} InternalIP")


def _with_kubernetes_internal_ip(detect: DetectFn, node_name: str, config: Config, interfaces: InterfacesFn,
                                 read_node: KubeNodeFn | None) -> DetectFn:
    def wrapped(method: AutodetectMethod, version: int) -> IPInterface:
        if method.kind != "kubernetes-internal-ip":
            return detect(method, version)
        return kubernetes_internal_ip(node_name, version, read_node or _kube_node_reader(config.raw), interfaces())
    return wrapped


def _resolve_addresses(
    config: Config, node: dict[str, Any] | None, detect: DetectFn, interfaces: InterfacesFn,
) -> tuple[IPInterface | None, IPInterface | None]:
    ipv4 = _resolve_one(4, config, node, detect, interfaces)
    ipv6 = _resolve_one(6, config, node, detect, interfaces)
    if ipv4 is None and ipv6 is None and config.node.networking_backend != "none":
        raise StartupError(
            f"no IPv4 or IPv6 address configured or detected (IP={config.raw.get('IP', '')!r}); "
            "set IP, IP_AUTODETECTION_METHOD or IP6, or CALICO_NETWORKING_BACKEND=none")
    return ipv4, ipv6


def _check_duplicate_ip(
    store: Datastore, config: Config, name: str, addr: IPInterface, existing: Any,
) -> None:
    """calico-node's checkConflictingNodes for one family: another Node with the same address is
    fatal; an autodetected stale copy of ours is cleared first, so the next start detects afresh."""
    field, setting, var = (("ipv4Address", config.node.ip, "IP") if addr.version == 4
                           else ("ipv6Address", config.node.ip6, "IP6"))
    nodes, _ = store.list(keys.resource_prefix("nodes"))
    for kv in nodes:
        other = kv.value or {}
        other_name = (other.get("metadata") or {}).get("name", keys.parse_key(kv.key).name)
        if other_name == name:
            continue
        other_ip = _stored_address(other, field)
        if other_ip is None or other_ip.ip != addr.ip:
            continue
        stored = _stored_address(existing.value if existing else None, field)
        if existing is not None and stored is not None and stored.ip == addr.ip and setting.mode != "explicit":
            # Clear our stale copy so the next start detects afresh instead of keeping the clash.
            _clear_address(store, keys.resource_key("nodes", name), field)
        raise StartupError(
            f'IPv{addr.version} address {addr.ip} is already used by node "{other_name}"; choose another with '
            f"{var} or {var}_AUTODETECTION_METHOD, or set DISABLE_NODE_IP_CHECK=true")


def _clear_address(store: Datastore, key: str, field: str) -> None:
    for _ in range(CAS_RETRIES):
        kv = _get(store, key)
        if kv is None:
            return
        node = copy.deepcopy(kv.value)
        bgp = (node.get("spec") or {}).get("bgp") or {}
        if field not in bgp:
            return
        del bgp[field]
        try:
            store.update(key, node, kv.revision)
            log.warning("cleared conflicting %s from node key=%s", field, key)
            return
        except (Conflict, NotFound):
            continue


# --------------------------------------------------------------------------------------------
# Node resource
# --------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_resource(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "uid": str(uuid.uuid4()), "creationTimestamp": _now()},
        "spec": spec,
    }


def build_node(
    existing: dict[str, Any] | None, name: str, ipv4: IPInterface | None, ipv6: IPInterface | None,
    as_number: int | None,
) -> dict[str, Any]:
    """The Node to store: `existing` with our addresses and AS, everything else kept."""
    node = copy.deepcopy(existing) if existing else _new_resource("Node", name, {})
    metadata = node.setdefault("metadata", {})
    metadata["name"] = name
    labels = metadata.get("labels") or {}
    labels.setdefault(HOSTNAME_LABEL, name)
    metadata["labels"] = labels
    spec = node.get("spec") or {}
    node["spec"] = spec
    bgp = dict(spec.get("bgp") or {})
    for field, addr in (("ipv4Address", ipv4), ("ipv6Address", ipv6)):
        if addr is None:
            bgp.pop(field, None)
        else:
            bgp[field] = str(addr)
    if as_number is not None:
        bgp["asNumber"] = as_number
    if bgp:
        spec["bgp"] = bgp
    else:
        spec.pop("bgp", None)
    return resources.validate(node)


def _write_node(
    store: Datastore, key: str, name: str, ipv4: IPInterface | None, ipv6: IPInterface | None, config: Config,
) -> dict[str, Any]:
    for _ in range(CAS_RETRIES):
        kv = _get(store, key)
        desired = build_node(kv.value if kv else None, name, ipv4, ipv6, config.node.as_number)
        try:
            if kv is None:
                return dict(store.create(key, desired).value)
            if desired == kv.value:
                return dict(kv.value)
            return dict(store.update(key, desired, kv.revision).value)
        except (AlreadyExists, Conflict, NotFound):
            log.info("node write raced, retrying key=%s", key)
    raise StartupError(f'could not write Node "{name}": it kept changing under {CAS_RETRIES} attempts')


def _get(store: Datastore, key: str) -> Any:
    try:
        return store.get(key)
    except NotFound:
        return None


# --------------------------------------------------------------------------------------------
# Default pool and default configuration
# --------------------------------------------------------------------------------------------


def default_ipv4_cidr(ifaces: Sequence[Interface]) -> ipaddress.IPv4Network:
    """192.168.0.0/16 unless a host network overlaps it, then the first free 172.16-31.0.0/16."""
    host_nets = [a.network for i in ifaces for a in i.addresses if a.version == 4]
    candidates = [ipaddress.IPv4Network("192.168.0.0/16")] + [
        ipaddress.IPv4Network(f"172.{n}.0.0/16") for n in range(16, 32)
    ]
    for candidate in candidates:
        if not any(candidate.overlaps(net) for net in host_nets):
            return candidate
    log.warning("every default pool CIDR overlaps a host network; using 192.168.0.0/16")
    return candidates[0]


def _pool_cidrs(store: Datastore) -> list[tuple[dict[str, Any], ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    pools, _ = store.list(keys.resource_prefix("ippools"))
    out = []
    for kv in pools:
        try:
            out.append((kv.value, ipaddress.ip_network(kv.value["spec"]["cidr"], strict=False)))
        except (KeyError, TypeError, ValueError):
            log.warning("ignoring malformed IP pool key=%s", kv.key)
    return out


def ensure_default_ipv4_pool(store: Datastore, config: Config, interfaces: InterfacesFn) -> dict[str, Any] | None:
    """Create `default-ipv4-ippool` when no IPv4 pool exists; returns the pool created, if any."""
    existing = [pool for pool, net in _pool_cidrs(store) if net.version == 4]
    if existing:
        log.info("IPv4 pool exists, not creating the default pool count=%d", len(existing))
        return None
    settings = config.ipv4_pool
    cidr = settings.cidr or default_ipv4_cidr(interfaces())
    return _create_default_pool(store, DEFAULT_IPV4_POOL_NAME, cidr, settings, settings.ipip_mode)


def _create_default_pool(store: Datastore, name: str, cidr: ipaddress.IPv4Network | ipaddress.IPv6Network,
                         settings: PoolConfig, ipip_mode: str) -> dict[str, Any] | None:
    """Create one of calico-node's default pools from its CALICO_IPV{4,6}POOL_* settings; None
    when another node created it first."""
    pool = resources.validate(_new_resource("IPPool", name, {
        "cidr": str(cidr),
        "blockSize": settings.block_size,
        "ipipMode": ipip_mode,
        "vxlanMode": settings.vxlan_mode,
        "natOutgoing": settings.nat_outgoing,
        "nodeSelector": settings.node_selector,
        "disableBGPExport": settings.disable_bgp_export,
        "allowedUses": ["Workload", "Tunnel"],
    }))
    try:
        store.create(keys.resource_key("ippools", name), pool)
    except AlreadyExists:
        log.info("default pool created concurrently name=%s", name)
        return None
    log.info("created default pool name=%s cidr=%s ipip=%s vxlan=%s nat_outgoing=%s", name, cidr, ipip_mode,
             settings.vxlan_mode, settings.nat_outgoing)
    return pool


def ipv6_supported(config: Config, proc_path: str = "/proc/sys/net/ipv6") -> bool:
    """calico-node's ipv6Supported: FELIX_IPV6SUPPORT (the environment only) and a kernel with IPv6."""
    return config.felix.ipv6_support and os.path.exists(proc_path)


def random_ula_prefix(rng: random.Random | None = None) -> ipaddress.IPv6Network:
    """An RFC 4193 ULA /48: fd followed by 40 random bits (calico-node's GenerateIPv6ULAPrefix)."""
    global_id = (rng or random.SystemRandom()).getrandbits(40)
    return ipaddress.IPv6Network(((0xFD << 120) | (global_id << 80), 48))


def ensure_default_ipv6_pool(store: Datastore, config: Config,
                             rng: random.Random | None = None) -> dict[str, Any] | None:
    """Create `default-ipv6-ippool` when no IPv6 pool exists; returns the pool created, if any."""
    existing = [pool for pool, net in _pool_cidrs(store) if net.version == 6]
    if existing:
        log.info("IPv6 pool exists, not creating the default IPv6 pool count=%d", len(existing))
        return None
    settings = config.ipv6_pool
    cidr = settings.cidr or random_ula_prefix(rng)
    return _create_default_pool(store, DEFAULT_IPV6_POOL_NAME, cidr, settings, "Never")  # no IPIP for IPv6


def _create_if_missing(store: Datastore, key: str, value: dict[str, Any]) -> None:
    try:
        store.create(key, value)
        log.info("created default key=%s", key)
    except AlreadyExists:
        pass


def ensure_default_config(store: Datastore, config: Config, name: str) -> None:
    """calico-node's ensureDefaultConfig, create-only: existing objects are never changed."""
    defaults: list[tuple[str, str, str, dict[str, Any]]] = [
        ("felixconfigurations", "default", "FelixConfiguration", {"reportingInterval": "0s", "logSeverityScreen": "Info"}),
        ("bgpconfigurations", "default", "BGPConfiguration", {}),
        ("clusterinformations", "default", "ClusterInformation", {
            "clusterGUID": uuid.uuid4().hex,
            "clusterType": config.node.cluster_type,
            "calicoVersion": f"felixpy-{felixpy.__version__}",
            "datastoreReady": True,
        }),
    ]
    if config.datastore.type != "kubernetes":
        # Felix's per-node override: pods may reach their own host unless a policy says otherwise.
        defaults.append(("felixconfigurations", f"node.{name}", "FelixConfiguration",
                         {"defaultEndpointToHostAction": "Return"}))
    for plural, res_name, kind, spec in defaults:
        _create_if_missing(store, keys.resource_key(plural, res_name), resources.validate(_new_resource(kind, res_name, spec)))
    _create_if_missing(store, keys.IPAM_CONFIG, {"strict_affinity": False, "auto_allocate_blocks": True, "maxBlocksPerHost": 0})


def _spec(store: Datastore, plural: str, name: str) -> dict[str, Any] | None:
    kv = _get(store, keys.resource_key(plural, name))
    if kv is None or not isinstance(kv.value, dict):
        return None
    spec = kv.value.get("spec")
    return dict(spec) if isinstance(spec, dict) else {}


def read_felix_configuration(store: Datastore, name: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The specs of FelixConfiguration `default` and `node.<name>` (None: absent), as Felix's
    loadConfigFromDatastore reads them before it starts."""
    return _spec(store, "felixconfigurations", "default"), _spec(store, "felixconfigurations", f"node.{name}")


def read_cluster_information(store: Datastore) -> dict[str, Any] | None:
    """The spec of ClusterInformation `default` (None: absent)."""
    return _spec(store, "clusterinformations", "default")


def datastore_ready(spec: Mapping[str, Any] | None) -> bool:
    """ClusterInformation `default` spec → is the datastore open for writes? Only an explicit
    `datastoreReady: false` (felixctl datastore migrate lock) closes it; a datastore without the
    resource is one nothing has locked."""
    return not (spec is not None and spec.get("datastoreReady") is False)


LOCK_LOG_INTERVAL = 10.0


def wait_while_locked(store: Datastore, timeout: float | None, sleep: Callable[[float], None]) -> None:
    """While ClusterInformation says datastoreReady=false (a migration holds the datastore), wait
    before writing anything, as Felix waits ("Waiting for datastore to be initialized (or
    migrated)"); forever unless `timeout`."""
    started = time.monotonic()
    logged = -LOCK_LOG_INTERVAL
    while not datastore_ready(read_cluster_information(store)):
        waited = time.monotonic() - started
        if timeout is not None and waited >= timeout:
            raise StartupError(f"the datastore is still locked for migration after {timeout:g}s "
                               "(ClusterInformation datastoreReady=false); run `felixctl datastore migrate unlock`")
        if waited - logged >= LOCK_LOG_INTERVAL:
            log.warning("datastore is locked for migration (ClusterInformation datastoreReady=false): "
                        "waiting for `felixctl datastore migrate unlock` waited=%.0fs", waited)
            logged = waited
        sleep(1.0)


def log_felix_config(config: Config) -> None:
    """One line per Felix parameter not at its default, naming where it came from."""
    for param in FELIX_PARAMS:
        source = config.felix.sources.get(param.attr, SOURCE_DEFAULT)
        if source != SOURCE_DEFAULT:
            log.info("felix parameter param=%s value=%r source=%s", param.field or param.name,
                     getattr(config.felix, param.attr), source)


# --------------------------------------------------------------------------------------------
# Tunnel addresses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Tunnel:
    kind: str  # names.tunnel_handle's kind
    pool_mode: str  # the IPPool field that enables it
    node_field: tuple[str, ...]  # where on the Node its address lives
    attr_type: str  # IPAM attribute "type" of the allocation, as calico-node sets it
    version: int = 4  # the pools' (and the address's) IP family
    mac_field: tuple[str, ...] | None = None  # VXLAN: where the node's VTEP MAC lives


_TUNNELS = (
    _Tunnel("vxlan", "vxlanMode", ("spec", "ipv4VXLANTunnelAddr"), "vxlanTunnelAddress",
            mac_field=("spec", "vxlanTunnelMACAddr")),
    _Tunnel("vxlan-v6", "vxlanMode", ("spec", "ipv6VXLANTunnelAddr"), "vxlanV6TunnelAddress", version=6,
            mac_field=("spec", "vxlanTunnelMACAddrV6")),
    _Tunnel("ipip", "ipipMode", ("spec", "bgp", "ipv4IPIPTunnelAddr"), "ipipTunnelAddress"),
)


def random_vtep_mac(rng: random.Random | None = None) -> str:
    """A random unicast, locally administered MAC for this node's VTEP (as calico-node makes one)."""
    octets = [(rng or random.SystemRandom()).randrange(256) for _ in range(6)]
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{o:02x}" for o in octets)


def _field(node: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = node
    for part in path:
        value = (value or {}).get(part) if isinstance(value, dict) else None
    return value


def _set_field(node: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    parent = node
    for part in path[:-1]:
        parent = parent.setdefault(part, {})
    if value is None:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = value


def _tunnel_address(ipam: IPAM, node_name: str, tunnel: _Tunnel, current: str | None,
                    pools: list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]) -> str | None:
    """The node's address for `tunnel`: kept if still valid, else (re)allocated; None if unused."""
    handle = names.tunnel_handle(tunnel.kind, node_name)
    if not pools:
        released = ipam.release_by_handle(handle)
        if released:
            log.info("released tunnel address kind=%s handle=%s ips=%s", tunnel.kind, handle,
                     ",".join(map(str, released)))
        return None
    nets = [net for _, net in pools]

    def usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        return any(ip in net for net in nets)

    if current:
        addr = ipaddress.ip_address(current)
        assignment = ipam.get_assignment(addr) if usable(addr) else None
        if assignment is not None and assignment.handle == handle:
            return current
    # An allocation under our handle that never reached the Node (a crash in between) is reused.
    held = ipam.ips_by_handle(handle)
    for ip in held:
        if usable(ip):
            stale = [other for other in held if other != ip]
            if stale:
                ipam.release_ips(stale)
            return str(ip)
    if held:
        ipam.release_by_handle(handle)  # its pool is gone or no longer encapsulated
    try:
        ip = ipam.auto_assign(num=1, handle=handle, attrs={"type": tunnel.attr_type, "node": node_name},
                              node=node_name, pools=[name for name, _ in pools], use=USE_TUNNEL,
                              version=tunnel.version)[0]
    except IPAMError as exc:
        raise StartupError(f"cannot allocate the {tunnel.kind} tunnel address: {exc}") from exc
    log.info("allocated tunnel address kind=%s handle=%s ip=%s", tunnel.kind, handle, ip)
    return str(ip)


def _encap_pools(store: Datastore, mode_field: str, labels: dict[str, str],
                 version: int = 4) -> list[tuple[str, ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    """Enabled pools of one IP family using this encapsulation that allow tunnel addresses and
    select the node."""
    out = []
    for pool, net in _pool_cidrs(store):
        spec = pool.get("spec") or {}
        if net.version != version or spec.get("disabled"):
            continue
        if spec.get(mode_field, "Never") == "Never":
            continue
        if USE_TUNNEL not in (spec.get("allowedUses") or ["Workload", "Tunnel"]):
            continue
        if not selector_matches(str(spec.get("nodeSelector") or ""), labels):
            continue
        out.append(((pool.get("metadata") or {}).get("name", ""), net))
    return out


def ensure_tunnel_addresses(store: Datastore, name: str, *, ipam: IPAM | None = None,
                            new_mac: Callable[[], str] = random_vtep_mac) -> dict[str, Any]:
    """calico-node's tunnel address allocator for VXLAN (IPv4 and IPv6) and IPIP; returns the
    stored Node.

    Idempotent: an address already on the Node (and allocated to our handle from a pool that
    still uses its encapsulation) is kept, and so are the VTEP MACs. Calico's Felix derives a
    missing VTEP MAC from a hash of the node name; felixpy writes a random one to the Node with
    the address, so every node reads its peers' MACs from the datastore.
    """
    ipam = ipam or IPAM(store, cache_ttl=0)
    key = keys.resource_key("nodes", name)
    kv = _get(store, key)
    if kv is None:
        raise StartupError(f'Node "{name}" vanished during startup')
    wanted: dict[tuple[str, ...], str | None] = {}
    labels = dict(((kv.value or {}).get("metadata") or {}).get("labels") or {})
    for tunnel in _TUNNELS:
        current = _field(kv.value, tunnel.node_field)
        wanted[tunnel.node_field] = _tunnel_address(ipam, name, tunnel, current,
                                                    _encap_pools(store, tunnel.pool_mode, labels, tunnel.version))
    for _ in range(CAS_RETRIES):
        node = copy.deepcopy(kv.value)
        for path, value in wanted.items():
            _set_field(node, path, value)
        for tunnel in _TUNNELS:
            if tunnel.mac_field is None:
                continue
            used = wanted[tunnel.node_field] is not None
            mac = _field(node, tunnel.mac_field) if used else None
            _set_field(node, tunnel.mac_field, (mac or new_mac()) if used else None)
        if node == kv.value:
            return dict(kv.value)
        try:
            stored = dict(store.update(key, resources.validate(node), kv.revision).value)
            log.info("node tunnel addresses written name=%s %s", name, " ".join(
                f"{t.kind}={_field(stored, t.node_field)}"
                + (f" {t.kind}_mac={_field(stored, t.mac_field)}" if t.mac_field else "") for t in _TUNNELS))
            return stored
        except (Conflict, NotFound):
            kv = _get(store, key)
            if kv is None:
                raise StartupError(f'Node "{name}" vanished during startup') from None
    raise StartupError(f'could not write Node "{name}": it kept changing under {CAS_RETRIES} attempts')


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _pod_mtu(store: Datastore, config: Config, interfaces: InterfacesFn) -> int:
    """Felix's pod MTU: the smallest over the enabled encapsulations of both families (IPv6
    VXLAN only with IPv6 support), else the host MTU."""
    host = addresses.pick_host_mtu(interfaces(), config.felix.mtu_iface_pattern)
    ipip = vxlan = vxlan_v6 = False
    for pool, net in _pool_cidrs(store):
        spec = pool.get("spec") or {}
        if spec.get("disabled"):
            continue
        if net.version == 6:
            vxlan_v6 = vxlan_v6 or (config.felix.ipv6_support and spec.get("vxlanMode", "Never") != "Never")
            continue
        ipip = ipip or spec.get("ipipMode", "Never") != "Never"
        vxlan = vxlan or spec.get("vxlanMode", "Never") != "Never"
    mtu = addresses.pod_mtu(host, ipip=ipip, vxlan=vxlan, ipip_mtu=config.felix.ipip_mtu, vxlan_mtu=config.felix.vxlan_mtu,
                            vxlan_v6=vxlan_v6, vxlan_mtu_v6=config.felix.vxlan_mtu_v6)
    log.info("pod mtu host_mtu=%d ipip=%s vxlan=%s vxlan_v6=%s mtu=%d", host, ipip, vxlan, vxlan_v6, mtu)
    return mtu


def _write_file(path: str, content: str) -> None:
    """Atomic replace, so the CNI plugin never reads a half-written file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
