"""End-to-end harness: every test module drives its own felixpy-lab cluster through the real CLI.

The lab is started with a unique name ("e2e" + 4 hex chars) so runs never collide, and torn down
in a finalizer even when the test fails. A module picks its size with LAB_NODES (default 3) and its
mode with LAB_MODE (default "routes"; test_bgp.py uses "bgp"), and any further `up` options with
LAB_ARGS (test_cross_subnet.py: ["--cross-subnet"]). Everything is driven the way a user would: subprocesses
of `python -m felixpy.lab.cli`, never the lab's internals.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from typing import Iterator

import pytest

from tests.e2e.labtools import Lab, skip_reason


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    nodes = getattr(request.module, "LAB_NODES", 3)
    # The lab's default mode is bgp; modules written for the datastore-routed mode say so.
    mode = getattr(request.module, "LAB_MODE", "routes")
    extra = [str(a) for a in getattr(request.module, "LAB_ARGS", ())]  # e.g. ["--cross-subnet"]
    the_lab = Lab("e2e" + secrets.token_hex(2))
    try:
        the_lab.cli("up", "--nodes", str(nodes), "--mode", mode, *extra, timeout=180)
        yield the_lab
    except BaseException:
        for n in range(1, nodes + 1):
            sys.stderr.write(f"--- agent log n{n} ---\n{the_lab.agent_log(f'n{n}')}\n")
        raise
    finally:
        subprocess.run([sys.executable, "-m", "felixpy.lab.cli", "down", "--name", the_lab.name],
                       capture_output=True, text=True, timeout=60)
