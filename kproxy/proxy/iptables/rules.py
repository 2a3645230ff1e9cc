"""The rule lines themselves, in kube-proxy's spelling: one service port's, and the shared chains'.

What kube-proxy's syncProxyRules writes (1.28+ layout), as the ``iptables-restore``
input it generates, so ``iptables-save`` of our namespace reads like a real node's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from kproxy.proxy.iptables.names import (KUBE_EXTERNAL_SERVICES, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL, KUBE_SERVICES,
                                         KUBELET_FIREWALL, endpoint_chain_name, service_external_chain_name,
                                         service_port_chain_name)
from kproxy.proxy.netfilter import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, comment, forward_rules,
                                    mark_masq_rules, postrouting_rules)
from kproxy.proxy.types import Endpoint, NodeInfo, ServicePort

Chains = dict[str, tuple[str, ...]]  # chain -> its rule lines ("-A CHAIN ..."), in order


@dataclass(frozen=True)
class ServiceRules:
    """What one service port adds to the ruleset: lines in the shared chains and chains of its own."""

    nat_services: tuple[str, ...] = ()  # its KUBE-SERVICES rule
    nat_nodeports: tuple[str, ...] = ()  # its KUBE-NODEPORTS rule
    filter_services: tuple[str, ...] = ()  # REJECTs while it has no endpoints
    filter_external: tuple[str, ...] = ()
    chains: Chains = field(default_factory=dict)  # its KUBE-SVC/EXT/SEP chains

    def shared_lines(self) -> tuple[tuple[str, ...], ...]:
        """Its lines in the top-level chains (a change there means rewriting those)."""
        return self.nat_services, self.nat_nodeports, self.filter_services, self.filter_external


def probability(n: int) -> str:
    """kube-proxy's computeProbability: 1/n as %0.10f."""
    return f"{1.0 / n:0.10f}"


def _svc_comment(large: bool, text: str) -> str:
    # kube-proxy's appendServiceCommentLocked: no per-endpoint comments in large clusters.
    return "" if large else f" -m comment --comment {comment(text)}"


def service_rules(svc: ServicePort, endpoints: list[Endpoint], node: NodeInfo, large: bool) -> ServiceRules:
    """One service port's rules (endpoints: its usable ones, in order), as kube-proxy's
    syncProxyRules writes them for it."""
    if not endpoints:
        return _rejects(svc)
    name = svc.service_port_name
    proto = svc.protocol.lower()
    svc_chain = service_port_chain_name(name, proto)
    chains: Chains = {}
    nodeports: tuple[str, ...] = ()
    if svc.node_port:
        ext_chain = service_external_chain_name(name, proto)
        nodeports = (f"-A {KUBE_NODEPORTS} -m comment --comment {comment(name)} "
                     f"-m {proto} -p {proto} --dport {svc.node_port} -j {ext_chain}",)
        chains[ext_chain] = _external_chain(ext_chain, svc_chain, name)
    sep_chains = [endpoint_chain_name(name, proto, ep.address) for ep in endpoints]
    chains[svc_chain] = _dispatch_chain(svc, svc_chain, endpoints, sep_chains, node, large)
    for ep, sep in zip(endpoints, sep_chains):
        chains[sep] = _endpoint_chain(svc, sep, ep, large)
    return ServiceRules(
        nat_services=(f"-A {KUBE_SERVICES} -m comment --comment {comment(f'{name} cluster IP')} "
                      f"{_cluster_ip_match(svc)} -j {svc_chain}",),
        nat_nodeports=nodeports, chains=chains)


def _cluster_ip_match(svc: ServicePort) -> str:
    proto = svc.protocol.lower()
    return f"-m {proto} -p {proto} -d {svc.cluster_ip} --dport {svc.port}"


def _rejects(svc: ServicePort) -> ServiceRules:
    """A service port without endpoints: no nat chains at all; the filter table rejects its traffic."""
    name = svc.service_port_name
    proto = svc.protocol.lower()
    reject = comment(f"{name} has no endpoints")
    external: tuple[str, ...] = ()
    if svc.node_port:
        external = (f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {reject} -m addrtype --dst-type LOCAL "
                    f"-m {proto} -p {proto} --dport {svc.node_port} -j REJECT",)
    return ServiceRules(
        filter_services=(f"-A {KUBE_SERVICES} -m comment --comment {reject} {_cluster_ip_match(svc)} -j REJECT",),
        filter_external=external)


def _external_chain(ext_chain: str, svc_chain: str, name: str) -> tuple[str, ...]:
    # External traffic (Cluster policy): masquerade, in case the endpoint is on another node.
    return (f"-A {ext_chain} -m comment --comment "
            f"{comment(f'masquerade traffic for {name} external destinations')} -j {KUBE_MARK_MASQ}",
            f"-A {ext_chain} -j {svc_chain}")


def _dispatch_chain(svc: ServicePort, svc_chain: str, endpoints: list[Endpoint], sep_chains: Sequence[str],
                    node: NodeInfo, large: bool) -> tuple[str, ...]:
    """KUBE-SVC-: masquerade off-cluster clients, keep affinity, pick an endpoint at random."""
    name = svc.service_port_name
    rules = []
    if node.cluster_cidr:
        # Off-cluster traffic to the ClusterIP (e.g. from the node itself) may bounce off-node: masquerade.
        rules.append(f"-A {svc_chain} -m comment --comment {comment(f'{name} cluster IP')} {_cluster_ip_match(svc)} "
                     f"! -s {node.cluster_cidr} -j {KUBE_MARK_MASQ}")
    if svc.affinity_seconds:
        for ep, sep in zip(endpoints, sep_chains):
            rules.append(f"-A {svc_chain}{_svc_comment(large, f'{name} -> {ep.address}')} -m recent --name {sep} "
                         f"--rcheck --seconds {svc.affinity_seconds} --reap -j {sep}")
    n = len(endpoints)
    for i, (ep, sep) in enumerate(zip(endpoints, sep_chains)):
        pick = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        rules.append(f"-A {svc_chain}{_svc_comment(large, f'{name} -> {ep.address}')}{pick} -j {sep}")
    return tuple(rules)


def _endpoint_chain(svc: ServicePort, sep: str, ep: Endpoint, large: bool) -> tuple[str, ...]:
    """KUBE-SEP-: hairpin masquerade, then DNAT to the endpoint."""
    proto = svc.protocol.lower()
    head = f"-A {sep}{_svc_comment(large, svc.service_port_name)}"
    recent = f" -m recent --name {sep} --set" if svc.affinity_seconds else ""
    return (f"{head} -s {ep.ip} -j {KUBE_MARK_MASQ}",  # hairpin: a pod reaching itself via its service
            f"{head}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep.address}")


def top_chains(rules: Sequence[ServiceRules], localhost_nodeports: bool,
               conntrack_tcp_liberal: bool) -> tuple[Chains, Chains]:
    """The shared chains (filter's and nat's top-level ones) holding rules' lines, in order."""
    filter_: Chains = {
        KUBE_SERVICES: tuple(line for r in rules for line in r.filter_services),
        KUBE_EXTERNAL_SERVICES: tuple(line for r in rules for line in r.filter_external),
        KUBE_NODEPORTS: (),
        KUBE_PROXY_FIREWALL: (),
    }
    if localhost_nodeports:
        filter_[KUBELET_FIREWALL] = (
            f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",)
    filter_[KUBE_FORWARD] = (
        () if conntrack_tcp_liberal else (f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",)
    ) + forward_rules()
    # The tail call to KUBE-NODEPORTS must stay the last rule of KUBE-SERVICES.
    local = "-m addrtype --dst-type LOCAL" + ("" if localhost_nodeports else " ! -d 127.0.0.0/8")
    nat: Chains = {
        KUBE_SERVICES: tuple(line for r in rules for line in r.nat_services) + (
            f'-A {KUBE_SERVICES} -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
            f'rule in this chain" {local} -j {KUBE_NODEPORTS}',),
        KUBE_NODEPORTS: tuple(line for r in rules for line in r.nat_nodeports),
        KUBE_POSTROUTING: postrouting_rules(),
        KUBE_MARK_MASQ: mark_masq_rules(),
    }
    return filter_, nat
