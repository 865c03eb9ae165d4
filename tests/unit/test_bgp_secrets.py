"""BGP passwords from Secrets: the file and Kubernetes resolvers, and the controller's rendering."""

from __future__ import annotations

import base64
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from felixpy.calc.dispatcher import Dispatcher
from felixpy.datastore import keys
from felixpy.datastore.syncer import KVUpdate
from felixpy.node.bgp import BGPController, BGPPaths
from felixpy.node.secrets import SecretResolver
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
