"""felixpy: a Calico-style Kubernetes networking agent in Python."""

__version__ = "0.1.0"
