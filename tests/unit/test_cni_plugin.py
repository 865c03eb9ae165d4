"""The CNI plugin entry point: VERSION locally, errors as CNI error JSON, forwarding to the agent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading

from felixpy.cni import plugin
from felixpy.cni.server import CNIError, parse_cni_args, parse_request

BASE_ENV = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c" * 64, "CNI_NETNS": "/run/netns/x",
            "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p"}


def test_version_is_answered_without_the_agent():
    obj, rc = plugin.run({"CNI_COMMAND": "VERSION"}, '{"cniVersion": "1.0.0"}')
    assert rc == 0
    assert "1.0.0" in obj["supportedVersions"] and "0.3.1" in obj["supportedVersions"]


def test_malformed_stdin_is_a_decode_error():
    obj, rc = plugin.run(dict(BASE_ENV), "{not json")
    assert rc == 1
    assert obj["code"] == plugin.DECODE_FAILURE
    assert obj["msg"]


def test_unsupported_version_is_rejected():
    obj, rc = plugin.run(dict(BASE_ENV), '{"cniVersion": "9.9.9"}')
    assert (rc, obj["code"]) == (1, plugin.INCOMPATIBLE_VERSION)


def test_agent_down_is_try_again_later():
    obj, rc = plugin.run(dict(BASE_ENV), json.dumps({"cniVersion": "1.0.0",
                                                    "agent_socket": "/nonexistent/felixpy.sock"}))
    assert (rc, obj["code"]) == (1, plugin.TRY_AGAIN_LATER)


def test_request_is_forwarded_and_reply_printed():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "a.sock")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        got = {}

        def serve():
            conn, _ = srv.accept()
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            got.update(json.loads(data))
            conn.sendall(json.dumps({"result": {"cniVersion": "1.0.0", "ips": []}}).encode())
            conn.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "agent_socket": path}
        env = dict(BASE_ENV, PATH=os.environ.get("PATH", ""), HOME="/x")
        out = subprocess.run([sys.executable, "-m", "felixpy.cni.plugin"], input=json.dumps(conf),
                             env=env, capture_output=True, text=True, timeout=10)
        t.join(5)
        srv.close()
    assert out.returncode == 0, out
    assert json.loads(out.stdout) == {"cniVersion": "1.0.0", "ips": []}
    assert got["env"]["CNI_CONTAINERID"] == "c" * 64
    assert "PATH" not in got["env"] and "HOME" not in got["env"]  # only CNI_* is forwarded


def test_parse_request_names_the_missing_variable():
    env = dict(BASE_ENV)
    del env["CNI_NETNS"]
    try:
        parse_request({"env": env, "config": {"cniVersion": "1.0.0"}})
    except CNIError as err:
        assert err.code == 4 and "CNI_NETNS" in err.msg
    else:
        raise AssertionError("missing CNI_NETNS accepted")


def test_parse_request_requires_pod_identity_for_add_but_not_del():
    env = dict(BASE_ENV, CNI_ARGS="IgnoreUnknown=1")
    try:
        parse_request({"env": env, "config": {}})
    except CNIError as err:
        assert "K8S_POD_NAME" in err.msg
    else:
        raise AssertionError("ADD without pod identity accepted")
    req = parse_request({"env": dict(env, CNI_COMMAND="DEL"), "config": {"name": "net"}})
    assert req.handle == "net." + "c" * 64


def test_names():
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a-b") == {"IgnoreUnknown": "1", "K8S_POD_NAME": "a-b"}
