"""test_host_endpoints.py on a lab whose datastore is a real kube-apiserver.

`felixpy-lab up --datastore kubernetes`: the HostEndpoint, the Tier and the Calico policies are
CRDs the agents watch on the real server, the service accounts are ServiceAccounts (served as
ksa.<ns>.<sa> profiles) and the pods run as them. Same preDNAT NodePort, doNotTrack echo, tiers
and service account cases, probed the same way.
"""

from __future__ import annotations

import pytest

from tests.e2e.test_host_endpoints import (  # noqa: F401  (the fixture and the tests, collected here again)
    test_do_not_track_policy_leaves_no_conntrack_entry,
    test_pre_dnat_policy_blocks_a_node_port_before_dnat,
    test_service_account_selectors,
    test_tiers_with_pass,
    world,
)

pytestmark = pytest.mark.e2e

LAB_NODES = 2
LAB_MODE = "routes"
LAB_ARGS = ["--datastore", "kubernetes"]
