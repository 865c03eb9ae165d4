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


def directory_under_tests(relpath: str) -> str:
    """"e2e" for tests/e2e/test_x.py: the directory under tests/ a test file sits in."""
    parts = relpath.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] == "tests" else ""


def xdist_group_for(relpath: str) -> str:
    """The pytest-xdist work unit a test file belongs to (scripts/test.sh: `-n 2 --dist loadgroup`).

    Each e2e module is one unit, so its module-scoped lab starts once, on one worker (labs have
    unique names and live in their own namespaces, so two run side by side, as they do whenever
    several people use this machine). All of tests/integration is one unit: it shares one session
    etcd and one Kubernetes control plane, and some of it works in the root namespace, so it stays
    serial, on one worker, while the other worker runs e2e modules. The unit tests are one unit too:
    they are quick, and one unit keeps their session fixtures to one worker.
    """
    directory = directory_under_tests(relpath)
    return relpath if directory == "e2e" else directory or "other"


# Longest units first, so no long unit starts last and leaves the other worker idle at the end:
# tests/integration (one serial unit of several minutes), then the e2e modules, then the quick
# unit tests. The sort is stable: the order inside each directory is unchanged.
DIRECTORY_ORDER = {"integration": 0, "e2e": 1}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only pytest-xdist workers collect under `-n`
        return
    relpaths: dict[str, str] = {}
    for item in items:
        try:
            relpath = item.path.relative_to(config.rootpath).as_posix()
        except ValueError:
            relpath = item.path.as_posix()
        relpaths[item.nodeid] = relpath
        item.add_marker(pytest.mark.xdist_group(xdist_group_for(relpath)))
    items.sort(key=lambda item: DIRECTORY_ORDER.get(directory_under_tests(relpaths[item.nodeid]), 2))


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
