"""BGP passwords from Secrets: the file and Kubernetes resolvers, and the controller's rendering."""

from __future__ import annotations

import base64
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.calc.dispatcher import Dispatcher
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.node.bgp import BGPController, BGPPaths, SecretsChanged
from felixpy.node.reflector import Reflector, ReflectorPaths
from felixpy.node.secrets import SecretResolver, SecretWatcher
from tests.support.fake_kube_api import FakeKubeAPI

MESH_REF = {"secretKeyRef": {"name": "bgp", "key": "mesh-password"}}


def _write(root: Path, name: str, key: str, value: bytes) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / key).write_bytes(value)


# -- the mounted directory ---------------------------------------------------------------------

def test_dir_resolves_exact_file_contents(tmp_path: Path) -> None:
    _write(tmp_path, "bgp", "mesh-password", b"s3cret\n")
    resolver = SecretResolver.from_env({"FELIXPY_SECRETS_DIR": str(tmp_path)})
    assert resolver.resolve_ref(MESH_REF, what="test") == "s3cret\n"
    assert resolver.resolve_ref(None, what="test") is None


def test_missing_secret_warns_once_then_again_after_it_was_found(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    resolver = SecretResolver(secrets_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="felixpy.node.secrets"):
        assert resolver.resolve("bgp", "mesh-password", what="mesh") is None
        assert resolver.resolve("bgp", "mesh-password", what="mesh") is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "secret=bgp" in warnings[0] and "key=mesh-password" in warnings[0]
    _write(tmp_path, "bgp", "mesh-password", b"pw")
    assert resolver.resolve("bgp", "mesh-password") == "pw"
    os.remove(tmp_path / "bgp" / "mesh-password")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="felixpy.node.secrets"):
        assert resolver.resolve("bgp", "mesh-password") is None  # deleted: no stale value kept
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@pytest.mark.parametrize("name,key", [("..", "x"), ("bgp", "../../etc/passwd"), ("a/b", "k"), ("", "k")])
def test_names_that_could_escape_the_directory_are_refused(tmp_path: Path, name: str, key: str) -> None:
    _write(tmp_path, "bgp", "k", b"pw")
    assert SecretResolver(secrets_dir=str(tmp_path / "bgp")).resolve(name, key) is None


def test_nothing_configured_resolves_nothing() -> None:
    resolver = SecretResolver.from_env({})
    assert not resolver.configured
    assert resolver.resolve("bgp", "mesh-password") is None


def test_empty_value_is_no_password(tmp_path: Path) -> None:
    _write(tmp_path, "bgp", "k", b"")
    assert SecretResolver(secrets_dir=str(tmp_path)).resolve("bgp", "k") is None


# -- the Kubernetes API ------------------------------------------------------------------------

@pytest.fixture
def fake() -> Iterator[FakeKubeAPI]:
    api = FakeKubeAPI().start()
    api.put("/api/v1/namespaces", {"metadata": {"name": "kube-system"}})
    try:
        yield api
    finally:
        api.stop()


def _kube_env(fake: FakeKubeAPI, tmp_path: Path, **extra: str) -> dict[str, str]:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(fake.kubeconfig())
    return {"KUBECONFIG": str(kubeconfig), **extra}


def test_kube_secret_in_kube_system(fake: FakeKubeAPI, tmp_path: Path) -> None:
    fake.put("/api/v1/namespaces/kube-system/secrets", {
        "metadata": {"name": "bgp"}, "type": "Opaque",
        "data": {"mesh-password": base64.b64encode("päss".encode()).decode()}})
    resolver = SecretResolver.from_env(_kube_env(fake, tmp_path))
    assert resolver.resolve_ref(MESH_REF, what="test") == "päss"
    assert resolver.resolve("bgp", "other-key") is None
    assert resolver.resolve("nope", "mesh-password") is None


def test_kube_namespace_from_env_and_directory_fallback(fake: FakeKubeAPI, tmp_path: Path) -> None:
    fake.put("/api/v1/namespaces", {"metadata": {"name": "calico-system"}})
    fake.put("/api/v1/namespaces/calico-system/secrets", {
        "metadata": {"name": "bgp"}, "data": {"mesh-password": base64.b64encode(b"from-api").decode()}})
    _write(tmp_path / "dir", "peer", "pw", b"from-dir")
    resolver = SecretResolver.from_env(_kube_env(
        fake, tmp_path, FELIXPY_SECRETS_NAMESPACE="calico-system", FELIXPY_SECRETS_DIR=str(tmp_path / "dir")))
    assert resolver.resolve("bgp", "mesh-password") == "from-api"
    assert resolver.resolve("peer", "pw") == "from-dir"  # not in the API: the directory answers


def test_kube_unreachable_keeps_last_value(fake: FakeKubeAPI, tmp_path: Path) -> None:
    fake.put("/api/v1/namespaces/kube-system/secrets", {
        "metadata": {"name": "bgp"}, "data": {"mesh-password": base64.b64encode(b"pw1").decode()}})
    resolver = SecretResolver.from_env(_kube_env(fake, tmp_path))
    assert resolver.resolve("bgp", "mesh-password") == "pw1"
    fake.stop()
    assert resolver.resolve("bgp", "mesh-password") == "pw1"  # an API outage does not drop MD5


# -- the controller ----------------------------------------------------------------------------

class _Link:
    def connect(self, timeout: float) -> None:
        raise AssertionError("not used")

    def close(self) -> None:
        pass


def _node(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"bgp": {"ipv4Address": f"{ip}/24"}}}


def _controller(tmp_path: Path, resolver: SecretResolver) -> BGPController:
    paths = BGPPaths.from_env({"FELIXPY_EXABGP_CONFIG": str(tmp_path / "exabgp.conf"),
                               "FELIXPY_EXABGP_PIDFILE": str(tmp_path / "exabgp.pid"),
                               "FELIXPY_BGP_SOCKET": str(tmp_path / "s.sock")}, str(tmp_path))
    ctl = BGPController("n1", paths, link=_Link(), reload=lambda: True, secrets=resolver)  # type: ignore[arg-type]
    _feed(ctl, "nodes", "n1", _node("n1", "192.0.2.11"))
    _feed(ctl, "nodes", "n2", _node("n2", "192.0.2.12"))
    ctl._datastore_synced = True
    return ctl


def _feed(ctl: BGPController, plural: str, name: str, value: dict[str, Any]) -> None:
    Dispatcher(ctl).on_update(KVUpdate(keys.resource_key(plural, name), value, 1))


def test_controller_renders_mesh_and_peer_passwords(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    _write(secrets_dir, "bgp", "mesh-password", b"mesh-pw")
    _write(secrets_dir, "peer-secret", "pw", b"peer-pw")
    ctl = _controller(tmp_path, SecretResolver(secrets_dir=str(secrets_dir)))
    _feed(ctl, "bgpconfigurations", "default",
          {"metadata": {"name": "default"}, "spec": {"nodeMeshPassword": MESH_REF}})
    _feed(ctl, "bgppeers", "ext", {"metadata": {"name": "ext"}, "spec": {
        "peerIP": "192.0.2.99", "asNumber": 65001,
        "password": {"secretKeyRef": {"name": "peer-secret", "key": "pw"}}}})
    ctl._update_config()
    text = (tmp_path / "exabgp.conf").read_text()
    assert f"md5-password {base64.b64encode(b'mesh-pw').decode()};" in text
    assert f"md5-password {base64.b64encode(b'peer-pw').decode()};" in text
    assert "mesh-pw" not in text  # only ever written base64-encoded


def test_controller_without_the_secret_renders_no_md5(tmp_path: Path) -> None:
    ctl = _controller(tmp_path, SecretResolver(secrets_dir=str(tmp_path / "secrets")))
    _feed(ctl, "bgpconfigurations", "default",
          {"metadata": {"name": "default"}, "spec": {"nodeMeshPassword": MESH_REF}})
    ctl._update_config()
    text = (tmp_path / "exabgp.conf").read_text()
    assert "192.0.2.12" in text and "md5" not in text


# -- no secret in a log line ---------------------------------------------------------------------

def test_resolved_values_are_redacted_from_every_log_line(tmp_path: Path) -> None:
    from felixpy.logs import REDACTED, REDACTOR, CalicoFormatter

    _write(tmp_path, "bgp", "mesh-password", b"hunter2-rotating")
    assert SecretResolver(secrets_dir=str(tmp_path)).resolve("bgp", "mesh-password") == "hunter2-rotating"
    record = logging.LogRecord("t", logging.ERROR, __file__, 1, "peer %s failed: %s", (
        "192.0.2.1", "md5 " + base64.b64encode(b"hunter2-rotating").decode() + " hunter2-rotating"), None)
    line = CalicoFormatter().format(record)
    assert "hunter2" not in line and line.count(REDACTED) == 2
    REDACTOR.clear()


# -- watching the Secrets in use -------------------------------------------------------------------

class _Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.event = threading.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()


REF = ("bgp", "mesh-password")


def test_watcher_reports_a_changed_file_once_per_new_value(tmp_path: Path) -> None:
    _write(tmp_path, *REF, b"pw1")
    resolver = SecretResolver(secrets_dir=str(tmp_path))
    assert resolver.resolve(*REF) == "pw1"
    changed = _Counter()
    watcher = SecretWatcher(resolver, changed, file_interval=3600)
    watcher.watch({REF})
    try:
        assert not watcher.check_files()  # what the owner rendered with
        _write(tmp_path, *REF, b"pw2")
        assert watcher.check_files() and changed.calls == 1
        assert not watcher.check_files() and changed.calls == 1  # not again before a render
        assert resolver.resolve(*REF) == "pw2"  # the owner renders
        assert not watcher.check_files()
        os.remove(tmp_path / "bgp" / "mesh-password")  # a deleted secret is a change too
        assert watcher.check_files() and changed.calls == 2
        assert resolver.resolve(*REF) is None
        _write(tmp_path, *REF, b"pw3")  # and so is one that appears
        assert watcher.check_files() and changed.calls == 3
    finally:
        watcher.stop()


def test_watcher_thread_notices_a_rotation(tmp_path: Path) -> None:
    _write(tmp_path, *REF, b"pw1")
    resolver = SecretResolver(secrets_dir=str(tmp_path))
    resolver.resolve(*REF)
    changed = _Counter()
    watcher = SecretWatcher(resolver, changed, file_interval=0.05)
    watcher.watch({REF})
    try:
        _write(tmp_path, *REF, b"pw2")
        assert changed.event.wait(5), "the file watcher did not report the new value"
    finally:
        watcher.stop()


def test_kube_watch_reports_a_modified_and_a_deleted_secret(fake: FakeKubeAPI, tmp_path: Path) -> None:
    path = "/api/v1/namespaces/kube-system/secrets"
    fake.put(path, {"metadata": {"name": "bgp"}, "data": {"mesh-password": base64.b64encode(b"pw1").decode()}})
    fake.put(path, {"metadata": {"name": "other"}, "data": {"k": base64.b64encode(b"x").decode()}})
    resolver = SecretResolver.from_env(_kube_env(fake, tmp_path))
    assert resolver.resolve(*REF) == "pw1"
    changed = _Counter()
    watcher = SecretWatcher(resolver, changed)
    watcher.watch({REF})
    try:
        _wait_for(lambda: any("watch=true" in p and "fieldSelector=metadata.name%3Dbgp" in p
                              for _, p in fake.requests), "the watch of Secret bgp")
        fake.modify(f"{path}/other", lambda o: o["data"].update(k="eQ=="))  # not ours: no report
        fake.modify(f"{path}/bgp", lambda o: o["data"].update({"mesh-password": "cHcy"}))  # pw2
        assert changed.event.wait(5), "the modification was not reported"
        assert changed.calls == 1 and resolver.resolve(*REF) == "pw2"
        changed.event.clear()
        fake_delete = fake._resolve(f"{path}/bgp")
        with fake._cond:
            fake._delete(fake_delete, None)
        assert changed.event.wait(5), "the deletion was not reported"
        assert resolver.resolve(*REF) is None
    finally:
        watcher.stop()


class _GetOnlyAPI:
    """The Kubernetes HTTP layer under RBAC that grants `get` only: list and watch answer 403."""

    def __init__(self) -> None:
        self.version = "1"
        self.gets = 0

    def request(self, method: str, path: str, query: dict[str, str] | None = None) -> dict[str, Any]:
        from felixpy.datastore.kube import _ApiError

        if query and "fieldSelector" in query:
            raise _ApiError(403, "Forbidden", 'secrets is forbidden: cannot list resource "secrets"')
        self.gets += 1
        return {"metadata": {"name": "bgp", "resourceVersion": self.version}, "data": {}}


def test_kube_watch_forbidden_falls_back_to_get(caplog: pytest.LogCaptureFixture) -> None:
    api = _GetOnlyAPI()
    resolver = SecretResolver(kube_http=lambda: api)
    changed = _Counter()
    watcher = SecretWatcher(resolver, changed, poll_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="felixpy.node.secrets"):
        watcher.watch({REF})
        try:
            _wait_for(lambda: any("RBAC grants get only" in r.getMessage() for r in caplog.records),
                      "the fallback warning")
            polled = api.gets
            _wait_for(lambda: api.gets >= polled + 3, "three more polls of the unchanged Secret")
            assert changed.calls == 0  # nothing to report for them
            api.version = "2"
            assert changed.event.wait(5), "the polled change was not reported"
        finally:
            watcher.stop()


def _wait_for(predicate: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# -- rotation reaches ExaBGP and BIRD ----------------------------------------------------------------

def test_controller_renders_the_rotated_password_and_reloads(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    _write(secrets_dir, *REF, b"pw-one")
    reloads: list[int] = []
    ctl = _controller(tmp_path, SecretResolver(secrets_dir=str(secrets_dir)))
    ctl._reload = lambda: bool(reloads.append(1)) or True
    _feed(ctl, "bgpconfigurations", "default",
          {"metadata": {"name": "default"}, "spec": {"nodeMeshPassword": MESH_REF}})
    ctl.sync()
    assert base64.b64encode(b"pw-one").decode() in (tmp_path / "exabgp.conf").read_text()
    assert ctl._secret_refs == {REF}
    _write(secrets_dir, *REF, b"pw-two")
    ctl.on_message(SecretsChanged())
    ctl.sync()
    text = (tmp_path / "exabgp.conf").read_text()
    assert base64.b64encode(b"pw-two").decode() in text and base64.b64encode(b"pw-one").decode() not in text
    assert len(reloads) == 2  # the first render, then the rotation: ExaBGP reloads, never restarts
    assert oct((tmp_path / "exabgp.conf").stat().st_mode & 0o777) == "0o600"


def test_reflector_resolves_the_same_secrets_and_follows_a_rotation(tmp_path: Path) -> None:
    from tests.unit.test_reflector import N1, FakeBird, cluster_setup

    secrets_dir = tmp_path / "secrets"
    _write(secrets_dir, "rr", "pw", b"rr-one")
    paths = ReflectorPaths(config=str(tmp_path / "bird.conf"), socket=str(tmp_path / "bird.ctl"),
                           status=str(tmp_path / "bgp-status.json"))
    bird = FakeBird()
    reflector = Reflector("rr1", paths, bird=bird, secrets=SecretResolver(secrets_dir=str(secrets_dir)))
    for update in cluster_setup():
        if update.key.endswith("/to-rr"):
            update = KVUpdate(update.key, {**update.value, "spec": {
                **update.value["spec"], "password": {"secretKeyRef": {"name": "rr", "key": "pw"}}}}, 1)
        reflector.on_update(update)
    reflector.datastore_in_sync()
    reflector.sync()
    text = Path(paths.config).read_text()
    client = text.split(f"protocol bgp Node_{N1.replace('.', '_')}")[1].split("}\n}")[0]
    assert 'password "rr-one";' in client and reflector.secret_refs == {("rr", "pw")}
    assert oct(Path(paths.config).stat().st_mode & 0o777) == "0o600"
    _write(secrets_dir, "rr", "pw", b"rr-two")
    reflector.secrets_changed()
    reflector.sync()
    assert 'password "rr-two";' in Path(paths.config).read_text()
    assert bird.configures == 2 and bird.starts == 0  # `birdc configure`, BIRD never restarted
