"""The ipsets of IPVS mode, as kube-proxy's (pkg/proxy/ipvs/ipset.go, proxier.go ipsetInfo) names,
types and comments them, and the ``ipset restore`` text that rewrites them whole.

IPVS mode has no per-service iptables rules: each Service puts entries in these sets and
a fixed handful of rules (rules.py) match them. (kube-proxy's two SCTP sets are left out:
kproxy refuses SCTP Services.)
"""

from __future__ import annotations

import socket
from typing import Any

KUBE_LOOP_BACK = "KUBE-LOOP-BACK"
KUBE_CLUSTER_IP = "KUBE-CLUSTER-IP"
KUBE_EXTERNAL_IP = "KUBE-EXTERNAL-IP"
KUBE_EXTERNAL_IP_LOCAL = "KUBE-EXTERNAL-IP-LOCAL"
KUBE_LOAD_BALANCER = "KUBE-LOAD-BALANCER"
KUBE_LOAD_BALANCER_FW = "KUBE-LOAD-BALANCER-FW"
KUBE_LOAD_BALANCER_LOCAL = "KUBE-LOAD-BALANCER-LOCAL"
KUBE_LOAD_BALANCER_SOURCE_IP = "KUBE-LOAD-BALANCER-SOURCE-IP"
KUBE_LOAD_BALANCER_SOURCE_CIDR = "KUBE-LOAD-BALANCER-SOURCE-CIDR"
KUBE_NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
KUBE_NODE_PORT_LOCAL_TCP = "KUBE-NODE-PORT-LOCAL-TCP"
KUBE_NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
KUBE_NODE_PORT_LOCAL_UDP = "KUBE-NODE-PORT-LOCAL-UDP"
KUBE_HEALTH_CHECK_NODE_PORT = "KUBE-HEALTH-CHECK-NODE-PORT"
KUBE_IPVS_IPS = "KUBE-IPVS-IPS"

_HASH = "family inet hashsize 1024 maxelem 65536"
_BITMAP = "range 0-65535"
# name -> (type, create options, kube-proxy's comment), in kube-proxy's order
IPSETS = {
    KUBE_LOOP_BACK: ("hash:ip,port,ip", _HASH,
                     "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    KUBE_CLUSTER_IP: ("hash:ip,port", _HASH, "Kubernetes service cluster ip + port for masquerade purpose"),
    KUBE_EXTERNAL_IP: ("hash:ip,port", _HASH,
                       "Kubernetes service external ip + port for masquerade and filter purpose"),
    KUBE_EXTERNAL_IP_LOCAL: ("hash:ip,port", _HASH,
                             "Kubernetes service external ip + port with externalTrafficPolicy=local"),
    KUBE_LOAD_BALANCER: ("hash:ip,port", _HASH, "Kubernetes service lb portal"),
    KUBE_LOAD_BALANCER_FW: ("hash:ip,port", _HASH,
                            "Kubernetes service load balancer ip + port for load balancer with sourceRange"),
    KUBE_LOAD_BALANCER_LOCAL: ("hash:ip,port", _HASH,
                               "Kubernetes service load balancer ip + port with externalTrafficPolicy=local"),
    KUBE_LOAD_BALANCER_SOURCE_IP: ("hash:ip,port,ip", _HASH,
                                   "Kubernetes service load balancer ip + port + source IP for packet filter purpose"),
    KUBE_LOAD_BALANCER_SOURCE_CIDR: ("hash:ip,port,net", _HASH, "Kubernetes service load balancer ip + port + "
                                     "source cidr for packet filter purpose"),
    KUBE_NODE_PORT_TCP: ("bitmap:port", _BITMAP, "Kubernetes nodeport TCP port for masquerade purpose"),
    KUBE_NODE_PORT_LOCAL_TCP: ("bitmap:port", _BITMAP, "Kubernetes nodeport TCP port with externalTrafficPolicy=local"),
    KUBE_NODE_PORT_UDP: ("bitmap:port", _BITMAP, "Kubernetes nodeport UDP port for masquerade purpose"),
    KUBE_NODE_PORT_LOCAL_UDP: ("bitmap:port", _BITMAP, "Kubernetes nodeport UDP port with externalTrafficPolicy=local"),
    KUBE_HEALTH_CHECK_NODE_PORT: ("bitmap:port", _BITMAP, "Kubernetes health check node port"),
    KUBE_IPVS_IPS: ("hash:ip", _HASH, "Addresses on the ipvs interface"),
}


def comment_of(name: str) -> str:
    return IPSETS[name][2]


def ipset_swap_text(sets: dict[str, list[str]]) -> str:
    """Each set built under a temporary name and swapped in: one ``ipset restore``, atomic per set."""
    out = []
    for name, (kind, options, _) in IPSETS.items():
        tmp = tmp_set(name)
        out.append(f"create {name} {kind} {options} comment -exist")
        out.append(f"create {tmp} {kind} {options} comment -exist")
        out.append(f"flush {tmp}")
        out += [f"add {tmp} {entry}" for entry in sets.get(name, [])]
        out.append(f"swap {tmp} {name}")
        out.append(f"destroy {tmp}")
    return "\n".join(out) + "\n"


def tmp_set(name: str) -> str:
    """The set a full sync builds aside before swapping it in (ipset names have at most 31 bytes)."""
    return f"{name}-TMP"[:31]


def entry_order(entry: str) -> tuple[Any, ...]:
    """ipset list's order: ports by number, addresses by address."""
    head = entry.split(",")[0]
    if head.isdigit():
        return (1, int(head), b"", entry)
    return (0, 0, socket.inet_aton(head), entry)
