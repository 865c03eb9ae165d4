"""Open the datastore named by the environment, with calico-node's variable names (§1.5)."""

from __future__ import annotations

from typing import Mapping

from felixpy.datastore.api import Datastore


class DatastoreConfigError(ValueError):
    """The environment does not describe a usable datastore; the message is one line for the user."""


def _get(env: Mapping[str, str], name: str) -> str:
    # calico-node reads its datastore settings with envconfig prefix CALICO_: that spelling wins,
    # the bare name is the fallback.
    return env.get(f"CALICO_{name}") or env.get(name) or ""


def datastore_type(env: Mapping[str, str]) -> str:
    value = _get(env, "DATASTORE_TYPE").strip().lower()
    if not value:
        return "etcdv3" if _get(env, "ETCD_ENDPOINTS") else "kubernetes"
    if value not in ("etcdv3", "kubernetes"):
        raise DatastoreConfigError(
            f'DATASTORE_TYPE="{value}": accepted values are etcdv3, kubernetes')
    return value


def open_datastore(env: Mapping[str, str]) -> Datastore:
    kind = datastore_type(env)
    if kind == "kubernetes":
        from felixpy.datastore.kube import KubeConfigError, open_kube_datastore

        try:
            return open_kube_datastore(env)
        except KubeConfigError as err:
            raise DatastoreConfigError(str(err)) from None
    endpoints = [e.strip() for e in _get(env, "ETCD_ENDPOINTS").split(",") if e.strip()]
    if not endpoints:
        raise DatastoreConfigError(
            "ETCD_ENDPOINTS is not set: expected a comma list of http(s)://host:port")
    from felixpy.datastore.etcd import EtcdDatastore, parse_endpoint

    for e in endpoints:
        try:
            parse_endpoint(e)
        except ValueError:
            raise DatastoreConfigError(
                f'ETCD_ENDPOINTS="{e}": expected a comma list of http(s)://host:port') from None
    return EtcdDatastore(
        endpoints,
        ca_cert=_get(env, "ETCD_CA_CERT_FILE") or None,
        cert_key=_get(env, "ETCD_KEY_FILE") or None,
        cert_cert=_get(env, "ETCD_CERT_FILE") or None,
    )
