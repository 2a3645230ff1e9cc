"""Cluster DNS as a cluster runs it: the kube-dns Service and the coredns Deployment, and the pods' resolv.conf.

`kproxy lab up` applies objects() (unless --no-dns), as kubeadm installs its
CoreDNS addon: Service kube-system/kube-dns at the tenth address of the
service CIDR with ports 53/UDP, 53/TCP and 9153/TCP, selecting the pods of
Deployment kube-system/coredns (2 replicas, spread over the nodes by the
scheduler). The kubelet runs kproxy.dns.server for a container whose image is
DNS_IMAGE, in place of CoreDNS; every other pod gets resolv_conf() (dnsPolicy
ClusterFirst), the DNS pods themselves keep the node's resolver (dnsPolicy
Default, as CoreDNS's pods have it).
"""

from __future__ import annotations

from kproxy.controllers import DNS_SERVICE_IP
from kproxy.dns import NAMESPACE
from kproxy.model import parse_manifests
from kproxy.proxy.source import SERVICE_NAME_LABEL
from kproxy.store import Obj

DNS_IMAGE = "registry.k8s.io/coredns/coredns:v1.11.3"  # kubeadm's CoreDNS of Kubernetes 1.31
DOMAIN = "cluster.local"

MANIFEST = f"""\
apiVersion: v1
kind: Service
metadata:
  name: kube-dns
  namespace: {NAMESPACE}
  labels: {{k8s-app: kube-dns, kubernetes.io/cluster-service: "true", kubernetes.io/name: CoreDNS}}
  annotations: {{prometheus.io/port: "9153", prometheus.io/scrape: "true"}}
spec:
  clusterIP: {DNS_SERVICE_IP}
  selector: {{k8s-app: kube-dns}}
  ports:
  - {{name: dns, port: 53, protocol: UDP, targetPort: 53}}
  - {{name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}}
  - {{name: metrics, port: 9153, protocol: TCP, targetPort: 9153}}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: coredns
  namespace: {NAMESPACE}
  labels: {{k8s-app: kube-dns}}
spec:
  replicas: 2
  selector: {{matchLabels: {{k8s-app: kube-dns}}}}
  template:
    metadata:
      labels: {{k8s-app: kube-dns}}
    spec:
      containers:
      - name: coredns
        image: {DNS_IMAGE}
        ports:
        - {{name: dns, containerPort: 53, protocol: UDP}}
        - {{name: dns-tcp, containerPort: 53, protocol: TCP}}
        - {{name: metrics, containerPort: 9153, protocol: TCP}}
"""


def objects() -> list[Obj]:
    """The addon's objects, validated as `kproxy apply` validates a manifest."""
    return parse_manifests(MANIFEST, "the cluster DNS addon")


def is_part_of_addon(obj: Obj) -> bool:
    """The addon's Service, Deployment, ReplicaSets, pods, EndpointSlices and Endpoints."""
    meta = obj["metadata"]
    labels = meta.get("labels") or {}
    return meta.get("namespace") == NAMESPACE and (
        meta["name"] in ("kube-dns", "coredns") or labels.get("k8s-app") == "kube-dns"
        or labels.get(SERVICE_NAME_LABEL) == "kube-dns")


def runs_dns(pod_spec: Obj) -> bool:
    return any(c.get("image") == DNS_IMAGE for c in pod_spec.get("containers", []))


def resolv_conf(namespace: str, domain: str = DOMAIN) -> str:
    """A ClusterFirst pod's /etc/resolv.conf, as the kubelet writes it."""
    return (f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
            f"nameserver {DNS_SERVICE_IP}\n"
            "options ndots:5\n")
