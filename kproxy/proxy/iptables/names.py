"""kube-proxy's names: its chains, how it hashes a service port into a chain name, its jumps.

Chain names are computed exactly as kube-proxy computes them
(pkg/proxy/iptables/proxier.go): ``KUBE-SVC-`` / ``KUBE-SVL-`` / ``KUBE-EXT-`` / ``KUBE-FW-``
+ the first 16 characters of base32(sha256(servicePortName + protocol)), with
servicePortName ``ns/name:port`` (``ns/name`` for an unnamed port) and the protocol
lowercase ("tcp"); ``KUBE-SEP-`` hashes servicePortName + protocol + ``ip:port`` of
the endpoint. So ``ns1/svc1:p80`` TCP is ``KUBE-SVC-XPGD46QRK7WJZT7O`` here as in
every cluster.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

from kproxy.proxy.hashing import base32_sha256
from kproxy.proxy.netfilter import KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, Jump, OwnedChains

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBELET_FIREWALL = "KUBE-FIREWALL"  # kubelet's; kube-proxy writes a copy when localhost NodePorts are on

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)

is_own_chain = OwnedChains({"filter": (*FILTER_TOP_CHAINS, KUBELET_FIREWALL), "nat": NAT_TOP_CHAINS},
                           nat_prefixes=SERVICE_CHAIN_PREFIXES)


def _hash16(text: str) -> str:
    return base32_sha256(text, 16)


class ServiceChains(NamedTuple):
    """A service port's own chain names. They share one hash (kube-proxy's portProtoHash), so they
    are made together, once per render of the service port."""

    cluster: str  # KUBE-SVC-: all usable endpoints (kube-proxy's servicePortPolicyClusterChain)
    local: str  # KUBE-SVL-: this node's, where a Local policy applies (servicePortPolicyLocalChainName)
    external: str  # KUBE-EXT-: where NodePort, external IP and load-balancer traffic enters
    firewall: str  # KUBE-FW-: loadBalancerSourceRanges, between a load-balancer IP and KUBE-EXT-


def service_chain_names(service_port_name: str, protocol: str) -> ServiceChains:
    """The KUBE-SVC-/SVL-/EXT-/FW- names of one service port (protocol in any case)."""
    digest = _hash16(service_port_name + protocol.lower())
    return ServiceChains(SVC_PREFIX + digest, SVL_PREFIX + digest, EXT_PREFIX + digest, FW_PREFIX + digest)


def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-<hash> of one endpoint ("ip:port") of one service port."""
    return SEP_PREFIX + _hash16(service_port_name + protocol.lower() + endpoint)


def chain_order(chains: Iterable[str]) -> list[str]:
    """kube-proxy's order of chains: KUBE-NODEPORTS, KUBE-SERVICES, then the rest sorted."""
    rest = sorted(chains)
    first = [c for c in (KUBE_NODEPORTS, KUBE_SERVICES) if c in rest]
    return first + [c for c in rest if c not in first]


_NEW = "-m conntrack --ctstate NEW"
# kube-proxy's iptablesJumpChains, in its order; each is prepended, so the last of a chain ends
# up first. The filter chains come after nat's DNAT: a new connection still addressed to a
# service's own address there is one no rule took (no endpoint, none on this node, a source out
# of loadBalancerSourceRanges). KUBE-EXTERNAL-SERVICES refuses those to NodePorts, external and
# load-balancer IPs (INPUT, FORWARD); KUBE-PROXY-FIREWALL drops the firewalled ones (INPUT,
# OUTPUT, FORWARD); filter KUBE-NODEPORTS lets in health check node ports (INPUT).
JUMPS = (
    Jump("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    Jump("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    Jump("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    Jump("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", _NEW),
    Jump("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _NEW),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)
# kubelet's (iptablesKubeletJumpChains): only with localhost NodePorts.
KUBELET_JUMPS = (
    Jump("filter", "INPUT", KUBELET_FIREWALL),
    Jump("filter", "OUTPUT", KUBELET_FIREWALL),
)


def jumps_for(localhost_nodeports: bool) -> tuple[Jump, ...]:
    return JUMPS + (KUBELET_JUMPS if localhost_nodeports else ())

