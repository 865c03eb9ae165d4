"""Small composable field checkers for validating projectcalico.org/v3 resources.

A checker is a function `(value, path) -> normalised value` that raises FieldError naming the
field path (`spec.ingress[0].source.ports[1]`). `obj()` rejects unknown fields, fills defaults and
runs cross-field checks, so a resource schema reads like the API's field table. `obj()` and
`list_of()` build walkable checkers (`Obj.fields`, `ListOf.item`): nesting objects any other
way would hide their fields from the field-coverage test (tests/unit/test_field_coverage.py).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import ipaddress
import json
import logging
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol

from policy import selectors

log = logging.getLogger(__name__)

Checker = Callable[[Any, str], Any]
PostCheck = Callable[[dict[str, Any], str], None]


class FieldError(ValueError):
    """One invalid field: `path` is the dotted field path, `message` says what is wrong."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def q(value: Any) -> str:
    """A value quoted for a message: strings in double quotes, like the YAML the user wrote."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def join(path: str, field: str) -> str:
    return f"{path}.{field}" if path else field


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "object"
    return "null" if value is None else type(value).__name__


class FieldSupport(Protocol):
    """What felixpy does with a field (model/coverage.py): `check_present` runs before the field's
    own checker (a refused field is refused whatever its value), `check_value` after it, on the
    normalised value (a value felixpy does not support); either raises FieldError or warns."""

    def check_present(self, value: Any, path: str) -> None: ...

    def check_value(self, value: Any, path: str) -> None: ...


class Obj:
    """An object's field table: checks a dict against it (unknown fields rejected, refused fields
    refused, defaults filled, then `post` for cross-field rules). Callable like any checker;
    `fields` is public so the field-coverage walk (model/coverage.py) can enumerate every field a
    resource accepts. `name` marks an object several kinds share (a policy Rule): its fields are
    declared once, under that name. `support` is filled by coverage.install()."""

    def __init__(
        self,
        fields: Mapping[str, Checker],
        required: Iterable[str] = (),
        defaults: Mapping[str, Any] | None = None,
        post: PostCheck | None = None,
        name: str | None = None,
    ) -> None:
        self.fields: Mapping[str, Checker] = dict(fields)
        self.required = tuple(required)
        self.defaults = dict(defaults or {})
        self.post = post
        self.name = name
        self.support: dict[str, FieldSupport] = {}

    def __call__(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise FieldError(path, f"expected an object, got {_type_name(value)}")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str) or key not in self.fields:
                raise FieldError(join(path, str(key)), "unknown field")
            if item is None:
                continue  # YAML `field:` with no value means unset, as in Go's decoder
            support = self.support.get(key)
            if support is None:
                out[key] = self.fields[key](item, join(path, key))
                continue
            support.check_present(item, join(path, key))
            out[key] = self.fields[key](item, join(path, key))
            support.check_value(out[key], join(path, key))
        for key in self.required:
            if key not in out:
                raise FieldError(join(path, key), "required field is missing")
        for key, default in self.defaults.items():
            out.setdefault(key, copy.deepcopy(default))
        if self.post is not None:
            self.post(out, path)
        return out


class ListOf:
    """A list whose items all pass `item`; walkable like Obj (`item`)."""

    def __init__(self, item: Checker, min_items: int = 0) -> None:
        self.item = item
        self.min_items = min_items

    def __call__(self, value: Any, path: str) -> list[Any]:
        if not isinstance(value, list):
            raise FieldError(path, f"expected a list, got {_type_name(value)}")
        if len(value) < self.min_items:
            raise FieldError(path, f"needs at least {self.min_items} item(s)")
        return [self.item(v, f"{path}[{i}]") for i, v in enumerate(value)]


def obj(
    fields: Mapping[str, Checker],
    required: Iterable[str] = (),
    defaults: Mapping[str, Any] | None = None,
    post: PostCheck | None = None,
    name: str | None = None,
) -> Obj:
    return Obj(fields, required, defaults, post, name)


# Warnings about accepted fields (model/coverage.py: Tolerated), collected per validation by
# whoever asks (felixctl prints them); otherwise logged.
_warnings: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("felixpy_schema_warnings", default=None)


def warn(path: str, message: str) -> None:
    collected = _warnings.get()
    if collected is None:
        log.warning("%s: %s", path, message)
    elif f"{path}: {message}" not in collected:
        collected.append(f"{path}: {message}")


@contextlib.contextmanager
def collect_warnings() -> Iterator[list[str]]:
    """Within the block, field warnings are appended to the yielded list instead of logged."""
    collected: list[str] = []
    token = _warnings.set(collected)
    try:
        yield collected
    finally:
        _warnings.reset(token)


def list_of(item: Checker, min_items: int = 0) -> ListOf:
    return ListOf(item, min_items)


def anything(value: Any, path: str) -> Any:
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise FieldError(path, f"expected true or false, got {q(value)}")
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Checker:
    def check(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(path, f"expected an integer, got {q(value)}")
        if minimum is not None and value < minimum or maximum is not None and value > maximum:
            raise FieldError(path, f"{value} is out of range {minimum}..{maximum}")
        return value

    return check


def number(value: Any, path: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FieldError(path, f"expected a number, got {q(value)}")
    return value


def string(
    pattern: str | None = None, enum: Iterable[str] | None = None, what: str = "value"
) -> Checker:
    compiled = re.compile(pattern) if pattern else None
    choices = tuple(enum) if enum is not None else None

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise FieldError(path, f"expected a string, got {_type_name(value)}")
        if choices is not None and value not in choices:
            raise FieldError(path, f"invalid value {q(value)} (expected one of {', '.join(choices)})")
        if compiled is not None and not compiled.fullmatch(value):
            raise FieldError(path, f"invalid {what} {q(value)}")
        return value

    return check


def string_map(key: Checker | None = None, value: Checker | None = None) -> Checker:
    def check(item: Any, path: str) -> dict[str, str]:
        if not isinstance(item, dict):
            raise FieldError(path, f"expected an object, got {_type_name(item)}")
        out: dict[str, str] = {}
        for k, v in item.items():
            if not isinstance(k, str):
                raise FieldError(path, f"key {q(k)} is not a string")
            if key is not None:
                key(k, f"{path}[{k}]")
            if not isinstance(v, str):
                raise FieldError(f"{path}[{k}]", f"expected a string, got {_type_name(v)}")
            if value is not None:
                value(v, f"{path}[{k}]")
            out[k] = v
        return out

    return check


# -- domain checkers ---------------------------------------------------------------------------------

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*")
DNS1123_LABEL = re.compile(_DNS_LABEL)
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?)")


def subdomain_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise FieldError(path, "name must be a non-empty string")
    if len(value) > 253 or not DNS1123_SUBDOMAIN.fullmatch(value):
        raise FieldError(
            path,
            f"invalid name {q(value)}: must be a DNS-1123 subdomain "
            "(lower-case letters, digits, '-' and '.', starting and ending with a letter or digit)",
        )
    return value


def label_key(value: Any, path: str) -> str:
    prefix, slash, name = str(value).rpartition("/")
    ok = bool(_LABEL_NAME.fullmatch(name)) and len(name) <= 63
    if slash:
        ok = ok and len(prefix) <= 253 and bool(DNS1123_SUBDOMAIN.fullmatch(prefix))
    if not ok:
        raise FieldError(path, f"invalid label key {q(value)}")
    return str(value)


def label_value(value: Any, path: str) -> str:
    if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.fullmatch(value):
        raise FieldError(path, f"invalid label value {q(value)}")
    return value


def selector(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise FieldError(path, f"expected a selector string, got {_type_name(value)}")
    try:
        selectors.parse(value)
    except selectors.SelectorError as e:
        raise FieldError(path, f"invalid selector: {e.reason} at column {e.column} in {q(value)}") from None
    return value


def cidr(strict: bool = True, version: int | None = None, allow_ip: bool = False) -> Checker:
    """A CIDR; strict rejects host bits; allow_ip accepts a bare address (as a /32 or /128)."""

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise FieldError(path, f"expected a CIDR string, got {_type_name(value)}")
        if "/" not in value and not allow_ip:
            raise FieldError(path, f"invalid CIDR {q(value)} (missing /prefix)")
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise FieldError(path, f"invalid CIDR {q(value)}") from None
        if version is not None and net.version != version:
            raise FieldError(path, f"{q(value)} is not an IPv{version} CIDR")
        if strict and "/" in value and ipaddress.ip_interface(value).ip != net.network_address:
            raise FieldError(path, f"CIDR {q(value)} has host bits set (did you mean {net}?)")
        return value

    return check


def interface_cidr(version: int) -> Checker:
    """An address with its subnet prefix, as Node.spec.bgp.ipv4Address (host bits expected)."""

    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise FieldError(path, f"expected an address string, got {_type_name(value)}")
        try:
            iface = ipaddress.ip_interface(value)
        except ValueError:
            raise FieldError(path, f"invalid address {q(value)}") from None
        if iface.version != version:
            raise FieldError(path, f"{q(value)} is not an IPv{version} address")
        return value

    return check


def ip_address(version: int | None = None) -> Checker:
    def check(value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise FieldError(path, f"expected an IP address string, got {_type_name(value)}")
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise FieldError(path, f"invalid IP address {q(value)}") from None
        if version is not None and addr.version != version:
            raise FieldError(path, f"{q(value)} is not an IPv{version} address")
        return value

    return check


def as_number(value: Any, path: str) -> int:
    """An AS number, as an integer or in dotted `high.low` (asdot) notation; normalised to int."""
    if isinstance(value, bool):
        raise FieldError(path, f"invalid AS number {q(value)}")
    if isinstance(value, int):
        number_ = value
    elif isinstance(value, (str, float)):
        text = str(value)
        m = re.fullmatch(r"(\d+)\.(\d+)", text) or re.fullmatch(r"(\d+)", text)
        if m is None:
            raise FieldError(path, f"invalid AS number {q(value)}")
        if m.lastindex == 2:
            high, low = int(m.group(1)), int(m.group(2))
            if high > 65535 or low > 65535:
                raise FieldError(path, f"invalid AS number {q(value)}")
            number_ = high * 65536 + low
        else:
            number_ = int(m.group(1))
    else:
        raise FieldError(path, f"invalid AS number {q(value)}")
    if not 1 <= number_ <= 4294967295:
        raise FieldError(path, f"AS number {q(value)} is out of range 1..4294967295")
    return number_


_DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+|0")


def duration(value: Any, path: str) -> str:
    """A Go duration string (`90s`, `1m30s`, `500ms`), as metav1.Duration fields take."""
    if not isinstance(value, str) or not _DURATION.fullmatch(value):
        raise FieldError(path, f"invalid duration {q(value)} (e.g. 90s, 1m30s)")
    return value


def int_or_string(value: Any, path: str) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FieldError(path, f"expected an integer or a string, got {q(value)}")
    return value


_NAMED_PORT = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


def port(value: Any, path: str) -> int | str:
    """A rule port: a number, a range "a:b", or a named port."""
    if isinstance(value, bool):
        raise FieldError(path, f"invalid port {q(value)}")
    if isinstance(value, int):
        if not 0 <= value <= 65535:
            raise FieldError(path, f"port {value} is out of range 0..65535")
        return value
    if not isinstance(value, str) or not value:
        raise FieldError(path, f"invalid port {q(value)}")
    m = re.fullmatch(r"(\d+):(\d+)", value)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi > 65535 or lo > hi:
            raise FieldError(path, f"invalid port range {q(value)}")
        return value
    if value.isdigit():
        return port(int(value), path)
    if len(value) > 63 or not _NAMED_PORT.fullmatch(value) or not re.search("[a-z]", value):
        raise FieldError(path, f"invalid port {q(value)} (a number, a range 'a:b' or a port name)")
    return value
