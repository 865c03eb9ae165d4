"""Shared fixtures: a real etcd server for the whole session, and a clean store per test."""

from __future__ import annotations

import os
import shutil
import threading
import traceback
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


# etcd3 0.12's watcher thread (named etcd3_watch_<id>) outlives a closed client: its next Watch call
# raises ValueError("Cannot invoke RPC: Channel closed!") and the thread dies. That is teardown
# noise, and the only thread death a test may ignore.
ETCD3_WATCH_THREAD_PREFIX = "etcd3_watch_"


def ignorable_thread_death(args: threading.ExceptHookArgs) -> bool:
    name = args.thread.name if args.thread is not None else ""
    return (name.startswith(ETCD3_WATCH_THREAD_PREFIX) and args.exc_type is ValueError
            and "channel closed" in str(args.exc_value).lower())


@pytest.fixture(autouse=True)
def fail_on_thread_exception() -> Iterator[None]:
    """An exception that kills any other thread (agent loop, watch, CNI server, a test's helper)
    fails the test that was running, with the thread's name and traceback."""
    died: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        if ignorable_thread_death(args):
            return
        name = args.thread.name if args.thread is not None else "<unknown>"
        died.append(f"thread {name} died:\n"
                    + "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    if died:
        pytest.fail("\n".join(died), pytrace=False)
