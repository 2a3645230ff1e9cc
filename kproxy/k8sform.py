"""The Kubernetes form of kproxy's typed objects: what the store holds and `kproxy get` prints.

Like the API server's defaulting, every field with a default is written out
(metadata.namespace, each port's protocol and targetPort, sessionAffinity and
its timeout, the traffic policies and IP families), so readers of the store
index fields plainly and never fill a default again.

    to_k8s(parse_object(doc))           # what `kproxy apply` stores
    to_k8s(pod, podIP="10.244.1.5")     # keyword arguments become .status fields
"""

from __future__ import annotations

from typing import Any, Mapping

from kproxy.model import Manifest, Pod, PodSpec, Service

def _metadata(name: str, namespace: str | None, labels: Mapping[str, str],
              annotations: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _pod_spec_k8s(spec: PodSpec) -> dict[str, Any]:
    containers = []
    for c in spec.containers:
        d: dict[str, Any] = {"name": c.name}
        if c.image:
            d["image"] = c.image
        if c.ports:
            d["ports"] = [({"name": p.name} if p.name else {}) | {"containerPort": p.container_port,
                                                                 "protocol": p.protocol} for p in c.ports]
        containers.append(d)
    out: dict[str, Any] = {"containers": containers}
    if spec.node_name:
        out["nodeName"] = spec.node_name
    if spec.node_selector:
        out["nodeSelector"] = dict(spec.node_selector)
    return out


def pod_object(metadata: dict[str, Any], spec: dict[str, Any],
               status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A v1 Pod as the store holds it, the one place Pods are built (from a manifest, a
    ReplicaSet's template or a lab topology); without status it is new: Pending."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec,
            "status": {"phase": "Pending"} if status is None else status}


def to_k8s(obj: Manifest, **status: Any) -> dict[str, Any]:
    """The object in its Kubernetes form, as `kproxy apply` stores it (the store adds uid,
    creationTimestamp and resourceVersion); keyword arguments become .status fields
    verbatim (podIP="10.244.1.5", readyReplicas=3, ...); a Pod's phase is Pending unless given."""
    meta = _metadata(obj.name, obj.namespace, obj.labels, obj.annotations)
    out: dict[str, Any] = {"apiVersion": obj.api_version, "kind": obj.kind, "metadata": meta}
    if isinstance(obj, Service):
        out["spec"] = _service_spec_k8s(obj)
        out["status"] = {"loadBalancer": {}} | status
    elif isinstance(obj, Pod):
        return pod_object(meta, _pod_spec_k8s(obj.spec), {"phase": "Pending"} | status)
    else:
        tmeta: dict[str, Any] = {"labels": dict(obj.template.labels)}
        if obj.template.annotations:
            tmeta["annotations"] = dict(obj.template.annotations)
        strategy: dict[str, Any] = {"type": obj.strategy}
        if obj.strategy == "RollingUpdate":
            strategy["rollingUpdate"] = {"maxSurge": "25%", "maxUnavailable": "25%"}
        out["spec"] = {"replicas": obj.replicas, "selector": obj.selector.to_match(), "strategy": strategy,
                       "template": {"metadata": tmeta, "spec": _pod_spec_k8s(obj.template.spec)}}
        out["status"] = dict(status)
    return out


def _service_spec_k8s(svc: Service) -> dict[str, Any]:
    ports = []
    for p in svc.ports:
        d: dict[str, Any] = {"name": p.name} if p.name else {}
        d |= {"port": p.port, "protocol": p.protocol, "targetPort": p.target_port}
        if p.node_port:
            d["nodePort"] = p.node_port
        ports.append(d)
    spec: dict[str, Any] = {}
    if svc.cluster_ip:
        spec |= {"clusterIP": svc.cluster_ip, "clusterIPs": [svc.cluster_ip]}
    if svc.type == "NodePort":
        spec["externalTrafficPolicy"] = "Cluster"
    spec |= {"internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
             "ports": ports}
    if svc.selector:
        spec["selector"] = dict(svc.selector)
    spec["sessionAffinity"] = svc.session_affinity
    if svc.session_affinity == "ClientIP":
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": svc.affinity_timeout_seconds}}
    spec["type"] = svc.type
    return spec
