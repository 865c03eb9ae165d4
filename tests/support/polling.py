"""Bounded polling for tests that watch a thread (an agent loop) reach a state."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(pred: Callable[[], Any], timeout: float = 5.0) -> None:
    """Return once `pred()` is true; AssertionError if it is still false after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.01)
    if not pred():
        raise AssertionError(f"condition not met within {timeout} s")
