"""felixctl's calicoctl-like tables."""

from __future__ import annotations

from felixpy.ctl import output


def test_workload_column_shows_the_pod_of_a_kubernetes_endpoint() -> None:
    pod_endpoint = {"kind": "WorkloadEndpoint", "metadata": {"name": "n1-k8s-web-eth0", "namespace": "ns1"},
                    "spec": {"node": "n1", "pod": "web", "interfaceName": "cali1", "ipNetworks": ["10.0.0.1/32"]}}
    other = {"kind": "WorkloadEndpoint", "metadata": {"name": "n1-cni-x-eth0", "namespace": "ns1"},
             "spec": {"node": "n1", "workload": "vm-7", "interfaceName": "cali2", "ipNetworks": ["10.0.0.2/32"]}}
    header, *rows = output.table("WorkloadEndpoint", [pod_endpoint, other]).splitlines()
    assert header.split() == ["NAMESPACE", "WORKLOAD", "NODE", "NETWORKS", "INTERFACE"]
    assert [row.split() for row in rows] == [["ns1", "web", "n1", "10.0.0.1/32", "cali1"],
                                             ["ns1", "vm-7", "n1", "10.0.0.2/32", "cali2"]]
