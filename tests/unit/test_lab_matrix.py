"""`felixpy-lab matrix` and `probe` with a pod that has no IP: an error naming the pod, never "blocked".

No probe runs here (a pod without an address is never probed), so no lab and no root are needed
beyond the state the commands load."""

from __future__ import annotations

import json
from typing import Any

import pytest

from felixpy.lab import cli, state
from felixpy.lab.state import LabState, NodeState, PodState


def _lab(ips: dict[str, list[str]]) -> LabState:
    st = LabState(name="mx", mode="bgp", pool="10.244.0.0/16", block_size=26,
                  nodes=[NodeState(name="node1", ip="10.0.0.1", netns="mx-node1")])
    st.pods = [PodState(namespace="default", name=n, node="node1", netns=f"mx-{n}", container_id=n, ips=a)
               for n, a in ips.items()]
    return st


@pytest.fixture
def lab_without_ips(monkeypatch: pytest.MonkeyPatch) -> LabState:
    st = _lab({"a": [], "b": []})
    monkeypatch.setattr(state, "load", lambda name: st)
    monkeypatch.setattr(cli.os, "geteuid", lambda: 0)
    return st


def test_matrix_lists_every_pod_without_ip_as_an_error() -> None:
    data = cli.matrix(_lab({"a": [], "b": []}), [80], ["tcp"], 1.0)
    assert set(data["errors"]) == {"default/a", "default/b"}
    assert "default/a has no IP address" in data["errors"]["default/a"]
    assert data["results"] == {"tcp/80": {"default/a": {"default/b": False}, "default/b": {"default/a": False}}}


def test_matrix_table_marks_unprobed_pairs_and_exits_1(lab_without_ips: LabState,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix", "--name", "mx", "--protos", "tcp", "--ports", "80"]) == 1
    out, err = capsys.readouterr()
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("default/")]
    assert rows == [["default/a", "default/b"], ["default/a", "!"], ["default/b", "!"]]  # header, a, b
    assert "." not in out.split("\n", 1)[1]  # nothing is shown as blocked
    assert err.count("has no IP address") == 2


def test_matrix_json_carries_the_errors_and_exits_1(lab_without_ips: LabState,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["matrix", "--name", "mx", "--protos", "tcp", "--ports", "80", "-o", "json"]) == 1
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    assert sorted(data["errors"]) == ["default/a", "default/b"]


def test_probe_refuses_a_pod_without_ip(lab_without_ips: LabState, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["probe", "--name", "mx", "default/a", "default/b"]) == 2
    out, err = capsys.readouterr()
    assert "blocked" not in out
    assert err.strip() == ("felixpy-lab: pod default/a has no IP address (its CNI ADD returned none): nothing "
                           "can be probed; felixpy-lab pod del default/a and add it again")
