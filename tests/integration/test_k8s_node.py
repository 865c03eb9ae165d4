"""Clearing the Node's NetworkUnavailable condition (felixpy/node/k8s_node.py) on the fake
Kubernetes API server: only the condition changes (the kubelet's conditions and the Node's spec
and metadata stay), a second call writes nothing, a kubelet write in between is not lost, and
no API or an unreachable one is handled without raising.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.node import k8s_node
from tests.support.fake_kube_api import FakeKubeAPI

NODE = "fxt-node-1"


@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI().start()
    api.put("/api/v1/nodes", {
        "metadata": {"name": NODE, "labels": {"kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": "10.244.1.0/24"},
        "status": {"conditions": [
            {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated",
             "lastTransitionTime": "2025-01-01T00:00:00Z"},
            {"type": "Ready", "status": "True", "reason": "KubeletReady"},
        ]},
    })
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def env(fake: FakeKubeAPI, tmp_path: Path) -> dict[str, str]:
    path = tmp_path / "kubeconfig"
    path.write_text(fake.kubeconfig())
    return {"KUBECONFIG": str(path)}


def conditions(fake: FakeKubeAPI) -> dict[str, dict[str, Any]]:
    node = fake.object(f"/api/v1/nodes/{NODE}")
    assert node is not None
    return {c["type"]: c for c in node["status"]["conditions"]}


def test_clears_only_network_unavailable(fake: FakeKubeAPI, env: dict[str, str]) -> None:
    before = fake.object(f"/api/v1/nodes/{NODE}")
    assert k8s_node.clear_network_unavailable(NODE, env) is True
    after = fake.object(f"/api/v1/nodes/{NODE}")
    assert before is not None and after is not None
    cond = conditions(fake)
    assert cond["NetworkUnavailable"]["status"] == "False"
    assert cond["NetworkUnavailable"]["reason"] == "FelixpyIsUp"
    assert cond["NetworkUnavailable"]["lastTransitionTime"] != "2025-01-01T00:00:00Z"
    assert cond["Ready"] == {"type": "Ready", "status": "True", "reason": "KubeletReady"}
    assert after["spec"] == before["spec"] and after["metadata"]["labels"] == before["metadata"]["labels"]
    assert any(m == "PATCH" and p == f"/api/v1/nodes/{NODE}/status" for m, p in fake.requests)

    # Already clear: nothing written, the revision stays.
    revision = fake.revision
    assert k8s_node.clear_network_unavailable(NODE, env) is True
    assert fake.revision == revision


def test_a_kubelet_write_in_between_is_kept(fake: FakeKubeAPI, env: dict[str, str]) -> None:
    wrote: list[bool] = []

    def kubelet(method: str, path: str) -> None:
        # The kubelet's heartbeat lands between our read and our patch, once.
        if method == "PATCH" and not wrote:
            wrote.append(True)
            fake.modify(f"/api/v1/nodes/{NODE}", lambda n: n["status"]["conditions"].append(
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"}))

    fake.before_request = kubelet
    assert k8s_node.clear_network_unavailable(NODE, env) is True
    cond = conditions(fake)
    assert cond["NetworkUnavailable"]["status"] == "False"
    assert cond["MemoryPressure"]["status"] == "False"
    patches = [p for m, p in fake.requests if m == "PATCH"]
    assert len(patches) == 2  # the first hit the changed resourceVersion (409) and was redone


def test_no_kubernetes_api_is_a_no_op(tmp_path: Path) -> None:
    assert k8s_node.kube_api_configured({"HOME": str(tmp_path)}) is False
    assert k8s_node.clear_network_unavailable(NODE, {"HOME": str(tmp_path)}) is True


def test_unreachable_api_logs_one_line_and_retries_later(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))
    caplog.set_level(logging.WARNING, logger="felixpy.node.k8s_node")
    assert k8s_node.clear_network_unavailable(NODE, {"KUBECONFIG": str(path)}) is False
    lines = [r for r in caplog.records if r.name == "felixpy.node.k8s_node"]
    assert len(lines) == 1 and "will retry" in lines[0].getMessage()
    assert "\n" not in lines[0].getMessage()


def test_clearer_retries_in_the_background_until_done(fake: FakeKubeAPI, env: dict[str, str]) -> None:
    calls: list[int] = []

    def flaky(node: str, environ: Any) -> bool:
        calls.append(1)
        return len(calls) >= 3 and k8s_node.clear_network_unavailable(node, environ)

    clearer = k8s_node.NetworkUnavailableClearer(NODE, env, retry_interval=0.05, clear=flaky)
    clearer.start()
    clearer.start()  # idempotent
    assert clearer.done.wait(5)
    clearer.stop()
    assert len(calls) == 3
    assert conditions(fake)["NetworkUnavailable"]["reason"] == "FelixpyIsUp"
