"""kube-controllers' IPAM metrics in felixpy-controllers (felixpy/controllers/metrics.py), from datastore
updates and garbage-collector passes, checked through the strict exposition parser."""

from __future__ import annotations

from typing import Any

from felixpy.controllers.ipam_gc import IPAMGarbageCollector
from felixpy.controllers.metrics import ControllerMetrics
from felixpy.controllers.pods import WorkloadEndpointIndex
from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from tests.unit.test_health import parse_exposition, value
from tests.unit.test_ipam_gc import GRACE, Cluster, FakeClock

CONTROLLER_METRICS = {
    "ipam_allocations_in_use": "gauge",
    "ipam_allocations_borrowed": "gauge",
    "ipam_allocations_gc_candidates": "gauge",
    "ipam_allocations_gc_reclamations": "counter",
    "ipam_blocks": "gauge",
    "ipam_ippool_size": "gauge",
    "ipam_allocations_per_node": "gauge",
    "ipam_allocations_borrowed_per_node": "gauge",
    "ipam_blocks_per_node": "gauge",
    "felixpy_controller_passes_total": "counter",
    "felixpy_controller_pass_failures_total": "counter",
    "felixpy_controller_last_pass_timestamp_seconds": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_virtual_memory_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}


def _feed(metrics: ControllerMetrics, store: MemoryDatastore) -> None:
    """What the controllers' syncers deliver: every block, pool and node."""
    for prefix in (keys.BLOCKS, keys.resource_prefix("ippools"), keys.resource_prefix("nodes")):
        kvs, _ = store.list(prefix)
        for kv in kvs:
            metrics.on_update(kv.key, kv.value)


def test_names_types_and_zeroes_before_any_allocation() -> None:
    store = MemoryDatastore()
    cluster = Cluster(store)
    cluster.add_node("n1")
    metrics = ControllerMetrics()
    _feed(metrics, store)
    types, s = parse_exposition(metrics.render())
    assert types == CONTROLLER_METRICS
    assert value(s, "ipam_ippool_size", ippool="p1") == 65536
    # Every (pool, node) is there from the start, as in Calico; "no_ippool" too.
    assert value(s, "ipam_allocations_in_use", ippool="p1", node="n1") == 0
    assert value(s, "ipam_allocations_in_use", ippool="no_ippool", node="n1") == 0
    assert value(s, "ipam_allocations_gc_candidates", ippool="p1", node="n1") == 0


def test_allocations_blocks_and_borrowing_by_pool_and_node() -> None:
    store = MemoryDatastore()
    cluster = Cluster(store, block_size=30)  # 4 addresses per block: the fifth pod borrows or claims
    for node in ("n1", "n2"):
        cluster.add_node(node)
    for i in range(3):
        cluster.add_pod("default", f"a{i}", "n1")
    cluster.add_pod("default", "b0", "n2")
    cluster.tunnel("n2")
    # An allocation without a node attribute (a felixctl user) counts as unknown_node.
    cluster.ipam.auto_assign(num=1, handle="manual", attrs={}, node="n1")
    metrics = ControllerMetrics()
    _feed(metrics, store)
    _, s = parse_exposition(metrics.render())
    assert value(s, "ipam_allocations_in_use", ippool="p1", node="n1") == 3
    assert value(s, "ipam_allocations_in_use", ippool="p1", node="n2") == 2
    assert value(s, "ipam_allocations_in_use", ippool="p1", node="unknown_node") == 1
    blocks_n1 = value(s, "ipam_blocks", ippool="p1", node="n1")
    assert blocks_n1 == len(cluster.affinities("n1")) and value(s, "ipam_blocks_per_node", node="n1") == blocks_n1
    assert value(s, "ipam_allocations_per_node", node="n2") == 2
    assert sum(v for (name, _), v in s.items() if name == "ipam_allocations_borrowed") == 0


def test_borrowed_address_counts_for_the_borrowing_node() -> None:
    store = MemoryDatastore()
    cluster = Cluster(store)
    cluster.add_node("n1")
    cluster.add_node("n2")
    cluster.add_pod("default", "a", "n1")
    block_key = keys.block_key(cluster.blocks()[0])
    block: dict[str, Any] = store.get(block_key).value
    # n2 borrowed an address of n1's block (what IPAM does when n2 may not claim a block).
    from felixpy.ipam.block import Block

    parsed = Block.from_json(block)
    parsed.assign(1, "borrower", {"node": "n2", "namespace": "default", "pod": "b"})
    metrics = ControllerMetrics()
    _feed(metrics, store)
    metrics.on_update(block_key, parsed.to_json())
    _, s = parse_exposition(metrics.render())
    assert value(s, "ipam_allocations_borrowed", ippool="p1", node="n2") == 1
    assert value(s, "ipam_allocations_borrowed", ippool="p1", node="n1") == 0
    assert value(s, "ipam_allocations_borrowed_per_node", node="n2") == 1


def test_gc_candidates_and_reclamations_follow_the_collector() -> None:
    store = MemoryDatastore()
    cluster = Cluster(store)
    cluster.add_node("n1")
    gone = cluster.add_pod("default", "gone", "n1")[0]
    clock = FakeClock()
    gc = IPAMGarbageCollector(store, WorkloadEndpointIndex(store), grace_period=GRACE, clock=clock)
    metrics = ControllerMetrics()
    _feed(metrics, store)
    cluster.delete_endpoint("default", "gone", "n1")
    gc.reconcile()
    metrics.set_candidates(ip for ip, _ in gc.candidates())
    _, s = parse_exposition(metrics.render())
    assert value(s, "ipam_allocations_gc_candidates", ippool="p1", node="n1") == 1
    clock.advance(GRACE)
    result = gc.reconcile()
    assert result.released == (gone,) and result.released_nodes == ((gone, "n1"),)
    metrics.reclaimed(result.released_nodes)
    metrics.set_candidates(ip for ip, _ in gc.candidates())
    _feed(metrics, store)
    metrics.pass_done(True, 1700000000.0)
    _, s = parse_exposition(metrics.render())
    assert value(s, "ipam_allocations_gc_candidates", ippool="p1", node="n1") == 0
    assert value(s, "ipam_allocations_gc_reclamations", ippool="p1", node="n1") == 1
    assert value(s, "felixpy_controller_passes_total") == 1
    assert value(s, "felixpy_controller_last_pass_timestamp_seconds") == 1700000000.0


def test_block_outside_every_pool_is_no_ippool() -> None:
    store = MemoryDatastore()
    cluster = Cluster(store)
    cluster.add_node("n1")
    cluster.add_pod("default", "a", "n1")
    metrics = ControllerMetrics()
    _feed(metrics, store)
    metrics.on_update(keys.resource_key("ippools", "p1"), None)  # the pool was deleted
    _, s = parse_exposition(metrics.render())
    assert value(s, "ipam_allocations_in_use", ippool="no_ippool", node="n1") == 1
    assert value(s, "ipam_blocks", ippool="no_ippool", node="n1") == 1
    assert not [k for k in s if k[0] == "ipam_ippool_size"]


def test_the_deployment_probes_and_exposes_the_controllers_port() -> None:
    import pathlib

    import yaml

    from felixpy.controllers.main import DEFAULT_METRICS_PORT, load_config

    docs = yaml.safe_load_all((pathlib.Path(__file__).resolve().parents[2] / "deploy" / "felixpy.yaml").read_text())
    deployment = next(d for d in docs if d and d["kind"] == "Deployment"
                      and d["metadata"]["name"] == "felixpy-controllers")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    port = load_config(env).metrics_port
    assert port == DEFAULT_METRICS_PORT == 9094
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
