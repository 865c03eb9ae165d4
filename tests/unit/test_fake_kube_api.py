"""The fake Kubernetes API server (tests/support/fake_kube_api.py) keeps the API conventions.

Checked with plain urllib against kubernetes.io/docs/reference/using-api/api-concepts: Status
objects and reasons for errors, one global resourceVersion, optimistic concurrency on PUT / PATCH /
DELETE, watch semantics (events after a resourceVersion, synthetic ADDED from "0", 410 Gone as an
ERROR event, bookmarks carrying only a resourceVersion, timeoutSeconds). Loopback only.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Iterator

import pytest

from tests.support.fake_kube_api import FakeKubeAPI, merge_patch

PODS = "/api/v1/namespaces/ns1/pods"
HANDLES = "/apis/crd.projectcalico.org/v1/ipamhandles"


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    fake = FakeKubeAPI(bookmark_interval=0.2).start()
    try:
        yield fake
    finally:
        fake.stop()


def call(api: FakeKubeAPI, method: str, path: str, body: Any = None,
         ctype: str = "application/json") -> tuple[int, dict[str, Any]]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(api.url + path, data=data, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def watch(api: FakeKubeAPI, path: str, query: str, limit: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    events = []
    with urllib.request.urlopen(f"{api.url}{path}?watch=true&{query}", timeout=timeout) as resp:
        assert resp.status == 200
        for line in resp:
            events.append(json.loads(line))
            if len(events) >= limit:
                break
    return events


def handle(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMHandle", "metadata": {"name": name},
            "spec": spec}


def test_create_stamps_system_metadata_and_refuses_duplicates(api: FakeKubeAPI) -> None:
    code, obj = call(api, "POST", HANDLES, handle("h1", n=1))
    assert code == 201
    meta = obj["metadata"]
    assert meta["resourceVersion"] == "2" and meta["uid"] and meta["creationTimestamp"].endswith("Z")
    code, status = call(api, "POST", HANDLES, handle("h1", n=2))
    assert code == 409 and status["kind"] == "Status" and status["reason"] == "AlreadyExists"
    code, status = call(api, "POST", HANDLES, handle("Bad_Name"))
    assert code == 422 and status["reason"] == "Invalid"
    code, status = call(api, "POST", PODS, {"metadata": {"name": "p"}})
    assert code == 404 and 'namespaces "ns1" not found' in status["message"]
    code, status = call(api, "GET", HANDLES + "/missing")
    assert code == 404 and status["reason"] == "NotFound" and status["code"] == 404
    code, _ = call(api, "GET", "/apis/crd.projectcalico.org/v1/unknownthings")
    assert code == 404


def test_list_carries_the_global_resource_version(api: FakeKubeAPI) -> None:
    call(api, "POST", HANDLES, handle("b"))
    call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": "ns1"}})
    call(api, "POST", HANDLES, handle("a"))
    code, lst = call(api, "GET", HANDLES)
    assert code == 200 and lst["kind"] == "IPAMHandleList"
    assert lst["metadata"]["resourceVersion"] == "4"  # counts every kind's writes, like etcd
    assert [i["metadata"]["name"] for i in lst["items"]] == ["a", "b"]
    code, page = call(api, "GET", HANDLES + "?limit=1")  # paged as the real server pages
    assert code == 200 and [i["metadata"]["name"] for i in page["items"]] == ["a"]
    assert page["metadata"]["continue"] and page["metadata"]["remainingItemCount"] == 1
    code, status = call(api, "GET", HANDLES + "?labelSelector=x%20in%20(y)")  # set-based: not implemented
    assert code == 400 and "implements only equality" in status["message"]


def test_label_selector_and_pod_logs(api: FakeKubeAPI) -> None:
    call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": "kube-system"}})
    for name, app in (("node-a", "felixpy-node"), ("ctl-b", "felixpy-controllers")):
        call(api, "POST", "/api/v1/namespaces/kube-system/pods",
             {"metadata": {"name": name, "labels": {"app.kubernetes.io/name": app}}, "spec": {"nodeName": "n1"}})
    code, lst = call(api, "GET", "/api/v1/namespaces/kube-system/pods?labelSelector=app.kubernetes.io%2Fname%3Dfelixpy-node")
    assert code == 200 and [p["metadata"]["name"] for p in lst["items"]] == ["node-a"]
    api.set_pod_log("kube-system", "node-a", "felixpy-node", "line 1\nline 2\n")
    req = urllib.request.Request(f"{api.url}/api/v1/namespaces/kube-system/pods/node-a/log?container=felixpy-node&sinceSeconds=60")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["Content-Type"] == "text/plain" and resp.read() == b"line 1\nline 2\n"
    code, _ = call(api, "GET", "/api/v1/namespaces/kube-system/pods/missing/log")
    assert code == 404


def test_optimistic_concurrency(api: FakeKubeAPI) -> None:
    _, obj = call(api, "POST", HANDLES, handle("h", n=1))
    stale = json.loads(json.dumps(obj))
    obj["spec"]["n"] = 2
    code, updated = call(api, "PUT", HANDLES + "/h", obj)
    assert code == 200 and int(updated["metadata"]["resourceVersion"]) > int(obj["metadata"]["resourceVersion"])
    stale["spec"]["n"] = 3
    code, status = call(api, "PUT", HANDLES + "/h", stale)
    assert code == 409 and status["reason"] == "Conflict"
    # a write that changes nothing is not a write
    code, same = call(api, "PUT", HANDLES + "/h", updated)
    assert code == 200 and same["metadata"]["resourceVersion"] == updated["metadata"]["resourceVersion"]
    code, _ = call(api, "PUT", HANDLES + "/other", handle("other"))
    assert code == 404
    # a PUT without resourceVersion is unconditional
    code, forced = call(api, "PUT", HANDLES + "/h", handle("h", n=9))
    assert code == 200 and forced["spec"] == {"n": 9} and forced["metadata"]["uid"] == obj["metadata"]["uid"]
    # DELETE preconditions
    code, status = call(api, "DELETE", HANDLES + "/h",
                        {"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": "2"}})
    assert code == 409 and status["reason"] == "Conflict"
    code, gone = call(api, "DELETE", HANDLES + "/h", {"preconditions": {"resourceVersion": forced["metadata"]["resourceVersion"]}})
    assert code == 200 and int(gone["metadata"]["resourceVersion"]) == api.revision
    code, _ = call(api, "DELETE", HANDLES + "/h")
    assert code == 404


def test_patch(api: FakeKubeAPI) -> None:
    call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": "ns1"}})
    _, pod = call(api, "POST", PODS, {"metadata": {"name": "p", "annotations": {"keep": "1"}}, "spec": {"nodeName": "n1"}})
    rv = pod["metadata"]["resourceVersion"]
    code, patched = call(api, "PATCH", PODS + "/p",
                         {"metadata": {"resourceVersion": rv, "annotations": {"a": "x"}}},
                         "application/strategic-merge-patch+json")
    assert code == 200 and patched["metadata"]["annotations"] == {"keep": "1", "a": "x"}
    code, status = call(api, "PATCH", PODS + "/p", {"metadata": {"resourceVersion": rv, "annotations": {"a": None}}},
                        "application/merge-patch+json")
    assert code == 409 and status["reason"] == "Conflict"
    code, patched = call(api, "PATCH", PODS + "/p", {"metadata": {"annotations": {"a": None}}},
                         "application/merge-patch+json")
    assert code == 200 and patched["metadata"]["annotations"] == {"keep": "1"}
    code, _ = call(api, "PATCH", PODS + "/p", [{"op": "remove", "path": "/spec"}], "application/json-patch+json")
    assert code == 415
    assert merge_patch({"a": {"b": 1, "c": 2}, "l": [1]}, {"a": {"b": None}, "l": [2]}) == {"a": {"c": 2}, "l": [2]}


def test_watch_from_a_resource_version(api: FakeKubeAPI) -> None:
    _, a = call(api, "POST", HANDLES, handle("a", n=1))
    start = a["metadata"]["resourceVersion"]
    a["spec"]["n"] = 2
    _, a2 = call(api, "PUT", HANDLES + "/a", a)
    call(api, "DELETE", HANDLES + "/a")
    events = watch(api, HANDLES, f"resourceVersion={start}", 2)
    assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]  # strictly after `start`
    assert events[0]["object"]["metadata"]["resourceVersion"] == a2["metadata"]["resourceVersion"]
    assert events[0]["object"]["kind"] == "IPAMHandle"
    assert int(events[1]["object"]["metadata"]["resourceVersion"]) == api.revision


def test_watch_without_resource_version_starts_with_synthetic_adds(api: FakeKubeAPI) -> None:
    call(api, "POST", HANDLES, handle("a"))
    call(api, "POST", HANDLES, handle("b"))
    events = watch(api, HANDLES, "resourceVersion=0", 2)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "a"), ("ADDED", "b")]


def test_watch_too_old_is_410_gone_as_an_error_event(api: FakeKubeAPI) -> None:
    for name in ("a", "b", "c"):
        call(api, "POST", HANDLES, handle(name))
    api.compact()
    events = watch(api, HANDLES, "resourceVersion=2", 5)
    assert len(events) == 1 and events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired"
    # from the compaction point on, the watch is fine
    events = watch(api, HANDLES, f"resourceVersion={api.revision}&allowWatchBookmarks=true", 1)
    assert events[0]["type"] == "BOOKMARK"


def test_bookmarks_carry_only_a_resource_version(api: FakeKubeAPI) -> None:
    call(api, "POST", HANDLES, handle("a"))
    call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": "ns1"}})  # another kind moves the counter
    events = watch(api, HANDLES, "resourceVersion=2&allowWatchBookmarks=true", 1)
    assert events == [{"type": "BOOKMARK", "object": {
        "kind": "IPAMHandle", "apiVersion": "crd.projectcalico.org/v1", "metadata": {"resourceVersion": "3"}}}]


def test_watch_ends_at_timeout_seconds_and_on_drop(api: FakeKubeAPI) -> None:
    t0 = time.monotonic()
    assert watch(api, HANDLES, f"resourceVersion={api.revision}&timeoutSeconds=1", 10) == []
    assert 0.9 < time.monotonic() - t0 < 3
    t0 = time.monotonic()
    import threading
    threading.Timer(0.3, api.drop_watches).start()
    assert watch(api, HANDLES, f"resourceVersion={api.revision}", 10) == []
    assert time.monotonic() - t0 < 3


def test_namespaced_watch_sees_only_its_namespace(api: FakeKubeAPI) -> None:
    for ns in ("ns1", "ns2"):
        call(api, "POST", "/api/v1/namespaces", {"metadata": {"name": ns}})
        call(api, "POST", f"/api/v1/namespaces/{ns}/pods", {"metadata": {"name": "p"}})
    events = watch(api, PODS, "resourceVersion=1", 1)
    assert events[0]["object"]["metadata"]["namespace"] == "ns1"
    all_pods = watch(api, "/api/v1/pods", "resourceVersion=1", 2)
    assert [e["object"]["metadata"]["namespace"] for e in all_pods] == ["ns1", "ns2"]
