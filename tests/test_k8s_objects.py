"""What `kproxy get -o json|yaml` prints is valid against Kubernetes' OpenAPI schema, without root.

The controllers and the kubelet's status make a small cluster's objects, the
store stamps them as it does in a lab, and every kind is printed as `get` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import ValidationError

from kproxy import controllers, getcmd
from kproxy.controllers import obj_key
from kproxy.lab.planning import node_object, plan, topology_pod_objects
from kproxy.lab.topology import parse_topology, place_pods
from kproxy.model import parse_manifests
from kproxy.store import Store, View
from kproxy.store.file import FileStore
from tests.k8s_schema import KINDS, validate

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: search}
spec: {type: ExternalName, externalName: search.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, ports: [{name: pg, port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, labels: {tier: front}}
spec:
  type: NodePort
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nothing}
  ports: [{port: 81, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  loadBalancerSourceRanges: [172.18.0.0/24]
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere}
spec:
  type: LoadBalancer
  loadBalancerClass: example.com/other
  selector: {app: api}
  ports: [{port: 80, targetPort: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy}
spec:
  externalIPs: [192.168.77.10, 192.168.77.11]
  selector: {app: api}
  ports: [{port: 80, targetPort: 9000}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: api}
spec:
  replicas: 2
  selector: {matchLabels: {app: api}}
  template:
    metadata: {labels: {app: api}}
    spec:
      containers: [{name: api, image: registry.k8s.io/pause:3.9, ports: [{containerPort: 9000}]}]
"""


def write(store: Store, objects: list[dict[str, Any]]) -> None:
    store.write({obj_key(o): o for o in objects})


@pytest.fixture
def view(tmp_path: Path) -> View:
    """A two-node cluster with a Deployment (one pod ready, one not), its Service, and topology pods."""
    store = FileStore(tmp_path)
    topology = parse_topology({"nodes": [{"name": "node1"}, {"name": "node2"}],
                               "pods": [{"name": "client", "nodeName": "node1"}]}, name="lab")
    state = plan(topology, None)
    write(store, [node_object(state, n) for n in state.nodes])
    write(store, list(topology_pod_objects(topology, place_pods(topology)).values()))
    objects = parse_manifests(MANIFESTS, "test.yaml")
    services = [o for o in objects if o["kind"] == "Service"]
    controllers.allocate_cluster_ips(services, [])
    controllers.allocate_node_ports(services, [])
    controllers.allocate_load_balancer_ips(services, [], state.load_balancer_pool)
    write(store, objects)
    deployment = store.read().objects["Deployment/default/api"]
    replica_set = controllers.replica_set_for(deployment, 2)
    write(store, [replica_set])
    pods = sorted((controllers.new_pod_for(replica_set, set()) for _ in range(2)), key=lambda p: p["metadata"]["name"])
    for i, pod in enumerate(pods):
        pod["spec"]["nodeName"] = f"node{i + 1}"
    write(store, pods)
    snapshot = store.read()
    running = snapshot.of_kind("Pod")
    for i, pod in enumerate(running):
        pod["status"] = controllers.pod_status(pod, f"10.244.{i + 1}.2", state.nodes[pod["spec"]["nodeName"]].ip,
                                               ready=i > 0)
    running[-1] = controllers.record_restart(running[-1], "2026-01-01T00:02:00Z", {
        "exitCode": 1, "startedAt": "2026-01-01T00:00:00Z", "finishedAt": "2026-01-01T00:01:59Z"})
    write(store, running)
    snapshot = store.read()
    changes = controllers.all_endpoint_slices(snapshot.of_kind("Service"), snapshot.of_kind("Pod"), {})
    store.write(changes)
    store.write(controllers.workload_statuses(store.read().objects))
    return store.read()


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_prints_objects_and_a_list_valid_against_kubernetes_schema(view: View, kind: str) -> None:
    items = getcmd.select(view, getcmd.resolve_kind(kind), "default", None)
    assert items
    listed = json.loads(getcmd.render(items, "json", single=False, version=view.version))
    validate(listed)
    assert listed["metadata"] == {"resourceVersion": str(view.version)}
    for item in listed["items"]:
        assert item["metadata"]["uid"] and item["metadata"]["creationTimestamp"]
        assert 0 < int(item["metadata"]["resourceVersion"]) <= view.version
    one = json.loads(getcmd.render(items[:1], "json", single=True, version=view.version))
    validate(one)
    assert yaml.safe_load(getcmd.render(items, "yaml", single=False, version=view.version)) == listed


def test_the_schema_check_refuses_what_kubernetes_would(view: View) -> None:
    pod = json.loads(json.dumps(view.of_kind("Pod")[0]))
    del pod["status"]["containerStatuses"][0]["imageID"]
    with pytest.raises(ValidationError, match="'imageID' is a required property"):
        validate(pod)
    slice_ = json.loads(json.dumps(next(s for s in view.of_kind("EndpointSlice") if s["endpoints"])))
    slice_["endpoints"][0]["ready"] = True  # conditions.ready, not a field of the endpoint
    with pytest.raises(ValidationError, match=r"Additional properties are not allowed \('ready' was unexpected\)"):
        validate(slice_)


def test_pods_are_owned_by_their_replica_set_and_it_by_the_deployment(view: View) -> None:
    (deployment,) = view.of_kind("Deployment")
    (replica_set,) = view.of_kind("ReplicaSet")
    pods = [p for p in view.of_kind("Pod") if p["metadata"]["name"].startswith("api-")]
    (owner,) = replica_set["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api",
                     "uid": deployment["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    assert [p["metadata"]["ownerReferences"][0]["uid"] for p in pods] == [replica_set["metadata"]["uid"]] * 2
    assert replica_set["status"] == {"replicas": 2, "fullyLabeledReplicas": 2, "readyReplicas": 1,
                                     "availableReplicas": 1}


def test_tables_read_like_kubectl(view: View, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getcmd, "since", lambda stamp: "5m")

    def table(kind: str, wide: bool = False) -> list[str]:
        rows = getcmd.rows(getcmd.resolve_kind(kind), getcmd.select(view, getcmd.resolve_kind(kind), "default", None),
                           wide, False)
        return ["  ".join(row) for row in rows]
    (rs,) = view.of_kind("ReplicaSet")
    name = rs["metadata"]["name"]
    pods = sorted(p["metadata"]["name"] for p in view.of_kind("Pod") if p["metadata"]["name"].startswith(name))
    slices = {s["metadata"]["labels"]["kubernetes.io/service-name"]: s["metadata"]["name"]
              for s in view.of_kind("EndpointSlice")}
    assert table("pods", wide=True) == [
        "NAME  READY  STATUS  RESTARTS  AGE  IP  NODE  NOMINATED NODE  READINESS GATES",
        f"{pods[0]}  0/1  Running  0  5m  10.244.1.2  node1  <none>  <none>",
        f"{pods[1]}  1/1  Running  0  5m  10.244.2.2  node2  <none>  <none>",
        "client  1/1  Running  1 (5m ago)  5m  10.244.3.2  node1  <none>  <none>"]
    assert table("svc") == ["NAME  TYPE  CLUSTER-IP  EXTERNAL-IP  PORT(S)  AGE",
                            "db  ClusterIP  None  <none>  5432/TCP  5m",
                            "elsewhere  LoadBalancer  10.96.0.14  <pending>  80:30003/TCP  5m",
                            "empty  ClusterIP  10.96.0.12  <none>  81/TCP  5m",
                            "legacy  ClusterIP  10.96.0.15  192.168.77.10,192.168.77.11  80/TCP  5m",
                            "search  ExternalName  <none>  search.example.com  <none>  5m",
                            "shop  LoadBalancer  10.96.0.13  172.18.255.1  80:30001/TCP  5m",
                            "web  NodePort  10.96.0.11  <none>  80:30000/TCP  5m"]
    assert table("rs") == ["NAME  DESIRED  CURRENT  READY  AGE", f"{name}  2  2  1  5m"]
    assert table("deploy") == ["NAME  READY  UP-TO-DATE  AVAILABLE  AGE", "api  1/2  2  1  5m"]
    assert table("ep") == ["NAME  ENDPOINTS  AGE", "elsewhere  10.244.2.2:9000  5m", "empty  <none>  5m",
                           "legacy  10.244.2.2:9000  5m", "shop  10.244.2.2:9000  5m", "web  10.244.2.2:9000  5m"]
    assert sorted(table("endpointslices")[1:]) == sorted(
        [f"{slices['empty']}  IPv4  8080  <unset>  5m"]
        + [f"{slices[name]}  IPv4  9000  10.244.1.2,10.244.2.2  5m" for name in ("elsewhere", "legacy", "shop", "web")])


@pytest.mark.parametrize("seconds, shown", [(-5, "<invalid>"), (0, "0s"), (119, "119s"), (120, "2m"), (185, "3m5s"),
                                            (600, "10m"), (3 * 3600, "3h"), (3 * 3600 + 300, "3h5m"),
                                            (47 * 3600, "47h"), (50 * 3600, "2d2h"), (10 * 86400, "10d"),
                                            (800 * 86400, "2y70d"), (3000 * 86400, "8y")])
def test_age_is_kubectls_human_duration(seconds: int, shown: str) -> None:
    assert getcmd.human_duration(seconds) == shown
