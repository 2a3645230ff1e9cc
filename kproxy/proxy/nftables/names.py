"""kube-proxy's nftables names: the table, its base chains, sets and maps, and the hashed
names of the per-service and per-endpoint chains and sets.

A service port's objects are named from "<ns>/<svc>/<proto>/<portName>" (and an
endpoint's from that plus "__<ip>/<port>"): the first 8 characters of the base32
of its sha256, "-", the text itself, e.g. ``service-ULMVA6XW-ns1/svc1/tcp/p80`` and
``endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80`` (kube-proxy's
hashAndTruncate and its unit tests).
"""

from __future__ import annotations

from kproxy.proxy.hashing import base32_sha256
from kproxy.proxy.types import Endpoint, ServicePort

FAMILY = "ip"
TABLE = "kube-proxy"
TABLE_COMMENT = "rules for kube-proxy"
NAME_BASE_MAX = 240  # what is left of nftables' 256 characters for a prefix such as "endpoint-"

# Chains with a hook: (name, type, hook, priority), priorities as numbers (dstnat is -100,
# srcnat 100): the filter chains see packets just before DNAT, filter-output-post-dnat just after.
BASE_CHAINS = (
    ("filter-prerouting", "filter", "prerouting", -110),
    ("filter-input", "filter", "input", -110),
    ("filter-forward", "filter", "forward", -110),
    ("filter-output", "filter", "output", -110),
    ("filter-output-post-dnat", "filter", "output", -90),
    ("nat-prerouting", "nat", "prerouting", -100),
    ("nat-output", "nat", "output", -100),
    ("nat-postrouting", "nat", "postrouting", 100),
)

SERVICES = "services"
MARK_FOR_MASQUERADE = "mark-for-masquerade"
MASQUERADING = "masquerading"
CLUSTER_IPS_CHECK = "cluster-ips-check"
FIREWALL_CHECK = "firewall-check"
SERVICE_ENDPOINTS_CHECK = "service-endpoints-check"
NODEPORT_ENDPOINTS_CHECK = "nodeport-endpoints-check"
REJECT_CHAIN = "reject-chain"

CLUSTER_IPS = "cluster-ips"  # set
NODEPORT_IPS = "nodeport-ips"  # set
SERVICE_IPS = "service-ips"  # the maps ...
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
FIREWALL_IPS = "firewall-ips"


def hashed(text: str) -> str:
    """kube-proxy's hashAndTruncate: "<8 chars of base32(sha256(text))>-<text>", cut to fit."""
    return f"{base32_sha256(text, 8)}-{text}"[:NAME_BASE_MAX]


def service_base(svc: ServicePort) -> str:
    return hashed(f"{svc.namespace}/{svc.name}/{svc.protocol.lower()}/{svc.port_name}")


def endpoint_base(svc: ServicePort, ep: Endpoint) -> str:
    return hashed(f"{svc.namespace}/{svc.name}/{svc.protocol.lower()}/{svc.port_name}__{ep.ip}/{ep.port}")


def service_chain(base: str) -> str:
    """The Cluster-policy chain: picks one of every node's endpoints (ClusterIP traffic lands
    here, after masquerading off-cluster clients, unless internalTrafficPolicy is Local)."""
    return f"service-{base}"


def local_chain(base: str) -> str:
    """The Local-policy chain: picks one of this node's endpoints."""
    return f"local-{base}"


def external_chain(base: str) -> str:
    """Where NodePort, external IP and load-balancer IP traffic goes: masquerade (Cluster
    policy) or short-circuit in-node clients (Local policy), then the policy chain."""
    return f"external-{base}"


def firewall_chain(base: str) -> str:
    """Drops load-balancer IP traffic from outside loadBalancerSourceRanges."""
    return f"firewall-{base}"


def endpoint_chain(base: str) -> str:
    return f"endpoint-{base}"


def affinity_set(base: str) -> str:
    """The clients an endpoint has served recently (ClientIP session affinity)."""
    return f"affinity-{base}"
