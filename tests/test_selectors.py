"""Label selectors as kubectl -l and LabelSelector objects have them (no root)."""

from __future__ import annotations

import pytest

from kproxy.errors import KproxyError
from kproxy.selectors import (
    NOTHING,
    Requirement,
    Selector,
    parse_selector,
    selector_from_map,
    selector_from_match,
)

WEB = {"app": "web", "env": "prod", "tier": "frontend"}

MATCH_TABLE = [
    # selector, labels, matches
    ("", {}, True),
    ("", WEB, True),
    ("app=web", WEB, True),
    ("app==web", WEB, True),
    ("app=db", WEB, False),
    ("app=web", {}, False),
    ("env!=prod", WEB, False),
    ("env!=dev", WEB, True),
    ("env!=dev", {}, True),  # absent label: != holds
    ("env in (dev,prod)", WEB, True),
    ("env in (dev, staging)", WEB, False),
    ("env in (prod)", {}, False),
    ("tier notin (backend)", WEB, True),
    ("tier notin (frontend,backend)", WEB, False),
    ("tier notin (frontend)", {}, True),  # absent label: notin holds
    ("app", WEB, True),
    ("canary", WEB, False),
    ("!canary", WEB, True),
    ("!app", WEB, False),
    ("app=web,env=prod", WEB, True),
    ("app=web,env=dev", WEB, False),
    ("app=web, env in (prod), !canary, tier", WEB, True),
    ("app=", {"app": ""}, True),
    ("app=", WEB, False),
    ("example.com/team=a", {"example.com/team": "a"}, True),
    ("a.b-c_d=x.y-z_1", {"a.b-c_d": "x.y-z_1"}, True),
    ("  app  =  web  ", WEB, True),
    ("env in (,prod)", {"env": ""}, True),
]


@pytest.mark.parametrize(("text", "labels", "expected"), MATCH_TABLE)
def test_match_table(text: str, labels: dict[str, str], expected: bool) -> None:
    assert parse_selector(text).matches(labels) is expected


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("", ""),
        ("app==web", "app=web"),
        ("tier=a,app=web", "app=web,tier=a"),
        ("env in (b, a, b)", "env in (a,b)"),
        ("x notin (z,y)", "x notin (y,z)"),
        ("!canary,app", "app,!canary"),
        ("k!=v", "k!=v"),
        ("app=", "app="),
    ],
)
def test_canonical_string(text: str, canonical: str) -> None:
    sel = parse_selector(text)
    assert str(sel) == canonical
    assert parse_selector(str(sel)) == sel


ERRORS = [
    ("app=web,", "invalid selector 'app=web,': a requirement must follow ','"),
    ("=web", "invalid selector '=web': expected a label key, found '='"),
    ("app web", "invalid selector 'app web': expected an operator after 'app', found 'web'"),
    ("env in (a", "invalid selector 'env in (a': missing ')'"),
    ("env in a", "invalid selector 'env in a': expected '(' after env in, found 'a'"),
    ("env in (a b)", "invalid selector 'env in (a b)': unexpected 'b' in the values of env in"),
    ("a=b=c", "invalid selector 'a=b=c': expected ',' after a=b, found '='"),
    ("!", "invalid selector '!': expected a label key after '!', found 'end of string'"),
    ("n>1", "invalid selector 'n>1': operator '>' is not supported (only =, ==, !=, in, notin, exists, !)"),
    (
        "-app=web",
        "invalid selector '-app=web': invalid label key '-app': name part must consist of alphanumeric "
        "characters, '-', '_' or '.', and must start and end with an alphanumeric character",
    ),
    ("app=" + "v" * 64, f"invalid selector 'app={'v' * 64}': invalid label value '{'v' * 64}': must be no more than 63 characters"),
    ("k" * 64, f"invalid selector '{'k' * 64}': invalid label key '{'k' * 64}': name part must be no more than 63 characters"),
    (
        "Example.com/x=1",
        "invalid selector 'Example.com/x=1': invalid label key 'Example.com/x': prefix part must be a DNS-1123 "
        "subdomain (lowercase alphanumeric characters, '-' or '.', at most 253 characters)",
    ),
    ("a/b/c", "invalid selector 'a/b/c': invalid label key 'a/b/c': at most one '/' is allowed"),
    ("/x", "invalid selector '/x': invalid label key '/x': prefix part must not be empty"),
    ("app=we b", "invalid selector 'app=we b': expected ',' after app=we, found 'b'"),
    (
        "app=-web",
        "invalid selector 'app=-web': invalid label value '-web': a label value must be empty or consist of "
        "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
    ),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(KproxyError) as e:
        parse_selector(text)
    assert str(e.value) == message


def test_match_object_forms() -> None:
    sel = selector_from_match(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod", "staging"]},
                {"key": "tier", "operator": "NotIn", "values": ["db"]},
                {"key": "app", "operator": "Exists"},
                {"key": "canary", "operator": "DoesNotExist"},
            ],
        }
    )
    assert str(sel) == "app=web,app,!canary,env in (prod,staging),tier notin (db)"
    assert sel.matches(WEB)
    assert not sel.matches(WEB | {"canary": "yes"})
    assert not sel.matches(WEB | {"env": "dev"})
    assert sel == parse_selector(str(sel))
    # matchLabels and the string form agree; an empty LabelSelector selects everything
    assert selector_from_match({"matchLabels": {"app": "web"}}) == parse_selector("app==web")
    assert selector_from_match({}).matches(WEB)
    assert selector_from_match({}).empty()


def test_to_match_round_trip() -> None:
    obj = {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod"]},
            {"key": "x", "operator": "DoesNotExist"},
        ],
    }
    sel = selector_from_match(obj)
    assert sel.to_match() == obj
    assert selector_from_match(sel.to_match()) == sel
    assert parse_selector("a!=b").to_match() == {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["b"]}]}


MATCH_ERRORS = [
    ({"matchLabel": {"a": "b"}}, "unknown field 'matchLabel' (expected matchLabels or matchExpressions)"),
    ({"matchLabels": {"version": 1}}, "matchLabels.version: label value must be a string, got 1 (quote it)"),
    ({"matchLabels": ["a"]}, "matchLabels: must be a map of strings, got ['a']"),
    (
        {"matchExpressions": [{"key": "a", "operator": "In"}]},
        "matchExpressions[0].values: must be specified when operator is In or NotIn",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]},
        "matchExpressions[0].values: must be specified when operator is In or NotIn",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]},
        "matchExpressions[0].values: may not be specified when operator is Exists or DoesNotExist",
    ),
    (
        {"matchExpressions": [{"key": "a", "operator": "Gt", "values": ["1"]}]},
        "matchExpressions[0].operator: 'Gt' is not a valid label selector operator (In, NotIn, Exists, DoesNotExist)",
    ),
    ({"matchExpressions": [{"operator": "Exists"}]}, "matchExpressions[0].key: required"),
    (
        {"matchExpressions": [{"key": "a", "operator": "In", "values": ["b c"]}]},
        "matchExpressions[0].values: invalid label value 'b c': a label value must be empty or consist of "
        "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
    ),
    ({"matchExpressions": {"key": "a"}}, "matchExpressions: must be a list, got {'key': 'a'}"),
    ("app=web", "selector must be a map with matchLabels and/or matchExpressions, got 'app=web'"),
]


@pytest.mark.parametrize(("obj", "message"), MATCH_ERRORS)
def test_match_object_errors(obj: object, message: str) -> None:
    with pytest.raises(KproxyError) as e:
        selector_from_match(obj)
    assert str(e.value) == message


def test_service_selector_map() -> None:
    sel = selector_from_map({"app": "web", "tier": "frontend"})
    assert str(sel) == "app=web,tier=frontend"
    assert sel.matches(WEB)
    assert not sel.matches({"app": "web"})
    # A Service with an empty or absent selector selects nothing, unlike kubectl's "" (everything).
    for empty in ({}, None):
        assert selector_from_map(empty) == NOTHING
        assert not selector_from_map(empty).matches(WEB)
        assert not selector_from_map(empty).matches({})
    assert parse_selector("").matches({}) and parse_selector("").empty()
    with pytest.raises(KproxyError, match=r"^selector\.enabled: label value must be a string, got true \(quote it\)$"):
        selector_from_map({"enabled": True})


def test_requirement_rules() -> None:
    with pytest.raises(KproxyError, match="values set can't be empty"):
        Requirement("a", "in", ())
    with pytest.raises(KproxyError, match="values set must be empty"):
        Requirement("a", "exists", ("x",))
    assert Requirement("a", "in", ("b", "a", "b")).values == ("a", "b")
    assert Selector((Requirement("b", "exists"), Requirement("a", "!"))).requirements[0].key == "a"
