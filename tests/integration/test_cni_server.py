"""The CNI server's handler against the real kernel and a real etcd (root): what an ADD leaves
behind when it fails, the host route it writes, CHECK against prevResult, DEL's sandbox identity.

The handler runs in a thread inside a throw-away "node" namespace, as in the agent; the agent's
loop is played by the `wait_programmed` callback (this file tests the CNI side; the loop's side
of the hand-over is tests/unit/test_agent_loop.py, the whole is tests/e2e).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest

from felixpy import names
from felixpy.cni import plugin
from felixpy.cni.server import CNIHandler
from felixpy.datastore import keys
from felixpy.datastore.api import NotFound
from felixpy.ipam.block import Block
from felixpy.kernel import netns

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

T = TypeVar("T")
NODE = "n1"


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True, timeout=10).stdout


class Node:
    """A node namespace with an uplink, pod sandboxes, and a CNIHandler living in the node."""

    def __init__(self, store: Any) -> None:
        self.prefix = "fxc" + secrets.token_hex(3)[:5]
        self.ns = f"{self.prefix}n"
        self.namespaces: list[str] = []
        self.store = store
        self.programmed = True
        self.adopted: list[Any] = []
        self.handler: CNIHandler | None = None

    def add_ns(self, name: str) -> str:
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        return f"/run/netns/{name}"

    def sandbox(self, i: int) -> str:
        return self.add_ns(f"{self.prefix}p{i}")

    def on_node(self, fn: Callable[[], T]) -> T:
        return netns.run_in_netns(f"/run/netns/{self.ns}", fn)

    def start(self) -> None:
        def make() -> CNIHandler:
            return CNIHandler(store=self.store, node_name=NODE, mtu=1450, node_labels=dict,
                              wait_programmed=lambda key, rev, timeout: self.programmed,
                              ready=lambda: (self.programmed, "" if self.programmed else "loop stuck"),
                              adopt_routes=lambda routes, hold, iface: self.adopted.extend(routes),
                              iface_prefix="cali", add_deadline=1.0)
        self.handler = self.on_node(make)

    def cni(self, command: str, *, cid: str, netns_path: str, pod: str, **config: Any) -> dict[str, Any]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns_path, "CNI_IFNAME": "eth0",
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={self.prefix};K8S_POD_NAME={pod}"}
        raw = {"env": env, "config": {"cniVersion": "1.0.0", "name": "k8s-pod-network", **config}}
        assert self.handler is not None
        handler = self.handler
        return self.on_node(lambda: handler.handle(raw))

    def host_iface(self, pod: str) -> str:
        return names.workload_iface_name(self.prefix, pod)

    def close(self) -> None:
        if self.handler is not None:
            self.handler.close()
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def node(etcd_store: Any) -> Iterator[Node]:
    node = Node(etcd_store)
    try:
        node.add_ns(node.ns)
        sh("ip", "-n", node.ns, "link", "add", f"{node.prefix}u", "type", "veth", "peer", "name", f"{node.prefix}v")
        sh("ip", "-n", node.ns, "link", "set", f"{node.prefix}u", "up")
        sh("ip", "-n", node.ns, "addr", "add", "192.0.2.1/24", "dev", f"{node.prefix}u")
        sh("ip", "-n", node.ns, "route", "add", "default", "via", "192.0.2.254")
        etcd_store.create(keys.resource_key("ippools", "p"), {
            "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "p"},
            "spec": {"cidr": "10.244.0.0/16", "blockSize": 26}})
        node.start()
        yield node
    finally:
        node.close()


def allocated(store: Any) -> list[str]:
    kvs, _ = store.list(keys.block_prefix(4))
    return [str(a.ip) for kv in kvs for a in Block.from_json(kv.value).allocated()]


def test_add_that_cannot_confirm_leaves_nothing_behind(node: Node) -> None:
    node.programmed = False
    sandbox = node.sandbox(0)
    cid = secrets.token_hex(32)
    reply = node.cni("ADD", cid=cid, netns_path=sandbox, pod="a")
    assert reply["error"]["code"] == plugin.TRY_AGAIN_LATER, reply
    assert "loop stuck" in reply["error"]["details"]
    # The kernel: no veth on either side, so no route either (it was written, then went with it).
    assert node.adopted, "the route was written and handed over before the endpoint"
    assert sh("ip", "-n", node.ns, "link", "show", node.host_iface("a"), check=False) == ""
    assert "eth0" not in sh("ip", "-n", os.path.basename(sandbox), "link", "show")
    assert sh("ip", "-n", node.ns, "route", "show", "proto", str(names.ROUTE_PROTO)) == ""
    # The datastore: no endpoint, no handle, no address.
    with pytest.raises(NotFound):
        node.store.get(keys.resource_key("workloadendpoints", names.workload_endpoint_name(NODE, "a"),
                                         node.prefix))
    with pytest.raises(NotFound):
        node.store.get(keys.handle_key(names.ipam_handle(cid)))
    assert allocated(node.store) == []


def test_add_writes_the_host_route_and_check_compares_prev_result(node: Node) -> None:
    sandbox = node.sandbox(0)
    cid = secrets.token_hex(32)
    prev = node.cni("ADD", cid=cid, netns_path=sandbox, pod="a")["result"]
    ip = prev["ips"][0]["address"].split("/")[0]
    iface = node.host_iface("a")
    route = sh("ip", "-n", node.ns, "route", "show", f"{ip}/32", "proto", str(names.ROUTE_PROTO))
    assert f"dev {iface} scope link" in route
    assert [r.dst for r in node.adopted] == [f"{ip}/32"]
    # The pod is plumbed and routed: traffic both ways.
    sh("ip", "netns", "exec", node.ns, "ping", "-c1", "-W2", ip)
    sh("ip", "netns", "exec", os.path.basename(sandbox), "ping", "-c1", "-W2", "192.0.2.1")

    assert node.cni("CHECK", cid=cid, netns_path=sandbox, pod="a", prevResult=prev) == {"result": {}}
    other = json.loads(json.dumps(prev))
    other["interfaces"][1]["mac"] = "02:00:00:00:00:01"
    assert "MAC" in node.cni("CHECK", cid=cid, netns_path=sandbox, pod="a", prevResult=other)["error"]["details"]
    sh("ip", "-n", node.ns, "route", "del", f"{ip}/32")
    details = node.cni("CHECK", cid=cid, netns_path=sandbox, pod="a", prevResult=prev)["error"]["details"]
    assert f"no route {ip}/32 dev {iface}" in details

    assert node.cni("DEL", cid=cid, netns_path=sandbox, pod="a") == {"result": {}}
    assert sh("ip", "-n", node.ns, "link", "show", iface, check=False) == ""
    assert allocated(node.store) == []


def test_a_route_of_another_owner_fails_the_add_cleanly(node: Node) -> None:
    sandbox = node.sandbox(0)
    # The pool's first address is what IPAM hands out first here: someone else routes it.
    node.store.create(keys.resource_key("ippools", "q"), {
        "apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": "q"},
        "spec": {"cidr": "10.245.0.0/26", "blockSize": 26}})
    node.store.delete(keys.resource_key("ippools", "p"))
    sh("ip", "-n", node.ns, "route", "add", "blackhole", "10.245.0.0/26", "proto", "static")
    for last in range(64):
        sh("ip", "-n", node.ns, "route", "add", f"10.245.0.{last}/32", "dev", f"{node.prefix}u", "proto",
           "static")
    cid = secrets.token_hex(32)
    reply = node.cni("ADD", cid=cid, netns_path=sandbox, pod="a", mtu=1400)
    assert reply["error"]["code"] == plugin.IO_FAILURE, reply
    assert "a route of another owner exists" in reply["error"]["details"]
    assert sh("ip", "-n", node.ns, "route", "show", "proto", str(names.ROUTE_PROTO)) == ""
    assert len(sh("ip", "-n", node.ns, "route", "show", "proto", "static").splitlines()) == 65
    assert allocated(node.store) == []
    assert sh("ip", "-n", node.ns, "link", "show", node.host_iface("a"), check=False) == ""


def test_late_del_of_an_old_sandbox_keeps_the_new_sandboxs_veth(node: Node) -> None:
    old_sandbox, new_sandbox = node.sandbox(0), node.sandbox(1)
    old_cid, new_cid = secrets.token_hex(32), secrets.token_hex(32)
    assert "result" in node.cni("ADD", cid=old_cid, netns_path=old_sandbox, pod="a")
    # The runtime replaced the sandbox (same pod, same host-side name) before the old DEL came.
    new = node.cni("ADD", cid=new_cid, netns_path=new_sandbox, pod="a")["result"]
    assert node.cni("DEL", cid=old_cid, netns_path=old_sandbox, pod="a") == {"result": {}}
    ip = new["ips"][0]["address"].split("/")[0]
    assert node.host_iface("a") in sh("ip", "-n", node.ns, "link", "show", node.host_iface("a"))
    sh("ip", "netns", "exec", node.ns, "ping", "-c1", "-W2", ip)
    assert allocated(node.store) == [ip]


def test_host_route_value_is_the_route_drivers(node: Node) -> None:
    """The CNI path and the route driver must write the same route, or the loop would flap it."""
    from felixpy.dataplane.drivers.routes import RouteTable
    from felixpy.kernel.netlink import Netlink
    from felixpy.messages import Route

    sandbox = node.sandbox(0)
    result = node.cni("ADD", cid=secrets.token_hex(32), netns_path=sandbox, pod="a")["result"]
    ip = result["ips"][0]["address"].split("/")[0]

    def driver_apply() -> Any:
        with Netlink() as nl:
            table = RouteTable(netlink=nl)
            table.adopt(node.adopted, hold=5.0)
            table.set_routes([Route(f"{ip}/32", iface=node.host_iface("a"))])
            return table.apply()

    outcome = node.on_node(driver_apply)
    assert not outcome.changed and outcome.failed == {}, outcome
    # A driver that did not know the route reads it back and also finds it right.
    def fresh_apply() -> Any:
        with Netlink() as nl:
            table = RouteTable(netlink=nl)
            table.set_routes([Route(f"{ip}/32", iface=node.host_iface("a"))])
            return table.apply()

    outcome = node.on_node(fresh_apply)
    assert not outcome.changed and outcome.failed == {}, outcome
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/16")


def test_repeated_add_reuses_its_address_and_leaks_nothing(node: Node) -> None:
    sandbox = node.sandbox(0)
    cid = secrets.token_hex(32)
    first = node.cni("ADD", cid=cid, netns_path=sandbox, pod="a")["result"]
    second = node.cni("ADD", cid=cid, netns_path=sandbox, pod="a")["result"]
    assert first["ips"] == second["ips"]
    assert allocated(node.store) == [first["ips"][0]["address"].split("/")[0]]
    from felixpy.ipam import check as ipam_check

    assert ipam_check.check(node.store).problems == ()
