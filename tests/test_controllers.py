"""Allocation, the endpoint-slice, deployment and ReplicaSet controllers, and pod status, without root."""

from __future__ import annotations

import ipaddress
import re
from typing import Any

import pytest

from kproxy import controllers, model
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
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"protocol": "TCP"} | p for p in ports or []]}]},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def test_cluster_ips_are_handed_out_in_order_and_kept_unique() -> None:
    taken = svc("old", "10.96.0.10")
    new = [svc("a"), svc("b", "10.96.0.12"), svc("c")]
    controllers.allocate_cluster_ips(new, [taken])
    assert [s["spec"]["clusterIP"] for s in new] == ["10.96.0.11", "10.96.0.12", "10.96.0.13"]


@pytest.mark.parametrize("ip, message", [
    ("10.96.0.10", "spec.clusterIP 10.96.0.10 is already allocated to default/old"),
    ("10.200.0.1", "spec.clusterIP 10.200.0.1 is not in the service CIDR 10.96.0.0/12"),
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


def test_node_ports_come_from_the_one_node_port_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "NODE_PORT_RANGE", (31000, 31000))
    first = [svc("a", node_port=0)]
    controllers.allocate_node_ports(first, [])
    assert first[0]["spec"]["ports"][0]["nodePort"] == 31000
    with pytest.raises(KproxyError, match="^Service default/b: no NodePort left in 31000-31000$"):
        controllers.allocate_node_ports([svc("b", node_port=0)], first)


def test_load_balancers_get_node_ports_a_health_check_port_and_an_address_from_the_pool() -> None:
    pool = ipaddress.IPv4Network("172.18.255.0/29")
    held = svc("old", "10.96.0.10", node_port=30000, type="LoadBalancer")
    held["status"] = {"loadBalancer": {"ingress": [{"ip": "172.18.255.1", "ipMode": "VIP"}]}}
    local = svc("local", type="LoadBalancer", externalTrafficPolicy="Local")
    asked = svc("asked", type="LoadBalancer", loadBalancerIP="172.18.255.5", allocateLoadBalancerNodePorts=False)
    classed = svc("classed", type="LoadBalancer", loadBalancerClass="example.com/other")
    plain = svc("plain")
    new = [local, asked, classed, plain]
    controllers.allocate_node_ports(new, [held])
    controllers.allocate_load_balancer_ips(new, [held], pool)
    assert local["spec"]["ports"][0]["nodePort"] == 30001 and local["spec"]["healthCheckNodePort"] == 30002
    assert "nodePort" not in asked["spec"]["ports"][0] and "healthCheckNodePort" not in asked["spec"]
    assert [s["status"] for s in new] == [
        {"loadBalancer": {"ingress": [{"ip": "172.18.255.2", "ipMode": "VIP"}]}},
        {"loadBalancer": {"ingress": [{"ip": "172.18.255.5", "ipMode": "VIP"}]}},
        {"loadBalancer": {}},  # another load balancer's to serve: pending here
        {"loadBalancer": {}},
    ]


@pytest.mark.parametrize("wanted, message", [
    ("172.18.255.1", "spec.loadBalancerIP 172.18.255.1 is already assigned to default/old"),
    ("172.18.0.9", "spec.loadBalancerIP 172.18.0.9 is not in the lab's load-balancer pool 172.18.255.0/30"),
])
def test_a_load_balancer_ip_outside_the_pool_or_taken_is_refused(wanted: str, message: str) -> None:
    held = svc("old", "10.96.0.10", type="LoadBalancer")
    held["status"] = {"loadBalancer": {"ingress": [{"ip": "172.18.255.1"}]}}
    with pytest.raises(KproxyError) as err:
        controllers.allocate_load_balancer_ips([svc("new", type="LoadBalancer", loadBalancerIP=wanted)], [held],
                                               ipaddress.IPv4Network("172.18.255.0/30"))
    assert str(err.value) == f"Service default/new: {message}"


def test_the_load_balancer_pool_runs_out_with_a_clear_error() -> None:
    pool = ipaddress.IPv4Network("172.18.255.0/30")  # two addresses
    services = [svc(name, type="LoadBalancer") for name in ("a", "b", "c")]
    with pytest.raises(KproxyError, match="^Service default/c: the load-balancer pool 172.18.255.0/30 is full$"):
        controllers.allocate_load_balancer_ips(services, [], pool)


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
    (key,) = first
    slice_ = changed[key]  # the same slice, changed
    assert slice_ is not None
    assert [e["conditions"] for e in slice_["endpoints"]][1] == {"ready": False, "serving": True, "terminating": True}
    endpoints = changed["Endpoints/default/web"]
    assert endpoints is not None and [[a["ip"] for a in s["addresses"]] for s in endpoints["subsets"]] == \
        [["10.244.1.2"]]  # the terminating pod is in neither addresses nor notReadyAddresses


def test_slices_are_named_and_labelled_like_the_endpointslice_controllers() -> None:
    service = svc("web", "10.96.0.10") | {"apiVersion": "v1"}
    service["metadata"]["uid"] = "5b6c-service"
    a = pod("a", "10.244.1.2")
    a["metadata"]["uid"] = "9f1e-pod"
    (slice_,) = controllers.endpoint_slices(service, [a], {}).values()
    meta = slice_["metadata"]
    assert re.fullmatch(r"web-[bcdfghjklmnpqrstvwxz2456789]{5}", meta["name"]) and meta["generateName"] == "web-"
    assert meta["labels"] == {"kubernetes.io/service-name": "web",
                              "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    assert meta["ownerReferences"] == [{"apiVersion": "v1", "kind": "Service", "name": "web", "uid": "5b6c-service",
                                        "controller": True, "blockOwnerDeletion": True}]
    assert slice_["endpoints"][0]["targetRef"] == {"kind": "Pod", "namespace": "default", "name": "a",
                                                   "uid": "9f1e-pod"}


def test_deleting_a_service_deletes_its_slices_and_endpoints() -> None:
    service = svc("web", "10.96.0.10")
    current = controllers.all_endpoint_slices([service], [pod("a", "10.244.1.2")], {})
    assert len(current) == 2 and "Endpoints/default/web" in current
    assert controllers.all_endpoint_slices([], [], {k: v for k, v in current.items() if v}) == \
        {key: None for key in current}


def deployment(replicas: int = 2) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "api", "namespace": "default", "uid": "d-uid"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "api"}},
                     "template": {"metadata": {"labels": {"app": "api"}},
                                  "spec": {"containers": [{"name": "api", "image": "registry.k8s.io/pause:3.9"}]}}}}


def stored(obj: dict[str, Any], uid: str) -> dict[str, Any]:
    """obj as the store keeps it: with a uid and a creationTimestamp."""
    obj["metadata"] |= {"uid": uid, "creationTimestamp": "2026-01-01T00:00:00Z"}
    return obj


def test_a_deployment_runs_a_replica_set_named_by_its_template_hash_whose_pods_it_owns() -> None:
    dep = deployment()
    phash = controllers.template_hash(dep)
    assert re.fullmatch(r"[bcdfghjklmnpqrstvwxz2456789]{1,10}", phash)
    rs = stored(controllers.replica_set_for(dep, 2), "rs-uid")
    assert rs["metadata"]["name"] == f"api-{phash}"
    assert rs["metadata"]["labels"] == {"app": "api", "pod-template-hash": phash}
    assert rs["metadata"]["ownerReferences"] == [{"apiVersion": "apps/v1", "kind": "Deployment", "name": "api",
                                                  "uid": "d-uid", "controller": True, "blockOwnerDeletion": True}]
    assert rs["spec"]["selector"] == {"matchLabels": {"app": "api", "pod-template-hash": phash}}
    made = controllers.new_pod_for(rs, set())
    assert re.fullmatch(rf"api-{phash}-[bcdfghjklmnpqrstvwxz2456789]{{5}}", made["metadata"]["name"])
    assert made["metadata"]["labels"] == {"app": "api", "pod-template-hash": phash}
    assert made["metadata"]["ownerReferences"] == [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                                    "name": f"api-{phash}", "uid": "rs-uid", "controller": True,
                                                    "blockOwnerDeletion": True}]
    assert controllers.owned(rs, [made, pod("x", "10.244.1.9")]) == [made]
    assert controllers.owned(dep, [rs]) == [rs]


def test_a_restart_annotation_changes_the_hash_so_a_new_replica_set_rolls_out() -> None:
    dep = deployment()
    before = controllers.replica_set_for(dep, 2)["metadata"]["name"]
    dep["spec"]["template"]["metadata"]["annotations"] = {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"}
    assert controllers.replica_set_for(dep, 2)["metadata"]["name"] != before


def test_scaling_down_removes_unready_pods_first_then_the_newest() -> None:
    old, new, unready = pod("old", "10.244.1.2"), pod("new", "10.244.1.3"), pod("unready", "10.244.1.4", ready=False)
    old["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
    new["metadata"]["creationTimestamp"] = "2026-01-02T00:00:00Z"
    unready["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    assert [p["metadata"]["name"] for p in controllers.pods_to_remove([old, new, unready], 2)] == ["unready", "new"]


def test_replica_set_and_deployment_status_count_their_pods() -> None:
    dep = stored(deployment(3), "d-uid")
    rs = stored(controllers.replica_set_for(dep, 3), "rs-uid")
    pods = [stored(controllers.new_pod_for(rs, set()), f"p{i}") for i in range(3)]
    for i, made in enumerate(pods):
        made["status"] = pod(made["metadata"]["name"], f"10.244.1.{i + 2}")["status"]
    pods[2]["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"  # leaving: not counted
    objects = {controllers.obj_key(o): o for o in [dep, rs, *pods]}
    changes = controllers.workload_statuses(objects)
    assert changes[controllers.obj_key(rs)]["status"] == {"replicas": 2, "fullyLabeledReplicas": 2,
                                                          "readyReplicas": 2, "availableReplicas": 2}
    assert changes["Deployment/default/api"]["status"] == {"replicas": 2, "updatedReplicas": 2, "readyReplicas": 2,
                                                           "availableReplicas": 2, "unavailableReplicas": 1}
    objects.update(changes)
    assert controllers.workload_statuses(objects) == {}  # nothing more to write


def test_pod_status_keeps_transition_times_and_restarts_and_a_restart_is_counted() -> None:
    made = controllers.new_pod_for(stored(controllers.replica_set_for(deployment(), 2), "rs-uid"), set())
    made["status"] = controllers.pod_status(made, "10.244.1.5", "172.18.0.2", ready=False)
    (container,) = made["status"]["containerStatuses"]
    assert container | {"state": None} == {"name": "api", "image": "registry.k8s.io/pause:3.9", "imageID": "",
                                           "ready": False, "started": True, "restartCount": 0, "state": None,
                                           "lastState": {}}
    scheduled = next(c for c in made["status"]["conditions"] if c["type"] == "PodScheduled")
    scheduled["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    restarted = controllers.record_restart(made, "2026-01-01T00:02:00Z", {
        "exitCode": 137, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:59Z"})
    assert controllers.restart_count(restarted) == 1 and controllers.restart_count(made) == 0
    assert restarted["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 137
    ready = controllers.pod_status(restarted, "10.244.1.5", "172.18.0.2", ready=True)
    assert controllers.restart_count({"status": ready}) == 1
    conditions = {c["type"]: c for c in ready["conditions"]}
    assert conditions["Ready"]["status"] == "True"
    assert conditions["PodScheduled"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"  # unchanged: kept


def _store(services: list[dict[str, Any]], pods: list[dict[str, Any]],
           previous: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    objects: dict[str, dict[str, Any]] = {}
    slices = {k: v for k, v in (previous or {}).items() if k.startswith("EndpointSlice/")}
    for service in services:
        objects[f"Service/default/{service['metadata']['name']}"] = service
        objects.update(controllers.endpoint_slices(service, pods, slices))
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
    objects.update(_store([web], pods[:1] + pods[2:], objects))
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
