"""The agent side of CNI (cni/server.CNIHandler) on the in-memory datastore and the plumbing fake:
ADD's order and its undo, DEL's identity rule, CHECK against prevResult, STATUS, GC by network,
and the DELs the plugin leaves for the agent. The real kernel and etcd: test_cni_server.py under
tests/integration; the real agent and plugins: tests/e2e/test_cni_agent_down.py."""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

import pytest

from felixpy import names
from felixpy.cni import plugin
from felixpy.cni.server import CNIHandler
from felixpy.datastore import keys
from felixpy.datastore.api import NotFound
from felixpy.datastore.memory import MemoryDatastore
from felixpy.kernel.netlink import KernelRoute
from tests.fakes.plumbing import FakePlumbing

NODE = "n1"
NETNS = "/run/netns/sandbox-a"
CID = "a" * 64


def add_pool(store: MemoryDatastore) -> None:
    store.create(keys.resource_key("ippools", "p"),
                 {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p"},
                  "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})


OPEN: list[CNIHandler] = []


@pytest.fixture(autouse=True)
def close_handlers() -> Any:
    yield
    while OPEN:
        OPEN.pop().close()


class Harness:
    def __init__(self, *, programmed: bool = True, ready: tuple[bool, str] = (True, "")) -> None:
        self.store = MemoryDatastore()
        add_pool(self.store)
        self.plumbing = FakePlumbing([NETNS, "/run/netns/sandbox-b", "/run/netns/sandbox-c"])
        self.programmed = programmed
        self.ready_state = ready
        self.events: list[str] = []  # the order of the steps the agent sees
        self.adopted: list[KernelRoute] = []
        self.wait_hook: Callable[[], None] | None = None
        self.handler = CNIHandler(
            store=self.store, node_name=NODE, mtu=1450, node_labels=dict,
            wait_programmed=self._wait, ready=lambda: self.ready_state,
            adopt_routes=self._adopt, plumbing=self.plumbing, add_deadline=0.5)
        OPEN.append(self.handler)

    def _adopt(self, routes: tuple[KernelRoute, ...], hold: float, iface: str) -> None:
        assert hold > 0 and iface in self.plumbing.veths  # the host end the routes go through
        self.events.append("adopt")
        self.adopted.extend(routes)

    def _wait(self, key: str, revision: int, timeout: float) -> bool:
        self.events.append("wait")
        assert self.store.get(key).revision == revision
        if self.wait_hook is not None:
            self.wait_hook()
        return self.programmed

    def request(self, command: str, *, cid: str = CID, netns: str = NETNS, pod: str = "a",
                ifname: str = "eth0", network: str = "k8s-pod-network", version: str = "1.0.0",
                **config: Any) -> dict[str, Any]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": ifname,
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={pod}"}
        return self.handler.handle({"env": env, "config": {"cniVersion": version, "name": network, **config}})

    def endpoint(self, pod: str = "a", ifname: str = "eth0") -> Any:
        key = keys.resource_key("workloadendpoints", names.workload_endpoint_name(NODE, pod, ifname), "x")
        try:
            return self.store.get(key).value
        except NotFound:
            return None

    def handle_exists(self, cid: str = CID, network: str = "k8s-pod-network") -> bool:
        try:
            self.store.get(keys.handle_key(names.ipam_handle(cid, network)))
            return True
        except NotFound:
            return False


def error_of(reply: dict[str, Any]) -> tuple[int, str]:
    assert "error" in reply, reply
    return reply["error"]["code"], reply["error"]["msg"]


# -- ADD -----------------------------------------------------------------------------------------

def test_add_writes_the_route_before_the_endpoint_and_answers_once_programmed() -> None:
    h = Harness()
    written: list[str] = []
    real_create = h.store.create

    def create(key: str, value: Any) -> Any:
        if "workloadendpoints" in key:
            h.events.append("endpoint")
        written.append(key)
        return real_create(key, value)

    h.store.create = create  # type: ignore[method-assign]
    reply = h.request("ADD")
    result = reply["result"]
    ip = result["ips"][0]["address"].split("/")[0]
    iface = h.plumbing.pod_iface("x", "a")
    assert result["interfaces"][0] == {"name": iface, "mac": names.HOST_VETH_MAC}
    assert result["interfaces"][1]["sandbox"] == NETNS
    # The agent owns the route before the endpoint that wants it exists, and ADD waits for both.
    assert h.events == ["adopt", "endpoint", "wait"]
    assert [r.dst for r in h.adopted] == [f"{ip}/32"]
    assert h.adopted[0].proto == names.ROUTE_PROTO and h.adopted[0].ifindex == h.plumbing.veths[iface].index
    assert h.plumbing.routes[f"{ip}/32"] == h.adopted[0]
    spec = h.endpoint()["spec"]
    assert (spec["containerID"], spec["interfaceName"], spec["ipNetworks"]) == (CID, iface, [f"{ip}/32"])
    assert spec["mac"] == result["interfaces"][1]["mac"]


def test_add_that_cannot_confirm_the_dataplane_fails_and_undoes_everything() -> None:
    h = Harness(programmed=False, ready=(False, "last dataplane apply failed: boom"))
    code, msg = error_of(h.request("ADD"))
    assert code == plugin.TRY_AGAIN_LATER and "not programmed within" in msg
    assert h.plumbing.veths == {} and h.plumbing.routes == {}  # veth and its route gone
    assert h.endpoint() is None and not h.handle_exists()  # endpoint and address gone
    reply = h.request("ADD", pod="a")
    assert "error" in reply and "boom" in reply["error"]["details"]


def test_add_whose_veth_cannot_be_configured_releases_its_address() -> None:
    h = Harness()
    h.plumbing.fail_configure = True
    endpoints: list[str] = []
    real_create = h.store.create

    def create(key: str, value: Any) -> Any:
        if "workloadendpoints" in key:
            endpoints.append(key)
        return real_create(key, value)

    h.store.create = create  # type: ignore[method-assign]
    code, _ = error_of(h.request("ADD"))
    assert code == plugin.IO_FAILURE
    # The endpoint is written while the pod side is configured: written, then undone with the rest.
    assert len(endpoints) == 1
    assert h.plumbing.veths == {} and h.plumbing.routes == {}
    assert h.endpoint() is None and not h.handle_exists()


def test_add_in_a_missing_sandbox_never_touches_another_sandboxs_veth() -> None:
    h = Harness()
    assert "result" in h.request("ADD")
    iface = h.plumbing.pod_iface("x", "a")
    code, _ = error_of(h.request("ADD", cid="b" * 64, netns="/run/netns/gone"))
    assert code == plugin.IO_FAILURE
    assert iface in h.plumbing.veths  # the live sandbox of the same pod keeps its veth
    assert h.handle_exists() and not h.handle_exists("b" * 64)


def test_repeated_add_reuses_the_address() -> None:
    h = Harness()
    first = h.request("ADD")["result"]["ips"]
    second = h.request("ADD")["result"]["ips"]
    assert first == second


# -- DEL -----------------------------------------------------------------------------------------

def test_del_removes_everything_and_is_idempotent() -> None:
    h = Harness()
    h.request("ADD")
    for _ in range(2):
        assert h.request("DEL") == {"result": {}}
    assert h.plumbing.veths == {} and h.endpoint() is None and not h.handle_exists()


def test_late_del_of_an_old_sandbox_leaves_the_new_one_alone() -> None:
    h = Harness()
    h.request("ADD", cid="old" * 10, netns="/run/netns/sandbox-b")
    h.request("ADD", cid=CID, netns=NETNS)  # the pod's new sandbox, same pod name
    assert h.request("DEL", cid="old" * 10, netns="/run/netns/sandbox-b") == {"result": {}}
    assert h.endpoint()["spec"]["containerID"] == CID
    assert h.plumbing.pod_iface("x", "a") in h.plumbing.veths
    assert h.handle_exists(CID) and not h.handle_exists("old" * 10)


# -- CHECK ---------------------------------------------------------------------------------------

def test_check_compares_prev_result_with_the_pod() -> None:
    h = Harness()
    prev = h.request("ADD")["result"]
    assert h.request("CHECK", prevResult=prev) == {"result": {}}

    wrong_ip = json.loads(json.dumps(prev))
    wrong_ip["ips"][0]["address"] = "10.244.99.99/32"
    code, _ = error_of(h.request("CHECK", prevResult=wrong_ip))
    assert code == plugin.IO_FAILURE

    wrong_mac = json.loads(json.dumps(prev))
    wrong_mac["interfaces"][1]["mac"] = "02:00:00:00:00:01"
    reply = h.request("CHECK", prevResult=wrong_mac)
    assert "MAC" in reply["error"]["details"]

    h.plumbing.routes.clear()  # the host route went missing
    reply = h.request("CHECK", prevResult=prev)
    assert "no route" in reply["error"]["details"]


def test_check_needs_prev_result_and_a_version_that_has_check() -> None:
    h = Harness()
    prev = h.request("ADD")["result"]
    assert error_of(h.request("CHECK"))[0] == plugin.INVALID_CONFIG
    assert error_of(h.request("CHECK", version="0.3.1", prevResult=prev))[0] == plugin.INCOMPATIBLE_VERSION
    assert error_of(h.request("CHECK", cid="c" * 64, prevResult=prev))[0] == plugin.CONTAINER_UNKNOWN


def test_check_fails_when_the_agent_has_not_programmed_the_pod() -> None:
    h = Harness()
    prev = h.request("ADD")["result"]
    h.programmed = False
    reply = h.request("CHECK", prevResult=prev)
    assert "has not programmed" in reply["error"]["details"]


# -- STATUS --------------------------------------------------------------------------------------

def test_status_follows_the_agents_readiness() -> None:
    h = Harness()
    assert h.request("STATUS") == {"result": {}}
    h.ready_state = (False, "not in sync with the datastore")
    code, _ = error_of(h.request("STATUS"))
    assert code == plugin.NOT_AVAILABLE


# -- GC ------------------------------------------------------------------------------------------

def test_gc_removes_only_this_networks_stale_attachments() -> None:
    h = Harness()
    h.request("ADD", cid=CID, pod="a")                                     # stale, this network
    h.request("ADD", cid="b" * 64, pod="b", netns="/run/netns/sandbox-b")  # still valid
    # The same container on another network, on another interface: not this network's.
    h.request("ADD", cid=CID, pod="a", ifname="net1", network="other-net")
    valid = [{"containerID": "b" * 64, "ifname": "eth0"}]
    assert h.request("GC", **{"cni.dev/valid-attachments": valid}) == {"result": {}}
    assert h.endpoint("a") is None and not h.handle_exists(CID)
    assert h.endpoint("b") is not None and h.handle_exists("b" * 64)
    assert h.endpoint("a", "net1") is not None and h.handle_exists(CID, "other-net")
    assert h.plumbing.pod_iface("x", "b") in h.plumbing.veths


def test_gc_matches_attachments_by_container_and_interface() -> None:
    h = Harness()
    h.request("ADD", cid=CID, pod="a")
    # Listed with another interface name: this attachment is not in the set.
    assert h.request("GC", **{"cni.dev/valid-attachments": [{"containerID": CID, "ifname": "net9"}]}) == {
        "result": {}}
    assert h.endpoint("a") is None and not h.handle_exists(CID)


def test_gc_leaves_other_nodes_and_releases_handles_without_an_endpoint() -> None:
    h = Harness()
    other = CNIHandler(store=h.store, node_name="n2", mtu=1450, node_labels=dict,
                       wait_programmed=lambda *a: True, ready=lambda: (True, ""),
                       plumbing=FakePlumbing([NETNS]))
    OPEN.append(other)
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "d" * 64, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=d"}
    assert "result" in other.handle({"env": env, "config": {"cniVersion": "1.0.0", "name": "k8s-pod-network"}})
    # An ADD that died between IPAM and the endpoint left a handle of this network on this node.
    h.handler.ipam.auto_assign(handle=names.ipam_handle("e" * 64), attrs={"node": NODE, "pod": "e"},
                               node=NODE)
    assert h.request("GC", **{"cni.dev/valid-attachments": []}) == {"result": {}}
    assert not h.handle_exists("e" * 64)
    assert h.handle_exists("d" * 64)
    assert h.store.get(keys.resource_key("workloadendpoints", "n2-k8s-d-eth0", "x"))


def test_gc_never_takes_an_address_from_an_add_under_way() -> None:
    h = Harness()
    gc_reply: list[dict[str, Any]] = []
    h.wait_hook = lambda: gc_reply.append(h.request("GC", **{"cni.dev/valid-attachments": []}))
    assert "result" in h.request("ADD")
    assert gc_reply == [{"result": {}}]
    assert h.endpoint() is not None and h.handle_exists()


def test_gc_refuses_a_malformed_attachment_list() -> None:
    h = Harness()
    code, _ = error_of(h.request("GC", **{"cni.dev/valid-attachments": "nope"}))
    assert code == plugin.INVALID_CONFIG


# -- DELs the plugin left for the agent ----------------------------------------------------------

def test_pending_dels_are_finished_and_removed(tmp_path: Any) -> None:
    h = Harness()
    h.request("ADD")
    pending = tmp_path / "agent.sock.pending"
    pending.mkdir()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": CID, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"}
    (pending / "a.eth0.json").write_text(json.dumps({"env": env, "config": {"cniVersion": "1.0.0"}}))
    (pending / "bad.json").write_text("{not json")
    (pending / "add.json").write_text(json.dumps({"env": dict(env, CNI_COMMAND="ADD"), "config": {}}))
    (pending / ".half.json.tmp").write_text("{")  # a plugin still writing: not ours yet
    assert h.handler.replay_pending(str(pending)) == 1
    assert sorted(os.listdir(pending)) == [".half.json.tmp"]
    assert h.endpoint() is None and not h.handle_exists()


def test_a_pending_del_that_fails_is_kept_for_the_next_scan(tmp_path: Any) -> None:
    h = Harness()
    pending = tmp_path / "p"
    pending.mkdir()
    env = {"CNI_COMMAND": "DEL", "CNI_CONTAINERID": CID, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"}
    (pending / "a.json").write_text(json.dumps({"env": env, "config": {"cniVersion": "1.0.0"}}))
    h.store.available = False
    assert h.handler.replay_pending(str(pending)) == 0
    assert os.listdir(pending) == ["a.json"]
    h.store.available = True
    assert h.handler.replay_pending(str(pending)) == 1


def test_an_undelivered_add_is_undone() -> None:
    h = Harness()
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": CID, "CNI_NETNS": NETNS, "CNI_IFNAME": "eth0",
           "CNI_ARGS": "K8S_POD_NAMESPACE=x;K8S_POD_NAME=a"}
    raw = {"env": env, "config": {"cniVersion": "1.0.0"}}
    assert "result" in h.handler.handle(raw)
    h.handler.undo(raw)
    assert h.plumbing.veths == {} and h.endpoint() is None and not h.handle_exists()


def test_concurrent_adds_on_one_node_get_distinct_addresses() -> None:
    h = Harness()
    sandboxes = [f"/run/netns/s{i}" for i in range(8)]
    h.plumbing.sandboxes.update(sandboxes)
    replies: list[dict[str, Any]] = []

    def add(i: int) -> None:
        replies.append(h.request("ADD", cid=f"{i:064x}", pod=f"p{i}", netns=sandboxes[i]))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    ips = [r["result"]["ips"][0]["address"] for r in replies]
    assert len(ips) == 8 and len(set(ips)) == 8
