"""`kproxy get`: kubectl's tables, and the stored objects as JSON/YAML."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import yaml

from kproxy import controllers
from kproxy.errors import KproxyError
from kproxy.store import Obj, View

KINDS = {
    "nodes": "Node", "node": "Node", "no": "Node",
    "pods": "Pod", "pod": "Pod", "po": "Pod",
    "services": "Service", "service": "Service", "svc": "Service",
    "endpoints": "Endpoints", "ep": "Endpoints",
    "endpointslices": "EndpointSlice", "endpointslice": "EndpointSlice",
    "deployments": "Deployment", "deployment": "Deployment", "deploy": "Deployment",
    "replicasets": "ReplicaSet", "replicaset": "ReplicaSet", "rs": "ReplicaSet",
}
NONE = "<none>"


def resolve_kind(word: str) -> str:
    try:
        return KINDS[word.lower()]
    except KeyError:
        raise KproxyError(f"unknown resource type {word!r} "
                          "(known: nodes, pods, svc, endpoints, endpointslices, deployments, rs)") from None


def select(view: View, kind: str, namespace: str | None, selector: Any | None, name: str | None = None) -> list[Obj]:
    items = []
    for obj in view.of_kind(kind):
        meta = obj["metadata"]
        if kind != "Node" and namespace is not None and meta["namespace"] != namespace:
            continue
        if name is not None and meta["name"] != name:
            continue
        if selector is not None and not selector.matches(meta.get("labels") or {}):
            continue
        items.append(obj)
    if name is not None and not items:
        raise KproxyError(f"{kind.lower()} {name!r} not found")
    return items


def human_duration(seconds: int) -> str:
    """kubectl's AGE (k8s.io/apimachinery's duration.HumanDuration)."""
    if seconds < -1:
        return "<invalid>"
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 730:
        return f"{days}d"
    if days < 2920:
        return f"{days // 365}y{days % 365}d" if days % 365 else f"{days // 365}y"
    return f"{days // 365}y"


def since(stamp: str | None) -> str:
    if not stamp:
        return "<unknown>"
    then = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return human_duration(int((datetime.now(timezone.utc) - then).total_seconds()))


def age(obj: Obj) -> str:
    return since(obj["metadata"].get("creationTimestamp"))


def _more(shown: list[str], count: int, empty: str) -> str:
    """At most three entries, then " + N more...", as kubectl lists addresses."""
    text = ",".join(shown[:3])
    return f"{text} + {count - 3} more..." if count > 3 else (text or empty)


def _service_ports(svc: Obj) -> str:
    out = []
    for p in svc["spec"].get("ports", []):
        node_port = f":{p['nodePort']}" if p.get("nodePort") else ""
        out.append(f"{p['port']}{node_port}/{p['protocol']}")
    return ",".join(out) or NONE


def _endpoints(obj: Obj) -> str:
    """kubectl's ENDPOINTS of a v1 Endpoints: ready ip:port for every port of every subset."""
    if not obj.get("subsets"):
        return NONE
    shown = [f"{a['ip']}:{p['port']}" for s in obj["subsets"] for p in s.get("ports", [])
             for a in s.get("addresses", [])]
    return _more(shown, len(shown), "")


def _restarts(pod: Obj) -> str:
    """kubectl's RESTARTS: the containers' restartCount, and how long ago the last one ended."""
    statuses = pod.get("status", {}).get("containerStatuses", [])
    ended = [s["lastState"]["terminated"]["finishedAt"] for s in statuses
             if (s.get("lastState") or {}).get("terminated", {}).get("finishedAt")]
    count = str(controllers.restart_count(pod))
    return f"{count} ({since(max(ended))} ago)" if ended else count


def _pod_row(pod: Obj, wide: bool) -> list[str]:
    status = pod.get("status", {})
    statuses = status.get("containerStatuses", [])
    ready = sum(1 for s in statuses if s.get("ready"))
    phase = "Terminating" if controllers.pod_is_terminating(pod) else status.get("phase", "Pending")
    row = [pod["metadata"]["name"], f"{ready}/{len(pod['spec'].get('containers', []))}", phase, _restarts(pod),
           age(pod)]
    return row + ([status.get("podIP") or NONE, pod["spec"].get("nodeName") or NONE, NONE, NONE] if wide else [])


def _containers(template_spec: Obj) -> list[str]:
    containers = template_spec.get("containers", [])
    return [",".join(c["name"] for c in containers), ",".join(c.get("image", "") for c in containers)]


def _selector(spec: Obj) -> str:
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or NONE


def _external_ip(svc: Obj) -> str:
    """kubectl's EXTERNAL-IP: the load balancer's addresses and the externalIPs, or the external name."""
    spec = svc["spec"]
    if spec.get("type") == "ExternalName":
        return spec["externalName"]
    addresses = [*(controllers.load_balancer_ips(svc) if spec.get("type") == "LoadBalancer" else ()),
                 *(spec.get("externalIPs") or ())]
    if addresses:
        return ",".join(addresses)
    return "<pending>" if spec.get("type") == "LoadBalancer" else NONE


def rows(kind: str, items: list[Obj], wide: bool, all_namespaces: bool) -> list[list[str]]:
    ns = ["NAMESPACE"] if all_namespaces and kind != "Node" else []

    def nsv(o: Obj) -> list[str]:
        return [o["metadata"]["namespace"]] if ns else []
    if kind == "Node":
        table = [["NAME", "STATUS", "INTERNAL-IP", "POD-CIDR", "AGE"] + (["LABELS"] if wide else [])]
        for o in items:
            ip = next((a["address"] for a in o["status"]["addresses"] if a["type"] == "InternalIP"), "")
            labels = ",".join(f"{k}={v}" for k, v in sorted((o["metadata"].get("labels") or {}).items()))
            table.append([o["metadata"]["name"], "Ready", ip, o["spec"].get("podCIDR", ""), age(o)]
                         + ([labels] if wide else []))
    elif kind == "Pod":
        table = [ns + ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
                 + (["IP", "NODE", "NOMINATED NODE", "READINESS GATES"] if wide else [])]
        table += [nsv(o) + _pod_row(o, wide) for o in items]
    elif kind == "Service":
        table = [ns + ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"] + (["SELECTOR"] if wide else [])]
        for o in items:
            selector = ",".join(f"{k}={v}" for k, v in sorted((o["spec"].get("selector") or {}).items())) or NONE
            spec = o["spec"]
            table.append(nsv(o) + [o["metadata"]["name"], spec.get("type", "ClusterIP"), spec.get("clusterIP") or NONE,
                                   _external_ip(o), _service_ports(o), age(o)]
                         + ([selector] if wide else []))
    elif kind == "Endpoints":
        table = [ns + ["NAME", "ENDPOINTS", "AGE"]]
        table += [nsv(o) + [o["metadata"]["name"], _endpoints(o), age(o)] for o in items]
    elif kind == "EndpointSlice":
        table = [ns + ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"]]
        for o in items:
            ports = [str(p["port"]) for p in o.get("ports") or []]
            addresses = [a for e in o.get("endpoints") or [] for a in e["addresses"]]
            table.append(nsv(o) + [o["metadata"]["name"], o["addressType"], _more(ports, len(ports), "<unset>"),
                                   _more(addresses, len(addresses), "<unset>"), age(o)])
    elif kind == "ReplicaSet":
        table = [ns + ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
                 + (["CONTAINERS", "IMAGES", "SELECTOR"] if wide else [])]
        for o in items:
            status = o.get("status", {})
            table.append(nsv(o) + [o["metadata"]["name"], str(o["spec"].get("replicas", 1)),
                                   str(status.get("replicas", 0)), str(status.get("readyReplicas", 0)), age(o)]
                         + (_containers(o["spec"]["template"].get("spec", {})) + [_selector(o["spec"])]
                            if wide else []))
    else:
        table = [ns + ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
                 + (["CONTAINERS", "IMAGES", "SELECTOR"] if wide else [])]
        for o in items:
            status = o.get("status", {})
            table.append(nsv(o) + [o["metadata"]["name"],
                                   f"{status.get('readyReplicas', 0)}/{o['spec'].get('replicas', 1)}",
                                   str(status.get("updatedReplicas", 0)), str(status.get("availableReplicas", 0)),
                                   age(o)]
                         + (_containers(o["spec"]["template"].get("spec", {})) + [_selector(o["spec"])]
                            if wide else []))
    return table


def render(items: list[Obj], output: str, single: bool, version: int) -> str:
    """One object as stored, or a v1 List whose metadata.resourceVersion is the store version read."""
    doc: Any = items[0] if single and len(items) == 1 else {"apiVersion": "v1", "kind": "List", "items": items,
                                                            "metadata": {"resourceVersion": str(version)}}
    if output == "json":
        return json.dumps(doc, indent=4)
    return yaml.safe_dump(doc, sort_keys=False).rstrip()
