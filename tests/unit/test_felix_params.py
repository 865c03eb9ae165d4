"""Felix parameters from FelixConfiguration, their effects, and the migration lock, without root:
the refresh timers, chainInsertMode, natOutgoingAddress / natPortRange, vxlanVNI / vxlanPort, the
agent's config watch (restart on a change), the datastore lock in startup, the CNI server, IPAM
and felixpy-controllers, and IP_AUTODETECTION_METHOD=kubernetes-internal-ip on the fake API
server. The same parameters on a real agent and kernel: tests/integration/test_felix_configuration.py.
"""

from __future__ import annotations

import ipaddress
import pathlib
import re
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

import pytest

from felixpy import names
from felixpy.calc.dispatcher import Dispatcher
from felixpy.config import felix_config, load_config
from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.datastore.syncer import KVUpdate
from felixpy.dataplane.drivers.iptables import Chain, Rule, Table
from felixpy.dataplane.drivers.ipsets import IPSets
from felixpy.dataplane.drivers.links import TunnelLinks
from felixpy.dataplane.managers.masq import NatSettings, nat_chains
from felixpy.dataplane.managers.tunnels import TunnelManager
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.lock import ClusterLock, DatastoreLockedError
from felixpy.kernel.addresses import AutodetectError, Interface
from felixpy.kernel.commands import CompletedRun
from felixpy.messages import EncapState, NatState
from felixpy.node.agent import Agent
from felixpy.node.config_watch import ConfigWatch
from felixpy.node.startup import StartupError, kubernetes_internal_ip, startup
from tests.support.polling import wait_for
from tests.fakes.dataplane import FakeDataplane
from tests.fakes.iptables import FakeIptables
from tests.fakes.netlink import FakeTunnelKernel
from tests.support.fake_kube_api import FakeKubeAPI

ETCD = {"ETCD_ENDPOINTS": "http://127.0.0.1:2379"}
FELIX_KEY = keys.resource_key("felixconfigurations", "default")
HOST_KEY = keys.resource_key("felixconfigurations", "node.n1")
INFO_KEY = keys.resource_key("clusterinformations", "default")




def felix_resource(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "FelixConfiguration", "metadata": {"name": name},
            "spec": spec}


# -- refresh intervals ----------------------------------------------------------------------------------


class Counting:
    """A command runner that counts the read-backs (iptables-save, ipset save) it passes on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0

    def __call__(self, argv: Sequence[str], *, input: str | bytes | None = None, timeout: float = 30) -> CompletedRun:
        if argv[0].endswith("-save") or list(argv[:2]) == ["ipset", "save"]:
            self.reads += 1
        return self.inner(argv, input=input, timeout=timeout)  # type: ignore[no-any-return]


def test_refresh_intervals_from_felix_configuration_drive_the_resyncs() -> None:
    felix = felix_config({}, {"routeRefreshInterval": "200ms", "iptablesRefreshInterval": "1h",
                              "ipsetsRefreshInterval": "200ms"})
    assert (felix.route_refresh_interval, felix.iptables_refresh_interval, felix.ipsets_refresh_interval) == \
        (0.2, 3600.0, 0.2)
    store = MemoryDatastore()
    store.create(keys.resource_key("nodes", "n1"), {"spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}}})
    store.create(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16", "natOutgoing": True}})
    dp = FakeDataplane()
    iptables, ipset = Counting(dp.iptables), Counting(dp.ipset)
    nat = Table("nat", backend="nft", runner=iptables)
    filter_ = Table("filter", backend="nft", runner=iptables)
    agent = Agent(store=store, node_name="n1", networking_backend="vxlan",
                  route_refresh_interval=felix.route_refresh_interval,
                  iptables_refresh_interval=felix.iptables_refresh_interval,
                  ipsets_refresh_interval=felix.ipsets_refresh_interval,
                  route_table=dp.routes, nat_table=nat, filter_table=filter_, ipsets=IPSets(runner=ipset))
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: ipset.reads >= 4 and sum(1 for c in dp.netlink.calls if c[0] == "list_routes") >= 4)
        assert iptables.reads == 2  # the first apply's read-back of nat and filter, then not for an hour
    finally:
        agent.stop()
        thread.join(5)


# -- chainInsertMode -----------------------------------------------------------------------------------


def hashed_rules(fake: FakeIptables, table: str, chain: str) -> list[str]:
    """The chain's rules without our hash comments."""
    return [re.sub(r'-m comment --comment "?cali:[^ "]+"? ?', "", r).strip() for r in fake.chain(table, chain)]


def test_chain_insert_mode_append_puts_our_jumps_after_everyone_elses() -> None:
    assert felix_config({}, {"chainInsertMode": "Append"}).chain_insert_mode == "append"
    fake = FakeIptables()
    fake.tables["filter"]["FORWARD"] = ["-j KUBE-FORWARD", "-s 198.51.100.0/24 -j ACCEPT"]
    fake.tables["filter"]["KUBE-FORWARD"] = []
    table = Table("filter", backend="nft", runner=fake, insert_mode="append")
    table.update_chain(Chain("cali-FORWARD", ()))
    table.set_jump_rules("FORWARD", [Rule(match="", action="-j cali-FORWARD")])
    table.apply()
    assert hashed_rules(fake, "filter", "FORWARD") == ["-j KUBE-FORWARD", "-s 198.51.100.0/24 -j ACCEPT",
                                                       "-j cali-FORWARD"]
    # Someone appends after us: the resync moves ours back to the end, theirs kept in order.
    fake.tables["filter"]["FORWARD"].append("-j DROP")
    table.queue_resync()
    text = table.apply()
    assert text.count("-D FORWARD") == 1 and text.count("-A FORWARD") == 1
    assert hashed_rules(fake, "filter", "FORWARD") == ["-j KUBE-FORWARD", "-s 198.51.100.0/24 -j ACCEPT",
                                                       "-j DROP", "-j cali-FORWARD"]
    # A restarted agent in insert mode (the default) moves them to the top.
    insert = Table("filter", backend="nft", runner=fake)
    insert.update_chain(Chain("cali-FORWARD", ()))
    insert.set_jump_rules("FORWARD", [Rule(match="", action="-j cali-FORWARD")])
    insert.apply()
    assert hashed_rules(fake, "filter", "FORWARD")[0] == "-j cali-FORWARD"
    assert hashed_rules(fake, "filter", "FORWARD").count("-j cali-FORWARD") == 1
    with pytest.raises(ValueError, match="chain insert mode"):
        Table("filter", insert_mode="sideways")  # type: ignore[arg-type]


# -- natOutgoingAddress / natPortRange -----------------------------------------------------------------


def test_nat_outgoing_address_and_port_range_render_as_felix_does() -> None:
    felix = felix_config({}, {"natOutgoingAddress": "192.0.2.99", "natPortRange": "32768:33000"})
    assert (felix.nat_outgoing_address, felix.nat_port_range) == ("192.0.2.99", (32768, 33000))
    state = NatState(masq_pools=frozenset({"10.244.0.0/16"}), all_pools=frozenset({"10.244.0.0/16"}))

    def rules(settings: NatSettings) -> list[tuple[str, str]]:
        (_, outgoing) = nat_chains(state, settings)
        return [(r.match.split("dst")[-1].strip(), r.action) for r in outgoing.rules]

    assert rules(NatSettings()) == [("", "-j MASQUERADE --random-fully")]
    assert rules(NatSettings("192.0.2.99")) == [("", "-j SNAT --to-source 192.0.2.99 --random-fully")]
    assert rules(NatSettings(None, (32768, 33000))) == [
        ("-p tcp", "-j MASQUERADE --to-ports 32768-33000 --random-fully"), ("-p tcp", "-j RETURN"),
        ("-p udp", "-j MASQUERADE --to-ports 32768-33000 --random-fully"), ("-p udp", "-j RETURN"),
        ("", "-j MASQUERADE --random-fully")]
    assert rules(NatSettings("192.0.2.99", (32768, 33000))) == [
        ("-p tcp", "-j SNAT --to-source 192.0.2.99:32768-33000 --random-fully"), ("-p tcp", "-j RETURN"),
        ("-p udp", "-j SNAT --to-source 192.0.2.99:32768-33000 --random-fully"), ("-p udp", "-j RETURN"),
        ("", "-j SNAT --to-source 192.0.2.99 --random-fully")]
    # No natOutgoing pool: no rule at all, whatever the settings.
    assert nat_chains(NatState(frozenset(), frozenset({"10.244.0.0/16"})), NatSettings("192.0.2.99"))[1].rules == ()


# -- vxlanVNI / vxlanPort ------------------------------------------------------------------------------


def test_vxlan_vni_and_port_reach_the_device() -> None:
    felix = felix_config({}, {"vxlanVNI": 4097, "vxlanPort": 4790, "vxlanMTU": 1370})
    kernel = FakeTunnelKernel()
    links = TunnelLinks(netlink=kernel)
    mgr = TunnelManager(links, vxlan_mtu=felix.vxlan_mtu, vxlan_vni=felix.vxlan_vni, vxlan_port=felix.vxlan_port)
    mgr.on_update(EncapState(local_ip="192.0.2.11", vxlan=True, vxlan_address="10.244.1.0",
                             vxlan_mac="66:00:00:00:00:01"))
    mgr.complete_deferred_work()
    assert not links.apply().failed
    dev = kernel.links[names.VXLAN_DEVICE]
    assert (dev.vxlan_id, dev.vxlan_port, dev.mtu) == (4097, 4790, 1370)
    # The defaults are Calico's: VNI 4096, UDP 4789.
    default = felix_config({})
    assert (default.vxlan_vni, default.vxlan_port) == (4096, 4789)


# -- the config watch -----------------------------------------------------------------------------------


def watch_on(env: Mapping[str, str], global_spec: dict[str, Any] | None, host_spec: dict[str, Any] | None
             ) -> tuple[ConfigWatch, Dispatcher, list[Any]]:
    restarts: list[Any] = []
    watch = ConfigWatch(node_name="n1", env=env, running=felix_config(env, global_spec, host_spec),
                        felix_global=global_spec, felix_host=host_spec, on_restart=restarts.append)
    dispatcher = Dispatcher()
    watch.register_with(dispatcher)
    return watch, dispatcher, restarts


def test_config_watch_restarts_on_a_changed_parameter_only() -> None:
    env = {"FELIX_IPTABLESREFRESHINTERVAL": "30"}
    watch, dispatcher, restarts = watch_on(env, {"logSeverityScreen": "Info"}, {"routeRefreshInterval": "10s"})
    # The same values again (the syncer's first listing): nothing to do.
    dispatcher.on_update(KVUpdate(FELIX_KEY, felix_resource("default", logSeverityScreen="Info"), 5))
    dispatcher.on_update(KVUpdate(HOST_KEY, felix_resource("node.n1", routeRefreshInterval="10s"), 6))
    # Another node's, a name Felix does not read, and a change the environment overrides: no restart.
    dispatcher.on_update(KVUpdate(keys.resource_key("felixconfigurations", "node.n2"),
                                  felix_resource("node.n2", chainInsertMode="Append"), 7))
    dispatcher.on_update(KVUpdate(keys.resource_key("felixconfigurations", "other"),
                                  felix_resource("other", chainInsertMode="Append"), 8))
    dispatcher.on_update(KVUpdate(FELIX_KEY, felix_resource("default", logSeverityScreen="Info",
                                                            iptablesRefreshInterval="5s"), 9))
    # A per-host value spelt differently but equal ("10000ms" is 10 s): no restart either.
    dispatcher.on_update(KVUpdate(HOST_KEY, felix_resource("node.n1", routeRefreshInterval="10000ms"), 10))
    assert restarts == [] and not watch.restart_requested
    # A real change, in default: one restart, naming the parameter and both values.
    dispatcher.on_update(KVUpdate(FELIX_KEY, felix_resource("default", logSeverityScreen="Debug",
                                                            iptablesRefreshInterval="5s"), 11))
    assert watch.restart_requested and len(restarts) == 1
    ((param, old, new),) = restarts[0]
    assert (param.field, old, new) == ("logSeverityScreen", "INFO", "DEBUG")
    # Deleting node.<name> falls back to default's values.
    watch, dispatcher, restarts = watch_on({}, {"routeRefreshInterval": "30s"}, {"routeRefreshInterval": "10s"})
    dispatcher.on_update(KVUpdate(HOST_KEY, None, 12))
    assert [(p.field, old, new) for p, old, new in restarts[0]] == [("routeRefreshInterval", 10.0, 30.0)]


def test_config_watch_follows_the_migration_lock() -> None:
    watch, dispatcher, restarts = watch_on({}, None, None)
    assert watch.datastore_ready
    info = {"apiVersion": "projectcalico.org/v3", "kind": "ClusterInformation", "metadata": {"name": "default"},
            "spec": {"clusterGUID": "g", "datastoreReady": False}}
    dispatcher.on_update(KVUpdate(INFO_KEY, info, 3))
    assert not watch.datastore_ready and restarts == []  # felixpy-node keeps running (and serving CNI)
    dispatcher.on_update(KVUpdate(INFO_KEY, {**info, "spec": {"datastoreReady": True}}, 4))
    assert watch.datastore_ready
    dispatcher.on_update(KVUpdate(INFO_KEY, None, 5))
    assert watch.datastore_ready  # no ClusterInformation: nothing holds a lock


# -- the lock in startup, CNI, IPAM and the controllers ---------------------------------------------------


def lock(store: MemoryDatastore, ready: bool) -> None:
    value = {"apiVersion": "projectcalico.org/v3", "kind": "ClusterInformation", "metadata": {"name": "default"},
             "spec": {"clusterGUID": "g", "datastoreReady": ready}}
    try:
        kv = store.get(INFO_KEY)
        store.update(INFO_KEY, value, kv.revision)
    except Exception:
        store.create(INFO_KEY, value)


def config(tmp_path: pathlib.Path, **env: str) -> Any:
    return load_config({**ETCD, "NODENAME": "n1", "IP": "192.0.2.11/24", "CALICO_IPV4POOL_CIDR": "10.244.0.0/16",
                        "FELIXPY_STATE_DIR": str(tmp_path), **env})


IFACES = [Interface("eth0", 2, True, 1500, (ipaddress.ip_interface("192.0.2.11/24"),))]


def run_startup(store: MemoryDatastore, cfg: Any, **kw: Any) -> Any:
    return startup(store, cfg, detect=lambda m, v: IFACES[0].addresses[0], interfaces=lambda: IFACES,
                   os_hostname=lambda: "n1", **kw)


def test_startup_waits_while_the_datastore_is_locked(tmp_path: pathlib.Path) -> None:
    store = MemoryDatastore()
    lock(store, False)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            lock(store, True)  # `felixctl datastore migrate unlock`

    result = run_startup(store, config(tmp_path), sleep=sleep)
    assert result.node_name == "n1" and len(sleeps) == 3
    lock(store, False)
    with pytest.raises(StartupError, match="still locked for migration after 0.05s"):
        run_startup(store, config(tmp_path), lock_timeout=0.05, sleep=lambda s: time.sleep(0.01))


def test_startup_merges_felix_configuration_before_using_it(tmp_path: pathlib.Path) -> None:
    store = MemoryDatastore()
    store.create(keys.resource_key("ippools", "p"), {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                                                     "metadata": {"name": "p"},
                                                     "spec": {"cidr": "10.244.0.0/16", "vxlanMode": "Always"}})
    store.create(FELIX_KEY, felix_resource("default", vxlanMTU=1400, logSeverityScreen="Debug"))
    store.create(HOST_KEY, felix_resource("node.n1", vxlanMTU=1370))
    result = run_startup(store, config(tmp_path, FELIX_LOGSEVERITYSCREEN="warning"))
    felix = result.config.felix
    assert (felix.vxlan_mtu, felix.log_severity_screen) == (1370, "WARNING")  # node.n1 > default; env > both
    assert (felix.sources["vxlan_mtu"], felix.sources["log_severity_screen"]) == \
        ("datastore (per-host)", "environment variable")
    assert (tmp_path / "mtu").read_text() == "1370"  # the pod MTU the CNI plugin reads
    assert result.felix_host == {"vxlanMTU": 1370}

    # mtuIfacePattern picks the interfaces whose MTU is the host's; ipipMTU sets an IPIP pool's.
    ifaces = [*IFACES, Interface("ens5", 3, True, 9000, ())]
    for pool_spec, felix_spec, mtu in (({"vxlanMode": "Always"}, {"mtuIfacePattern": "^ens"}, 8950),
                                       ({"ipipMode": "Always"}, {"ipipMTU": 1380}, 1380)):
        store = MemoryDatastore()
        store.create(keys.resource_key("ippools", "p"), {"apiVersion": "projectcalico.org/v3", "kind": "IPPool",
                                                         "metadata": {"name": "p"},
                                                         "spec": {"cidr": "10.244.0.0/16", **pool_spec}})
        store.create(FELIX_KEY, felix_resource("default", **felix_spec))
        startup(store, config(tmp_path), detect=lambda m, v: IFACES[0].addresses[0], interfaces=lambda: ifaces,
                os_hostname=lambda: "n1")
        assert (tmp_path / "mtu").read_text() == str(mtu), felix_spec


def test_cni_refuses_add_and_del_while_locked_and_ipam_writes_stop() -> None:
    from felixpy.cni.server import CNIHandler, NOT_READY

    store = MemoryDatastore()
    store.create(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})
    ready = [False]
    handler = CNIHandler(store=store, node_name="n1", mtu=1450, node_labels=dict,
                         wait_programmed=lambda *a: True, ready=lambda: (True, ""),
                         datastore_ready=lambda: ready[0])
    request = {"env": {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/proc/1/ns/net",
                       "CNI_IFNAME": "eth0", "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"},
               "config": {"cniVersion": "1.0.0", "name": "k8s-pod-network"}}
    before = store.revision
    for command in ("ADD", "DEL"):
        reply = handler.handle({**request, "env": {**request["env"], "CNI_COMMAND": command}})
        assert reply["error"]["code"] == 11 and reply["error"]["msg"] == NOT_READY
        assert "datastoreReady=false" in reply["error"]["details"]
    assert handler.handle({**request, "env": {**request["env"], "CNI_COMMAND": "STATUS"}})["error"]["code"] == 50
    # Below the CNI checks: IPAM's own write boundary refuses as well, and nothing was written.
    with pytest.raises(DatastoreLockedError, match="IPAM changes are refused"):
        handler.ipam.auto_assign(num=1, handle="h", attrs={}, node="n1")
    assert store.revision == before
    ready[0] = True
    assert handler.ipam.auto_assign(num=1, handle="h", attrs={}, node="n1")


def test_ipam_cluster_lock_reads_cluster_information() -> None:
    store = MemoryDatastore()
    store.create(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})
    clock = [0.0]
    guard = ClusterLock(store, ttl=1.0, clock=lambda: clock[0])
    ipam = IPAM(store, cache_ttl=0, write_guard=guard.check)
    assert ipam.auto_assign(num=1, handle="a", attrs={}, node="n1")  # no ClusterInformation: not locked
    lock(store, False)
    assert ipam.auto_assign(num=1, handle="b", attrs={}, node="n1")  # within the ttl: the last answer
    clock[0] = 1.5
    with pytest.raises(DatastoreLockedError):
        ipam.release_by_handle("a")
    assert ipam.ips_by_handle("a")  # reads pass; the release did not happen
    lock(store, True)
    clock[0] = 3.0
    assert ipam.release_by_handle("a")


def test_controllers_skip_their_ipam_pass_while_locked() -> None:
    from felixpy.controllers.main import Controllers

    store = MemoryDatastore()
    controllers = Controllers(store, grace_period=0)
    lock(store, False)
    assert controllers.run_once() is False and controllers.passes == 0
    lock(store, True)
    assert controllers.run_once() is True and controllers.passes == 1


# -- IP_AUTODETECTION_METHOD=kubernetes-internal-ip ------------------------------------------------------


@pytest.fixture
def kube_api() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI().start()
    try:
        yield api
    finally:
        api.stop()


def test_kubernetes_internal_ip_from_the_api(kube_api: FakeKubeAPI, tmp_path: pathlib.Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kube_api.kubeconfig())
    kube_api.put("/api/v1/nodes", {"metadata": {"name": "n1"}, "status": {"addresses": [
        {"type": "Hostname", "address": "n1"}, {"type": "ExternalIP", "address": "203.0.113.5"},
        {"type": "InternalIP", "address": "fd00::11"}, {"type": "InternalIP", "address": "192.0.2.11"}]}})
    store = MemoryDatastore()
    cfg = config(tmp_path, IP="autodetect", IP_AUTODETECTION_METHOD="kubernetes-internal-ip",
                 KUBECONFIG=str(kubeconfig))
    result = startup(store, cfg, interfaces=lambda: IFACES, os_hostname=lambda: "n1",
                     detect=lambda m, v: pytest.fail("kubernetes-internal-ip reads the API, not the interfaces"))
    # The Node's InternalIP with the prefix of the local interface carrying it.
    assert str(result.ipv4) == "192.0.2.11/24"
    assert store.get(keys.resource_key("nodes", "n1")).value["spec"]["bgp"]["ipv4Address"] == "192.0.2.11/24"


def test_kubernetes_internal_ip_failures_are_one_line(kube_api: FakeKubeAPI, tmp_path: pathlib.Path) -> None:
    def node(addresses: list[dict[str, str]]) -> Callable[[str], Mapping[str, Any]]:
        return lambda name: {"metadata": {"name": name}, "status": {"addresses": addresses}}

    with pytest.raises(AutodetectError, match="has no IPv4 InternalIP"):
        kubernetes_internal_ip("n1", 4, node([{"type": "ExternalIP", "address": "192.0.2.11"}]), IFACES)
    with pytest.raises(AutodetectError, match="InternalIP 192.0.2.99 of the Kubernetes Node n1 is not on any"):
        kubernetes_internal_ip("n1", 4, node([{"type": "InternalIP", "address": "192.0.2.99"}]), IFACES)

    def missing(name: str) -> Mapping[str, Any]:
        raise RuntimeError(f"nodes \"{name}\" not found\nmore detail")

    with pytest.raises(AutodetectError, match=r'^kubernetes-internal-ip: cannot read the Kubernetes Node n1: nodes "n1" not found$'):
        kubernetes_internal_ip("n1", 4, missing, IFACES)
    # Through startup, with no Kubernetes API configured at all: one line, naming what to set.
    store = MemoryDatastore()
    cfg = config(tmp_path, IP="autodetect", IP_AUTODETECTION_METHOD="kubernetes-internal-ip", HOME=str(tmp_path))
    with pytest.raises(StartupError, match="needs the Kubernetes API: set KUBECONFIG") as info:
        startup(store, cfg, interfaces=lambda: IFACES, os_hostname=lambda: "n1")
    assert "\n" not in str(info.value)
    # An API that is there but has no such Node.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kube_api.kubeconfig())
    cfg = config(tmp_path, IP="autodetect", IP_AUTODETECTION_METHOD="kubernetes-internal-ip",
                 KUBECONFIG=str(kubeconfig))
    with pytest.raises(StartupError, match="cannot read the Kubernetes Node n1") as info:
        startup(store, cfg, interfaces=lambda: IFACES, os_hostname=lambda: "n1")
    assert "\n" not in str(info.value)
