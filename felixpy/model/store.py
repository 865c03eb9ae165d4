"""Reading and writing projectcalico.org/v3 resources in a Datastore, all-or-nothing.

`apply_resources(store, docs, mode)` is what `felixctl create|apply|replace|delete -f` and the lab
use: it validates every document (a Kubernetes networking.k8s.io/v1 NetworkPolicy is converted
first and stored as the Calico NetworkPolicy `knp.default.<name>` kube-controllers would write;
deleting one deletes that), reads the current state and checks every precondition
(existence, resourceVersion, immutable fields, IP pool overlap against the stored pools *and* the
other pools in the same input) before the first write. So a rejected input leaves the datastore
unchanged. The writes themselves are create-only or compare-and-swap on the revision that was
read; a concurrent writer in between makes the remaining writes fail loudly rather than clobber.

Resources read back carry `metadata.resourceVersion` = the key's etcd revision, as a string.
The stored value never contains resourceVersion (the revision is the truth).
"""

from __future__ import annotations

import datetime
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import yaml

from felixpy.datastore import keys
from felixpy.datastore.api import KV, AlreadyExists, Conflict, Datastore, NotFound
from felixpy.model import resources as r
from felixpy.model.resources import ValidationError
from felixpy.model.schema import q
from policy import k8s

log = logging.getLogger(__name__)

MODES = ("create", "apply", "replace", "delete")


class ApplyError(ValueError):
    """The input was rejected (nothing written), or a write raced another writer; one line."""


@dataclass(frozen=True, slots=True)
class Document:
    """One input resource and where it came from (`pools.yaml document 2`), for messages."""

    source: str
    obj: Any


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str
    name: str
    namespace: str | None
    action: str  # created, updated, deleted, skipped


@dataclass(frozen=True, slots=True)
class ApplySummary:
    mode: str
    outcomes: tuple[Outcome, ...]

    def count(self, *actions: str) -> int:
        return sum(1 for o in self.outcomes if o.action in actions)

    @property
    def kinds(self) -> list[str]:
        return sorted({o.kind for o in self.outcomes})


# -- reading -----------------------------------------------------------------------------------------


def _with_revision(value: Mapping[str, Any], revision: int) -> dict[str, Any]:
    out = r.copy_resource(value)
    meta = dict(out.get("metadata") or {})
    meta["resourceVersion"] = str(revision)
    out["metadata"] = meta
    return out


def _from_kv(kind: str, kv: KV) -> dict[str, Any]:
    if kind == "IPAMConfiguration":
        return _with_revision(r.from_ipam_config_value(kv.value), kv.revision)
    return _with_revision(kv.value, kv.revision)


def read_resource(store: Datastore, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    """The stored resource with metadata.resourceVersion, or None if it does not exist."""
    if kind == "IPAMConfiguration" and name != "default":
        return None
    try:
        kv = store.get(r.storage_key(kind, name, namespace))
    except NotFound:
        return None
    return _from_kv(kind, kv)


def list_resources(store: Datastore, kind: str, namespace: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """All resources of a kind (in one namespace, or all namespaces when namespace is None),
    sorted by namespace and name, and the datastore revision of the listing."""
    info = r.KINDS[kind]
    if kind == "IPAMConfiguration":
        items, revision = store.list(keys.IPAM_CONFIG)
        return [_from_kv(kind, kv) for kv in items if kv.key == keys.IPAM_CONFIG], revision
    prefix = keys.resource_prefix(info.plural, namespace if info.namespaced else None)
    items, revision = store.list(prefix)
    expected_parts = 2 if info.namespaced and namespace is None else 1
    out = [
        _from_kv(kind, kv)
        for kv in items
        if len(kv.key[len(prefix):].split("/")) == expected_parts and isinstance(kv.value, dict)
    ]
    return out, revision


# -- identifying input -------------------------------------------------------------------------------


def _identity_only(obj: Any) -> tuple[str, str, str | None]:
    """(kind, name, namespace) of a document that is only going to be deleted."""
    if not isinstance(obj, Mapping):
        raise ValidationError(f"expected a resource object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if not isinstance(kind, str) or kind not in r.KINDS:
        raise ValidationError(f"{r.describe(obj)}: kind: unsupported kind {q(kind)}")
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{kind}: metadata.name: required field is missing")
    namespace = None
    if r.KINDS[kind].namespaced:
        ns = meta.get("namespace") if isinstance(meta, Mapping) else None
        namespace = ns if isinstance(ns, str) and ns else r.DEFAULT_NAMESPACE
    return kind, name, namespace


def _label(kind: str, name: str, namespace: str | None) -> str:
    return f'{kind} "{namespace}/{name}"' if namespace else f'{kind} "{name}"'


@dataclass
class _Planned:
    source: str
    kind: str
    name: str
    namespace: str | None
    resource: dict[str, Any] | None  # validated input (None for delete)
    current: KV | None = None
    action: str = ""

    @property
    def key(self) -> str:
        return r.storage_key(self.kind, self.name, self.namespace)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stored_value(plan: _Planned) -> dict[str, Any]:
    """What goes into the datastore: no resourceVersion; creation metadata kept across updates."""
    assert plan.resource is not None
    if plan.kind == "IPAMConfiguration":
        return r.to_ipam_config_value(plan.resource)
    value = r.copy_resource(plan.resource)
    meta = value["metadata"]
    meta.pop("resourceVersion", None)
    old_meta = (plan.current.value or {}).get("metadata", {}) if plan.current is not None else {}
    if isinstance(old_meta, dict) and old_meta.get("uid"):
        meta["uid"] = old_meta["uid"]
        meta["creationTimestamp"] = old_meta.get("creationTimestamp", meta.get("creationTimestamp"))
    else:
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", _now())
    return value


def _current_resource(plan: _Planned) -> dict[str, Any]:
    assert plan.current is not None
    return _from_kv(plan.kind, plan.current)


# -- the all-or-nothing apply ------------------------------------------------------------------------


def apply_resources(
    store: Datastore,
    docs: Sequence[Document | Mapping[str, Any]],
    mode: str,
    *,
    skip_exists: bool = False,
    skip_not_exists: bool = False,
) -> ApplySummary:
    """Validate every document, check every precondition, then write (or delete) them all.

    Raises ApplyError (nothing written) for any invalid document or failed precondition, and
    DatastoreError subclasses when the datastore itself fails.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r} (one of {', '.join(MODES)})")
    plans = [_plan_document(doc, i, mode) for i, doc in enumerate(docs, start=1)]

    seen: dict[tuple[str, str, str | None], str] = {}
    for p in plans:
        ident = (p.kind, p.name, p.namespace)
        if ident in seen:
            raise ApplyError(f"{p.source}: {_label(*ident)} also appears in {seen[ident]}")
        seen[ident] = p.source

    for p in plans:
        try:
            p.current = store.get(p.key)
        except NotFound:
            p.current = None
        _check_preconditions(p, mode, skip_exists, skip_not_exists)

    _check_pools(store, plans)
    _check_tiers(store, plans)

    outcomes: list[Outcome] = []
    for done, p in enumerate(plans):
        try:
            _write(store, p)
        except (AlreadyExists, Conflict, NotFound) as e:
            raise ApplyError(
                f"{p.source}: {_label(p.kind, p.name, p.namespace)} changed while writing ({e}); "
                f"{done} of {len(plans)} resources were written"
            ) from None
        log.info("resource %s kind=%s name=%s namespace=%s", p.action, p.kind, p.name, p.namespace or "")
        outcomes.append(Outcome(p.kind, p.name, p.namespace, p.action))
    return ApplySummary(mode, tuple(outcomes))


def _plan_document(doc: Document | Mapping[str, Any], index: int, mode: str) -> _Planned:
    if not isinstance(doc, Document):
        doc = Document(f"document {index}", doc)
    try:
        if k8s.is_k8s_networkpolicy(doc.obj):
            # Stored as Calico's kube-controllers store it: NetworkPolicy knp.default.<name>.
            if mode == "delete":
                knp_name, knp_namespace = k8s.identity(doc.obj)
                return _Planned(doc.source, "NetworkPolicy", knp_name, knp_namespace, None)
            resource = r.validate(k8s.convert_k8s_networkpolicy(doc.obj))
        elif mode == "delete":
            return _Planned(doc.source, *_identity_only(doc.obj), None)
        else:
            resource = r.validate(doc.obj)
    except ValueError as e:  # ValidationError, or the Kubernetes conversion's ValueError
        raise ApplyError(f"{doc.source}: {e}") from None
    kind, name, namespace = r.identity(resource)
    return _Planned(doc.source, kind, name, namespace, resource)


def _check_preconditions(p: _Planned, mode: str, skip_exists: bool, skip_not_exists: bool) -> None:
    what = _label(p.kind, p.name, p.namespace)
    exists = p.current is not None
    if mode == "create":
        if exists and not skip_exists:
            raise ApplyError(f"{p.source}: {what} already exists")
        p.action = "skipped" if exists else "created"
    elif mode == "replace":
        if not exists:
            raise ApplyError(f"{p.source}: {what} does not exist")
        p.action = "updated"
    elif mode == "apply":
        p.action = "updated" if exists else "created"
    else:
        if not exists and not skip_not_exists:
            raise ApplyError(f"{p.source}: {what} does not exist")
        p.action = "deleted" if exists else "skipped"

    if p.action in ("updated", "deleted") and p.current is not None:
        wanted = p.resource["metadata"].get("resourceVersion") if p.resource is not None else None
        if wanted not in (None, "") and str(wanted) != str(p.current.revision):
            raise ApplyError(
                f"{p.source}: {what}: resourceVersion {wanted} is stale (now {p.current.revision}); "
                "get the resource again"
            )
    if p.action == "updated" and p.resource is not None:
        try:
            r.check_immutable(p.resource, _current_resource(p))
        except ValidationError as e:
            raise ApplyError(f"{p.source}: {e}") from None


def _check_pools(store: Datastore, plans: list[_Planned]) -> None:
    """Overlap of every pool being written against the stored pools and the pools before it in
    the input (so the later of two overlapping input pools is the one reported)."""
    pool_plans = [p for p in plans if p.kind == "IPPool"]
    if not pool_plans:
        return
    in_input = {p.name for p in pool_plans}
    stored, _ = list_resources(store, "IPPool")
    pools: list[Mapping[str, Any]] = []
    for pool in stored:
        spec = pool.get("spec")
        if pool["metadata"].get("name") not in in_input and isinstance(spec, dict) and isinstance(spec.get("cidr"), str):
            pools.append(pool)
    for p in pool_plans:
        if p.action in ("created", "updated") and p.resource is not None:
            try:
                r.check_pool_overlap(p.resource, pools)
            except ValidationError as e:
                raise ApplyError(f"{p.source}: {e}") from None
            pools.append(p.resource)
        elif p.action == "skipped" and p.current is not None:
            pools.append(_current_resource(p))  # create --skip-exists keeps the stored pool


def _check_tiers(store: Datastore, plans: list[_Planned]) -> None:
    """libcalico-go's tier rules: a policy can only be written into a tier that exists (the
    default tier always does) and a tier can only be deleted once no policy is in it; the
    default tier cannot be deleted. The same input may create a tier and its policies, or
    delete both."""
    policy_kinds = ("NetworkPolicy", "GlobalNetworkPolicy")
    writes = [p for p in plans if p.kind in policy_kinds and p.action in ("created", "updated")]
    tier_deletes = [p for p in plans if p.kind == "Tier" and p.action == "deleted"]
    for p in tier_deletes:
        if p.name in r.WELL_KNOWN_TIERS:
            raise ApplyError(f"{p.source}: Tier \"{p.name}\" cannot be deleted")
    if not writes and not tier_deletes:
        return
    stored_tiers = {t["metadata"]["name"] for t in list_resources(store, "Tier")[0]}
    written = {p.name for p in plans if p.kind == "Tier" and p.action in ("created", "updated", "skipped")}
    tiers = (stored_tiers | written | {"default"}) - {p.name for p in tier_deletes}
    for p in writes:
        assert p.resource is not None
        tier = p.resource["spec"].get("tier") or "default"
        if tier not in tiers:
            raise ApplyError(f"{p.source}: {_label(p.kind, p.name, p.namespace)}: spec.tier: "
                             f"tier \"{tier}\" does not exist (create the Tier first)")
    if not tier_deletes:
        return
    deleting = {(p.kind, p.name, p.namespace) for p in plans if p.action == "deleted"}
    doomed = {p.name for p in tier_deletes}
    for kind in policy_kinds:
        for policy in list_resources(store, kind)[0]:
            meta = policy["metadata"]
            tier = (policy.get("spec") or {}).get("tier") or "default"
            ident = (kind, meta["name"], meta.get("namespace") if kind == "NetworkPolicy" else None)
            if tier in doomed and ident not in deleting:
                raise ApplyError(f"Tier \"{tier}\" cannot be deleted: {_label(*ident)} is in it")


def _write(store: Datastore, p: _Planned) -> None:
    if p.action == "created":
        store.create(p.key, _stored_value(p))
    elif p.action == "updated":
        assert p.current is not None
        store.update(p.key, _stored_value(p), p.current.revision)
    elif p.action == "deleted":
        assert p.current is not None
        store.delete(p.key, p.current.revision)


def parse_documents(text: str, source: str) -> list[Document]:
    """Every resource in YAML (multi-document) or JSON text; `kind: List` / `<Kind>List` are
    expanded into their items. Raises ApplyError for text that does not parse."""
    return list(_expand(_parse_text(text, source), source))


def _parse_text(text: str, source: str) -> list[Any]:
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            pass  # not JSON after all: YAML flow style, let the YAML parser judge
        else:
            return value if isinstance(value, list) else [value]
    try:
        return list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ApplyError(f"{source}: invalid YAML{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ApplyError(f"{source}: invalid YAML: {e}") from None


def _expand(values: list[Any], source: str) -> Iterator[Document]:
    for n, value in enumerate(values, start=1):
        if value is None:
            continue  # an empty document (`---` at the end of a file)
        where = f"{source} document {n}"
        kind = value.get("kind") if isinstance(value, dict) else None
        if isinstance(kind, str) and (kind == "List" or kind.endswith("List")) and "items" in value:
            items = value.get("items") or []
            if not isinstance(items, list):
                raise ApplyError(f"{where}: {kind}: items: expected a list")
            item_kind = kind[: -len("List")] if kind != "List" else None
            for i, item in enumerate(items, start=1):
                if item_kind and isinstance(item, dict):
                    item.setdefault("kind", item_kind)
                    # `kubectl get networkpolicy -o yaml` items carry no apiVersion of their own.
                    if isinstance(value.get("apiVersion"), str):
                        item.setdefault("apiVersion", value["apiVersion"])
                yield Document(f"{where} item {i}", item)
        else:
            yield Document(where, value)
