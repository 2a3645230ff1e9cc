"""`kproxy get` in a real lab: every kind's JSON is valid against Kubernetes' OpenAPI schema,
and a Deployment's ReplicaSets behave as Kubernetes' do through a rollout and a delete."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.k8s_schema import KINDS, validate
from tests.labtools import kproxy, running_lab

pytestmark = pytest.mark.kernel

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  type: NodePort
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 9000}]
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
      containers: [{name: api, image: registry.k8s.io/e2e-test-images/agnhost:2.47, ports: [{containerPort: 9000}]}]
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    manifests = tmp_path_factory.mktemp("get") / "api.yaml"
    manifests.write_text(MANIFESTS)
    with running_lab() as name:
        kproxy("apply", "--lab", name, "-f", str(manifests))
        yield name


def get(lab: str, *args: str) -> Any:
    return json.loads(kproxy("get", "--lab", lab, *args, "-o", "json").stdout)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_valid_against_kubernetes_schema(lab: str, kind: str) -> None:
    listed = get(lab, kind)
    assert listed["items"], f"no {kind} in the lab"
    validate(listed)
    assert int(listed["metadata"]["resourceVersion"]) >= max(int(i["metadata"]["resourceVersion"])
                                                             for i in listed["items"])
    first = listed["items"][0]["metadata"]["name"]
    validate(get(lab, kind, first))
    as_yaml = yaml.safe_load(kproxy("get", "--lab", lab, kind, "-o", "yaml").stdout)
    assert as_yaml == listed


def test_deployment_pods_are_owned_by_a_replica_set_listed_by_get_rs(lab: str) -> None:
    (deployment,) = get(lab, "deploy")["items"]
    (replica_set,) = get(lab, "rs")["items"]
    assert replica_set["metadata"]["ownerReferences"][0]["uid"] == deployment["metadata"]["uid"]
    pods = get(lab, "pods", "-l", "app=api")["items"]
    assert len(pods) == 2
    for pod in pods:
        (owner,) = pod["metadata"]["ownerReferences"]
        assert owner == {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set["metadata"]["name"],
                         "uid": replica_set["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
        assert pod["metadata"]["name"].startswith(replica_set["metadata"]["name"] + "-")
    table = kproxy("get", "--lab", lab, "rs").stdout.splitlines()
    assert table[0].split() == ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
    assert table[1].split()[:4] == [replica_set["metadata"]["name"], "2", "2", "2"]
    header = kproxy("get", "--lab", lab, "pods").stdout.splitlines()[0]
    assert header.split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    endpoints = kproxy("get", "--lab", lab, "endpoints", "api").stdout.splitlines()
    assert endpoints[0].split() == ["NAME", "ENDPOINTS", "AGE"]
    name, shown, age = endpoints[1].split()
    assert name == "api" and sorted(shown.split(",")) == sorted(f"{p['status']['podIP']}:9000" for p in pods)
    assert re.fullmatch(r"\d+s|\d+m\d*s?", age)  # from the Endpoints' creationTimestamp


def test_a_rollout_makes_a_new_replica_set_and_a_delete_takes_everything(lab: str, tmp_path: Path) -> None:
    (before,) = get(lab, "rs")["items"]
    kproxy("rollout", "restart", "--lab", lab, "deploy/api")
    sets = {rs["metadata"]["name"]: rs for rs in get(lab, "rs")["items"]}
    assert len(sets) == 2 and sets[before["metadata"]["name"]]["spec"]["replicas"] == 0
    (new,) = [rs for name, rs in sets.items() if name != before["metadata"]["name"]]
    assert new["spec"]["replicas"] == 2 and new["status"]["readyReplicas"] == 2
    pods = get(lab, "pods", "-l", "app=api")["items"]
    assert sorted(p["metadata"]["ownerReferences"][0]["name"] for p in pods) == [new["metadata"]["name"]] * 2
    slices = get(lab, "endpointslices", "-l", "kubernetes.io/service-name=api")["items"]
    assert sorted(e["targetRef"]["name"] for s in slices for e in s["endpoints"]) == \
        sorted(p["metadata"]["name"] for p in pods)
    victim = pods[0]["metadata"]["name"]
    kproxy("delete", "--lab", lab, "pod", victim)  # the ReplicaSet replaces it
    replaced = get(lab, "pods", "-l", "app=api")["items"]
    assert len(replaced) == 2 and victim not in {p["metadata"]["name"] for p in replaced}
    kproxy("delete", "--lab", lab, "deploy", "api")
    assert get(lab, "rs")["items"] == [] and get(lab, "pods", "-l", "app=api")["items"] == []
