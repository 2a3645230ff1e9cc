"""Kubernetes' OpenAPI schemas, as the JSON Schemas kubernetes-validate ships, for what kproxy prints.

kubernetes_validate.validate checks no formats (a creationTimestamp "yesterday"
would pass), so this runs its strict schemas with jsonschema's format checker.
A v1 List, which has no schema, is checked as the typed list an API server
returns for its items' kind (PodList, ReplicaSetList, ...).
"""

from __future__ import annotations

import functools
import json
import re
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

KUBERNETES = "v1.34.0"
# What `kproxy get` lists, each checked against the schema of its kind.
KINDS = ["nodes", "pods", "svc", "endpoints", "endpointslices", "deployments", "rs"]
SCHEMAS = files("kubernetes_validate") / "kubernetes-json-schema" / f"{KUBERNETES}-local-strict"


@functools.cache
def _registry() -> Registry:
    return Resource.from_contents(json.loads((SCHEMAS / "_definitions.json").read_text())) @ Registry()


@functools.cache
def _validator(api_version: str, kind: str) -> Draft202012Validator:
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # discovery.k8s.io/v1 -> discovery-v1
    schema = json.loads((SCHEMAS / f"{kind.lower()}-{group_version}.json").read_text())
    return Draft202012Validator(schema, registry=_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER)


def validate(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless doc is valid; unknown fields are errors too."""
    if doc["kind"] == "List":
        kinds = {(item["apiVersion"], item["kind"]) for item in doc["items"]}
        assert len(kinds) == 1, f"a List of one kind, not {kinds}"
        ((api_version, kind),) = kinds
        doc = {**doc, "apiVersion": api_version, "kind": f"{kind}List"}
    _validator(doc["apiVersion"], doc["kind"]).validate(doc)
