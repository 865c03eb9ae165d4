"""felixpy-cni: the CNI plugin kubelet runs for every pod. It forwards the request to the agent.

kubelet starts a fresh process per pod, so this module imports nothing beyond os, sys, json and
_socket (the C module: `socket` would pull in enum and selectors, ≈ 8 ms) and does no work of its own: VERSION is answered here, everything else is sent to the
agent's unix socket (config key `agent_socket`) as {"env": {CNI_*}, "config": <stdin JSON>} and
the agent's answer is printed as the CNI result or CNI error (CNI spec 1.0/1.1).
"""

# Untyped on purpose: install.py copies this file alone onto hosts and runs it with `python -I -S`,
# and type hints for JSON would need `typing` (a start-up cost) for no check the tests don't make.
# mypy: allow-untyped-defs, allow-untyped-calls

import json
import os
import sys

import _socket

# The protocol constants live here, once: the agent side (server.py) imports them from this module,
# and cni-shim/felixpy-cni.c repeats them (tests/unit/test_cni_constants.py checks they agree).
SUPPORTED_VERSIONS = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
DEFAULT_VERSION = "1.0.0"  # what a request without a readable cniVersion is answered in
DEFAULT_SOCKET = "/var/run/calico/felixpy-cni.sock"
TIMEOUT = 120.0  # kubelet's own CNI timeout is longer; the agent answers far sooner

# CNI spec error codes
INCOMPATIBLE_VERSION = 1
CONTAINER_UNKNOWN = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # CNI 1.1 STATUS: plugin not available


def _error(version, code, msg, details=""):
    return {"cniVersion": version, "code": code, "msg": msg, "details": details}


def _emit(obj, rc):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return rc


def _ask_agent(path, request):
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT)
        sock.connect(path)
        sock.sendall(json.dumps(request).encode())
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return json.loads(b"".join(chunks))


def run(env, stdin_text):
    """Returns (object to print, exit code)."""
    command = env.get("CNI_COMMAND", "")
    try:
        config = json.loads(stdin_text) if stdin_text.strip() else None
    except ValueError as err:
        config = err
    version = config.get("cniVersion", DEFAULT_VERSION) if isinstance(config, dict) else DEFAULT_VERSION

    if command == "VERSION":
        return {"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}, 0
    if command not in ("ADD", "DEL", "CHECK", "STATUS", "GC"):
        return _error(version, INVALID_ENV, "CNI_COMMAND must be one of ADD, DEL, CHECK, STATUS, GC, VERSION",
                      "CNI_COMMAND=%r" % command), 1
    if not isinstance(config, dict):
        detail = str(config) if config is not None else "stdin was empty"
        return _error(version, DECODE_FAILURE, "failed to decode the network configuration on stdin", detail), 1
    if version not in SUPPORTED_VERSIONS:
        return _error(version, INCOMPATIBLE_VERSION, "unsupported cniVersion %s" % version,
                      "supported: " + ", ".join(SUPPORTED_VERSIONS)), 1

    path = config.get("agent_socket") or DEFAULT_SOCKET
    if not isinstance(path, str):
        return _error(version, INVALID_CONFIG, "agent_socket must be a string", "agent_socket=%r" % (path,)), 1
    cni_env = {k: v for k, v in env.items() if k.startswith("CNI_")}
    try:
        reply = _ask_agent(path, {"env": cni_env, "config": config})
    except (OSError, ValueError) as err:
        return _error(version, TRY_AGAIN_LATER, "felixpy agent is not reachable",
                      "%s: %s (is felixpy-node running on this node?)" % (path, err)), 1
    if "error" in reply:
        failure = reply["error"]
        return _error(version, failure.get("code", IO_FAILURE), failure.get("msg", "error"),
                      failure.get("details", "")), 1
    return reply.get("result", {}), 0


def main():
    stdin_text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    obj, rc = run(os.environ, stdin_text)
    if rc == 0 and os.environ.get("CNI_COMMAND") in ("DEL", "STATUS", "GC") and not obj:
        return 0  # these print nothing on success
    return _emit(obj, rc)


if __name__ == "__main__":
    sys.exit(main())
