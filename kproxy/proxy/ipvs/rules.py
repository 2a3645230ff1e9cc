"""IPVS mode's iptables rules, as kube-proxy's writeIptablesRules (pkg/proxy/ipvs/proxier.go) writes
them: a fixed set of rules matching the ipsets (sets.py), so the text depends on the Services
only through which sets have entries (a rule matching an empty set is left out) and the
load-balancer IPs nodes may not reach (KUBE-IPVS-OUT-FILTER).

nat: KUBE-SERVICES marks for masquerade what needs it (off-cluster traffic to a ClusterIP,
Cluster-policy external IPs and load-balancer IPs via KUBE-LOAD-BALANCER, NodePorts via
KUBE-NODE-PORT) and lets the rest through untouched: the Local-policy sets RETURN first, which
keeps the client's source address. filter: KUBE-PROXY-FIREWALL sends load-balancer IPs with
source ranges to KUBE-SOURCE-RANGES-FIREWALL (allowed sources RETURN, the rest DROP),
KUBE-NODE-PORT accepts health check node ports, KUBE-IPVS-FILTER rejects new connections to
addresses of kube-ipvs0 on ports no Service has, KUBE-FORWARD accepts marked and established
forwarded traffic. Rules are in kube-proxy's order and spelling (what iptables-restore takes).
"""

from __future__ import annotations

from typing import Collection, Iterable

from kproxy.proxy.ipvs import sets as s
from kproxy.proxy.netfilter import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, Jump, OwnedChains,
                                    forward_rules, mark_masq_rules, postrouting_rules, restore_tables)
from kproxy.proxy.types import NodeInfo

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_NODE_PORT = "KUBE-NODE-PORT"  # in nat (NodePort masquerading) and in filter (health check ports)
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBE_SOURCE_RANGES_FIREWALL = "KUBE-SOURCE-RANGES-FIREWALL"
KUBE_IPVS_FILTER = "KUBE-IPVS-FILTER"
KUBE_IPVS_OUT_FILTER = "KUBE-IPVS-OUT-FILTER"
NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_LOAD_BALANCER, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_FORWARD, KUBE_NODE_PORT, KUBE_PROXY_FIREWALL, KUBE_SOURCE_RANGES_FIREWALL,
                 KUBE_IPVS_FILTER, KUBE_IPVS_OUT_FILTER)
# kube-proxy's iptablesJumpChain, each prepended in this order (so the last is first in its chain).
JUMPS = (
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "INPUT", KUBE_NODE_PORT, "kubernetes health check rules"),
    Jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    Jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kube-proxy firewall rules"),
    Jump("filter", "INPUT", KUBE_IPVS_FILTER, "kubernetes ipvs access filter"),
    Jump("filter", "OUTPUT", KUBE_IPVS_OUT_FILTER, "kubernetes ipvs access filter"),
)

is_own_chain = OwnedChains({"nat": NAT_CHAINS, "filter": FILTER_CHAINS})

Blocked = tuple[str, str, int]  # (load-balancer IP, protocol, port) the node itself may not reach

# kube-proxy's ipsetWithIptablesChain: (set, table, chain, protocol match, set match, target);
# each a rule while its set has entries. The Local sets RETURN before their masquerading twins.
_SET_RULES = (
    (s.KUBE_LOOP_BACK, "nat", KUBE_POSTROUTING, "", "dst,dst,src", "MASQUERADE"),
    (s.KUBE_LOAD_BALANCER, "nat", KUBE_SERVICES, "", "dst,dst", KUBE_LOAD_BALANCER),
    (s.KUBE_LOAD_BALANCER_LOCAL, "nat", KUBE_LOAD_BALANCER, "", "dst,dst", "RETURN"),
    (s.KUBE_NODE_PORT_LOCAL_TCP, "nat", KUBE_NODE_PORT, "tcp", "dst", "RETURN"),
    (s.KUBE_NODE_PORT_TCP, "nat", KUBE_NODE_PORT, "tcp", "dst", KUBE_MARK_MASQ),
    (s.KUBE_NODE_PORT_LOCAL_UDP, "nat", KUBE_NODE_PORT, "udp", "dst", "RETURN"),
    (s.KUBE_NODE_PORT_UDP, "nat", KUBE_NODE_PORT, "udp", "dst", KUBE_MARK_MASQ),
    (s.KUBE_LOAD_BALANCER_FW, "filter", KUBE_PROXY_FIREWALL, "", "dst,dst", KUBE_SOURCE_RANGES_FIREWALL),
    (s.KUBE_LOAD_BALANCER_SOURCE_CIDR, "filter", KUBE_SOURCE_RANGES_FIREWALL, "", "dst,dst,src", "RETURN"),
    (s.KUBE_LOAD_BALANCER_SOURCE_IP, "filter", KUBE_SOURCE_RANGES_FIREWALL, "", "dst,dst,src", "RETURN"),
)
# The sets whose addresses KUBE-IPVS-FILTER lets through, with their match.
_IPVS_FILTER_RETURNS = ((s.KUBE_LOAD_BALANCER, "dst,dst"), (s.KUBE_CLUSTER_IP, "dst,dst"),
                        (s.KUBE_EXTERNAL_IP, "dst,dst"), (s.KUBE_EXTERNAL_IP_LOCAL, "dst,dst"),
                        (s.KUBE_HEALTH_CHECK_NODE_PORT, "dst"))


def _matching(name: str, match: str) -> str:
    return f'-m comment --comment "{s.comment_of(name)}" -m set --match-set {name} {match}'


def iptables_rules(node: NodeInfo, nonempty: Collection[str], blocked: Iterable[Blocked]) -> str:
    """The iptables-restore input of IPVS mode on node: nonempty names the ipsets that have
    entries, blocked the load-balancer IPs whose source ranges leave the node out."""
    nat: list[str] = [f"-A {KUBE_SERVICES} -s 127.0.0.0/8 -j RETURN"]  # connections to localhost
    filter_: list[str] = []
    for name, table, chain, protocol, match, target in _SET_RULES:
        if name in nonempty:
            proto = f"-p {protocol} " if protocol else ""
            (nat if table == "nat" else filter_).append(f"-A {chain} {proto}{_matching(name, match)} -j {target}")
    if s.KUBE_CLUSTER_IP in nonempty:
        if node.masquerade_all:
            match, source = "dst,dst", ""
        elif node.cluster_cidr:  # off-cluster traffic to a ClusterIP may leave the node again: masquerade it
            match, source = "dst,dst", f" ! -s {node.cluster_cidr}"
        else:  # no way to tell pods apart: only the node's own connections from a ClusterIP source
            match, source = "src,dst", ""
        nat.append(f"-A {KUBE_SERVICES} {_matching(s.KUBE_CLUSTER_IP, match)}{source} -j {KUBE_MARK_MASQ}")
    for name in (s.KUBE_EXTERNAL_IP, s.KUBE_EXTERNAL_IP_LOCAL):
        if name in nonempty:
            rule = f"-A {KUBE_SERVICES} {_matching(name, 'dst,dst')}"
            if name == s.KUBE_EXTERNAL_IP:  # Cluster policy: masqueraded, as it may leave the node
                nat.append(f"{rule} -j {KUBE_MARK_MASQ}")
            # From off the machine (not a bridged pod, not the node), or to an address of the node.
            nat.append(f"{rule} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT")
            nat.append(f"{rule} -m addrtype --dst-type LOCAL -j ACCEPT")
    nat.append(f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}")
    nat.append(f"-A {KUBE_LOAD_BALANCER} -j {KUBE_MARK_MASQ}")
    filter_.append(f"-A {KUBE_SOURCE_RANGES_FIREWALL} -j DROP")
    filter_ += [f"-A {KUBE_IPVS_OUT_FILTER} -s {ip} -m ipvs --vaddr {ip} --vproto {proto} --vport {port} -j DROP"
                for ip, proto, port in sorted(blocked)]
    nat += [f"-A {KUBE_SERVICES} -m set --match-set {name} dst,dst -j ACCEPT"
            for name in (s.KUBE_CLUSTER_IP, s.KUBE_LOAD_BALANCER) if name in nonempty]
    filter_ += forward_rules()
    filter_.append(f"-A {KUBE_NODE_PORT} {_matching(s.KUBE_HEALTH_CHECK_NODE_PORT, 'dst')} -j ACCEPT")
    filter_ += [f"-A {KUBE_IPVS_FILTER} -m set --match-set {name} {match} -j RETURN"
                for name, match in _IPVS_FILTER_RETURNS]
    filter_.append(f"-A {KUBE_IPVS_FILTER} -m conntrack --ctstate NEW -m set --match-set {s.KUBE_IPVS_IPS} dst "
                   "-j REJECT")
    nat += [*postrouting_rules(), *mark_masq_rules()]
    return restore_tables({"nat": (NAT_CHAINS, nat), "filter": (FILTER_CHAINS, filter_)})
