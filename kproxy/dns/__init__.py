"""Cluster DNS: the records of the Kubernetes DNS specification, served from the lab's store (docs/dns.md).

The names both the addon (kproxy.dns.addon) and the server (kproxy.dns.server)
use live here, so the server starts without the addon's imports (the model, the
controllers): a DNS pod's start is on the kubelet's readiness clock.
"""

NAMESPACE = "kube-system"
DNS_SERVICE_KEY = f"Service/{NAMESPACE}/kube-dns"
READY_PORT = 8181  # CoreDNS's `ready` plugin: GET /ready answers 200 once the server serves
