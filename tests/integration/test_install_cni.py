"""The static C CNI plugin (cni-shim/) against plugin.py, and install-cni into a temporary root.

The shim is built with make into a temporary directory (static, and once more with ASan/UBSan
when the compiler has them). Every case runs the shim and plugin.py side by side with the same
environment and stdin, against the same fake agent (a unix socket server in a thread), and
compares what the agent received and what each printed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from felixpy.cni import install, plugin

REPO = Path(__file__).resolve().parents[2]
SHIM_DIR = REPO / "cni-shim"
PLUGIN_PY = Path(plugin.__file__)
RUN_TIMEOUT = 20

BASE_ENV = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "c0ffee" * 10,
    "CNI_NETNS": "/var/run/netns/cni-1234",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
    "CNI_PATH": "/opt/cni/bin",
    # Not CNI_*: neither plugin may forward these.
    "HOME": "/root",
    "KUBECONFIG": "/etc/kubernetes/admin.conf",
}

pytestmark = pytest.mark.skipif(shutil.which("make") is None or shutil.which("cc") is None,
                                reason="needs make and a C compiler (apt-get install gcc make libc6-dev)")


def _build(out_dir: Path, *make_args: str) -> Path:
    subprocess.run(["make", "-s", "-C", str(SHIM_DIR), f"BUILD_DIR={out_dir}", *make_args],
                   check=True, capture_output=True, timeout=120)
    return out_dir / "felixpy-cni"


@pytest.fixture(scope="module")
def static_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("shim-static"))


@pytest.fixture(scope="module")
def asan_shim(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    try:
        return _build(tmp_path_factory.mktemp("shim-asan"), "LDFLAGS=",
                      "CFLAGS=-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all")
    except subprocess.CalledProcessError:
        return None  # no libasan/libubsan: the static build still runs every case


@pytest.fixture(params=["static", "asan"])
def shim(request: pytest.FixtureRequest, static_shim: Path, asan_shim: Path | None) -> Path:
    if request.param == "static":
        return static_shim
    if asan_shim is None:
        pytest.skip("the compiler has no AddressSanitizer/UBSan runtime")
    return asan_shim


# --------------------------------------------------------------------------------------------
# A fake agent
# --------------------------------------------------------------------------------------------


@dataclass
class FakeAgent:
    """Accepts connections on a unix socket, records each request, answers with `reply` bytes."""

    path: str
    reply: bytes = b'{"result": {}}'
    received: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(10)
                chunks = []
                while chunk := conn.recv(1 << 20):  # ends when the plugin shuts down its write side
                    chunks.append(chunk)
                self.received.append(b"".join(chunks))
                conn.sendall(self.reply)

    def requests(self) -> list[Any]:
        return [json.loads(r) for r in self.received]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()


@pytest.fixture
def agent() -> Iterator[FakeAgent]:
    with tempfile.TemporaryDirectory(prefix="fxtcni") as d:
        fake = FakeAgent(os.path.join(d, "agent.sock"))
        try:
            yield fake
        finally:
            fake.close()


@dataclass(frozen=True)
class Run:
    rc: int
    stdout: bytes
    stderr: bytes

    def json(self) -> Any:
        return json.loads(self.stdout)


def sanitizer_env(shim: Path) -> dict[str, str]:
    # A one-shot process frees nothing on purpose; leaks are not what the sanitizers are here for.
    return {"ASAN_OPTIONS": "detect_leaks=0"} if shim.parent.name.startswith("shim-asan") else {}


def run_shim(shim: Path, env: dict[str, str], stdin: bytes) -> Run:
    env = dict(env, **sanitizer_env(shim))
    out = subprocess.run([str(shim)], input=stdin, env=env, capture_output=True, timeout=RUN_TIMEOUT)
    assert b"Sanitizer" not in out.stderr and b"runtime error" not in out.stderr, out.stderr.decode()
    return Run(out.returncode, out.stdout, out.stderr)


def run_python(env: dict[str, str], stdin: bytes) -> Run:
    out = subprocess.run([sys.executable, "-I", "-S", str(PLUGIN_PY)], input=stdin, env=env,
                         capture_output=True, timeout=RUN_TIMEOUT)
    return Run(out.returncode, out.stdout, out.stderr)


def both(shim: Path, agent: FakeAgent | None, env: dict[str, str], config: bytes) -> tuple[Run, Run]:
    """Run the shim, then plugin.py, and check the agent got the same request from each."""
    before = len(agent.received) if agent else 0
    c_run = run_shim(shim, env, config)
    py_run = run_python(env, config)
    if agent is not None and len(agent.received) > before:
        c_req, py_req = [json.loads(r) for r in agent.received[before:before + 2]]
        assert c_req == py_req
    return c_run, py_run


def conf(agent_path: str, **extra: Any) -> bytes:
    return json.dumps({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "felixpy",
                       "agent_socket": agent_path, **extra}).encode()


# --------------------------------------------------------------------------------------------
# The executable itself
# --------------------------------------------------------------------------------------------


def _has_interpreter(path: Path) -> bool:
    """True when the ELF file names a dynamic loader (a PT_INTERP program header)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "expected a 64-bit ELF executable"
    endian = "<" if data[5] == 1 else ">"
    (phoff,) = struct.unpack_from(endian + "Q", data, 0x20)
    phentsize, phnum = struct.unpack_from(endian + "HH", data, 0x36)
    return any(struct.unpack_from(endian + "I", data, phoff + i * phentsize)[0] == 3 for i in range(phnum))


def test_the_shim_is_static(static_shim: Path) -> None:
    assert not _has_interpreter(static_shim)


def test_version_with_no_environment_but_the_command(shim: Path) -> None:
    stdin = b'{"cniVersion": "0.4.0"}'
    c_run = run_shim(shim, {"CNI_COMMAND": "VERSION"}, stdin)
    assert c_run.rc == 0
    obj, rc = plugin.run({"CNI_COMMAND": "VERSION"}, stdin.decode())
    assert c_run.json() == obj and rc == 0
    assert c_run.json()["supportedVersions"] == plugin.SUPPORTED_VERSIONS
    # No stdin at all: the default version, as plugin.py answers.
    assert run_shim(shim, {"CNI_COMMAND": "VERSION"}, b"").json()["cniVersion"] == "1.0.0"


def test_empty_environment_is_an_invalid_env_error_like_plugin_py(shim: Path) -> None:
    c_run = run_shim(shim, {}, b'{"cniVersion": "1.0.0"}')
    py_run = run_python({}, b'{"cniVersion": "1.0.0"}')
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout) == (1, py_run.stdout)
    assert c_run.json()["code"] == plugin.INVALID_ENV


def test_runs_in_an_empty_root_filesystem(static_shim: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy2(static_shim, root / "felixpy")
    out = subprocess.run(["/felixpy"], input=b'{"cniVersion": "1.0.0"}', env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, timeout=RUN_TIMEOUT, preexec_fn=lambda: os.chroot(root))
    assert out.returncode == 0, out.stderr
    assert "1.1.0" in json.loads(out.stdout)["supportedVersions"]


# --------------------------------------------------------------------------------------------
# Side by side with plugin.py
# --------------------------------------------------------------------------------------------


def test_add_forwards_the_same_request_and_prints_the_result(shim: Path, agent: FakeAgent) -> None:
    result = {"cniVersion": "1.0.0", "interfaces": [{"name": "cali0123456789a", "mac": "ee:ee:ee:ee:ee:ee"}],
              "ips": [{"address": "10.244.3.7/32", "interface": 0}]}
    agent.reply = json.dumps({"result": result}).encode()
    config = conf(agent.path, mtu=0, runtimeConfig={"portMappings": [{"hostPort": 8080, "containerPort": 80}]})
    c_run, py_run = both(shim, agent, dict(BASE_ENV), config)
    assert c_run.rc == py_run.rc == 0
    assert c_run.json() == py_run.json() == result
    request = agent.requests()[0]
    assert request["config"] == json.loads(config)
    assert request["env"] == {k: v for k, v in BASE_ENV.items() if k.startswith("CNI_")}


@pytest.mark.parametrize("command", ["DEL", "STATUS", "GC"])
def test_quiet_commands_print_nothing_on_success(shim: Path, agent: FakeAgent, command: str) -> None:
    agent.reply = b'{"result": {}}'
    c_run, py_run = both(shim, agent, dict(BASE_ENV, CNI_COMMAND=command), conf(agent.path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout) == (0, b"")
    assert [r["env"]["CNI_COMMAND"] for r in agent.requests()] == [command, command]


def test_check_with_an_empty_result_prints_it(shim: Path, agent: FakeAgent) -> None:
    agent.reply = b'{"result": {}}'
    c_run, py_run = both(shim, agent, dict(BASE_ENV, CNI_COMMAND="CHECK"), conf(agent.path))
    assert c_run.rc == py_run.rc == 0
    assert c_run.json() == py_run.json() == {}


def test_agent_error_is_printed_as_a_cni_error(shim: Path, agent: FakeAgent) -> None:
    agent.reply = json.dumps({"error": {"code": 7, "msg": "mtu must be an integer", "details": "got 'x'"}}).encode()
    c_run, py_run = both(shim, agent, dict(BASE_ENV), conf(agent.path, cniVersion="0.4.0"))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    assert c_run.rc == 1
    assert c_run.json() == {"cniVersion": "0.4.0", "code": 7, "msg": "mtu must be an integer", "details": "got 'x'"}


def test_agent_error_without_fields_gets_plugin_py_defaults(shim: Path, agent: FakeAgent) -> None:
    agent.reply = b'{"error": {}}'
    c_run, py_run = both(shim, agent, dict(BASE_ENV), conf(agent.path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    assert c_run.json() == {"cniVersion": "1.0.0", "code": plugin.IO_FAILURE, "msg": "error", "details": ""}


def test_escapes_unicode_and_duplicate_keys(shim: Path, agent: FakeAgent) -> None:
    agent.reply = b'{"result": {"cniVersion": "1.0.0", "note": "\\u00e9t\\u00e9 \\ud83d\\ude00"}}'
    # agent_socket spelled with escapes, and given twice: json.loads keeps the last one.
    escaped = "".join(f"\\u{ord(ch):04x}" for ch in agent.path)
    config = ('{"cniVersion": "1.0.0", "agent_socket": "/nonexistent/x.sock", "name": "n\\"\\\\\\/\\b\\f\\n\\r\\t",'
              ' "args": {"labels": {"app": "caf\u00e9 \u2603 \U0001f600"}}, "list": [1, -2.5e3, true, false, null, []],'
              f' "agent_socket": "{escaped}"}}').encode()
    env = dict(BASE_ENV, CNI_ARGS="K8S_POD_NAME=caf\u00e9;X=\"quoted\"\\back\tslash\x01")
    c_run, py_run = both(shim, agent, env, config)
    assert c_run.rc == py_run.rc == 0
    assert c_run.json() == py_run.json() == {"cniVersion": "1.0.0", "note": "\u00e9t\u00e9 \U0001f600"}
    assert len(agent.received) == 2
    assert agent.requests()[0]["env"]["CNI_ARGS"] == env["CNI_ARGS"]


def test_non_utf8_environment_values_arrive_as_python_sees_them(shim: Path, agent: FakeAgent) -> None:
    env = {k.encode(): v.encode() for k, v in BASE_ENV.items()}
    env[b"CNI_ARGS"] = b"K8S_POD_NAME=\xff\xfeodd"
    shim_env = env | {k.encode(): v.encode() for k, v in sanitizer_env(shim).items()}
    out = subprocess.run([str(shim)], input=conf(agent.path), env=shim_env, capture_output=True, timeout=RUN_TIMEOUT)
    py_out = subprocess.run([sys.executable, "-I", "-S", str(PLUGIN_PY)], input=conf(agent.path), env=env,
                            capture_output=True, timeout=RUN_TIMEOUT)
    assert out.returncode == py_out.returncode == 0
    c_req, py_req = agent.requests()
    assert c_req == py_req
    assert c_req["env"]["CNI_ARGS"] == "K8S_POD_NAME=\udcff\udcfeodd"


@pytest.mark.parametrize("stdin", [b"{not json", b'{"cniVersion": "1.0.0",}', b"[1, 2]", b'"text"',
                                   b'{"a": 1} {"b": 2}', b'{"a": "\x01"}', b'{"a": "\\x"}', b"\xef\xbb\xbf{}",
                                   b'{"a": 01}', b'{"a": 1.}', b'{"a": tru}'])
def test_malformed_stdin_is_a_decode_error(shim: Path, stdin: bytes) -> None:
    c_run, py_run = both(shim, None, dict(BASE_ENV), stdin)
    assert c_run.rc == py_run.rc == 1
    c_err, py_err = c_run.json(), py_run.json()
    assert c_err["code"] == py_err["code"] == plugin.DECODE_FAILURE
    assert c_err["msg"] == py_err["msg"] and c_err["cniVersion"] == py_err["cniVersion"]


@pytest.mark.parametrize("stdin", [b"", b"  \n\t ", b'{"cniVersion": "9.9.9"}', b'{"cniVersion": 1}'])
def test_empty_stdin_and_unsupported_versions_match_byte_for_byte(shim: Path, stdin: bytes) -> None:
    c_run, py_run = both(shim, None, dict(BASE_ENV), stdin)
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    assert c_run.rc == 1


@pytest.mark.parametrize("command", ["", "add", "AD'D", "DEL\n"])
def test_unknown_command_matches_byte_for_byte(shim: Path, command: str) -> None:
    c_run, py_run = both(shim, None, dict(BASE_ENV, CNI_COMMAND=command), b'{"cniVersion": "1.0.0"}')
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    assert c_run.json()["code"] == plugin.INVALID_ENV


def test_unreachable_agent_matches_byte_for_byte(shim: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.sock")
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(stale)
    s.close()  # the file stays, nobody listens: ECONNREFUSED
    for path in (missing, stale, "/" + "x" * 200):
        c_run, py_run = both(shim, None, dict(BASE_ENV), conf(path))
        assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
        err = c_run.json()
        assert (err["code"], err["msg"]) == (plugin.TRY_AGAIN_LATER, "felixpy agent is not reachable")
        assert err["details"].startswith(path + ": ")


@pytest.mark.parametrize("reply", [b"", b"garbage", b"[1]"])
def test_agent_answering_nonsense_is_try_again_later(shim: Path, agent: FakeAgent, reply: bytes) -> None:
    agent.reply = reply
    c_run = run_shim(shim, dict(BASE_ENV), conf(agent.path))
    assert c_run.rc == 1
    assert c_run.json()["code"] == plugin.TRY_AGAIN_LATER


def test_very_large_stdin_is_forwarded_whole(shim: Path, agent: FakeAgent) -> None:
    big = {f"k{i}": "v" * 100 + str(i) for i in range(40_000)}  # ≈ 4.6 MB
    nested: Any = ["deep"]
    for _ in range(100):
        nested = [nested]
    config = conf(agent.path, args=big, nested=nested)
    agent.reply = b'{"result": {"cniVersion": "1.0.0", "ips": []}}'
    c_run, py_run = both(shim, agent, dict(BASE_ENV), config)
    assert c_run.rc == py_run.rc == 0
    assert c_run.json() == {"cniVersion": "1.0.0", "ips": []}
    assert len(config) > 4_000_000
    assert agent.requests()[0]["config"] == json.loads(config)


# Random edits of valid configurations: the shim's scanner must agree with json.loads on what
# is valid JSON. VERSION echoes the config's cniVersion only when the whole stdin parsed, so
# comparing VERSION answers compares the two parsers, without any socket.
_SEEDS = [
    '{"cniVersion": "0.4.0", "name": "n", "plugins": [{"type": "felixpy", "mtu": 1450}]}',
    '{"cniVersion": "0.4.0", "a": [1, -2.5e+3, 0.0, true, false, null, {}], "b": "x\\ty\\u00e9"}',
    '{"cniVersion":"0.4.0","n":{"m":{"k":[[[]]]}},"s":"\\"\\\\\\/"}',
]
_ALPHABET = st.sampled_from(list('{}[]":,\\ 0123456789-+.eEtrufalsn\tabu'))


@st.composite
def _edited(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(_SEEDS))
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        ch = draw(_ALPHABET)
        if action == "insert":
            text = text[:pos] + ch + text[pos:]
        elif action == "delete":
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + ch + text[pos + 1:]
    return text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_edited())
def test_scanner_agrees_with_json_loads(static_shim: Path, text: str) -> None:
    c_run = run_shim(static_shim, {"CNI_COMMAND": "VERSION"}, text.encode())
    obj, _ = plugin.run({"CNI_COMMAND": "VERSION"}, text)
    assert c_run.rc == 0
    # json.dumps on both sides so that NaN compares equal to NaN
    assert json.dumps(c_run.json()) == json.dumps(json.loads(json.dumps(obj))), text


# --------------------------------------------------------------------------------------------
# install-cni into a temporary root
# --------------------------------------------------------------------------------------------


def _install_env(root: Path, shim_path: Path, **extra: str) -> dict[str, str]:
    return {"CNI_NET_DIR": str(root / "etc/cni/net.d"), "CNI_BIN_DIR": str(root / "opt/cni/bin"),
            "FELIXPY_CNI_SHIM": str(shim_path), "KUBERNETES_NODE_NAME": "node-1", **extra}


def test_install_cni_into_a_temporary_root(static_shim: Path, tmp_path: Path) -> None:
    rc = install.main([], _install_env(tmp_path, static_shim, CNI_MTU="1440"))
    assert rc == 0
    conflist_path = tmp_path / "etc/cni/net.d/10-felixpy.conflist"
    assert (conflist_path.stat().st_mode & 0o777) == 0o600
    conflist = json.loads(conflist_path.read_text())
    install.validate_conflist(conflist)
    assert conflist["name"] == "k8s-pod-network" and conflist["cniVersion"] in plugin.SUPPORTED_VERSIONS
    assert [p["type"] for p in conflist["plugins"]] == ["felixpy", "portmap"]
    assert conflist["plugins"][0] == {"type": "felixpy", "agent_socket": plugin.DEFAULT_SOCKET, "mtu": 1440}
    assert conflist["plugins"][1] == {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}}

    binary = tmp_path / "opt/cni/bin/felixpy"
    assert (binary.stat().st_mode & 0o777) == 0o755
    assert binary.read_bytes() == static_shim.read_bytes()
    assert not _has_interpreter(binary)
    # kubelet's view: the conflist's first plugin type, run from the bin dir with no PATH at all
    out = subprocess.run([str(tmp_path / "opt/cni/bin" / conflist["plugins"][0]["type"])],
                         input=json.dumps(conflist).encode(), env={"CNI_COMMAND": "VERSION"},
                         capture_output=True, timeout=RUN_TIMEOUT)
    assert out.returncode == 0
    assert json.loads(out.stdout)["cniVersion"] == conflist["cniVersion"]
    assert not list((tmp_path / "opt/cni/bin").glob(".felixpy.*")), "no temporary file left behind"


def test_install_cni_update_and_skip(static_shim: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "opt/cni/bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "felixpy").write_bytes(b"old")
    assert install.main([], _install_env(tmp_path, static_shim, UPDATE_CNI_BINARIES="false")) == 0
    assert (bin_dir / "felixpy").read_bytes() == b"old"
    assert install.main([], _install_env(tmp_path, static_shim, SKIP_CNI_BINARIES="felixpy")) == 0
    assert (bin_dir / "felixpy").read_bytes() == b"old"
    assert install.main([], _install_env(tmp_path, static_shim)) == 0
    assert (bin_dir / "felixpy").read_bytes() == static_shim.read_bytes()


def test_install_cni_refuses_a_broken_binary_and_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho nope\n")
    broken.chmod(0o755)
    assert install.main([], _install_env(tmp_path, broken)) == 1
    assert "answered VERSION with" in capsys.readouterr().err
    assert not (tmp_path / "etc/cni/net.d/10-felixpy.conflist").exists(), "no conflist without a working plugin"

    for env, words in [({"CNI_MTU": "9"}, "CNI_MTU"),
                       ({"CNI_NETWORK_CONFIG": '{"name": "x", "cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}'},
                        'no plugin in the network config has "type": "felixpy"'),
                       ({"CNI_NETWORK_CONFIG": '{"name": "x", "cniVersion": "1.0.0", "plugins": [{}]}'},
                        'plugins[0] needs a non-empty string "type"'),
                       ({"CNI_NETWORK_CONFIG": "{"}, "not valid JSON"),
                       ({"UPDATE_CNI_BINARIES": "maybe"}, "UPDATE_CNI_BINARIES")]:
        assert install.main([], _install_env(tmp_path, broken, **env)) == 1
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


# --------------------------------------------------------------------------------------------
# An agent that is absent, hung or slow (both plugins, same bytes out)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim with a 1 s reply timeout, so a slow agent is testable in seconds."""
    return _build(tmp_path_factory.mktemp("shim-quick"), "CFLAGS=-O2 -DREPLY_TIMEOUT=1")


def run_python_quick(env: dict[str, str], stdin: bytes) -> Run:
    """plugin.py with the same 1 s reply timeout as quick_shim."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import plugin; plugin.REPLY_TIMEOUT = 1; "
            "sys.exit(plugin.main())")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(PLUGIN_PY.parent)], input=stdin,
                         env=env, capture_output=True, timeout=RUN_TIMEOUT)
    return Run(out.returncode, out.stdout, out.stderr)


def timed(fn: Any, *args: Any) -> tuple[Run, float]:
    started = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - started


def test_status_without_an_agent_is_not_available(shim: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "missing.sock")
    c_run, py_run = both(shim, None, dict(BASE_ENV, CNI_COMMAND="STATUS"), conf(path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    err = c_run.json()
    assert (err["code"], err["msg"]) == (plugin.NOT_AVAILABLE, "felixpy agent is not reachable")


def test_a_hung_agent_fails_add_within_the_accept_timeout(shim: Path, tmp_path: Path) -> None:
    # Listening but never accepting (a stopped agent): the kernel completes the connect.
    path = str(tmp_path / "hung.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    try:
        c_run, c_took = timed(run_shim, shim, dict(BASE_ENV), conf(path))
        py_run, py_took = timed(run_python, dict(BASE_ENV), conf(path))
    finally:
        listener.close()
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    err = c_run.json()
    assert err["code"] == plugin.TRY_AGAIN_LATER
    assert f"did not accept the request within {plugin.ACCEPT_TIMEOUT} s" in err["details"]
    for took in (c_took, py_took):
        assert plugin.ACCEPT_TIMEOUT - 0.5 < took < plugin.ACCEPT_TIMEOUT + 2


@dataclass
class SlowAgent:
    """Accepts, says ACCEPTED at once like the real agent, then never answers."""

    path: str
    held: list[socket.socket] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(8)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.sendall(plugin.ACCEPTED.encode())
            self.held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.held:
            conn.close()
        self._sock.close()


def test_a_slow_agent_fails_add_after_the_reply_timeout(quick_shim: Path, tmp_path: Path) -> None:
    slow = SlowAgent(str(tmp_path / "slow.sock"))
    try:
        c_run = run_shim(quick_shim, dict(BASE_ENV), conf(slow.path))
        py_run = run_python_quick(dict(BASE_ENV), conf(slow.path))
    finally:
        slow.close()
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    err = c_run.json()
    assert err["code"] == plugin.TRY_AGAIN_LATER
    assert err["details"] == f"{slow.path}: the agent did not answer within 1 s"


def test_the_agents_accepted_byte_is_not_part_of_the_result(shim: Path, agent: FakeAgent) -> None:
    agent.reply = (plugin.ACCEPTED + json.dumps({"result": {"cniVersion": "1.0.0", "ips": []}})).encode()
    c_run, py_run = both(shim, agent, dict(BASE_ENV), conf(agent.path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout) == (0, b'{"cniVersion": "1.0.0", "ips": []}\n')


# --------------------------------------------------------------------------------------------
# DEL without the agent (root: real network namespaces)
# --------------------------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def sandboxes() -> Iterator[Callable[[str], str]]:
    made: list[str] = []
    prefix = "fxd" + secrets.token_hex(3)

    def make(kind: str) -> str:
        """A sandbox whose eth0 is a veth (its peer in the root namespace) or a bridge."""
        name = f"{prefix}{len(made)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        if kind == "veth":
            subprocess.run(["ip", "link", "add", f"{name}h", "type", "veth", "peer", "name", "eth0",
                            "netns", name], check=True)
        else:
            subprocess.run(["ip", "-n", name, "link", "add", "eth0", "type", kind], check=True)
        return name

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{name}h"], capture_output=True)


def links_in(netns_name: str) -> str:
    return subprocess.run(["ip", "-n", netns_name, "-o", "link", "show"], capture_output=True, text=True,
                          check=True).stdout


def del_env(netns_name: str, cid: str) -> dict[str, str]:
    return dict(BASE_ENV, CNI_COMMAND="DEL", CNI_CONTAINERID=cid, CNI_NETNS=f"/run/netns/{netns_name}")


@needs_root
@pytest.mark.parametrize("which", ["c", "python"])
def test_del_without_the_agent_removes_the_veth_and_leaves_the_release_to_the_agent(
        which: str, static_shim: Path, tmp_path: Path, sandboxes: Callable[[str], str]) -> None:
    path = str(tmp_path / "agent.sock")  # no agent: the socket does not even exist
    pending = tmp_path / ("agent.sock" + plugin.PENDING_SUFFIX)
    pending.mkdir()
    sandbox = sandboxes("veth")
    cid = "c0ffee/" + secrets.token_hex(4)  # a byte the file name must escape
    env = del_env(sandbox, cid)
    run = run_shim(static_shim, env, conf(path)) if which == "c" else run_python(env, conf(path))
    assert (run.rc, run.stdout) == (0, b""), run
    assert b"agent unreachable" in run.stderr
    assert "eth0" not in links_in(sandbox)
    assert subprocess.run(["ip", "link", "show", f"{sandbox}h"], capture_output=True).returncode != 0
    # What the agent will replay: the very request the plugin would have sent.
    files = os.listdir(pending)
    assert files == [f"c0ffee%2F{cid[7:]}.eth0.json"]
    request = json.loads((pending / files[0]).read_text())
    assert request == {"env": {k: v for k, v in env.items() if k.startswith("CNI_")},
                       "config": json.loads(conf(path))}
    # Idempotent: a second DEL finds nothing to remove and succeeds again.
    run = run_shim(static_shim, env, conf(path)) if which == "c" else run_python(env, conf(path))
    assert (run.rc, run.stdout) == (0, b"")


@needs_root
def test_del_without_the_agent_never_removes_what_is_not_a_veth(
        shim: Path, tmp_path: Path, sandboxes: Callable[[str], str]) -> None:
    sandbox = sandboxes("bridge")
    path = str(tmp_path / "agent.sock")
    c_run, py_run = both(shim, None, del_env(sandbox, "c" * 64), conf(path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout) == (0, b"")
    assert "eth0" in links_in(sandbox)


def test_del_without_the_agent_and_without_a_sandbox_succeeds(shim: Path, tmp_path: Path) -> None:
    # No pending directory either: no agent ever ran on this node, nothing to release.
    path = str(tmp_path / "agent.sock")
    env = dict(BASE_ENV, CNI_COMMAND="DEL", CNI_NETNS="/run/netns/fxd-never-existed")
    c_run, py_run = both(shim, None, env, conf(path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout) == (0, b"")
    assert os.listdir(tmp_path) == []


def test_del_without_the_agent_that_cannot_record_itself_fails(shim: Path, tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    pending = tmp_path / ("agent.sock" + plugin.PENDING_SUFFIX)
    (pending / ("c" * 64 + ".eth0.json")).mkdir(parents=True)  # the file's place is taken
    env = dict(BASE_ENV, CNI_COMMAND="DEL", CNI_CONTAINERID="c" * 64, CNI_NETNS="/run/netns/fxd-never-existed")
    c_run, py_run = both(shim, None, env, conf(path))
    assert (c_run.rc, c_run.stdout) == (py_run.rc, py_run.stdout)
    err = c_run.json()
    assert (err["code"], err["msg"]) == (plugin.IO_FAILURE, "failed to record the DEL for the felixpy agent")
    assert err["details"] == f"{pending}: [Errno 21] Is a directory"
    assert os.listdir(pending) == ["c" * 64 + ".eth0.json"]  # no temporary file left behind
