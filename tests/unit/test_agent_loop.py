"""The agent loop with fake drivers: nothing before in-sync, minimal re-applies, retries, waiters."""

from __future__ import annotations

import threading
import time

from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.node.agent import Agent


class FakeRouteTable:
    def __init__(self, fail_times: int = 0) -> None:
        self.desired: dict[str, object] = {}
        self.applies = 0
        self.resyncs = 0
        self.fail_times = fail_times

    def set_routes(self, routes):
        self.desired = {r.dst: r for r in routes}

    def queue_resync(self):
        self.resyncs += 1

    def apply(self):
        self.applies += 1
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("netlink exploded")

        class Result:
            pending = ()
            failed: dict = {}
        return Result()


class FakeTable:
    def __init__(self) -> None:
        self.chains: dict[str, object] = {}
        self.jumps: dict[str, object] = {}

    def update_chain(self, chain):
        self.chains[chain.name] = chain

    def set_jump_rules(self, builtin, rules):
        self.jumps[builtin] = list(rules)

    def queue_resync(self):
        pass

    def apply(self):
        return ""


class FakeIPSets:
    def __init__(self) -> None:
        self.sets: dict[str, list[str]] = {}

    def set_members(self, name, set_type, members):
        self.sets[name] = list(members)

    def queue_resync(self):
        pass

    def apply(self):
        return ""

    def apply_deletions(self):
        return []


def make_agent(store, routes=None, refresh: float = 0):
    return Agent(store=store, node_name="n1", networking_backend="vxlan",
                 route_refresh_interval=refresh, iptables_refresh_interval=0,
                 route_table=routes or FakeRouteTable(), nat_table=FakeTable(), ipsets=FakeIPSets())


def run_in_thread(agent):
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met")


def seed(store):
    store.create(keys.resource_key("nodes", "n1"), {"spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}}})
    store.create(keys.resource_key("nodes", "n2"), {"spec": {"bgp": {"ipv4Address": "192.0.2.12/24"}}})
    store.create(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16", "natOutgoing": True}})
    store.create(keys.affinity_key("n1", "10.244.1.0/26"), {"state": "confirmed"})
    store.create(keys.affinity_key("n2", "10.244.2.0/26"), {"state": "confirmed"})


def test_no_dataplane_writes_before_in_sync():
    store = MemoryDatastore()
    store.available = False
    routes = FakeRouteTable()
    agent = make_agent(store, routes)
    t = run_in_thread(agent)
    try:
        time.sleep(0.5)
        assert routes.applies == 0  # datastore unreachable: nothing known, nothing written
        store.available = True
        seed(store)
        wait_for(lambda: "10.244.2.0/26" in routes.desired)
        assert routes.desired["10.244.2.0/26"].gateway == "192.0.2.12"
        assert routes.desired["10.244.1.0/26"].type == "blackhole"
    finally:
        agent.stop()
        t.join(5)


def test_failed_apply_is_retried_and_then_succeeds():
    store = MemoryDatastore()
    seed(store)
    routes = FakeRouteTable(fail_times=2)
    agent = make_agent(store, routes)
    t = run_in_thread(agent)
    try:
        wait_for(lambda: agent.status.last_apply_ok, timeout=10)
        assert routes.applies >= 3
    finally:
        agent.stop()
        t.join(5)


def test_waiter_released_once_endpoint_is_programmed():
    store = MemoryDatastore()
    seed(store)
    agent = make_agent(store)
    t = run_in_thread(agent)
    try:
        wait_for(lambda: agent.status.applies > 0)
        key = keys.resource_key("workloadendpoints", "n1-k8s-a-eth0", "x")
        kv = store.create(key, {"metadata": {"namespace": "x"},
                                "spec": {"node": "n1", "pod": "a", "interfaceName": "cali1",
                                         "ipNetworks": ["10.244.1.5/32"]}})
        assert agent.waiter.wait(key, kv.revision, 5)
        assert not agent.waiter.wait(key, kv.revision + 100, 0.2)
    finally:
        agent.stop()
        t.join(5)


def test_periodic_resync_reaches_the_driver():
    store = MemoryDatastore()
    seed(store)
    routes = FakeRouteTable()
    agent = make_agent(store, routes, refresh=0.2)
    t = run_in_thread(agent)
    try:
        wait_for(lambda: routes.resyncs >= 2, timeout=5)
    finally:
        agent.stop()
        t.join(5)
