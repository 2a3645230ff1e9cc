"""The rule lines themselves, in kube-proxy's spelling: one service port's, and the shared chains'.

What kube-proxy's syncProxyRules writes (1.28+ layout), as the ``iptables-restore``
input it generates, so ``iptables-save`` of our namespace reads like a real node's.

A service port's traffic takes one of two ways in:

- internal, to its ClusterIP: KUBE-SERVICES jumps to KUBE-SVC- (all usable endpoints) or,
  with internalTrafficPolicy Local, to KUBE-SVL- (this node's);
- external, to its NodePort, external IPs and load-balancer IPs: KUBE-NODEPORTS / KUBE-SERVICES
  jump to KUBE-EXT- (a load-balancer IP with source ranges via KUBE-FW- first), which goes on
  to KUBE-SVC- or, with externalTrafficPolicy Local, to KUBE-SVL- after short-circuiting the
  traffic from this node and its pods to KUBE-SVC- (as if it had gone out to the load balancer
  and come back).

Each usable endpoint has its KUBE-SEP- (the DNAT). Traffic no endpoint takes is refused in
the filter table: REJECT when the service port has no usable endpoint at all, DROP when only
this node lacks one for a Local policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kproxy.proxy.iptables.names import (KUBE_EXTERNAL_SERVICES, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
                                         KUBELET_FIREWALL, ServiceChains, endpoint_chain_name,
                                         service_chain_names)
from kproxy.proxy.netfilter import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, comment, forward_rules,
                                    mark_masq_rules, postrouting_rules)
from kproxy.proxy.topology import Categorized
from kproxy.proxy.types import Endpoint, NodeInfo, ServicePort

Chains = dict[str, tuple[str, ...]]  # chain -> its rule lines ("-A CHAIN ..."), in order


@dataclass(frozen=True)
class ServiceRules:
    """What one service port adds to the ruleset: lines in the shared chains and chains of its own."""

    nat_services: tuple[str, ...] = ()  # its KUBE-SERVICES rules: cluster IP, external IPs, load-balancer IPs
    nat_nodeports: tuple[str, ...] = ()  # its KUBE-NODEPORTS rule
    filter_services: tuple[str, ...] = ()  # REJECT/DROP of its cluster IP while no endpoint takes it
    filter_external: tuple[str, ...] = ()  # the same for its external destinations
    filter_nodeports: tuple[str, ...] = ()  # ACCEPT of its health check node port
    filter_firewall: tuple[str, ...] = ()  # KUBE-PROXY-FIREWALL: DROP what its KUBE-FW- did not accept
    chains: Chains = field(default_factory=dict)  # its KUBE-EXT/FW/SVC/SVL/SEP chains

    def shared_lines(self) -> tuple[tuple[str, ...], ...]:
        """Its lines in the top-level chains (a change there means rewriting those)."""
        return (self.nat_services, self.nat_nodeports, self.filter_services, self.filter_external,
                self.filter_nodeports, self.filter_firewall)


def probability(n: int) -> str:
    """kube-proxy's computeProbability: 1/n as %0.10f."""
    return f"{1.0 / n:0.10f}"


def _svc_comment(large: bool, text: str) -> str:
    # kube-proxy's appendServiceCommentLocked: no per-endpoint comments in large clusters.
    return "" if large else f" -m comment --comment {comment(text)}"


@dataclass(frozen=True)
class _Route:
    """Where kube-proxy sends one service port's traffic on this node: syncProxyRules' decisions."""

    svc: ServicePort
    chains: ServiceChains
    ranges: tuple[str, ...]  # the source ranges, as kube-proxy prints them
    allow_from_node: bool  # a source range holds the node IP
    has_any: bool  # a usable endpoint anywhere: otherwise no nat rules at all, only REJECTs
    has_internal: bool  # an endpoint takes its ClusterIP traffic here
    has_external: bool  # an endpoint takes its external traffic from outside the cluster here

    @property
    def internal_chain(self) -> str:
        return self.chains.local if self.svc.internal_policy_local else self.chains.cluster

    @property
    def external_policy_chain(self) -> str:
        return self.chains.local if self.svc.external_policy_local else self.chains.cluster

    @property
    def uses_firewall(self) -> bool:
        return self.has_any and bool(self.svc.load_balancer_ips) and bool(self.ranges)

    @property
    def load_balancer_chain(self) -> str:
        return self.chains.firewall if self.uses_firewall else self.chains.external


def _route(svc: ServicePort, cat: Categorized, node: NodeInfo) -> _Route:
    return _Route(
        svc=svc, chains=service_chain_names(svc.service_port_name, svc.protocol),
        ranges=svc.source_ranges, allow_from_node=svc.source_ranges_hold(node.ip), has_any=cat.has_any,
        has_internal=cat.serves_internal(svc), has_external=cat.serves_external(svc))


def service_rules(svc: ServicePort, cat: Categorized, node: NodeInfo, large: bool) -> ServiceRules:
    """One service port's rules (cat: its endpoints, categorized for this node), as kube-proxy's
    syncProxyRules writes them for it."""
    route = _route(svc, cat, node)
    filter_services, filter_external = _refusals(route)
    return ServiceRules(
        nat_services=_captures(route), nat_nodeports=_nodeport_capture(route),
        filter_services=filter_services, filter_external=filter_external,
        filter_nodeports=_health_check(svc), filter_firewall=_firewall_drops(route),
        chains=_own_chains(route, cat, node, large) if route.has_any else {})


def _match(svc: ServicePort, ip: str) -> str:
    proto = svc.protocol.lower()
    return f"-m {proto} -p {proto} -d {ip} --dport {svc.port}"


def _cluster_ip_match(svc: ServicePort) -> str:
    return _match(svc, svc.cluster_ip)


def _captures(route: _Route) -> tuple[str, ...]:
    """KUBE-SERVICES: its cluster IP to the internal chain, its external and load-balancer IPs to
    the external one (or the firewall)."""
    svc, name = route.svc, route.svc.service_port_name
    out = []
    if route.has_internal:
        out.append(f"-A {KUBE_SERVICES} -m comment --comment {comment(f'{name} cluster IP')} "
                   f"{_cluster_ip_match(svc)} -j {route.internal_chain}")
    if route.has_any:
        out += [f"-A {KUBE_SERVICES} -m comment --comment {comment(f'{name} external IP')} {_match(svc, ip)} "
                f"-j {route.chains.external}" for ip in svc.external_ips]
        out += [f"-A {KUBE_SERVICES} -m comment --comment {comment(f'{name} loadbalancer IP')} {_match(svc, ip)} "
                f"-j {route.load_balancer_chain}" for ip in svc.load_balancer_ips]
    return tuple(out)


def _nodeport_capture(route: _Route) -> tuple[str, ...]:
    # NodePorts are not subject to loadBalancerSourceRanges (kube-proxy cannot change that now).
    svc = route.svc
    if not (route.has_any and svc.node_port):
        return ()
    proto = svc.protocol.lower()
    return (f"-A {KUBE_NODEPORTS} -m comment --comment {comment(svc.service_port_name)} "
            f"-m {proto} -p {proto} --dport {svc.node_port} -j {route.chains.external}",)


def _refusals(route: _Route) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """filter KUBE-SERVICES and KUBE-EXTERNAL-SERVICES: REJECT while the service port has no usable
    endpoint; DROP while a Local policy finds none on this node (external traffic from inside
    the cluster still gets through: the KUBE-EXT- short-circuits run first, in nat)."""
    svc, name = route.svc, route.svc.service_port_name
    if route.has_any:
        why, target = comment(f"{name} has no local endpoints"), "DROP"
    else:
        why, target = comment(f"{name} has no endpoints"), "REJECT"
    internal = () if route.has_internal else (
        f"-A {KUBE_SERVICES} -m comment --comment {why} {_cluster_ip_match(svc)} -j {target}",)
    if route.has_external:
        return internal, ()
    proto = svc.protocol.lower()
    external = [f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {why} {_match(svc, ip)} -j {target}"
                for ip in (*svc.external_ips, *svc.load_balancer_ips)]
    if svc.node_port:
        external.append(f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {why} -m addrtype --dst-type LOCAL "
                        f"-m {proto} -p {proto} --dport {svc.node_port} -j {target}")
    return internal, tuple(external)


def _health_check(svc: ServicePort) -> tuple[str, ...]:
    # Whether or not this node has endpoints: the health check itself says so, with 200 or 503.
    if not svc.health_check_node_port:
        return ()
    return (f"-A {KUBE_NODEPORTS} -m comment --comment {comment(f'{svc.service_port_name} health check node port')} "
            f"-m tcp -p tcp --dport {svc.health_check_node_port} -j ACCEPT",)


def _firewall_drops(route: _Route) -> tuple[str, ...]:
    """KUBE-PROXY-FIREWALL: a packet to a load-balancer IP that KUBE-FW- did not DNAT (its source
    is in no range) still has that destination in filter, and is dropped there."""
    if not route.uses_firewall:
        return ()
    svc, name = route.svc, route.svc.service_port_name
    why = comment(f"{name} traffic not accepted by {route.chains.firewall}")
    return tuple(f"-A {KUBE_PROXY_FIREWALL} -m comment --comment {why} {_match(svc, ip)} -j DROP"
                 for ip in svc.load_balancer_ips)


def _own_chains(route: _Route, cat: Categorized, node: NodeInfo, large: bool) -> Chains:
    """Its KUBE-EXT-, KUBE-FW-, KUBE-SVC-, KUBE-SVL- and KUBE-SEP- chains, in kube-proxy's order."""
    svc = route.svc
    chains: Chains = {}
    if svc.externally_accessible:
        chains[route.chains.external] = _external_chain(route, node)
    if route.uses_firewall:
        chains[route.chains.firewall] = _firewall_chain(route)
    seps = {ep.address: endpoint_chain_name(svc.service_port_name, svc.protocol, ep.address) for ep in cat.reachable}
    # categorize() leaves cluster (local) empty when no traffic of the service port uses it.
    for chain, endpoints in ((route.chains.cluster, cat.cluster), (route.chains.local, cat.local)):
        if endpoints:
            head = _cluster_ip_masquerade(route, node) if chain == route.internal_chain else ()
            chains[chain] = head + _dispatch(svc, chain, endpoints, seps, large)
    for ep in cat.reachable:
        chains[seps[ep.address]] = _endpoint_chain(svc, seps[ep.address], ep, large)
    return chains


def _cluster_ip_masquerade(route: _Route, node: NodeInfo) -> tuple[str, ...]:
    """The internal chain's first rule: masquerade off-cluster traffic to the ClusterIP (e.g. from
    the node itself, or routed in from outside: it may bounce off-node), or all of it with
    --masquerade-all. Without a cluster CIDR (no local-traffic detector) nothing is."""
    svc, chain = route.svc, route.internal_chain
    head = f"-A {chain} -m comment --comment {comment(f'{svc.service_port_name} cluster IP')} {_cluster_ip_match(svc)}"
    if node.masquerade_all:
        return (f"{head} -j {KUBE_MARK_MASQ}",)
    if node.cluster_cidr:
        return (f"{head} ! -s {node.cluster_cidr} -j {KUBE_MARK_MASQ}",)
    return ()


def _external_chain(route: _Route, node: NodeInfo) -> tuple[str, ...]:
    """KUBE-EXT-: Cluster policy masquerades (the endpoint may be on another node); Local keeps the
    client's address, except for traffic from this node's pods (to KUBE-SVC-, as if it went out to
    the load balancer and came back) and from the node itself (masqueraded: its source is a
    local address the endpoint could not answer)."""
    name, ext = route.svc.service_port_name, route.chains.external
    rules = []
    if not route.svc.external_policy_local:
        rules.append(f"-A {ext} -m comment --comment {comment(f'masquerade traffic for {name} external destinations')}"
                     f" -j {KUBE_MARK_MASQ}")
    else:
        if node.cluster_cidr:
            rules.append(f"-A {ext} -m comment --comment {comment(f'pod traffic for {name} external destinations')} "
                         f"-s {node.cluster_cidr} -j {route.chains.cluster}")
        rules.append(f"-A {ext} -m comment --comment "
                     f"{comment(f'masquerade LOCAL traffic for {name} external destinations')} "
                     f"-m addrtype --src-type LOCAL -j {KUBE_MARK_MASQ}")
        rules.append(f"-A {ext} -m comment --comment {comment(f'route LOCAL traffic for {name} external destinations')}"
                     f" -m addrtype --src-type LOCAL -j {route.chains.cluster}")
    if route.has_external:  # else the filter table DROPs what falls through
        rules.append(f"-A {ext} -j {route.external_policy_chain}")
    return tuple(rules)


def _firewall_chain(route: _Route) -> tuple[str, ...]:
    """KUBE-FW-: sources in loadBalancerSourceRanges go on to KUBE-EXT-; the rest fall through to
    KUBE-PROXY-FIREWALL's DROP. When a range holds the node IP, the load-balancer IPs themselves
    are let in too: a VIP-like load balancer's IP is often local, and a request from the node to
    it loops back with the VIP as its source (kube-proxy's allowFromNode)."""
    name, fw, ext = route.svc.service_port_name, route.chains.firewall, route.chains.external
    head = f"-A {fw} -m comment --comment {comment(f'{name} loadbalancer IP')}"
    rules = [f"{head} -s {cidr} -j {ext}" for cidr in route.ranges]
    if route.allow_from_node:
        rules += [f"{head} -s {ip} -j {ext}" for ip in route.svc.load_balancer_ips]
    rules.append(f"-A {fw} -m comment --comment "
                 f"{comment(f'other traffic to {name} will be dropped by KUBE-PROXY-FIREWALL')}")
    return tuple(rules)


def _dispatch(svc: ServicePort, chain: str, endpoints: Sequence[Endpoint], seps: dict[str, str],
              large: bool) -> tuple[str, ...]:
    """KUBE-SVC- / KUBE-SVL-: keep affinity, then pick an endpoint at random."""
    name = svc.service_port_name
    rules = []
    if svc.affinity_seconds:
        for ep in endpoints:
            sep = seps[ep.address]
            rules.append(f"-A {chain}{_svc_comment(large, f'{name} -> {ep.address}')} -m recent --name {sep} "
                         f"--rcheck --seconds {svc.affinity_seconds} --reap -j {sep}")
    n = len(endpoints)
    for i, ep in enumerate(endpoints):
        pick = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        rules.append(f"-A {chain}{_svc_comment(large, f'{name} -> {ep.address}')}{pick} -j {seps[ep.address]}")
    return tuple(rules)


def _endpoint_chain(svc: ServicePort, sep: str, ep: Endpoint, large: bool) -> tuple[str, ...]:
    """KUBE-SEP-: hairpin masquerade, then DNAT to the endpoint."""
    proto = svc.protocol.lower()
    head = f"-A {sep}{_svc_comment(large, svc.service_port_name)}"
    recent = f" -m recent --name {sep} --set" if svc.affinity_seconds else ""
    return (f"{head} -s {ep.ip} -j {KUBE_MARK_MASQ}",  # hairpin: a pod reaching itself via its service
            f"{head}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep.address}")


def top_chains(rules: Sequence[ServiceRules], localhost_nodeports: bool,
               conntrack_tcp_liberal: bool, node_port_ips: tuple[str, ...] | None = None) -> tuple[Chains, Chains]:
    """The shared chains (filter's and nat's top-level ones) holding rules' lines, in order;
    node_port_ips: where NodePorts answer (NodeInfo.node_port_ips; None: every local address)."""
    filter_: Chains = {
        KUBE_SERVICES: tuple(line for r in rules for line in r.filter_services),
        KUBE_EXTERNAL_SERVICES: tuple(line for r in rules for line in r.filter_external),
        KUBE_NODEPORTS: tuple(line for r in rules for line in r.filter_nodeports),
        KUBE_PROXY_FIREWALL: tuple(line for r in rules for line in r.filter_firewall),
    }
    if localhost_nodeports:
        filter_[KUBELET_FIREWALL] = (
            f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",)
    filter_[KUBE_FORWARD] = (
        () if conntrack_tcp_liberal else (f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",)
    ) + forward_rules()
    # The tail call to KUBE-NODEPORTS must stay the last rule of KUBE-SERVICES: for every local
    # address, or (kube-proxy's --nodeport-addresses) one rule per node address it names.
    if node_port_ips is None:
        destinations = ["-m addrtype --dst-type LOCAL" + ("" if localhost_nodeports else " ! -d 127.0.0.0/8")]
    else:
        destinations = [f"-d {ip}" for ip in node_port_ips]
    nat: Chains = {
        KUBE_SERVICES: tuple(line for r in rules for line in r.nat_services) + tuple(
            f'-A {KUBE_SERVICES} -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
            f'rule in this chain" {destination} -j {KUBE_NODEPORTS}' for destination in destinations),
        KUBE_NODEPORTS: tuple(line for r in rules for line in r.nat_nodeports),
        KUBE_POSTROUTING: postrouting_rules(),
        KUBE_MARK_MASQ: mark_masq_rules(),
    }
    return filter_, nat
