"""The policy table of test_policy.py on a lab whose datastore is a real kube-apiserver.

`felixpy-lab up --datastore kubernetes`: the Kubernetes NetworkPolicies are created through the
networking API and reach the agents as knp.default.* through their watch of the real server;
namespace and pod labels are the Namespace's and the Pod's; the agents run with the felixpy-node
ServiceAccount's token. The same cases, the same expected reachability, probed the same way,
over both families (a dual-stack lab: the pods' IPv6 addresses come from the real server's Pods).
"""

from __future__ import annotations

import pytest

from tests.e2e.test_policy import (  # noqa: F401  (the fixture and the tests, collected here again)
    test_calico_globalnetworkpolicy_and_delete,
    test_policy_case,
    world,
)

pytestmark = pytest.mark.e2e

LAB_NODES = 3
LAB_MODE = "routes"
LAB_ARGS = ["--datastore", "kubernetes", "--ip-family", "dual"]  # every case over IPv4 and IPv6, as test_policy
