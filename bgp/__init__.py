"""BGP for felixpy: ExaBGP sidecar bridge, RIB and BIRD route-reflector config (arrives with the BGP issue).

Until then the agent's `vxlan` networking backend routes between nodes from the datastore
(docs/dataplane.md); this package is deliberately empty.
"""
