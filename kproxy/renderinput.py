"""What `kproxy render` reads: Services, Pods with their status, and EndpointSlices, from YAML.

Services and Pods are checked as `apply` checks them (kproxy.model). The API
server's own objects, an EndpointSlice and a Pod's status, are checked here for
the fields the proxy reads, each error naming the document and the field.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from kproxy.errors import KproxyError
from kproxy.model import parse_object, to_k8s
# The field checks of manifests, so both kinds of input say their errors alike.
from kproxy.model import _list, _map, _port_number, _protocol, _show, _str
from kproxy.selectors import validate_labels

Doc = dict[str, Any]
SLICE_API = "discovery.k8s.io/v1"


def render_objects(texts: list[tuple[str, str]]) -> tuple[list[Doc], list[Doc], list[Doc]]:
    """(services, pods with an IP, EndpointSlices) of (text, source) pairs, in order."""
    services: list[Doc] = []
    pods: list[Doc] = []
    slices: list[Doc] = []
    for text, source in texts:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as exc:
            raise KproxyError(f"{source}: invalid YAML: {str(exc).splitlines()[0]}") from None
        for number, doc in enumerate(docs, start=1):
            where = f"{source}: document {number}"
            if doc is None:
                continue
            items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            if not isinstance(items, list):
                raise KproxyError(f"{where}: items: must be a list")
            for i, item in enumerate(items):
                at = where if items == [doc] else f"{where}, items[{i}]"
                if isinstance(item, dict) and item.get("kind") == "EndpointSlice":
                    slices.append(endpoint_slice(item, at))
                    continue
                obj = to_k8s(parse_object(item, at))
                if obj["kind"] == "Pod":
                    status = pod_status(item.get("status"), f"{at} (Pod/{obj['metadata']['name']}): status")
                    if status:
                        obj["status"] = status
                        pods.append(obj)
                elif obj["kind"] == "Service":
                    services.append(obj)
    return services, pods, slices


def pod_status(raw: Any, where: str) -> Doc:
    """A Pod's podIP and conditions (Ready when none are given); {} without a podIP."""
    status = _map(raw, where)
    if status.get("podIP") is None:
        return {}
    conditions = _list(status.get("conditions"), f"{where}.conditions")
    for i, condition in enumerate(conditions):
        for field in ("type", "status"):
            _str(_entry(condition, f"{where}.conditions[{i}]").get(field), f"{where}.conditions[{i}].{field}")
    return {"podIP": _ipv4(status["podIP"], f"{where}.podIP"),
            "conditions": conditions or [{"type": "Ready", "status": "True"}]}


def endpoint_slice(raw: Doc, where: str) -> Doc:
    """An EndpointSlice as the API server keeps it, with the fields the proxy reads checked."""
    if raw.get("apiVersion") != SLICE_API:
        raise KproxyError(f"{where}: EndpointSlice: apiVersion must be {SLICE_API}")
    meta = _map(raw.get("metadata"), f"{where}: EndpointSlice: metadata")
    name = _str(meta.get("name"), f"{where}: EndpointSlice: metadata.name") or None
    if name is None:
        raise KproxyError(f"{where}: EndpointSlice: metadata.name: required")
    at = f"{where} (EndpointSlice/{name})"
    _str(meta.get("namespace", "default"), f"{at}: metadata.namespace")
    validate_labels(meta.get("labels"), f"{at}: metadata.labels")
    if raw.get("addressType", "IPv4") != "IPv4":
        raise KproxyError(f"{at}: addressType: only IPv4 is supported")
    for i, port in enumerate(_list(raw.get("ports"), f"{at}: ports")):
        port = _entry(port, f"{at}: ports[{i}]")
        _str(port.get("name"), f"{at}: ports[{i}].name")
        _port_number(port.get("port"), f"{at}: ports[{i}].port")
        _protocol(port.get("protocol"), f"{at}: ports[{i}].protocol")
    for i, endpoint in enumerate(_list(raw.get("endpoints"), f"{at}: endpoints")):
        endpoint = _entry(endpoint, f"{at}: endpoints[{i}]")
        for address in _list(endpoint.get("addresses"), f"{at}: endpoints[{i}].addresses"):
            _ipv4(address, f"{at}: endpoints[{i}].addresses")
        for condition, value in _map(endpoint.get("conditions"), f"{at}: endpoints[{i}].conditions").items():
            if not isinstance(value, bool):
                raise KproxyError(f"{at}: endpoints[{i}].conditions.{condition}: must be true or false, "
                                  f"got {_show(value)}")
        _str(endpoint.get("nodeName"), f"{at}: endpoints[{i}].nodeName")
    return raw



def _entry(value: Any, where: str) -> Doc:
    """A list entry that must be a map (null too is an error there)."""
    if not isinstance(value, dict):
        raise KproxyError(f"{where}: must be a map, got {_show(value)}")
    return value


def _ipv4(value: Any, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(_str(value, where)))
    except ValueError:
        raise KproxyError(f"{where}: {_show(value)} is not an IPv4 address") from None
