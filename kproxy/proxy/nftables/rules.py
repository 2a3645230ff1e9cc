"""The objects kube-proxy's nftables mode writes: the shared ones (``shared_objects``) and
each service port's (``service_objects``), in kube-proxy's spelling (pure, no root).

Endpoint choice is kube-proxy's ``numgen random mod N vmap { 0 : goto ..., ... }``, or,
with ``cascade``, one rule per endpoint (``numgen random mod N-i 0 goto ...``, the last a
plain ``goto``): the same uniform choice without an anonymous set per service, which the
kernel names by scanning every set of the table (docs/nftables.md has the measurements).
With ``counters`` every rule of a service's chains counts its packets (kube-proxy writes
no counters; `kproxy rules` shows them).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import NamedTuple, Sequence

from kproxy.proxy.netfilter import MASQ_MARK
from kproxy.proxy.nftables import names as n
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


def nodeport_ips(node: NodeInfo) -> tuple[str, ...] | None:
    """The node IPs NodePorts answer on (kube-proxy's --nodeport-addresses: CIDRs, or "primary"
    for the node IP), or None for every local address (``fib daddr type local``)."""
    if not node.node_port_addresses:
        return None
    ip = ipaddress.IPv4Address(node.ip) if node.ip else None
    wanted = any(ip is not None and (given == "primary" or ip in ipaddress.IPv4Network(given, strict=False))
                 for given in node.node_port_addresses)
    return (node.ip,) if wanted else ()


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
    addresses = nodeport_ips(node)
    local = (f"fib daddr type local ip daddr != {NO_LOCALHOST}" if addresses is None
             else f"ip daddr @{n.NODEPORT_IPS}")
    chains[n.NODEPORT_ENDPOINTS_CHECK].append(f"{local} meta l4proto . th dport vmap @{n.NO_ENDPOINT_NODEPORTS}")
    chains[n.SERVICES].append(f"{local} meta l4proto . th dport vmap @{n.SERVICE_NODEPORTS}")
    elements = {n.NODEPORT_IPS: tuple(Element(ip) for ip in addresses or ())}
    return SharedObjects({name: tuple(rules) for name, rules in chains.items()}, specs, dict(SHARED_SETS), elements)


def _rule(match: str, action: str, counters: bool) -> str:
    """match then action, with a counter between them when counting."""
    return " ".join(part for part in (match, "counter" if counters else "", action) if part)


def service_objects(svc: ServicePort, endpoints: Sequence[Endpoint], node: NodeInfo, *,
                    cascade: bool = False, counters: bool = False) -> ServiceObjects:
    """One service port's chains, affinity sets and map elements; endpoints: its usable ones, in order."""
    base = n.service_base(svc)
    proto = svc.protocol.lower()
    key = f"{svc.cluster_ip} . {proto} . {svc.port}"
    chains: dict[str, tuple[str, ...]] = {}
    sets: dict[str, SetSpec] = {}
    elements: list[tuple[str, Element]] = []
    if not endpoints:
        reject = f"goto {n.REJECT_CHAIN}"
        elements.append((n.NO_ENDPOINT_SERVICES, Element(key, reject, svc.service_port_name)))
        if svc.node_port:
            elements.append((n.NO_ENDPOINT_NODEPORTS, Element(f"{proto} . {svc.node_port}", reject,
                                                              svc.service_port_name)))
        return ServiceObjects(svc.service_port_name, svc.cluster_ip, chains, sets, tuple(elements))

    service = n.service_chain(base)
    bases = [n.endpoint_base(svc, ep) for ep in endpoints]
    targets = [n.endpoint_chain(b) for b in bases]
    rules: list[str] = []
    if node.cluster_cidr:  # the local-traffic detector: masquerade what comes from outside the pods
        rules.append(_rule(f"ip daddr {svc.cluster_ip} {proto} dport {svc.port} ip saddr != {node.cluster_cidr}",
                           f"jump {n.MARK_FOR_MASQUERADE}", counters))
    if svc.affinity_seconds:
        rules += [_rule(f"ip saddr @{n.affinity_set(b)}", f"goto {target}", counters)
                  for b, target in zip(bases, targets)]
    rules += _choose(targets, cascade, counters)
    chains[service] = tuple(rules)
    elements.append((n.SERVICE_IPS, Element(key, f"goto {service}")))
    if svc.node_port:
        external = n.external_chain(base)
        chains[external] = (_rule("", f"jump {n.MARK_FOR_MASQUERADE}", counters),
                            _rule("", f"goto {service}", counters))
        elements.append((n.SERVICE_NODEPORTS, Element(f"{proto} . {svc.node_port}", f"goto {external}")))
    for ep, b, target in zip(endpoints, bases, targets):
        ep_rules = [_rule(f"ip saddr {ep.ip}", f"jump {n.MARK_FOR_MASQUERADE}", counters)]  # hairpin
        if svc.affinity_seconds:
            affinity = n.affinity_set(b)
            sets[affinity] = SetSpec("set", f"{{ type ipv4_addr ; flags dynamic,timeout ; "
                                            f"timeout {svc.affinity_seconds}s ; }}")
            ep_rules.append(_rule("", f"update @{affinity} {{ ip saddr }}", counters))
        ep_rules.append(_rule(f"meta l4proto {proto}", f"dnat to {ep.ip}:{ep.port}", counters))
        chains[target] = tuple(ep_rules)
    return ServiceObjects(svc.service_port_name, svc.cluster_ip, chains, sets, tuple(elements))


def _choose(targets: list[str], cascade: bool, counters: bool) -> list[str]:
    """The rules that pick one endpoint chain uniformly at random."""
    if not cascade:
        arms = " , ".join(f"{i} : goto {target}" for i, target in enumerate(targets))
        return [_rule("", f"numgen random mod {len(targets)} vmap {{ {arms} }}", counters)]
    last = len(targets) - 1
    return [_rule(f"numgen random mod {len(targets) - i} 0", f"goto {target}", counters) if i < last
            else _rule("", f"goto {target}", counters) for i, target in enumerate(targets)]
