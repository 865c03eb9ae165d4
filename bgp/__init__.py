"""BGP building blocks for felixpy: peer selection, ExaBGP/BIRD config, the ExaBGP sidecar and a RIB.

Modules (see docs/bgp.md): `peers` (Calico's peer selection), `config` (ExaBGP conf + env),
`bird` (BIRD 2 route-reflector conf), `protocol` (ExaBGP commands, JSON → events, socket codec),
`rib` (best path, graceful restart), `sidecar` (ExaBGP's API process, `python -m bgp.sidecar`),
`client` (the agent side of the sidecar socket).

This package is fed plain values and never imports felixpy; felixpy imports it.
"""
