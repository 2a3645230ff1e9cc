"""Which endpoints a node sends a service port's traffic to: kube-proxy's CategorizeEndpoints.

Every kernel mode asks this the same way, so Local traffic policies and the
terminating-endpoint fallback behave alike in all of them:

- the cluster endpoints (Cluster policies) are the ready ones anywhere, or,
  when none is ready, the ones that are terminating but still serving;
- the local endpoints (Local policies) are this node's ready ones, or, when
  none of its endpoints is ready, its serving terminating ones;
- the reachable ones are the union: the endpoints the node needs a chain (or
  a real server) for.

Endpoints come out deduplicated and sorted by their "ip:port" string, as
kube-proxy's EndpointsMap orders them. (No topology hints: kproxy's nodes
have no zones.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from kproxy.proxy.types import Endpoint, ServicePort


@dataclass(frozen=True)
class Categorized:
    cluster: tuple[Endpoint, ...] = ()  # for Cluster-policy traffic
    local: tuple[Endpoint, ...] = ()  # for Local-policy traffic: on this node
    reachable: tuple[Endpoint, ...] = ()  # either of them, in order
    has_any: bool = False  # any endpoint the service may use at all (ready or serving-terminating)

    @property
    def has_local(self) -> bool:
        return bool(self.local)

    def serves_internal(self, svc: ServicePort) -> bool:
        """An endpoint takes svc's ClusterIP traffic on this node (kube-proxy's hasInternalEndpoints)."""
        return self.has_any and (self.has_local or not svc.internal_policy_local)

    def serves_external(self, svc: ServicePort) -> bool:
        """An endpoint takes svc's traffic from outside the cluster on this node (hasExternalEndpoints)."""
        return self.has_any and (self.has_local or not svc.external_policy_local)


NONE = Categorized()


def _ordered(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    by_address = {ep.address: ep for ep in endpoints}
    return tuple(by_address[a] for a in sorted(by_address))


def _fallback(endpoints: list[Endpoint]) -> list[Endpoint]:
    """The ready endpoints, or when none is, the terminating ones still serving."""
    ready = [ep for ep in endpoints if ep.ready]
    return ready or [ep for ep in endpoints if ep.serving and ep.terminating]


def categorize(endpoints: Iterable[Endpoint], svc: ServicePort, node: str) -> Categorized:
    """The endpoints of svc that node sends each kind of traffic to."""
    endpoints = list(endpoints)
    cluster: tuple[Endpoint, ...] = ()
    if svc.uses_cluster_endpoints:
        cluster = _ordered(_fallback(endpoints))
    if not svc.uses_local_endpoints:
        return Categorized(cluster, (), cluster, bool(cluster)) if cluster else NONE
    has_any = any(ep.ready or (ep.serving and ep.terminating) for ep in endpoints)
    local = _ordered(_fallback([ep for ep in endpoints if ep.node == node]))
    reachable = _ordered([*cluster, *local]) if cluster else local
    return Categorized(cluster, local, reachable, has_any)


def local_ready_count(endpoints: Iterable[Endpoint], node: str) -> int:
    """What kube-proxy's service health check reports as localEndpoints: this node's ready endpoints."""
    return len({ep.address for ep in endpoints if ep.ready and ep.node == node})
