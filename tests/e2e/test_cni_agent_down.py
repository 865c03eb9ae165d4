"""The CNI plugins when the agent is stopped or hung, against a live lab (both plugins).

STATUS says 50 and ADD fails within seconds; DEL still succeeds (the plugin removes the pod's
veth itself) and the agent, once back, releases the address and deletes the endpoint; an ADD the
agent only gets to after the plugin gave up is undone. Every wait here ends on a positive event.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import tempfile
import time
from typing import Iterator

import pytest

from felixpy.cni import install, plugin
from tests.e2e.labtools import Lab, wait_for

pytestmark = pytest.mark.e2e
LAB_NODES = 2


@pytest.fixture(scope="module")
def plugins(lab: Lab) -> Iterator[dict[str, str]]:
    lab.cli("ns", "add", "d")
    lab.cli("pod", "add", "d/seed", "--node", "n1")  # also builds the lab's C plugin
    with tempfile.TemporaryDirectory(prefix="fxe2e-cni-") as tmp:
        yield {"c": f"/run/felixpy-lab/{lab.name}/cni-bin/felixpy", "python": install.install_plugin(tmp)}


def socket_path(lab: Lab) -> str:
    return f"/run/felixpy-lab/{lab.name}/n1/cni.sock"


def cni(lab: Lab, plugin_path: str, command: str, cid: str, netns: str, pod: str,
        network: str = "k8s-pod-network") -> tuple[int, dict, float]:
    conf = {"cniVersion": "1.1.0", "name": network, "type": "felixpy",
            "agent_socket": socket_path(lab), "mtu": 0}
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": cid, "CNI_NETNS": netns, "CNI_IFNAME": "eth0",
           "CNI_PATH": "/usr/lib/cni", "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=d;K8S_POD_NAME={pod}",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    started = time.monotonic()
    done = subprocess.run(["ip", "netns", "exec", f"{lab.name}-n1", plugin_path], input=json.dumps(conf),
                          env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {}), took


def ip(netns_name: str, *args: str) -> str:
    """`ip -n` in one of this lab's namespaces; empty output when the object does not exist."""
    return subprocess.run(["ip", "-n", netns_name, *args], capture_output=True, text=True, timeout=10).stdout


def agent_log(lab: Lab) -> str:
    with open(f"/run/felixpy-lab/{lab.name}/n1/agent.log", errors="replace") as f:
        return f.read()


def ipam_state(lab: Lab, ip: str) -> str:
    return lab.cli("exec", "n2", "--", "felixctl", "ipam", "show", f"--ip={ip}").stdout


def ipam_clean(lab: Lab) -> bool:
    return "found 0 problems" in lab.cli("exec", "n2", "--", "felixctl", "ipam", "check").stdout


def endpoint_pods(lab: Lab) -> set[str]:
    out = json.loads(lab.cli("exec", "n2", "--", "felixctl", "get", "workloadendpoints", "-n", "d",
                             "-o", "json").stdout)
    items = out.get("items", [out]) if isinstance(out, dict) else out
    return {item["spec"]["pod"] for item in items if item}


class Sandbox:
    def __init__(self, lab: Lab, pod: str) -> None:
        self.name = f"{lab.name}-d-{pod}"
        self.path = f"/run/netns/{self.name}"
        self.cid = secrets.token_hex(32)
        self.pod = pod
        subprocess.run(["ip", "netns", "add", self.name], check=True)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def sandboxes(lab: Lab) -> Iterator[list[Sandbox]]:
    made: list[Sandbox] = []
    yield made
    for box in made:
        box.close()


@pytest.mark.parametrize("which", ["c", "python"])
def test_status_add_and_del_with_the_agent_stopped(which: str, lab: Lab, plugins: dict[str, str],
                                                   sandboxes: list[Sandbox]) -> None:
    box = Sandbox(lab, f"gone-{which}")
    sandboxes.append(box)
    rc, added, _ = cni(lab, plugins[which], "ADD", box.cid, box.path, box.pod)
    assert rc == 0, added
    address = added["ips"][0]["address"].split("/")[0]
    host_iface = added["interfaces"][0]["name"]
    assert "in use" in ipam_state(lab, address)
    lab.cli("agent", "stop", "n1")
    try:
        rc, status, took = cni(lab, plugins[which], "STATUS", "", "", "")
        assert (rc, status["code"]) == (1, plugin.NOT_AVAILABLE) and took < 2, (status, took)
        other = Sandbox(lab, f"new-{which}")
        sandboxes.append(other)
        rc, failed, took = cni(lab, plugins[which], "ADD", other.cid, other.path, other.pod)
        assert (rc, failed["code"]) == (1, plugin.TRY_AGAIN_LATER) and took < 2, (failed, took)
        assert failed["msg"] == "felixpy agent is not reachable"

        rc, deleted, _ = cni(lab, plugins[which], "DEL", box.cid, box.path, box.pod)
        assert (rc, deleted) == (0, {})
        node = f"{lab.name}-n1"
        assert ip(node, "link", "show", host_iface) == "" and "eth0" not in ip(box.name, "link")
        assert ip(node, "route", "show", f"{address}/32") == ""
        pending = socket_path(lab) + plugin.PENDING_SUFFIX
        assert os.listdir(pending) == [f"{box.cid}.eth0.json"]
        assert "in use" in ipam_state(lab, address)  # kept until the agent can release it
        rc, deleted, _ = cni(lab, plugins[which], "DEL", box.cid, box.path, box.pod)
        assert (rc, deleted) == (0, {})  # idempotent
    finally:
        lab.cli("agent", "start", "n1")
    # The agent finishes the DEL as it starts serving again.
    wait_for("address released", lambda: "not assigned" in ipam_state(lab, address), timeout=30)
    assert os.listdir(socket_path(lab) + plugin.PENDING_SUFFIX) == []
    assert box.pod not in endpoint_pods(lab)
    rc, status, _ = cni(lab, plugins[which], "STATUS", "", "", "")
    assert rc == 0, status
    assert ipam_clean(lab)


def test_a_hung_agent_fails_add_fast_and_undoes_it_when_it_wakes(lab: Lab, plugins: dict[str, str],
                                                                 sandboxes: list[Sandbox]) -> None:
    box = Sandbox(lab, "hung")
    sandboxes.append(box)
    agent_pid = lab.state()["nodes"][0]["agent_pid"]
    os.kill(agent_pid, signal.SIGSTOP)
    try:
        rc, failed, took = cni(lab, plugins["c"], "ADD", box.cid, box.path, box.pod)
    finally:
        os.kill(agent_pid, signal.SIGCONT)
    assert (rc, failed["code"]) == (1, plugin.TRY_AGAIN_LATER), failed
    assert f"did not accept the request within {plugin.ACCEPT_TIMEOUT} s" in failed["details"]
    assert plugin.ACCEPT_TIMEOUT - 0.5 < took < plugin.ACCEPT_TIMEOUT + 3, took
    # The kernel had queued the connection. The awake agent finds the plugin gone: it drops the
    # request unread, or (had the plugin closed a moment later) does the ADD and takes it back.
    def settled() -> bool:
        log = agent_log(lab)
        dropped = f"plugin had given up waiting command=ADD container={box.cid[:12]}" in log
        undone = f"undoing it container={box.cid[:12]}" in log and "eth0" not in ip(box.name, "link")
        return dropped or undone

    wait_for("the abandoned ADD dropped or undone", settled, timeout=30)
    wait_for("no endpoint left", lambda: "hung" not in endpoint_pods(lab), timeout=15)
    wait_for("nothing of it left in IPAM", lambda: ipam_clean(lab), timeout=15)


def test_gc_keeps_valid_attachments_and_removes_stale_ones(lab: Lab, plugins: dict[str, str],
                                                           sandboxes: list[Sandbox]) -> None:
    keep, stale, other = Sandbox(lab, "keep"), Sandbox(lab, "stale"), Sandbox(lab, "other")
    sandboxes.extend([keep, stale, other])
    ips = {}
    for box in (keep, stale, other):
        # "other" is attached by another network (its handle `other-net.<id>`): not in the GC's
        # list, yet not this network's to remove.
        network = "other-net" if box is other else "k8s-pod-network"
        rc, added, _ = cni(lab, plugins["c"], "ADD", box.cid, box.path, box.pod, network)
        assert rc == 0, added
        ips[box.pod] = added["ips"][0]["address"].split("/")[0]
    seed = next(p for p in lab.state()["pods"] if p["name"] == "seed")
    valid = [{"containerID": keep.cid, "ifname": "eth0"}, {"containerID": seed["container_id"], "ifname": "eth0"}]
    conf = {"cniVersion": "1.1.0", "name": "k8s-pod-network", "type": "felixpy",
            "agent_socket": socket_path(lab), "cni.dev/valid-attachments": valid}
    done = subprocess.run(["ip", "netns", "exec", f"{lab.name}-n1", plugins["python"]], input=json.dumps(conf),
                          env={"CNI_COMMAND": "GC", "CNI_PATH": "/usr/lib/cni"}, capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stdout) == (0, ""), done
    assert "not assigned" in ipam_state(lab, ips["stale"])
    assert "in use" in ipam_state(lab, ips["keep"]) and "in use" in ipam_state(lab, lab.pod_ip("d/seed"))
    assert ip(f"{lab.name}-n1", "route", "show", f"{ips['stale']}/32") == ""
    assert "stale" not in endpoint_pods(lab) and "keep" in endpoint_pods(lab)
    # The other network's attachment is untouched: address, endpoint, route and veth.
    assert "in use" in ipam_state(lab, ips["other"]) and "other" in endpoint_pods(lab)
    assert f"{ips['other']} dev cali" in ip(f"{lab.name}-n1", "route", "show", f"{ips['other']}/32")
    assert "eth0" in ip(other.name, "link", "show", "eth0")
    for box, network in ((keep, "k8s-pod-network"), (other, "other-net")):
        assert cni(lab, plugins["c"], "DEL", box.cid, box.path, box.pod, network)[0] == 0
    assert ipam_clean(lab)
