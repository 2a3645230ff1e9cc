"""`kproxy get`: kubectl-like tables, and Kubernetes-shaped JSON/YAML."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import yaml

from kproxy import controllers
from kproxy.errors import KproxyError
from kproxy.store import View

KINDS = {
    "nodes": "Node", "node": "Node", "no": "Node",
    "pods": "Pod", "pod": "Pod", "po": "Pod",
    "services": "Service", "service": "Service", "svc": "Service",
    "endpoints": "EndpointSlice", "ep": "EndpointSlice", "endpointslices": "EndpointSlice",
    "deployments": "Deployment", "deployment": "Deployment", "deploy": "Deployment",
}


def resolve_kind(word: str) -> str:
    try:
        return KINDS[word.lower()]
    except KeyError:
        raise KproxyError(f"unknown resource type {word!r} (known: nodes, pods, svc, endpoints, deployments)") from None


def select(view: View, kind: str, namespace: str | None, selector: Any | None, name: str | None = None) -> list[Any]:
    items = []
    for obj in view.of_kind(kind):
        meta = obj["metadata"]
        if kind != "Node" and namespace is not None and meta.get("namespace", "default") != namespace:
            continue
        if name is not None and meta["name"] != name:
            continue
        if selector is not None and not selector.matches(meta.get("labels") or {}):
            continue
        items.append(obj)
    if name is not None and not items:
        raise KproxyError(f"{kind.lower()} {name!r} not found")
    return items


def age(obj: dict[str, Any]) -> str:
    stamp = obj["metadata"].get("creationTimestamp")
    if not stamp:
        return "<unknown>"
    seconds = int((datetime.now(timezone.utc) - datetime.fromisoformat(stamp.replace("Z", "+00:00"))).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _ports(svc: dict[str, Any]) -> str:
    out = []
    for p in svc["spec"].get("ports", []):
        node_port = f":{p['nodePort']}" if p.get("nodePort") and svc["spec"].get("type") == "NodePort" else ""
        out.append(f"{p['port']}{node_port}/{p.get('protocol', 'TCP')}")
    return ",".join(out)


def rows(kind: str, items: list[dict[str, Any]], wide: bool, all_namespaces: bool) -> list[list[str]]:
    ns = ["NAMESPACE"] if all_namespaces and kind != "Node" else []
    def nsv(o: dict[str, Any]) -> list[str]:
        return [o["metadata"].get("namespace", "default")] if ns else []
    if kind == "Node":
        table = [["NAME", "STATUS", "INTERNAL-IP", "POD-CIDR", "AGE"] + (["LABELS"] if wide else [])]
        for o in items:
            ip = next((a["address"] for a in o["status"]["addresses"] if a["type"] == "InternalIP"), "")
            labels = ",".join(f"{k}={v}" for k, v in sorted((o["metadata"].get("labels") or {}).items()))
            table.append([o["metadata"]["name"], "Ready", ip, o["spec"].get("podCIDR", ""), age(o)]
                         + ([labels] if wide else []))
    elif kind == "Pod":
        table = [ns + ["NAME", "READY", "STATUS", "AGE"] + (["IP", "NODE"] if wide else [])]
        for o in items:
            ready = controllers.pod_is_ready(o) and not controllers.pod_is_terminating(o)
            status = "Terminating" if controllers.pod_is_terminating(o) else o.get("status", {}).get("phase", "Pending")
            table.append(nsv(o) + [o["metadata"]["name"], "1/1" if ready else "0/1", status, age(o)]
                         + ([o.get("status", {}).get("podIP", "<none>"), o["spec"].get("nodeName", "<none>")]
                            if wide else []))
    elif kind == "Service":
        table = [ns + ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"] + (["SELECTOR"] if wide else [])]
        for o in items:
            selector = ",".join(f"{k}={v}" for k, v in sorted((o["spec"].get("selector") or {}).items())) or "<none>"
            table.append(nsv(o) + [o["metadata"]["name"], o["spec"].get("type", "ClusterIP"), o["spec"]["clusterIP"],
                                   "<none>", _ports(o), age(o)] + ([selector] if wide else []))
    elif kind == "EndpointSlice":
        table = [ns + ["NAME", "ENDPOINTS", "AGE"]]
        for o in items:
            addrs = [f"{a}:{p['port']}" for e in o.get("endpoints", []) if e["conditions"].get("ready")
                     for a in e["addresses"] for p in o.get("ports", [])[:1]]
            shown = ",".join(addrs[:3]) + (f" + {len(addrs) - 3} more..." if len(addrs) > 3 else "")
            table.append(nsv(o) + [o["metadata"]["labels"].get("kubernetes.io/service-name", o["metadata"]["name"]),
                                   shown or "<none>", age(o)])
    else:
        table = [ns + ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]]
        for o in items:
            table.append(nsv(o) + [o["metadata"]["name"], f"?/{o['spec'].get('replicas', 1)}",
                                   str(o["spec"].get("replicas", 1)), "-", age(o)])
    return table


def with_ready_count(view: View, items: list[dict[str, Any]], kind: str, table: list[list[str]]) -> None:
    """Deployments' READY column counts their ready pods."""
    if kind != "Deployment":
        return
    pods = view.of_kind("Pod")
    for row, dep in zip(table[1:], items):
        owned = controllers.owned_pods(dep, pods)
        ready = sum(1 for p in owned if controllers.pod_is_ready(p) and not controllers.pod_is_terminating(p))
        want = dep["spec"].get("replicas", 1)
        index = row.index(f"?/{want}")
        row[index] = f"{ready}/{want}"
        row[index + 2] = str(ready)


def render(items: list[dict[str, Any]], output: str, single: bool) -> str:
    doc: Any = items[0] if single and len(items) == 1 else {"apiVersion": "v1", "kind": "List", "items": items,
                                                            "metadata": {"resourceVersion": ""}}
    if output == "json":
        return json.dumps(doc, indent=4)
    return yaml.safe_dump(doc, sort_keys=False).rstrip()
