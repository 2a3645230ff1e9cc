"""Allocation and the endpoint-slice controller, without root."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy import controllers
from kproxy.errors import KproxyError
from kproxy.proxy.source import StateTracker, proxy_state
from kproxy.proxy.types import ProxyState


def svc(name: str, ip: str = "", node_port: int | None = None, target: Any = 8080, **spec: Any) -> dict[str, Any]:
    port: dict[str, Any] = {"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}
    if node_port:
        port["nodePort"] = node_port
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "NodePort" if node_port is not None else "ClusterIP", "clusterIP": ip,
                     "selector": {"app": "web"}, "ports": [port], **spec}}


def pod(name: str, ip: str, ready: bool = True, labels: dict[str, str] | None = None,
        ports: list[dict[str, Any]] | None = None, node: str = "node1") -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": labels or {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports or []}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_cluster_ips_are_handed_out_in_order_and_kept_unique() -> None:
    taken = svc("old", "10.96.0.10")
    new = [svc("a"), svc("b", "10.96.0.12"), svc("c")]
    controllers.allocate_cluster_ips(new, [taken])
    assert [s["spec"]["clusterIP"] for s in new] == ["10.96.0.11", "10.96.0.12", "10.96.0.13"]


@pytest.mark.parametrize("ip, message", [
    ("10.96.0.10", "spec.clusterIP 10.96.0.10 is already allocated to default/old"),
    ("10.200.0.1", "spec.clusterIP 10.200.0.1 is not in the service CIDR 10.96.0.0/12"),
    ("10.96.0.999", "spec.clusterIP '10.96.0.999' is not an IP address"),
])
def test_bad_cluster_ips_are_refused(ip: str, message: str) -> None:
    with pytest.raises(KproxyError) as err:
        controllers.allocate_cluster_ips([svc("new", ip)], [svc("old", "10.96.0.10")])
    assert str(err.value) == f"Service default/new: {message}"


def test_node_ports_are_allocated_and_a_taken_one_refused() -> None:
    fresh = [svc("a", node_port=0)]
    controllers.allocate_node_ports(fresh, [svc("old", "10.96.0.10", node_port=30000)])
    assert fresh[0]["spec"]["ports"][0]["nodePort"] == 30001
    with pytest.raises(KproxyError, match=r"spec.ports\[0\].nodePort: 30000 is already allocated to default/old"):
        controllers.allocate_node_ports([svc("b", node_port=30000)], [svc("old", "10.96.0.10", node_port=30000)])


def test_endpoints_are_the_ready_selected_pods_with_resolved_ports() -> None:
    service = svc("web", "10.96.0.10", target="http")
    pods = [pod("a", "10.244.1.2", ports=[{"name": "http", "containerPort": 9000}]),
            pod("b", "10.244.2.2", ready=False, ports=[{"name": "http", "containerPort": 9000}]),
            pod("c", "10.244.3.2", ports=[{"name": "other", "containerPort": 9001}]),  # lacks the named port
            pod("d", "10.244.1.3", labels={"app": "db"}, ports=[{"name": "http", "containerPort": 9000}])]
    slices = controllers.endpoint_slices(service, pods, {})
    (only,) = slices.values()
    assert only["ports"] == [{"name": "http", "port": 9000, "protocol": "TCP"}]
    assert [(e["addresses"], e["conditions"]["ready"]) for e in only["endpoints"]] == \
        [(["10.244.1.2"], True), (["10.244.2.2"], False)]
    state = proxy_state([service], slices.values())
    (port,) = state.services
    assert port.service_port_name == "default/web:http"
    assert [(e.address, e.ready, e.node) for e in state.endpoints_of(port)] == \
        [("10.244.1.2:9000", True, "node1"), ("10.244.2.2:9000", False, "node1")]


def test_pods_resolving_a_named_port_differently_get_slices_of_their_own() -> None:
    service = svc("web", "10.96.0.10", target="http")
    pods = [pod("a", "10.244.1.2", ports=[{"name": "http", "containerPort": 9000}]),
            pod("b", "10.244.2.2", ports=[{"name": "http", "containerPort": 9100}])]
    slices = controllers.endpoint_slices(service, pods, {})
    assert sorted(s["ports"][0]["port"] for s in slices.values()) == [9000, 9100]
    state = proxy_state([service], slices.values())
    assert sorted(e.address for e in state.endpoints_of(state.services[0])) == ["10.244.1.2:9000", "10.244.2.2:9100"]


def test_a_terminating_pod_leaves_the_ready_set_and_unchanged_slices_keep_their_trigger_time() -> None:
    service = svc("web", "10.96.0.10")
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2")]
    first = controllers.endpoint_slices(service, pods, {})
    again = controllers.endpoint_slices(service, pods, first)
    assert again == first
    pods[1]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    changed = controllers.all_endpoint_slices([service], pods, first)
    (slice_,) = changed.values()
    assert slice_ is not None
    assert [e["conditions"] for e in slice_["endpoints"]][1] == {"ready": False, "serving": True, "terminating": True}


def test_deleting_a_service_deletes_its_slices() -> None:
    service = svc("web", "10.96.0.10")
    slices = controllers.endpoint_slices(service, [pod("a", "10.244.1.2")], {})
    assert controllers.all_endpoint_slices([], [], slices) == {key: None for key in slices}


def test_deployment_pods_carry_the_template_hash_and_an_owner() -> None:
    deployment = {"kind": "Deployment", "metadata": {"name": "api", "namespace": "default"},
                  "spec": {"replicas": 2, "template": {"metadata": {"labels": {"app": "api"}}, "spec": {}}}}
    made = controllers.new_pod_for(deployment, set())
    phash = controllers.template_hash(deployment)
    assert made["metadata"]["name"].startswith(f"api-{phash}-")
    assert made["metadata"]["labels"] == {"app": "api", "pod-template-hash": phash}
    assert controllers.owned_pods(deployment, [made, pod("x", "10.244.1.9")]) == [made]


def _store(services: list[dict[str, Any]], pods: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    for service in services:
        objects[f"Service/default/{service['metadata']['name']}"] = service
        for name, slice_ in controllers.endpoint_slices(service, pods, {}).items():
            objects[f"EndpointSlice/default/{slice_['metadata']['name']}"] = slice_
    return objects


def test_the_state_tracker_follows_changes_like_a_fresh_read_and_keeps_untouched_objects() -> None:
    web, db = svc("web", "10.96.0.10"), svc("db", "10.96.0.11", selector={"app": "db"})
    pods = [pod("a", "10.244.1.2"), pod("b", "10.244.2.2"), pod("d", "10.244.1.3", labels={"app": "db"})]
    objects = _store([web, db], pods)
    tracker = StateTracker()

    def fresh() -> ProxyState:
        return proxy_state([o for k, o in objects.items() if k.startswith("Service/")],
                           [o for k, o in objects.items() if k.startswith("EndpointSlice/")])

    first = tracker.update(objects)
    assert list(first.services) == fresh().services and first.endpoints == fresh().endpoints
    # One of web's pods goes: only web's endpoints are new objects; db's and the service tuple stay.
    before = dict(objects)
    objects.update(_store([web], pods[:1] + pods[2:]))
    changed = {k for k in objects if objects[k] is not before.get(k)}
    second = tracker.update(objects, changed)
    assert list(second.services) == fresh().services and second.endpoints == fresh().endpoints
    assert second.services is first.services
    db_key = next(s.key for s in second.services if s.name == "db")
    web_key = next(s.key for s in second.services if s.name == "web")
    assert second.endpoints[db_key] is first.endpoints[db_key]
    assert [e.ip for e in second.endpoints[web_key]] == ["10.244.1.2"]
    # A deleted Service (and its slices) leaves the state.
    gone = [k for k in objects if k.endswith("/db") or "/db-" in k]
    for key in gone:
        del objects[key]
    third = tracker.update(objects, set(gone))
    assert [s.name for s in third.services] == ["web"] and third.endpoints == fresh().endpoints
