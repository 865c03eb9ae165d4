"""IPAM garbage collection and deleted-node cleanup (felixpy-controllers) on the in-memory datastore.

Time is a fake clock: a grace period of 15 minutes passes in one assignment. The `Cluster` helper
is shared with tests/integration/test_controllers.py, which runs the same stories against etcd.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import threading
import time
from typing import Callable

import pytest

from felixpy.controllers import main as controllers_main
from felixpy.controllers.ipam_gc import IPAMGarbageCollector, Verdict, classify, list_allocations
from felixpy.controllers.main import ControllerConfigError, Controllers, load_config, parse_duration
from felixpy.controllers.nodes import NodeCleanup
from felixpy.controllers.pods import ClusterView, WorkloadEndpointIndex
from felixpy.datastore import keys
from felixpy.datastore.api import Datastore, NotFound
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam.allocator import IPAM
from tests.fakes.clock import FakeClock

GRACE = 15 * 60.0


class Cluster:
    """Builds cluster state the way the agent and CNI plugin write it."""

    def __init__(self, store: Datastore, pool: str = "10.65.0.0/16", block_size: int = 26) -> None:
        self.store = store
        self.ipam = IPAM(store, cache_ttl=0, rng=random.Random(3))
        self._n = 0
        store.create(keys.resource_key("ippools", "p1"), {
            "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p1"},
            "spec": {"cidr": pool, "blockSize": block_size}})

    def add_node(self, name: str) -> None:
        self.store.create(keys.resource_key("nodes", name), {
            "apiVersion": "projectcalico.org/v3", "kind": "Node", "metadata": {"name": name}, "spec": {}})

    def delete_node(self, name: str) -> None:
        self.store.delete(keys.resource_key("nodes", name))

    def tunnel(self, node: str) -> str:
        ips = self.ipam.auto_assign(num=1, handle=f"ipip-tunnel-addr-{node}",
                                    attrs={"node": node, "type": "ipipTunnelAddress"}, node=node)
        return str(ips[0])

    def add_pod(self, namespace: str, pod: str, node: str, num: int = 1, *, endpoint_ips: int | None = None) -> list[str]:
        """Allocate like CNI ADD and write the WorkloadEndpoint listing the first endpoint_ips addresses."""
        self._n += 1
        handle = f"k8s-pod-network.{self._n:064x}"
        ips = [str(ip) for ip in self.ipam.auto_assign(
            num=num, handle=handle, attrs={"node": node, "namespace": namespace, "pod": pod}, node=node)]
        listed = ips if endpoint_ips is None else ips[:endpoint_ips]
        self.store.create(self.wep_key(namespace, pod, node), {
            "apiVersion": "projectcalico.org/v3", "kind": "WorkloadEndpoint",
            "metadata": {"name": f"{node}-k8s-{pod}-eth0", "namespace": namespace},
            "spec": {"node": node, "pod": pod, "orchestrator": "k8s", "endpoint": "eth0",
                     "ipNetworks": [f"{ip}/32" for ip in listed]}})
        return ips

    @staticmethod
    def wep_key(namespace: str, pod: str, node: str) -> str:
        return keys.resource_key("workloadendpoints", f"{node}-k8s-{pod}-eth0", namespace)

    def delete_endpoint(self, namespace: str, pod: str, node: str) -> None:
        """The pod went away and nobody ran CNI DEL (its node's agent was down): the address leaks."""
        self.store.delete(self.wep_key(namespace, pod, node))

    def allocated(self, ip: str) -> bool:
        return self.ipam.get_assignment(ip) is not None

    def handle_exists(self, handle: str) -> bool:
        try:
            self.store.get(keys.handle_key(handle))
            return True
        except NotFound:
            return False

    def affinities(self, node: str) -> list[str]:
        kvs, _ = self.store.list(keys.host_affinity_prefix(node))
        return sorted(keys.parse_key(kv.key).name for kv in kvs)

    def blocks(self) -> list[str]:
        kvs, _ = self.store.list(keys.block_prefix(4))
        return sorted(keys.parse_key(kv.key).name for kv in kvs)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster(MemoryDatastore())
    c.add_node("n1")
    c.add_node("n2")
    return c


def collector(cluster: Cluster, clock: FakeClock, grace: float = GRACE) -> IPAMGarbageCollector:
    return IPAMGarbageCollector(cluster.store, WorkloadEndpointIndex(cluster.store), grace_period=grace, clock=clock)


# -- leak collection ----------------------------------------------------------------------------
def test_pod_deleted_while_agent_down_is_released_after_grace_and_not_before(
        cluster: Cluster, clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="felixpy.controllers")
    gone = cluster.add_pod("default", "gone", "n1")[0]
    kept = cluster.add_pod("default", "kept", "n1")[0]
    gc = collector(cluster, clock)
    assert gc.reconcile().candidates == 0
    cluster.delete_endpoint("default", "gone", "n1")

    first = gc.reconcile()
    assert first.candidates == 1 and first.released == ()
    assert first.next_confirm_in == pytest.approx(GRACE)
    clock.advance(GRACE - 1)
    assert gc.reconcile().released == ()
    assert cluster.allocated(gone)
    clock.advance(1)
    result = gc.reconcile()
    assert result.released == (gone,)
    assert not cluster.allocated(gone) and cluster.allocated(kept)
    assert not cluster.handle_exists("k8s-pod-network." + f"{1:064x}")
    assert gc.reclamations == 1 and result.candidates == 0
    text = caplog.text
    assert f"Candidate IP leak handle=k8s-pod-network.{1:064x} ip={gone}" in text
    assert f"Confirmed IP leak after 15m handle=k8s-pod-network.{1:064x} ip={gone}" in text
    assert f"Garbage collecting leaked IP address ip={gone}" in text


def test_address_of_a_live_pod_is_never_released(cluster: Cluster, clock: FakeClock) -> None:
    ips = [cluster.add_pod("default", f"p{i}", "n1" if i % 2 else "n2")[0] for i in range(6)]
    tunnel = cluster.tunnel("n1")
    gc = collector(cluster, clock)
    for _ in range(5):
        result = gc.reconcile()
        assert result.candidates == 0 and result.released == ()
        clock.advance(10 * GRACE)
    assert all(cluster.allocated(ip) for ip in [*ips, tunnel])


def test_address_listed_by_another_live_endpoint_is_never_released(cluster: Cluster, clock: FakeClock) -> None:
    # IPAM says pod "a" owns it, but pod "b"'s endpoint uses it: releasing it would hand a used
    # address out again.
    ip = cluster.add_pod("default", "a", "n1")[0]
    cluster.delete_endpoint("default", "a", "n1")
    cluster.store.create(Cluster.wep_key("default", "b", "n1"), {
        "metadata": {"name": "n1-k8s-b-eth0", "namespace": "default"},
        "spec": {"node": "n1", "pod": "b", "ipNetworks": [f"{ip}/32"]}})
    gc = collector(cluster, clock)
    gc.reconcile()
    clock.advance(2 * GRACE)
    assert gc.reconcile().released == () and cluster.allocated(ip)


def test_multi_ip_handle_is_released_together_and_only_when_all_are_leaks(cluster: Cluster, clock: FakeClock) -> None:
    # The endpoint lists one of the pod's two addresses: the other is a candidate, but the handle
    # keeps both while any of them is in use.
    ips = cluster.add_pod("default", "multi", "n1", num=2, endpoint_ips=1)
    gc = collector(cluster, clock)
    assert gc.reconcile().candidates == 1
    clock.advance(2 * GRACE)
    assert gc.reconcile().released == ()
    assert all(cluster.allocated(ip) for ip in ips)

    cluster.delete_endpoint("default", "multi", "n1")
    gc.reconcile()
    clock.advance(GRACE - 10)
    assert gc.reconcile().released == ()  # the second address's grace period has not ended
    clock.advance(10)
    assert sorted(gc.reconcile().released) == sorted(ips)
    assert not any(cluster.allocated(ip) for ip in ips)


def test_candidate_that_comes_back_is_forgotten_and_its_clock_restarts(cluster: Cluster, clock: FakeClock) -> None:
    ip = cluster.add_pod("default", "flaky", "n1")[0]
    wep = cluster.store.get(Cluster.wep_key("default", "flaky", "n1"))
    gc = collector(cluster, clock)
    cluster.delete_endpoint("default", "flaky", "n1")
    gc.reconcile()
    clock.advance(GRACE - 60)
    cluster.store.create(wep.key, wep.value)  # e.g. a slow CNI ADD finally wrote it
    assert gc.reconcile().candidates == 0
    cluster.delete_endpoint("default", "flaky", "n1")
    clock.advance(120)
    assert gc.reconcile().released == ()  # a new candidate: 15 minutes from now
    clock.advance(GRACE)
    assert gc.reconcile().released == (ip,)


def test_revalidation_keeps_a_leak_whose_pod_reappeared_before_release(cluster: Cluster, clock: FakeClock) -> None:
    ip = cluster.add_pod("default", "late", "n1")[0]
    wep = cluster.store.get(Cluster.wep_key("default", "late", "n1"))
    cluster.delete_endpoint("default", "late", "n1")

    class RacingIndex(WorkloadEndpointIndex):
        """The endpoint is written back between the pass's first read and the release."""
        reads = 0

        def read(self) -> ClusterView:
            view = super().read()
            self.reads += 1
            if self.reads == 3:  # pass 1, pass 2, then pass 2's re-validation
                cluster.store.create(wep.key, wep.value)
                return super().read()
            return view

    index = RacingIndex(cluster.store)
    gc = IPAMGarbageCollector(cluster.store, index, grace_period=GRACE, clock=clock)
    gc.reconcile()  # read 1: candidate
    clock.advance(GRACE)
    result = gc.reconcile()  # confirmed on its first read, kept by its re-validation read
    assert result.confirmed == 1 and result.released == () and result.kept_on_revalidation == 1
    assert cluster.allocated(ip)


def test_allocation_without_pod_attributes_is_assumed_valid(cluster: Cluster, clock: FakeClock) -> None:
    ip = cluster.ipam.auto_assign(num=1, handle="manual-1", attrs={"note": "felixctl"}, node="n1")[0]
    gc = collector(cluster, clock)
    gc.reconcile()
    clock.advance(10 * GRACE)
    assert gc.reconcile().released == () and cluster.allocated(str(ip))


def test_grace_period_zero_disables_pod_leak_collection(cluster: Cluster, clock: FakeClock) -> None:
    ip = cluster.add_pod("default", "gone", "n1")[0]
    cluster.delete_endpoint("default", "gone", "n1")
    gc = collector(cluster, clock, grace=0)
    for _ in range(3):
        result = gc.reconcile()
        assert result.candidates == 0 and result.released == ()
        clock.advance(GRACE)
    assert cluster.allocated(ip)


def test_classify_tunnel_addresses_by_node_existence(cluster: Cluster) -> None:
    tunnel = cluster.tunnel("n2")
    view = WorkloadEndpointIndex(cluster.store).read()
    (alloc,) = [a for a in list_allocations(cluster.store) if a.ip == tunnel]
    assert classify(alloc, view)[0] is Verdict.VALID
    assert classify(alloc, ClusterView.build({"n1"}, []))[0] is Verdict.NODE_GONE


# -- deleted nodes --------------------------------------------------------------------------------
def test_deleted_node_addresses_affinities_and_blocks_are_cleaned_up(cluster: Cluster, clock: FakeClock) -> None:
    tunnel = cluster.tunnel("n2")
    n2_pods = [cluster.add_pod("default", f"on-n2-{i}", "n2")[0] for i in range(3)]
    n1_pod = cluster.add_pod("default", "on-n1", "n1")[0]
    n2_blocks = cluster.affinities("n2")
    assert n2_blocks
    gc = collector(cluster, clock)
    cleanup = NodeCleanup(cluster.store, clock=clock)
    gc.reconcile()
    cleanup.reconcile()
    assert cluster.affinities("n2") == n2_blocks

    cluster.delete_node("n2")  # its endpoints stay behind in etcd mode
    result = gc.reconcile()  # no grace period: the node is gone
    assert sorted(result.released) == sorted([tunnel, *n2_pods])
    node_pass = cleanup.reconcile()
    assert node_pass.deleted_nodes == ("n2",)
    assert cluster.affinities("n2") == []
    assert not set(n2_blocks) & set(cluster.blocks())
    assert cluster.allocated(n1_pod) and cluster.affinities("n1")
    assert not cluster.handle_exists("ipip-tunnel-addr-n2")
    assert cleanup.reconcile().deleted_nodes == ()


def test_deleted_node_block_with_a_live_address_stays_without_owner(cluster: Cluster, clock: FakeClock) -> None:
    # An address of the deleted node that a live endpoint elsewhere still uses (e.g. a borrowed
    # address) keeps its block; only the affinity goes.
    ip = cluster.add_pod("default", "moved", "n2")[0]
    (block,) = cluster.affinities("n2")
    cluster.delete_endpoint("default", "moved", "n2")
    cluster.store.create(Cluster.wep_key("default", "moved", "n1"), {
        "metadata": {"name": "n1-k8s-moved-eth0", "namespace": "default"},
        "spec": {"node": "n1", "pod": "moved", "ipNetworks": [f"{ip}/32"]}})
    cluster.delete_node("n2")
    assert collector(cluster, clock).reconcile().released == ()
    NodeCleanup(cluster.store, clock=clock).reconcile()
    assert cluster.affinities("n2") == [] and block in cluster.blocks() and cluster.allocated(ip)


def test_recreated_node_is_not_cleaned_up(cluster: Cluster, clock: FakeClock) -> None:
    cluster.add_pod("default", "p", "n2")

    cleanup = NodeCleanup(cluster.store, clock=clock)
    cluster.delete_node("n2")
    original = cleanup._node_exists  # the Node comes back between the listing and the release

    def recreated(node: str) -> bool:
        cluster.add_node(node)
        return original(node)

    cleanup._node_exists = recreated  # type: ignore[method-assign]
    assert cleanup.reconcile().deleted_nodes == ()
    assert cluster.affinities("n2")


def test_empty_blocks_are_released_after_two_observations_but_never_the_last(clock: FakeClock) -> None:
    cluster = Cluster(MemoryDatastore(), pool="10.66.0.0/24", block_size=30)  # 4 addresses per block
    cluster.add_node("n1")
    pods = [cluster.add_pod("default", f"p{i}", "n1") for i in range(6)]
    blocks = cluster.affinities("n1")
    assert len(blocks) == 2
    for i in range(6):
        cluster.ipam.release_by_handle(f"k8s-pod-network.{i + 1:064x}")
        cluster.delete_endpoint("default", f"p{i}", "n1")
    assert pods
    cleanup = NodeCleanup(cluster.store, empty_block_age=300, clock=clock)
    assert cleanup.reconcile().released_blocks == ()  # first observation
    clock.advance(299)
    assert cleanup.reconcile().released_blocks == ()  # not empty long enough
    clock.advance(1)
    assert len(cleanup.reconcile().released_blocks) == 1
    assert len(cluster.affinities("n1")) == 1 and len(cluster.blocks()) == 1
    clock.advance(3600)
    cleanup.reconcile()
    assert len(cluster.affinities("n1")) == 1  # the node's last block stays


def test_empty_unowned_block_is_deleted(cluster: Cluster, clock: FakeClock) -> None:
    ip = cluster.add_pod("default", "p", "n2")[0]
    (block,) = cluster.affinities("n2")
    cluster.ipam.release_affinity("n2", block, must_be_empty=False)  # unowned, still holds ip
    cluster.ipam.release_ips([ip])
    cleanup = NodeCleanup(cluster.store, empty_block_age=60, clock=clock)
    cleanup.reconcile()
    clock.advance(60)
    assert cleanup.reconcile().released_blocks == (block,)
    assert block not in cluster.blocks()


# -- the loop and its configuration ---------------------------------------------------------------
def wait_for(what: str, cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_loop_releases_after_grace_and_reacts_to_node_deletion(cluster: Cluster) -> None:
    ip = cluster.add_pod("default", "gone", "n1")[0]
    n2_ip = cluster.add_pod("default", "on-n2", "n2")[0]
    ctl = Controllers(cluster.store, grace_period=0.5, reconcile_period=60.0, min_pass_interval=0.05)
    thread = threading.Thread(target=ctl.run, daemon=True)
    thread.start()
    try:
        wait_for("first pass", lambda: ctl.passes >= 1)
        cluster.delete_endpoint("default", "gone", "n1")  # a deletion wakes the loop
        started = time.monotonic()
        wait_for("leak released", lambda: not cluster.allocated(ip))
        assert time.monotonic() - started >= 0.45  # not before the grace period
        cluster.delete_node("n2")
        wait_for("deleted node cleaned", lambda: not cluster.affinities("n2") and not cluster.allocated(n2_ip))
    finally:
        ctl.stop()
        thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.mark.parametrize("text,seconds", [
    ("15m", 900.0), ("90s", 90.0), ("1h30m", 5400.0), ("0", 0.0), ("2.5", 2.5), ("1m0.5s", 60.5)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration("X", text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5", "15 minutes", "1d", "nan"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ControllerConfigError, match=r'^X=".*": expected a duration'):
        parse_duration("X", text)


def test_load_config_defaults_and_errors() -> None:
    config = load_config({})
    assert (config.grace_period, config.reconcile_period, config.log_level) == (900.0, 300.0, "INFO")
    assert load_config({"FELIXPY_IPAM_GC_GRACE_PERIOD": "0"}).grace_period == 0
    with pytest.raises(ControllerConfigError, match="FELIXPY_CONTROLLER_RECONCILE_PERIOD"):
        load_config({"FELIXPY_CONTROLLER_RECONCILE_PERIOD": "0"})
    with pytest.raises(ControllerConfigError, match="LOG_LEVEL"):
        load_config({"LOG_LEVEL": "loud"})


def test_main_reports_bad_configuration_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FELIXPY_IPAM_GC_GRACE_PERIOD", "soon")
    assert controllers_main.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith('felixpy-controllers: FELIXPY_IPAM_GC_GRACE_PERIOD="soon"')


def test_main_reports_missing_datastore_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DATASTORE_TYPE", "etcdv3")
    monkeypatch.delenv("ETCD_ENDPOINTS", raising=False)
    monkeypatch.delenv("CALICO_ETCD_ENDPOINTS", raising=False)
    assert controllers_main.main([]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ETCD_ENDPOINTS" in err


def test_ipaddress_helper_sanity() -> None:
    # The Cluster helper hands out addresses from its pool.
    c = Cluster(MemoryDatastore())
    c.add_node("n1")
    assert ipaddress.IPv4Address(c.add_pod("ns", "p", "n1")[0]) in ipaddress.IPv4Network("10.65.0.0/16")


def _drop_handle(cluster: Cluster, ip: str, handle: str) -> None:
    """Make the allocation of ip handle-less, as allocations of other IPAM consumers can be."""
    from felixpy.ipam.block import Block

    cidr = cluster.ipam.get_assignment(ip).block_cidr  # type: ignore[union-attr]
    kv = cluster.store.get(keys.block_key(cidr))
    block = Block.from_json(kv.value)
    for attr in block.attributes:
        if attr.get("handle_id") == handle:
            attr["handle_id"] = None
    cluster.store.update(kv.key, block.to_json(), kv.revision)
    cluster.store.delete(keys.handle_key(handle))


def test_handle_less_leak_is_released_by_sequence_number_never_a_newer_allocation(
        cluster: Cluster, clock: FakeClock) -> None:
    ip = cluster.add_pod("default", "old", "n1")[0]
    _drop_handle(cluster, ip, cluster.ipam.get_assignment(ip).handle)  # type: ignore[arg-type,union-attr]
    cluster.delete_endpoint("default", "old", "n1")
    gc = collector(cluster, clock)
    gc.reconcile()
    clock.advance(GRACE)
    still_leaked = gc._still_leaked

    def reassigned_after_revalidation(handle: str | None, allocs: list, view: ClusterView) -> bool:
        ok = still_leaked(handle, allocs, view)
        # Released and handed to a new pod (handle-less again) after the last check: the release
        # that follows names the old allocation's sequence number and must leave this one alone.
        cluster.ipam.release_ips([ip])
        cluster.ipam.assign_ip(ip, handle="new", attrs={"namespace": "default", "pod": "new", "node": "n1"}, node="n1")
        _drop_handle(cluster, ip, "new")
        return ok

    gc._still_leaked = reassigned_after_revalidation  # type: ignore[method-assign]
    result = gc.reconcile()
    assert result.confirmed == 1 and result.released == ()
    assert cluster.ipam.get_assignment(ip).attrs["pod"] == "new"  # type: ignore[union-attr]
