"""Health checks (felixpy/node/health.py) and the metrics exposition (felixpy/node/metrics.py), without sockets.

The exposition is checked by a strict parser of the Prometheus text format 0.0.4 below, not by
comparing strings: every line must parse, every sample must belong to a declared family, and
histogram buckets must be cumulative with +Inf equal to _count. HTTP round trips are in
tests/integration/test_health_metrics.py.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest

from felixpy.calc.dispatcher import Dispatcher
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.datastore.memory import MemoryDatastore
from felixpy.ipam.block import Block
from felixpy.node.health import DatastoreProbe, HealthServer, add_agent_checks, heartbeat_check
from felixpy.node.metrics import (BGP_STATES, Counter, DatastoreStats, Gauge, Histogram, Metrics, Registry,
                                  Summary)
from tests.fakes.clock import FakeClock


@dataclass
class FakeStatus:
    in_sync: bool = False
    last_apply_ok: bool = False
    last_apply_error: str = ""
    last_tick: float = 0.0


# -- health ---------------------------------------------------------------------------------------
def test_starting_agent_is_live_but_not_ready() -> None:
    server = HealthServer("127.0.0.1", 0)
    live, ready = server.liveness(), server.readiness()
    assert (live.status, live.body) == (200, "live (starting)\n")
    assert (ready.status, ready.body) == (503, "not ready: starting\n")


def test_readiness_needs_sync_and_a_good_apply() -> None:
    server = HealthServer("127.0.0.1", 0)
    status = FakeStatus()
    assert add_agent_checks(server, status) is None  # no store: no probe
    ready = server.readiness()
    assert ready.status == 503
    assert ready.body == "not ready: datastore-sync: not in sync with the datastore; dataplane: not applied yet\n"
    status.in_sync = True
    status.last_apply_error = "iptables-restore failed (exit 4)"
    assert server.readiness().body == "not ready: dataplane: last apply failed: iptables-restore failed (exit 4)\n"
    status.last_apply_ok, status.last_apply_error = True, ""
    assert (server.readiness().status, server.readiness().body) == (200, "ready\n")
    status.in_sync = False  # e.g. the syncer is relisting after an outage
    assert server.readiness().status == 503


def test_bgp_is_one_more_readiness_check() -> None:
    server = HealthServer("127.0.0.1", 0)
    server.add_readiness("bgp", lambda: (False, "BGP not established with 192.0.2.2"))
    assert server.readiness().body == "not ready: bgp: BGP not established with 192.0.2.2\n"


def test_liveness_follows_the_heartbeat() -> None:
    clock = FakeClock()
    status = FakeStatus(last_tick=clock.now)
    server = HealthServer("127.0.0.1", 0)
    server.add_liveness("agent-loop", heartbeat_check(lambda: status.last_tick, timeout=90, clock=clock))
    assert server.liveness().status == 200 and server.liveness().body == "live\n"
    clock.now += 90
    assert server.liveness().status == 200
    clock.now += 1
    live = server.liveness()
    assert live.status == 503 and live.body == "not live: agent-loop: agent loop has not run for 91s (limit 90s)\n"
    status.last_tick = clock.now
    assert server.liveness().status == 200


def test_a_check_that_raises_fails_instead_of_breaking_the_endpoint() -> None:
    server = HealthServer("127.0.0.1", 0)

    def broken() -> tuple[bool, str]:
        raise KeyError("x")

    server.add_readiness("broken", broken)
    assert server.readiness().status == 503
    assert "broken: check raised KeyError" in server.readiness().body


def test_datastore_probe_flips_with_the_datastore() -> None:
    clock = FakeClock()
    store = MemoryDatastore()
    probe = DatastoreProbe(store, interval=5, clock=clock)
    assert probe.check() == (False, "datastore not reachable: no answer yet")
    assert probe.probe_once()  # NotFound is an answer
    assert probe.check() == (True, "")
    store.available = False
    assert not probe.probe_once()
    ok, detail = probe.check()
    assert not ok and detail.startswith("datastore not reachable: ")
    store.available = True
    assert probe.probe_once() and probe.check()[0]
    clock.now += 16  # the probe thread itself is stuck: stale after 3 intervals
    assert probe.check() == (False, "datastore has not answered for 16s")


# -- the exposition parser ----------------------------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
_SAMPLE = re.compile(rf"^({_NAME})(\{{(?:{_LABEL})(?:,{_LABEL})*\}})? (\S+)$")
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"')


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """(family -> type, (sample name, labels) -> value); raises AssertionError on any bad line."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            assert re.match(rf"^# HELP {_NAME} \S", line), line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert not (kind == "counter" and name.startswith("felixpy_")) or name.endswith("_total"), line
            assert name not in types, f"family {name} declared twice"
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"bad sample line: {line!r}"
        name, labels_text, value_text = match.groups()
        labels = frozenset(_LABEL_RE.findall(labels_text or ""))
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        if types.get(family) == "summary" and name == family:
            assert "quantile" in dict(labels), f"summary sample without quantile: {line}"
        assert family in types, f"sample {name} has no TYPE"
        if types[family] == "histogram":
            assert name != family, f"histogram {family} sample without suffix"
        value = float(value_text.replace("+Inf", "inf").replace("-Inf", "-inf"))
        key = (name, labels)
        assert key not in samples, f"duplicate sample {line}"
        samples[key] = value
    # Histograms: cumulative buckets, +Inf == _count.
    for family, kind in types.items():
        if kind != "histogram":
            continue
        series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for (name, labels), value in samples.items():
            if name == family + "_bucket":
                le = dict(labels)["le"]
                rest = frozenset(kv for kv in labels if kv[0] != "le")
                series.setdefault(rest, []).append((float(le.replace("+Inf", "inf")), value))
        for rest, buckets in series.items():
            buckets.sort()
            assert buckets[-1][0] == math.inf
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{family} buckets not cumulative"
            assert samples[(family + "_count", rest)] == counts[-1]
            assert (family + "_sum", rest) in samples
    return types, samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


# -- metrics --------------------------------------------------------------------------------------
AGENT_METRICS = {
    "felixpy_dataplane_apply_seconds": "histogram",
    "felixpy_resyncs_total": "counter",
    "felixpy_routes_programmed": "gauge",
    "felixpy_iptables_rules": "gauge",
    "felixpy_ipam_blocks": "gauge",
    "felixpy_ipam_ips_in_use": "gauge",
    "felixpy_ipam_ips_borrowed": "gauge",
    "felixpy_cni_request_seconds": "histogram",
    "felixpy_bgp_sessions": "gauge",
    "felixpy_bgp_peer_up": "gauge",
    "felixpy_bgp_peer_routes_received": "gauge",
    "felixpy_bgp_peer_state_change_timestamp_seconds": "gauge",
    "felix_host": "gauge",
    "felix_resync_state": "gauge",
    "felix_resyncs_started": "counter",
    "felix_calc_graph_updates_processed": "counter",
    "felix_calc_graph_update_time_seconds": "summary",
    "felix_active_local_endpoints": "gauge",
    "felix_active_local_policies": "gauge",
    "felix_active_local_selectors": "gauge",
    "felix_cluster_num_hosts": "gauge",
    "felix_cluster_num_workload_endpoints": "gauge",
    "felix_cluster_num_policies": "gauge",
    "felix_cluster_num_profiles": "gauge",
    "felix_int_dataplane_failures": "counter",
    "felix_int_dataplane_initial_resync_time_seconds": "gauge",
    "felix_int_dataplane_apply_time_seconds": "summary",
    "felix_iptables_restore_calls": "counter",
    "felix_iptables_restore_errors": "counter",
    "felix_iptables_save_calls": "counter",
    "felix_iptables_save_errors": "counter",
    "felix_iptables_chains": "gauge",
    "felix_iptables_rules": "gauge",
    "felix_iptables_lines_executed": "counter",
    "felix_ipsets_calico": "gauge",
    "felix_ipsets_total": "gauge",
    "felix_ipset_calls": "counter",
    "felix_ipset_errors": "counter",
    "felix_ipset_lines_executed": "counter",
    "felix_route_table_resync_seconds": "summary",
    "felix_route_table_num_routes": "gauge",
    "process_cpu_seconds_total": "counter",
    "process_virtual_memory_bytes": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}


# With BGP (backend bird) and the health checks, as felixpy-node runs with metrics enabled.
AGENT_METRICS_BGP = {**AGENT_METRICS, "felixpy_bgp_speaker_up": "gauge", "felixpy_agent_live": "gauge",
                     "felixpy_agent_ready": "gauge", "felixpy_agent_readiness_check": "gauge"}


def test_every_documented_metric_is_exported_from_the_start() -> None:
    types, samples = parse_exposition(Metrics(host="n1").render())
    assert types == AGENT_METRICS
    assert {value(samples, "felixpy_bgp_sessions", state=s) for s in BGP_STATES} == {0.0}
    assert value(samples, "felixpy_cni_request_seconds_count", command="ADD") == 0
    assert value(samples, "felix_host", host="n1") == 1
    assert value(samples, "felix_resync_state") == 1  # waiting for the datastore
    assert value(samples, "felix_iptables_chains", ip_version="4", table="filter") == 0
    assert value(samples, "felix_iptables_lines_executed", ip_version="4", table="nat") == 0
    assert value(samples, "felix_route_table_num_routes", table="IPv4:254") == 0
    assert math.isnan(value(samples, "felix_int_dataplane_apply_time_seconds", quantile="0.5"))
    assert value(samples, "felix_int_dataplane_apply_time_seconds_count") == 0
    assert value(samples, "process_resident_memory_bytes") > 1e6
    assert value(samples, "process_open_fds") >= 3


def test_agent_calls_show_up_in_the_exposition() -> None:
    m = Metrics()
    for seconds in (0.0005, 0.004, 0.004, 0.3, 20.0):
        m.observe_apply(seconds)
    m.resync()
    m.resync()
    m.routes_programmed(12)
    m.iptables_rules(345)
    m.observe_cni("add", 0.2)
    m.observe_cni("DEL", 0.02)
    m.ipam(blocks=2, in_use=70, borrowed=3)
    m.apply_failed()
    _, s = parse_exposition(m.render())
    assert value(s, "felixpy_dataplane_apply_seconds_count") == 5
    assert value(s, "felixpy_dataplane_apply_seconds_sum") == pytest.approx(20.3085)
    assert value(s, "felixpy_dataplane_apply_seconds_bucket", le="0.001") == 1
    assert value(s, "felixpy_dataplane_apply_seconds_bucket", le="0.005") == 3
    assert value(s, "felixpy_dataplane_apply_seconds_bucket", le="10") == 4
    assert value(s, "felixpy_dataplane_apply_seconds_bucket", le="+Inf") == 5
    # Felix's summary of the same applies: exact quantiles over the window.
    assert value(s, "felix_int_dataplane_apply_time_seconds_count") == 5
    assert value(s, "felix_int_dataplane_apply_time_seconds", quantile="0.5") == 0.004
    assert value(s, "felix_int_dataplane_apply_time_seconds", quantile="0.99") == 20.0
    assert value(s, "felix_int_dataplane_failures") == 1
    assert value(s, "felixpy_resyncs_total") == 2
    assert value(s, "felixpy_routes_programmed") == 12
    assert value(s, "felix_route_table_num_routes", table="IPv4:254") == 12
    assert value(s, "felixpy_iptables_rules") == 345
    assert value(s, "felixpy_cni_request_seconds_count", command="ADD") == 1
    assert value(s, "felixpy_cni_request_seconds_bucket", command="DEL", le="0.025") == 1
    assert (value(s, "felixpy_ipam_blocks"), value(s, "felixpy_ipam_ips_in_use"),
            value(s, "felixpy_ipam_ips_borrowed")) == (2, 70, 3)


def test_health_checks_and_bgp_speaker_as_metrics() -> None:
    server = HealthServer("127.0.0.1", 0)
    status = FakeStatus(last_tick=time.monotonic())
    add_agent_checks(server, status)
    m = Metrics(host="n1", bgp_status=lambda: {"sidecar": "connected", "peers": []}, health=server)
    types, s = parse_exposition(m.render())
    assert types == AGENT_METRICS_BGP
    assert value(s, "felixpy_bgp_speaker_up") == 1
    assert (value(s, "felixpy_agent_live"), value(s, "felixpy_agent_ready")) == (1, 0)
    assert value(s, "felixpy_agent_readiness_check", check="datastore-sync") == 0
    status.in_sync = status.last_apply_ok = True
    _, s = parse_exposition(m.render())
    assert value(s, "felixpy_agent_ready") == 1
    assert value(s, "felixpy_agent_readiness_check", check="dataplane") == 1


def test_summary_quantiles_forget_old_observations() -> None:
    clock = FakeClock()
    r = Registry()
    summary = r.register(Summary("t_seconds", "t", clock=clock))
    for v in (1.0, 2.0, 3.0, 4.0):
        summary.observe(v)
    _, s = parse_exposition(r.render())
    assert [value(s, "t_seconds", quantile=q) for q in ("0.5", "0.9", "0.99")] == [2.0, 4.0, 4.0]
    clock.now += 601  # older than the 10-minute window
    summary.observe(10.0)
    _, s = parse_exposition(r.render())
    assert value(s, "t_seconds", quantile="0.5") == 10.0
    assert (value(s, "t_seconds_sum"), value(s, "t_seconds_count")) == (20.0, 5)


class _FakeTable:
    def __init__(self, name: str, chains: int, rules: int, ip_version: int = 4) -> None:
        self.name, self._counts, self.ip_version = name, (chains, rules), ip_version

    def counts(self) -> tuple[int, int]:
        return self._counts


class _FakeSets:
    def __init__(self, ours: int = 7, total: int | None = 9) -> None:
        self._counts = (ours, total)

    def counts(self) -> tuple[int, int | None]:
        return self._counts


def test_dataplane_counts_use_felix_labels() -> None:
    m = Metrics()
    m.dataplane_counts(tables=[_FakeTable("filter", 12, 80), _FakeTable("nat", 2, 5)], ipsets=_FakeSets(),
                       local_endpoints=3, active_policies=4, active_selectors=6)
    _, s = parse_exposition(m.render())
    assert value(s, "felix_iptables_chains", ip_version="4", table="filter") == 12
    assert value(s, "felix_iptables_rules", ip_version="4", table="nat") == 5
    assert value(s, "felixpy_iptables_rules") == 85
    assert value(s, "felix_ipsets_calico", ip_version="inet") == 7
    assert value(s, "felix_ipsets_total") == 9
    assert (value(s, "felix_active_local_endpoints"), value(s, "felix_active_local_policies"),
            value(s, "felix_active_local_selectors")) == (3, 4, 6)


def test_dataplane_counts_of_a_dual_stack_node_carry_each_family() -> None:
    m = Metrics()
    m.dataplane_counts(tables=[_FakeTable("filter", 12, 80), _FakeTable("filter", 10, 70, ip_version=6)],
                       ipsets=_FakeSets(7, 9), ipsets6=_FakeSets(5, 6),
                       local_endpoints=3, active_policies=4, active_selectors=6)
    _, s = parse_exposition(m.render())
    assert value(s, "felix_iptables_chains", ip_version="6", table="filter") == 10
    assert value(s, "felix_iptables_rules", ip_version="4", table="filter") == 80
    assert value(s, "felixpy_iptables_rules") == 150
    assert value(s, "felix_ipsets_calico", ip_version="inet6") == 5
    assert value(s, "felix_ipsets_total") == 15
    m.observe_command(["ip6tables-nft-restore", "--noflush", "--wait"], "*filter\n-A cali-x -j ACCEPT\nCOMMIT\n",
                      0.01, True)
    m.observe_command(["ip6tables-nft-save", "-t", "filter"], None, 0.01, True)
    _, s = parse_exposition(m.render())
    assert value(s, "felix_iptables_lines_executed", ip_version="6", table="filter") == 1
    assert (value(s, "felix_iptables_restore_calls"), value(s, "felix_iptables_save_calls")) == (1, 1)


def test_commands_are_counted_as_felix_counts_them() -> None:
    m = Metrics()
    restore = "*filter\n:cali-x - [0:0]\n-A cali-x -j ACCEPT\n-D cali-y 3\nCOMMIT\n"
    m.observe_command(["iptables-nft-restore", "--noflush", "--wait"], restore, 0.01, True)
    m.observe_command(["iptables-legacy-restore", "--noflush"], "*nat\n-A x\nCOMMIT\n", 0.01, False)
    m.observe_command(["iptables-nft-save", "-t", "nat"], None, 0.01, True)
    m.observe_command(["ipset", "restore"], "create a hash:ip\nadd a 10.0.0.1\n", 0.01, True)
    m.observe_command(["ipset", "destroy", "cali40x"], None, 0.01, False)
    m.observe_command(["ipset", "save"], None, 0.01, True)
    m.observe_command(["ip", "route"], None, 0.01, True)  # not ours to count
    _, s = parse_exposition(m.render())
    assert (value(s, "felix_iptables_restore_calls"), value(s, "felix_iptables_restore_errors")) == (2, 1)
    assert value(s, "felix_iptables_lines_executed", ip_version="4", table="filter") == 3
    assert value(s, "felix_iptables_lines_executed", ip_version="4", table="nat") == 0  # failed
    assert (value(s, "felix_iptables_save_calls"), value(s, "felix_iptables_save_errors")) == (1, 0)
    assert (value(s, "felix_ipset_calls"), value(s, "felix_ipset_errors")) == (3, 1)
    assert value(s, "felix_ipset_lines_executed") == 2


def test_sync_status_and_calc_updates() -> None:
    m = Metrics()
    for status in ("WAIT_FOR_DATASTORE", "RESYNC", "IN_SYNC", "RESYNC", "IN_SYNC"):
        m.sync_status(status)
    m.observe_calc_update("workloadendpoints", 0.0002)
    m.observe_calc_update("workloadendpoints", 0.0004)
    m.observe_calc_update("block", 0.0001)
    _, s = parse_exposition(m.render())
    assert value(s, "felix_resync_state") == 3
    assert value(s, "felix_resyncs_started") == 2
    assert value(s, "felix_calc_graph_updates_processed", type="workloadendpoints") == 2
    assert value(s, "felix_calc_graph_updates_processed", type="block") == 1
    assert value(s, "felix_calc_graph_update_time_seconds_count") == 3


def test_bgp_sessions_per_peer_come_from_the_status_file() -> None:
    status: dict[str, Any] = {"sidecar": "connected", "peers": [
        {"peer": "192.0.2.12", "type": "mesh", "node": "n2", "state": "Established", "since": 1700000000.5,
         "routesReceived": 3},
        {"peer": "192.0.2.13", "type": "reflector", "node": "rr1", "state": "Active", "since": 1700000100,
         "routesReceived": 0},
    ]}
    m = Metrics(bgp_status=lambda: status)
    _, s = parse_exposition(m.render())
    assert value(s, "felixpy_bgp_sessions", state="Established") == 1
    assert value(s, "felixpy_bgp_sessions", state="Active") == 1
    assert value(s, "felixpy_bgp_peer_up", peer="192.0.2.12", type="mesh", peer_node="n2") == 1
    assert value(s, "felixpy_bgp_peer_up", peer="192.0.2.13", type="reflector", peer_node="rr1") == 0
    assert value(s, "felixpy_bgp_peer_routes_received", peer="192.0.2.12", type="mesh", peer_node="n2") == 3
    assert value(s, "felixpy_bgp_peer_state_change_timestamp_seconds", peer="192.0.2.13", type="reflector",
                 peer_node="rr1") == 1700000100
    status["peers"] = status["peers"][:1]  # a peer removed from the configuration disappears
    _, s = parse_exposition(m.render())
    assert not [k for k in s if k[0] == "felixpy_bgp_peer_up" and ("peer", "192.0.2.13") in k[1]]


def test_datastore_stats_count_cluster_resources() -> None:
    m = Metrics()
    dispatcher = Dispatcher(DatastoreStats("n1", m))

    def update(key: str, value: Any) -> None:
        dispatcher.on_update(KVUpdate(key, value, 1))

    for plural, name, ns in (("nodes", "n1", None), ("nodes", "n2", None),
                             ("workloadendpoints", "n1-k8s-a-eth0", "x"), ("profiles", "kns.x", None),
                             ("networkpolicies", "default.p", "x"), ("globalnetworkpolicies", "default.g", None),
                             ("ippools", "p", None)):
        update(keys.resource_key(plural, name, ns), {"spec": {"node": "n1"}})
    assert (m.cluster_hosts.get(), m.cluster_weps.get(), m.cluster_policies.get(),
            m.cluster_profiles.get()) == (2, 1, 2, 1)
    update(keys.resource_key("nodes", "n2"), None)
    update(keys.resource_key("networkpolicies", "default.p", "x"), None)
    assert (m.cluster_hosts.get(), m.cluster_policies.get()) == (1, 1)


def test_label_values_are_escaped() -> None:
    r = Registry()
    g: Gauge = r.register(Gauge("x_info", "Escaping.", ("v",)))
    g.set(1, v='a "quoted" back\\slash\nnewline')
    _, s = parse_exposition(r.render())
    assert list(s) == [("x_info", frozenset({("v", 'a \\"quoted\\" back\\\\slash\\nnewline')}))]


def test_metric_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="_total"):
        Counter("felixpy_resyncs", "no suffix")
    c = Counter("c_total", "c")
    with pytest.raises(ValueError, match="only goes up"):
        c.inc(-1)
    with pytest.raises(ValueError, match="labels"):
        c.inc(1, extra="x")
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "h", (1.0, 0.5))
    r = Registry()
    r.register(Gauge("g", "g"))
    with pytest.raises(ValueError, match="twice"):
        r.register(Gauge("g", "g"))


def _block(cidr: str, owner: str | None, allocations: dict[str, str]) -> dict[str, Any]:
    block = Block.new(cidr, affinity=f"host:{owner}" if owner else None)
    for ip, node in allocations.items():
        block.assign_ip(ip, f"h-{ip}", {"node": node})
    return block.to_json()


def test_ipam_usage_tracks_own_and_borrowed_addresses() -> None:
    m = Metrics()
    dispatcher = Dispatcher(DatastoreStats("n1", m))  # the agent registers it the same way

    def update(key: str, value: Any) -> None:
        dispatcher.on_update(KVUpdate(key, value, 1))

    k1, k2, k3 = (keys.block_key(c) for c in ("10.0.0.0/26", "10.0.0.64/26", "10.0.0.128/26"))
    update(k1, _block("10.0.0.0/26", "n1", {"10.0.0.1": "n1", "10.0.0.2": "n1"}))
    update(k2, _block("10.0.0.64/26", "n2", {"10.0.0.65": "n2", "10.0.0.66": "n1"}))
    update(k3, _block("10.0.0.128/26", "n1", {}))
    update(keys.resource_key("nodes", "n1"), {"spec": {}})  # a node: counted, not an IPAM block
    assert (m.ipam_blocks.get(), m.ipam_in_use.get(), m.ipam_borrowed.get()) == (2, 3, 1)
    update(k1, _block("10.0.0.0/26", "n1", {"10.0.0.1": "n1"}))
    update(k2, None)
    assert (m.ipam_blocks.get(), m.ipam_in_use.get(), m.ipam_borrowed.get()) == (2, 1, 0)
    update(k3, {**_block("10.0.0.128/26", "n1", {}), "deleted": True})  # being released
    assert (m.ipam_blocks.get(), m.ipam_in_use.get(), m.ipam_borrowed.get()) == (1, 1, 0)
    update(k1, {"cidr": "garbage"})  # invalid: as if gone
    assert (m.ipam_blocks.get(), m.ipam_in_use.get(), m.ipam_borrowed.get()) == (0, 0, 0)
