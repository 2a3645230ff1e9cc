"""The userspace mode's portal rules: pure, no root.

The nat rules the old proxier (pkg/proxy/userspace, removed in Kubernetes 1.26)
kept: per service port, in KUBE-PORTALS-CONTAINER (jumped to from PREROUTING,
for traffic from pods and from outside) ``-d <clusterIP>/32 ... -j REDIRECT
--to-ports <proxyPort>``, and in KUBE-PORTALS-HOST (from OUTPUT, for the node's
own traffic) ``-j DNAT --to-destination <nodeIP>:<proxyPort>``: REDIRECT of a
locally generated packet goes to 127.0.0.1, whose replies do not match the NAT
(the upstream comments say so, and it is so). NodePorts likewise in
KUBE-NODEPORT-CONTAINER / KUBE-NODEPORT-HOST (jumped to for ``--dst-type
LOCAL`` only, after everything else), and filter KUBE-NODEPORT-NON-LOCAL
accepts new connections to the proxy ports. A service port's externalIPs and
load-balancer IPs get the same portals as its ClusterIP (the old proxier opened
one portal per address too). One addition: a service port
without endpoints gets no portal but a REJECT in filter KUBE-USERSPACE-REJECT,
so clients get "connection refused" as with today's kube-proxy (the old
proxier accepted and closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from kproxy.proxy.netfilter import Jump, OwnedChains, comment, restore_tables
from kproxy.proxy.topology import categorize
from kproxy.proxy.types import NodeInfo, ProxyState, ServicePort

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"
REJECT_CHAIN = "KUBE-USERSPACE-REJECT"  # ours, not upstream's: see the module doc

NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS = (NODEPORT_NON_LOCAL, REJECT_CHAIN)
is_own_chain = OwnedChains({"nat": NAT_CHAINS, "filter": FILTER_CHAINS})

_CLUSTER_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
_NODEPORT_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
_NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"
_REJECT_COMMENT = "kproxy userspace: service ports without endpoints"
_LOCAL = "-m addrtype --dst-type LOCAL"
_NEW = "-m conntrack --ctstate NEW"

JUMPS = (
    Jump("nat", "PREROUTING", PORTALS_CONTAINER, _CLUSTER_COMMENT),
    Jump("nat", "OUTPUT", PORTALS_HOST, _CLUSTER_COMMENT),
    Jump("nat", "PREROUTING", NODEPORT_CONTAINER, _NODEPORT_COMMENT, _LOCAL, first=False),
    Jump("nat", "OUTPUT", NODEPORT_HOST, _NODEPORT_COMMENT, _LOCAL, first=False),
    Jump("filter", "INPUT", NODEPORT_NON_LOCAL, _NON_LOCAL_COMMENT),
    # Only new connections need to see the rejects (as kube-proxy's jumps to its filter KUBE-SERVICES).
    Jump("filter", "INPUT", REJECT_CHAIN, _REJECT_COMMENT, _NEW),
    Jump("filter", "FORWARD", REJECT_CHAIN, _REJECT_COMMENT, _NEW),
    Jump("filter", "OUTPUT", REJECT_CHAIN, _REJECT_COMMENT, _NEW),
)

ProxyPorts = Mapping[str, int | str]  # ServicePort.key -> the port its listener has (or a placeholder)


@dataclass
class Ruleset:
    """Per table: our chains and their "-A" lines, in order."""

    tables: dict[str, dict[str, list[str]]]

    def text(self, jumps: Iterable[Jump] = ()) -> str:
        """The iptables-restore --noflush input that writes our chains whole, then adds jumps."""
        return restore_tables({table: (list(chains), [rule for rules in chains.values() for rule in rules])
                               for table, chains in self.tables.items()}, jumps)


def render(state: ProxyState, node: NodeInfo, ports: ProxyPorts) -> Ruleset:
    """The rules of the userspace proxier on node; ports: ServicePort.key -> its proxy port."""
    nat: dict[str, list[str]] = {c: [] for c in NAT_CHAINS}
    filter_: dict[str, list[str]] = {c: [] for c in FILTER_CHAINS}
    services = sorted(state.services, key=lambda s: (s.service_port_name, s.protocol, s.cluster_ip, s.port))
    for svc in services:
        if categorize(state.endpoints_of(svc), svc, node.name).cluster:
            _portals(svc, node, ports[svc.key], nat, filter_)
        else:
            filter_[REJECT_CHAIN] += _rejects(svc)
    return Ruleset({"filter": filter_, "nat": nat})


def _addresses(svc: ServicePort) -> tuple[str, ...]:
    """Where the service port answers: its ClusterIP, then its external and load-balancer IPs."""
    return (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips)


def unsupported(svc: ServicePort) -> str:
    """What of svc the old userspace proxier never implemented ("" when nothing): it had no
    traffic policies and no load-balancer firewall."""
    if svc.external_policy_local:
        return "externalTrafficPolicy Local"
    if svc.internal_policy_local:
        return "internalTrafficPolicy Local"
    if svc.source_ranges:
        return "loadBalancerSourceRanges"
    return ""


def _rejects(svc: ServicePort) -> list[str]:
    """A service port without endpoints: refuse new connections to its ClusterIP (and NodePort)."""
    proto = svc.protocol.lower()
    none = comment(f"{svc.service_port_name} has no endpoints")
    rules = [f"-A {REJECT_CHAIN} -d {ip}/32 -p {proto} -m comment --comment {none} "
             f"-m {proto} --dport {svc.port} -j REJECT --reject-with icmp-port-unreachable" for ip in _addresses(svc)]
    if svc.node_port:
        rules.append(f"-A {REJECT_CHAIN} -p {proto} -m comment --comment {none} -m addrtype --dst-type LOCAL "
                     f"-m {proto} --dport {svc.node_port} -j REJECT --reject-with icmp-port-unreachable")
    return rules


def _portals(svc: ServicePort, node: NodeInfo, port: int | str,
             nat: dict[str, list[str]], filter_: dict[str, list[str]]) -> None:
    """A service port with endpoints: its ClusterIP (and NodePort) lead to its proxy port."""
    proto = svc.protocol.lower()
    name = comment(svc.service_port_name)
    host = f"DNAT --to-destination {node.ip}:{port}" if node.ip else f"REDIRECT --to-ports {port}"
    for ip in _addresses(svc):
        portal = f"-d {ip}/32 -p {proto} -m comment --comment {name} -m {proto} --dport {svc.port}"
        nat[PORTALS_CONTAINER].append(f"-A {PORTALS_CONTAINER} {portal} -j REDIRECT --to-ports {port}")
        nat[PORTALS_HOST].append(f"-A {PORTALS_HOST} {portal} -j {host}")
    if not svc.node_port:
        return
    public = f"-p {proto} -m comment --comment {name} -m {proto} --dport {svc.node_port}"
    nat[NODEPORT_CONTAINER].append(f"-A {NODEPORT_CONTAINER} {public} -j REDIRECT --to-ports {port}")
    nat[NODEPORT_HOST].append(f"-A {NODEPORT_HOST} {public} -j {host}")
    filter_[NODEPORT_NON_LOCAL].append(
        f"-A {NODEPORT_NON_LOCAL} -p {proto} -m comment --comment {name} -m {proto} --dport {port} "
        "-m state --state NEW -j ACCEPT")


def placeholder_ports(state: ProxyState) -> dict[str, int | str]:
    """For rendering without a running proxy: <proxy-port-N>, N counting service ports in key order."""
    keys = sorted({svc.key for svc in state.services})
    return {key: f"<proxy-port-{i}>" for i, key in enumerate(keys, 1)}


def render_text(state: ProxyState, node: NodeInfo) -> str:
    """`kproxy render --mode userspace`: the rules with placeholder proxy ports, and what they stand for."""
    ports = placeholder_ports(state)
    head = ["# kproxy userspace: proxy ports are chosen by the kernel when the listeners open;",
            "# below they are placeholders:"]
    head += [f"#   <proxy-port-{i}> = {key}" for i, key in enumerate(sorted(ports), 1)]
    return "\n".join(head) + "\n" + render(state, node, ports).text()
