"""Node startup against the in-memory store and a real etcd (every scenario runs on both), plus one
run whose addresses come from real interfaces in a namespace of our own."""

from __future__ import annotations

import functools
import ipaddress
import os
import pathlib
import secrets
import subprocess
from typing import Any, Callable, Iterator

import pytest

from felixpy.config import AutodetectMethod, Config, load_config
from felixpy.datastore import keys
from felixpy.datastore.api import KV, Conflict, Datastore, Unavailable
from felixpy.datastore.memory import MemoryDatastore
from felixpy.kernel import addresses
from felixpy.kernel.addresses import AutodetectError, Interface, IPInterface
from felixpy.node.startup import StartupError, StartupResult, default_ipv4_cidr, startup

I4 = ipaddress.IPv4Interface
HOST = [
    Interface("eth0", 2, True, 1500, (I4("192.0.2.11/24"),)),
    Interface("lo", 1, True, 65536, ()),
]
NODE_KEY = keys.resource_key("nodes", "n1")
POOL_KEY = keys.resource_key("ippools", "default-ipv4-ippool")


@pytest.fixture(params=["memory", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryDatastore()
    else:
        yield request.getfixturevalue("etcd_store")


class Detector:
    """A fake autodetect that records its calls."""

    def __init__(self, result: str | None = "192.0.2.11/24") -> None:
        self.result = result
        self.calls: list[tuple[str, int]] = []

    def __call__(self, method: AutodetectMethod, version: int = 4) -> IPInterface:
        self.calls.append((str(method), version))
        if self.result is None:
            raise AutodetectError(f"no IPv{version} address found on interfaces matching {method}")
        return ipaddress.ip_interface(self.result)


def config(tmp_path: pathlib.Path, **env: str | None) -> Config:
    base: dict[str, str | None] = {
        "ETCD_ENDPOINTS": "http://127.0.0.1:2379", "NODENAME": "n1", "FELIXPY_STATE_DIR": str(tmp_path)}
    base.update(env)
    return load_config({k: v for k, v in base.items() if v is not None})


def run(
    store: Datastore, cfg: Config, detect: Callable[..., IPInterface] | None = None,
    ifaces: list[Interface] | None = None, **kwargs: Any,
) -> StartupResult:
    return startup(store, cfg, detect=detect or Detector(), interfaces=lambda: list(ifaces or HOST), **kwargs)


def value(store: Datastore, key: str) -> Any:
    return store.get(key).value


def put_node(store: Datastore, name: str, ipv4: str | None, **extra: Any) -> None:
    spec: dict[str, Any] = {"bgp": {"ipv4Address": ipv4}} if ipv4 else {}
    store.create(keys.resource_key("nodes", name), {
        "apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": name, **extra}, "spec": spec})


# -- first start ----------------------------------------------------------------------------------


def test_first_start_creates_node_pool_and_defaults(store: Datastore, tmp_path: pathlib.Path) -> None:
    detect = Detector()
    result = run(store, config(tmp_path, CLUSTER_TYPE="k8s,bgp", AS="64600"), detect)
    assert detect.calls == [("first-found", 4)]
    assert result.node_name == "n1" and result.ipv4 == I4("192.0.2.11/24") and result.mtu == 1500

    node = value(store, NODE_KEY)
    assert node == result.node
    assert (node["apiVersion"], node["kind"], node["metadata"]["name"]) == ("projectcalico.org/v3", "Node", "n1")
    assert node["metadata"]["labels"] == {"kubernetes.io/hostname": "n1"}
    assert node["spec"]["bgp"] == {"ipv4Address": "192.0.2.11/24", "asNumber": 64600}

    pool = value(store, POOL_KEY)
    assert (pool["kind"], pool["metadata"]["name"]) == ("IPPool", "default-ipv4-ippool")
    spec = pool["spec"]
    assert spec["cidr"] == "192.168.0.0/16" and spec["blockSize"] == 26
    assert (spec["ipipMode"], spec["vxlanMode"], spec["natOutgoing"]) == ("Never", "Never", True)
    assert (spec["nodeSelector"], spec["disableBGPExport"], spec["allowedUses"]) == ("all()", False, ["Workload", "Tunnel"])

    felix = value(store, keys.resource_key("felixconfigurations", "default"))["spec"]
    assert felix == {"reportingInterval": "0s", "logSeverityScreen": "Info"}
    per_node = value(store, keys.resource_key("felixconfigurations", "node.n1"))["spec"]
    assert per_node == {"defaultEndpointToHostAction": "Return"}
    assert value(store, keys.resource_key("bgpconfigurations", "default"))["kind"] == "BGPConfiguration"
    info = value(store, keys.resource_key("clusterinformations", "default"))["spec"]
    assert info["calicoVersion"].startswith("felixpy-") and info["datastoreReady"] is True
    assert info["clusterType"] == "k8s,bgp" and len(info["clusterGUID"]) == 32
    assert value(store, keys.IPAM_CONFIG) == {"strict_affinity": False, "auto_allocate_blocks": True, "maxBlocksPerHost": 0}

    assert (tmp_path / "nodename").read_text() == "n1"
    assert (tmp_path / "mtu").read_text() == "1500"


def test_pool_settings_from_the_environment(store: Datastore, tmp_path: pathlib.Path) -> None:
    cfg = config(tmp_path, CALICO_IPV4POOL_CIDR="10.244.0.0/16", CALICO_IPV4POOL_BLOCK_SIZE="24",
                 CALICO_IPV4POOL_VXLAN="CrossSubnet", CALICO_IPV4POOL_NAT_OUTGOING="false",
                 CALICO_IPV4POOL_NODE_SELECTOR="has(pods)", CALICO_IPV4POOL_DISABLE_BGP_EXPORT="true")
    result = run(store, cfg)
    spec = value(store, POOL_KEY)["spec"]
    assert (spec["cidr"], spec["blockSize"], spec["vxlanMode"], spec["ipipMode"]) == ("10.244.0.0/16", 24, "CrossSubnet", "Never")
    assert (spec["natOutgoing"], spec["nodeSelector"], spec["disableBGPExport"]) == (False, "has(pods)", True)
    assert result.mtu == 1450  # VXLAN: host 1500 - 50


def test_pool_is_created_once_and_never_overwritten(store: Datastore, tmp_path: pathlib.Path) -> None:
    run(store, config(tmp_path, CALICO_IPV4POOL_CIDR="10.244.0.0/16", CALICO_IPV4POOL_IPIP="Always"))
    first = store.get(POOL_KEY)
    assert first.value["spec"]["ipipMode"] == "Always"
    # Another node starts with different pool settings: the pool stays as the first node made it.
    cfg = config(tmp_path, NODENAME="n2", CALICO_IPV4POOL_CIDR="10.50.0.0/16", CALICO_IPV4POOL_IPIP="Never")
    result = run(store, cfg, Detector("192.0.2.12/24"))
    assert store.get(POOL_KEY) == first
    pools, _ = store.list(keys.resource_prefix("ippools"))
    # One IPv4 pool, as the first node made it (and the first node's default IPv6 pool).
    assert sorted(kv.value["metadata"]["name"] for kv in pools) == ["default-ipv4-ippool", "default-ipv6-ippool"]
    assert result.mtu == 1480  # the IPIP pool decides the MTU, not this node's environment


def test_no_default_pool_when_any_ipv4_pool_exists(store: Datastore, tmp_path: pathlib.Path) -> None:
    mine = {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "mine"},
            "spec": {"cidr": "10.9.0.0/16", "vxlanMode": "Always"}}
    store.create(keys.resource_key("ippools", "mine"), mine)
    result = run(store, config(tmp_path, CALICO_IPV6POOL_CIDR="none"))
    pools, _ = store.list(keys.resource_prefix("ippools"))
    assert [kv.value["metadata"]["name"] for kv in pools] == ["mine"]
    assert result.mtu == 1450


@pytest.mark.parametrize("env, created", [
    ({"NO_DEFAULT_POOLS": "true"}, []),
    ({"CALICO_IPV4POOL_CIDR": "none"}, ["default-ipv6-ippool"]),
    ({"CALICO_IPV6POOL_CIDR": "none"}, ["default-ipv4-ippool"]),
    # calico-node's manifest: no IPv6 support, no IPv6 pool.
    ({"FELIX_IPV6SUPPORT": "false"}, ["default-ipv4-ippool"]),
])
def test_pool_creation_disabled(store: Datastore, tmp_path: pathlib.Path, env: dict[str, str],
                                created: list[str]) -> None:
    run(store, config(tmp_path, **env))
    assert [kv.value["metadata"]["name"] for kv in store.list(keys.resource_prefix("ippools"))[0]] == created


def test_default_ipv6_pool_is_a_random_ula_48_or_as_configured(store: Datastore, tmp_path: pathlib.Path) -> None:
    run(store, config(tmp_path))
    spec = value(store, keys.resource_key("ippools", "default-ipv6-ippool"))["spec"]
    cidr = ipaddress.IPv6Network(spec["cidr"])
    assert cidr.prefixlen == 48 and cidr.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert (spec["blockSize"], spec["natOutgoing"], spec["vxlanMode"], spec["ipipMode"]) == (122, False, "Never", "Never")
    # A second node finds an IPv6 pool and creates none.
    run(store, config(tmp_path, NODENAME="n2", CALICO_IPV6POOL_CIDR="fd00:99::/64"), Detector("192.0.2.12/24"))
    assert value(store, keys.resource_key("ippools", "default-ipv6-ippool"))["spec"]["cidr"] == str(cidr)
    store.delete(keys.resource_key("ippools", "default-ipv6-ippool"))
    run(store, config(tmp_path, CALICO_IPV6POOL_CIDR="fd00:10:244::/64", CALICO_IPV6POOL_BLOCK_SIZE="120",
                      CALICO_IPV6POOL_VXLAN="Always", CALICO_IPV6POOL_NAT_OUTGOING="true"))
    spec = value(store, keys.resource_key("ippools", "default-ipv6-ippool"))["spec"]
    assert (spec["cidr"], spec["blockSize"], spec["vxlanMode"], spec["natOutgoing"]) == \
        ("fd00:10:244::/64", 120, "Always", True)


def test_default_cidr_avoids_host_networks() -> None:
    def host(*cidrs: str) -> list[Interface]:
        return [Interface("eth0", 2, True, 1500, tuple(I4(c) for c in cidrs))]

    assert default_ipv4_cidr(host("10.0.0.5/8")) == ipaddress.IPv4Network("192.168.0.0/16")
    assert default_ipv4_cidr(host("192.168.1.5/24")) == ipaddress.IPv4Network("172.16.0.0/16")
    assert default_ipv4_cidr(host("192.168.1.5/24", "172.16.9.1/16")) == ipaddress.IPv4Network("172.17.0.0/16")
    assert default_ipv4_cidr(host("192.168.1.5/24", "172.16.0.1/12")) == ipaddress.IPv4Network("192.168.0.0/16")


def test_default_pool_cidr_uses_host_addresses(store: Datastore, tmp_path: pathlib.Path) -> None:
    ifaces = [Interface("eth0", 2, True, 1500, (I4("192.168.10.11/24"),))]
    run(store, config(tmp_path), Detector("192.168.10.11/24"), ifaces)
    assert value(store, POOL_KEY)["spec"]["cidr"] == "172.16.0.0/16"


def test_defaults_are_create_only(store: Datastore, tmp_path: pathlib.Path) -> None:
    felix_key = keys.resource_key("felixconfigurations", "default")
    store.create(felix_key, {"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration",
                             "metadata": {"name": "default"}, "spec": {"logSeverityScreen": "Debug"}})
    store.create(keys.IPAM_CONFIG, {"strict_affinity": True, "auto_allocate_blocks": True, "maxBlocksPerHost": 4})
    run(store, config(tmp_path))
    info = store.get(keys.resource_key("clusterinformations", "default"))
    run(store, config(tmp_path, NODENAME="n2"), Detector("192.0.2.12/24"))
    assert value(store, felix_key)["spec"] == {"logSeverityScreen": "Debug"}
    assert value(store, keys.IPAM_CONFIG)["maxBlocksPerHost"] == 4
    assert store.get(keys.resource_key("clusterinformations", "default")) == info  # same GUID, never rewritten


# -- node identity ----------------------------------------------------------------------------------


def test_node_name_precedence(store: Datastore, tmp_path: pathlib.Path) -> None:
    hostname = lambda: "OS-Host"  # noqa: E731

    def config(tmp_path: pathlib.Path, **env: str | None) -> Config:
        # Every run here is a new node name on the same host address.
        return globals()["config"](tmp_path, DISABLE_NODE_IP_CHECK="true", **env)

    assert run(store, config(tmp_path, NODENAME=None), os_hostname=hostname).node_name == "os-host"
    assert (tmp_path / "nodename").read_text() == "os-host"
    # The cached file now wins over HOSTNAME and the OS hostname ...
    assert run(store, config(tmp_path, NODENAME=None, HOSTNAME="other"), os_hostname=hostname).node_name == "os-host"
    (tmp_path / "nodename").unlink()
    assert run(store, config(tmp_path, NODENAME=None, HOSTNAME="Web-1"), os_hostname=hostname).node_name == "web-1"
    # ... and NODENAME wins over the file, which is rewritten.
    assert run(store, config(tmp_path, NODENAME="n9"), os_hostname=hostname).node_name == "n9"
    assert (tmp_path / "nodename").read_text() == "n9"


def test_nodename_file_override(store: Datastore, tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sub" / "name"
    run(store, config(tmp_path, CALICO_NODENAME_FILE=str(path)))
    assert path.read_text() == "n1"


def test_invalid_hostname_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(StartupError, match=r'^HOSTNAME "bad_host" is not a valid node name'):
        run(MemoryDatastore(), config(tmp_path, NODENAME=None, HOSTNAME="bad_host"))


def test_existing_node_keeps_what_others_wrote(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n1", "192.0.2.11/24", labels={"rack": "r1", "kubernetes.io/hostname": "custom"})
    node = value(store, NODE_KEY)
    node["spec"]["bgp"].update(asNumber=65001, routeReflectorClusterID="1.0.0.1")
    node["spec"]["orchRefs"] = [{"nodeName": "k8s-n1", "orchestrator": "k8s"}]
    store.update(NODE_KEY, node, store.get(NODE_KEY).revision)

    detect = Detector()
    result = run(store, config(tmp_path), detect)
    assert detect.calls == []  # IP unset and the Node has an address: keep it
    stored = value(store, NODE_KEY)
    assert stored["metadata"]["labels"] == {"rack": "r1", "kubernetes.io/hostname": "custom"}
    assert stored["spec"]["bgp"] == {"ipv4Address": "192.0.2.11/24", "asNumber": 65001, "routeReflectorClusterID": "1.0.0.1"}
    assert stored["spec"]["orchRefs"] == [{"nodeName": "k8s-n1", "orchestrator": "k8s"}]
    assert result.node == stored

    run(store, config(tmp_path, AS="1.5"))
    assert value(store, NODE_KEY)["spec"]["bgp"]["asNumber"] == 65541


def test_unchanged_node_is_not_rewritten(store: Datastore, tmp_path: pathlib.Path) -> None:
    run(store, config(tmp_path))
    before = store.get(NODE_KEY)
    run(store, config(tmp_path))
    assert store.get(NODE_KEY).revision == before.revision


# -- IP semantics -------------------------------------------------------------------------------------


def test_explicit_ip_with_prefix(store: Datastore, tmp_path: pathlib.Path) -> None:
    detect = Detector()
    result = run(store, config(tmp_path, IP="192.0.2.11/25"), detect)
    assert detect.calls == [] and result.ipv4 == I4("192.0.2.11/25")
    assert value(store, NODE_KEY)["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/25"


def test_explicit_ip_without_prefix_takes_the_interface_prefix(store: Datastore, tmp_path: pathlib.Path) -> None:
    assert run(store, config(tmp_path, IP="192.0.2.11")).ipv4 == I4("192.0.2.11/24")


def test_explicit_ip_not_on_this_host_is_kept_as_host_route(store: Datastore, tmp_path: pathlib.Path) -> None:
    assert run(store, config(tmp_path, IP="198.51.100.7")).ipv4 == I4("198.51.100.7/32")


def test_explicit_ip_replaces_the_stored_one(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n1", "192.0.2.99/24")
    run(store, config(tmp_path, IP="192.0.2.11/24"))
    assert value(store, NODE_KEY)["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/24"


def test_autodetect_overwrites_the_stored_address(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n1", "192.0.2.99/24")
    detect = Detector()
    run(store, config(tmp_path, IP="autodetect", IP_AUTODETECTION_METHOD="interface=eth.*"), detect)
    assert detect.calls == [("interface=eth.*", 4)]
    assert value(store, NODE_KEY)["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/24"


def test_ip_none(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n1", "192.0.2.11/24")
    # No IPv4 and no IPv6 with a routing backend: fatal.
    with pytest.raises(StartupError, match="no IPv4 or IPv6 address configured or detected"):
        run(store, config(tmp_path, IP="none"))
    result = run(store, config(tmp_path, IP="none", IP6="none", CALICO_NETWORKING_BACKEND="none"))
    assert result.ipv4 is None and "bgp" not in value(store, NODE_KEY)["spec"]


def test_detection_failure_is_fatal_unless_policy_only(store: Datastore, tmp_path: pathlib.Path) -> None:
    with pytest.raises(StartupError, match=r"^no IPv4 address found on interfaces matching first-found$"):
        run(store, config(tmp_path), Detector(None))
    result = run(store, config(tmp_path, CALICO_NETWORKING_BACKEND="none"), Detector(None))
    assert result.ipv4 is None


def test_duplicate_node_ip(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n2", "192.0.2.11/24")
    with pytest.raises(StartupError) as info:
        run(store, config(tmp_path))
    assert str(info.value) == (
        'IPv4 address 192.0.2.11 is already used by node "n2"; choose another with IP or '
        "IP_AUTODETECTION_METHOD, or set DISABLE_NODE_IP_CHECK=true")
    assert store.list(keys.resource_prefix("nodes"))[0][0].key.endswith("/n2")  # n1 was not written
    run(store, config(tmp_path, DISABLE_NODE_IP_CHECK="true"))
    assert value(store, NODE_KEY)["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/24"


def test_duplicate_stale_ip_is_cleared(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n1", "192.0.2.11/24")
    put_node(store, "n2", "192.0.2.11/24")
    with pytest.raises(StartupError, match='already used by node "n2"'):
        run(store, config(tmp_path))
    assert "bgp" not in value(store, NODE_KEY)["spec"] or "ipv4Address" not in value(store, NODE_KEY)["spec"]["bgp"]
    # The next start detects afresh instead of keeping the clash.
    detect = Detector("192.0.2.12/24")
    run(store, config(tmp_path), detect)
    assert detect.calls and value(store, NODE_KEY)["spec"]["bgp"]["ipv4Address"] == "192.0.2.12/24"


# -- concurrency, waiting, MTU ----------------------------------------------------------------------


class RacingStore:
    """Delegates to a store; before the first Node update, someone else edits the Node."""

    def __init__(self, inner: Datastore) -> None:
        self.inner = inner
        self.raced = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def update(self, key: str, value: Any, revision: int) -> KV:
        if key == NODE_KEY and self.raced == 0:
            self.raced += 1
            current = self.inner.get(key)
            edited = dict(current.value)
            edited["metadata"] = {**edited["metadata"], "labels": {"edited": "by-felixctl"}}
            self.inner.update(key, edited, current.revision)
        return self.inner.update(key, value, revision)


def test_node_write_is_compare_and_swap(store: Datastore, tmp_path: pathlib.Path) -> None:
    put_node(store, "n1", "192.0.2.99/24")
    racing = RacingStore(store)
    run(racing, config(tmp_path, IP="192.0.2.11/24"))  # type: ignore[arg-type]
    node = value(store, NODE_KEY)
    assert racing.raced == 1
    assert node["metadata"]["labels"] == {"edited": "by-felixctl", "kubernetes.io/hostname": "n1"}
    assert node["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/24"


def test_node_write_gives_up_after_bounded_retries(tmp_path: pathlib.Path) -> None:
    inner = MemoryDatastore()
    put_node(inner, "n1", "192.0.2.99/24")

    class AlwaysConflict(RacingStore):
        def update(self, key: str, value: Any, revision: int) -> KV:
            self.raced += 1
            raise Conflict(f"{key} changed")

    store = AlwaysConflict(inner)
    with pytest.raises(StartupError, match=r'^could not write Node "n1": it kept changing under 10 attempts$'):
        run(store, config(tmp_path, IP="192.0.2.11/24"))  # type: ignore[arg-type]
    assert store.raced == 10


def test_wait_for_datastore(tmp_path: pathlib.Path) -> None:
    store = MemoryDatastore()
    store.available = False
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            store.available = True

    run(store, config(tmp_path, WAIT_FOR_DATASTORE="true"), sleep=sleep)
    assert len(sleeps) == 3 and store.get(NODE_KEY).value["metadata"]["name"] == "n1"

    store.available = False
    with pytest.raises(StartupError, match=r"^datastore still unavailable after 0s"):
        run(store, config(tmp_path, WAIT_FOR_DATASTORE="true"), datastore_wait_timeout=0, sleep=lambda s: None)
    # Without WAIT_FOR_DATASTORE an outage reaches the caller as Unavailable, which it may retry.
    with pytest.raises(Unavailable):
        run(store, config(tmp_path))


def test_mtu_file(store: Datastore, tmp_path: pathlib.Path) -> None:
    ifaces = [Interface("eth0", 2, True, 9000, (I4("192.0.2.11/24"),)), Interface("ens3", 3, True, 1460, ())]
    cfg = config(tmp_path, CALICO_IPV4POOL_IPIP="Always")
    assert run(store, cfg, ifaces=ifaces).mtu == 1440
    assert (tmp_path / "mtu").read_text() == "1440"
    assert run(store, config(tmp_path, FELIX_IPINIPMTU="1300"), ifaces=ifaces).mtu == 1300
    assert run(store, config(tmp_path, FELIX_MTUIFACEPATTERN="^eth"), ifaces=ifaces).mtu == 8980


# -- real interfaces -------------------------------------------------------------------------------


@pytest.fixture
def node_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = "fxt" + secrets.token_hex(3)[:5]

    def ip(*args: str) -> None:
        subprocess.run(["ip", "-n", name, *args], check=True, capture_output=True, timeout=10)

    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=10)
    try:
        ip("link", "add", "eth0", "type", "veth", "peer", "name", "veth0")
        ip("link", "add", "eth1", "mtu", "1400", "type", "veth", "peer", "name", "veth1")
        for dev in ("eth0", "veth0", "eth1", "veth1"):
            ip("link", "set", dev, "up")
        ip("addr", "add", "192.0.2.31/24", "dev", "eth0")
        ip("addr", "add", "198.51.100.31/25", "dev", "eth1")
        ip("addr", "add", "10.97.0.1/24", "dev", "veth0")  # excluded from first-found
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


def test_startup_with_real_interfaces_and_etcd(etcd_store: Datastore, node_netns: str, tmp_path: pathlib.Path) -> None:
    kernel: dict[str, Any] = {
        "detect": functools.partial(addresses.autodetect, netns=node_netns),
        "interfaces": functools.partial(addresses.list_interfaces, netns=node_netns),
    }
    result = startup(etcd_store, config(tmp_path, CALICO_IPV4POOL_VXLAN="Always"), **kernel)
    assert result.ipv4 == I4("192.0.2.31/24")  # first-found: eth0 (veth0 is excluded)
    assert result.mtu == 1350  # smallest matching up interface: eth1 1400, minus VXLAN's 50
    assert value(etcd_store, POOL_KEY)["spec"]["cidr"] == "192.168.0.0/16"

    result = startup(etcd_store, config(tmp_path, IP="198.51.100.31"), **kernel)
    assert value(etcd_store, NODE_KEY)["spec"]["bgp"]["ipv4Address"] == "198.51.100.31/25"

    result = startup(etcd_store, config(tmp_path, IP="autodetect", IP_AUTODETECTION_METHOD="can-reach=192.0.2.200"), **kernel)
    assert result.ipv4 == I4("192.0.2.31/24")

    # A second node autodetecting the same address is refused.
    with pytest.raises(StartupError, match='192.0.2.31 is already used by node "n1"'):
        startup(etcd_store, config(tmp_path, NODENAME="n2"), **kernel)
