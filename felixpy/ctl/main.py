"""felixctl: calicoctl's resource commands (get, create, apply, replace, delete, patch, label),
`version`, `ipam`, `policy explain`, `node status|checksystem|diags` and `cluster diags`, working
directly on the datastore named by DATASTORE_TYPE / ETCD_ENDPOINTS. `apply -f` also takes
Kubernetes NetworkPolicy YAML (stored as knp.default.<name>).

Every write command is all-or-nothing: the whole input is parsed and validated, and every
precondition checked, before the first write (see felixpy.model.store). User errors print one
line, `felixctl: error: ...`, and exit 1; never a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import felixpy
from felixpy import names
from felixpy.ctl import output
from felixpy.ctl.errors import UserError
from felixpy.datastore.api import Datastore, DatastoreError
from felixpy.model import resources as r
from felixpy.model import store as ms
from felixpy.model.resources import ValidationError

log = logging.getLogger(__name__)

__all__ = ["UserError", "main", "run"]


# -- reading -f FILE ---------------------------------------------------------------------------------


def read_documents(path: str, namespace: str | None = None) -> list[ms.Document]:
    """Every resource in a YAML (multi-document) or JSON file, `-` meaning stdin; List kinds are
    expanded. A namespace given with -n fills in namespaced resources that do not name one."""
    source = "stdin" if path == "-" else path
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise UserError(f"{source}: cannot read: {e.strerror or e}") from None
    try:
        docs = ms.parse_documents(text, source)
    except ms.ApplyError as e:
        raise UserError(str(e)) from None
    if not docs:
        raise UserError(f"{source}: no resources found")
    if namespace:
        for doc in docs:
            obj = doc.obj
            if isinstance(obj, dict) and obj.get("kind") in r.KINDS and r.KINDS[obj["kind"]].namespaced:
                meta = obj.setdefault("metadata", {})
                if isinstance(meta, dict) and not meta.get("namespace"):
                    meta["namespace"] = namespace
    return docs


# -- commands ----------------------------------------------------------------------------------------


def _kind(name: str) -> r.Kind:
    try:
        return r.lookup_kind(name)
    except ValueError as e:
        raise UserError(str(e)) from None


def _namespace_for(kind: r.Kind, args: argparse.Namespace) -> str | None:
    if not kind.namespaced:
        return None
    return args.namespace or r.DEFAULT_NAMESPACE


def cmd_get(args: argparse.Namespace, store: Datastore) -> int:
    kind = _kind(args.kind)
    default_as = output.DEFAULT_AS_NUMBER
    if kind.kind == "Node" and args.output == "wide":
        bgp = ms.read_resource(store, "BGPConfiguration", "default")
        if bgp is not None and isinstance(bgp.get("spec", {}).get("asNumber"), int):
            default_as = bgp["spec"]["asNumber"]
    if args.names:
        items: list[dict[str, Any]] = []
        namespace = _namespace_for(kind, args)
        for name in args.names:
            res = ms.read_resource(store, kind.kind, name, namespace)
            if res is None:
                where = f' in namespace "{namespace}"' if namespace else ""
                raise UserError(f'{kind.kind} "{name}" does not exist{where}')
            items.append(res)
        revision = max(int(i["metadata"]["resourceVersion"]) for i in items)
    else:
        namespace = None if args.all_namespaces else _namespace_for(kind, args)
        items, revision = ms.list_resources(store, kind.kind, namespace)
    text = output.render(kind.kind, items, args.output, single=len(args.names) == 1,
                         revision=revision, default_as=default_as)
    sys.stdout.write(text)
    return 0


_PAST = {"create": "created", "apply": "applied", "replace": "replaced", "delete": "deleted"}


def _report(summary: ms.ApplySummary) -> None:
    done = summary.count("created", "updated", "deleted")
    skipped = summary.count("skipped")
    kinds = summary.kinds
    what = f"'{kinds[0]}' resource(s)" if len(kinds) == 1 else "resource(s)"
    line = f"Successfully {_PAST[summary.mode]} {done} {what}"
    if skipped:
        reason = "already exist" if summary.mode == "create" else "did not exist"
        line += f" ({skipped} skipped: {reason})"
    print(line)


def cmd_write(args: argparse.Namespace, store: Datastore) -> int:
    mode = args.command
    if mode == "delete" and not args.filename:
        if not args.kind or not args.names:
            raise UserError("delete needs -f FILE or KIND NAME...")
        kind = _kind(args.kind)
        namespace = _namespace_for(kind, args)
        docs = [
            ms.Document(f"{kind.kind} {name}", {"kind": kind.kind, "metadata": {"name": name, "namespace": namespace}})
            for name in args.names
        ]
    else:
        if mode == "delete" and (args.kind or args.names):
            raise UserError("delete takes either -f FILE or KIND NAME..., not both")
        docs = read_documents(args.filename, args.namespace)
    summary = ms.apply_resources(
        store, docs, mode,
        skip_exists=getattr(args, "skip_exists", False),
        skip_not_exists=getattr(args, "skip_not_exists", False),
    )
    _report(summary)
    return 0


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _read_existing(store: Datastore, kind: r.Kind, name: str, args: argparse.Namespace) -> dict[str, Any]:
    namespace = _namespace_for(kind, args)
    res = ms.read_resource(store, kind.kind, name, namespace)
    if res is None:
        where = f' in namespace "{namespace}"' if namespace else ""
        raise UserError(f'{kind.kind} "{name}" does not exist{where}')
    return res


def cmd_patch(args: argparse.Namespace, store: Datastore) -> int:
    kind = _kind(args.kind)
    try:
        patch = json.loads(args.patch)
    except json.JSONDecodeError as e:
        raise UserError(f"--patch: invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(patch, dict):
        raise UserError("--patch: expected a JSON object")
    current = _read_existing(store, kind, args.name, args)
    patched = merge_patch(current, patch)
    # The identity and the revision read are not the patch's to change: the write is a CAS on it.
    patched["kind"] = kind.kind
    patched["metadata"] = dict(patched.get("metadata") or {})
    for field in ("name", "namespace", "resourceVersion"):
        if field in current["metadata"]:
            patched["metadata"][field] = current["metadata"][field]
    ms.apply_resources(store, [ms.Document("patch", patched)], "replace")
    print(f"Successfully patched 1 '{kind.kind}' resource")
    return 0


def cmd_label(args: argparse.Namespace, store: Datastore) -> int:
    kind = _kind(args.kind)
    current = _read_existing(store, kind, args.name, args)
    labels = dict(current["metadata"].get("labels") or {})
    if args.remove:
        if "=" in args.label:
            raise UserError("--remove takes a label key, not key=value")
        if args.label not in labels:
            raise UserError(f'{kind.kind} "{args.name}" has no label "{args.label}"')
        del labels[args.label]
        message = f"Successfully removed label {args.label} from {kind.kind} {args.name}"
    else:
        key, eq, value = args.label.partition("=")
        if not eq or not key:
            raise UserError(f'label "{args.label}": expected key=value')
        if key in labels and labels[key] != value and not args.overwrite:
            raise UserError(
                f'{kind.kind} "{args.name}" already has label {key}={labels[key]}; use --overwrite to change it'
            )
        labels[key] = value
        message = f"Successfully set label {key} on {kind.kind} {args.name}"
    current["metadata"]["labels"] = labels
    ms.apply_resources(store, [ms.Document("label", current)], "replace")
    print(message)
    return 0


@dataclass
class _PolicyWorld:
    """The stored policy world, through the conversions the agent uses."""

    endpoints: list[Any]  # workload endpoints
    policies: list[Any]
    profiles: list[Any]
    tiers: list[Any]
    host_endpoints: list[Any]
    network_sets: list[Any]


def _load_policy_world(store: Datastore) -> _PolicyWorld:
    """Workload endpoints (with their namespace's and service account's labels), policies,
    profiles (Calico's built-in projectcalico-default-allow too), tiers, host endpoints (with
    their profiles' labels) and network sets. A stored resource that does not convert is skipped
    with a warning on stderr."""
    from policy import calico

    def converted(kind: str, convert: Any, items: list[dict[str, Any]]) -> list[Any]:
        out = []
        for res in items:
            try:
                out.append(convert(res))
            except (ValueError, KeyError, TypeError) as e:
                meta = res.get("metadata") or {}
                where = "/".join(p for p in (meta.get("namespace"), meta.get("name")) if p)
                print(f"felixctl: warning: skipping {kind} {where}: {_first_line(e)}", file=sys.stderr)
        return out

    profile_res, _ = ms.list_resources(store, "Profile")
    namespace_labels: dict[str, dict[str, str]] = {}
    sa_labels: dict[tuple[str, str], dict[str, str]] = {}
    for p in profile_res:
        name = str(p["metadata"].get("name", ""))
        if name.startswith(names.NAMESPACE_PROFILE_PREFIX):
            namespace_labels[name[len(names.NAMESPACE_PROFILE_PREFIX):]] = calico.namespace_labels_from_profile(p)
        sa_prefix = names.SERVICE_ACCOUNT_PROFILE_PREFIX
        ns, dot, account = name[len(sa_prefix):].partition(".") if name.startswith(sa_prefix) else ("", "", "")
        if dot and ns and account:
            sa_labels[(ns, account)] = calico.service_account_labels_from_profile(p)

    def endpoint(wep: dict[str, Any]) -> Any:
        ns = (wep.get("metadata") or {}).get("namespace") or r.DEFAULT_NAMESPACE
        base = calico.endpoint_from_resources(wep, {})
        account = dict(base.labels).get(calico.SERVICE_ACCOUNT_LABEL)
        return calico.endpoint_from_resources(wep, namespace_labels.get(ns, {}), sa_labels.get((ns, account or "")))

    endpoints = converted("WorkloadEndpoint", endpoint, ms.list_resources(store, "WorkloadEndpoint")[0])
    policy_res = ms.list_resources(store, "NetworkPolicy")[0] + ms.list_resources(store, "GlobalNetworkPolicy")[0]
    policies = converted("policy", calico.policy_from_resource, policy_res)
    profiles = converted("Profile", calico.profile_from_resource, profile_res)
    if not any(p.name == calico.DEFAULT_ALLOW_PROFILE for p in profiles):
        profiles.append(calico.DEFAULT_ALLOW)
    by_name = {p.name: p for p in profiles}
    tiers = converted("Tier", calico.tier_from_resource, ms.list_resources(store, "Tier")[0])
    heps = converted("HostEndpoint", lambda h: calico.host_endpoint_from_resource(h, by_name),
                     ms.list_resources(store, "HostEndpoint")[0])
    sets = converted("NetworkSet", lambda n: calico.network_set_from_resource(
        n, namespace_labels.get((n.get("metadata") or {}).get("namespace") or "", {})),
        ms.list_resources(store, "NetworkSet")[0] + ms.list_resources(store, "GlobalNetworkSet")[0])
    return _PolicyWorld(endpoints, policies, profiles, tiers, heps, sets)


_HOST_ENDPOINT_PREFIXES = ("hostendpoint/", "hep/")


def _find_host_endpoint(ref: str, world: _PolicyWorld) -> Any:
    name = ref.split("/", 1)[1]
    for hep in world.host_endpoints:
        if hep.name == name:
            return hep
    raise UserError(f'host endpoint "{name}" not found')


def _find_peer(ref: str, world: _PolicyWorld) -> Any:
    """An Endpoint for NS/POD or for a pod's IP, a HostEndpoint for hostendpoint/NAME or one of
    its expectedIPs; any other IP stays a plain address."""
    import ipaddress

    if ref.startswith(_HOST_ENDPOINT_PREFIXES):
        return _find_host_endpoint(ref, world)
    try:
        ip = ipaddress.ip_address(ref)
    except ValueError:
        ns, slash, pod = ref.partition("/")
        if not slash or not ns or not pod:
            raise UserError(f'"{ref}": expected NAMESPACE/POD, hostendpoint/NAME or an IP address') from None
        for ep in world.endpoints:
            if ep.namespace == ns and ep.name == pod:
                return ep
        raise UserError(f'pod "{ref}" not found: no WorkloadEndpoint for pod "{pod}" in namespace "{ns}"') from None
    for ep in world.endpoints:
        if any(ipaddress.ip_interface(a).ip == ip for a in ep.ips):
            return ep
    for hep in sorted(world.host_endpoints, key=lambda h: h.name):
        if any(ipaddress.ip_address(a) == ip for a in hep.endpoint.ips):
            return hep
    return str(ip)


def _family_of(*refs: str) -> int | None:
    """The IP family of the first reference that is an address (a dual-stack pod named by its
    IPv6 address is explained over IPv6, as ip6tables would decide it); None for pods by name."""
    import ipaddress

    for ref in refs:
        try:
            return ipaddress.ip_address(ref).version
        except ValueError:
            continue
    return None


def _failsafe_ports() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]]:
    """The failsafe ports the agent on this host uses: FELIX_FAILSAFE*HOSTPORTS, else Calico's."""
    from felixpy.config import ConfigError, load_config
    from policy.model import DEFAULT_FAILSAFE_INBOUND, DEFAULT_FAILSAFE_OUTBOUND

    env = {k: v for k, v in os.environ.items() if k.upper().startswith("FELIX_FAILSAFE")}
    if not env:
        return DEFAULT_FAILSAFE_INBOUND, DEFAULT_FAILSAFE_OUTBOUND
    try:
        felix = load_config(env).felix
    except ConfigError as err:
        raise UserError(str(err)) from None
    return felix.failsafe_inbound, felix.failsafe_outbound


def cmd_policy(args: argparse.Namespace, store: Datastore) -> int:
    from policy.evaluate import explain

    proto = args.proto.lower()
    if proto == "icmp":
        port = 0
    elif args.port is None:
        raise UserError(f"--port is required for {proto}")
    else:
        port = args.port
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: expected 1..65535")
    world = _load_policy_world(store)
    src = _find_peer(args.src, world)
    dst = _find_peer(args.dst, world)
    via = None
    if args.via:
        if not args.via.startswith(_HOST_ENDPOINT_PREFIXES):
            raise UserError(f'--via "{args.via}": expected hostendpoint/NAME')
        via = _find_host_endpoint(args.via, world)
    failsafe_in, failsafe_out = _failsafe_ports()
    verdict = explain(src, dst, port, proto, policies=world.policies, profiles=world.profiles, tiers=world.tiers,
                      via=via, others=[*world.network_sets, *(h.endpoint for h in world.host_endpoints)],
                      failsafe_inbound=failsafe_in, failsafe_outbound=failsafe_out,
                      ip_version=_family_of(args.src, args.dst))
    if args.output == "json":
        print(json.dumps(verdict.to_dict(), indent=2))
    else:
        what = proto if proto == "icmp" else f"{proto}/{port}"
        print(f"{verdict.src} -> {verdict.dst} {what}: {'ALLOWED' if verdict.allowed else 'DENIED'}")
        lines = [("egress ", verdict.src, verdict.egress), ("ingress", verdict.dst, verdict.ingress)]
        if via is not None:
            lines.append(("forward", f"via hostendpoint/{via.name}", verdict.forward))
        for label, side, dv in lines:
            reason = dv.reason if dv is not None else "not a workload or host endpoint: not policed here"
            print(f"  {label} ({side}): {reason}")
    return 0 if verdict.allowed else 1


def cmd_version(args: argparse.Namespace, store: Datastore | None) -> int:
    print(f"Client Version:    v{felixpy.__version__}")
    if store is None:
        return 0
    info = ms.read_resource(store, "ClusterInformation", "default")
    spec = info.get("spec", {}) if info is not None else {}
    print(f"Cluster Version:   {spec.get('calicoVersion') or 'unknown (no ClusterInformation default)'}")
    print(f"Cluster Type:      {spec.get('clusterType') or 'unknown'}")
    return 0


_PEER_TYPES = {"mesh": "node-to-node mesh", "global": "global", "node": "node specific",
               "reflector": "route reflector"}


def _status_file(args: argparse.Namespace) -> str:
    if args.status_file:
        return str(args.status_file)
    if os.environ.get("FELIXPY_BGP_STATUS"):
        return os.environ["FELIXPY_BGP_STATUS"]
    from felixpy.config import DEFAULT_STATE_DIR
    from felixpy.node.bgp import STATUS_FILE_NAME

    state_dir = os.environ.get("FELIXPY_STATE_DIR") or DEFAULT_STATE_DIR
    return f"{state_dir.rstrip('/')}/{STATUS_FILE_NAME}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def cmd_node_status(args: argparse.Namespace) -> int:
    """calicoctl node status: this node's BGP sessions, from the status file the agent writes."""
    import time as _time

    from felixpy.node.bgp import read_status

    path = _status_file(args)
    data = read_status(path)
    if data is None:
        raise UserError(f"no BGP status at {path}: is felixpy-node running here with "
                        "CALICO_NETWORKING_BACKEND=bird? (--status-file PATH)")
    running = _pid_alive(data.get("pid"))
    peers = []
    for p in data.get("peers", []):
        state = p.get("state", "Idle") if running else "Unknown"
        received = int(p.get("routesReceived", 0))
        info = state if state != "Established" else f"Established, {received} routes received"
        if p.get("info") and state != "Established":
            info = f"{state}: {p['info']}"
        since = float(p.get("since", 0))
        peers.append({**p, "state": state, "info": info, "sinceEpoch": since,
                      "since": _time.strftime("%Y-%m-%dT%H:%M:%SZ", _time.gmtime(since))})
    if args.output == "json":
        print(json.dumps({"node": data.get("node"), "running": running, "sidecar": data.get("sidecar"),
                          "configError": data.get("configError", ""), "peers": peers}, indent=2))
        return 0
    if running:
        print("felixpy-node process is running.")
    else:
        print(f"felixpy-node process is not running (status from "
              f"{_time.strftime('%Y-%m-%d %H:%M:%S', _time.localtime(float(data.get('updated', 0))))}).")
    if data.get("sidecar") != "connected":
        print("BGP sidecar (ExaBGP) is not connected.")
    if data.get("configError"):
        print(f"BGP configuration error: {data['configError']}")
    # calicoctl prints BIRD's sessions, then BIRD6's: one table per family of the peer address.
    for version in (4, 6):
        family = [p for p in peers if ipaddress.ip_address(p["peer"]).version == version]
        print(f"\nIPv{version} BGP status")
        if not family:
            print(f"No IPv{version} peers found.")
            continue
        _print_peer_table(family)
    print()
    return 0


def _print_peer_table(peers: list[dict[str, Any]]) -> None:
    import time as _time

    rows = [["PEER ADDRESS", "PEER TYPE", "STATE", "SINCE", "INFO"]]
    for p in peers:
        since_text = _time.strftime("%H:%M:%S", _time.localtime(float(p["sinceEpoch"])))
        rows.append([p["peer"], _PEER_TYPES.get(p.get("type", ""), str(p.get("type"))),
                     "up" if p["state"] == "Established" else "start" if p["state"] == "Connect" else "down",
                     since_text, p["info"]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    print(line)
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")
        if i == 0:
            print(line)
    print(line)


# -- argument parsing --------------------------------------------------------------------------------


def _add_namespace(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--namespace", help="namespace for namespaced resources (default: default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="felixctl",
        description="Manage felixpy (projectcalico.org/v3) resources in the datastore "
        "named by DATASTORE_TYPE / ETCD_ENDPOINTS.",
    )
    parser.add_argument("-l", "--log-level", default="warning",
                        choices=("debug", "info", "warning", "error"), help="log level (default: warning)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    kinds = ", ".join(sorted(k.aliases[0] for k in r.KINDS.values()))

    get = sub.add_parser("get", help="show resources", description=f"Kinds: {kinds}.")
    get.add_argument("kind", metavar="KIND")
    get.add_argument("names", metavar="NAME", nargs="*")
    get.add_argument("-o", "--output", default="ps", choices=output.FORMATS)
    _add_namespace(get)
    get.add_argument("-A", "--all-namespaces", action="store_true")

    for verb, text in (("create", "create resources from a file"), ("apply", "create or update resources"),
                       ("replace", "update existing resources")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("-f", "--filename", required=True, metavar="FILE", help="YAML or JSON file, - for stdin")
        _add_namespace(p)
        if verb == "create":
            p.add_argument("--skip-exists", action="store_true", help="skip resources that already exist")

    delete = sub.add_parser("delete", help="delete resources (-f FILE or KIND NAME...)")
    delete.add_argument("kind", metavar="KIND", nargs="?")
    delete.add_argument("names", metavar="NAME", nargs="*")
    delete.add_argument("-f", "--filename", metavar="FILE")
    delete.add_argument("-s", "--skip-not-exists", action="store_true", help="skip resources that do not exist")
    _add_namespace(delete)

    patch = sub.add_parser("patch", help="merge a JSON patch into a resource")
    patch.add_argument("kind", metavar="KIND")
    patch.add_argument("name", metavar="NAME")
    patch.add_argument("-p", "--patch", required=True, metavar="JSON")
    _add_namespace(patch)

    label = sub.add_parser("label", help="set or remove a label")
    label.add_argument("kind", metavar="KIND")
    label.add_argument("name", metavar="NAME")
    label.add_argument("label", metavar="KEY=VALUE|KEY")
    label.add_argument("--remove", action="store_true", help="remove the label KEY")
    label.add_argument("--overwrite", action="store_true", help="replace an existing value")
    _add_namespace(label)

    version = sub.add_parser("version", help="show client and cluster versions")
    version.add_argument("--client", action="store_true", help="client version only (no datastore)")

    policy = sub.add_parser("policy", help="explain what policy does to traffic")
    policy_sub = policy.add_subparsers(dest="policy_command", metavar="SUBCOMMAND")
    policy_sub.required = True
    explain = policy_sub.add_parser(
        "explain", help="is SRC -> DST allowed, and which policy, rule and selector decided it",
        description="Evaluate the stored policies for one connection, as the agent compiles them. "
        "Exits 0 when allowed, 1 when denied.")
    explain.add_argument("src", metavar="SRC", help="NAMESPACE/POD, hostendpoint/NAME (the host, out through "
                         "that interface) or an IP address")
    explain.add_argument("dst", metavar="DST", help="NAMESPACE/POD, hostendpoint/NAME (the host, in through "
                         "that interface) or an IP address")
    explain.add_argument("--via", metavar="hostendpoint/NAME",
                         help="the packet enters the node through this host endpoint and is forwarded to DST "
                         "(doNotTrack, preDNAT and applyOnForward policy)")
    explain.add_argument("--port", type=int, help="destination port (not for icmp)")
    explain.add_argument("--proto", default="tcp", type=str.lower, choices=("tcp", "udp", "sctp", "icmp"),
                         help="protocol (default tcp)")
    explain.add_argument("-o", "--output", default="text", choices=("text", "json"))

    node = sub.add_parser("node", help="this node: BGP status, system check, diagnostics")
    node_sub = node.add_subparsers(dest="node_command", metavar="SUBCOMMAND")
    node_sub.required = True
    status = node_sub.add_parser("status", help="BGP sessions of the felixpy-node on this host",
                                 description="Reads the status file the agent writes ($FELIXPY_BGP_STATUS, "
                                 "else $FELIXPY_STATE_DIR/bgp-status.json); needs no datastore.")
    status.add_argument("-o", "--output", default="table", choices=("table", "json"))
    status.add_argument("--status-file", metavar="PATH", help="the agent's BGP status JSON")
    from felixpy.ctl import checksystem, diags

    checksystem.add_parser(node_sub)
    diags.add_node_parser(node_sub)
    cluster = sub.add_parser("cluster", help="the whole cluster: diagnostics")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", metavar="SUBCOMMAND")
    cluster_sub.required = True
    diags.add_cluster_parser(cluster_sub)

    from felixpy.ctl import ipam_cmd  # imported here: it pulls in the IPAM allocator

    ipam_cmd.add_parser(sub)
    from felixpy.ctl import migrate

    migrate.add_parser(sub)
    return parser


_COMMANDS = {
    "get": cmd_get,
    "create": cmd_write,
    "apply": cmd_write,
    "replace": cmd_write,
    "delete": cmd_write,
    "patch": cmd_patch,
    "label": cmd_label,
    "policy": cmd_policy,
}


def _open_store() -> Datastore:
    from felixpy.datastore.factory import open_datastore

    try:
        return open_datastore(os.environ)
    except ValueError as e:
        raise UserError(str(e)) from None


def run(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command in ("get", "delete") and not any(e.startswith("-") for e in extra):
        # argparse stops filling `NAME...` at the first option: `get np -n x NAME` still names NAME.
        args.names = [*args.names, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "version" and args.client:
        return cmd_version(args, None)
    if args.command == "node":
        if args.node_command == "checksystem":
            from felixpy.ctl import checksystem

            return checksystem.run(args, _open_store, os.environ)
        if args.node_command == "diags":
            from felixpy.ctl import diags

            return diags.run_node(args, os.environ)
        return cmd_node_status(args)
    if args.command == "cluster":
        from felixpy.ctl import diags

        return diags.run_cluster(args, _open_store, os.environ)
    store = _open_store()
    try:
        if args.command == "version":
            return cmd_version(args, store)
        if args.command == "datastore":
            from felixpy.ctl import migrate

            return migrate.run(args, store)
        if args.command == "ipam":
            from felixpy.ctl import ipam_cmd

            return ipam_cmd.run(args, store)
        return _COMMANDS[args.command](args, store)
    finally:
        store.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def main(argv: Sequence[str] | None = None) -> None:
    try:
        code = run(argv)
    except (UserError, ms.ApplyError, ValidationError) as e:
        print(f"felixctl: error: {_first_line(e)}", file=sys.stderr)
        code = 1
    except DatastoreError as e:
        print(f"felixctl: error: datastore: {_first_line(e)}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
