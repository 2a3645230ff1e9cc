"""The objects kube-proxy's nftables mode writes: the shared ones (``shared_objects``) and
each service port's (``service_objects``), in kube-proxy's spelling (pure, no root).

A service port's chains follow kube-proxy's syncProxyRules: ``service-`` (Cluster policy:
every node's endpoints), ``local-`` (Local policy: this node's), ``external-`` (NodePort,
external IP and load-balancer IP traffic: masquerade, or Local policy's short-circuits,
then a policy chain), ``firewall-`` (loadBalancerSourceRanges), ``endpoint-`` per endpoint;
its addresses are elements of ``service-ips`` / ``service-nodeports`` / ``firewall-ips``, and
of ``no-endpoint-services`` / ``no-endpoint-nodeports`` where nothing serves them.

Endpoint choice is kube-proxy's ``numgen random mod N vmap { 0 : goto ..., ... }``, or,
with ``cascade``, one rule per endpoint (``numgen random mod N-i 0 goto ...``, the last a
plain ``goto``): the same uniform choice without an anonymous set per service, which the
kernel names by scanning every set of the table (docs/nftables.md has the measurements).
With ``counters`` every rule of a service's chains counts its packets (kube-proxy writes
no counters; `kproxy rules` shows them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kproxy.proxy.netfilter import MASQ_MARK
from kproxy.proxy.nftables import names as n
from kproxy.proxy.topology import Categorized
from kproxy.proxy.types import Endpoint, NodeInfo, ServicePort

NO_LOCALHOST = "127.0.0.0/8"  # kube-proxy's nftables mode never serves NodePorts on localhost


class Element(NamedTuple):
    """An element of a set or map, as `nft` spells it between braces."""

    key: str  # "172.30.0.41 . tcp . 80"
    value: str = ""  # a map's verdict, "goto service-..."; "" in a set
    comment: str = ""

    def text(self) -> str:
        comment = f' comment "{self.comment}"' if self.comment else ""
        value = f" : {self.value}" if self.value else ""
        return f"{self.key}{comment}{value}"


@dataclass(frozen=True)
class SetSpec:
    kind: str  # "set" or "map"
    spec: str  # what follows the name in `add set`/`add map`, "{ type ... ; }"


@dataclass(frozen=True)
class ServiceObjects:
    """What one service port owns, and where its elements go."""

    owner: str  # kube-proxy's servicePortName, "ns/name:port"
    cluster_ip: str  # its element of the cluster-ips set (shared by the ports of one Service)
    chains: dict[str, tuple[str, ...]]  # chain -> its rules, in order
    sets: dict[str, SetSpec]  # the affinity sets
    elements: tuple[tuple[str, Element], ...]  # (map, element)


@dataclass(frozen=True)
class SharedObjects:
    """What every node has whatever its services: base and helper chains, sets and maps."""

    chains: dict[str, tuple[str, ...]]
    specs: dict[str, str]  # chain -> "{ type nat hook output priority -100 ; }", or "" for a regular chain
    sets: dict[str, SetSpec]
    elements: dict[str, tuple[Element, ...]]  # nodeport-ips


def _set(comment: str) -> SetSpec:
    return SetSpec("set", f'{{ type ipv4_addr ; comment "{comment}" ; }}')


def _map(key: str, comment: str) -> SetSpec:
    return SetSpec("map", f'{{ type {key} : verdict ; comment "{comment}" ; }}')


ADDRESS_KEY = "ipv4_addr . inet_proto . inet_service"
PORT_KEY = "inet_proto . inet_service"

SHARED_SETS = {
    n.CLUSTER_IPS: _set("Active ClusterIPs"),
    n.NODEPORT_IPS: _set("IPs that accept NodePort traffic"),
    n.FIREWALL_IPS: _map(ADDRESS_KEY, "destinations that are subject to LoadBalancerSourceRanges"),
    n.NO_ENDPOINT_NODEPORTS: _map(PORT_KEY, "vmap to drop or reject packets to service nodeports with no endpoints"),
    n.NO_ENDPOINT_SERVICES: _map(ADDRESS_KEY, "vmap to drop or reject packets to services with no endpoints"),
    n.SERVICE_IPS: _map(ADDRESS_KEY, "ClusterIP, ExternalIP and LoadBalancer IP traffic"),
    n.SERVICE_NODEPORTS: _map(PORT_KEY, "NodePort traffic"),
}

# (chain, jump target, match): the jumps from the base chains, in kube-proxy's order
JUMPS = (
    ("filter-input", n.NODEPORT_ENDPOINTS_CHECK, "ct state new"),
    ("filter-input", n.SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-forward", n.SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-output", n.SERVICE_ENDPOINTS_CHECK, "ct state new"),
    ("filter-prerouting", n.FIREWALL_CHECK, "ct state new"),
    ("filter-output", n.FIREWALL_CHECK, "ct state new"),
    ("nat-output", n.SERVICES, ""),
    ("nat-prerouting", n.SERVICES, ""),
    ("nat-postrouting", n.MASQUERADING, ""),
    ("filter-forward", n.CLUSTER_IPS_CHECK, "ct state new"),
    ("filter-output-post-dnat", n.CLUSTER_IPS_CHECK, "ct state new"),
)


def shared_objects(node: NodeInfo) -> SharedObjects:
    specs = {name: f"{{ type {kind} hook {hook} priority {priority} ; }}"
             for name, kind, hook, priority in n.BASE_CHAINS}
    chains: dict[str, list[str]] = {name: [] for name in specs}
    for name in (n.CLUSTER_IPS_CHECK, n.FIREWALL_CHECK, n.MARK_FOR_MASQUERADE, n.MASQUERADING,
                 n.NODEPORT_ENDPOINTS_CHECK, n.REJECT_CHAIN, n.SERVICE_ENDPOINTS_CHECK, n.SERVICES):
        chains[name] = []
        specs[name] = ""
    specs[n.REJECT_CHAIN] = '{ comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }'
    for chain, target, match in JUMPS:
        chains[chain].append(f"{match} jump {target}".lstrip())
    chains[n.CLUSTER_IPS_CHECK].append(
        f'ip daddr @{n.CLUSTER_IPS} reject comment "Reject traffic to invalid ports of ClusterIPs"')
    if node.service_cidr:
        chains[n.CLUSTER_IPS_CHECK].append(
            f'ip daddr {{ {node.service_cidr} }} drop comment "Drop traffic to unallocated ClusterIPs"')
    chains[n.FIREWALL_CHECK].append(f"ip daddr . meta l4proto . th dport vmap @{n.FIREWALL_IPS}")
    chains[n.MARK_FOR_MASQUERADE].append(f"mark set mark or {MASQ_MARK}")
    chains[n.MASQUERADING] += [f"mark and {MASQ_MARK} == 0 return", f"mark set mark xor {MASQ_MARK}",
                               "masquerade fully-random"]
    chains[n.REJECT_CHAIN].append("reject")
    chains[n.SERVICE_ENDPOINTS_CHECK].append(f"ip daddr . meta l4proto . th dport vmap @{n.NO_ENDPOINT_SERVICES}")
    chains[n.SERVICES].append(f"ip daddr . meta l4proto . th dport vmap @{n.SERVICE_IPS}")
    addresses = node.node_port_ips()
    local = (f"fib daddr type local ip daddr != {NO_LOCALHOST}" if addresses is None
             else f"ip daddr @{n.NODEPORT_IPS}")
    chains[n.NODEPORT_ENDPOINTS_CHECK].append(f"{local} meta l4proto . th dport vmap @{n.NO_ENDPOINT_NODEPORTS}")
    chains[n.SERVICES].append(f"{local} meta l4proto . th dport vmap @{n.SERVICE_NODEPORTS}")
    elements = {n.NODEPORT_IPS: tuple(Element(ip) for ip in addresses or ())}
    return SharedObjects({name: tuple(rules) for name, rules in chains.items()}, specs, dict(SHARED_SETS), elements)


def _rule(match: str, action: str, counters: bool, comment: str = "") -> str:
    """match then action (and kube-proxy's comment), with a counter before the action when counting."""
    if counters:
        action = f"counter {action}"
    rule = f"{match} {action}" if match else action
    return f'{rule} comment "{comment}"' if comment else rule


class _Paths(NamedTuple):
    """Where one service port's traffic goes, decided as kube-proxy's syncProxyRules decides it.
    (A NamedTuple: one is built per service port per render, and a frozen dataclass's
    __init__ costs several times more.)"""

    cluster: str  # the Cluster-policy chain (service-...)
    local: str  # the Local-policy chain (local-...)
    external: str  # the chain of external traffic (external-...)
    firewall: str  # the loadBalancerSourceRanges chain (firewall-...)
    uses_cluster: bool  # the chains exist: they have endpoints and some traffic uses them
    uses_local: bool
    internal: str  # the policy chain ClusterIP traffic goes to ...
    has_internal: bool  # ... if it has endpoints for it (else no-endpoint-services)
    external_policy: str  # the policy chain the external chain ends in ...
    has_external: bool  # ... if it has endpoints for it
    uses_external: bool  # the external chain exists (also without external endpoints: short-circuits)
    uses_firewall: bool
    # The no-endpoint maps' verdict for what is not served: reject when the service has no
    # endpoints at all (the client learns at once), drop when a Local policy finds none here.
    refusal: str


def _paths(svc: ServicePort, eps: Categorized) -> _Paths:
    base = n.service_base(svc)
    cluster, local = n.service_chain(base), n.local_chain(base)
    return _Paths(
        cluster=cluster, local=local, external=n.external_chain(base), firewall=n.firewall_chain(base),
        uses_cluster=bool(eps.cluster) and svc.uses_cluster_endpoints,
        uses_local=eps.has_local and svc.uses_local_endpoints,
        internal=local if svc.internal_policy_local else cluster,
        has_internal=eps.serves_internal(svc),
        external_policy=local if svc.external_policy_local else cluster,
        has_external=eps.serves_external(svc),
        uses_external=eps.has_any and svc.externally_accessible,
        uses_firewall=bool(svc.load_balancer_ips and svc.source_ranges),
        refusal="drop" if eps.has_any else f"goto {n.REJECT_CHAIN}")


def service_objects(svc: ServicePort, eps: Categorized, node: NodeInfo, *,
                    cascade: bool = False, counters: bool = False) -> ServiceObjects:
    """One service port's chains, affinity sets and map elements; eps: its endpoints as this
    node categorizes them (kproxy.proxy.topology.categorize)."""
    paths = _paths(svc, eps)
    proto = svc.protocol.lower()
    chains: dict[str, list[str]] = {}
    sets: dict[str, SetSpec] = {}
    elements = _elements(svc, paths)

    masquerade = _internal_masquerade(svc, node, counters)
    if paths.has_internal and masquerade:
        chains[paths.internal] = masquerade
    if paths.uses_external:
        chains[paths.external] = _external_rules(svc, paths, node, counters)
    if paths.uses_firewall:
        chains[paths.firewall] = [_firewall_rule(svc, node, counters)]
    bases = {ep.address: n.endpoint_base(svc, ep) for ep in eps.reachable}
    if svc.affinity_seconds:
        sets.update((n.affinity_set(b), SetSpec("set", f"{{ type ipv4_addr ; flags dynamic,timeout ; "
                                                       f"timeout {svc.affinity_seconds}s ; }}"))
                    for b in bases.values())
    for used, chain, endpoints in ((paths.uses_cluster, paths.cluster, eps.cluster),
                                   (paths.uses_local, paths.local, eps.local)):
        if used:
            chains.setdefault(chain, []).extend(
                _to_endpoints(svc, [bases[ep.address] for ep in endpoints], cascade, counters))
    for ep in eps.reachable:
        chains[n.endpoint_chain(bases[ep.address])] = _endpoint_rules(svc, ep, bases[ep.address], proto, counters)
    return ServiceObjects(svc.service_port_name, svc.cluster_ip,
                          {name: tuple(rules) for name, rules in chains.items()}, sets, elements)


def _elements(svc: ServicePort, paths: _Paths) -> tuple[tuple[str, Element], ...]:
    """The service port's elements of the shared maps: its addresses to its chains, and, where
    nothing serves them, to the no-endpoint verdict (with the servicePortName as comment)."""
    proto = svc.protocol.lower()
    out: list[tuple[str, Element]] = []

    def to(where: str, key: str, chain: str) -> None:
        out.append((where, Element(key, f"goto {chain}")))

    def refuse(where: str, key: str) -> None:
        out.append((where, Element(key, paths.refusal, svc.service_port_name)))

    cluster_ip = f"{svc.cluster_ip} . {proto} . {svc.port}"
    if paths.has_internal:
        to(n.SERVICE_IPS, cluster_ip, paths.internal)
    else:
        refuse(n.NO_ENDPOINT_SERVICES, cluster_ip)
    # External traffic goes to the external chain whenever the service has endpoints anywhere
    # (for its short-circuits); what gets past them is dropped when this node has none.
    for ip in (*svc.external_ips, *svc.load_balancer_ips):
        if paths.uses_external:
            to(n.SERVICE_IPS, f"{ip} . {proto} . {svc.port}", paths.external)
        if not paths.has_external:
            refuse(n.NO_ENDPOINT_SERVICES, f"{ip} . {proto} . {svc.port}")
    if paths.uses_firewall:
        for ip in svc.load_balancer_ips:
            to(n.FIREWALL_IPS, f"{ip} . {proto} . {svc.port}", paths.firewall)
    if svc.node_port:  # not subject to loadBalancerSourceRanges, as in kube-proxy
        if paths.uses_external:
            to(n.SERVICE_NODEPORTS, f"{proto} . {svc.node_port}", paths.external)
        if not paths.has_external:
            refuse(n.NO_ENDPOINT_NODEPORTS, f"{proto} . {svc.node_port}")
    return tuple(out)


def _internal_masquerade(svc: ServicePort, node: NodeInfo, counters: bool) -> list[str]:
    """ClusterIP traffic to masquerade: all of it with --masquerade-all, else what comes from
    outside the cluster CIDR (it may have been routed here and leave to another node)."""
    match = f"ip daddr {svc.cluster_ip} {svc.protocol.lower()} dport {svc.port}"
    if node.masquerade_all:
        return [_rule(match, f"jump {n.MARK_FOR_MASQUERADE}", counters)]
    if node.cluster_cidr:
        return [_rule(f"{match} ip saddr != {node.cluster_cidr}", f"jump {n.MARK_FOR_MASQUERADE}", counters)]
    return []


def _external_rules(svc: ServicePort, paths: _Paths, node: NodeInfo, counters: bool) -> list[str]:
    """Cluster policy: masquerade (the endpoint may be on another node). Local policy: keep the
    client's address, but send pods (by the cluster CIDR) and the node itself to every
    endpoint, as if they had gone out to the load balancer and come back."""
    mark = f"jump {n.MARK_FOR_MASQUERADE}"
    if not svc.external_policy_local:
        rules = [_rule("", mark, counters)]
    else:
        rules = [_rule(f"ip saddr {node.cluster_cidr}", f"goto {paths.cluster}", counters,
                       "short-circuit pod traffic")] if node.cluster_cidr else []
        rules += [_rule("fib saddr type local", mark, counters, "masquerade local traffic"),
                  _rule("fib saddr type local", f"goto {paths.cluster}", counters, "short-circuit local traffic")]
    if paths.has_external:
        rules.append(_rule("", f"goto {paths.external_policy}", counters))
    return rules


def _firewall_rule(svc: ServicePort, node: NodeInfo, counters: bool) -> str:
    """Drop sources outside loadBalancerSourceRanges. When the ranges hold the node's IP, the
    load-balancer IPs are allowed too: a node reaching an LB IP it has as a local address
    comes back with that IP as its source."""
    sources = list(svc.source_ranges)
    if svc.source_ranges_hold(node.ip):
        sources += svc.load_balancer_ips
    return _rule(f"ip saddr != {{ {' , '.join(sources)} }}", "drop", counters)


def _to_endpoints(svc: ServicePort, bases: list[str], cascade: bool, counters: bool) -> list[str]:
    """A policy chain's rules after its masquerade: a remembered client to its endpoint
    (ClientIP affinity), then the choice of one endpoint."""
    targets = [n.endpoint_chain(b) for b in bases]
    rules = [_rule(f"ip saddr @{n.affinity_set(b)}", f"goto {target}", counters)
             for b, target in zip(bases, targets)] if svc.affinity_seconds else []
    return rules + _choose(targets, cascade, counters)


def _endpoint_rules(svc: ServicePort, ep: Endpoint, base: str, proto: str, counters: bool) -> list[str]:
    rules = [_rule(f"ip saddr {ep.ip}", f"jump {n.MARK_FOR_MASQUERADE}", counters)]  # hairpin
    if svc.affinity_seconds:
        rules.append(_rule("", f"update @{n.affinity_set(base)} {{ ip saddr }}", counters))
    rules.append(_rule(f"meta l4proto {proto}", f"dnat to {ep.ip}:{ep.port}", counters))
    return rules


def _choose(targets: list[str], cascade: bool, counters: bool) -> list[str]:
    """The rules that pick one endpoint chain uniformly at random."""
    if not cascade:
        arms = " , ".join(f"{i} : goto {target}" for i, target in enumerate(targets))
        return [_rule("", f"numgen random mod {len(targets)} vmap {{ {arms} }}", counters)]
    last = len(targets) - 1
    return [_rule(f"numgen random mod {len(targets) - i} 0", f"goto {target}", counters) if i < last
            else _rule("", f"goto {target}", counters) for i, target in enumerate(targets)]
