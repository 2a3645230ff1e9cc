"""The lab's load balancer and kube-proxy's service health check, without root: the routes each
load-balancer address gets, and what the health check answers."""

from __future__ import annotations

import json
from typing import Any

from kproxy.healthcheck import ServiceHealth, response, service_health
from kproxy.lab.announce import node_marks, pinning_ruleset, routes
from kproxy.proxy.source import source_ranges
from kproxy.proxy.types import Endpoint, ProxyState, ServicePort

NODES = {"node1": "172.18.0.2", "node2": "172.18.0.3", "node3": "172.18.0.10"}


def balanced(name: str, ip: str, policy: str = "Cluster", type_: str = "LoadBalancer") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"type": type_, "externalTrafficPolicy": policy},
            "status": {"loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}}


def slice_of(service: str, *endpoints: tuple[str, bool]) -> dict[str, Any]:
    return {"metadata": {"name": f"{service}-abcde", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": service}},
            "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": ready}, "nodeName": node}
                          for node, ready in endpoints]}


def test_every_node_announces_a_cluster_policy_address_and_only_nodes_with_ready_endpoints_a_local_one() -> None:
    services = [balanced("web", "172.18.255.1"), balanced("local", "172.18.255.2", "Local"),
                balanced("nowhere", "172.18.255.3", "Local"), balanced("plain", "", type_="NodePort")]
    slices = [slice_of("local", ("node3", True), ("node1", False)), slice_of("nowhere", ("node2", False))]
    assert routes(services, slices, NODES) == {
        "172.18.255.1": ("172.18.0.2", "172.18.0.3", "172.18.0.10"),  # numeric order, not text order
        "172.18.255.2": ("172.18.0.10",),
    }


def test_the_health_check_reports_this_nodes_ready_endpoints_per_service() -> None:
    svc = ServicePort("default", "web", "http", "TCP", "10.96.0.20", 80, node_port=30080,
                      load_balancer_ips=("172.18.255.1",), external_policy_local=True, health_check_node_port=30100)
    dns = ServicePort("default", "web", "dns", "UDP", "10.96.0.20", 53, node_port=30053,
                      load_balancer_ips=("172.18.255.1",), external_policy_local=True, health_check_node_port=30100)
    other = ServicePort("default", "other", "", "TCP", "10.96.0.21", 80)
    endpoints = [Endpoint("10.244.1.5", 8080, "node1"), Endpoint("10.244.1.6", 8080, "node1", ready=False,
                                                                 terminating=True),
                 Endpoint("10.244.2.5", 8080, "node2")]
    state = ProxyState([svc, dns, other], {svc.key: endpoints, dns.key: endpoints[:1], other.key: endpoints})
    assert service_health(state, "node1") == {("default", "web"): ServiceHealth("default", "web", 30100, 1)}
    assert service_health(state, "node3") == {("default", "web"): ServiceHealth("default", "web", 30100, 0)}


def test_the_health_check_answers_as_kube_proxy_does() -> None:
    status, body = response(ServiceHealth("shop", "web", 30100, 2), proxy_healthy=True)
    assert status == 200
    assert body.decode() == ('{\n\t"service": {\n\t\t"namespace": "shop",\n\t\t"name": "web"\n\t},\n'
                             '\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}')
    assert response(ServiceHealth("shop", "web", 30100, 0), proxy_healthy=True)[0] == 503
    status, body = response(ServiceHealth("shop", "web", 30100, 2), proxy_healthy=False)
    assert status == 503 and json.loads(body)["serviceProxyHealthy"] is False


def test_the_router_pins_each_connection_to_the_node_it_started_on() -> None:
    marks = node_marks(["172.18.0.10", "172.18.0.2"], "172.18.0.0/24")
    assert marks == {"172.18.0.10": 10, "172.18.0.2": 2}  # host numbers: the same whatever nodes come and go
    assert pinning_ruleset("172.18.255.0/24", marks) == (
        "table ip kproxy-router { }\n"
        "delete table ip kproxy-router\n"
        "table ip kproxy-router {\n"
        "  map hop-mark { type ipv4_addr : mark ; elements = { 172.18.0.2 : 2, 172.18.0.10 : 10 } ; }\n"
        "  chain remember { type filter hook postrouting priority mangle ; "
        "ip daddr 172.18.255.0/24 ct state new ct mark set rt ip nexthop map @hop-mark ; }\n"
        "  chain pin { type route hook output priority mangle ; "
        "ip daddr 172.18.255.0/24 ct mark != 0 meta mark set ct mark ; }\n"
        "}\n")


def test_source_ranges_are_read_once_as_kube_proxy_reads_them() -> None:
    ranges = source_ranges([" 203.0.113.7/25", "nonsense", "fd00::/8", "192.168.0.0/24"])
    assert ranges == ("203.0.113.0/25", "192.168.0.0/24")  # trimmed, host bits cleared, the rest left out
    svc = ServicePort("ns1", "svc1", "", "TCP", "172.30.0.41", 80, load_balancer_ips=("1.2.3.4",),
                      source_ranges=ranges)
    assert [svc.source_ranges_hold(ip) for ip in ("192.168.0.2", "10.0.0.1", "")] == [True, False, False]
