"""The agent loop over its real drivers and the stateful kernel fakes: nothing before in-sync,
retries with backoff, the CNI waiter, periodic resyncs."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Iterator

import pytest

from felixpy.dataplane.drivers.routes import kernel_route
from felixpy.datastore import keys
from felixpy.datastore.memory import MemoryDatastore
from felixpy.messages import Route
from felixpy.node.agent import APPLY_ORDER, Agent
from tests.support.polling import wait_for
from tests.fakes.dataplane import FakeDataplane


def make_agent(store: MemoryDatastore, dp: FakeDataplane, refresh: float = 0) -> Agent:
    return Agent(store=store, node_name="n1", networking_backend="vxlan",
                 route_refresh_interval=refresh, iptables_refresh_interval=0, **dp.drivers())


@pytest.fixture
def running() -> Iterator[Callable[[Agent], Agent]]:
    started: list[tuple[Agent, threading.Thread]] = []

    def start(agent: Agent) -> Agent:
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        started.append((agent, thread))
        return agent

    yield start
    for agent, thread in started:
        agent.stop()
        thread.join(5)




def seed(store: MemoryDatastore) -> None:
    store.create(keys.resource_key("nodes", "n1"), {"spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}}})
    store.create(keys.resource_key("nodes", "n2"), {"spec": {"bgp": {"ipv4Address": "192.0.2.12/24"}}})
    store.create(keys.resource_key("ippools", "p"), {"spec": {"cidr": "10.244.0.0/16", "natOutgoing": True}})
    store.create(keys.affinity_key("n1", "10.244.1.0/26"), {"state": "confirmed"})
    store.create(keys.affinity_key("n2", "10.244.2.0/26"), {"state": "confirmed"})


def wep(store: MemoryDatastore, pod: str, ip: str, iface: str) -> tuple[str, int]:
    key = keys.resource_key("workloadendpoints", f"n1-k8s-{pod}-eth0", "x")
    kv = store.create(key, {"metadata": {"namespace": "x"},
                            "spec": {"node": "n1", "pod": pod, "interfaceName": iface,
                                     "ipNetworks": [f"{ip}/32"]}})
    return key, kv.revision


def test_apply_order_puts_dependencies_first_and_deletions_last() -> None:
    order = list(APPLY_ORDER)
    assert order.index("links") < order.index("routes")
    assert order.index("deferred-work") < order.index("ipsets") < order.index("filter")
    assert order.index("ipsets") < order.index("nat") < order.index("ipset-deletions") == len(order) - 1


class CountingStore(MemoryDatastore):
    """Counts list attempts: the syncer's retries are the positive event a test can wait for."""

    def __init__(self) -> None:
        super().__init__()
        self.lists = 0

    def list(self, prefix: str) -> Any:
        self.lists += 1
        return super().list(prefix)


def test_no_dataplane_writes_before_in_sync(running: Callable[[Agent], Agent]) -> None:
    store = CountingStore()
    store.available = False
    dp = FakeDataplane()
    agent = running(make_agent(store, dp))
    wait_for(lambda: store.lists >= 2)  # the syncer tried, failed, and tried again
    assert agent.status.applies == 0 and dp.netlink.calls == [] and dp.iptables.restores == []
    store.available = True
    seed(store)
    wait_for(lambda: "10.244.2.0/26" in dp.netlink.ours())
    ours = dp.netlink.ours()
    assert ours["10.244.2.0/26"].gateway == "192.0.2.12"
    assert ours["10.244.1.0/26"].type == "blackhole"
    assert "10.244.0.0/16" in dp.set_members()["cali40masq-ipam-pools"]


def test_a_raising_driver_is_retried_with_backoff(running: Callable[[Agent], Agent],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryDatastore()
    seed(store)
    dp = FakeDataplane()
    dp.iptables.fail_restores = 3  # every attempt of the first apply's filter restore fails
    with caplog.at_level(logging.ERROR, logger="felixpy.node.agent"):
        agent = running(make_agent(store, dp))
        wait_for(lambda: agent.status.last_apply_ok, timeout=10)
    assert [r.getMessage() for r in caplog.records][0].startswith("dataplane apply failed step=filter")
    assert "cali-FORWARD" in dp.chains("filter") and "cali-nat-outgoing" in dp.chains("nat")


def test_failed_routes_are_retried_with_the_same_backoff(running: Callable[[Agent], Agent],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    store = MemoryDatastore()
    seed(store)
    dp = FakeDataplane()
    dp.netlink.fail_next.add("add_route")  # the driver reports it instead of raising
    with caplog.at_level(logging.ERROR, logger="felixpy.node.agent"):
        agent = running(make_agent(store, dp))
        wait_for(lambda: agent.status.last_apply_ok and len(dp.netlink.ours()) == 2, timeout=10)
    messages = [r.getMessage() for r in caplog.records]
    assert messages and messages[0].startswith("dataplane apply failed step=routes")
    assert "injected failure" in messages[0]


def test_waiter_released_once_the_endpoint_routes_are_programmed(running: Callable[[Agent], Agent]) -> None:
    store = MemoryDatastore()
    seed(store)
    dp = FakeDataplane()
    agent = running(make_agent(store, dp))
    wait_for(lambda: agent.status.applies > 0)
    key, revision = wep(store, "a", "10.244.1.5", "cali1")
    # No cali1 yet (the CNI plugin has not created the veth): the route waits, and so does ADD.
    assert not agent.waiter.wait(key, revision, 0.3)
    dp.netlink.add_link("cali1", 9)
    assert agent.waiter.wait(key, revision, 5)
    assert dp.netlink.ours()["10.244.1.5/32"].ifindex == 9
    assert not agent.waiter.wait(key, revision + 100, 0.2)


def test_cni_written_route_is_adopted_and_the_endpoint_programmed_without_a_write(
        running: Callable[[Agent], Agent]) -> None:
    store = MemoryDatastore()
    seed(store)
    dp = FakeDataplane()
    agent = running(make_agent(store, dp))
    wait_for(lambda: agent.status.applies > 0)
    # What the CNI path does: the veth, its /32 with the driver's value, the hand-over, the endpoint.
    dp.netlink.add_link("cali2", 11)
    route = kernel_route(Route("10.244.1.6/32", iface="cali2"), 11)
    dp.netlink.routes[(route.table, route.dst, route.priority)] = route
    agent.adopt_routes((route,), hold=10.0)
    dp.netlink.calls.clear()
    key, revision = wep(store, "b", "10.244.1.6", "cali2")
    assert agent.waiter.wait(key, revision, 5)
    assert [c for c in dp.netlink.mutating_calls() if c[1] == route.dst] == []
    # And the loop still owns it: the endpoint goes, the route goes.
    store.delete(key)
    wait_for(lambda: route.dst not in dp.netlink.ours())


def test_periodic_resync_reaches_the_driver(running: Callable[[Agent], Agent]) -> None:
    store = MemoryDatastore()
    seed(store)
    dp = FakeDataplane()
    running(make_agent(store, dp, refresh=0.2))
    wait_for(lambda: sum(1 for call in dp.netlink.calls if call[0] == "list_routes") >= 3)
