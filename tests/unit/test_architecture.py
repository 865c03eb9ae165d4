"""Import contracts that keep the layers honest (design.md §2, style.md habit 10)."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def imports_of(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[pathlib.Path]:
    return sorted((ROOT / package).rglob("*.py"))


def offenders(package: str, forbidden: tuple[str, ...], allowed_under: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in modules(package):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(a) for a in allowed_under):
            continue
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel} imports {name}")
    return bad


def test_policy_is_pure():
    assert offenders("policy", ("felixpy", "bgp", "subprocess", "socket", "pyroute2", "etcd3")) == []


def test_only_kernel_touches_netlink_and_subprocess():
    assert offenders("felixpy", ("pyroute2", "subprocess"),
                     allowed_under=("felixpy/kernel/", "felixpy/lab/")) == []


def test_only_datastore_touches_etcd():
    assert offenders("felixpy", ("etcd3", "grpc"), allowed_under=("felixpy/datastore/",)) == []


def test_calc_and_dataplane_meet_only_in_messages():
    assert offenders("felixpy/calc", ("felixpy.dataplane", "felixpy.kernel")) == []
    assert offenders("felixpy/dataplane", ("felixpy.calc",)) == []


def test_ipam_block_maths_is_pure():
    assert offenders("felixpy/ipam", ("felixpy.kernel", "felixpy.dataplane", "subprocess", "pyroute2")) == []


def test_cni_plugin_imports_only_the_stdlib_it_needs():
    # kubelet starts it once per pod: every import is start-up latency.
    path = ROOT / "felixpy/cni/plugin.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {alias.name for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    assert top <= {"json", "os", "sys", "_socket"}
    assert not any(isinstance(node, ast.ImportFrom) for node in tree.body)
    # Only the DEL done without the agent (a rare path) imports more, inside its functions.
    lazy = {}
    for func in tree.body:
        if isinstance(func, ast.FunctionDef):
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    lazy.update({alias.name: func.name for alias in node.names})
    assert set(lazy) <= {"ctypes", "_struct"}
    assert set(lazy.values()) <= {"_remove_pod_veth", "_netlink", "_link_kind"}
