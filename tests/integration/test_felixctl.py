"""felixctl as a subprocess against a real etcd: round trips, output formats, and every rejection
path leaving the datastore exactly as it was."""

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
from felixpy.model.store import apply_resources
from tests.support.etcd_server import free_port

pytestmark = pytest.mark.etcd

FELIXCTL = str(Path(sys.executable).parent / "felixctl")


def felixctl(endpoint: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "CALICO_", "DATASTORE_"))}
    env.update(ETCD_ENDPOINTS=endpoint, DATASTORE_TYPE="etcdv3")
    return subprocess.run([FELIXCTL, *args], input=stdin, env=env, capture_output=True, text=True, timeout=60)


def ok(endpoint: str, *args: str, stdin: str | None = None) -> str:
    result = felixctl(endpoint, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return result.stdout


def snapshot(store: Any) -> dict[str, Any]:
    items, _ = store.list(keys.ROOT)
    return {kv.key: (kv.value, kv.revision) for kv in items}


def write(tmp_path: Path, name: str, docs: list[dict[str, Any]]) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs))
    return str(path)


def pool(name: str, cidr: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "IPPool", "metadata": {"name": name},
            "spec": {"cidr": cidr, **spec}}


POLICY = {
    "apiVersion": "projectcalico.org/v3",
    "kind": "NetworkPolicy",
    "metadata": {"name": "allow-web", "namespace": "prod"},
    "spec": {
        "selector": "app == 'web'",
        "ingress": [{"action": "Allow", "protocol": "TCP",
                     "source": {"selector": "role == 'frontend'"}, "destination": {"ports": [80, "8000:8080"]}}],
    },
}


def test_create_get_apply_replace_delete_round_trip(etcd_store: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    f = write(tmp_path, "pools.yaml", [pool("p1", "10.10.0.0/16"), pool("p2", "10.20.0.0/16", blockSize=28)])
    assert "Successfully created 2 'IPPool' resource(s)" in ok(etcd_endpoint, "create", "-f", f)

    table = ok(etcd_endpoint, "get", "ippool").splitlines()
    assert table[0].split() == ["NAME", "CIDR", "SELECTOR"]
    assert table[1].split() == ["p1", "10.10.0.0/16", "all()"]
    assert table[2].split() == ["p2", "10.20.0.0/16", "all()"]

    wide = ok(etcd_endpoint, "get", "pools", "-o", "wide").splitlines()
    assert wide[0].split()[:7] == ["NAME", "CIDR", "NAT", "IPIPMODE", "VXLANMODE", "DISABLED", "DISABLEBGPEXPORT"]
    assert wide[1].split()[:7] == ["p1", "10.10.0.0/16", "false", "Never", "Never", "false", "false"]

    one = yaml.safe_load(ok(etcd_endpoint, "get", "ippool", "p2", "-o", "yaml"))
    assert one["kind"] == "IPPool" and one["spec"]["blockSize"] == 28 and one["spec"]["ipipMode"] == "Never"
    kv = etcd_store.get(keys.resource_key("ippools", "p2"))
    assert one["metadata"]["resourceVersion"] == str(kv.revision)
    assert "resourceVersion" not in kv.value["metadata"] and kv.value["metadata"]["uid"]

    listed = json.loads(ok(etcd_endpoint, "get", "ipp", "-o", "json"))
    assert listed["kind"] == "IPPoolList" and [i["metadata"]["name"] for i in listed["items"]] == ["p1", "p2"]

    # apply updates p1 and creates p3; the uid survives the update.
    uid = etcd_store.get(keys.resource_key("ippools", "p1")).value["metadata"]["uid"]
    f2 = write(tmp_path, "apply.yaml", [pool("p1", "10.10.0.0/16", natOutgoing=True), pool("p3", "10.30.0.0/16")])
    assert "Successfully applied 2 'IPPool' resource(s)" in ok(etcd_endpoint, "apply", "-f", f2)
    p1 = etcd_store.get(keys.resource_key("ippools", "p1")).value
    assert p1["spec"]["natOutgoing"] is True and p1["metadata"]["uid"] == uid

    f3 = write(tmp_path, "replace.yaml", [pool("p3", "10.30.0.0/16", vxlanMode="Always")])
    ok(etcd_endpoint, "replace", "-f", f3)
    assert etcd_store.get(keys.resource_key("ippools", "p3")).value["spec"]["vxlanMode"] == "Always"

    assert "Successfully deleted 1 'IPPool' resource(s)" in ok(etcd_endpoint, "delete", "ippool", "p3")
    ok(etcd_endpoint, "delete", "-f", f)
    items, _ = etcd_store.list(keys.resource_prefix("ippools"))
    assert [kv.key for kv in items] == []


def test_stdin_json_and_list_kinds(etcd_store: Any, etcd_endpoint: str) -> None:
    doc = {"kind": "IPPoolList", "items": [pool("a", "10.1.0.0/24", blockSize=28), pool("b", "10.2.0.0/24")]}
    ok(etcd_endpoint, "apply", "-f", "-", stdin=json.dumps(doc))
    assert [kv.value["metadata"]["name"] for kv in etcd_store.list(keys.resource_prefix("ippools"))[0]] == ["a", "b"]
    # Round trip: get -o yaml | replace -f -
    text = ok(etcd_endpoint, "get", "ippool", "-o", "yaml")
    assert "Successfully replaced 2 'IPPool' resource(s)" in ok(etcd_endpoint, "replace", "-f", "-", stdin=text)


def test_namespaced_resources(etcd_store: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    other = json.loads(json.dumps(POLICY))
    other["metadata"] = {"name": "allow-web"}  # no namespace: -n fills it in
    f = write(tmp_path, "np.yaml", [POLICY])
    g = write(tmp_path, "np2.yaml", [other])
    ok(etcd_endpoint, "create", "-f", f)
    ok(etcd_endpoint, "create", "-f", g, "-n", "dev")
    assert etcd_store.get(keys.resource_key("networkpolicies", "allow-web", "dev")).value["spec"]["types"] == ["Ingress"]

    assert ok(etcd_endpoint, "get", "np").splitlines() == ["NAMESPACE   NAME"]
    assert ok(etcd_endpoint, "get", "np", "-n", "prod").splitlines()[1].split() == ["prod", "allow-web"]
    rows = [line.split() for line in ok(etcd_endpoint, "get", "policy", "-A").splitlines()[1:]]
    assert rows == [["dev", "allow-web"], ["prod", "allow-web"]]

    wep = {"kind": "WorkloadEndpoint", "metadata": {"name": "n1-k8s-a-eth0", "namespace": "prod"},
           "spec": {"workload": "", "pod": "a", "node": "n1", "interfaceName": "cali0123456789a",
                    "ipNetworks": ["10.244.0.5/32"], "profiles": ["kns.prod"]}}
    ok(etcd_endpoint, "apply", "-f", "-", stdin=json.dumps(wep))
    table = ok(etcd_endpoint, "get", "wep", "-n", "prod").splitlines()
    assert table[0].split() == ["NAMESPACE", "WORKLOAD", "NODE", "NETWORKS", "INTERFACE"]
    assert table[1].split() == ["prod", "a", "n1", "10.244.0.5/32", "cali0123456789a"]  # the pod, as calicoctl


def test_nodes_ipam_config_patch_label(etcd_store: Any, etcd_endpoint: str) -> None:
    node = {"kind": "Node", "metadata": {"name": "n1"}, "spec": {"bgp": {"ipv4Address": "192.0.2.11/24"}}}
    node2 = {"kind": "Node", "metadata": {"name": "n2"},
             "spec": {"bgp": {"ipv4Address": "192.0.2.12/24", "asNumber": "1.10"}}}
    ok(etcd_endpoint, "create", "-f", "-", stdin=yaml.safe_dump_all([node, node2]))
    rows = [line.split() for line in ok(etcd_endpoint, "get", "nodes", "-o", "wide").splitlines()]
    assert rows == [["NAME", "ASN", "IPV4", "IPV6"], ["n1", "(64512)", "192.0.2.11/24"], ["n2", "65546", "192.0.2.12/24"]]

    ok(etcd_endpoint, "label", "node", "n1", "route-reflector=true")
    result = felixctl(etcd_endpoint, "label", "node", "n1", "route-reflector=false")
    assert result.returncode == 1 and "--overwrite" in result.stderr
    ok(etcd_endpoint, "label", "node", "n1", "route-reflector=false", "--overwrite")
    assert etcd_store.get(keys.resource_key("nodes", "n1")).value["metadata"]["labels"] == {"route-reflector": "false"}
    ok(etcd_endpoint, "label", "no", "n1", "route-reflector", "--remove")
    assert etcd_store.get(keys.resource_key("nodes", "n1")).value["metadata"]["labels"] == {}

    ok(etcd_endpoint, "patch", "node", "n1", "-p", '{"spec": {"bgp": {"routeReflectorClusterID": "244.0.0.1"}}}')
    bgp = etcd_store.get(keys.resource_key("nodes", "n1")).value["spec"]["bgp"]
    assert bgp == {"ipv4Address": "192.0.2.11/24", "routeReflectorClusterID": "244.0.0.1"}

    ipam = {"kind": "IPAMConfiguration", "metadata": {"name": "default"},
            "spec": {"strictAffinity": True, "maxBlocksPerHost": 4}}
    ok(etcd_endpoint, "apply", "-f", "-", stdin=json.dumps(ipam))
    assert etcd_store.get(keys.IPAM_CONFIG).value == {
        "strict_affinity": True, "auto_allocate_blocks": True, "maxBlocksPerHost": 4}
    got = yaml.safe_load(ok(etcd_endpoint, "get", "ipamconfig", "default", "-o", "yaml"))
    assert got["spec"] == {"strictAffinity": True, "autoAllocateBlocks": True, "maxBlocksPerHost": 4}

    assert ok(etcd_endpoint, "version").startswith("Client Version:")


def test_skip_flags(etcd_store: Any, etcd_endpoint: str) -> None:
    stdin = yaml.safe_dump(pool("p", "10.5.0.0/16"))
    ok(etcd_endpoint, "create", "-f", "-", stdin=stdin)
    out = ok(etcd_endpoint, "create", "-f", "-", "--skip-exists", stdin=stdin)
    assert "Successfully created 0 'IPPool' resource(s) (1 skipped: already exist)" in out
    ok(etcd_endpoint, "delete", "ippool", "p")
    assert "1 skipped" in ok(etcd_endpoint, "delete", "ippool", "p", "--skip-not-exists")


REJECTIONS: list[tuple[str, list[dict[str, Any]] | str, str]] = [
    ("create", [pool("new", "10.99.0.0/16"), pool("bad", "10.0.0.0/33")],
     'document 2: IPPool "bad": spec.cidr: invalid CIDR "10.0.0.0/33"'),
    ("create", [pool("bad", "10.0.0.1/16")], "has host bits set"),
    ("apply", [pool("bad", "10.98.0.0/16", blockSize=19)], "spec.blockSize: 19 is out of range 20..32"),
    ("apply", [pool("bad", "10.98.0.0/28")], "blockSize must be >= 28"),
    ("apply", [pool("bad", "10.98.0.0/16", ipipMode="Always", vxlanMode="Always")],
     "ipipMode and vxlanMode cannot both be enabled"),
    ("apply", [pool("bad", "10.98.0.0/16", ipipMode="always")], "spec.ipipMode: invalid value"),
    ("apply", [pool("bad", "10.98.0.0/16", foo=1)], "spec.foo: unknown field"),
    ("apply", [pool("bad", "10.98.0.0/16", nodeSelector="a == ")], "spec.nodeSelector: invalid selector"),
    ("apply", [pool("Bad_Name", "10.98.0.0/16")], "metadata.name: invalid name"),
    ("apply", [pool("inner", "10.1.128.0/20")], 'overlaps IPPool "existing" (10.1.0.0/16)'),
    ("apply", [pool("x1", "10.60.0.0/16"), pool("x2", "10.60.128.0/17")], 'IPPool "x2": spec.cidr 10.60.128.0/17 overlaps IPPool "x1"'),
    ("apply", [pool("existing", "10.1.0.0/16", blockSize=24)], "spec.blockSize: cannot be changed"),
    ("create", [pool("new", "10.97.0.0/16"), pool("existing", "10.1.0.0/16")], 'IPPool "existing" already exists'),
    ("replace", [pool("missing", "10.96.0.0/16")], 'IPPool "missing" does not exist'),
    ("delete", [pool("existing", "10.1.0.0/16"), pool("missing", "10.96.0.0/16")], 'IPPool "missing" does not exist'),
    ("apply", [pool("dup", "10.95.0.0/16"), pool("dup", "10.95.0.0/16")], "also appears in"),
    ("apply", [{**POLICY, "spec": {"ingress": [{"action": "Accept"}]}}], "spec.ingress[0].action: invalid value"),
    ("apply", [{**POLICY, "spec": {"ingress": [{"action": "Allow", "destination": {"ports": [80]}}]}}],
     "ports are only valid with protocol"),
    ("apply", [{**POLICY, "spec": {"egress": [{"action": "Allow", "destination": {"selector": "a in {'x'"}}]}}],
     "spec.egress[0].destination.selector: invalid selector"),
    ("apply", [{"kind": "Node", "metadata": {"name": "n9"}, "spec": {"bgp": {"ipv4Address": "192.0.2.300/24"}}}],
     "spec.bgp.ipv4Address: invalid address"),
    ("apply", [{"kind": "BGPPeer", "metadata": {"name": "peer"}, "spec": {"peerIP": "192.0.2.1", "asNumber": 4294967296}}],
     "spec.asNumber"),
    ("apply", [{"kind": "Frobnicator", "metadata": {"name": "f"}}], "unsupported kind"),
    ("apply", "kind: IPPool\nmetadata: {name: a\nspec: {}\n", "invalid YAML at line"),
]


@pytest.mark.parametrize("verb, docs, message", REJECTIONS, ids=[m[:40] for _, _, m in REJECTIONS])
def test_rejections_leave_the_datastore_unchanged(
    etcd_store: Any, etcd_endpoint: str, tmp_path: Path, verb: str, docs: Any, message: str
) -> None:
    apply_resources(etcd_store, [pool("existing", "10.1.0.0/16")], "create")
    before = snapshot(etcd_store)
    path = tmp_path / "input.yaml"
    path.write_text(docs if isinstance(docs, str) else yaml.safe_dump_all(docs))
    result = felixctl(etcd_endpoint, verb, "-f", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("felixctl: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(etcd_store) == before


def test_stale_resource_version_is_rejected(etcd_store: Any, etcd_endpoint: str) -> None:
    ok(etcd_endpoint, "create", "-f", "-", stdin=yaml.safe_dump(pool("p", "10.7.0.0/16")))
    stale = yaml.safe_load(ok(etcd_endpoint, "get", "ippool", "p", "-o", "yaml"))
    ok(etcd_endpoint, "label", "ippool", "p", "x=y")
    before = snapshot(etcd_store)
    result = felixctl(etcd_endpoint, "replace", "-f", "-", stdin=yaml.safe_dump(stale))
    assert result.returncode == 1 and "resourceVersion" in result.stderr and "stale" in result.stderr
    assert snapshot(etcd_store) == before


def test_get_missing_and_bad_kind(etcd_store: Any, etcd_endpoint: str) -> None:
    result = felixctl(etcd_endpoint, "get", "ippool", "nope")
    assert result.returncode == 1 and result.stderr.strip() == 'felixctl: error: IPPool "nope" does not exist'
    result = felixctl(etcd_endpoint, "get", "frobs")
    assert result.returncode == 1 and "not supported" in result.stderr


def test_datastore_down_is_one_line() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (("get", "ippool"), ("delete", "ippool", "p")):
        result = felixctl(dead, *args)
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("felixctl: error: datastore:"), result.stderr
    result = felixctl("ftp://127.0.0.1:1", "get", "ippool")
    assert result.returncode == 1 and "ETCD_ENDPOINTS" in result.stderr and "Traceback" not in result.stderr


def test_patch_errors_and_ipam_wiring(etcd_store: Any, etcd_endpoint: str) -> None:
    ok(etcd_endpoint, "create", "-f", "-", stdin=yaml.safe_dump(pool("p", "10.8.0.0/16")))
    before = snapshot(etcd_store)
    for patch, message in (("{nope", "--patch: invalid JSON"),
                           ('{"spec": {"blockSize": 24}}', "spec.blockSize: cannot be changed"),
                           ('{"spec": {"ipipMode": "Always", "vxlanMode": "Always"}}', "cannot both be enabled")):
        result = felixctl(etcd_endpoint, "patch", "ippool", "p", "-p", patch)
        assert result.returncode == 1 and message in result.stderr, result.stderr
    assert snapshot(etcd_store) == before
    ok(etcd_endpoint, "patch", "ippool", "p", "-p", '{"spec": {"disabled": true}}')
    assert etcd_store.get(keys.resource_key("ippools", "p")).value["spec"]["disabled"] is True
    # The ipam subcommand is felixctl's too: it reads the pool just written.
    assert "10.8.0.0/16" in ok(etcd_endpoint, "ipam", "show")


def test_ip_reservations_and_ipam_split_borrowed(etcd_store: Any, etcd_endpoint: str, tmp_path: Path) -> None:
    from felixpy.ipam.allocator import IPAM
    from felixpy.ipam.reservations import Reservations

    reservation: dict[str, Any] = {"apiVersion": "projectcalico.org/v3", "kind": "IPReservation", "metadata": {"name": "gw"},
                   "spec": {"reservedCIDRs": ["10.30.0.1", "10.30.0.64/26"]}}
    f = write(tmp_path, "r.yaml", [pool("p", "10.30.0.0/24", blockSize=26), pool("tiny", "10.31.0.0/26", blockSize=26),
                                   reservation])
    ok(etcd_endpoint, "apply", "-f", f)
    table = ok(etcd_endpoint, "get", "ipreservations", "-o", "wide").splitlines()
    assert table[0].split() == ["NAME", "CIDRS"] and table[1].split() == ["gw", "10.30.0.1,10.30.0.64/26"]
    bad = reservation | {"spec": {"reservedCIDRs": ["10.30.0.999"]}}
    before = snapshot(etcd_store)
    result = felixctl(etcd_endpoint, "apply", "-f", "-", stdin=json.dumps(bad))
    assert result.returncode == 1 and 'spec.reservedCIDRs[0]: invalid CIDR "10.30.0.999"' in result.stderr
    assert result.stderr.count("\n") == 1 and snapshot(etcd_store) == before

    ipam = IPAM(etcd_store, cache_ttl=0)
    mine = ipam.auto_assign(num=2, handle="a", attrs={"node": "n1", "namespace": "x", "pod": "a"}, node="n1",
                            pools=["p"])
    reserved = Reservations.of(reservation["spec"]["reservedCIDRs"])
    assert not any(reserved.matches(ip) for ip in mine)
    ipam.auto_assign(num=1, handle="t", attrs={"node": "n1", "namespace": "x", "pod": "t"}, node="n1", pools=["tiny"])
    # tiny has one block, n1's: n2 must borrow from it.
    (borrowed,) = ipam.auto_assign(num=1, handle="b", attrs={"node": "n2", "namespace": "x", "pod": "b"}, node="n2",
                                   pools=["tiny"])
    show = [line for line in ok(etcd_endpoint, "ipam", "show").splitlines() if line.startswith("| ")]
    assert show[0].split("|")[5].strip() == "IPS RESERVED"
    assert [c.strip() for c in show[1].strip("|").split("|")] == [
        "IP Pool", "10.30.0.0/24", "256", "2 (1%)", "65 (25%)", "189 (74%)"]
    rows = [[c.strip() for c in line.strip("|").split("|")]
            for line in ok(etcd_endpoint, "ipam", "show", "--show-borrowed").splitlines() if line.startswith("| ")]
    assert rows[1:] == [[str(borrowed), "n2", "10.31.0.0/26", "n1", "pod", "x/b"]]

    result = felixctl(etcd_endpoint, "ipam", "split", "2", "--name", "p")
    assert result.returncode == 1 and "datastore is not locked" in result.stderr
    ok(etcd_endpoint, "datastore", "migrate", "lock")
    out = ok(etcd_endpoint, "ipam", "split", "2", "--name", "p")
    assert "IP Pool p was successfully split into 2 smaller pools." in out
    ok(etcd_endpoint, "datastore", "migrate", "unlock")
    table = ok(etcd_endpoint, "get", "ippools").splitlines()
    assert sorted(line.split()[:2] for line in table[1:]) == [
        ["split-p-0", "10.30.0.0/25"], ["split-p-1", "10.30.0.128/25"], ["tiny", "10.31.0.0/26"]]
    for ip in mine:  # allocations and blocks carried over
        assert ipam.get_assignment(ip) is not None
