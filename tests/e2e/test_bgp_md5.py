"""Mode bgp with a node-to-node mesh password: a Secret file on each node, a BGPConfiguration naming it.

The lab gives every agent FELIXPY_SECRETS_DIR=<node dir>/secrets, laid out like a mounted secret
volume. Once BGPConfiguration default names {secretKeyRef: {name: bgp, key: mesh-password}}, each
agent writes the password (base64) into its exabgp.conf, the sessions come back up with TCP MD5,
and the pods still reach each other over the BGP-learned routes.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import pytest

from tests.e2e.labtools import Lab, wait_for

pytestmark = pytest.mark.e2e

LAB_NODES = 2
LAB_MODE = "bgp"
NODES = ["n1", "n2"]
PODS = {"m/p1": "n1", "m/p2": "n2"}
PASSWORD = "felixpy-e2e-mesh"

BGP_CONFIGURATION = {
    "apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
    "spec": {"nodeToNodeMeshEnabled": True,
             "nodeMeshPassword": {"secretKeyRef": {"name": "bgp", "key": "mesh-password"}}},
}


def _peers(lab: Lab) -> dict[str, list[dict[str, object]]]:
    return {n["name"]: n["bgp"] for n in lab.json("status")["nodes"]}


def _established_since(lab: Lab, since: float) -> bool:
    peers = _peers(lab)
    return all(len(rows) == LAB_NODES - 1
               and all(r["state"] == "Established" and float(str(r["since"])) >= since for r in rows)
               for rows in peers.values())


def _exabgp_conf(lab: Lab, node: str) -> str:
    with open(f"/run/felixpy-lab/{lab.name}/{node}/exabgp/exabgp.conf") as f:
        return f.read()


def test_mesh_password_from_secret_files(lab: Lab) -> None:
    lab.cli("ns", "add", "m")
    for ref, node in PODS.items():
        lab.cli("pod", "add", ref, "--node", node)
    wait_for("mesh sessions Established", lambda: _established_since(lab, 0.0), timeout=30)
    assert all("md5" not in _exabgp_conf(lab, n) for n in NODES)

    for node in NODES:
        directory = f"/run/felixpy-lab/{lab.name}/{node}/secrets/bgp"
        os.makedirs(directory, exist_ok=True)
        with open(f"{directory}/mesh-password", "w") as f:
            f.write(PASSWORD)
    applied_at = time.time()
    done = subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "apply", "-f", "-", "--name", lab.name],
                          input=json.dumps(BGP_CONFIGURATION), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr

    want = f"md5-password {base64.b64encode(PASSWORD.encode()).decode()};"
    wait_for("md5-password in every exabgp.conf",
             lambda: all(want in _exabgp_conf(lab, n) for n in NODES), timeout=10, interval=0.1)
    assert all(PASSWORD not in _exabgp_conf(lab, n) for n in NODES)  # only ever base64
    took = wait_for("sessions Established again with MD5", lambda: _established_since(lab, applied_at),
                    timeout=30, interval=0.2)
    print(f"md5 sessions re-established in {took:.1f} s")

    data = lab.json("matrix", "--protos", "icmp")
    for src, row in data["results"]["icmp"].items():
        blocked = [dst for dst, ok in row.items() if not ok]
        assert not blocked, f"icmp: {src} cannot reach {blocked}"
