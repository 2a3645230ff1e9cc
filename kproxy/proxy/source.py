"""ProxyState from the store: Services and EndpointSlices, as kube-proxy reads them."""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Hashable, Iterable

from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ServiceInfo = Callable[[dict[str, Any]], Hashable]
TRIGGER_TIME_ANNOTATION = "endpoints.kubernetes.io/last-change-trigger-time"
EXTERNAL_TYPES = ("NodePort", "LoadBalancer")  # the types with NodePorts (and an external traffic policy)


def source_ranges(given: Iterable[str]) -> tuple[str, ...]:
    """loadBalancerSourceRanges as kube-proxy reads them: blanks trimmed, host bits cleared,
    unparsable or IPv6 ones left out."""
    out = []
    for text in given:
        try:
            network = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            continue
        if network.version == 4:
            out.append(str(network))
    return tuple(out)


def has_cluster_ip(service: dict[str, Any]) -> bool:
    """Whether the Service has an address of its own: not headless (clusterIP None), not ExternalName."""
    return service["spec"].get("clusterIP") not in (None, "", "None")


def service_ports(service: dict[str, Any], service_info: ServiceInfo | None = None) -> list[ServicePort]:
    """The Service's ports, none for a Service without a ClusterIP (kube-proxy skips those too);
    service_info: what the proxy mode reads from a Service of its own (Mode.service_info), kept
    in each port's mode_info."""
    meta, spec = service["metadata"], service["spec"]
    if not has_cluster_ip(service):
        return []
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        affinity = int(spec["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"])
    mode_info = service_info(service) if service_info is not None else None
    external = spec.get("type") in EXTERNAL_TYPES
    load_balancer_ips = tuple(ingress["ip"] for ingress in
                              (service.get("status", {}).get("loadBalancer", {}).get("ingress") or ())
                              if ingress.get("ip")) if spec.get("type") == "LoadBalancer" else ()
    external_ips = tuple(spec.get("externalIPs") or ())
    ranges = source_ranges(spec.get("loadBalancerSourceRanges") or ()) if load_balancer_ips else ()
    ports = []
    for port in spec.get("ports", []):
        node_port = int(port.get("nodePort") or 0) if external else 0
        ports.append(ServicePort(
            namespace=meta["namespace"],
            name=meta["name"],
            port_name=port.get("name") or "",
            protocol=port["protocol"],
            cluster_ip=spec["clusterIP"],
            port=int(port["port"]),
            node_port=node_port,
            affinity_seconds=affinity,
            external_ips=external_ips,
            load_balancer_ips=load_balancer_ips,
            source_ranges=ranges,
            external_policy_local=(spec.get("externalTrafficPolicy") == "Local"
                                   and bool(node_port or external_ips or load_balancer_ips)),
            internal_policy_local=spec.get("internalTrafficPolicy") == "Local",
            health_check_node_port=int(spec.get("healthCheckNodePort") or 0),
            mode_info=mode_info,
        ))
    return ports


def _owner(slice_: dict[str, Any]) -> tuple[str, str] | None:
    meta = slice_["metadata"]
    owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
    return (meta["namespace"], owner) if owner else None


def _service_state(service: dict[str, Any], slices: Iterable[dict[str, Any]],
                   service_info: ServiceInfo | None) -> list[tuple[ServicePort, list[Endpoint]]]:
    """One Service's ports, each with its endpoints from the Service's EndpointSlices."""
    out = []
    for svc in service_ports(service, service_info):
        endpoints: dict[str, Endpoint] = {}
        for slice_ in slices:
            for port in slice_.get("ports") or ():
                if port["name"] == svc.port_name and port["protocol"] == svc.protocol:
                    target = int(port["port"])
                    break
            else:
                continue
            for ep in slice_.get("endpoints") or ():
                conditions = ep.get("conditions") or {}
                ready = bool(conditions.get("ready", True))
                terminating = bool(conditions.get("terminating", False))
                serving = bool(conditions.get("serving", True))  # unset: serving, as kube-proxy reads it
                node = ep.get("nodeName", "")
                for ip in ep.get("addresses") or ():
                    endpoint = Endpoint(ip, target, node, ready, terminating, serving)
                    endpoints[endpoint.address] = endpoint
        out.append((svc, sorted(endpoints.values(), key=_endpoint_order)))
    return out


def _endpoint_order(endpoint: Endpoint) -> tuple[str, int]:
    return endpoint.ip, endpoint.port


def proxy_state(services: Iterable[dict[str, Any]], slices: Iterable[dict[str, Any]],
                service_info: ServiceInfo | None = None) -> ProxyState:
    by_service: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for slice_ in slices:
        owner = _owner(slice_)
        if owner:
            by_service.setdefault(owner, []).append(slice_)
    ports: list[ServicePort] = []
    endpoints: dict[str, list[Endpoint]] = {}
    for service in services:
        meta = service["metadata"]
        for svc, eps in _service_state(service, by_service.get((meta["namespace"], meta["name"]), []), service_info):
            ports.append(svc)
            endpoints[svc.key] = eps
    return ProxyState(sorted(ports, key=lambda s: s.key), endpoints)


class StateTracker:
    """The ProxyState of a store, kept up to date from the keys that changed.

    Like kube-proxy's service and endpoints change trackers: a change re-derives
    only the Services whose Service object or EndpointSlices changed, and every
    other ServicePort and endpoint list stays the very same object, so a proxy
    mode can tell what changed by identity (the iptables mode re-renders only those).
    """

    def __init__(self, service_info: ServiceInfo | None = None) -> None:
        self._service_info = service_info  # the proxy mode's (Mode.service_info)
        self._services: dict[tuple[str, str], dict[str, Any]] = {}
        self._slices: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}  # owner -> slice key -> slice
        self._slice_owner: dict[str, tuple[str, str]] = {}
        self._ports: dict[tuple[str, str], list[tuple[ServicePort, list[Endpoint]]]] = {}
        self._endpoints: dict[str, list[Endpoint]] = {}  # of every port in _ports, by key
        self._order: tuple[ServicePort, ...] | None = None
        self._generation = 0

    def update(self, objects: dict[str, dict[str, Any]], changed: Iterable[str] | None = None) -> ProxyState:
        """The state after `changed` keys of `objects` changed (None, or the first update:
        everything may have)."""
        full = changed is None or self._generation == 0
        dirty = self._reindex(objects) if full else self._note(objects, changed or ())
        touched: set[str] = set()
        for owner in dirty:
            service = self._services.get(owner)
            before_ports = self._ports.pop(owner, None)
            for svc, _ in before_ports or ():
                touched.add(svc.key)
                del self._endpoints[svc.key]
            if service is None:
                self._order = None
                continue
            owned = self._slices.get(owner)
            slices = [owned[key] for key in sorted(owned)] if owned else []
            ports = _service_state(service, slices, self._service_info)
            if before_ports:
                previous = {svc.key: (svc, eps) for svc, eps in before_ports}
                for i, (svc, eps) in enumerate(ports):
                    old_svc, old_eps = previous.get(svc.key, (None, None))
                    if svc != old_svc:
                        self._order = None
                    ports[i] = (old_svc if svc == old_svc else svc, old_eps if eps == old_eps else eps)
            if len(ports) != len(before_ports or ()):
                self._order = None
            self._ports[owner] = ports
            for svc, eps in ports:
                self._endpoints[svc.key] = eps
            if not full:
                touched.update(svc.key for svc, _ in ports)
        if self._order is None:
            self._order = tuple(sorted((svc for ports in self._ports.values() for svc, _ in ports), key=_port_key))
        self._generation += 1
        # The same tuple while no service port comes or goes: a mode may reuse what it derived from it.
        # The endpoints map is copied (one C-level copy, not a walk over every Service per change).
        return ProxyState(services=self._order, endpoints=dict(self._endpoints),
                          generation=self._generation, changed=None if full else frozenset(touched))

    def _reindex(self, objects: dict[str, dict[str, Any]]) -> set[tuple[str, str]]:
        """Index every Service and EndpointSlice afresh; all Services, new and gone, are dirty."""
        dirty = set(self._services)
        self._services, self._slices, self._slice_owner = {}, {}, {}
        for key, obj in objects.items():
            if key.startswith("Service/"):
                namespace, _, name = key[len("Service/"):].partition("/")
                self._services[(namespace, name)] = obj
            elif key.startswith("EndpointSlice/"):
                owner = _owner(obj)
                if owner is not None:
                    self._slice_owner[key] = owner
                    self._slices.setdefault(owner, {})[key] = obj
        dirty.update(self._services)
        return dirty

    def _note(self, objects: dict[str, dict[str, Any]], changed: Iterable[str]) -> set[tuple[str, str]]:
        """Update the index for the changed keys; the Services they touch are dirty."""
        dirty: set[tuple[str, str]] = set()
        for key in changed:
            kind, _, rest = key.partition("/")
            obj = objects.get(key)
            if kind == "Service":
                namespace, _, name = rest.partition("/")
                dirty.add((namespace, name))
                if obj is None:
                    self._services.pop((namespace, name), None)
                else:
                    self._services[(namespace, name)] = obj
            elif kind == "EndpointSlice":
                before = self._slice_owner.pop(key, None)
                if before is not None:
                    self._slices[before].pop(key, None)
                    dirty.add(before)
                owner = _owner(obj) if obj is not None else None
                if owner is not None:
                    self._slice_owner[key] = owner
                    self._slices.setdefault(owner, {})[key] = obj
                    dirty.add(owner)
        return dirty


def _port_key(svc: ServicePort) -> str:
    return svc.key


def node_info(node: dict[str, Any], cluster_cidr: str, service_cidr: str = "") -> NodeInfo:
    """The proxy's view of a Node object: its name and InternalIP, with the cluster's CIDRs."""
    addresses = node.get("status", {}).get("addresses", [])
    ip = next((a["address"] for a in addresses if a.get("type") == "InternalIP"), "")
    return NodeInfo(node["metadata"]["name"], ip, cluster_cidr, service_cidr)
