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
from kproxy.fields import as_list, as_map, as_str, port_number, protocol, show
from kproxy.model import parse_object
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
                obj = parse_object(item, at)
                if obj["kind"] == "Pod":
                    status = pod_status(item.get("status"), f"{at} (Pod/{obj['metadata']['name']}): status")
                    if status:
                        obj["status"] = status
                        pods.append(obj)
                elif obj["kind"] == "Service":
                    ingress = load_balancer_ingress(item.get("status"), f"{at} (Service/{obj['metadata']['name']}): "
                                                                        "status")
                    if ingress and obj["spec"]["type"] == "LoadBalancer":
                        obj["status"] = {"loadBalancer": {"ingress": ingress}}
                    services.append(obj)
    return services, pods, slices


def pod_status(raw: Any, where: str) -> Doc:
    """A Pod's podIP and conditions (Ready when none are given); {} without a podIP."""
    status = as_map(raw, where)
    if status.get("podIP") is None:
        return {}
    conditions = as_list(status.get("conditions"), f"{where}.conditions")
    for i, condition in enumerate(conditions):
        for field in ("type", "status"):
            as_str(_entry(condition, f"{where}.conditions[{i}]").get(field), f"{where}.conditions[{i}].{field}")
    return {"podIP": _ipv4(status["podIP"], f"{where}.podIP"),
            "conditions": conditions or [{"type": "Ready", "status": "True"}]}


def load_balancer_ingress(raw: Any, where: str) -> list[Doc]:
    """A Service's status.loadBalancer.ingress[].ip, as a load-balancer controller wrote it."""
    status = as_map(raw, where)
    balancer = as_map(status.get("loadBalancer"), f"{where}.loadBalancer")
    out = []
    for i, entry in enumerate(as_list(balancer.get("ingress"), f"{where}.loadBalancer.ingress")):
        entry = _entry(entry, f"{where}.loadBalancer.ingress[{i}]")
        if entry.get("ip") is not None:
            out.append({"ip": _ipv4(entry["ip"], f"{where}.loadBalancer.ingress[{i}].ip"), "ipMode": "VIP"})
    return out


def endpoint_slice(raw: Doc, where: str) -> Doc:
    """An EndpointSlice as the API server keeps it, with the fields the proxy reads checked
    and defaulted as the endpoint-slice controller writes them (namespace, port name and protocol)."""
    if raw.get("apiVersion") != SLICE_API:
        raise KproxyError(f"{where}: EndpointSlice: apiVersion must be {SLICE_API}")
    meta = as_map(raw.get("metadata"), f"{where}: EndpointSlice: metadata")
    name = as_str(meta.get("name"), f"{where}: EndpointSlice: metadata.name") or None
    if name is None:
        raise KproxyError(f"{where}: EndpointSlice: metadata.name: required")
    at = f"{where} (EndpointSlice/{name})"
    namespace = as_str(meta.get("namespace"), f"{at}: metadata.namespace") or "default"
    validate_labels(meta.get("labels"), f"{at}: metadata.labels")
    if raw.get("addressType", "IPv4") != "IPv4":
        raise KproxyError(f"{at}: addressType: only IPv4 is supported")
    ports = []
    for i, port in enumerate(as_list(raw.get("ports"), f"{at}: ports")):
        port = _entry(port, f"{at}: ports[{i}]")
        ports.append(port | {"name": as_str(port.get("name"), f"{at}: ports[{i}].name"),
                             "port": port_number(port.get("port"), f"{at}: ports[{i}].port"),
                             "protocol": protocol(port.get("protocol"), f"{at}: ports[{i}].protocol")})
    endpoints = as_list(raw.get("endpoints"), f"{at}: endpoints")
    for i, endpoint in enumerate(endpoints):
        endpoint = _entry(endpoint, f"{at}: endpoints[{i}]")
        for address in as_list(endpoint.get("addresses"), f"{at}: endpoints[{i}].addresses"):
            _ipv4(address, f"{at}: endpoints[{i}].addresses")
        for condition, value in as_map(endpoint.get("conditions"), f"{at}: endpoints[{i}].conditions").items():
            if not isinstance(value, bool):
                raise KproxyError(f"{at}: endpoints[{i}].conditions.{condition}: must be true or false, "
                                  f"got {show(value)}")
        as_str(endpoint.get("nodeName"), f"{at}: endpoints[{i}].nodeName")
    return raw | {"metadata": meta | {"namespace": namespace}, "ports": ports, "endpoints": endpoints}


def _entry(value: Any, where: str) -> Doc:
    """A list entry that must be a map (null too is an error there)."""
    if not isinstance(value, dict):
        raise KproxyError(f"{where}: must be a map, got {show(value)}")
    return value


def _ipv4(value: Any, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(as_str(value, where)))
    except ValueError:
        raise KproxyError(f"{where}: {show(value)} is not an IPv4 address") from None
