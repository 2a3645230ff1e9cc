"""The control plane's decisions, as pure functions over Kubernetes-shaped objects.

Allocation of ClusterIPs and NodePorts, EndpointSlices from Service selectors
and pod readiness (the endpoint-slice controller), and the pods a Deployment
wants (the ReplicaSet controller, without ReplicaSet objects).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import string
from datetime import datetime, timezone
from typing import Any, Iterable

from kproxy.errors import KproxyError
from kproxy.proxy.source import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION
from kproxy.store import key_of

Obj = dict[str, Any]
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")
FIRST_DYNAMIC_IP = SERVICE_CIDR.network_address + 10  # .1 is the kubernetes Service's, .10 often DNS
NODE_PORT_RANGE = range(30000, 32768)
POD_TEMPLATE_HASH = "pod-template-hash"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def name_of(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{meta.get('namespace', 'default')}/{meta['name']}"


def obj_key(obj: Obj) -> str:
    meta = obj["metadata"]
    return key_of(obj["kind"], meta.get("namespace", "default") if obj["kind"] != "Node" else "", meta["name"])


# Allocation ----------------------------------------------------------------

def allocate_cluster_ips(services: list[Obj], existing: Iterable[Obj]) -> None:
    """Give every new Service a ClusterIP; refuse one that is taken or outside the range."""
    owners = {s["spec"]["clusterIP"]: name_of(s) for s in existing if s["spec"].get("clusterIP")}
    for svc in services:
        ip = svc["spec"].get("clusterIP") or ""
        if ip:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                raise KproxyError(f"Service {name_of(svc)}: spec.clusterIP {ip!r} is not an IP address") from None
            if addr not in SERVICE_CIDR:
                raise KproxyError(f"Service {name_of(svc)}: spec.clusterIP {ip} is not in the service CIDR {SERVICE_CIDR}")
            if owners.get(ip, name_of(svc)) != name_of(svc):
                raise KproxyError(f"Service {name_of(svc)}: spec.clusterIP {ip} is already allocated to {owners[ip]}")
            owners[ip] = name_of(svc)
    candidate = FIRST_DYNAMIC_IP
    for svc in services:
        if svc["spec"].get("clusterIP"):
            continue
        while str(candidate) in owners:
            candidate += 1
            if candidate not in SERVICE_CIDR:
                raise KproxyError("the service CIDR is full")
        svc["spec"]["clusterIP"] = str(candidate)
        svc["spec"]["clusterIPs"] = [str(candidate)]
        owners[str(candidate)] = name_of(svc)


def allocate_node_ports(services: list[Obj], existing: Iterable[Obj]) -> None:
    owners: dict[tuple[int, str], str] = {}
    for svc in existing:
        for port in svc["spec"].get("ports", []):
            if port.get("nodePort"):
                owners[(int(port["nodePort"]), port.get("protocol", "TCP"))] = name_of(svc)
    for svc in services:
        for i, port in enumerate(svc["spec"].get("ports", [])):
            if port.get("nodePort"):
                node_port = (int(port["nodePort"]), port.get("protocol", "TCP"))
                if owners.get(node_port, name_of(svc)) != name_of(svc):
                    raise KproxyError(f"Service {name_of(svc)}: spec.ports[{i}].nodePort: {node_port[0]} is already "
                                      f"allocated to {owners[node_port]}")
                owners[node_port] = name_of(svc)
    for svc in services:
        if svc["spec"].get("type") != "NodePort":
            continue
        for port in svc["spec"]["ports"]:
            if port.get("nodePort"):
                continue
            proto = port.get("protocol", "TCP")
            free = next((p for p in NODE_PORT_RANGE if (p, proto) not in owners), None)
            if free is None:
                raise KproxyError(f"Service {name_of(svc)}: no NodePort left in {NODE_PORT_RANGE.start}-"
                                  f"{NODE_PORT_RANGE.stop - 1}")
            port["nodePort"] = free
            owners[(free, proto)] = name_of(svc)


# Endpoints -----------------------------------------------------------------

def pod_is_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_is_terminating(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def container_ports(pod: Obj) -> list[Obj]:
    return [p for c in pod.get("spec", {}).get("containers", []) for p in c.get("ports", [])]


def resolve_target_port(port: Obj, pod: Obj) -> int | None:
    target = port.get("targetPort", port["port"])
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for cport in container_ports(pod):
        if cport.get("name") == target and cport.get("protocol", "TCP") == port.get("protocol", "TCP"):
            return int(cport["containerPort"])
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A Service selector: every key must match; an empty selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoint_slices(service: Obj, pods: Iterable[Obj], previous: dict[str, Obj]) -> dict[str, Obj]:
    """The EndpointSlices for one Service: pods grouped by their resolved port numbers.

    previous (key -> slice) keeps the trigger-time annotation of unchanged slices,
    so network programming latency is measured from the change that caused it.
    """
    meta, spec = service["metadata"], service["spec"]
    namespace = meta.get("namespace", "default")
    selector = spec.get("selector") or {}
    groups: dict[tuple[int, ...], list[Obj]] = {}
    for pod in pods:
        pmeta = pod["metadata"]
        if pmeta.get("namespace", "default") != namespace or not selects(selector, pmeta.get("labels") or {}):
            continue
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            continue
        resolved = [resolve_target_port(p, pod) for p in spec.get("ports", [])]
        if any(r is None for r in resolved):
            continue  # like Kubernetes: a pod without the named port is not an endpoint
        terminating = pod_is_terminating(pod)
        ready = pod_is_ready(pod) and not terminating
        groups.setdefault(tuple(r for r in resolved if r is not None), []).append({
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": pod_is_ready(pod), "terminating": terminating},
            "nodeName": pod["spec"].get("nodeName", ""),
            "targetRef": {"kind": "Pod", "namespace": namespace, "name": pmeta["name"]},
        })
    if not groups and selector:
        groups[tuple(int(p["targetPort"]) if isinstance(p.get("targetPort"), int) else int(p["port"])
                     for p in spec.get("ports", []))] = []
    out = {}
    for index, (numbers, endpoints) in enumerate(sorted(groups.items())):
        name = meta["name"] if index == 0 else f"{meta['name']}-{index}"
        key = key_of("EndpointSlice", namespace, name)
        slice_: Obj = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace, "labels": {SERVICE_NAME_LABEL: meta["name"]},
                         "annotations": {}},
            "addressType": "IPv4",
            "endpoints": sorted(endpoints, key=lambda e: e["addresses"][0]),
            "ports": [{"name": p.get("name") or "", "port": n, "protocol": p.get("protocol", "TCP")}
                      for p, n in zip(spec.get("ports", []), numbers)],
        }
        old = previous.get(key)
        same = old is not None and {k: v for k, v in old.items() if k != "metadata"} == \
            {k: v for k, v in slice_.items() if k != "metadata"}
        slice_["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] = (
            old["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] if same and old is not None else now_iso())
        out[key] = slice_
    return out


def all_endpoint_slices(services: Iterable[Obj], pods: list[Obj], previous: dict[str, Obj]) -> dict[str, Obj | None]:
    """Store changes that make every Service's EndpointSlices current (None deletes)."""
    wanted: dict[str, Obj] = {}
    for service in services:
        wanted.update(endpoint_slices(service, pods, previous))
    changes: dict[str, Obj | None] = {k: v for k, v in wanted.items() if previous.get(k) != v}
    for key in previous:
        if key not in wanted:
            changes[key] = None
    return changes


# Deployments ---------------------------------------------------------------

def template_hash(deployment: Obj) -> str:
    template = json.dumps(deployment["spec"]["template"], sort_keys=True).encode()
    return hashlib.sha256(template).hexdigest()[:10]


def _suffix() -> str:
    return "".join(random.choices(string.ascii_lowercase + string.digits, k=5))


def new_pod_for(deployment: Obj, existing_names: set[str]) -> Obj:
    meta, template = deployment["metadata"], deployment["spec"]["template"]
    phash = template_hash(deployment)
    while True:
        name = f"{meta['name']}-{phash}-{_suffix()}"
        if name not in existing_names:
            break
    labels = dict(template.get("metadata", {}).get("labels") or {})
    labels[POD_TEMPLATE_HASH] = phash
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": meta.get("namespace", "default"), "labels": labels,
                     "ownerReferences": [{"kind": "Deployment", "name": meta["name"]}]},
        "spec": json.loads(json.dumps(template.get("spec", {}))),
        "status": {"phase": "Pending"},
    }


def owned_pods(deployment: Obj, pods: Iterable[Obj]) -> list[Obj]:
    meta = deployment["metadata"]
    return [p for p in pods
            if p["metadata"].get("namespace", "default") == meta.get("namespace", "default")
            and any(o.get("kind") == "Deployment" and o.get("name") == meta["name"]
                    for o in p["metadata"].get("ownerReferences", []))]
