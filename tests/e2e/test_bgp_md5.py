"""BGP MD5 passwords from Secrets, and their rotation without a restart, on the mesh and on reflectors.

The lab gives every node FELIXPY_SECRETS_DIR=<node dir>/secrets, laid out like a mounted secret
volume. Two labs, both with the agents logging at DEBUG:

* mesh (2 nodes): BGPConfiguration default names {secretKeyRef: {name: bgp, key: mesh-password}};
  each agent writes the password (base64) into its exabgp.conf and the sessions come back with
  TCP MD5. Then the Secret is rotated on every node: the sessions are Established again with the
  new password, a ping between the pods loses nothing, and no process was restarted.
* reflectors (2 nodes, 1 BIRD reflector, mesh off): the lab's BGPPeer to the reflector gets a
  password Secret; the reflector's BIRD and the nodes' ExaBGP both use it, and a rotation keeps
  every reflector session Established afterwards with the same BIRD, ExaBGP and agent processes.

Last, every log file both labs wrote is searched for every password, plain and base64.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.e2e.labtools import Lab, finish_ping, skip_reason, start_ping, wait_for

pytestmark = pytest.mark.e2e

MESH_NODES = ["n1", "n2"]
RR_NODES = ["n1", "n2", "rr1"]
PODS = {"m/p1": "n1", "m/p2": "n2"}
MESH_PASSWORDS = ("felixpy-e2e-mesh", "felixpy-e2e-mesh-rotated")
RR_PASSWORDS = ("felixpy-e2e-reflector", "felixpy-e2e-reflector-rotated")

BGP_CONFIGURATION = {
    "apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
    "spec": {"nodeToNodeMeshEnabled": True,
             "nodeMeshPassword": {"secretKeyRef": {"name": "bgp", "key": "mesh-password"}}},
}
# The lab's own peering with its reflectors (felixpy/lab/cli.py), now with a password.
RR_PEER = {
    "apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": "peer-with-route-reflectors"},
    "spec": {"nodeSelector": "all()", "peerSelector": "route-reflector == 'true'",
             "password": {"secretKeyRef": {"name": "bgp-rr", "key": "password"}}},
}


def _up(nodes: int, *extra: str) -> Lab:
    lab = Lab("e2e" + secrets.token_hex(2))
    # DEBUG: the log check at the end should see everything the agents can say.
    env = {**os.environ, "FELIX_LOGSEVERITYSCREEN": "DEBUG"}
    argv = [sys.executable, "-m", "felixpy.lab.cli", "up", "--nodes", str(nodes), "--mode", "bgp", *extra,
            "--name", lab.name]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, env=env)
    if done.returncode != 0:
        _down(lab)
        raise AssertionError(f"lab up failed:\n{done.stdout}\n{done.stderr}")
    return lab


def _down(lab: Lab) -> None:
    subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "down", "--name", lab.name],
                   capture_output=True, text=True, timeout=60)


def _fixture(nodes: int, names: list[str], *extra: str) -> Iterator[Lab]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = _up(nodes, *extra)
    try:
        yield lab
    except BaseException:
        for node in names:
            sys.stderr.write(f"--- agent log {node} ---\n{lab.agent_log(node)}\n")
        raise
    finally:
        _down(lab)


@pytest.fixture(scope="module")
def mesh_lab() -> Iterator[Lab]:
    yield from _fixture(len(MESH_NODES), MESH_NODES)


@pytest.fixture(scope="module")
def rr_lab() -> Iterator[Lab]:
    yield from _fixture(2, RR_NODES, "--route-reflectors", "1")


def _sessions(lab: Lab) -> dict[str, list[dict[str, object]]]:
    return {n["name"]: n["bgp"] for n in lab.json("status")["nodes"]}


def _established_since(lab: Lab, since: float, expected: dict[str, int]) -> bool:
    sessions = _sessions(lab)
    return all(len(sessions.get(node, [])) == count
               and all(r["state"] == "Established" and float(str(r["since"])) >= since for r in sessions[node])
               for node, count in expected.items())


def _node_dir(lab: Lab, node: str) -> Path:
    return Path(f"/run/felixpy-lab/{lab.name}/{node}")


def _write_secret(lab: Lab, nodes: list[str], name: str, key: str, value: str) -> None:
    """What the kubelet does to a mounted secret volume: the new file replaces the old atomically."""
    for node in nodes:
        directory = _node_dir(lab, node) / "secrets" / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f".{key}.tmp").write_text(value)
        os.replace(directory / f".{key}.tmp", directory / key)


def _apply(lab: Lab, doc: dict[str, object]) -> None:
    done = subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "apply", "-f", "-", "--name", lab.name],
                          input=json.dumps(doc), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _md5(password: str) -> str:
    return f"md5-password {base64.b64encode(password.encode()).decode()};"


def _exabgp_conf(lab: Lab, node: str) -> str:
    return (_node_dir(lab, node) / "exabgp" / "exabgp.conf").read_text()


def _bird_conf(lab: Lab, node: str) -> str:
    return (_node_dir(lab, node) / "bird" / "bird.conf").read_text()


def _pids(lab: Lab) -> dict[str, tuple[int, int, int]]:
    return {n["name"]: (n.get("agent_pid", 0), n.get("exabgp_pid", 0), n.get("bird_pid", 0))
            for n in lab.state()["nodes"]}


def test_mesh_password_from_secret_files(mesh_lab: Lab) -> None:
    lab = mesh_lab
    lab.cli("ns", "add", "m")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node)
    mesh = {n: len(MESH_NODES) - 1 for n in MESH_NODES}
    wait_for("mesh sessions Established", lambda: _established_since(lab, 0.0, mesh), timeout=30)
    assert all("md5" not in _exabgp_conf(lab, n) for n in MESH_NODES)

    _write_secret(lab, MESH_NODES, "bgp", "mesh-password", MESH_PASSWORDS[0])
    applied_at = time.time()
    _apply(lab, BGP_CONFIGURATION)
    wait_for("md5-password in every exabgp.conf",
             lambda: all(_md5(MESH_PASSWORDS[0]) in _exabgp_conf(lab, n) for n in MESH_NODES), timeout=10,
             interval=0.1)
    assert all(MESH_PASSWORDS[0] not in _exabgp_conf(lab, n) for n in MESH_NODES)  # only ever base64
    took = wait_for("sessions Established again with MD5", lambda: _established_since(lab, applied_at, mesh),
                    timeout=30, interval=0.2)
    print(f"md5 sessions re-established in {took:.1f} s")

    data = lab.json("matrix", "--protos", "icmp")
    for src, row in data["results"]["icmp"].items():
        blocked = [dst for dst, ok in row.items() if not ok]
        assert not blocked, f"icmp: {src} cannot reach {blocked}"


def test_rotated_mesh_password_reaches_exabgp_without_a_restart(mesh_lab: Lab) -> None:
    lab = mesh_lab
    mesh = {n: len(MESH_NODES) - 1 for n in MESH_NODES}
    pids = _pids(lab)
    ping = start_ping(lab, "m/p1", lab.pod_ip("m/p2"), interval=0.05, count=200)  # 10 s
    time.sleep(1)
    rotated_at = time.time()
    _write_secret(lab, MESH_NODES, "bgp", "mesh-password", MESH_PASSWORDS[1])
    wait_for("the rotated password in every exabgp.conf",
             lambda: all(_md5(MESH_PASSWORDS[1]) in _exabgp_conf(lab, n) for n in MESH_NODES), timeout=10,
             interval=0.1)
    took = wait_for("mesh sessions Established with the new password",
                    lambda: _established_since(lab, rotated_at, mesh), timeout=30, interval=0.2)
    print(f"mesh sessions Established with the rotated password {took:.1f} s after the rotation")
    sent, received = finish_ping(ping, timeout=30)
    print(f"ping during the rotation: {received}/{sent}")
    assert sent == 200 and received == sent, f"lost {sent - received} of {sent} packets during the rotation"
    assert _pids(lab) == pids, "a process was restarted"
    time.sleep(3)  # and they stay up (a positive state read after the wait, not an absence)
    assert _established_since(lab, rotated_at, mesh)


def test_rotated_reflector_password_keeps_bird_and_exabgp_running(rr_lab: Lab) -> None:
    lab = rr_lab
    sessions = {"n1": 1, "n2": 1, "rr1": 2}
    wait_for("reflector sessions Established", lambda: _established_since(lab, 0.0, sessions), timeout=30)
    pids = _pids(lab)
    _write_secret(lab, RR_NODES, "bgp-rr", "password", RR_PASSWORDS[0])
    applied_at = time.time()
    _apply(lab, RR_PEER)
    want_bird = f'password "{RR_PASSWORDS[0]}";'
    wait_for("the password on both sides", lambda: _bird_conf(lab, "rr1").count(want_bird) == 2 and all(
        _md5(RR_PASSWORDS[0]) in _exabgp_conf(lab, n) for n in ("n1", "n2")), timeout=10, interval=0.1)
    wait_for("reflector sessions Established with MD5", lambda: _established_since(lab, applied_at, sessions),
             timeout=30, interval=0.2)

    rotated_at = time.time()
    _write_secret(lab, RR_NODES, "bgp-rr", "password", RR_PASSWORDS[1])
    want_bird = f'password "{RR_PASSWORDS[1]}";'
    wait_for("the rotated password on both sides", lambda: _bird_conf(lab, "rr1").count(want_bird) == 2 and all(
        _md5(RR_PASSWORDS[1]) in _exabgp_conf(lab, n) for n in ("n1", "n2")), timeout=10, interval=0.1)
    took = wait_for("reflector sessions Established with the rotated password",
                    lambda: _established_since(lab, rotated_at, sessions), timeout=30, interval=0.2)
    print(f"reflector sessions Established with the rotated password {took:.1f} s after the rotation")
    assert _pids(lab) == pids, "BIRD, ExaBGP or an agent was restarted"
    time.sleep(3)
    assert _established_since(lab, rotated_at, sessions)


def test_no_password_in_any_log_line(mesh_lab: Lab, rr_lab: Lab) -> None:
    needles = set()
    for password in (*MESH_PASSWORDS, *RR_PASSWORDS):
        needles |= {password, base64.b64encode(password.encode()).decode()}
    searched = 0
    for lab in (mesh_lab, rr_lab):
        root = Path(f"/run/felixpy-lab/{lab.name}")
        for path in root.rglob("*"):
            # The speakers' configuration files and the secret volume itself hold them by design.
            if not path.is_file() or "secrets" in path.relative_to(root).parts or \
                    path.name in ("exabgp.conf", "bird.conf"):
                continue
            if path.suffix not in (".log", ".out") and path.name not in ("agent.log",):
                continue
            text = path.read_text(errors="replace")
            searched += len(text.splitlines())
            found = [n for n in needles if n in text]
            assert not found, f"{path} contains a BGP password"
    assert searched > 1000, f"only {searched} log lines: the agents did not log at DEBUG?"
    print(f"{searched} log lines searched, no password in any")
