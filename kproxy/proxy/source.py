"""ProxyState from the store: Services and EndpointSlices, as kube-proxy reads them."""

from __future__ import annotations

from typing import Any, Iterable

from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"


def service_ports(service: dict[str, Any]) -> list[ServicePort]:
    meta, spec = service["metadata"], service["spec"]
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        affinity = int(spec.get("sessionAffinityConfig", {}).get("clientIP", {}).get("timeoutSeconds", 10800))
    scheduler = (meta.get("annotations") or {}).get(SCHEDULER_ANNOTATION, "")
    return [
        ServicePort(
            namespace=meta.get("namespace", "default"),
            name=meta["name"],
            port_name=port.get("name") or "",
            protocol=port.get("protocol", "TCP"),
            cluster_ip=spec["clusterIP"],
            port=int(port["port"]),
            node_port=int(port.get("nodePort") or 0) if spec.get("type") == "NodePort" else 0,
            affinity_seconds=affinity,
            scheduler=scheduler,
        )
        for port in spec.get("ports", [])
    ]


def proxy_state(services: Iterable[dict[str, Any]], slices: Iterable[dict[str, Any]]) -> ProxyState:
    state = ProxyState()
    by_service: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for slice_ in slices:
        meta = slice_["metadata"]
        owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
        if owner:
            by_service.setdefault((meta.get("namespace", "default"), owner), []).append(slice_)
    for service in services:
        meta = service["metadata"]
        for svc in service_ports(service):
            state.services.append(svc)
            endpoints: dict[str, Endpoint] = {}
            for slice_ in by_service.get((meta.get("namespace", "default"), meta["name"]), []):
                port = next((p for p in slice_.get("ports", [])
                             if (p.get("name") or "") == svc.port_name and p.get("protocol", "TCP") == svc.protocol),
                            None)
                if port is None:
                    continue
                for ep in slice_.get("endpoints", []):
                    conditions = ep.get("conditions", {})
                    for ip in ep.get("addresses", []):
                        endpoint = Endpoint(ip, int(port["port"]), ep.get("nodeName", ""),
                                            ready=bool(conditions.get("ready", True)),
                                            terminating=bool(conditions.get("terminating", False)))
                        endpoints[endpoint.address] = endpoint
            state.endpoints[svc.key] = sorted(endpoints.values(), key=lambda e: (e.ip, e.port))
    state.services.sort(key=lambda s: s.key)
    return state


def node_info(node: dict[str, Any], cluster_cidr: str) -> NodeInfo:
    addresses = node.get("status", {}).get("addresses", [])
    ip = next((a["address"] for a in addresses if a.get("type") == "InternalIP"), "")
    return NodeInfo(node["metadata"]["name"], ip, cluster_cidr)
