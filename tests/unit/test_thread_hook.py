"""tests/conftest.py's thread-exception hook: a thread that dies fails the test it ran in, except
etcd3's watcher dying on its closed channel. Run in a child pytest (pytester) with that hook."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = "from tests.conftest import fail_on_thread_exception  # noqa: F401\n"

TESTS = '''
import threading

def _die(name, exc):
    def run():
        raise exc
    t = threading.Thread(target=run, name=name)
    t.start()
    t.join()

def test_worker_dies():
    _die("agent-loop", RuntimeError("boom in the agent loop"))

def test_etcd3_watcher_closed_channel():
    _die("etcd3_watch_7f00", ValueError("Cannot invoke RPC: Channel closed!"))

def test_etcd3_watcher_other_error():
    _die("etcd3_watch_7f01", KeyError("not teardown noise"))

def test_no_thread():
    assert True
'''


def test_a_dead_thread_fails_its_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_threads=TESTS)
    result = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    out = result.stdout.str()
    # The hook fails the test at its teardown: an ERROR for exactly the two tests whose thread died.
    assert result.parseoutcomes().get("errors") == 2, out
    result.stdout.fnmatch_lines_random(["ERROR test_threads.py::test_worker_dies - Failed: thread agent-loop died*",
                                        "ERROR test_threads.py::test_etcd3_watcher_other_error - Failed: *"])
    assert "thread agent-loop died" in out and "RuntimeError: boom in the agent loop" in out
    assert "thread etcd3_watch_7f01 died" in out
    assert "etcd3_watch_7f00" not in out
