"""felixpy-controllers: the cluster-wide controllers (what Calico's kube-controllers does).

One process, one replica: IPAM garbage collection (`ipam_gc.py`) and the cleanup of deleted
nodes' block affinities and empty blocks (`nodes.py`), reconciled periodically and on datastore
changes by `main.py`. Which pods exist is asked through `pods.PodIndex`, so the source of truth
(WorkloadEndpoints in the datastore, or the Kubernetes pod list) can change without touching the
collector.
"""
