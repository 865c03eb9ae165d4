"""`felixctl datastore migrate export|import|lock|unlock`: move a cluster between etcd and Kubernetes.

calicoctl's migration (calico-reference §5), for either direction and any pair of backends:

1. `lock` the source: ClusterInformation `default` gets `datastoreReady: false` (created when
   missing), which tells agents to leave the dataplane as it is.
2. `export > cluster.yaml`: refuses an unlocked datastore. Writes every projectcalico.org/v3
   resource as a multi-document YAML, in dependency order (pools and peers, policies, profiles,
   nodes, configurations, endpoints, ClusterInformation), then the IPAM data. Metadata that the
   target assigns (resourceVersion, uid, creationTimestamp) is left out. Objects derived from
   Kubernetes are not exported: `knp.default.*` policies and `kns.*` / `ksa.*` profiles (the
   Kubernetes datastore reads them from the API; in etcd mode the controllers' mirror rewrites
   them). IPAM blocks, block affinities and handles are exported as documents of apiVersion
   `migrate.felixpy.io/v1`, their spec the datastore value unchanged (plus the identity: block
   `cidr`, affinity `node` + `cidr`, handle `handleID`); they are for `import` only.
3. `import -f cluster.yaml` into the target: every document is validated first; a target that
   already holds felixpy resources or IPAM data is refused unless `--force` (then existing
   objects are overwritten, compare-and-swap). The target is locked before the first write and
   stays locked, with the source's clusterGUID and calicoVersion. A Node or WorkloadEndpoint that
   the Kubernetes datastore cannot hold (no such Kubernetes Node or Pod) is skipped with a
   warning, as calicoctl does for nodes; anything else that fails stops the import.
4. Point the agents at the target, then `unlock` it.

Node names are taken as they are: felixpy names its Node after the Kubernetes node (NODENAME
defaults to it), so no renaming is needed between backends.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import uuid
from dataclasses import dataclass
from typing import Any, Sequence, TextIO

import yaml

import felixpy
from felixpy import names
from felixpy.datastore import keys
from felixpy.datastore.api import AlreadyExists, Datastore, DatastoreError
from felixpy.datastore.cas import read_modify_write
from felixpy.model import resources as r
from felixpy.model import store as ms

IPAM_API_VERSION = "migrate.felixpy.io/v1"
IPAM_KINDS = ("IPAMBlock", "IPAMHandle", "BlockAffinity")  # the order they are written in

# Dependency order: pools before nodes and endpoints, policies after the profiles they may name.
EXPORT_ORDER = (
    "IPPool", "IPReservation", "BGPFilter", "BGPPeer", "Tier", "GlobalNetworkPolicy", "NetworkPolicy", "Profile",
    "GlobalNetworkSet", "NetworkSet", "HostEndpoint", "Node", "BGPConfiguration", "FelixConfiguration",
    "IPAMConfiguration", "WorkloadEndpoint", "ClusterInformation", "CalicoNodeStatus",
)
# Kinds whose presence does not make a target "non-empty": Nodes are the kubelet's in the
# Kubernetes datastore, the rest are defaults every agent writes at start.
IGNORED_IN_EMPTY_CHECK = ("Node", "ClusterInformation", "IPAMConfiguration")
SKIPPABLE = ("Node", "WorkloadEndpoint")
_SERVER_FIELDS = ("resourceVersion", "uid", "creationTimestamp", "generation")


class MigrateError(ValueError):
    """A refused or failed migration step; one line for the user."""


def derived(kind: str, name: str) -> bool:
    """Objects that stand for Kubernetes objects and are recreated from them, never migrated."""
    if kind == "NetworkPolicy":
        return name.startswith("knp.default.")
    if kind == "Profile":
        return name.startswith((names.NAMESPACE_PROFILE_PREFIX, names.SERVICE_ACCOUNT_PROFILE_PREFIX))
    return False


# -- lock / unlock -----------------------------------------------------------------------------------


def _cluster_info(spec: dict[str, Any]) -> dict[str, Any]:
    return r.validate({"apiVersion": r.API_VERSION, "kind": "ClusterInformation",
                       "metadata": {"name": "default"}, "spec": spec})


def set_datastore_ready(store: Datastore, ready: bool, *, imported: dict[str, Any] | None = None) -> None:
    """Write ClusterInformation default's datastoreReady, creating the resource when missing
    (a fresh clusterGUID, as calicoctl's EnsureInitialized). `imported`: the source's spec, whose
    clusterGUID and calicoVersion are carried over."""
    def change(current: Any) -> Any:
        if current is None:
            spec: dict[str, Any] = {"clusterGUID": uuid.uuid4().hex, "clusterType": "k8s",
                                    "calicoVersion": f"felixpy-{felixpy.__version__}"}
            value = _cluster_info(spec)
        else:
            value = r.copy_resource(current)
            value["spec"] = dict(value.get("spec") or {})
        for field in ("clusterGUID", "calicoVersion", "clusterType"):
            if imported and imported.get(field):
                value["spec"][field] = imported[field]
        value["spec"]["datastoreReady"] = ready
        return value

    read_modify_write(store, keys.resource_key("clusterinformations", "default"), change)


def is_locked(store: Datastore) -> bool:
    info = ms.read_resource(store, "ClusterInformation", "default")
    return info is not None and (info.get("spec") or {}).get("datastoreReady") is False


# -- export ------------------------------------------------------------------------------------------


def _clean(resource: dict[str, Any]) -> dict[str, Any]:
    out = r.copy_resource(resource)
    meta = dict(out.get("metadata") or {})
    for field in _SERVER_FIELDS:
        meta.pop(field, None)
    out["metadata"] = meta
    return out


def export_resources(store: Datastore) -> list[dict[str, Any]]:
    """Every migratable v3 resource, in EXPORT_ORDER."""
    out: list[dict[str, Any]] = []
    for kind in EXPORT_ORDER:
        items, _ = ms.list_resources(store, kind)
        for item in items:
            if not derived(kind, str((item.get("metadata") or {}).get("name", ""))):
                out.append(_clean(item))
    return out


def export_ipam(store: Datastore) -> list[dict[str, Any]]:
    """IPAM blocks, handles and block affinities as migrate.felixpy.io/v1 documents."""
    docs: list[dict[str, Any]] = []
    for kv in store.list(keys.BLOCKS)[0]:
        parsed = keys.parse_key(kv.key)
        if parsed.kind == "block":
            spec = dict(kv.value or {})
            spec["cidr"] = parsed.name
            docs.append(_ipam_doc("IPAMBlock", parsed.name, spec))
    for kv in store.list(keys.HANDLES)[0]:
        parsed = keys.parse_key(kv.key)
        spec = dict(kv.value or {})
        spec["handleID"] = parsed.name
        docs.append(_ipam_doc("IPAMHandle", parsed.name, spec))
    for kv in store.list(keys.HOSTS)[0]:
        parsed = keys.parse_key(kv.key)
        if parsed.kind == "affinity":
            spec = dict(kv.value or {})
            spec.update({"node": parsed.node, "cidr": parsed.name})
            docs.append(_ipam_doc("BlockAffinity", f"{parsed.node}/{parsed.name}", spec))
    return docs


def _ipam_doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": IPAM_API_VERSION, "kind": kind, "metadata": {"name": name}, "spec": spec}


def export_text(store: Datastore) -> str:
    """The whole export as YAML text; MigrateError when the datastore is not locked."""
    if not is_locked(store):
        raise MigrateError("the datastore is not locked: run `felixctl datastore migrate lock` first, "
                           "so that nothing changes while it is exported")
    resources = export_resources(store)
    ipam = export_ipam(store)
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    header = (f"# felixctl datastore migrate export, {when}: {len(resources)} resources, "
              f"{len(ipam)} IPAM objects. Import with `felixctl datastore migrate import -f FILE`.\n")
    return header + yaml.safe_dump_all(resources + ipam, sort_keys=False, default_flow_style=False,
                                       explicit_start=True)


# -- import ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IPAMObject:
    kind: str
    key: str
    value: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ImportPlan:
    resources: tuple[ms.Document, ...]
    cluster_info: dict[str, Any] | None  # the source's ClusterInformation spec
    ipam: tuple[IPAMObject, ...]


@dataclass(frozen=True, slots=True)
class ImportResult:
    resources: int
    ipam: int
    skipped: tuple[str, ...]  # one warning line each


def _ipam_object(doc: ms.Document) -> IPAMObject:
    obj = doc.obj
    kind = obj.get("kind")
    spec = obj.get("spec")
    if kind not in IPAM_KINDS or not isinstance(spec, dict):
        raise MigrateError(f"{doc.source}: {IPAM_API_VERSION} {kind!r}: expected one of "
                           f"{', '.join(IPAM_KINDS)} with a spec object")
    value = dict(spec)
    try:
        if kind == "IPAMBlock":
            from felixpy.ipam.block import Block

            Block.from_json(value)  # a block we could not read back is not worth importing
            key = keys.block_key(str(value["cidr"]))
        elif kind == "IPAMHandle":
            handle = value.pop("handleID")
            if not isinstance(handle, str) or not handle:
                raise ValueError("spec.handleID: expected a handle id")
            key = keys.handle_key(handle)
        else:
            node, cidr = value.pop("node"), value.pop("cidr")
            key = keys.affinity_key(str(node), str(cidr))
    except (KeyError, ValueError) as err:
        raise MigrateError(f"{doc.source}: {kind}: invalid spec ({err})") from None
    return IPAMObject(str(kind), key, value)


def plan_import(docs: Sequence[ms.Document]) -> ImportPlan:
    """Validate every document before anything is written; MigrateError for the first bad one."""
    resources: list[ms.Document] = []
    ipam: list[IPAMObject] = []
    cluster_info: dict[str, Any] | None = None
    for doc in docs:
        if not isinstance(doc.obj, dict):
            raise MigrateError(f"{doc.source}: expected a resource object")
        if doc.obj.get("apiVersion") == IPAM_API_VERSION:
            ipam.append(_ipam_object(doc))
            continue
        try:
            resource = r.validate(doc.obj)
        except ValueError as err:
            raise MigrateError(f"{doc.source}: {err}") from None
        if resource["kind"] == "ClusterInformation":
            cluster_info = dict(resource.get("spec") or {})
            continue
        if derived(resource["kind"], resource["metadata"]["name"]):
            continue  # recreated from Kubernetes on the target
        resources.append(ms.Document(doc.source, resource))
    ipam.sort(key=lambda o: IPAM_KINDS.index(o.kind))
    return ImportPlan(tuple(resources), cluster_info, tuple(ipam))


def target_contents(store: Datastore) -> list[str]:
    """What already lives in the target that an import would collide with."""
    found: list[str] = []
    for kind in EXPORT_ORDER:
        if kind in IGNORED_IN_EMPTY_CHECK:
            continue
        items, _ = ms.list_resources(store, kind)
        names = [str(i["metadata"].get("name")) for i in items if not derived(kind, str(i["metadata"].get("name")))]
        if names:
            found.append(f"{len(names)} {kind} (e.g. {names[0]})")
    for label, prefix in (("IPAM blocks", keys.BLOCKS), ("IPAM handles", keys.HANDLES),
                          ("block affinities", keys.HOSTS)):
        count = len(store.list(prefix)[0])
        if count:
            found.append(f"{count} {label}")
    return found


def _write_ipam(store: Datastore, obj: IPAMObject, force: bool) -> None:
    try:
        store.create(obj.key, obj.value)
        return
    except AlreadyExists:
        if not force:
            raise MigrateError(f"{obj.kind} {obj.key} already exists in the target (use --force to overwrite)") from None
    read_modify_write(store, obj.key, lambda _current: obj.value)


def import_plan(store: Datastore, plan: ImportPlan, *, force: bool = False) -> ImportResult:
    if not force:
        found = target_contents(store)
        if found:
            raise MigrateError("the target datastore is not empty (" + ", ".join(found) +
                               "): import into an empty datastore, or use --force to overwrite")
    # Locked before the first write: agents pointed at the target leave the dataplane alone
    # until `unlock`.
    set_datastore_ready(store, False, imported=plan.cluster_info)
    written = 0
    skipped: list[str] = []
    for doc in plan.resources:
        kind, name, namespace = r.identity(doc.obj)
        try:
            ms.apply_resources(store, [doc], "apply")
        except (ms.ApplyError, DatastoreError) as err:
            if kind not in SKIPPABLE:
                raise MigrateError(f"{doc.source}: {kind} {name}: {_first_line(err)}") from None
            where = f"{namespace}/{name}" if namespace else name
            owner = "Node" if kind == "Node" else "Pod"
            skipped.append(f"skipped {kind} {where}: the target cannot hold it (no such Kubernetes {owner}?): "
                           f"{_first_line(err)}")
            continue
        written += 1
    for obj in plan.ipam:
        _write_ipam(store, obj, force)
    return ImportResult(written, len(plan.ipam), tuple(skipped))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# -- the felixctl subcommand -------------------------------------------------------------------------


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser("datastore", help="datastore migration")
    sub = parser.add_subparsers(dest="datastore_command", metavar="{migrate}")
    sub.required = True
    migrate = sub.add_parser("migrate", help="move a cluster's resources between etcd and Kubernetes",
                             description="lock the source, export it, import into the target, unlock the target")
    msub = migrate.add_subparsers(dest="migrate_command", metavar="{export,import,lock,unlock}")
    msub.required = True
    msub.add_parser("export", help="write every resource and the IPAM data as YAML to stdout (datastore must be locked)")
    imp = msub.add_parser("import", help="load an export into this (empty) datastore; leaves it locked")
    imp.add_argument("-f", "--filename", required=True, metavar="FILE", help="the export, - for stdin")
    imp.add_argument("--force", action="store_true", help="import into a non-empty datastore, overwriting")
    msub.add_parser("lock", help="set ClusterInformation datastoreReady=false")
    msub.add_parser("unlock", help="set ClusterInformation datastoreReady=true")
    return parser


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as err:
        raise MigrateError(f"{path}: cannot read: {err.strerror or err}") from None


def run(args: argparse.Namespace, store: Datastore, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        command = args.migrate_command
        if command == "lock":
            set_datastore_ready(store, False)
            print("Datastore locked.", file=out)
        elif command == "unlock":
            set_datastore_ready(store, True)
            print("Datastore unlocked.", file=out)
        elif command == "export":
            out.write(export_text(store))
        elif command == "import":
            source = "stdin" if args.filename == "-" else args.filename
            try:
                docs = ms.parse_documents(_read(args.filename), source)
            except ms.ApplyError as error:
                raise MigrateError(str(error)) from None
            result = import_plan(store, plan_import(docs), force=args.force)
            for line in result.skipped:
                print(f"warning: {line}", file=err)
            print(f"Successfully imported {result.resources} resource(s) and {result.ipam} IPAM object(s)", file=out)
            print("The datastore is locked: point the agents at it, then run "
                  "`felixctl datastore migrate unlock`.", file=out)
        else:
            raise MigrateError(f"unknown migrate command {command!r}")
        return 0
    except (MigrateError, DatastoreError, ValueError) as error:
        print(f"felixctl: error: {_first_line(error)}", file=err)
        return 1

