"""CNI edge cases against a live agent, and natOutgoing seen from a pod.

The CNI plugin is called exactly as kubelet calls it (env + stdin, inside the node's netns), with
inputs kubelet would not normally send: a sandbox whose netns is already gone, a netns that never
existed, garbage on stdin. The fabric namespace has no route back to the pod pool, so a pod can
reach the fabric's etcd only when its traffic is masqueraded: that makes natOutgoing observable.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

import pytest

from tests.e2e.labtools import Lab, wait_for

pytestmark = pytest.mark.e2e
LAB_NODES = 2
POOL = "default-ipv4-ippool"


@pytest.fixture(scope="module")
def cluster(lab: Lab) -> Lab:
    lab.cli("pod", "add", "x/a", "--node", "n1", "--serve", "tcp:80")
    lab.cli("pod", "add", "x/b", "--node", "n2", "--serve", "tcp:80")
    return lab


def plugin(lab: Lab) -> str:
    return f"/run/felixpy-lab/{lab.name}/cni-bin/felixpy"


def cni(lab: Lab, command: str, container_id: str, netns: str, pod: str, stdin: str | None = None,
        prev: dict | None = None) -> tuple[int, dict]:
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "felixpy",
            "agent_socket": f"/run/felixpy-lab/{lab.name}/n1/cni.sock", "mtu": 0}
    if prev is not None:
        conf["prevResult"] = prev
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
           "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
           "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=x;K8S_POD_NAME={pod}",
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    done = subprocess.run(["ip", "netns", "exec", f"{lab.name}-n1", plugin(lab)],
                          input=json.dumps(conf) if stdin is None else stdin, env=env,
                          capture_output=True, text=True, timeout=60)
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


def ipam_ip_state(lab: Lab, ip: str) -> str:
    return lab.cli("exec", "n1", "--", "felixctl", "ipam", "show", f"--ip={ip}").stdout


def ipam_check(lab: Lab) -> str:
    return lab.cli("exec", "n1", "--", "felixctl", "ipam", "check").stdout


def test_del_after_netns_is_gone_releases_and_is_idempotent(cluster: Lab) -> None:
    cid = secrets.token_hex(32)
    netns = f"{cluster.name}-x-orphan"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        rc, result = cni(cluster, "ADD", cid, f"/run/netns/{netns}", "orphan")
        assert rc == 0, result
        ip = result["ips"][0]["address"].split("/")[0]
        assert "in use" in ipam_ip_state(cluster, ip)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=True)  # the runtime already tore it down
    rc, result = cni(cluster, "DEL", cid, f"/run/netns/{netns}", "orphan")
    assert rc == 0, result
    assert "not assigned" in ipam_ip_state(cluster, ip)
    assert cluster.ip("n1", "route", "show", f"{ip}/32").strip() == ""
    rc, result = cni(cluster, "DEL", cid, f"/run/netns/{netns}", "orphan")
    assert rc == 0, result  # DEL of something already gone is success
    assert "found 0 problems" in ipam_check(cluster)


def test_failed_add_returns_cni_error_and_allocates_nothing(cluster: Lab) -> None:
    cid = secrets.token_hex(32)
    rc, result = cni(cluster, "ADD", cid, f"/run/netns/{cluster.name}-never-existed", "ghost")
    assert rc == 1
    assert set(result) >= {"cniVersion", "code", "msg", "details"}
    assert result["code"] == 5
    assert "found 0 problems" in ipam_check(cluster)  # nothing allocated, nothing leaked


def test_malformed_stdin_is_a_decode_error(cluster: Lab) -> None:
    rc, result = cni(cluster, "ADD", secrets.token_hex(32), "/run/netns/whatever", "bad", stdin="{oops")
    assert (rc, result["code"]) == (1, 6)


def test_check_reports_a_healthy_pod_and_a_broken_one(cluster: Lab) -> None:
    cid = secrets.token_hex(32)
    netns = f"{cluster.name}-x-checked"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    try:
        rc, prev = cni(cluster, "ADD", cid, f"/run/netns/{netns}", "checked")
        assert rc == 0, prev
        ip = prev["ips"][0]["address"].split("/")[0]
        rc, result = cni(cluster, "CHECK", cid, f"/run/netns/{netns}", "checked", prev=prev)
        assert rc == 0, result
        rc, result = cni(cluster, "CHECK", secrets.token_hex(32), f"/run/netns/{netns}", "checked", prev=prev)
        assert rc == 1 and result["code"] == 3
        rc, result = cni(cluster, "CHECK", cid, f"/run/netns/{netns}", "checked")
        assert rc == 1 and result["code"] == 7  # CHECK without prevResult
        cluster.ip("n1", "route", "del", f"{ip}/32")  # broken until the agent's resync repairs it
        rc, result = cni(cluster, "CHECK", cid, f"/run/netns/{netns}", "checked", prev=prev)
        assert rc == 1 and result["code"] == 5 and f"no route {ip}/32" in result["details"], result
    finally:
        assert cni(cluster, "DEL", cid, f"/run/netns/{netns}", "checked")[0] == 0
        subprocess.run(["ip", "netns", "del", netns], check=True)


def _reaches_fabric_etcd(lab: Lab) -> bool:
    # etcd listens on the fabric's 192.0.2.1:2379; the fabric has no route to the pod pool.
    done = subprocess.run(
        ["ip", "netns", "exec", lab.netns("x/a"), sys.executable, "-m", "felixpy.lab.probe",
         "--timeout", "1", "tcp:192.0.2.1:2379"], capture_output=True, text=True, timeout=20)
    return bool(json.loads(done.stdout)[0])


def _set_nat(lab: Lab, enabled: bool) -> None:
    lab.cli("exec", "n1", "--", "felixctl", "patch", "ippool", POOL, "-p",
            json.dumps({"spec": {"natOutgoing": enabled}}))


def test_nat_outgoing_masquerades_traffic_leaving_the_pools(cluster: Lab) -> None:
    assert "10.244." not in cluster.ip("fabric", "route")  # no way back without masquerade
    assert _reaches_fabric_etcd(cluster)
    try:
        _set_nat(cluster, False)
        wait_for("natOutgoing off takes effect", lambda: not _reaches_fabric_etcd(cluster), timeout=15)
        # Pod to pod across nodes is never masqueraded, NAT or not.
        assert cluster.cli("probe", "x/a", "x/b", "--port", "80").returncode == 0
    finally:
        _set_nat(cluster, True)
    wait_for("natOutgoing back on", lambda: _reaches_fabric_etcd(cluster), timeout=15)
