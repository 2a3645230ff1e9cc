"""What every proxy mode sees: service ports, their endpoints, and the node.

This is the seam between the control plane (store, controllers) and the
proxy modes. Like kube-proxy's ServicePortInfo and Endpoint: one ServicePort
per (service, port), endpoints already resolved to pod IP and target port.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Hashable, Sequence


@dataclass(frozen=True)
class ServicePort:
    namespace: str
    name: str  # the Service's name
    port_name: str  # the port's name; "" when unnamed
    protocol: str  # "TCP" or "UDP"
    cluster_ip: str
    port: int
    node_port: int = 0  # 0: not a NodePort service
    affinity_seconds: int = 0  # ClientIP session affinity timeout; 0: no affinity
    # Where else the Service answers: spec.externalIPs, and status.loadBalancer.ingress[].ip.
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    # spec.loadBalancerSourceRanges as kube-proxy prints the parsed CIDRs ("a.b.c.d/n", host bits
    # cleared; kproxy.proxy.source normalises them): who may reach the load-balancer IPs; (): anyone.
    source_ranges: tuple[str, ...] = ()
    # Traffic policies, as kube-proxy reads them: external Local only for an externally
    # accessible port (NodePort, externalIPs or load-balancer IPs).
    external_policy_local: bool = False
    internal_policy_local: bool = False
    health_check_node_port: int = 0  # spec.healthCheckNodePort (a LoadBalancer with Local external policy)
    # What the mode read from the Service beyond these fields (its Mode.service_info), e.g.
    # IPVS mode's scheduler annotation; None for modes that read nothing more.
    mode_info: Hashable = None
    # Derived once (a sync at 10k services asks ~100k times), not compared:
    # kube-proxy's ServicePortName, "ns/name:port", or "ns/name" when the port is unnamed ...
    service_port_name: str = field(init=False, compare=False, repr=False)
    key: str = field(init=False, compare=False, repr=False)  # ... and it with the protocol

    def __post_init__(self) -> None:
        base = f"{self.namespace}/{self.name}"
        name = f"{base}:{self.port_name}" if self.port_name else base
        object.__setattr__(self, "service_port_name", name)
        object.__setattr__(self, "key", f"{name}/{self.protocol}")

    @property
    def externally_accessible(self) -> bool:
        """Reachable from outside the cluster: a NodePort, an external IP or a load-balancer IP."""
        return bool(self.node_port or self.external_ips or self.load_balancer_ips)

    def source_ranges_hold(self, ip: str) -> bool:
        """Whether a loadBalancerSourceRange holds ip (kube-proxy lets the node in then: its own
        connections to a load-balancer IP it has locally come back from that IP)."""
        return bool(ip) and any(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(cidr)
                                for cidr in self.source_ranges)

    @property
    def uses_cluster_endpoints(self) -> bool:
        """kube-proxy's UsesClusterEndpoints: Cluster internal policy, or any external traffic
        (a Local external policy still short-circuits in-cluster clients to every endpoint)."""
        return not self.internal_policy_local or self.externally_accessible

    @property
    def uses_local_endpoints(self) -> bool:
        """kube-proxy's UsesLocalEndpoints: a Local policy applies to some of its traffic."""
        return self.internal_policy_local or self.external_policy_local


def names_service_port(service: str, service_port_name: str) -> bool:
    """Whether service, as `kproxy rules --service` takes it ("ns/name" or "ns/name:port"),
    names the service port called service_port_name ("ns/name:port", or "ns/name")."""
    return service_port_name == service or service_port_name.split(":")[0] == service


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int
    node: str  # the node the pod runs on
    ready: bool = True
    terminating: bool = False
    serving: bool = True  # answers (ready, or terminating but still serving)
    address: str = field(init=False, compare=False, repr=False)  # "ip:port", derived once

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.ip}:{self.port}")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    ip: str  # the node's InternalIP (eth0 on the underlay)
    cluster_cidr: str  # kube-proxy's --cluster-cidr: traffic from outside it to a ClusterIP is masqueraded
    # The service CIDR (kube-proxy's ServiceCIDRs): nftables mode drops traffic to its unallocated addresses; "": none.
    service_cidr: str = ""
    # kube-proxy's --nodeport-addresses (CIDRs, or "primary"): where NodePorts answer; (): every local address.
    node_port_addresses: tuple[str, ...] = ()
    # kube-proxy's --masquerade-all: SNAT all traffic to a ClusterIP, not only off-cluster traffic.
    masquerade_all: bool = False

    def node_port_ips(self) -> tuple[str, ...] | None:
        """The node IPs NodePorts answer on by node_port_addresses (CIDRs, or "primary" for the
        node IP); None when it is empty: every local address."""
        if not self.node_port_addresses:
            return None
        ip = ipaddress.IPv4Address(self.ip) if self.ip else None
        wanted = any(ip is not None and (given == "primary" or ip in ipaddress.IPv4Network(given, strict=False))
                     for given in self.node_port_addresses)
        return (self.ip,) if wanted else ()


@dataclass
class ProxyState:
    """Desired state for one sync: every service port and its endpoints (by ServicePort.key)."""

    services: Sequence[ServicePort] = field(default_factory=list)  # sorted by key
    endpoints: dict[str, list[Endpoint]] = field(default_factory=dict)
    # From a StateTracker: its update count, and the keys of the service ports that may
    # differ from its previous state (None: any may). A mode may use them to look only there.
    generation: int = 0
    changed: frozenset[str] | None = None

    def endpoints_of(self, svc: ServicePort) -> list[Endpoint]:
        return self.endpoints.get(svc.key, [])


@dataclass
class SyncResult:
    full: bool  # a full resync (as opposed to a partial one)
    changed_services: int = 0  # service ports whose programming in the kernel this sync changed
    seconds: float = 0.0
