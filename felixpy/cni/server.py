"""The agent side of the CNI plugin: ADD / DEL / CHECK / STATUS / GC over a unix socket.

felixpy-cni forwards kubelet's request here, so the work happens in a process that already has a
warm datastore connection and knows its node: IPAM (handle `<network>.<containerID>`), the pod's
veth pair and host route, and the WorkloadEndpoint. Which addresses a pod gets follows Calico's pod
and namespace annotations and network config (cni/ipam_request.py).

ADD, in order (docs/status.md has the profile behind it):
  1. IPAM: one address (per family: a dual-stack pod gets one of each under the same handle)
     from the node's cached affine block (one etcd transaction, the handle created alongside,
     create-only: a repeated ADD finds it there and reuses its addresses);
  2. the veth pair (created while IPAM works; a pod with IPv6 then gets the host side's IPv6,
     veth.enable_host_ipv6) and the pod's host /32 and /128 routes, over raw netlink, as Calico's
     CNI plugin writes them; the routes are handed to the agent's route driver (`adopt_routes`),
     which owns them from then on (same proto, same value: the loop finds them already right);
  3. the WorkloadEndpoint, create-only, written while the pod side gets its address and routes;
  4. wait until the agent's loop has programmed the endpoint: its routes are in the route
     driver's programmed set and, in the same apply, its policy chains are in the filter table.
     Until then the cali- dispatch chains drop the pod's traffic (an unknown interface fails
     closed), so a pod is never reachable around its policy, and it is reachable when ADD
     returns.
  The whole ADD has ADD_DEADLINE; an ADD that cannot confirm step 4 in time answers an error and
  undoes itself (veth and route, WorkloadEndpoint, addresses), as does any failure after step 1,
  and an ADD whose answer cannot be delivered (the plugin gave up waiting).

DEL is idempotent and tears down in Calico's order, the slow part overlapped: the veth goes from
inside the sandbox (kernel/veth.py: a late DEL never touches a newer sandbox's veth) on a helper
thread while the WorkloadEndpoint (only if it still names this container) is deleted and then
the addresses released, so an address is free only once no endpoint lists it.

DELs the plugin had to do without the agent (plugin.py) wait as files in `<socket>.pending/`;
the server replays them when it starts and every PENDING_SCAN seconds.

While a migration holds the datastore locked (ClusterInformation datastoreReady=false) ADD and
DEL are refused with Calico's "not ready" error, before any change.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from felixpy import names
from felixpy.cni import ipam_request
from felixpy.cni.plugin import (
    ACCEPTED,
    CONTAINER_UNKNOWN,
    DECODE_FAILURE,
    DEFAULT_VERSION,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENV,
    IO_FAILURE,
    NOT_AVAILABLE,
    PENDING_SUFFIX,
    SUPPORTED_VERSIONS,
    TRY_AGAIN_LATER,
)
from felixpy.dataplane.drivers.routes import kernel_route
from felixpy.datastore import keys
from felixpy.datastore.api import KV, Conflict, Datastore, DatastoreError, NotFound
from felixpy.datastore.cas import TooManyConflicts, compare_and_swap
from felixpy.ipam.allocator import IPAM
from felixpy.ipam.errors import HandleInUseError, IPAMError
from felixpy.ipam.lock import DatastoreLockedError
from felixpy.ipam.pools import USE_WORKLOAD
from felixpy.kernel import veth
from felixpy.kernel.netlink import KernelRoute
from felixpy.messages import pod_routes

log = logging.getLogger(__name__)

ADD_DEADLINE = 10.0  # seconds for a whole ADD, the wait for the dataplane included
CHECK_CONVERGENCE = 2.0  # how long CHECK waits for a just-added pod's dataplane (CNI spec)
ROUTE_HOLD = ADD_DEADLINE + 5.0  # the route driver keeps an adopted route this long unclaimed
PENDING_SCAN = 10.0  # seconds between scans of the pending-DEL directory
NOT_READY = "Calico is currently not ready to process requests"  # Calico's plugin, word for word
NAMESPACE_CACHE_TTL = 1.0  # seconds; as IPAM's pool cache (a change is seen by pods started after it)
CAS_RETRIES = 10
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S +0000 UTC"  # the allocation attribute, as Calico writes it
PRE_CHECK_VERSIONS = ("0.3.0", "0.3.1")  # CNI versions without CHECK


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


def _host_interfaces(ips: Any) -> list[veth.IPInterface]:
    """A pod's addresses as host routes' prefixes: /32 for IPv4, /128 for IPv6."""
    out = []
    for ip in ips:
        addr = ipaddress.ip_address(str(ip).split("/")[0])
        out.append(ipaddress.ip_interface(f"{addr}/{addr.max_prefixlen}"))
    return out


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


class Plumbing(Protocol):
    """The kernel side of a pod (real: KernelPlumbing over kernel/veth.py; tests: a fake)."""

    def create(self, *, netns_path: str, host_iface: str, container_iface: str,
               mtu: int) -> veth.WorkloadPlumbing: ...

    def enable_ipv6(self, plumbing: veth.WorkloadPlumbing, *, host_iface: str) -> None: ...

    def configure(self, plumbing: veth.WorkloadPlumbing, *, netns_path: str, host_iface: str,
                  container_iface: str, ips: Sequence[veth.IPInterface]) -> None: ...

    def add_host_routes(self, routes: Sequence[KernelRoute]) -> None: ...

    def teardown(self, *, netns_path: str | None, container_iface: str, host_iface: str | None) -> bool: ...

    def check(self, *, netns_path: str, host_iface: str, container_iface: str,
              ips: Sequence[veth.IPInterface], container_mac: str | None,
              route_proto: int | None) -> list[str]: ...


class KernelPlumbing:
    def create(self, *, netns_path: str, host_iface: str, container_iface: str,
               mtu: int) -> veth.WorkloadPlumbing:
        return veth.create_workload_link(netns_path=netns_path, host_iface=host_iface,
                                         container_iface=container_iface, mtu=mtu)

    def enable_ipv6(self, plumbing: veth.WorkloadPlumbing, *, host_iface: str) -> None:
        veth.enable_host_ipv6(plumbing, host_iface=host_iface)

    def configure(self, plumbing: veth.WorkloadPlumbing, *, netns_path: str, host_iface: str,
                  container_iface: str, ips: Sequence[veth.IPInterface]) -> None:
        veth.configure_workload(plumbing, netns_path=netns_path, host_iface=host_iface,
                                container_iface=container_iface, ips=ips)

    def add_host_routes(self, routes: Sequence[KernelRoute]) -> None:
        veth.add_host_routes(routes)

    def teardown(self, *, netns_path: str | None, container_iface: str, host_iface: str | None) -> bool:
        return veth.teardown_workload(netns_path=netns_path, container_iface=container_iface,
                                      host_iface=host_iface)

    def check(self, *, netns_path: str, host_iface: str, container_iface: str,
              ips: Sequence[veth.IPInterface], container_mac: str | None,
              route_proto: int | None) -> list[str]:
        return veth.check_workload(netns_path=netns_path, host_iface=host_iface,
                                   container_iface=container_iface, ips=ips,
                                   container_mac=container_mac, route_proto=route_proto)


class Laps:
    """Where a request's time went, for its log line: ` ipam=2.10ms veth=1.52ms ...`."""

    def __init__(self) -> None:
        self._mark = time.monotonic()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self._laps.append((name, now - self._mark))
        self._mark = now

    def __str__(self) -> str:
        return "".join(f" {name}={seconds * 1000:.2f}ms" for name, seconds in self._laps)


def _succeeded(future: Future[Any]) -> bool:
    """Whether the future's call returned (waits for it); its exception is someone else's to report."""
    try:
        future.result()
    except BaseException:
        return False
    return True


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
        adopt_routes: Callable[[tuple[KernelRoute, ...], float, str], None] | None = None,
        iface_prefix: str = names.WORKLOAD_IFACE_PREFIX,
        observe: Callable[[str, float], None] | None = None,
        plumbing: Plumbing | None = None,
        ipam: IPAM | None = None,
        add_deadline: float = ADD_DEADLINE,
        datastore_ready: Callable[[], bool] = lambda: True,
        pod_annotations: Callable[[str, str], Mapping[str, str]] | None = None,
        ipv6_refusal: str | None = None,
    ) -> None:
        self.store = store
        self._observe = observe  # (CNI command, seconds) for every request, e.g. a metrics histogram
        self.node_name = node_name
        self.mtu = mtu
        # The migration lock (ClusterInformation datastoreReady=false), as the agent's config
        # watch last saw it: ADD and DEL are refused as Calico's plugin refuses them, and the
        # IPAM writes of anything else stop at IPAM's write boundary (ipam/lock.py).
        self._datastore_ready = datastore_ready
        self.ipam = ipam or IPAM(store, write_guard=self._check_unlocked)
        self._node_labels = node_labels
        self._wait_programmed = wait_programmed
        self._ready = ready
        self._adopt_routes = adopt_routes
        self._iface_prefix = iface_prefix
        self._plumbing: Plumbing = plumbing or KernelPlumbing()
        self._add_deadline = add_deadline
        # The pod's annotations from the Kubernetes API, when one is configured and the runtime
        # did not pass them (ipam_request.py); without either a pod has no annotations.
        self._pod_annotations = pod_annotations
        # Why this node cannot give pods IPv6 addresses (None: it can): an IPv6 address it would
        # not route is refused at ADD rather than handed out.
        self._ipv6_refusal = ipv6_refusal
        # Like Calico's host-wide IPAM lock: pods on one node allocate one at a time, which keeps
        # compare-and-swap conflicts on the node's own blocks away from the hot path.
        self._ipam_lock = threading.Lock()
        # Namespace labels and annotations, kept for NAMESPACE_CACHE_TTL like IPAM's pools: pods
        # of one deployment start in bursts in one namespace. Read under _ipam_lock only.
        self._namespaces: dict[str, tuple[float, ipam_request.Metadata]] = {}
        # Containers with an ADD under way: GC must not take their addresses.
        self._in_flight: set[str] = set()
        self._in_flight_lock = threading.Lock()
        # Kernel work overlapped with datastore work within one request (veth creation, deletion).
        self._helpers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cni-helper")

    def handle(self, raw: dict[str, Any]) -> dict[str, Any]:
        started = time.monotonic()
        try:
            req = parse_request(raw)
            op = {"ADD": self.add, "DEL": self.delete, "CHECK": self.check,
                  "STATUS": self.status, "GC": self.gc}.get(req.command)
            if op is None:
                raise CNIError(INVALID_ENV, f"unsupported CNI_COMMAND {req.command!r}")
            laps = Laps()
            result = op(req, laps)
            log.info("cni %s ok container=%s pod=%s/%s seconds=%.4f%s", req.command,
                     req.container_id[:12], req.namespace, req.pod, time.monotonic() - started, laps)
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
    def add(self, req: Request, laps: Laps | None = None) -> dict[str, Any]:
        self._check_unlocked()  # before anything is plumbed, as Calico's cmdAdd checks first
        laps = laps if laps is not None else Laps()
        deadline = time.monotonic() + self._add_deadline
        host_iface = names.workload_iface_name(req.namespace, req.pod, self._iface_prefix)
        mtu = req.config.get("mtu") or self.mtu
        with self._in_flight_lock:
            self._in_flight.add(req.container_id)
        # The veth pair needs no address: it is created while IPAM picks one.
        link = self._helpers.submit(self._plumbing.create, netns_path=req.netns, host_iface=host_iface,
                                    container_iface=req.ifname, mtu=mtu)
        written: KV | None = None
        endpoint: Future[KV] | None = None
        try:
            ips = self._assign(req)
            laps.lap("ipam")
            plumbing = link.result()
            ifaces = _host_interfaces(ips)
            if any(iface.version == 6 for iface in ifaces):
                # IPv6 on the host side (no DAD, the pod's gateway address) before its /128.
                self._plumbing.enable_ipv6(plumbing, host_iface=host_iface)
            # The host end is up: its /32 (/128) goes in now and is handed to the route driver
            # before the endpoint that wants it can exist, so the loop finds it already right.
            routes = tuple(kernel_route(r, plumbing.host_ifindex)
                           for r in pod_routes(host_iface, tuple(str(ip) for ip in ips)))
            self._plumbing.add_host_routes(routes)
            if self._adopt_routes is not None:
                self._adopt_routes(routes, ROUTE_HOLD, host_iface)
            # The endpoint write (a datastore round trip, then the agent's apply) overlaps the
            # pod side's addresses and routes; ADD answers only once both are done.
            endpoint = self._helpers.submit(self._write_endpoint, req, host_iface, ips,
                                            plumbing.container_mac)
            self._plumbing.configure(plumbing, netns_path=req.netns, host_iface=host_iface,
                                     container_iface=req.ifname, ips=ifaces)
            laps.lap("veth")
            written = endpoint.result()
            laps.lap("endpoint")
            if not self._wait_programmed(written.key, written.revision, max(0.0, deadline - time.monotonic())):
                ok, why = self._ready()
                raise CNIError(TRY_AGAIN_LATER,
                               f"the pod's network was not programmed within {self._add_deadline:g} s",
                               why if not ok else "the agent's dataplane is behind; try again")
            laps.lap("programmed")
        except BaseException as err:
            if written is None and endpoint is not None and _succeeded(endpoint):
                written = endpoint.result()  # written while the pod side failed: undo it too
            # The host end by name only if this ADD made it: a failed creation cleaned up after
            # itself, and the name may be another sandbox's of the same pod.
            self._undo_add(req, host_iface if _succeeded(link) else None, written)
            if isinstance(err, veth.PlumbingError):
                raise CNIError(IO_FAILURE, "failed to set up the pod's network interface", str(err)) from None
            raise
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(req.container_id)
        return self._result(req, host_iface, ips, plumbing.container_mac)

    def _assign(self, req: Request) -> list[Any]:
        """The pod's addresses: those its annotations and the network config ask for
        (ipam_request.py), new ones from IPAM, or those of a repeated ADD's handle (reused).

        A new handle is the common case, so IPAM is asked for a fresh one (its create-only write
        overlaps the block write) instead of reading the handle first; only a repeat pays more."""
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

        attrs = {"node": self.node_name, "namespace": req.namespace, "pod": req.pod,
                 "timestamp": time.strftime(TIMESTAMP_FORMAT, time.gmtime())}
        with self._ipam_lock:
            want = ipam_request.ip_request(pod, ns, req.config)
            asks_v6 = 6 in want.families if not want.ips else any(ip.version == 6 for ip in want.ips)
            if asks_v6 and self._ipv6_refusal:
                raise ipam_request.RequestError(f"an IPv6 address was requested: {self._ipv6_refusal}")
            if want.bypass_ipam:
                log.info("cni add without IPAM (ipAddrsNoIpam) pod=%s/%s ips=%s", req.namespace, req.pod,
                         ",".join(map(str, want.ips)))
                return list(want.ips)
            if want.ips:
                held = self.ipam.ips_by_handle(req.handle)  # a repeated ADD reuses its addresses
                if held:
                    return held
                self._release_previous_sandbox(req)
                for ip in want.ips:
                    self.ipam.assign_ip(ip, handle=req.handle, attrs=attrs, node=self.node_name,
                                        use=USE_WORKLOAD)
                return list(want.ips)
            # One address per family under one handle (Calico's AutoAssign with Num4 / Num6). The
            # first family's write creates the handle (create-only); if a later family fails, the
            # ADD's undo releases the handle and with it the first family's address.
            def assign(version: int, new_handle: bool) -> list[Any]:
                return self.ipam.auto_assign(num=1, handle=req.handle, attrs=attrs, node=self.node_name,
                                             node_labels=self._node_labels(), use=USE_WORKLOAD,
                                             pools=want.pools if version == 4 else want.pools6,
                                             namespace_labels=lambda: ns().labels, version=version,
                                             new_handle=new_handle)

            ips: list[Any] = []
            for version in want.families:
                if ips:  # the first family's write created the handle
                    ips += assign(version, new_handle=False)
                    continue
                try:
                    ips += assign(version, new_handle=True)
                except HandleInUseError:
                    held = self.ipam.ips_by_handle(req.handle)
                    if held:
                        return held  # a repeated ADD: the first one's addresses, every family
                    ips += assign(version, new_handle=False)
            return ips

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

    def _undo_add(self, req: Request, host_iface: str | None, written: KV | None) -> None:
        """Take back everything an ADD did: veth (and its route), WorkloadEndpoint, addresses.

        Each step is tried even if an earlier one failed; a failure is logged, not raised (the
        ADD's own error is what the plugin must see). What stays behind is the runtime's DEL's,
        or IPAM GC's, to find."""
        try:
            self._plumbing.teardown(netns_path=req.netns, container_iface=req.ifname, host_iface=host_iface)
        except veth.PlumbingError as err:
            log.warning("cni add cleanup: %s", err)
        try:
            if written is not None:
                self._delete_endpoint_if_ours(written.key, req.container_id)
        except DatastoreError as err:
            log.warning("cni add cleanup: WorkloadEndpoint %s: %s", written.key if written else "", err)
        try:
            with self._ipam_lock:
                self.ipam.release_by_handle(req.handle)
        except (IPAMError, DatastoreError) as err:
            log.warning("cni add cleanup: release of handle %s: %s", req.handle, err)

    def close(self) -> None:
        """Stop the helper threads (the datastore is the caller's to close)."""
        self._helpers.shutdown(wait=True)
        self.ipam.close()

    def undo(self, raw: dict[str, Any]) -> None:
        """Undo a successful ADD whose answer never reached the plugin (it had given up)."""
        try:
            req = parse_request(raw)
            if req.command == "ADD":
                log.warning("cni add answer not delivered, undoing it container=%s pod=%s/%s",
                            req.container_id[:12], req.namespace, req.pod)
                self.delete(req)
        except (CNIError, IPAMError, DatastoreError) as err:
            log.warning("cni undo of an undelivered ADD failed: %s", err)

    def _endpoint_key(self, req: Request) -> str:
        name = names.workload_endpoint_name(self.node_name, req.pod, req.ifname)
        return keys.resource_key("workloadendpoints", name, req.namespace)

    def _write_endpoint(self, req: Request, host_iface: str, ips: list[Any], mac: str) -> KV:
        key = self._endpoint_key(req)
        name = keys.parse_key(key).name

        def change(old: Any) -> tuple[dict[str, Any], None]:
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
                    "ipNetworks": [str(iface) for iface in _host_interfaces(ips)],
                    "mac": mac,
                    "profiles": [names.namespace_profile(req.namespace)],
                    "ports": list((old.get("spec") or {}).get("ports") or []),
                },
            }, None

        try:
            # A new pod's endpoint does not exist yet: create-only first, no read.
            kv, _ = compare_and_swap(self.store, key, change, expected=None, retries=CAS_RETRIES,
                                     what=f"write WorkloadEndpoint {name}")
        except TooManyConflicts as err:
            raise CNIError(TRY_AGAIN_LATER, "could not write the WorkloadEndpoint", str(err)) from None
        assert kv is not None
        return kv

    def _delete_endpoint_if_ours(self, key: str, container_id: str, current: KV | None = None) -> bool:
        """Delete the endpoint at key if it still names this container (a newer sandbox's stays).

        current: the endpoint as the caller just read it (saves a read; if it changed since, the
        delete fails and the endpoint is read again)."""
        for _ in range(CAS_RETRIES):
            kv = current
            current = None
            if kv is None:
                try:
                    kv = self.store.get(key)
                except NotFound:
                    return False
            if (kv.value.get("spec") or {}).get("containerID") != container_id:
                return False
            try:
                self.store.delete(kv.key, kv.revision)
                return True
            except NotFound:
                return False
            except Conflict:
                continue  # updated meanwhile (labels): look again
        return False

    def _result(self, req: Request, host_iface: str, ips: list[Any], mac: str) -> dict[str, Any]:
        old = req.version.startswith("0.3") or req.version.startswith("0.4")
        ip_entries = []
        ifaces = _host_interfaces(ips)
        for iface in ifaces:
            entry: dict[str, Any] = {"address": str(iface), "interface": 1}
            if old:
                entry["version"] = str(iface.version)
            ip_entries.append(entry)
        families = {i.version for i in ifaces}
        routes = [{"dst": "0.0.0.0/0", "gw": names.POD_GATEWAY}] if 4 in families else []
        if 6 in families:
            routes.append({"dst": "::/0", "gw": names.POD_GATEWAY_V6})
        return {
            "cniVersion": req.version,
            "interfaces": [
                {"name": host_iface, "mac": names.HOST_VETH_MAC},
                {"name": req.ifname, "mac": mac, "sandbox": req.netns},
            ],
            "ips": ip_entries,
            "routes": routes,
            "dns": {},
        }

    # -- DEL -------------------------------------------------------------------------------
    def delete(self, req: Request, laps: Laps | None = None) -> dict[str, Any]:
        self._check_unlocked()  # Calico's cmdDel refuses too: kubelet retries the DEL later
        laps = laps if laps is not None else Laps()
        endpoint = self._find_endpoint(req)
        laps.lap("lookup")
        # The host end by name only when the endpoint says it is this container's.
        host_iface = endpoint.value["spec"].get("interfaceName") if endpoint is not None else None
        # The kernel takes ~20 ms to finish a veth deletion (an RCU grace period); the datastore
        # work goes on meanwhile.
        unplumbed = self._helpers.submit(self._plumbing.teardown, netns_path=req.netns or None,
                                         container_iface=req.ifname, host_iface=host_iface or None)
        try:
            if endpoint is not None:
                self._delete_endpoint_if_ours(endpoint.key, req.container_id, endpoint)
            laps.lap("endpoint")
            # Calico's legacy workload-ID handle (pods from old Calico releases), checked meanwhile.
            legacy = (self._helpers.submit(self.ipam.release_by_handle, f"{req.namespace}.{req.pod}")
                      if req.namespace and req.pod else None)
            with self._ipam_lock:
                released = self.ipam.release_by_handle(req.handle)
            if legacy is not None:
                released += legacy.result()
            laps.lap("ipam")
        finally:
            try:
                unplumbed.result()
            except veth.PlumbingError as err:
                raise CNIError(IO_FAILURE, "failed to remove the pod's network interface", str(err)) from None
            laps.lap("veth")
        log.debug("cni del released=%s", released)
        return {}

    def _find_endpoint(self, req: Request) -> KV | None:
        """The WorkloadEndpoint of this sandbox, or None (only ever the one with our containerID)."""
        if req.namespace and req.pod:
            try:
                kv = self.store.get(self._endpoint_key(req))
            except NotFound:
                return None
            return kv if kv.value.get("spec", {}).get("containerID") == req.container_id else None
        items, _ = self.store.list(keys.resource_prefix("workloadendpoints"))
        for kv in items:
            spec = kv.value.get("spec", {})
            if (spec.get("node") == self.node_name and spec.get("containerID") == req.container_id
                    and spec.get("endpoint", req.ifname) == req.ifname):
                return kv
        return None

    # -- CHECK -----------------------------------------------------------------------------
    def check(self, req: Request, laps: Laps | None = None) -> dict[str, Any]:
        """CNI CHECK: the ADD's result (prevResult) against what the pod has now."""
        if req.version in PRE_CHECK_VERSIONS:
            raise CNIError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, not {req.version}")
        prev = req.config.get("prevResult")
        if not isinstance(prev, dict):
            raise CNIError(INVALID_CONFIG, "CHECK needs prevResult, the result of the pod's ADD")
        ips = self.ipam.ips_by_handle(req.handle)
        if not ips:
            raise CNIError(CONTAINER_UNKNOWN, "no IP address is allocated to this container",
                           f"handle {req.handle}")
        endpoint = self._find_endpoint(req)
        if endpoint is None:
            raise CNIError(CONTAINER_UNKNOWN, "no WorkloadEndpoint for this container",
                           f"{req.namespace}/{req.pod}")
        host_iface = endpoint.value["spec"].get("interfaceName") or names.workload_iface_name(
            req.namespace, req.pod, self._iface_prefix)
        container_mac, problems = self._compare_prev_result(req, prev, host_iface, ips)
        problems += self._plumbing.check(netns_path=req.netns, host_iface=host_iface,
                                         container_iface=req.ifname, ips=_host_interfaces(ips),
                                         container_mac=container_mac, route_proto=names.ROUTE_PROTO)
        if not self._wait_programmed(endpoint.key, endpoint.revision, CHECK_CONVERGENCE):
            ok, why = self._ready()
            problems.append("the agent has not programmed the pod's routes and policy"
                            + (f" ({why})" if not ok else ""))
        if problems:
            raise CNIError(IO_FAILURE, "pod network check failed", "; ".join(problems))
        return {}

    def _compare_prev_result(self, req: Request, prev: dict[str, Any], host_iface: str,
                             ips: list[Any]) -> tuple[str | None, list[str]]:
        """(the container MAC prevResult promises, how prevResult disagrees with the allocation)."""
        problems: list[str] = []
        given = prev.get("interfaces")
        interfaces: list[Any] = given if isinstance(given, list) else []
        container = next((i for i, iface in enumerate(interfaces)
                          if isinstance(iface, dict) and iface.get("name") == req.ifname
                          and iface.get("sandbox") == req.netns), None)
        if container is None:
            problems.append(f"prevResult has no interface {req.ifname} in sandbox {req.netns}")
        if not any(isinstance(i, dict) and i.get("name") == host_iface for i in interfaces):
            problems.append(f"prevResult has no host interface {host_iface}")
        promised = set()
        listed = prev.get("ips")
        for entry in listed if isinstance(listed, list) else []:
            if isinstance(entry, dict) and entry.get("interface", container) == container:
                promised.add(str(entry.get("address", "")).split("/")[0])
        held = {str(ip) for ip in ips}
        if promised != held:
            problems.append(f"prevResult lists {', '.join(sorted(promised)) or 'no address'} but the "
                            f"container holds {', '.join(sorted(held))}")
        mac = interfaces[container].get("mac") if container is not None else None
        return (mac if isinstance(mac, str) and mac else None), problems

    # -- STATUS / GC -----------------------------------------------------------------------
    def status(self, req: Request, laps: Laps | None = None) -> dict[str, Any]:
        ok, why = self._ready()
        if not ok:
            raise CNIError(NOT_AVAILABLE, "felixpy agent is not ready", why)
        if not self._datastore_ready():
            raise CNIError(NOT_AVAILABLE, NOT_READY, str(DatastoreLockedError()))
        return {}

    def gc(self, req: Request, laps: Laps | None = None) -> dict[str, Any]:
        """CNI 1.1 GC: release what this node holds for this network's attachments the runtime
        no longer knows (`cni.dev/valid-attachments`: containerID + ifname pairs).

        An attachment is this network's when its addresses are held by the network's handle
        `<network>.<containerID>`, so another network's endpoints in the same container (another
        CNI_IFNAME) and other networks' containers are never touched. A handle of this network
        left without any endpoint (an ADD that died between IPAM and the endpoint) is released
        too. The spec has the runtime run GC only while no ADD or DEL is under way; containers
        with an ADD under way here are skipped anyway, in case a runtime does not.
        """
        valid = self._valid_attachments(req)
        errors: list[str] = []
        handled: set[str] = {cid for cid, _ in valid}
        items, _ = self.store.list(keys.resource_prefix("workloadendpoints"))
        for kv in items:
            spec = kv.value.get("spec") or {}
            cid, ifname = spec.get("containerID"), spec.get("endpoint")
            if (spec.get("node") != self.node_name or not cid or (cid, ifname) in valid
                    or self._busy(cid)):
                continue
            handle = names.ipam_handle(cid, req.network)
            listed = {str(n).split("/")[0] for n in spec.get("ipNetworks") or []}
            held = self._node_allocations(handle)
            if held is None or not set(held) & listed:
                continue  # another network's attachment, or nothing left to release
            handled.add(cid)
            log.info("cni gc removing attachment container=%s ifname=%s wep=%s", cid[:12], ifname, kv.key)
            try:
                if spec.get("interfaceName"):
                    self._plumbing.teardown(netns_path=None, container_iface=str(ifname or "eth0"),
                                            host_iface=spec["interfaceName"])
                self._delete_endpoint_if_ours(kv.key, cid)
                self._release_unless_busy(handle, cid)
            except (veth.PlumbingError, IPAMError, DatastoreError) as err:
                errors.append(f"{cid[:12]}/{ifname}: {err}")
        errors += self._gc_orphan_handles(req.network, handled)
        if errors:
            raise CNIError(IO_FAILURE, "GC could not remove every stale attachment", "; ".join(errors))
        return {}

    @staticmethod
    def _valid_attachments(req: Request) -> set[tuple[str, str]]:
        given = req.config.get("cni.dev/valid-attachments", [])
        if not isinstance(given, list) or not all(isinstance(a, dict) for a in given):
            raise CNIError(INVALID_CONFIG, "cni.dev/valid-attachments must be a list of objects")
        return {(str(a.get("containerID", "")), str(a.get("ifname", ""))) for a in given}

    def _node_allocations(self, handle: str) -> list[str] | None:
        """The handle's addresses when all of them were allocated for this node, else None."""
        ips = [str(ip) for ip in self.ipam.ips_by_handle(handle)]
        for ip in ips:
            found = self.ipam.get_assignment(ip)
            if found is None or found.attrs.get("node") != self.node_name:
                return None
        return ips

    def _busy(self, container_id: str) -> bool:
        with self._in_flight_lock:
            return container_id in self._in_flight

    def _release_unless_busy(self, handle: str, container_id: str) -> None:
        with self._ipam_lock:  # an ADD takes it for its IPAM, after marking itself in flight
            if not self._busy(container_id):
                self.ipam.release_by_handle(handle)

    def _gc_orphan_handles(self, network: str, handled: set[str]) -> list[str]:
        """Release this network's handles of this node whose container has no endpoint at all."""
        errors = []
        prefix = f"{network}."
        kvs, _ = self.store.list(keys.HANDLES)
        for kv in kvs:
            handle = keys.parse_key(kv.key).name
            cid = handle[len(prefix):]
            if not handle.startswith(prefix) or cid in handled:
                continue
            held = self._node_allocations(handle)
            if not held or self._busy(cid):
                continue  # another node's, nothing allocated, or an ADD under way
            log.info("cni gc releasing handle without an endpoint handle=%s ips=%s", handle, held)
            try:
                self._release_unless_busy(handle, cid)
            except (IPAMError, DatastoreError) as err:
                errors.append(f"{handle}: {err}")
        return errors

    # -- DELs the plugin left for us ---------------------------------------------------------
    def replay_pending(self, directory: str) -> int:
        """Finish the DELs the plugin did without the agent; returns how many were finished."""
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            return 0
        done = 0
        for name in entries:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = os.path.join(directory, name)
            try:
                with open(path, "rb") as f:
                    raw = json.loads(f.read())
            except (OSError, ValueError) as err:
                log.warning("cni pending DEL unreadable, removing it path=%s error=%s", path, err)
                _unlink(path)
                continue
            env = raw.get("env") if isinstance(raw, dict) else None
            if not isinstance(env, dict) or env.get("CNI_COMMAND") != "DEL":
                log.warning("cni pending file is not a DEL, removing it path=%s", path)
                _unlink(path)
                continue
            reply = self.handle(raw)
            if "error" in reply:
                log.warning("cni pending DEL failed, kept for later path=%s error=%s", path, reply["error"])
                continue
            log.info("cni pending DEL finished container=%s", str(env.get("CNI_CONTAINERID", ""))[:12])
            _unlink(path)
            done += 1
        return done


def _describe(data: bytes) -> tuple[str, str]:
    """(CNI_COMMAND, CNI_CONTAINERID) of a raw request, for a log line ("?" when unreadable)."""
    try:
        env = json.loads(data).get("env") or {}
        return str(env.get("CNI_COMMAND", "?")), str(env.get("CNI_CONTAINERID", "?"))
    except (ValueError, AttributeError):
        return "?", "?"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    on_idle: Callable[[], None] | None = None

    def service_actions(self) -> None:
        # Called by serve_forever about twice a second, between requests.
        if self.on_idle is not None:
            self.on_idle()


class CNIServer:
    """Listens on a unix socket (mode 0600); one thread per request."""

    def __init__(self, path: str, handler: CNIHandler) -> None:
        self.path = path
        self.pending_dir = path + PENDING_SUFFIX
        self._handler = handler
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._next_scan = 0.0

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        os.makedirs(self.pending_dir, mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a previous agent
        # DELs done without us while we were away, before any new request.
        self._scan_pending()
        handler = self._handler

        class _Conn(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    # At once, before any work: tells the plugin an agent is here (plugin.py).
                    self.wfile.write(ACCEPTED.encode())
                    self.wfile.flush()
                    gone = False
                except OSError:
                    gone = True  # the plugin gave up before we got to it (a stopped agent)
                data = self.rfile.read()
                if gone:
                    if data:  # (nothing sent: a readiness probe that only connected)
                        command, container = _describe(data)
                        log.warning("cni request dropped, the plugin had given up waiting command=%s "
                                    "container=%s", command, container[:12])
                    return
                raw: Any = None
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
                    self.wfile.flush()
                except OSError as err:  # the client went away (a readiness probe, a plugin that gave up)
                    log.debug("cni reply not delivered: %s", err)
                    if "result" in reply and isinstance(raw, dict):
                        handler.undo(raw)

        old_umask = os.umask(0o077)
        try:
            self._server = _Server(self.path, _Conn)
        finally:
            os.umask(old_umask)
        self._server.on_idle = self._scan_pending
        self._thread = threading.Thread(target=self._server.serve_forever, name="cni-server", daemon=True)
        self._thread.start()
        log.info("cni server listening path=%s", self.path)

    def _scan_pending(self) -> None:
        now = time.monotonic()
        if now < self._next_scan:
            return
        self._next_scan = now + PENDING_SCAN
        try:
            self._handler.replay_pending(self.pending_dir)
        except Exception:  # the scan must never stop the server
            log.exception("cni pending DEL scan failed")

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._handler.close()


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
