"""What every proxy mode sees: service ports, their endpoints, and the node.

This is the seam between the control plane (store, controllers) and the
proxy modes. Like kube-proxy's ServicePortInfo and Endpoint: one ServicePort
per (service, port), endpoints already resolved to pod IP and target port.
"""

from __future__ import annotations

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
