"""The field-coverage rule: every field of every kind felixpy accepts is honoured (with a test that
shows its effect) or refused at validation with one line naming it (felixpy/model/coverage.py).

The walk goes through the field tables of model/resources.py, so a field added there without a
declaration in coverage.py fails here, and so does a declaration whose field was removed, an
honoured field whose test does not exist, and a refused field that validation lets through.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
from typing import Any

import pytest

from felixpy.model import coverage, resources, schema
from felixpy.model.coverage import SUPPORT, Honoured, HonouredIf, Refused, Tolerated
from felixpy.model.resources import ValidationError, validate

REPO = pathlib.Path(__file__).resolve().parents[2]
FIELDS = coverage.all_fields(resources.ROOTS)


def test_every_field_is_declared_and_every_declaration_names_a_field() -> None:
    assert resources.COVERAGE_PROBLEMS == []


def test_no_field_is_declared_twice() -> None:
    # A dict literal keeps the last of two equal keys silently: a second declaration of a field
    # would hide the first. Read coverage.py's own text to catch that.
    tree = ast.parse(pathlib.Path(coverage.__file__).read_text())
    for node in ast.walk(tree):
        if not isinstance(node, ast.Dict):
            continue
        keys: list[str] = []
        for key, value in zip(node.keys, node.values):
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.append(key.value)
            elif key is None and isinstance(value, ast.DictComp):  # **{f"spec.{f}": ... for f in (...)}
                for gen in value.generators:
                    if isinstance(gen.iter, ast.Tuple):
                        keys += [f"spec.{e.value}" for e in gen.iter.elts if isinstance(e, ast.Constant)]
        assert len(keys) == len(set(keys)), sorted(k for k in set(keys) if keys.count(k) > 1)


def test_every_kind_has_a_walkable_field_table() -> None:
    assert set(resources.ROOTS) == set(resources.KINDS) | {"ObjectMeta"}
    for kind, spec in resources._SPECS.items():
        assert isinstance(spec, schema.Obj), f"{kind}: its spec must be built with schema.obj()"


def _hidden_objects(checker: Any) -> list[str]:
    """Objects a plain checker function reaches outside the walk (a wrapper around obj())."""
    if isinstance(checker, (schema.Obj, schema.ListOf)) or not inspect.isfunction(checker):
        return []
    names = inspect.getclosurevars(checker)
    return [name for name, value in {**names.nonlocals, **names.globals}.items()
            if isinstance(value, (schema.Obj, schema.ListOf))]


def test_no_field_hides_an_object_from_the_walk() -> None:
    hidden = [f"{f.table} {f.path}: {name}" for f in FIELDS for name in _hidden_objects(f.checker)]
    assert hidden == [], "build nested objects with schema.obj()/list_of(), not inside a function"


def _test_exists(reference: str) -> bool:
    path, _, name = reference.partition("::")
    file = REPO / path
    if not file.is_file() or not name:
        return False
    wanted = name.split("::")[-1]
    tree = ast.parse(file.read_text())
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == wanted
               for node in ast.walk(tree))


def test_honoured_fields_name_a_test_that_exists() -> None:
    missing = [f"{table} {path}: {support.test}"
               for table, paths in SUPPORT.items() for path, support in paths.items()
               if isinstance(support, (Honoured, HonouredIf)) and not _test_exists(support.test)]
    assert missing == []


# -- refusals, checked through validate() ----------------------------------------------------------


def _host(table: str) -> tuple[str, str]:
    """(kind, path) where the named object `table` sits, for building a resource around it."""
    if table == "ObjectMeta":
        return "IPPool", "metadata"
    for field in FIELDS:
        child = field.child
        if field.table in resources.KINDS and child is not None and child.name == table:
            return field.table, field.child_prefix
    for field in FIELDS:  # a named object only reachable through another named object
        child = field.child
        if child is not None and child.name == table:
            kind, prefix = _host(field.table)
            return kind, f"{prefix}.{field.child_prefix}"
    raise AssertionError(f"{table} is not used by any kind")


def _nest(path: str, value: Any) -> dict[str, Any]:
    """{"spec": {"ingress": [{"source": {"nets": value}}]}} for `spec.ingress[].source.nets`."""
    head, _, rest = path.partition(".")
    inner: Any = _nest(rest, value) if rest else value
    if head.endswith("[]"):
        return {head[:-2]: [inner]}
    return {head: inner}


def _resource(table: str, path: str, value: Any) -> tuple[dict[str, Any], str]:
    """A resource with only `value` at `path` (and a name), and the concrete path an error names."""
    kind, prefix = (table, "") if table in resources.KINDS else _host(table)
    full = f"{prefix}.{path}" if prefix else path
    obj: dict[str, Any] = {"kind": kind, "metadata": {"name": "cov"}}
    nested = _nest(full, value)
    if "metadata" in nested:
        nested["metadata"] = {"name": "cov", **nested["metadata"]}
    obj.update(nested)
    return obj, full.replace("[]", "[0]")


REFUSALS = [(table, path, support) for table, paths in SUPPORT.items() for path, support in paths.items()
            if isinstance(support, (Refused, HonouredIf))]


@pytest.mark.parametrize("table, path, support", REFUSALS, ids=[f"{t}:{p}" for t, p, _ in REFUSALS])
def test_refused_fields_are_refused_in_one_line_naming_them(table: str, path: str, support: Any) -> None:
    value = support.refused_example if isinstance(support, HonouredIf) else {"any": "value"}
    obj, concrete = _resource(table, path, value)
    with pytest.raises(ValidationError) as info:
        validate(obj)
    message = str(info.value)
    assert f"{concrete}: felixpy does not support " in message and "\n" not in message


@pytest.mark.parametrize("table, path, support", [r for r in REFUSALS if isinstance(r[2], HonouredIf)],
                         ids=[f"{t}:{p}" for t, p, s in REFUSALS if isinstance(s, HonouredIf)])
def test_limited_fields_take_the_values_they_honour(table: str, path: str, support: HonouredIf) -> None:
    assert support.allowed(support.accepted_example) and not support.allowed(support.refused_example)
    (field,) = [f for f in FIELDS if (f.table, f.path) == (table, path)]
    checker = field.owner.fields[field.name]
    checker(support.accepted_example, path)  # both examples are well-formed: only felixpy refuses one
    checker(support.refused_example, path)


def test_switches_of_missing_features_are_accepted_off_and_refused_on() -> None:
    # FelixConfiguration switches for features felixpy does not have: off is what felixpy does.
    off = {"usageReportingEnabled": False, "endpointReportingEnabled": False, "bpfEnabled": False,
           "wireguardEnabled": False, "xdpEnabled": False, "nftablesMode": "Disabled",
           "floatingIPs": "Disabled", "awsSrcDstCheck": "DoNothing", "sidecarAccelerationEnabled": False}
    validate({"kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": off})
    for field, value in {"usageReportingEnabled": True, "bpfEnabled": True, "nftablesMode": "Enabled"}.items():
        with pytest.raises(ValidationError, match=f"spec.{field}: felixpy does not support"):
            validate({"kind": "FelixConfiguration", "metadata": {"name": "default"}, "spec": {field: value}})


# Values for the tolerated fields (each must have one).
TOLERATED_EXAMPLES: dict[tuple[str, str], tuple[dict[str, Any], Any]] = {
    ("NetworkPolicy", "spec.performanceHints"): ({"selector": "all()"}, ["AssumeNeededOnEveryNode"]),
    ("GlobalNetworkPolicy", "spec.performanceHints"): ({"selector": "all()"}, ["AssumeNeededOnEveryNode"]),
}


def test_tolerated_fields_are_accepted_with_a_warning_naming_them(caplog: pytest.LogCaptureFixture) -> None:
    tolerated = {(t, p) for t, paths in SUPPORT.items() for p, s in paths.items() if isinstance(s, Tolerated)}
    assert tolerated == set(TOLERATED_EXAMPLES)
    for (kind, path), (spec, value) in TOLERATED_EXAMPLES.items():
        field = path.split(".", 1)[1]
        caplog.clear()
        validate({"kind": kind, "metadata": {"name": "cov"}, "spec": {**spec, field: value}})
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warnings == [f'{kind} "cov": {path}: accepted but has no effect in felixpy: '
                            f"{SUPPORT[kind][path].why}"]  # type: ignore[union-attr]


def test_docs_are_current() -> None:
    assert (REPO / "docs" / "fields.md").read_text() == coverage.render_docs(), \
        "regenerate: python -m felixpy.model.coverage > docs/fields.md"
