"""Shared fixtures: a real etcd server for the whole session, and a clean store per test."""

from __future__ import annotations

import os
import shutil
from typing import Iterator

import pytest

from tests.support.etcd_server import EtcdServer, start_etcd


def _is_root() -> bool:
    return os.geteuid() == 0


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    if shutil.which("etcd") is None and not os.path.exists("/usr/bin/etcd"):
        pytest.skip("etcd is not installed (apt-get install etcd-server)")
    server = start_etcd()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def etcd_endpoint(etcd_server: EtcdServer) -> str:
    return etcd_server.endpoint


@pytest.fixture
def etcd_store(etcd_endpoint: str) -> Iterator["object"]:
    from felixpy.datastore.etcd import EtcdDatastore

    store = EtcdDatastore([etcd_endpoint])
    store.delete_prefix("/calico/")
    try:
        yield store
    finally:
        store.delete_prefix("/calico/")
        store.close()


@pytest.fixture
def needs_root() -> None:
    if not _is_root():
        pytest.skip("needs root")
