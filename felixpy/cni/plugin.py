"""felixpy-cni: the CNI plugin kubelet runs for every pod. It forwards the request to the agent.

kubelet starts a fresh process per pod, so this module imports nothing beyond os, sys, json and
_socket (the C module: `socket` would pull in enum and selectors, ≈ 8 ms) and does no work of its
own: VERSION is answered here, everything else is sent to the agent's unix socket (config key
`agent_socket`) as {"env": {CNI_*}, "config": <stdin JSON>} and the agent's answer is printed as
the CNI result or CNI error (CNI spec 1.0/1.1).

The agent answers every connection at once with one space (ACCEPTED) and then with its reply, so
a plugin tells "no agent" from "a slow request": connecting, sending and that first byte must
happen within ACCEPT_TIMEOUT; the rest of the reply may take REPLY_TIMEOUT (the agent bounds an
ADD well below it). When the agent cannot be reached:

* STATUS answers 50 (CNI 1.1: the plugin cannot serve ADD);
* ADD, CHECK and GC answer 11 (try again later) within ACCEPT_TIMEOUT;
* DEL still succeeds: the plugin removes the pod's veth itself, from inside the pod's network
  namespace by CNI_IFNAME (only a veth; the namespace is the sandbox's own, so a late DEL can
  never touch a newer sandbox of the same pod), and leaves the request in the agent's pending
  directory (`<agent_socket>.pending/`), which the agent replays when it is back: it releases the
  pod's addresses and deletes its WorkloadEndpoint. Calico's plugin releases the addresses itself
  because it talks to the datastore; this plugin deliberately has no datastore client (start-up
  cost, credentials on the host), so the agent does it as soon as it runs again. Until then the
  addresses stay allocated, which is safe: nothing else can be handed them. A directory that does
  not exist means no agent ever ran on this node, so there is nothing to release.
  Only that path imports more (ctypes for setns(2) on Python < 3.12, and _struct).
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
ACCEPT_TIMEOUT = 3  # seconds to connect, send the request and get the agent's ACCEPTED byte
REPLY_TIMEOUT = 30  # seconds for the rest of the reply (the agent gives up on an ADD after 10)
ACCEPTED = " "  # the agent's first byte on every connection: JSON whitespace before the reply
PENDING_SUFFIX = ".pending"  # <agent_socket>.pending/: DELs the agent has to finish

# CNI spec error codes
INCOMPATIBLE_VERSION = 1
CONTAINER_UNKNOWN = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # CNI 1.1 STATUS: plugin not available

CLONE_NEWNET = 0x40000000
AF_NETLINK = 16
NLM_F_REQUEST_ACK = 0x5
RTM_DELLINK, RTM_GETLINK, RTM_NEWLINK = 17, 18, 16
NLMSG_ERROR = 2
IFLA_IFNAME, IFLA_LINKINFO, IFLA_INFO_KIND = 3, 18, 1
ENODEV = 19


class Unreachable(Exception):
    """The agent could not be reached or did not answer in time; the message is the details."""


def _error(version, code, msg, details=""):
    return {"cniVersion": version, "code": code, "msg": msg, "details": details}


def _emit(obj, rc):
    sys.stdout.write(json.dumps(obj))
    sys.stdout.write("\n")
    sys.stdout.flush()
    return rc


def _ask_agent(path, request):
    """The agent's reply to request; raises Unreachable or ValueError (a reply that is not JSON)."""
    hint = " (is felixpy-node running on this node?)"
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.settimeout(ACCEPT_TIMEOUT)
            sock.connect(path)
            sock.sendall(json.dumps(request).encode())
            sock.shutdown(_socket.SHUT_WR)
            chunks = [sock.recv(65536)]
        except (TimeoutError, BlockingIOError):
            raise Unreachable("%s: the agent did not accept the request within %d s%s"
                              % (path, ACCEPT_TIMEOUT, hint)) from None
        except (OSError, ValueError) as err:  # ValueError: a path with a NUL byte in it
            raise Unreachable("%s: %s%s" % (path, err, hint)) from None
        try:
            sock.settimeout(REPLY_TIMEOUT)
            while chunks[-1]:
                chunks.append(sock.recv(65536))
        except TimeoutError:
            raise Unreachable("%s: the agent did not answer within %d s" % (path, REPLY_TIMEOUT)) from None
        except OSError as err:
            raise Unreachable("%s: %s%s" % (path, err, hint)) from None
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ValueError("the agent's reply is not a JSON object")
    return reply


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
    request = {"env": cni_env, "config": config}
    try:
        reply = _ask_agent(path, request)
    except Unreachable as why:
        if command == "STATUS":
            return _error(version, NOT_AVAILABLE, "felixpy agent is not reachable", str(why)), 1
        if command == "DEL":
            return _delete_without_agent(version, path, request, str(why))
        return _error(version, TRY_AGAIN_LATER, "felixpy agent is not reachable", str(why)), 1
    except ValueError as err:
        return _error(version, TRY_AGAIN_LATER, "felixpy agent is not reachable",
                      "%s: %s (is felixpy-node running on this node?)" % (path, err)), 1
    if "error" in reply:
        failure = reply["error"]
        return _error(version, failure.get("code", IO_FAILURE), failure.get("msg", "error"),
                      failure.get("details", "")), 1
    return reply.get("result", {}), 0


# -- DEL without the agent (see the module docstring) --------------------------------------------

class _Failed(Exception):
    """One step of the agent-less DEL failed: (what, errno)."""


def _errno_text(what, code):
    return "%s: [Errno %d] %s" % (what, code, os.strerror(code))


def _delete_without_agent(version, path, request, why):
    env = request["env"]
    netns = env.get("CNI_NETNS", "")
    ifname = env.get("CNI_IFNAME", "")
    try:
        if netns and ifname and os.path.exists(netns):
            _remove_pod_veth(netns, ifname)
    except _Failed as err:
        return _error(version, IO_FAILURE, "failed to remove the pod's network interface without the agent",
                      _errno_text(*err.args)), 1
    try:
        spooled = _leave_for_agent(path, request)
    except _Failed as err:
        return _error(version, IO_FAILURE, "failed to record the DEL for the felixpy agent",
                      _errno_text(*err.args)), 1
    sys.stderr.write("felixpy-cni: agent unreachable (%s); pod veth removed, %s\n"
                     % (why, "address release left to the agent" if spooled else "no agent ever ran here"))
    return {}, 0


def _spool_name(container_id, ifname):
    """<containerID>.<ifname>.json with every byte outside [A-Za-z0-9_-] written as %XX."""
    def escape(text):
        return "".join(chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "_-") else "%%%02X" % b
                       for b in text.encode("utf-8", "surrogateescape"))
    return "%s.%s.json" % (escape(container_id), escape(ifname))


def _leave_for_agent(path, request):
    """Write the DEL request where the agent replays it; False when no agent ever ran here."""
    directory = path + PENDING_SUFFIX
    if not os.path.isdir(directory):
        return False
    name = _spool_name(request["env"].get("CNI_CONTAINERID", ""), request["env"].get("CNI_IFNAME", ""))
    if len(name) > 200:
        raise _Failed("pending file name for CNI_CONTAINERID", 36)  # ENAMETOOLONG
    final = directory + "/" + name
    temp = directory + "/." + name + ".tmp"
    data = json.dumps(request).encode()
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, final)  # the agent never sees half a file
    except OSError as err:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise _Failed(directory, err.errno or 0) from None
    return True


def _remove_pod_veth(netns, ifname):
    """Delete the veth called ifname inside the namespace at netns (nothing if absent or not a veth)."""
    import _struct  # noqa: PLC0415 - only this rare path pays for it

    try:
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as err:
        raise _Failed(netns, err.errno or 0) from None
    try:
        setns = getattr(os, "setns", None)  # Python 3.12+
        if setns is not None:
            try:
                setns(fd, CLONE_NEWNET)
            except OSError as err:
                raise _Failed("setns " + netns, err.errno or 0) from None
        else:
            import ctypes  # noqa: PLC0415

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise _Failed("setns " + netns, ctypes.get_errno())
    finally:
        os.close(fd)
    try:
        sock = _socket.socket(AF_NETLINK, _socket.SOCK_RAW, 0)
    except OSError as err:
        raise _Failed("netlink socket", err.errno or 0) from None
    try:
        name = ifname.encode() + b"\0"
        attr = _struct.pack("=HH", 4 + len(name), IFLA_IFNAME) + name + b"\0" * (-len(name) % 4)
        replies = _netlink(sock, RTM_GETLINK, 1, _struct.pack("=BxHiII", 0, 0, 0, 0, 0) + attr)
        if replies is None:
            return  # no such interface: already gone
        for kind, payload in replies:
            if kind != RTM_NEWLINK:
                continue
            index = _struct.unpack_from("=i", payload, 4)[0]
            if _link_kind(payload) != b"veth":
                return  # not ours to remove
            _netlink(sock, RTM_DELLINK, 2, _struct.pack("=BxHiII", 0, 0, index, 0, 0))
    finally:
        sock.close()


def _netlink(sock, msg_type, seq, body):
    """One request with an ack; the reply messages, or None when the kernel says ENODEV."""
    import _struct  # noqa: PLC0415

    what = "netlink " + ("link get" if msg_type == RTM_GETLINK else "link delete")
    try:
        sock.send(_struct.pack("=IHHII", 16 + len(body), msg_type, NLM_F_REQUEST_ACK, seq, 0) + body)
    except OSError as err:
        raise _Failed(what, err.errno or 0) from None
    replies = []  # type: list[tuple[int, bytes]]
    while True:
        try:
            data = sock.recv(1 << 16)
        except OSError as err:
            raise _Failed(what, err.errno or 0) from None
        offset = 0
        while offset + 16 <= len(data):
            length, kind, _flags, msg_seq, _pid = _struct.unpack_from("=IHHII", data, offset)
            if length < 16:
                raise _Failed(what, 74)  # EBADMSG
            payload = data[offset + 16:offset + length]
            offset += (length + 3) & ~3
            if msg_seq != seq:
                continue
            if kind == NLMSG_ERROR:
                code = -_struct.unpack_from("=i", payload)[0]
                if code == ENODEV:
                    return None
                if code:
                    raise _Failed(what, code)
                return replies
            replies.append((kind, payload))


def _link_kind(payload):
    """IFLA_INFO_KIND of an RTM_NEWLINK payload (after the 16-byte ifinfomsg), or None."""
    import _struct  # noqa: PLC0415

    def attrs(data, offset):
        while offset + 4 <= len(data):
            length, kind = _struct.unpack_from("=HH", data, offset)
            if length < 4:
                return
            yield kind & 0x3FFF, data[offset + 4:offset + length]
            offset += (length + 3) & ~3

    for kind, value in attrs(payload, 16):
        if kind == IFLA_LINKINFO:
            for inner, inner_value in attrs(value, 0):
                if inner == IFLA_INFO_KIND:
                    return inner_value.split(b"\0", 1)[0]
    return None


def main():
    stdin_text = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    obj, rc = run(os.environ, stdin_text)
    if rc == 0 and os.environ.get("CNI_COMMAND") in ("DEL", "STATUS", "GC") and not obj:
        return 0  # these print nothing on success
    return _emit(obj, rc)


if __name__ == "__main__":
    sys.exit(main())
