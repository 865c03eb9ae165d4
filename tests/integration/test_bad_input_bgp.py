"""felixctl against a real etcd rejects bad BGP and encapsulation input: a BGPPeer with an invalid
peerIP or asNumber, an IPPool with both ipipMode and vxlanMode on. Each rejection is one line on
stderr, exit code 1, and the datastore is exactly as it was (every key, value and revision)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from felixpy.datastore import keys

pytestmark = pytest.mark.etcd

FELIXCTL = str(Path(sys.executable).parent / "felixctl")


def felixctl(endpoint: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "CALICO_", "DATASTORE_"))}
    env.update(ETCD_ENDPOINTS=endpoint, DATASTORE_TYPE="etcdv3")
    return subprocess.run([FELIXCTL, *args], env=env, capture_output=True, text=True, timeout=60, check=False)


def snapshot(store: Any) -> dict[str, Any]:
    """Every key under /calico/ with its value and modification revision."""
    items, _ = store.list(keys.ROOT)
    return {kv.key: (kv.value, kv.revision) for kv in items}


def listing(endpoint: str) -> dict[str, Any]:
    """What a user sees: `felixctl get` of the kinds these tests touch."""
    out = {}
    for kind in ("bgppeers", "ippools", "bgpconfigurations"):
        result = felixctl(endpoint, "get", kind, "-o", "json")
        assert result.returncode == 0, result.stderr
        out[kind] = json.loads(result.stdout)
    return out


def write(tmp_path: Path, name: str, docs: list[dict[str, Any]]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def peer(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": name}, "spec": spec}


def pool(name: str, cidr: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, **spec}}


@pytest.fixture
def seeded(etcd_store: Any, etcd_endpoint: str, tmp_path: Path) -> Any:
    """A datastore with a valid peer, a pool using IPIP and the global BGP configuration, so a
    rejected write has something it could have damaged."""
    docs = [
        peer("tor", peerIP="192.0.2.254", asNumber=64600),
        pool("ipip-pool", "10.70.0.0/16", ipipMode="Always"),
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": True, "asNumber": 64512}},
    ]
    result = felixctl(etcd_endpoint, "create", "-f", write(tmp_path, "seed.yaml", docs))
    assert result.returncode == 0, result.stderr
    return etcd_store


def assert_rejected(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("felixctl: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not result.stdout.strip().startswith("Successfully"), result.stdout


BAD_PEER_IPS = ["10.0.0.300", "not-an-ip", "192.0.2.1:99999", "", "192.0.2.0/24"]
BAD_AS_NUMBERS: list[Any] = ["abc", 0, -5, 4294967296, "65536.1", True]


def test_bgppeer_invalid_peer_ip_rejected(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    before, seen = snapshot(seeded), listing(etcd_endpoint)
    for i, peer_ip in enumerate(BAD_PEER_IPS):
        path = write(tmp_path, f"bad{i}.yaml", [peer("bad-ip", peerIP=peer_ip, asNumber=64601)])
        for verb in ("create", "apply"):
            assert_rejected(felixctl(etcd_endpoint, verb, "-f", path), 'BGPPeer "bad-ip"', "spec.peerIP")
    assert snapshot(seeded) == before
    assert listing(etcd_endpoint) == seen


def test_bgppeer_invalid_as_number_rejected(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    before, seen = snapshot(seeded), listing(etcd_endpoint)
    for i, as_number in enumerate(BAD_AS_NUMBERS):
        path = write(tmp_path, f"bad{i}.yaml", [peer("bad-as", peerIP="192.0.2.253", asNumber=as_number)])
        for verb in ("create", "apply"):
            assert_rejected(felixctl(etcd_endpoint, verb, "-f", path), 'BGPPeer "bad-as"', "spec.asNumber")
    assert snapshot(seeded) == before
    assert listing(etcd_endpoint) == seen


def test_bad_update_of_existing_peer_keeps_the_old_one(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    before, seen = snapshot(seeded), listing(etcd_endpoint)
    for verb in ("apply", "replace"):
        path = write(tmp_path, "bad.yaml", [peer("tor", peerIP="192.0.2.999", asNumber=64600)])
        assert_rejected(felixctl(etcd_endpoint, verb, "-f", path), 'BGPPeer "tor"', "spec.peerIP")
    result = felixctl(etcd_endpoint, "patch", "bgppeer", "tor", "-p", json.dumps({"spec": {"asNumber": "x1"}}))
    assert_rejected(result, 'BGPPeer "tor"', "spec.asNumber")
    assert snapshot(seeded) == before
    assert listing(etcd_endpoint) == seen
    stored = felixctl(etcd_endpoint, "get", "bgppeer", "tor", "-o", "json")
    assert json.loads(stored.stdout)["spec"] == {"peerIP": "192.0.2.254", "asNumber": 64600}


def test_ippool_with_ipip_and_vxlan_rejected(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    before, seen = snapshot(seeded), listing(etcd_endpoint)
    combos = [("Always", "Always"), ("CrossSubnet", "Always"), ("Always", "CrossSubnet"),
              ("CrossSubnet", "CrossSubnet")]
    for i, (ipip, vxlan) in enumerate(combos):
        path = write(tmp_path, f"bad{i}.yaml", [pool("both", "10.71.0.0/16", ipipMode=ipip, vxlanMode=vxlan)])
        for verb in ("create", "apply"):
            assert_rejected(felixctl(etcd_endpoint, verb, "-f", path), 'IPPool "both"',
                            "ipipMode and vxlanMode cannot both be enabled")
    assert snapshot(seeded) == before
    assert listing(etcd_endpoint) == seen


def test_turning_vxlan_on_in_an_ipip_pool_rejected(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    before, seen = snapshot(seeded), listing(etcd_endpoint)
    result = felixctl(etcd_endpoint, "patch", "ippool", "ipip-pool", "-p",
                      json.dumps({"spec": {"vxlanMode": "Always"}}))
    assert_rejected(result, 'IPPool "ipip-pool"', "ipipMode and vxlanMode cannot both be enabled")
    path = write(tmp_path, "bad.yaml", [pool("ipip-pool", "10.70.0.0/16", ipipMode="Always", vxlanMode="Always")])
    assert_rejected(felixctl(etcd_endpoint, "apply", "-f", path), 'IPPool "ipip-pool"')
    assert snapshot(seeded) == before
    assert listing(etcd_endpoint) == seen


def test_one_bad_document_writes_nothing(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    """All or nothing: valid resources before and after the bad one are not written either."""
    before, seen = snapshot(seeded), listing(etcd_endpoint)
    docs = [
        peer("good-1", peerIP="192.0.2.250", asNumber=64700),
        pool("good-pool", "10.72.0.0/16", vxlanMode="Always"),
        peer("bad", peerIP="192.0.2.251", asNumber="sixty-four"),
        pool("bad-pool", "10.73.0.0/16", ipipMode="Always", vxlanMode="Always"),
        peer("good-2", peerIP="192.0.2.252", asNumber=64701),
    ]
    assert_rejected(felixctl(etcd_endpoint, "apply", "-f", write(tmp_path, "mixed.yaml", docs)),
                    'BGPPeer "bad"', "spec.asNumber")
    assert snapshot(seeded) == before
    assert listing(etcd_endpoint) == seen


def test_valid_neighbours_of_the_bad_values_are_accepted(seeded: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    """The rejections above are not blanket ones: the edge values just inside the rules pass."""
    docs = [
        peer("edge-port", peerIP="192.0.2.249:1179", asNumber=4294967295),
        peer("edge-asdot", peerIP="192.0.2.248", asNumber="1.10"),
        pool("vxlan-only", "10.74.0.0/16", ipipMode="Never", vxlanMode="CrossSubnet"),
    ]
    result = felixctl(etcd_endpoint, "create", "-f", write(tmp_path, "ok.yaml", docs))
    assert result.returncode == 0, result.stderr
    peers = {p["metadata"]["name"]: p["spec"] for p in listing(etcd_endpoint)["bgppeers"]["items"]}
    assert peers["edge-port"]["asNumber"] == 4294967295
    assert peers["edge-asdot"]["asNumber"] == 65546
