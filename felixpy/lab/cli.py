"""felixpy-lab: a whole felixpy cluster on one machine (nodes and pods are network namespaces).

See docs/lab.md. The command line and the `status -o json` / `matrix -o json` shapes are a stable
interface (design.md §3.1); change them only additively.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

from felixpy.datastore.api import DatastoreError, Unavailable
from felixpy.lab import kube, pods, procs, services, state, topology, tor
from felixpy.lab.state import LabState, NodeState, PodState, ServiceState
from felixpy.lab.topology import LabUsageError

log = logging.getLogger(__name__)

PROG = "felixpy-lab"
AGENT_READY_TIMEOUT = 60.0
EXABGP_READY_TIMEOUT = 20.0
ETCD_READY_TIMEOUT = 20.0

# What `up` cannot do yet, and when it will: one line, nothing created.
NOT_YET: dict[str, str] = {}


class LabExit(Exception):
    """Stop with this exit code after printing the message (if any) as one line."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def say(line: str) -> None:
    print(line, flush=True)


# --- up / down / status -------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    lab = args.name
    if args.mode in NOT_YET:
        raise LabExit(2, NOT_YET[args.mode])
    if args.mode == "ipip" and not procs.kernel_has_ipip(lab):
        raise LabUsageError("--mode ipip needs a kernel with IPIP (CONFIG_NET_IPIP, the ipip module): this "
                            "one cannot create tunl0; run the lab inside ../shared/tools/ipip-vm.sh")
    if args.cross_subnet and args.mode not in ("vxlan", "bgp"):
        raise LabUsageError("--cross-subnet needs --mode vxlan or --mode bgp (its pool encapsulates "
                            "across subnets with vxlanMode CrossSubnet)")
    if not 0 <= args.route_reflectors <= topology.MAX_REFLECTORS:
        raise LabUsageError(f"--route-reflectors {args.route_reflectors}: expected 0-{topology.MAX_REFLECTORS}")
    if args.route_reflectors and args.mode != "bgp":
        raise LabUsageError("--route-reflectors needs --mode bgp")
    if args.ip_family != "ipv4":
        if args.mode not in ("routes", "vxlan", "bgp"):
            raise LabUsageError(f"--ip-family {args.ip_family} needs --mode bgp, routes or vxlan (IPIP carries "
                                "IPv4 only)")
    if not 1 <= args.nodes <= topology.MAX_NODES:
        raise LabUsageError(f"--nodes {args.nodes}: expected 1-{topology.MAX_NODES}")
    pool = topology.check_pool(args.pool, args.block_size)
    kube_mode = args.datastore == "kubernetes"
    if kube_mode:
        kube.check_available()
    if os.path.isdir(topology.run_dir(lab)) or topology.fabric_netns(lab) in procs.netns_list():
        raise LabUsageError(f"lab {lab} already exists (felixpy-lab status --name {lab}; "
                            f"felixpy-lab down --name {lab})")
    started = time.monotonic()
    with state.locked(lab, create=True):
        st = LabState(name=lab, mode=args.mode, pool=pool, block_size=args.block_size,
                      cross_subnet=args.cross_subnet, datastore=args.datastore, ip_family=args.ip_family)
        st.remember_netns(topology.fabric_netns(lab))
        for node_name in topology.node_names(args.nodes):
            ns = topology.node_netns(lab, node_name)
            st.nodes.append(NodeState(name=node_name, ip=topology.node_ip(node_name, args.cross_subnet),
                                      netns=ns))
            st.remember_netns(ns)
        for rr_name in topology.reflector_names(args.route_reflectors):
            ns = topology.node_netns(lab, rr_name)
            st.nodes.append(NodeState(name=rr_name, ip=topology.node_ip(rr_name), netns=ns,
                                      route_reflector=True))
            st.remember_netns(ns)
        state.save(st)  # before anything exists, so that `down` can always clean up
        say(f"lab {lab}: {args.nodes} nodes, mode {args.mode}, pool {pool}, blocks /{args.block_size}"
            + (f", {args.route_reflectors} route reflectors (mesh off)" if args.route_reflectors else "")
            + (", cross-subnet (vxlanMode CrossSubnet)" if args.cross_subnet else "")
            + (", datastore kubernetes" if kube_mode else "")
            + (f", ip-family {args.ip_family} (IPv6 pool {topology.POOL6}, blocks /{topology.POOL6_BLOCK_SIZE})"
               if args.ip_family != "ipv4" else ""))

        raised = procs.raise_neighbour_limits(len(st.nodes))
        if raised is not None:
            say("  host: net.ipv4.neigh.default.gc_thresh1/2/3 raised from {} to {} (the neighbour table's "
                "limits count every namespace's entries together; `down` leaves them)".format(
                    "/".join(map(str, raised[0])), "/".join(map(str, raised[1]))))
        ipv6 = args.ip_family != "ipv4"
        procs.build_fabric(lab, args.cross_subnet, ipv6=ipv6)
        if not kube_mode:
            st.etcd_pid = procs.start_etcd(lab)
            state.save(st)
            say(f"  fabric: netns {topology.fabric_netns(lab)}, bridge {topology.FABRIC_IP}/24, "
                + (f"bridge {topology.FABRIC_B_IP}/24 (routing between them), " if args.cross_subnet else "")
                + f"etcd {topology.ETCD_ENDPOINT} (pid {st.etcd_pid})")
        for node in st.nodes:
            procs.build_node(lab, node.name, args.cross_subnet, ipv6=ipv6)
        pods.enter_fabric(lab)
        if kube_mode:
            kube_started = time.monotonic()
            try:
                kube.start(st)
            finally:
                state.save(st)
            st.heartbeat_pid = kube.start_heartbeat(lab)
            state.save(st)
            say(f"  fabric: netns {topology.fabric_netns(lab)}, bridge {topology.FABRIC_IP}/24, "
                + (f"bridge {topology.FABRIC_B_IP}/24 (routing between them), " if args.cross_subnet else "")
                + f"kube-apiserver {kube.api_server()} (etcd, kube-apiserver, kube-controller-manager up in "
                + f"{time.monotonic() - kube_started:.1f} s; Nodes registered, agents use the felixpy-node token)")
        elif not procs.wait_tcp(topology.FABRIC_IP, topology.ETCD_CLIENT_PORT, ETCD_READY_TIMEOUT):
            raise LabExit(1, f"etcd did not answer within {ETCD_READY_TIMEOUT:g} s; see "
                             f"{topology.run_dir(lab)}/etcd.log (felixpy-lab down --name {lab} cleans up)")
        reflectors = [n for n in st.nodes if n.route_reflector]
        if reflectors:
            _write_reflector_resources(st, reflectors)
            for node in reflectors:
                _start_reflector(st, node)
        for node in st.nodes:
            if node.route_reflector:
                continue
            if args.mode == "bgp":
                _start_speaker(st, node)
            node.agent_pid = procs.start_agent(lab, node.name, pool, args.block_size, mode=args.mode,
                                               cross_subnet=args.cross_subnet, datastore=st.datastore,
                                               ip_family=st.ip_family)
            state.save(st)
            say(f"  {node.name}: netns {node.netns}, eth0 {node.ip}, agent pid {node.agent_pid}"
                + (f", exabgp pid {node.exabgp_pid}" if args.mode == "bgp" else ""))
        for node in reflectors:
            _wait_reflector(st, node)
            say(f"  {node.name}: route reflector ready")
        for node in st.nodes:
            if node.route_reflector:
                continue
            problem = procs.wait_agent(lab, node.name, node.agent_pid, AGENT_READY_TIMEOUT)
            if problem:
                tail = procs.log_tail(f"{topology.node_dir(lab, node.name)}/agent.log", 1)
                raise LabExit(1, f"{problem}{': ' + tail[0].strip() if tail else ''} "
                                 f"(felixpy-lab down --name {lab} cleans up)")
            say(f"  {node.name}: agent ready")
        st.phase = "up"
        state.save(st)
    say(f"lab {lab} is up in {time.monotonic() - started:.1f} s. Next: felixpy-lab ns add demo --name {lab}; "
        f"felixpy-lab pod add demo/a --node n1 --serve tcp:80 --name {lab}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    lab = args.name
    recorded: list[str] = []
    if os.path.isdir(topology.run_dir(lab)):
        try:
            recorded = state.load(lab).netns
        except LabUsageError:
            pass  # half-built or unreadable: the fixed names and the process marks still find it
    killed, removed = procs.teardown(lab, recorded)
    existed = os.path.isdir(topology.run_dir(lab))
    if existed:
        shutil.rmtree(topology.run_dir(lab), ignore_errors=True)
    if not existed and not killed and not removed:
        say(f"lab {lab} is not up; nothing to do")
    else:
        say(f"lab {lab} is down ({killed} processes stopped, {removed} namespaces deleted)")
    return 0


def _start_speaker(st: LabState, node: NodeState) -> None:
    """Mode bgp: start the node's ExaBGP (+ sidecar) and wait for the sidecar's socket."""
    node.exabgp_pid = procs.start_exabgp(st.name, node.name, node.ip)
    state.save(st)
    problem = procs.wait_exabgp(st.name, node.name, node.exabgp_pid, EXABGP_READY_TIMEOUT)
    if problem:
        tail = procs.log_tail(f"{topology.exabgp_dir(st.name, node.name)}/exabgp.out", 1)
        raise LabExit(1, f"{problem}{': ' + tail[0].strip() if tail else ''} "
                         f"(felixpy-lab down --name {st.name} cleans up)")


def _write_reflector_resources(st: LabState, reflectors: list[NodeState]) -> None:
    """Calico's reflector recipe: mesh off, every node peers with the nodes labelled as reflectors.

    Written before any agent starts, so that no node ever opens mesh sessions.
    """
    from felixpy.model.store import apply_resources

    docs: list[dict[str, Any]] = [
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPConfiguration", "metadata": {"name": "default"},
         "spec": {"nodeToNodeMeshEnabled": False}},
        {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer",
         "metadata": {"name": "peer-with-route-reflectors"},
         "spec": {"nodeSelector": "all()", "peerSelector": f"{topology.RR_LABEL} == 'true'"}},
    ]
    for node in reflectors:
        docs.append({"apiVersion": "projectcalico.org/v3", "kind": "Node",
                     "metadata": {"name": node.name, "labels": {topology.RR_LABEL: "true"}},
                     "spec": {"bgp": {"ipv4Address": f"{node.ip}/{topology.FABRIC_SUBNET.prefixlen}",
                                      "routeReflectorClusterID": topology.RR_CLUSTER_ID}}})
    store = pods.open_datastore(st.name)
    try:
        apply_resources(store, docs, "apply")
    finally:
        store.close()
    say(f"  BGPConfiguration default: nodeToNodeMeshEnabled=false; BGPPeer peer-with-route-reflectors: "
        f"all() -> {topology.RR_LABEL} == 'true'; cluster ID {topology.RR_CLUSTER_ID}")


def _start_bird(st: LabState, node: NodeState) -> None:
    node.bird_pid = procs.start_bird(st.name, node.name)
    state.save(st)
    problem = procs.wait_bird(st.name, node.name, node.bird_pid, EXABGP_READY_TIMEOUT)
    if problem:
        tail = procs.log_tail(procs.bird_paths(st.name, node.name)["out"], 1)
        raise LabExit(1, f"{problem}{': ' + tail[0].strip() if tail else ''} "
                         f"(felixpy-lab down --name {st.name} cleans up)")


def _start_reflector(st: LabState, node: NodeState) -> None:
    """BIRD 2 first (the lab owns it), then felixpy-node in route-reflector mode to drive it."""
    _start_bird(st, node)
    node.agent_pid = procs.start_reflector(st.name, node.name, st.pool, st.block_size, st.datastore,
                                           ip_family=st.ip_family)
    state.save(st)
    say(f"  {node.name}: netns {node.netns}, eth0 {node.ip}, route reflector pid {node.agent_pid}, "
        f"bird pid {node.bird_pid}")


def _wait_reflector(st: LabState, node: NodeState) -> None:
    problem = procs.wait_reflector(st.name, node.name, node.agent_pid, AGENT_READY_TIMEOUT)
    if problem:
        tail = procs.log_tail(f"{topology.node_dir(st.name, node.name)}/agent.log", 1)
        raise LabExit(1, f"{problem}{': ' + tail[0].strip() if tail else ''} "
                         f"(felixpy-lab down --name {st.name} cleans up)")


def _bgp_sessions(st: LabState, node: NodeState) -> list[dict[str, Any]]:
    """The node's BGP sessions from the status file its agent writes (mode bgp)."""
    if st.mode != "bgp":
        return []
    from felixpy.node.bgp import read_status

    data = read_status(topology.bgp_status_file(st.name, node.name))
    if data is None:
        return []
    running = procs.alive(node.agent_pid)
    return [{"peer": p["peer"], "state": p["state"] if running else "Unknown", "type": p["type"],
             "since": p["since"], "routesReceived": p["routesReceived"]} for p in data.get("peers", [])]


def _agent_reflects(st: LabState, node: NodeState) -> bool:
    """An agent node whose Node has a cluster ID: BIRD speaks for it (its status file says so)."""
    if st.mode != "bgp" or node.route_reflector:
        return False
    from felixpy.node.bgp import read_status

    data = read_status(topology.bgp_status_file(st.name, node.name)) or {}
    return bool(data.get("routeReflector"))


def _status_data(st: LabState) -> dict[str, Any]:
    store = pods.open_datastore(st.name)
    try:
        nodes = [{"name": n.name, "ip": n.ip, "routeReflector": n.route_reflector or _agent_reflects(st, n),
                  "blocks": pods.status_blocks(store, n.name), "bgp": _bgp_sessions(st, n),
                  "netns": n.netns, "agent": "running" if procs.alive(n.agent_pid) else "stopped",
                  **({"bird": "running" if procs.alive(n.bird_pid) else "stopped"} if n.route_reflector
                     else {"exabgp": "running" if procs.alive(n.exabgp_pid) else "stopped"}
                     if st.mode == "bgp" else {})}
                 for n in st.nodes]
    finally:
        store.close()
    pod_list = [{"namespace": p.namespace, "name": p.name, "node": p.node, "labels": dict(p.labels),
                 "ips": list(p.ips), "netns": p.netns, "serve": list(p.serve)}
                for p in pods.all_pods(st)]
    data: dict[str, Any] = {"name": st.name, "mode": st.mode, "pool": st.pool, "blockSize": st.block_size,
                            "datastore": st.datastore, "etcd": topology.ETCD_ENDPOINT, "nodes": nodes,
                            "pods": pod_list,
                            "services": [{"namespace": s.namespace, "name": s.name, "type": s.type,
                                          "clusterIP": s.cluster_ip, "externalIPs": list(s.external_ips),
                                          "loadBalancerIPs": list(s.load_balancer_ips),
                                          "externalTrafficPolicy": "Local" if s.local else "Cluster",
                                          "endpoints": list(s.endpoints)} for s in st.services]}
    if st.tor is not None:
        data["tor"] = {"address": topology.FABRIC_IP, "asNumber": st.tor.asn, "originate": list(st.tor.originate),
                       "bgpd": "running" if procs.alive(st.tor.pid) else "stopped"}
    if st.datastore == "kubernetes":
        data["etcd"] = f"http://127.0.0.1:{kube.ETCD_PORT}"  # in the fabric netns, the API server's
        data["apiServer"] = kube.api_server()
    return data


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _labels_text(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _serve_text(serve: list[str]) -> str:
    """`tcp:80` for ports with their default name, `web=tcp:8080` for named ones."""
    shown = []
    for entry in serve:
        name, _, spec = entry.partition("=")
        proto, _, port = spec.partition(":")
        shown.append(spec if name == f"serve-{port}-{proto}" else entry)
    return ",".join(shown) or "-"


def cmd_status(args: argparse.Namespace) -> int:
    st = state.load(args.name)
    data = _status_data(st)
    if args.output == "json":
        print(json.dumps(data, indent=2))
        return 0
    where = f"kube-apiserver {data['apiServer']}" if st.datastore == "kubernetes" else f"etcd {data['etcd']}"
    say(f"lab {st.name}: mode {st.mode}, pool {st.pool} (blocks /{st.block_size}), {where}"
        + ("" if st.phase == "up" else f", {st.phase}"))
    if st.mode == "bgp":
        rows = [["NODE", "IP", "AGENT", "SPEAKER", "BGP", "BLOCKS"]]
        rows += [[n["name"] + (" (RR)" if n["routeReflector"] else ""), n["ip"], n["agent"],
                  f"bird {n['bird']}" if "bird" in n else
                  f"exabgp {n['exabgp']}" + (" + bird" if n["routeReflector"] else ""),
                  f"{sum(s['state'] == 'Established' for s in n['bgp'])}/{len(n['bgp'])} established",
                  ",".join(n["blocks"]) or "-"] for n in data["nodes"]]
    else:
        rows = [["NODE", "IP", "AGENT", "BLOCKS"]]
        rows += [[n["name"], n["ip"], n["agent"], ",".join(n["blocks"]) or "-"] for n in data["nodes"]]
    for line in _table(rows):
        say(line)
    say("")
    if not data["pods"]:
        say("no pods (felixpy-lab pod add NS/POD --node n1)")
        return 0
    rows = [["POD", "NODE", "IP", "LABELS", "SERVES"]]
    rows += [[f"{p['namespace']}/{p['name']}", p["node"], ",".join(p["ips"]) or "-",
              _labels_text(p["labels"]), _serve_text(p["serve"])] for p in data["pods"]]
    for line in _table(rows):
        say(line)
    if st.services:
        say("")
        for svc in st.services:
            say(f"service {svc.ref}: {_service_line(svc)}")
    if "tor" in data:
        say(f"ToR {data['tor']['address']} AS {data['tor']['asNumber']}: bgpd {data['tor']['bgpd']}")
    return 0


# --- namespaces, pods, labels -------------------------------------------------------------------

def _ensure_namespace(st: LabState, namespace: str, labels: dict[str, str] | None,
                      annotations: dict[str, str] | None = None) -> bool:
    """Record the namespace and write its profile; True when it was new. annotations, when
    given, replace the namespace's (None keeps them)."""
    new = namespace not in st.namespaces
    if labels is None:
        if not new:
            return False
        labels = {}
    st.namespaces[namespace] = pods.namespace_labels(namespace, labels)
    if annotations is not None:
        st.namespace_annotations[namespace] = dict(annotations)
    if st.datastore == "kubernetes":
        # A real Namespace: its Profile kns.<ns> is derived from it by the datastore.
        kube.ensure_namespace(pods.kube_api(st.name), namespace, st.namespaces[namespace],
                              st.namespace_annotations.get(namespace))
        state.save(st)
        return new
    store = pods.open_datastore(st.name)
    try:
        pods.write_profile(store, namespace, st.namespaces[namespace], st.namespace_annotations.get(namespace))
    finally:
        store.close()
    state.save(st)
    return new


def cmd_sa_add(args: argparse.Namespace) -> int:
    """A ServiceAccount, as felixpy-controllers mirror one in etcd mode: its ksa.<ns>.<sa> profile
    (the account's labels, as pcsa.<key>, for policy's service account selectors)."""
    ref = topology.parse_pod_ref(args.account)
    labels = topology.parse_labels(args.labels)
    with state.locked(args.name):
        st = state.load(args.name)
        if _ensure_namespace(st, ref.namespace, None):
            say(f"namespace {ref.namespace} created")
    if st.datastore == "kubernetes":
        # The ServiceAccount itself: the Kubernetes datastore serves it as the ksa profile.
        kube.ensure_service_account(pods.kube_api(st.name), ref.namespace, ref.name, labels)
    else:
        store = pods.open_datastore(st.name)
        try:
            pods.write_profile_value(store, pods.profile_for_service_account(ref.namespace, ref.name, labels))
        finally:
            store.close()
    say(f"service account {ref} written")
    return 0


def cmd_ns_add(args: argparse.Namespace) -> int:
    namespace = topology.check_k8s_name("namespace", args.namespace)
    labels = topology.parse_labels(args.labels)
    annotations = topology.parse_annotations(args.annotations) if args.annotations is not None else None
    with state.locked(args.name):
        st = state.load(args.name)
        new = _ensure_namespace(st, namespace, labels, annotations)
    say(f"namespace {namespace} {'created' if new else 'updated'}: {_labels_text(st.namespaces[namespace])}")
    return 0


def cmd_pod_add(args: argparse.Namespace) -> int:
    """The state lock is held to record the pod and then its result, not across the CNI ADD: an
    ADD waits for its agent (up to a minute while it is down), and the agent restart, a pod DEL,
    or `chaos` bringing etcd back must not queue behind it, as they do not behind kubelet's ADD."""
    ref = topology.parse_pod_ref(args.pod)
    labels = topology.parse_labels(args.labels)
    annotations = topology.parse_annotations(args.annotations)
    served = topology.parse_serve(args.serve)
    with state.locked(args.name):
        st = state.load(args.name)
        node = st.node(args.node)
        if node.route_reflector:
            raise LabUsageError(f"{node.name} is a route reflector: it runs no pods")
        if st.find_pod(ref.namespace, ref.name):
            raise LabUsageError(f"pod {ref} already exists")
        if _ensure_namespace(st, ref.namespace, None):
            say(f"namespace {ref.namespace} created")
        account = topology.check_k8s_name("service account", args.service_account) if args.service_account else ""
        pod = PodState(namespace=ref.namespace, name=ref.name, node=node.name,
                       netns=topology.pod_netns(st.name, ref.namespace, ref.name),
                       container_id=secrets.token_hex(32), labels=labels, annotations=annotations,
                       serve=[f"{p.name}={p.spec()}" for p in served], service_account=account)
        if pod.netns in procs.netns_list():
            raise LabUsageError(f"netns {pod.netns} already exists (another pod name maps to it)")
        st.pods.append(pod)
        st.remember_netns(pod.netns)
        state.save(st)
    api = pods.kube_api(st.name) if st.datastore == "kubernetes" else None
    try:
        if api is not None:
            kube.create_pod(api, pod, node.ip)  # the user's Pod, bound by the "scheduler"
        procs.netns_add(pod.netns)
        result = pods.run_cni(st.name, "ADD", pod, ip_family=st.ip_family)
    except Exception:
        _forget_pod(st.name, st.datastore, pod, st.ip_family)
        raise
    with state.locked(args.name):
        st = state.load(args.name)
        recorded = st.find_pod(ref.namespace, ref.name)
        if recorded is None or recorded.container_id != pod.container_id:
            raise LabUsageError(f"pod {ref} was deleted while it was being added")
        pod = recorded
        pod.ips = pods.result_ips(result)
        state.save(st)
        if api is not None:
            kube.pod_running(api, pod, node.ip)  # the kubelet's status report
        else:
            store = pods.open_datastore(st.name)
            try:
                pods.sync_workload_endpoint(store, pod)
            finally:
                store.close()
        if served:
            pod.server_pid = pods.start_server(st.name, pod)
            state.save(st)
    say(f"pod {ref} on {node.name}: {', '.join(pod.ips) or 'no IP'}"
        + (f", serving {','.join(p.spec() for p in served)}" if served else ""))
    return 0


FORGET_DEL_SECONDS = 30.0


def _forget_pod(lab: str, datastore: str, pod: PodState, ip_family: str = "ipv4") -> None:
    """Undo a pod add that failed half-way; its IP (if any) is the agent's to release on DEL.

    DEL is retried for FORGET_DEL_SECONDS, as kubelet retries it: an ADD that failed because the
    agent died after allocating must not leave the address behind once the agent is back. The
    state lock is taken only to drop the pod from the state."""
    deadline = time.monotonic() + FORGET_DEL_SECONDS
    while True:
        try:
            pods.run_cni(lab, "DEL", pod, timeout=20, ip_family=ip_family)
            break
        except Exception as e:  # the ADD already failed; DEL is best effort
            log.debug("cleanup DEL failed pod=%s err=%s", pod.ref, e)
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
    procs.netns_del(pod.netns)
    if datastore == "kubernetes":
        try:
            kube.finish_delete(pods.kube_api(lab), pod)
        except topology.LabUsageError as e:
            log.debug("cleanup pod delete failed pod=%s err=%s", pod.ref, e)
    with state.locked(lab):
        st = state.load(lab)
        st.pods = [p for p in st.pods if p.container_id != pod.container_id]
        if pod.netns in st.netns:
            st.netns.remove(pod.netns)
        state.save(st)


def cmd_pod_del(args: argparse.Namespace) -> int:
    """Like pod add, the CNI DEL runs without the state lock held."""
    ref = topology.parse_pod_ref(args.pod)
    with state.locked(args.name):
        st = state.load(args.name)
        pod = st.pod(ref.namespace, ref.name)
    api = pods.kube_api(st.name) if st.datastore == "kubernetes" else None
    if api is not None:
        kube.begin_delete(api, pod)  # deletionTimestamp: the pod is Terminating
    pods.run_cni(st.name, "DEL", pod, ip_family=st.ip_family)
    pids = procs.netns_pids(pod.netns) if pod.netns in procs.netns_list() else set()
    procs.stop_pids(pids)
    procs.netns_del(pod.netns)
    if api is not None:
        kube.finish_delete(api, pod)  # the kubelet confirms: gone
    with state.locked(args.name):
        st = state.load(args.name)
        st.pods = [p for p in st.pods if p.container_id != pod.container_id]
        if pod.netns in st.netns:
            st.netns.remove(pod.netns)
        state.save(st)
        # The EndpointSlice controller's part: the pod is no longer an endpoint of any Service.
        for svc in services.refresh_for_pod(st, pod):
            say(f"service {svc.ref}: endpoint {ref} removed")
        state.save(st)
    say(f"pod {ref} deleted")
    return 0


# --- services -----------------------------------------------------------------------------------

def _endpoint_refs(st: LabState, text: str) -> list[str]:
    refs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        ref = topology.parse_pod_ref(item)
        st.pod(ref.namespace, ref.name)  # must exist
        refs.append(f"{ref.namespace}/{ref.name}")
    return refs


def _service_line(svc: ServiceState) -> str:
    parts = [svc.type, f"cluster IP {svc.cluster_ip or '-'}"]
    if svc.external_ips:
        parts.append(f"external IPs {','.join(svc.external_ips)}")
    if svc.load_balancer_ips:
        parts.append(f"LoadBalancer IPs {','.join(svc.load_balancer_ips)}")
    parts.append(f"externalTrafficPolicy {'Local' if svc.local else 'Cluster'}")
    parts.append(f"endpoints {','.join(svc.endpoints) or '-'}")
    return ", ".join(parts)


def cmd_service_add(args: argparse.Namespace) -> int:
    ref = topology.parse_pod_ref(args.service)
    with state.locked(args.name):
        st = state.load(args.name)
        if st.find_service(ref.namespace, ref.name):
            raise LabUsageError(f"service {ref} already exists (felixpy-lab service del {ref})")
        if ref.namespace not in st.namespaces:
            raise LabUsageError(f"namespace {ref.namespace} is not in lab {st.name} (felixpy-lab ns add)")
        svc = ServiceState(ref.namespace, ref.name, args.type,
                           cluster_ip=services.parse_ips(args.cluster_ip, "--cluster-ip")[0] if args.cluster_ip else "",
                           external_ips=services.parse_ips(args.external_ip, "--external-ip"),
                           load_balancer_ips=services.parse_ips(args.lb_ip, "--lb-ip"), local=args.local,
                           endpoints=_endpoint_refs(st, args.endpoints))
        services.check(svc)
        if st.datastore == "etcd" and not svc.cluster_ip:
            svc.cluster_ip = services.free_cluster_ip(st)
        services.write(st, svc, create=True)
        st.services.append(svc)
        state.save(st)
    say(f"service {ref}: {_service_line(svc)}")
    return 0


def cmd_service_endpoints(args: argparse.Namespace) -> int:
    ref = topology.parse_pod_ref(args.service)
    with state.locked(args.name):
        st = state.load(args.name)
        svc = st.service(ref.namespace, ref.name)
        svc.endpoints = _endpoint_refs(st, args.endpoints)
        services.write(st, svc, create=False)
        state.save(st)
    say(f"service {ref}: endpoints {','.join(svc.endpoints) or '-'}")
    return 0


def cmd_service_del(args: argparse.Namespace) -> int:
    ref = topology.parse_pod_ref(args.service)
    with state.locked(args.name):
        st = state.load(args.name)
        svc = st.service(ref.namespace, ref.name)
        services.delete(st, svc)
        st.services.remove(svc)
        state.save(st)
    say(f"service {ref} deleted")
    return 0


# --- the top-of-rack router -----------------------------------------------------------------------

def _prefixes(text: str) -> list[str]:
    out = []
    for item in (t.strip() for t in text.split(",")):
        if item:
            try:
                out.append(str(ipaddress.IPv4Network(item)))
            except ValueError:
                raise LabUsageError(f'--originate "{item}": expected an IPv4 CIDR') from None
    return out


def _tor_peer(asn: int) -> dict[str, Any]:
    return {"apiVersion": "projectcalico.org/v3", "kind": "BGPPeer", "metadata": {"name": tor.PEER_NAME},
            "spec": {"peerIP": topology.FABRIC_IP, "asNumber": asn}}


def cmd_tor(args: argparse.Namespace) -> int:
    from felixpy.model.store import ApplyError, apply_resources

    with state.locked(args.name):
        st = state.load(args.name)
        if args.action == "up":
            if st.mode != "bgp":
                raise LabUsageError(f"lab {st.name} runs mode {st.mode}: the ToR needs BGP (--mode bgp)")
            if st.tor is not None and procs.alive(st.tor.pid):
                raise LabUsageError(f"the ToR is already up (pid {st.tor.pid}; felixpy-lab tor down)")
            originate = _prefixes(args.originate)
            st.tor = state.TorState(asn=args.asn, originate=originate)
            state.save(st)
            st.tor.pid = tor.start(st.name, args.asn, originate, st.cross_subnet)
            state.save(st)
            if not args.no_peer:
                store = pods.open_datastore(st.name)
                try:
                    apply_resources(store, [_tor_peer(args.asn)], "apply")
                except ApplyError as e:
                    raise LabUsageError(str(e)) from None
                finally:
                    store.close()
            say(f"ToR: FRR bgpd in {topology.fabric_netns(st.name)} at {topology.FABRIC_IP}, AS {args.asn} "
                f"(pid {st.tor.pid}), originating {','.join(originate) or 'nothing'}"
                + ("" if args.no_peer else f"; BGPPeer {tor.PEER_NAME}: every node peers with it"))
            return 0
        if st.tor is None:
            raise LabUsageError(f"lab {st.name} has no ToR (felixpy-lab tor up)")
        if args.action == "down":
            procs.stop_pids({st.tor.pid} & procs.marked_pids(st.name))
            asn, st.tor = st.tor.asn, None
            state.save(st)
            store = pods.open_datastore(st.name)
            try:
                apply_resources(store, [_tor_peer(asn)], "delete")
            except ApplyError:
                pass  # the peer was replaced or deleted by hand
            finally:
                store.close()
            say("ToR stopped")
            return 0
    if args.action == "routes":
        data: dict[str, Any] = tor.routes(args.name)
    else:
        data = tor.sessions(args.name)
    if args.output == "json":
        print(json.dumps(data, indent=1))
        return 0
    if args.action == "routes":
        rows = [["PREFIX", "NEXT HOP", "AS PATH", "COMMUNITIES", "BEST"]]
        rows += [[prefix, p["nextHop"], p["asPath"] or "-",
                  " ".join(p["communities"] + p["largeCommunities"]) or "-", "*" if p["best"] else ""]
                 for prefix, paths in data.items() for p in paths]
    else:
        rows = [["NODE ADDRESS", "STATE"]] + [[address, state_] for address, state_ in sorted(data.items())]
    for line in _table(rows):
        say(line)
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    with state.locked(args.name):
        st = state.load(args.name)
        if args.kind == "ns":
            namespace = topology.check_k8s_name("namespace", args.target)
            if namespace not in st.namespaces:
                raise LabUsageError(f"namespace {namespace} is not in lab {st.name} (felixpy-lab ns add)")
            labels = topology.apply_label_changes(st.namespaces[namespace], args.changes)
            _ensure_namespace(st, namespace, labels)
            say(f"namespace {namespace} labelled: {_labels_text(st.namespaces[namespace])}")
            return 0
        ref = topology.parse_pod_ref(args.target)
        pod = st.pod(ref.namespace, ref.name)
        old = dict(pod.labels)
        pod.labels = topology.apply_label_changes(pod.labels, args.changes)
        if st.datastore == "kubernetes":
            kube.set_pod_labels(pods.kube_api(st.name), pod, old)
        else:
            store = pods.open_datastore(st.name)
            try:
                pods.sync_workload_endpoint(store, pod)
            finally:
                store.close()
        state.save(st)
    say(f"pod {ref} labelled: {_labels_text(pod.labels)}")
    return 0


# --- apply / delete -----------------------------------------------------------------------------

def cmd_apply(args: argparse.Namespace, delete: bool = False) -> int:
    """Validate and write (or delete) resources with felixctl's library: all or nothing."""
    from felixpy.ctl.main import UserError, read_documents
    from felixpy.model.store import ApplyError, apply_resources

    try:
        docs = read_documents(args.filename)
    except UserError as e:
        raise LabUsageError(str(e)) from None
    # Kubernetes NetworkPolicies (networking.k8s.io/v1) are converted and stored the way Calico's
    # kube-controllers store them (knp.default.<name>) by apply_resources itself.
    st = state.load(args.name)
    mode = "delete" if delete else "apply"
    if st.datastore == "kubernetes" and any(kube.is_k8s_policy(d.obj) for d in docs):
        # Kubernetes NetworkPolicies go to the API server as what they are (its validation, its
        # errors); the datastore reads them back as knp.default.<name>.
        k8s = [(d.source, d.obj) for d in docs if kube.is_k8s_policy(d.obj)]
        docs = [d for d in docs if not kube.is_k8s_policy(d.obj)]
        if docs:
            from felixpy.model import resources

            for doc in docs:
                try:
                    resources.validate(doc.obj)
                except resources.ValidationError as e:
                    raise LabUsageError(f"{doc.source}: {e}") from None
        for line in kube.apply_policies(pods.kube_api(st.name), k8s, delete):
            say(line)
        if not docs:
            return 0
    store = pods.open_datastore(st.name)
    try:
        summary = apply_resources(store, docs, mode)
    except ApplyError as e:
        raise LabUsageError(str(e)) from None
    finally:
        store.close()
    for o in summary.outcomes:
        where = f"{o.namespace}/" if o.namespace else ""
        say(f"{o.kind} {where}{o.name} {o.action}")
    return 0


# --- probe / matrix -----------------------------------------------------------------------------

def _pod_ip(pod: PodState, family: int) -> str | None:
    """The pod's address of one IP family, if it has one."""
    return next((ip for ip in pod.ips if ipaddress.ip_address(ip).version == family), None)


def _targets(proto: str, port: int | None, pod: PodState, family: int = 4) -> str | None:
    ip = _pod_ip(pod, family)
    if ip is None:
        return None
    return f"icmp:{ip}" if proto == "icmp" else f"{proto}:{ip}:{port}"


def _result_key(proto: str, port: int | None, family: int) -> str:
    """Matrix result keys: "tcp/80", "icmp" for IPv4; "tcp6/80", "icmp6" for IPv6."""
    suffix = "6" if family == 6 else ""
    return f"icmp{suffix}" if proto == "icmp" else f"{proto}{suffix}/{port}"


def _families(arg: str | None, pods_: list[PodState]) -> list[int]:
    """--family 4|6, else every family some pod has an address of (IPv4 first)."""
    if arg:
        return [int(arg)]
    have = {ipaddress.ip_address(ip).version for p in pods_ for ip in p.ips}
    return sorted(have) or [4]


def _start_probe(lab: str, src: PodState, targets: list[str], timeout: float) -> subprocess.Popen[str]:
    argv = ["ip", "netns", "exec", src.netns, sys.executable, "-m", "felixpy.lab.probe",
            "--lab", lab, "--timeout", f"{timeout:g}", *targets]
    return subprocess.Popen(argv, env={**procs.base_env(), procs.LAB_ENV: lab},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_probe(proc: subprocess.Popen[str], src: PodState, count: int, timeout: float) -> list[bool]:
    try:
        out, err = proc.communicate(timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LabUsageError(f"probe from {src.ref} did not finish") from None
    try:
        result = json.loads(out)
    except ValueError:
        raise LabUsageError(f"probe from {src.ref} failed: {(err or out).strip()[-200:]}") from None
    if not isinstance(result, list) or len(result) != count:
        raise LabUsageError(f"probe from {src.ref}: unexpected answer {out.strip()[:200]}")
    return [bool(r) for r in result]


def _ip_address(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def cmd_probe(args: argparse.Namespace) -> int:
    src_ref = topology.parse_pod_ref(args.src)
    st = state.load(args.name)
    src = st.pod(src_ref.namespace, src_ref.name)
    proto = args.proto.lower()
    what = "icmp" if proto == "icmp" else f"{proto}/{args.port}"
    if not src.ips:
        raise LabExit(2, _no_ip(src))
    # DST may be an address (a node's, a NodePort's): the probe goes there as it would to a pod.
    address = _ip_address(args.dst)
    probes: list[tuple[str, str]] = []  # (label, target)
    if address is not None:
        probes.append((address, f"icmp:{address}" if proto == "icmp" else f"{proto}:{address}:{args.port}"))
    else:
        dst_ref = topology.parse_pod_ref(args.dst)
        dst = st.pod(dst_ref.namespace, dst_ref.name)
        if not dst.ips:
            # Not "blocked": nothing was probed. A pod without an address is a broken ADD.
            raise LabExit(2, _no_ip(dst))
        # --family, else every family the destination has an address of.
        for family in _families(args.family, [dst]):
            found = _targets(proto, args.port, dst, family)
            if found is None:
                say(f"{src.ref} -> {dst.ref} {what}: blocked (destination has no IPv{family} address)")
                return 1
            probes.append((f"{dst.ref} ({_pod_ip(dst, family)})", found))
    oks = _finish_probe(_start_probe(st.name, src, [t for _, t in probes], args.timeout), src, len(probes),
                        args.timeout)
    for (label, _), ok in zip(probes, oks):
        say(f"{src.ref} -> {label} {what}: {'connected' if ok else 'blocked'}")
    return 0 if all(oks) else 1


def _no_ip(pod: PodState) -> str:
    return (f"pod {pod.ref} has no IP address (its CNI ADD returned none): nothing can be probed; "
            f"felixpy-lab pod del {pod.ref} and add it again")


def matrix(st: LabState, ports: list[int], protos: list[str], timeout: float,
           families: list[int] | None = None) -> dict[str, Any]:
    """Every ordered pair of distinct pods on every proto/port of every family, one prober process
    per source pod. Keys: "tcp/80", "icmp" (IPv4), "tcp6/80", "icmp6" (IPv6).

    A pair with a pod that has no IP is not probed: it stays false in `results` and the pod is
    listed in `errors` (pod -> why), which makes `matrix` exit 1."""
    all_pods = pods.all_pods(st)
    keys = [("icmp", None, family) if proto == "icmp" else (proto, port, family)
            for family in (families or _families(None, all_pods))
            for proto in protos for port in ([0] if proto == "icmp" else ports)]
    results: dict[str, dict[str, dict[str, bool]]] = {
        _result_key(proto, port, family): {} for proto, port, family in keys}
    running: list[tuple[PodState, list[tuple[str, str]], subprocess.Popen[str]]] = []
    for src in all_pods:
        plan: list[tuple[str, str]] = []  # (result key, dst ref) for every target sent
        targets: list[str] = []
        for proto, port, family in keys:
            key = _result_key(proto, port, family)
            results[key][src.ref] = {}
            for dst in all_pods:
                if dst is src:
                    continue
                results[key][src.ref][dst.ref] = False
                target = _targets(proto, port, dst, family)
                if target is not None and _pod_ip(src, family) is not None:
                    plan.append((key, dst.ref))
                    targets.append(target)
        if targets:
            running.append((src, plan, _start_probe(st.name, src, targets, timeout)))
    for src, plan, proc in running:
        for (key, dst_ref), ok in zip(plan, _finish_probe(proc, src, len(plan), timeout)):
            results[key][src.ref][dst_ref] = ok
    data: dict[str, Any] = {"pods": [p.ref for p in all_pods], "results": results}
    errors = {p.ref: _no_ip(p) for p in all_pods if not p.ips}
    if errors:
        data["errors"] = errors
    return data


def cmd_matrix(args: argparse.Namespace) -> int:
    st = state.load(args.name)
    data = matrix(st, topology.parse_csv_ports(args.ports), _protos(args.protos), args.timeout,
                  [int(args.family)] if args.family else None)
    errors: dict[str, str] = data.get("errors", {})
    if args.output == "json":
        print(json.dumps(data, indent=1))
        return 1 if errors else 0
    refs = data["pods"]
    if len(refs) < 2:
        say("matrix: needs at least two pods")
        return 1 if errors else 0
    for key, rows in data["results"].items():
        say(f"{key}  (row = from, column = to; + connected, . blocked, ! not probed: a pod without IP)")
        grid = [["", *refs]]
        grid += [[src, *("" if src == dst else "!" if src in errors or dst in errors
                         else ("+" if rows[src][dst] else ".") for dst in refs)]
                 for src in refs]
        for line in _table(grid):
            say("  " + line)
        say("")
    for message in errors.values():
        print(f"{PROG}: {message}", file=sys.stderr)
    return 1 if errors else 0


def _protos(text: str) -> list[str]:
    protos = [p.strip().lower() for p in text.split(",") if p.strip()]
    bad = [p for p in protos if p not in ("tcp", "udp", "icmp")]
    if bad or not protos:
        raise LabUsageError(f'--protos "{text}": expected a comma list of tcp, udp, icmp')
    return protos


# --- exec / agent -------------------------------------------------------------------------------

def cmd_exec(args: argparse.Namespace) -> int:
    if not args.command_argv:
        raise LabUsageError("exec: give a command after --, e.g. felixpy-lab exec n1 -- ip route")
    st = state.load(args.name)
    if args.target == "fabric":
        netns = topology.fabric_netns(st.name)
    elif "/" in args.target:
        ref = topology.parse_pod_ref(args.target)
        netns = st.pod(ref.namespace, ref.name).netns
    else:
        netns = st.node(args.target).netns
    env = {**os.environ, "PATH": f"{procs.bin_dir()}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    if st.datastore == "kubernetes":
        env.update({"DATASTORE_TYPE": "kubernetes", "KUBECONFIG": kube.admin_kubeconfig(st.name)})
    else:
        env.update({"ETCD_ENDPOINTS": topology.ETCD_ENDPOINT, "DATASTORE_TYPE": "etcdv3"})
    if args.target != "fabric" and "/" not in args.target:
        # What the node's agent uses, so that `exec n1 -- felixctl node status` finds its status.
        env.update({"FELIXPY_STATE_DIR": f"{topology.node_dir(st.name, args.target)}/lib",
                    "FELIXPY_BGP_STATUS": topology.bgp_status_file(st.name, args.target)})
    sys.stdout.flush()
    try:
        return subprocess.run(["ip", "netns", "exec", netns, *args.command_argv], env=env).returncode
    except KeyboardInterrupt:
        return 130


def cmd_agent(args: argparse.Namespace) -> int:
    """Stop, start or restart one node's agent the same way `up` started it.

    The readiness wait happens after the state lock is released: an agent starting waits for its
    datastore, and whatever brings the datastore back (etcd restarted by `chaos`, another command)
    may need the lock meanwhile."""
    with state.locked(args.name):
        st = state.load(args.name)
        node = st.node(args.node)
        if args.action in ("stop", "restart"):
            procs.stop_pids({node.agent_pid} & procs.marked_pids(st.name))
            say(f"{node.name}: agent stopped")
        if args.action not in ("start", "restart"):
            return 0
        if procs.alive(node.agent_pid) and node.agent_pid in procs.marked_pids(st.name):
            raise LabUsageError(f"{node.name}: agent already running (pid {node.agent_pid})")
        if node.route_reflector:
            node.agent_pid = procs.start_reflector(st.name, node.name, st.pool, st.block_size, st.datastore,
                                           ip_family=st.ip_family)
        else:
            node.agent_pid = procs.start_agent(st.name, node.name, st.pool, st.block_size, mode=st.mode,
                                               cross_subnet=st.cross_subnet, datastore=st.datastore,
                                               ip_family=st.ip_family)
        state.save(st)
    if node.route_reflector:
        problem = procs.wait_reflector(st.name, node.name, node.agent_pid, AGENT_READY_TIMEOUT)
    else:
        problem = procs.wait_agent(st.name, node.name, node.agent_pid, AGENT_READY_TIMEOUT)
    if problem:
        raise LabExit(1, problem)
    say(f"{node.name}: agent ready (pid {node.agent_pid})")
    return 0


def cmd_speaker(args: argparse.Namespace) -> int:
    """Mode bgp: stop, start or restart one node's ExaBGP (and with it its sidecar)."""
    with state.locked(args.name):
        st = state.load(args.name)
        if st.mode != "bgp":
            raise LabUsageError(f"lab {st.name} runs mode {st.mode}: there is no BGP speaker")
        node = st.node(args.node)
        if node.route_reflector:
            return _reflector_speaker(st, node, args.action)
        if args.action in ("stop", "restart"):
            procs.stop_pids({node.exabgp_pid} & procs.marked_pids(st.name))
            say(f"{node.name}: exabgp stopped")
        if args.action in ("start", "restart"):
            if procs.alive(node.exabgp_pid) and node.exabgp_pid in procs.marked_pids(st.name):
                raise LabUsageError(f"{node.name}: exabgp already running (pid {node.exabgp_pid})")
            _start_speaker(st, node)
            say(f"{node.name}: exabgp started (pid {node.exabgp_pid})")
    return 0


def _reflector_speaker(st: LabState, node: NodeState, action: str) -> int:
    """A reflector's speaker is BIRD: felixpy-node reconfigures it again once it answers."""
    if action in ("stop", "restart"):
        procs.stop_pids({node.bird_pid} & procs.marked_pids(st.name))
        say(f"{node.name}: bird stopped")
    if action in ("start", "restart"):
        if procs.alive(node.bird_pid) and node.bird_pid in procs.marked_pids(st.name):
            raise LabUsageError(f"{node.name}: bird already running (pid {node.bird_pid})")
        _start_bird(st, node)
        say(f"{node.name}: bird started (pid {node.bird_pid})")
    return 0


def cmd_chaos(args: argparse.Namespace) -> int:
    """Faults and churn on the running lab; exit 0 only if nothing was lost (felixpy/lab/chaos.py)."""
    from felixpy.lab import chaos

    if args.minutes <= 0:
        raise LabUsageError(f"--minutes {args.minutes:g}: expected a positive number")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    quiet = args.output == "json"
    run = chaos.Chaos(args.name, args.minutes, seed, keep=args.keep,
                      say=(lambda line: print(line, file=sys.stderr, flush=True)) if quiet else say)
    st = state.load(args.name)
    if not quiet:
        say(f"chaos on lab {st.name}: {args.minutes:g} min, seed {seed}, mode {st.mode}, datastore "
            f"{st.datastore}, {len(run.nodes)} nodes"
            + (f", {len(run.reflectors)} route reflectors" if run.reflectors else ""))
    report = run.run()
    if quiet:
        print(json.dumps(report.to_json(), indent=1))
    else:
        for line in chaos.summary_lines(report):
            say(line)
    return 0 if not report.problems else 1


def cmd_apiserver(args: argparse.Namespace) -> int:
    """--datastore kubernetes: stop, start or restart the lab's kube-apiserver (etcd keeps the data)."""
    with state.locked(args.name):
        st = state.load(args.name)
        if st.datastore != "kubernetes":
            raise LabUsageError(f"lab {st.name} runs on etcd: it has no kube-apiserver (up --datastore kubernetes)")
        pid = st.kube_pids.get("kube-apiserver", 0)
        if args.action in ("stop", "restart"):
            procs.stop_pids({pid} & procs.marked_pids(st.name))
            say("kube-apiserver stopped")
        if args.action in ("start", "restart"):
            if procs.alive(pid) and pid in procs.marked_pids(st.name):
                raise LabUsageError(f"kube-apiserver already running (pid {pid})")
            cp = pods.kube_api(st.name)
            cp.pids.update(st.kube_pids)
            try:
                cp.start_apiserver()
                # The controller-manager exits when the API server goes away while it is still
                # starting its controllers; a kubelet would restart it: so does the lab.
                for part in cp.ensure_running():
                    say(f"{part} was not running: started")
            except kube.ControlPlaneError as e:
                raise LabExit(1, str(e)) from None
            finally:
                st.kube_pids.update(cp.pids)
                state.save(st)
            say(f"kube-apiserver ready (pid {st.kube_pids['kube-apiserver']})")
    return 0


# --- argument parsing ---------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --name after the subcommand overrides the top-level one only when given.
    common.add_argument("--name", default=argparse.SUPPRESS, help="lab name (default felixpy)")

    parser = argparse.ArgumentParser(prog=PROG, description="A whole felixpy cluster on one machine.")
    parser.add_argument("--name", default=topology.DEFAULT_LAB, help="lab name (default felixpy)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help)
        p.set_defaults(func=func)
        return p

    p = add("up", cmd_up, "create the lab: fabric, etcd, nodes with their agents")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--mode", choices=topology.MODES, default="bgp")
    p.add_argument("--cross-subnet", action="store_true")
    p.add_argument("--route-reflectors", type=int, default=0)
    p.add_argument("--pool", default="10.244.0.0/16")
    p.add_argument("--block-size", type=int, default=26)
    p.add_argument("--ip-family", choices=topology.IP_FAMILIES, default="ipv4",
                   help=f"pods' address families (ipv6, dual: nodes get fd00:192:0:2::/64 addresses, IPv6 pool "
                        f"{topology.POOL6}); needs --mode routes or vxlan")
    p.add_argument("--datastore", choices=("etcd", "kubernetes"), default="etcd",
                   help="kubernetes: a real kube-apiserver in the lab's fabric (scripts/build-kube.sh)")

    p = add("down", cmd_down, "stop every process of the lab and delete its namespaces")

    p = add("status", cmd_status, "nodes, blocks and pods")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")

    ns = add("ns", lambda a: 0, "namespaces")
    ns_sub = ns.add_subparsers(dest="ns_command", metavar="add", required=True)
    p = ns_sub.add_parser("add", parents=[common], help="add a namespace")
    p.set_defaults(func=cmd_ns_add)
    p.add_argument("namespace")
    p.add_argument("--labels", default="")
    p.add_argument("--annotations", action="append", metavar="KEY=VALUE",
                   help="a namespace annotation, e.g. cni.projectcalico.org/ipv4pools='[\"pool\"]' (repeatable)")

    sa = add("sa", lambda a: 0, "service accounts")
    sa_sub = sa.add_subparsers(dest="sa_command", metavar="add", required=True)
    p = sa_sub.add_parser("add", parents=[common], help="add (or relabel) a service account")
    p.set_defaults(func=cmd_sa_add)
    p.add_argument("account", metavar="NS/SA")
    p.add_argument("--labels", default="")

    pod = add("pod", lambda a: 0, "pods")
    pod_sub = pod.add_subparsers(dest="pod_command", metavar="add|del", required=True)
    p = pod_sub.add_parser("add", parents=[common], help="add a pod (real CNI ADD)")
    p.set_defaults(func=cmd_pod_add)
    p.add_argument("pod", metavar="NS/POD")
    p.add_argument("--node", required=True)
    p.add_argument("--labels", default="")
    p.add_argument("--annotations", action="append", metavar="KEY=VALUE",
                   help="a pod annotation, e.g. cni.projectcalico.org/ipAddrs='[\"10.244.1.7\"]' (repeatable)")
    p.add_argument("--serve", default="", help="tcp:80,udp:80,web=tcp:8080")
    p.add_argument("--service-account", default="", metavar="SA",
                   help="the pod's serviceAccountName (its labels: `sa add`)")
    p = pod_sub.add_parser("del", parents=[common], help="delete a pod (real CNI DEL)")
    p.set_defaults(func=cmd_pod_del)
    p.add_argument("pod", metavar="NS/POD")

    p = add("label", cmd_label, "set (k=v) or remove (k-) labels of a namespace or pod")
    p.add_argument("kind", choices=("ns", "pod"))
    p.add_argument("target", metavar="NS|NS/POD")
    p.add_argument("changes", nargs="+", metavar="k=v|k-")

    for verb, func in (("apply", cmd_apply), ("delete", lambda a: cmd_apply(a, delete=True))):
        p = add(verb, func, f"{verb} projectcalico.org/v3 resources and Kubernetes NetworkPolicies "
                            "from a YAML file")
        p.add_argument("-f", "--filename", required=True)

    p = add("probe", cmd_probe, "one connection attempt: exit 0 connected, 1 blocked")
    p.add_argument("src", metavar="NS/A")
    p.add_argument("dst", metavar="NS/B|IP", help="a pod, or an IP address (a node's, a NodePort's)")
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--proto", choices=("tcp", "udp", "icmp"), default="tcp")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--family", choices=("4", "6"), default=None,
                   help="probe this IP family only (default: every family the destination has)")

    p = add("matrix", cmd_matrix, "probe every ordered pair of pods")
    p.add_argument("--ports", default="80,81")
    p.add_argument("--protos", default="tcp,udp")
    p.add_argument("--timeout", type=float, default=1.0)
    p.add_argument("--family", choices=("4", "6"), default=None,
                   help="this IP family only (default: every family the pods have)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")

    p = add("exec", cmd_exec, "run a command in a node's or pod's netns: exec n1 -- ip route")
    p.add_argument("target", metavar="NODE|NS/POD")

    p = add("agent", cmd_agent, "stop, start or restart one node's agent")
    p.add_argument("action", choices=("stop", "start", "restart"))
    p.add_argument("node")

    p = add("apiserver", cmd_apiserver, "--datastore kubernetes: stop, start or restart the lab's kube-apiserver")
    p.add_argument("action", choices=("stop", "start", "restart"))

    p = add("chaos", cmd_chaos, "faults and churn on the running lab; exit 0 only if nothing was lost")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
    p.add_argument("--keep", action="store_true", help="leave the run's pods and policies for inspection")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")

    svc = add("service", lambda a: 0, "Kubernetes Services (addresses advertised over BGP)")
    svc_sub = svc.add_subparsers(dest="service_command", metavar="add|endpoints|del", required=True)
    p = svc_sub.add_parser("add", parents=[common], help="add a Service whose endpoints are the pods named")
    p.set_defaults(func=cmd_service_add)
    p.add_argument("service", metavar="NS/NAME")
    p.add_argument("--type", default="ClusterIP", choices=services.TYPES)
    p.add_argument("--cluster-ip", default="", help="default: allocated from 10.96.0.0/16")
    p.add_argument("--external-ip", default="", help="spec.externalIPs, comma separated")
    p.add_argument("--lb-ip", default="", help="status.loadBalancer.ingress IPs (type LoadBalancer)")
    p.add_argument("--local", action="store_true", help="externalTrafficPolicy: Local")
    p.add_argument("--endpoints", default="", help="NS/POD,... (ready endpoints on their pods' nodes)")
    p = svc_sub.add_parser("endpoints", parents=[common], help="set a Service's endpoints (empty: none)")
    p.set_defaults(func=cmd_service_endpoints)
    p.add_argument("service", metavar="NS/NAME")
    p.add_argument("endpoints", nargs="?", default="", metavar="NS/POD,...")
    p = svc_sub.add_parser("del", parents=[common], help="delete a Service")
    p.set_defaults(func=cmd_service_del)
    p.add_argument("service", metavar="NS/NAME")

    p = add("tor", cmd_tor, "the fabric's top-of-rack BGP router (FRR): up, down, routes, sessions")
    p.add_argument("action", choices=("up", "down", "routes", "sessions"))
    p.add_argument("--asn", type=int, default=65000)
    p.add_argument("--originate", default="", help="prefixes the ToR announces, comma separated")
    p.add_argument("--no-peer", action="store_true", help="do not write the BGPPeer `tor`")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")

    p = add("speaker", cmd_speaker, "mode bgp: stop, start or restart one node's ExaBGP (a reflector's BIRD)")
    p.add_argument("action", choices=("stop", "start", "restart"))
    p.add_argument("node")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    command: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if command and args.command != "exec":
        build_parser().error("-- is only used by exec")
    args.command_argv = command
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        topology.check_lab_name(args.name)
        if os.geteuid() != 0:
            raise LabUsageError("needs root: the lab creates network namespaces")
        return int(args.func(args))
    except LabExit as e:
        if e.message:
            print(f"{PROG}: {e.message}", file=sys.stderr)
        return e.code
    except (LabUsageError, procs.LabCommandError, pods.CNIError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except Unavailable as e:
        print(f"{PROG}: lab {args.name}: the datastore is not answering ({e})", file=sys.stderr)
        return 1
    except DatastoreError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `felixpy-lab status | head`: the reader went away; nothing to report.
        return 0


if __name__ == "__main__":
    sys.exit(main())
