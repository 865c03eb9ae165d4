"""The agent side of the CNI plugin: ADD / DEL / CHECK / STATUS / GC over a unix socket.

felixpy-cni forwards kubelet's request here, so the work happens in a process that already has a
warm datastore connection and knows its node: IPAM (handle `<network>.<containerID>`), the pod's
veth pair, and the WorkloadEndpoint. ADD answers only once the dataplane has programmed the pod's
route, so a pod has connectivity when kubelet starts its containers. Which addresses a pod gets
follows Calico's pod and namespace annotations and network config (cni/ipam_request.py).

Failure: anything that fails after IPAM releases what ADD allocated and removes the veth, so a
failed ADD leaves nothing behind. DEL is idempotent and releases by handle even when the pod's
network namespace is already gone. While a migration holds the datastore locked (ClusterInformation
datastoreReady=false) ADD and DEL are refused with Calico's "not ready" error, before any change.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from felixpy import names
from felixpy.cni import ipam_request
from felixpy.cni.plugin import (
    CONTAINER_UNKNOWN,
    DECODE_FAILURE,
    DEFAULT_VERSION,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    NOT_AVAILABLE,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
)
from felixpy.datastore import keys
from felixpy.datastore.api import Conflict, Datastore, DatastoreError, NotFound
from felixpy.datastore.cas import TooManyConflicts, read_modify_write
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.errors import IPAMError
from felixpy.ipam.lock import DatastoreLockedError
from felixpy.ipam.pools import USE_WORKLOAD
from felixpy.kernel import veth

log = logging.getLogger(__name__)

PROGRAMMED_TIMEOUT = 10.0
NOT_READY = "Calico is currently not ready to process requests"  # Calico's plugin, word for word
NAMESPACE_CACHE_TTL = 1.0  # seconds; as IPAM's pool cache (a change is seen by pods started after it)
CAS_RETRIES = 10


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def parse_cni_args(text: str) -> dict[str, str]:
    args = {}
    for item in text.split(";"):
        if "=" in item:
            k, _, v = item.partition("=")
            args[k.strip()] = v.strip()
    return args


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str
    ifname: str
    namespace: str
    pod: str
    network: str
    version: str
    config: dict[str, Any]

    @property
    def handle(self) -> str:
        return names.ipam_handle(self.container_id, self.network)


def parse_request(raw: dict[str, Any]) -> Request:
    env = raw.get("env") or {}
    config = raw.get("config")
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network configuration must be a JSON object")
    version = str(config.get("cniVersion", DEFAULT_VERSION))
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(INCOMPATIBLE_VERSION, f"unsupported cniVersion {version}")
    command = env.get("CNI_COMMAND", "")
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    needed = {"ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
              "DEL": ("CNI_CONTAINERID", "CNI_IFNAME")}.get(command, ())
    missing = [name for name in needed if not env.get(name)]
    if missing:
        raise CNIError(INVALID_ENV, f"required environment variable {missing[0]} is not set",
                       f"CNI_COMMAND={command} needs {', '.join(needed)}")
    namespace = args.get("K8S_POD_NAMESPACE", "")
    pod = args.get("K8S_POD_NAME", "")
    if command in ("ADD", "CHECK") and not (namespace and pod):
        raise CNIError(INVALID_ENV, "CNI_ARGS must carry K8S_POD_NAMESPACE and K8S_POD_NAME",
                       f"CNI_ARGS={env.get('CNI_ARGS', '')!r}")
    mtu = config.get("mtu", 0)
    if not isinstance(mtu, int) or mtu < 0 or mtu > 65535:
        raise CNIError(INVALID_CONFIG, f"mtu must be an integer 0..65535 (0 = auto), got {mtu!r}")
    return Request(
        command=command,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", "eth0"),
        namespace=namespace,
        pod=pod,
        network=str(config.get("name") or names.DEFAULT_NETWORK_NAME),
        version=version,
        config=config,
    )


class CNIHandler:
    """Does the work of each CNI command; called from the server's threads."""

    def __init__(
        self,
        *,
        store: Datastore,
        node_name: str,
        mtu: int,
        node_labels: Callable[[], dict[str, str]],
        wait_programmed: Callable[[str, int, float], bool],
        ready: Callable[[], tuple[bool, str]],
        iface_prefix: str = names.WORKLOAD_IFACE_PREFIX,
        observe: Callable[[str, float], None] | None = None,
        datastore_ready: Callable[[], bool] = lambda: True,
        pod_annotations: Callable[[str, str], Mapping[str, str]] | None = None,
    ) -> None:
        self.store = store
        self._observe = observe  # (CNI command, seconds) for every request, e.g. a metrics histogram
        self.node_name = node_name
        self.mtu = mtu
        # The migration lock (ClusterInformation datastoreReady=false), as the agent's config
        # watch last saw it: ADD and DEL are refused as Calico's plugin refuses them, and the
        # IPAM writes of anything else stop at IPAM's write boundary (ipam/lock.py).
        self._datastore_ready = datastore_ready
        self.ipam = IPAM(store, write_guard=self._check_unlocked)
        self._node_labels = node_labels
        self._wait_programmed = wait_programmed
        self._ready = ready
        self._iface_prefix = iface_prefix
        # The pod's annotations from the Kubernetes API, when one is configured and the runtime
        # did not pass them (ipam_request.py); without either a pod has no annotations.
        self._pod_annotations = pod_annotations
        # Like Calico's host-wide IPAM lock: pods on one node allocate one at a time, which keeps
        # compare-and-swap conflicts on the node's own blocks away from the hot path.
        self._ipam_lock = threading.Lock()
        # Namespace labels and annotations, kept for NAMESPACE_CACHE_TTL like IPAM's pools: pods
        # of one deployment start in bursts in one namespace. Read under _ipam_lock only.
        self._namespaces: dict[str, tuple[float, ipam_request.Metadata]] = {}

    def handle(self, raw: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            req = parse_request(raw)
            op = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                  "STATUS": self.status, "GC": self.gc}.get(req.command)
            if op is None:
                raise CNIError(INVALID_ENV, f"unsupported CNI_COMMAND {req.command!r}")
            result = op(req)
            log.info("cni %s ok container=%s pod=%s/%s seconds=%.4f", req.command,
                     req.container_id[:12], req.namespace, req.pod, time.monotonic() - started)
            return {"result": result}
        except CNIError as err:
            log.warning("cni request failed code=%d msg=%s details=%s", err.code, err.msg, err.details)
            return {"error": {"code": err.code, "msg": err.msg, "details": err.details}}
        except DatastoreLockedError as err:
            log.warning("cni request refused: %s", err)
            return {"error": {"code": TRY_AGAIN_LATER, "msg": NOT_READY, "details": str(err)}}
        except ipam_request.RequestError as err:
            log.warning("cni ipam request refused: %s", err)
            return {"error": {"code": INVALID_CONFIG, "msg": str(err), "details": ""}}
        except IPAMError as err:
            log.warning("cni ipam failed: %s", err)
            return {"error": {"code": IO_FAILURE, "msg": "IPAM failed", "details": str(err)}}
        except DatastoreError as err:
            log.warning("cni datastore failed: %s", err)
            return {"error": {"code": TRY_AGAIN_LATER, "msg": "datastore unavailable", "details": str(err)}}
        finally:
            if self._observe is not None:
                command = (raw.get("env") or {}).get("CNI_COMMAND", "") if isinstance(raw, dict) else ""
                self._observe(str(command) or "unknown", time.monotonic() - started)

    def _check_unlocked(self) -> None:
        if not self._datastore_ready():
            raise DatastoreLockedError()

    # -- ADD -------------------------------------------------------------------------------
    def add(self, req: Request) -> dict[str, Any]:
        self._check_unlocked()  # before anything is plumbed, as Calico's cmdAdd checks first
        host_iface = names.workload_iface_name(req.namespace, req.pod, self._iface_prefix)
        mtu = req.config.get("mtu") or self.mtu
        with self._ipam_lock:
            ips = self.ipam.ips_by_handle(req.handle)  # a repeated ADD reuses its address
            if not ips:
                ips = self._assign(req)
        try:
            plumbing = veth.setup_workload(
                netns_path=req.netns, host_iface=host_iface, container_iface=req.ifname,
                ips=[ipaddress.IPv4Interface(f"{ip}/32") for ip in ips], mtu=mtu)
            kv = self._write_endpoint(req, host_iface, ips, plumbing.container_mac)
        except BaseException as err:
            self._undo_add(req, host_iface)
            if isinstance(err, veth.PlumbingError):
                raise CNIError(IO_FAILURE, "failed to set up the pod's network interface", str(err)) from None
            raise
        if not self._wait_programmed(kv.key, kv.revision, PROGRAMMED_TIMEOUT):
            # The pod is plumbed and recorded; the agent keeps trying to program its route.
            log.warning("cni add: route not programmed within %.0fs pod=%s/%s",
                        PROGRAMMED_TIMEOUT, req.namespace, req.pod)
        return self._result(req, host_iface, ips, plumbing.container_mac)

    def _assign(self, req: Request) -> list[Any]:
        """The pod's addresses as its annotations and the network config ask (ipam_request.py)."""
        pod = ipam_request.runtime_pod_annotations(req.config)
        if pod is None:
            pod = self._pod_annotations(req.namespace, req.pod) if self._pod_annotations else {}
        def ns() -> ipam_request.Metadata:  # read only if something needs it
            cached = self._namespaces.get(req.namespace)
            now = time.monotonic()
            if cached is None or now - cached[0] >= NAMESPACE_CACHE_TTL:
                cached = (now, ipam_request.namespace_metadata(self.store, req.namespace))
                if len(self._namespaces) > 1000:
                    self._namespaces.clear()
                self._namespaces[req.namespace] = cached
            return cached[1]

        want = ipam_request.ip_request(pod, ns, req.config)
        if want.bypass_ipam:
            log.info("cni add without IPAM (ipAddrsNoIpam) pod=%s/%s ips=%s", req.namespace, req.pod,
                     ",".join(map(str, want.ips)))
            return list(want.ips)
        attrs = {"node": self.node_name, "namespace": req.namespace, "pod": req.pod,
                 "timestamp": time.strftime("%Y-%m-%d %H:%M:%S +0000 UTC", time.gmtime())}
        if want.ips:
            self._release_previous_sandbox(req)
            for ip in want.ips:
                self.ipam.assign_ip(ip, handle=req.handle, attrs=attrs, node=self.node_name, use=USE_WORKLOAD)
            return list(want.ips)
        return self.ipam.auto_assign(num=1, handle=req.handle, attrs=attrs, node=self.node_name,
                                     node_labels=self._node_labels(), pools=want.pools, use=USE_WORKLOAD,
                                     namespace_labels=lambda: ns().labels)

    def _release_previous_sandbox(self, req: Request) -> None:
        """With ipAddrs, an endpoint left by an earlier sandbox of the same pod still holds the
        wanted address: release its addresses first, as Calico's plugin does."""
        name = names.workload_endpoint_name(self.node_name, req.pod, req.ifname)
        try:
            kv = self.store.get(keys.resource_key("workloadendpoints", name, req.namespace))
        except NotFound:
            return
        spec = (kv.value or {}).get("spec") or {}
        if spec.get("containerID") == req.container_id:
            return
        old = [str(n).split("/")[0] for n in spec.get("ipNetworks") or []]
        if old:
            log.info("cni add: releasing the addresses of the pod's previous sandbox pod=%s/%s ips=%s",
                     req.namespace, req.pod, ",".join(old))
            self.ipam.release_ips(old)

    def _undo_add(self, req: Request, host_iface: str) -> None:
        try:
            veth.teardown_workload(host_iface=host_iface, netns_path=req.netns,
                                   container_iface=req.ifname)
        except veth.PlumbingError as err:
            log.warning("cni add cleanup: %s", err)
        with self._ipam_lock:
            self.ipam.release_by_handle(req.handle)

    def _write_endpoint(self, req: Request, host_iface: str, ips: list[Any], mac: str) -> Any:
        name = names.workload_endpoint_name(self.node_name, req.pod, req.ifname)
        key = keys.resource_key("workloadendpoints", name, req.namespace)

        def change(old: Any) -> dict[str, Any]:
            # Labels and named ports come from the orchestrator side (kube-controllers in etcd
            # mode, the lab): keep what is there, own the rest.
            old = old or {}
            labels = dict((old.get("metadata") or {}).get("labels") or {})
            labels.setdefault("projectcalico.org/namespace", req.namespace)
            labels.setdefault("projectcalico.org/orchestrator", "k8s")
            return {
                "apiVersion": "projectcalico.org/v3",
                "kind": "WorkloadEndpoint",
                "metadata": {"name": name, "namespace": req.namespace, "labels": labels},
                "spec": {
                    "orchestrator": "k8s",
                    "node": self.node_name,
                    "containerID": req.container_id,
                    "pod": req.pod,
                    "endpoint": req.ifname,
                    "interfaceName": host_iface,
                    "ipNetworks": [f"{ip}/32" for ip in ips],
                    "mac": mac,
                    "profiles": [f"kns.{req.namespace}"],
                    "ports": list((old.get("spec") or {}).get("ports") or []),
                },
            }

        try:
            return read_modify_write(self.store, key, change, retries=CAS_RETRIES)
        except TooManyConflicts as err:
            raise CNIError(TRY_AGAIN_LATER, "could not write the WorkloadEndpoint", str(err)) from None

    def _result(self, req: Request, host_iface: str, ips: list[Any], mac: str) -> dict[str, Any]:
        old = req.version.startswith("0.3") or req.version.startswith("0.4")
        ip_entries = []
        for ip in ips:
            entry: dict[str, Any] = {"address": f"{ip}/32", "interface": 1}
            if old:
                entry["version"] = "4"
            ip_entries.append(entry)
        return {
            "cniVersion": req.version,
            "interfaces": [
                {"name": host_iface, "mac": names.HOST_VETH_MAC},
                {"name": req.ifname, "mac": mac, "sandbox": req.netns},
            ],
            "ips": ip_entries,
            "routes": [{"dst": "0.0.0.0/0", "gw": names.POD_GATEWAY}],
            "dns": {},
        }

    # -- DEL -------------------------------------------------------------------------------
    def delete(self, req: Request) -> dict[str, Any]:
        self._check_unlocked()  # Calico's cmdDel refuses too: kubelet retries the DEL later
        with self._ipam_lock:
            released = self.ipam.release_by_handle(req.handle)
            if req.namespace and req.pod:  # Calico's legacy workload-ID handle
                released += self.ipam.release_by_handle(f"{req.namespace}.{req.pod}")
        endpoint = self._find_endpoint(req)
        host_iface = None
        if req.namespace and req.pod:
            host_iface = names.workload_iface_name(req.namespace, req.pod, self._iface_prefix)
        if endpoint is not None:
            host_iface = endpoint.value["spec"].get("interfaceName") or host_iface
        if host_iface:
            try:
                veth.teardown_workload(host_iface=host_iface, netns_path=req.netns or None,
                                       container_iface=req.ifname)
            except veth.PlumbingError as err:
                raise CNIError(IO_FAILURE, "failed to remove the pod's network interface", str(err)) from None
        if endpoint is not None:
            try:
                self.store.delete(endpoint.key, endpoint.revision)
            except (NotFound, Conflict):
                pass  # deleted or re-created by a newer sandbox meanwhile: not ours to remove
        log.debug("cni del released=%s", released)
        return {}

    def _find_endpoint(self, req: Request) -> Any:
        """The WorkloadEndpoint of this sandbox, or None (only ever the one with our containerID)."""
        if req.namespace and req.pod:
            name = names.workload_endpoint_name(self.node_name, req.pod, req.ifname)
            key = keys.resource_key("workloadendpoints", name, req.namespace)
            try:
                kv = self.store.get(key)
            except NotFound:
                return None
            return kv if kv.value.get("spec", {}).get("containerID") == req.container_id else None
        items, _ = self.store.list(keys.resource_prefix("workloadendpoints"))
        for kv in items:
            spec = kv.value.get("spec", {})
            if spec.get("node") == self.node_name and spec.get("containerID") == req.container_id:
                return kv
        return None

    # -- CHECK / STATUS / GC ---------------------------------------------------------------
    def check(self, req: Request) -> dict[str, Any]:
        ips = self.ipam.ips_by_handle(req.handle)
        if not ips:
            raise CNIError(CONTAINER_UNKNOWN, "no IP address is allocated to this container",
                           f"handle {req.handle}")
        if self._find_endpoint(req) is None:
            raise CNIError(CONTAINER_UNKNOWN, "no WorkloadEndpoint for this container",
                           f"{req.namespace}/{req.pod}")
        host_iface = names.workload_iface_name(req.namespace, req.pod, self._iface_prefix)
        problems = veth.check_workload(netns_path=req.netns, host_iface=host_iface,
                                       container_iface=req.ifname,
                                       ips=[ipaddress.IPv4Interface(f"{ip}/32") for ip in ips])
        if problems:
            raise CNIError(IO_FAILURE, "pod network check failed", "; ".join(problems))
        return {}

    def status(self, req: Request) -> dict[str, Any]:
        ok, why = self._ready()
        if not ok:
            raise CNIError(NOT_AVAILABLE, "felixpy agent is not ready", why)
        if not self._datastore_ready():
            raise CNIError(NOT_AVAILABLE, NOT_READY, str(DatastoreLockedError()))
        return {}

    def gc(self, req: Request) -> dict[str, Any]:
        """CNI 1.1 GC: release what this node holds for sandboxes the runtime no longer knows."""
        valid = {a.get("containerID") for a in req.config.get("cni.dev/valid-attachments", [])}
        items, _ = self.store.list(keys.resource_prefix("workloadendpoints"))
        for kv in items:
            spec = kv.value.get("spec", {})
            cid = spec.get("containerID")
            if spec.get("node") != self.node_name or not cid or cid in valid:
                continue
            log.info("cni gc releasing container=%s wep=%s", cid[:12], kv.key)
            with self._ipam_lock:
                self.ipam.release_by_handle(names.ipam_handle(cid, req.network))
            if spec.get("interfaceName"):
                veth.teardown_workload(host_iface=spec["interfaceName"], netns_path=None)
            try:
                self.store.delete(kv.key, kv.revision)
            except (NotFound, Conflict):
                pass
        return {}


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


class CNIServer:
    """Listens on a unix socket (mode 0600); one thread per request."""

    def __init__(self, path: str, handler: CNIHandler) -> None:
        self.path = path
        self._handler = handler
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a previous agent
        handler = self._handler

        class _Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                data = self.rfile.read()
                try:
                    raw = json.loads(data)
                    reply = handler.handle(raw)
                except ValueError as err:
                    reply = {"error": {"code": DECODE_FAILURE, "msg": "malformed request", "details": str(err)}}
                except Exception as err:  # never kill the server thread; the caller gets an answer
                    log.exception("cni request crashed")
                    reply = {"error": {"code": IO_FAILURE, "msg": "internal error", "details": str(err)}}
                try:
                    self.wfile.write(json.dumps(reply).encode())
                except OSError as err:  # the client went away (a readiness probe, a killed plugin)
                    log.debug("cni reply not delivered: %s", err)

        old_umask = os.umask(0o077)
        try:
            self._server = _Server(self.path, _Conn)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(target=self._server.serve_forever, name="cni-server", daemon=True)
        self._thread.start()
        log.info("cni server listening path=%s", self.path)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def probe(path: str, timeout: float = 1.0) -> bool:
    """True when something accepts connections on the socket (used by the lab and health checks)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()
