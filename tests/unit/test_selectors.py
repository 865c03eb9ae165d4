"""Unit tests for policy.selectors: parsing, evaluation, canonical printing, errors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.selectors import (
    All,
    And,
    Compare,
    Global,
    Has,
    In,
    Not,
    Or,
    Selector,
    SelectorError,
    and_,
    or_,
    parse,
)

LABELS = {"app": "web", "tier": "frontend", "projectcalico.org/namespace": "prod", "k8s-app": "dns"}


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", True),
        ("   ", True),
        ("all()", True),
        ("global()", False),
        ("app == 'web'", True),
        ('app == "db"', False),
        ("app != 'db'", True),
        ("missing != 'x'", True),
        ("missing == 'x'", False),
        ("has(app)", True),
        ("!has(app)", False),
        ("! has(missing)", True),
        ("app in {'web', 'db'}", True),
        ("app in {}", False),
        ("app not in {'db'}", True),
        ("missing not in {'db'}", True),
        ("missing in {'db'}", False),
        ("tier contains 'ont'", True),
        ("tier starts with 'front'", True),
        ("tier ends with 'end'", True),
        ("tier ends with 'front'", False),
        ("missing contains ''", False),
        ("projectcalico.org/namespace == 'prod' && k8s-app == 'dns'", True),
        ("app == 'db' || tier == 'frontend'", True),
        ("app == 'db' || tier == 'backend' && has(app)", False),
        ("(app == 'db' || tier == 'frontend') && has(app)", True),
        ("!(app == 'web' && tier == 'frontend')", False),
        ("app=='web'&&tier=='frontend'", True),
    ],
)
def test_evaluate(text: str, expected: bool) -> None:
    assert parse(text).evaluate(LABELS) is expected


def test_global_matches_labels_without_namespace() -> None:
    assert parse("global()").evaluate({"role": "host"})
    assert not parse("global()").evaluate({"projectcalico.org/namespace": "x"})


def test_and_binds_tighter_than_or() -> None:
    assert parse("a == 'x' || b == 'y' && c == 'z'") == Or(
        (Compare("a", "==", "x"), And((Compare("b", "==", "y"), Compare("c", "==", "z"))))
    )


def test_canonical_form() -> None:
    sel = parse("  !has( a )&&(b in {'z','y'}||c  not  in {\"x\"}) ")
    assert str(sel) == '!has(a) && (b in {"y", "z"} || c not in {"x"})'
    assert parse("a == \"it's\"").__str__() == 'a == "it\'s"'
    assert str(parse("a == 'say \"hi\"'")) == "a == 'say \"hi\"'"


def test_keywords_as_key_prefixes() -> None:
    assert parse("inside == 'x'") == Compare("inside", "==", "x")
    assert parse("has == 'x'") == Compare("has", "==", "x")
    assert parse("all in {'x'}") == In("all", frozenset({"x"}))


@pytest.mark.parametrize(
    "text, message",
    [
        ("a == ", "selector 'a == ': expected a string literal at column 6"),
        ("a ==", "expected a string literal at column 5"),
        ("a == 'x", "unterminated string literal at column 6"),
        ("a = 'x'", "expected an operator"),
        ("has(a", "expected ')' at column 6"),
        ("(a == 'x'", "expected ')' at column 10"),
        ("a == 'x' b == 'y'", "unexpected text at column 10"),
        ("a in {'x' 'y'}", "expected ',' or '}' at column 11"),
        ("a not {'x'}", "expected 'in' at column 7"),
        ("&& a == 'x'", "expected a label key at column 1"),
        ("a == 'x' &&", "expected an expression at column 12"),
        ("a starts 'x'", "expected 'with' at column 10"),
    ],
)
def test_errors_name_the_column(text: str, message: str) -> None:
    with pytest.raises(SelectorError) as info:
        parse(text)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


# -- properties ------------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "app", "k8s-app", "projectcalico.org/namespace", "x.y_z", "in", "not"])
VALUES = st.text(alphabet="abc-_./ '\"", max_size=6).filter(lambda v: not ('"' in v and "'" in v))
LABEL_VALUES = st.sampled_from(["", "a", "b", "ab", "abc", "c-a"])


def _leaf() -> st.SearchStrategy[Selector]:
    return st.one_of(
        st.just(All()),
        st.just(Global()),
        st.builds(Has, KEYS),
        st.builds(Compare, KEYS, st.sampled_from(["==", "!=", "contains", "starts with", "ends with"]), VALUES),
        st.builds(In, KEYS, st.frozensets(VALUES, max_size=3), st.booleans()),
    )


SELECTORS: st.SearchStrategy[Selector] = st.recursive(
    _leaf(),
    lambda children: st.one_of(
        st.builds(Not, children),
        st.lists(children, min_size=2, max_size=3).map(lambda ts: and_(*ts)),
        st.lists(children, min_size=2, max_size=3).map(lambda ts: or_(*ts)),
    ),
    max_leaves=12,
)
LABEL_SETS = st.dictionaries(
    st.sampled_from(["a", "b", "app", "k8s-app", "projectcalico.org/namespace", "in"]), LABEL_VALUES
)


@settings(max_examples=400)
@given(SELECTORS)
def test_print_then_parse_is_identity(sel: Selector) -> None:
    assert parse(str(sel)) == sel


@settings(max_examples=300)
@given(SELECTORS, LABEL_SETS)
def test_not_is_the_complement(sel: Selector, labels: dict[str, str]) -> None:
    text = str(sel)
    assert parse(f"!({text})").evaluate(labels) is not parse(text).evaluate(labels)


@settings(max_examples=300)
@given(SELECTORS, LABEL_SETS)
def test_printed_form_evaluates_the_same(sel: Selector, labels: dict[str, str]) -> None:
    assert parse(str(sel)).evaluate(labels) is sel.evaluate(labels)


@settings(max_examples=200)
@given(st.text(alphabet="ab=!&|(){}'\" ,hasl", max_size=20))
def test_garbage_raises_only_selector_error(text: str) -> None:
    try:
        parse(text)
    except SelectorError as e:
        assert "at column" in str(e)
