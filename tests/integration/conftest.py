"""Integration fixtures: the session's real Kubernetes control plane (tests/support/kube_cluster.py)."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.support.kube_cluster import KubeCluster, start_cluster


@pytest.fixture(scope="session")
def kube_cluster() -> Iterator[KubeCluster]:
    yield from start_cluster()


@pytest.fixture
def kube(kube_cluster: KubeCluster) -> Iterator[KubeCluster]:
    """The real cluster, emptied of test objects before and after the test."""
    kube_cluster.reset()
    try:
        yield kube_cluster
    finally:
        kube_cluster.reset()
