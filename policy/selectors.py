"""Calico's label selector language: parse, evaluate and print selectors.

Grammar (whitespace is free between tokens):

    expr     := and_expr ( "||" and_expr )*
    and_expr := unary ( "&&" unary )*
    unary    := "!" unary | primary
    primary  := "(" expr ")" | "all()" | "global()" | "has(" KEY ")"
              | KEY "==" STR | KEY "!=" STR | KEY "in" SET | KEY "not" "in" SET
              | KEY "contains" STR | KEY "starts" "with" STR | KEY "ends" "with" STR
    SET      := "{" [ STR ( "," STR )* ] "}"
    STR      := '"' chars-without-'"' '"' | "'" chars-without-"'" "'"
    KEY      := a Kubernetes-style label key: [A-Za-z0-9_][A-Za-z0-9_./-]*

The empty string (or only whitespace) means all(). Like Calico, a missing label never equals a
value, `!=` and `not in` match when the label is absent, and `global()` matches labels that carry
no `projectcalico.org/namespace` label (non-namespaced endpoints such as host endpoints).

`str(selector)` is canonical: parsing it again gives an equal selector, so the printed form can be
used as an identity (e.g. for ipset names). And/Or are n-ary and flattened so that the printed
form's associativity does not matter; `in` sets are printed sorted.

This module is pure and imports nothing from felixpy.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Mapping, Union

NAMESPACE_LABEL = "projectcalico.org/namespace"

_KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./\-]*")
_WORD_RE = re.compile(r"[A-Za-z]+")


class SelectorError(ValueError):
    """A selector that does not parse; the message names the selector and the 1-based column."""

    def __init__(self, text: str, message: str, column: int) -> None:
        super().__init__(f"selector {text!r}: {message} at column {column}")
        self.text = text
        self.reason = message
        self.column = column


def _quote(value: str) -> str:
    # Calico has no escapes: choose the quote kind the value does not contain.
    if '"' not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise ValueError(f"label value {value!r} contains both quote kinds and cannot be printed")


# -- the syntax tree -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class All:
    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return True

    def __str__(self) -> str:
        return "all()"


@dataclass(frozen=True, slots=True)
class Global:
    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return NAMESPACE_LABEL not in labels

    def __str__(self) -> str:
        return "global()"


@dataclass(frozen=True, slots=True)
class Has:
    key: str

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return self.key in labels

    def __str__(self) -> str:
        return f"has({self.key})"


@dataclass(frozen=True, slots=True)
class Compare:
    """`key OP "value"` for the string operators ==, !=, contains, starts with, ends with."""

    key: str
    op: str  # one of _COMPARE_OPS
    value: str

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        if actual is None:
            return self.op == "!="
        if self.op == "==":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        if self.op == "contains":
            return self.value in actual
        if self.op == "starts with":
            return actual.startswith(self.value)
        return actual.endswith(self.value)

    def __str__(self) -> str:
        return f"{self.key} {self.op} {_quote(self.value)}"


_COMPARE_OPS = ("==", "!=", "contains", "starts with", "ends with")


@dataclass(frozen=True, slots=True)
class In:
    """`key in {...}` (negated=False) or `key not in {...}` (negated=True)."""

    key: str
    values: frozenset[str]
    negated: bool = False

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.key)
        inside = actual is not None and actual in self.values
        return not inside if self.negated else inside

    def __str__(self) -> str:
        members = ", ".join(_quote(v) for v in sorted(self.values))
        op = "not in" if self.negated else "in"
        return f"{self.key} {op} {{{members}}}"


@dataclass(frozen=True, slots=True)
class Not:
    operand: "Selector"

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return not self.operand.evaluate(labels)

    def __str__(self) -> str:
        if isinstance(self.operand, (And, Or)):
            return f"!({self.operand})"
        return f"!{self.operand}"


@dataclass(frozen=True, slots=True)
class And:
    terms: tuple["Selector", ...]  # at least two, none of them an And

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return all(t.evaluate(labels) for t in self.terms)

    def __str__(self) -> str:
        return " && ".join(f"({t})" if isinstance(t, Or) else str(t) for t in self.terms)


@dataclass(frozen=True, slots=True)
class Or:
    terms: tuple["Selector", ...]  # at least two, none of them an Or

    def evaluate(self, labels: Mapping[str, str]) -> bool:
        return any(t.evaluate(labels) for t in self.terms)

    def __str__(self) -> str:
        return " || ".join(str(t) for t in self.terms)


Selector = Union[All, Global, Has, Compare, In, Not, And, Or]


def and_(*terms: Selector) -> Selector:
    """Conjunction, flattened so that equal expressions have equal trees."""
    flat: list[Selector] = []
    for t in terms:
        flat.extend(t.terms if isinstance(t, And) else (t,))
    return flat[0] if len(flat) == 1 else And(tuple(flat))


def or_(*terms: Selector) -> Selector:
    """Disjunction, flattened like and_()."""
    flat: list[Selector] = []
    for t in terms:
        flat.extend(t.terms if isinstance(t, Or) else (t,))
    return flat[0] if len(flat) == 1 else Or(tuple(flat))


def prefixed(sel: Selector, prefix: str) -> Selector:
    """The selector with every label key prefixed (libcalico-go's PrefixVisitor): how a
    namespaceSelector becomes a selector over `pcns.<key>` labels and a serviceAccountSelector
    one over `pcsa.<key>` labels."""
    if isinstance(sel, Has):
        return Has(prefix + sel.key)
    if isinstance(sel, Compare):
        return Compare(prefix + sel.key, sel.op, sel.value)
    if isinstance(sel, In):
        return In(prefix + sel.key, sel.values, sel.negated)
    if isinstance(sel, Not):
        return Not(prefixed(sel.operand, prefix))
    if isinstance(sel, And):
        return and_(*(prefixed(t, prefix) for t in sel.terms))
    if isinstance(sel, Or):
        return or_(*(prefixed(t, prefix) for t in sel.terms))
    return sel  # all(), global()


def replace_all(sel: Selector, replacement: Selector) -> Selector:
    """Every all() in the selector replaced (libcalico-go turns a namespaceSelector's all() into
    has(projectcalico.org/namespace): "every namespace", not "everything")."""
    if isinstance(sel, All):
        return replacement
    if isinstance(sel, Not):
        return Not(replace_all(sel.operand, replacement))
    if isinstance(sel, And):
        return and_(*(replace_all(t, replacement) for t in sel.terms))
    if isinstance(sel, Or):
        return or_(*(replace_all(t, replacement) for t in sel.terms))
    return sel


# -- the parser ------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str, pos: int | None = None) -> SelectorError:
        return SelectorError(self.text, message, (self.pos if pos is None else pos) + 1)

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def at_end(self) -> bool:
        self.skip_ws()
        return self.pos >= len(self.text)

    def peek(self, literal: str) -> bool:
        self.skip_ws()
        return self.text.startswith(literal, self.pos)

    def accept(self, literal: str) -> bool:
        if self.peek(literal):
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: str, what: str | None = None) -> None:
        if not self.accept(literal):
            raise self.fail(f"expected {what or repr(literal)}")

    def peek_word(self) -> str:
        """The alphabetic word at the cursor (for keywords), without consuming it."""
        self.skip_ws()
        m = _WORD_RE.match(self.text, self.pos)
        return m.group(0) if m else ""

    def accept_word(self, word: str) -> bool:
        # A keyword must not run on into a longer key (`inside` is not `in` + `side`).
        self.skip_ws()
        end = self.pos + len(word)
        if self.text.startswith(word, self.pos) and not (
            end < len(self.text) and _KEY_RE.fullmatch(self.text[end]) is not None
        ):
            self.pos = end
            return True
        return False

    def parse(self) -> Selector:
        if self.at_end():
            return All()
        sel = self.parse_or()
        if not self.at_end():
            raise self.fail("unexpected text")
        return sel

    def parse_or(self) -> Selector:
        terms = [self.parse_and()]
        while self.accept("||"):
            terms.append(self.parse_and())
        return or_(*terms)

    def parse_and(self) -> Selector:
        terms = [self.parse_unary()]
        while self.accept("&&"):
            terms.append(self.parse_unary())
        return and_(*terms)

    def parse_unary(self) -> Selector:
        if self.peek("!") and not self.peek("!="):
            self.pos += 1
            return Not(self.parse_unary())
        return self.parse_primary()

    def parse_primary(self) -> Selector:
        if self.at_end():
            raise self.fail("expected an expression")
        if self.accept("("):
            inner = self.parse_or()
            self.expect(")", "')'")
            return inner
        for name, node in (("all", All()), ("global", Global())):
            if self.peek_call(name):
                self.expect("(")
                self.expect(")", "')'")
                return node
        if self.peek_call("has"):
            self.expect("(")
            key = self.parse_key()
            self.expect(")", "')'")
            return Has(key)
        key = self.parse_key()
        return self.parse_operator(key)

    def peek_call(self, name: str) -> bool:
        """True (and consumes the name) if the cursor is at `name` followed by '('."""
        start = self.pos
        self.skip_ws()
        if self.text.startswith(name, self.pos):
            after = self.pos + len(name)
            rest = self.text[after:].lstrip()
            if rest.startswith("("):
                self.pos = after
                return True
        self.pos = start
        return False

    def parse_key(self) -> str:
        self.skip_ws()
        m = _KEY_RE.match(self.text, self.pos)
        if m is None:
            raise self.fail("expected a label key")
        self.pos = m.end()
        return m.group(0)

    def parse_operator(self, key: str) -> Selector:
        for symbol in ("==", "!="):
            if self.accept(symbol):
                return Compare(key, symbol, self.parse_string())
        if self.accept_word("in"):
            return In(key, self.parse_set())
        if self.accept_word("not"):
            if not self.accept_word("in"):
                raise self.fail("expected 'in'")
            return In(key, self.parse_set(), negated=True)
        if self.accept_word("contains"):
            return Compare(key, "contains", self.parse_string())
        for first in ("starts", "ends"):
            if self.accept_word(first):
                if not self.accept_word("with"):
                    raise self.fail("expected 'with'")
                return Compare(key, f"{first} with", self.parse_string())
        raise self.fail("expected an operator (==, !=, in, not in, contains, starts with, ends with)")

    def parse_string(self) -> str:
        self.skip_ws()
        if self.pos >= len(self.text) or self.text[self.pos] not in "\"'":
            raise self.fail("expected a string literal")
        quote = self.text[self.pos]
        end = self.text.find(quote, self.pos + 1)
        if end < 0:
            raise self.fail("unterminated string literal")
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def parse_set(self) -> frozenset[str]:
        self.expect("{", "'{'")
        values: set[str] = set()
        if self.accept("}"):
            return frozenset()
        while True:
            values.add(self.parse_string())
            if self.accept("}"):
                return frozenset(values)
            self.expect(",", "',' or '}'")


@functools.lru_cache(maxsize=4096)
def parse(text: str) -> Selector:
    """Parse a selector; raises SelectorError. Results are cached (selectors are immutable)."""
    return _Parser(text).parse()


def validate(text: str) -> None:
    """Raise SelectorError if text is not a valid selector."""
    parse(text)
