"""Kubernetes label selectors: parsing, validation, matching, canonical form.

Three ways in, as in Kubernetes:

    parse_selector("app=web,env in (a,b),!canary")   # kubectl get -l ...
    selector_from_match({"matchLabels": {...}, "matchExpressions": [...]})
    selector_from_map({"app": "web"})                 # Service .spec.selector

Semantics follow k8s.io/apimachinery/pkg/labels:

- `k=v`, `k==v`: the label exists and equals v. `k=` (empty value) is allowed.
- `k!=v`, `k notin (...)`: true when the label is absent, or its value differs.
- `k in (...)`: the label exists and its value is in the set.
- `k`: the label exists; `!k`: it does not.
- Requirements are ANDed. An empty selector string selects everything (as with
  kubectl); an empty Service selector selects nothing (a Service without a
  selector gets no endpoints managed for it), see `selector_from_map`.

Note: `gt`/`lt` (`k>1`) exist in the apimachinery string parser but not in
LabelSelector objects; they are refused here.

The canonical string (`str(selector)`) sorts requirements by key (stably),
sorts set values, and writes `==` as `=`, as Kubernetes' String() does except
for the `==` spelling. The "nothing" selector prints as "" like Kubernetes'
Nothing(); use `Selector.nothing` to tell it from "everything".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

from kproxy.errors import KproxyError

Operator = Literal["=", "!=", "in", "notin", "exists", "!"]

_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_NAME_CHARS = (
    "must consist of alphanumeric characters, '-', '_' or '.', "
    "and must start and end with an alphanumeric character"
)


def label_key_error(key: str) -> str | None:
    """Why `key` is not a valid label key (Kubernetes IsQualifiedName), or None."""
    if not key:
        return "label key must not be empty"
    if key.count("/") > 1:
        return f"invalid label key {key!r}: at most one '/' is allowed"
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix:
            return f"invalid label key {key!r}: prefix part must not be empty"
        if len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix):
            return (
                f"invalid label key {key!r}: prefix part must be a DNS-1123 subdomain "
                "(lowercase alphanumeric characters, '-' or '.', at most 253 characters)"
            )
    if not name:
        return f"invalid label key {key!r}: name part must not be empty"
    if len(name) > 63:
        return f"invalid label key {key!r}: name part must be no more than 63 characters"
    if not _NAME.match(name):
        return f"invalid label key {key!r}: name part {_NAME_CHARS}"
    return None


def label_value_error(value: str) -> str | None:
    """Why `value` is not a valid label value (Kubernetes IsValidLabelValue), or None."""
    if len(value) > 63:
        return f"invalid label value {value!r}: must be no more than 63 characters"
    if value and not _NAME.match(value):
        return f"invalid label value {value!r}: a label value must be empty or {_NAME_CHARS[5:]}"
    return None


def validate_labels(labels: Any, field: str) -> dict[str, str]:
    """A label map as Kubernetes accepts it (string keys and values, valid both); else KproxyError."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise KproxyError(f"{field}: must be a map of strings, got {_show(labels)}")
    out: dict[str, str] = {}
    for k, v in labels.items():
        if not isinstance(k, str):
            raise KproxyError(f"{field}: label key {_show(k)} must be a string")
        if not isinstance(v, str):
            raise KproxyError(f"{field}.{k}: label value must be a string, got {_show(v)} (quote it)")
        problem = label_key_error(k) or label_value_error(v)
        if problem:
            raise KproxyError(f"{field}: {problem}")
        out[k] = v
    return out


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, str) else str(v)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: tuple[str, ...] = ()  # sorted, no duplicates; one for = and !=, none for exists and !

    def __post_init__(self) -> None:
        problem = label_key_error(self.key)
        if problem:
            raise KproxyError(problem)
        op = self.operator
        if op in ("=", "!=") and len(self.values) != 1:
            raise KproxyError(f"requirement on {self.key!r}: exact-match operators need exactly one value")
        if op in ("in", "notin") and not self.values:
            raise KproxyError(f"requirement on {self.key!r}: for 'in', 'notin' operators, values set can't be empty")
        if op in ("exists", "!") and self.values:
            raise KproxyError(f"requirement on {self.key!r}: values set must be empty for exists and does not exist")
        if op not in ("=", "!=", "in", "notin", "exists", "!"):
            raise KproxyError(f"requirement on {self.key!r}: {op!r} is not a valid selector operator")
        for v in self.values:
            problem = label_value_error(v)
            if problem:
                raise KproxyError(problem)
        object.__setattr__(self, "values", tuple(sorted(set(self.values))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "exists":
            return self.key in labels
        if op == "!":
            return self.key not in labels
        if op in ("=", "in"):
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values  # != and notin

    def __str__(self) -> str:
        op = self.operator
        if op == "exists":
            return self.key
        if op == "!":
            return f"!{self.key}"
        if op in ("=", "!="):
            return f"{self.key}{op}{self.values[0]}"
        return f"{self.key} {op} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """Requirements, ANDed. No requirements: everything, unless `nothing` is set."""

    requirements: tuple[Requirement, ...] = ()
    nothing: bool = False  # Kubernetes' labels.Nothing(): matches no object at all

    def __post_init__(self) -> None:
        reqs = tuple(sorted(self.requirements, key=lambda r: r.key))
        object.__setattr__(self, "requirements", reqs)

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.nothing:
            return False
        return all(r.matches(labels) for r in self.requirements)

    def empty(self) -> bool:
        """True for the selector that selects everything."""
        return not self.nothing and not self.requirements

    def to_match(self) -> dict[str, Any]:
        """The LabelSelector object form: `=` as matchLabels, the rest as matchExpressions."""
        if self.nothing:
            raise KproxyError("the selector that selects nothing has no LabelSelector form")
        labels: dict[str, str] = {}
        exprs: list[dict[str, Any]] = []
        names = {"in": "In", "notin": "NotIn", "exists": "Exists", "!": "DoesNotExist"}
        for r in self.requirements:
            if r.operator == "=" and r.key not in labels:
                labels[r.key] = r.values[0]
            elif r.operator in ("=", "!="):
                exprs.append({"key": r.key, "operator": "In" if r.operator == "=" else "NotIn",
                              "values": list(r.values)})
            else:
                expr: dict[str, Any] = {"key": r.key, "operator": names[r.operator]}
                if r.values:
                    expr["values"] = list(r.values)
                exprs.append(expr)
        out: dict[str, Any] = {}
        if labels:
            out["matchLabels"] = labels
        if exprs:
            out["matchExpressions"] = exprs
        return out

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)


EVERYTHING = Selector()
NOTHING = Selector(nothing=True)


# --- the string form (kubectl -l) ---------------------------------------------

_TOKEN = re.compile(r"\s*(?:(==|!=|=|!|\(|\)|,|<|>)|([^\s!=(),<>]+))")


def _tokens(text: str) -> list[str]:
    out: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:  # only trailing whitespace would fail, and it was stripped
            break
        out.append(m.group(1) or m.group(2))
        pos = m.end()
    return out


def parse_selector(text: str) -> Selector:
    """A selector as `kubectl get -l TEXT` accepts it. "" selects everything."""
    toks = _tokens(text)
    i = 0

    def fail(why: str) -> KproxyError:
        return KproxyError(f"invalid selector {text!r}: {why}")

    def peek() -> str:
        return toks[i] if i < len(toks) else ""

    def is_ident(t: str) -> bool:
        return bool(t) and t not in ("==", "!=", "=", "!", "(", ")", ",", "<", ">")

    reqs: list[Requirement] = []
    while i < len(toks):
        try:
            if peek() == "!":
                i += 1
                key = peek()
                if not is_ident(key):
                    raise fail(f"expected a label key after '!', found {key or 'end of string'!r}")
                i += 1
                reqs.append(Requirement(key, "!"))
            else:
                key = peek()
                if not is_ident(key):
                    raise fail(f"expected a label key, found {key!r}")
                i += 1
                op = peek()
                if op in ("", ","):
                    reqs.append(Requirement(key, "exists"))
                elif op in ("=", "==", "!="):
                    i += 1
                    value = ""
                    if is_ident(peek()):
                        value = peek()
                        i += 1
                    elif peek() not in ("", ","):
                        raise fail(f"expected a value after {key}{op}, found {peek()!r}")
                    reqs.append(Requirement(key, "!=" if op == "!=" else "=", (value,)))
                elif op in ("in", "notin"):
                    i += 1
                    if peek() != "(":
                        raise fail(f"expected '(' after {key} {op}, found {peek() or 'end of string'!r}")
                    i += 1
                    values: list[str] = []
                    want_value = True
                    while peek() != ")":
                        t = peek()
                        if t == "":
                            raise fail("missing ')'")
                        if t == ",":
                            if want_value:
                                values.append("")  # as Kubernetes: "a,,b" and "(,)" hold ""
                            want_value = True
                        elif is_ident(t) and want_value:
                            values.append(t)
                            want_value = False
                        else:
                            raise fail(f"unexpected {t!r} in the values of {key} {op}")
                        i += 1
                    if want_value:
                        values.append("")
                    i += 1
                    reqs.append(Requirement(key, op, tuple(values)))  # type: ignore[arg-type]
                elif op in ("<", ">"):
                    raise fail(f"operator {op!r} is not supported (only =, ==, !=, in, notin, exists, !)")
                else:
                    raise fail(f"expected an operator after {key!r}, found {op!r}")
        except KproxyError as e:
            msg = str(e)
            raise e if msg.startswith("invalid selector") else fail(msg) from None
        if i < len(toks):
            if peek() != ",":
                raise fail(f"expected ',' after {reqs[-1]}, found {peek()!r}")
            i += 1
            if i == len(toks):
                raise fail("a requirement must follow ','")
    return Selector(tuple(reqs))


# --- the object forms -----------------------------------------------------------

_OPERATORS: dict[str, Operator] = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}


def selector_from_match(obj: Any) -> Selector:
    """A metav1.LabelSelector ({matchLabels, matchExpressions}). {} selects everything.

    Field paths in error messages are relative to the selector object.
    """
    if not isinstance(obj, dict):
        raise KproxyError(f"selector must be a map with matchLabels and/or matchExpressions, got {_show(obj)}")
    for k in obj:
        if k not in ("matchLabels", "matchExpressions"):
            raise KproxyError(f"unknown field {k!r} (expected matchLabels or matchExpressions)")
    reqs = [Requirement(k, "=", (v,)) for k, v in validate_labels(obj.get("matchLabels"), "matchLabels").items()]
    exprs = obj.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise KproxyError(f"matchExpressions: must be a list, got {_show(exprs)}")
    for n, e in enumerate(exprs):
        where = f"matchExpressions[{n}]"
        if not isinstance(e, dict):
            raise KproxyError(f"{where}: must be a map with key, operator and values")
        for k in e:
            if k not in ("key", "operator", "values"):
                raise KproxyError(f"{where}: unknown field {k!r}")
        key, op, values = e.get("key"), e.get("operator"), e.get("values")
        if not isinstance(key, str) or not key:
            raise KproxyError(f"{where}.key: required")
        problem = label_key_error(key)
        if problem:
            raise KproxyError(f"{where}.key: {problem}")
        if op not in _OPERATORS:
            raise KproxyError(
                f"{where}.operator: {_show(op)} is not a valid label selector operator "
                "(In, NotIn, Exists, DoesNotExist)"
            )
        if values is None:
            values = []
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise KproxyError(f"{where}.values: must be a list of strings")
        if op in ("In", "NotIn") and not values:
            raise KproxyError(f"{where}.values: must be specified when operator is In or NotIn")
        if op in ("Exists", "DoesNotExist") and values:
            raise KproxyError(f"{where}.values: may not be specified when operator is Exists or DoesNotExist")
        for v in values:
            problem = label_value_error(v)
            if problem:
                raise KproxyError(f"{where}.values: {problem}")
        reqs.append(Requirement(key, _OPERATORS[op], tuple(values)))
    return Selector(tuple(reqs))


def selector_from_map(labels: Any) -> Selector:
    """A Service's .spec.selector: every label must be equal.

    Unlike a string or a LabelSelector, an empty (or absent) map selects
    NOTHING: Kubernetes does not manage endpoints for a Service without a
    selector (SelectorFromValidatedSet(nil) would be everything; the endpoint
    controllers skip such Services instead).
    """
    valid = validate_labels(labels, "selector")
    if not valid:
        return NOTHING
    return Selector(tuple(Requirement(k, "=", (v,)) for k, v in valid.items()))
