"""The Kubernetes form of each kind kproxy stores: one builder per kind, used by everyone who makes one.

Like the API server's defaulting, every field with a default is written out
(metadata.namespace, each port's protocol and targetPort, sessionAffinity and
its timeout, the traffic policies and IP families), so readers of the store
index fields plainly and never fill a default again. The manifest parser
(kproxy.model) decides the values; these builders decide the shape and order:

    pod_object(metadata("web-1", "default", labels={"app": "web"}),
               pod_spec([container("web", ports=[container_port(8080)])], node_name="node1"))
    service_object(metadata("web", "shop"), [service_port(80, 8080, name="http")], cluster_ip="10.96.0.10")

The store adds uid, creationTimestamp and resourceVersion; the controllers add
allocations and status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from kproxy.store import Obj


def metadata(name: str, namespace: str, labels: Mapping[str, str] | None = None,
             annotations: Mapping[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


# --- Pods ------------------------------------------------------------------------------


def container_port(number: int, name: str = "", protocol: str = "TCP") -> Obj:
    return ({"name": name} if name else {}) | {"containerPort": number, "protocol": protocol}


def container(name: str, image: str = "", ports: Iterable[Obj] = ()) -> Obj:
    out: Obj = {"name": name}
    if image:
        out["image"] = image
    ports = list(ports)
    if ports:
        out["ports"] = ports
    return out


def pod_spec(containers: Iterable[Obj], node_name: str = "", node_selector: Mapping[str, str] | None = None,
             hostname: str = "", subdomain: str = "", grace_seconds: int | None = None) -> Obj:
    """hostname and subdomain: the pod's DNS name <hostname>.<subdomain>.<ns>.svc under a headless Service;
    grace_seconds: terminationGracePeriodSeconds, when given."""
    out: Obj = {"containers": list(containers)}
    if hostname:
        out["hostname"] = hostname
    if node_name:
        out["nodeName"] = node_name
    if node_selector:
        out["nodeSelector"] = dict(node_selector)
    if subdomain:
        out["subdomain"] = subdomain
    if grace_seconds is not None:
        out["terminationGracePeriodSeconds"] = grace_seconds
    return out


def pod_object(metadata: Obj, spec: Obj, status: Obj | None = None) -> Obj:
    """A v1 Pod as the store holds it, the one place Pods are built (from a manifest, a
    ReplicaSet's template or a lab topology); without status it is new: Pending."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec,
            "status": {"phase": "Pending"} if status is None else status}


# --- Services --------------------------------------------------------------------------


def service_port(port: int, target_port: int | str, protocol: str = "TCP", name: str = "",
                 node_port: int = 0) -> Obj:
    """One entry of spec.ports; target_port is a number or a container port's name,
    node_port 0 is none (yet: NodePort Services get one allocated by kproxy.controllers)."""
    out: Obj = {"name": name} if name else {}
    out |= {"port": port, "protocol": protocol, "targetPort": target_port}
    if node_port:
        out["nodePort"] = node_port
    return out


@dataclass(frozen=True)
class ExternalAccess:
    """How a Service is reached from outside the cluster, beyond its NodePorts (spec fields)."""

    external_ips: tuple[str, ...] = ()
    external_policy: str = ""  # spec.externalTrafficPolicy: "" (not externally accessible), Cluster, Local
    internal_policy: str = "Cluster"
    health_check_node_port: int = 0  # 0: to allocate (a LoadBalancer with Local policy) or none
    load_balancer_ip: str = ""
    source_ranges: tuple[str, ...] = ()
    allocate_node_ports: bool = True  # spec.allocateLoadBalancerNodePorts (LoadBalancer only)
    load_balancer_class: str = ""


def service_object(metadata: Obj, ports: Iterable[Obj], *, type_: str = "ClusterIP", cluster_ip: str = "",
                   selector: Mapping[str, str] | None = None, session_affinity: str = "None",
                   affinity_timeout_seconds: int = 0, access: ExternalAccess = ExternalAccess()) -> Obj:
    """A v1 Service (ClusterIP, NodePort or LoadBalancer; headless with cluster_ip "None"). cluster_ip ""
    is to allocate; an empty selector leaves its endpoints unmanaged; the timeout is written with
    ClientIP affinity only; status.loadBalancer stays empty until kproxy.controllers assigns an address."""
    spec: Obj = {}
    ports = list(ports)
    if cluster_ip:
        spec |= {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip]}
    if access.external_ips:
        spec["externalIPs"] = list(access.external_ips)
    if access.external_policy:
        spec["externalTrafficPolicy"] = access.external_policy
    if access.health_check_node_port:
        spec["healthCheckNodePort"] = access.health_check_node_port
    if type_ == "LoadBalancer":
        if access.load_balancer_ip:
            spec["loadBalancerIP"] = access.load_balancer_ip
        if access.source_ranges:
            spec["loadBalancerSourceRanges"] = list(access.source_ranges)
        spec["allocateLoadBalancerNodePorts"] = access.allocate_node_ports
        if access.load_balancer_class:
            spec["loadBalancerClass"] = access.load_balancer_class
    spec |= {"internalTrafficPolicy": access.internal_policy, "ipFamilies": ["IPv4"],
             "ipFamilyPolicy": "SingleStack"}
    if ports:  # a headless Service may have none
        spec["ports"] = list(ports)
    if selector:
        spec["selector"] = dict(selector)
    spec["sessionAffinity"] = session_affinity
    if session_affinity == "ClientIP":
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout_seconds}}
    spec["type"] = type_
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec,
            "status": {"loadBalancer": {}}}


def external_name_service_object(metadata: Obj, external_name: str, ports: Iterable[Obj]) -> Obj:
    """A v1 Service of type ExternalName: an alias for external_name in cluster DNS."""
    spec: Obj = {"externalName": external_name}
    ports = list(ports)
    if ports:
        spec["ports"] = list(ports)
    spec |= {"sessionAffinity": "None", "type": "ExternalName"}
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata, "spec": spec,
            "status": {"loadBalancer": {}}}


# --- Deployments -----------------------------------------------------------------------


def deployment_object(metadata: Obj, *, selector: Obj, template_labels: Mapping[str, str],
                      template_annotations: Mapping[str, str] | None, template_spec: Obj,
                      replicas: int = 1, strategy: str = "RollingUpdate") -> Obj:
    """An apps/v1 Deployment; selector is a LabelSelector (matchLabels, matchExpressions),
    strategy RollingUpdate (with Kubernetes' default 25% surge and unavailability) or Recreate."""
    tmeta: Obj = {"labels": dict(template_labels)}
    if template_annotations:
        tmeta["annotations"] = dict(template_annotations)
    strategy_: dict[str, Any] = {"type": strategy}
    if strategy == "RollingUpdate":
        strategy_["rollingUpdate"] = {"maxSurge": "25%", "maxUnavailable": "25%"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata,
            "spec": {"replicas": replicas, "selector": selector, "strategy": strategy_,
                     "template": {"metadata": tmeta, "spec": template_spec}},
            "status": {}}
