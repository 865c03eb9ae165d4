"""felixpy/names.py: the one home of kernel names and of the names derived from a pod."""

from __future__ import annotations

import ast
import pathlib

import pytest

from felixpy import names

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_workload_endpoint_name_doubles_dashes_inside_parts() -> None:
    assert names.workload_endpoint_name("n1", "a") == "n1-k8s-a-eth0"
    assert names.workload_endpoint_name("node-1", "my-pod", "eth0") == "node--1-k8s-my--pod-eth0"
    assert names.workload_endpoint_name("n1", "p", "net-1") == "n1-k8s-p-net--1"


@pytest.mark.parametrize("parts", [
    ("n1", "k8s", "web", "eth0"),
    ("node-1", "k8s", "my-pod", "eth0"),
    ("a--b", "k8s", "c-d-e", "net-1"),
    ("n.example.com", "k8s", "p", "eth0"),
])
def test_parse_inverts_build(parts: tuple[str, str, str, str]) -> None:
    node, orchestrator, pod, endpoint = parts
    name = names.workload_endpoint_name(node, pod, endpoint, orchestrator)
    assert names.parse_workload_endpoint_name(name) == parts


@pytest.mark.parametrize("name", ["", "n1-k8s-pod", "n1-k8s-a-b-eth0", "n1", "a---k8s-p-eth0"])
def test_parse_refuses_names_without_four_parts(name: str) -> None:
    assert names.parse_workload_endpoint_name(name) is None


def test_the_workload_endpoint_name_is_built_only_in_names() -> None:
    # The escape rule in a second place is how the CNI plugin, the Kubernetes mapping and the lab
    # came to hold three copies of it: keep it here only.
    offenders = []
    for path in sorted((ROOT / "felixpy").rglob("*.py")):
        if path == ROOT / "felixpy" / "names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace"
                    and [getattr(a, "value", None) for a in node.args] == ["-", "--"]):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []
