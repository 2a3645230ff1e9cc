"""What a trace sends and where it listens, from SRC and DST against the lab (pure: no root)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from kproxy.errors import KproxyError
from kproxy.lab.state import NETNS_DIR, ns_name

Obj = dict[str, Any]
EXTERNAL = "external"
UNDERLAY = "underlay"


@dataclass(frozen=True)
class Member:
    name: str  # as the lab calls it: a pod, a node, external, underlay
    netns: str  # its namespace's name
    ip: str  # its address ("" for the underlay bridge's namespace)

    @property
    def netns_path(self) -> str:
        return str(NETNS_DIR / self.netns)


@dataclass(frozen=True)
class Flow:
    source: Member
    dst_ip: str
    dst_port: int
    protocol: str  # "tcp" or "udp"
    target: str  # what DST is, in words: "ClusterIP of default/web:80", "pod web-1", ...
    endpoints: tuple[str, ...]  # "ip:port" of what may answer: the Service's ready endpoints, or the pod
    nodes: tuple[Member, ...]  # every node: the tracers and the conntrack tables
    listeners: tuple[Member, ...]  # every namespace a recorder runs in


def members(info: Obj) -> dict[str, Member]:
    """The lab's members by name, from `kproxy lab status -o json`'s document."""
    found = {n["name"]: Member(n["name"], n["namespace"], n["ip"]) for n in info["nodes"]}
    found.update({p["name"]: Member(p["name"], p["netns"], p["ip"]) for p in info["pods"]})
    found[EXTERNAL] = Member(EXTERNAL, info["external"]["namespace"], info["external"]["ip"])
    found[UNDERLAY] = Member(UNDERLAY, ns_name(info["name"], UNDERLAY), "")
    return found


def _service_ports(service: Obj) -> list[Obj]:
    return list(service.get("spec", {}).get("ports") or [])


def _name(service: Obj) -> str:
    return f"{service['metadata']['namespace']}/{service['metadata']['name']}"


def _endpoints(service: Obj, port: Obj, slices: list[Obj]) -> tuple[str, ...]:
    """The ready endpoints of one service port, "ip:port", from the Service's EndpointSlices."""
    meta = service["metadata"]
    found = []
    for eps in slices:
        if eps["metadata"]["namespace"] != meta["namespace"] or \
                (eps["metadata"].get("labels") or {}).get("kubernetes.io/service-name") != meta["name"]:
            continue
        numbers = [p.get("port") for p in eps.get("ports") or [] if p.get("name", "") == port.get("name", "")]
        for endpoint in eps.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready", True) and numbers:
                found += [f"{address}:{numbers[0]}" for address in endpoint.get("addresses", [])]
    return tuple(sorted(found, key=lambda text: ipaddress.IPv4Address(text.split(":")[0])))


def _split_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise KproxyError(f"{what} {text!r}: expected IP:PORT or [NAMESPACE/]SERVICE:PORT")
    return host, int(port)


def resolve_destination(text: str, info: Obj, services: list[Obj], slices: list[Obj],
                        protocol: str | None) -> tuple[str, int, str, str, tuple[str, ...]]:
    """DST -> (ip, port, protocol, what it is, endpoints)."""
    host, port = _split_port(text, "DST")
    pods_by_ip = {p["ip"]: p["name"] for p in info["pods"]}

    def matching(service: Obj, field: str, value: int) -> Obj | None:
        for sp in _service_ports(service):
            if sp.get(field) == value and (protocol is None or sp.get("protocol", "TCP").lower() == protocol):
                return sp
        return None

    def found(service: Obj, sp: Obj, ip: str, number: int, what: str) -> tuple[str, int, str, str, tuple[str, ...]]:
        return (ip, number, sp.get("protocol", "TCP").lower(), f"{what} of {_name(service)}:{sp['port']}",
                _endpoints(service, sp, slices))

    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        namespace, _, name = host.rpartition("/")
        service = next((s for s in services if s["metadata"]["name"] == name
                        and s["metadata"]["namespace"] == (namespace or "default")), None)
        if service is None:
            raise KproxyError(f"DST {text!r}: no Service {namespace or 'default'}/{name} in lab {info['name']} "
                              f"(kproxy get svc --lab {info['name']} -A)") from None
        sp = matching(service, "port", port)
        cluster_ip = service.get("spec", {}).get("clusterIP", "None")
        if sp is None:
            have = ", ".join(f"{p['port']}/{p.get('protocol', 'TCP')}" for p in _service_ports(service)) or "none"
            wanted = f"{port}/{protocol.upper()}" if protocol else str(port)
            raise KproxyError(f"DST {text!r}: Service {_name(service)} has no port {wanted} (its ports: {have})")
        if cluster_ip in ("None", ""):
            raise KproxyError(f"DST {text!r}: Service {_name(service)} is headless (no ClusterIP): trace a pod's IP")
        return found(service, sp, cluster_ip, port, "ClusterIP")

    for service in services:
        spec = service.get("spec", {})
        if host == spec.get("clusterIP") and (sp := matching(service, "port", port)):
            return found(service, sp, host, port, "ClusterIP")
        ingress = [i.get("ip") for i in (service.get("status", {}).get("loadBalancer", {}).get("ingress") or [])]
        if host in ingress and (sp := matching(service, "port", port)):
            return found(service, sp, host, port, "load-balancer IP")
        if host in (spec.get("externalIPs") or []) and (sp := matching(service, "port", port)):
            return found(service, sp, host, port, "external IP")
    node = next((n for n in info["nodes"] if n["ip"] == host), None)
    if node is not None:
        for service in services:
            if sp := matching(service, "nodePort", port):
                return found(service, sp, host, port, f"NodePort {port} on {node['name']}")
    if host in pods_by_ip:
        return host, port, protocol or "tcp", f"pod {pods_by_ip[host]}", (f"{host}:{port}",)
    raise KproxyError(f"DST {text}: not a ClusterIP, external or load-balancer IP with that port, a node's "
                      f"NodePort or a pod of lab {info['name']} (kproxy get svc --lab {info['name']} -A)")


def plan(info: Obj, services: list[Obj], slices: list[Obj], src: str, dst: str, protocol: str | None) -> Flow:
    """The flow from SRC to DST in the lab described by info, its Services and EndpointSlices."""
    known = members(info)
    if src == UNDERLAY or src not in known:
        names = [n["name"] for n in info["nodes"]] + [p["name"] for p in info["pods"]] + [EXTERNAL]
        raise KproxyError(f"SRC {src!r}: lab {info['name']} has no such pod or node (it has: {', '.join(names)})")
    ip, port, proto, target, endpoints = resolve_destination(dst, info, services, slices, protocol)
    nodes = tuple(known[n["name"]] for n in info["nodes"])
    by_ip = {m.ip: m for m in known.values() if m.ip}
    answering = [by_ip[e.split(":")[0]] for e in endpoints if e.split(":")[0] in by_ip]
    listeners = [known[src], *nodes, known[UNDERLAY], *answering]
    return Flow(known[src], ip, port, proto, target, endpoints, nodes,
                tuple(dict.fromkeys(listeners)))
