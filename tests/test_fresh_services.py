"""The Service cases that differ between kernels, in every proxy mode, on a freshly booted stock kernel.

These run in the guest lane (Debian's kernel, nothing preloaded: tests/guestlane.py). Each case
has a single endpoint, so a kernel difference fails every request instead of one in four: on
Debian's kernel without br_netfilter loaded, the same-node case timed out exactly when the
endpoint sat on the client's node.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import yaml

from kproxy.proxy import MODES
from tests.labtools import Lab, kproxy, running_lab

pytestmark = [pytest.mark.kernel, pytest.mark.guest]

TOPOLOGY = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "pods": [{"name": "client", "labels": {"app": "client"}, "nodeName": "node1"},
             {"name": "near", "labels": {"app": "near"}, "nodeName": "node1"},
             {"name": "far", "labels": {"app": "far"}, "nodeName": "node2"}],
}
MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: near}
spec:
  type: NodePort
  selector: {app: near}
  ports: [{port: 80, targetPort: 8080, nodePort: 30081}]
---
apiVersion: v1
kind: Service
metadata: {name: far}
spec:
  selector: {app: far}
  ports: [{port: 80, targetPort: 8080}]
"""
REQUESTS = 4  # per case, as the failing report counted them
TIMEOUT = 10.0  # seconds per request: Python runs ~15x slower in the emulated guest


@pytest.fixture(scope="module", params=MODES)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    where = tmp_path_factory.mktemp("fresh")
    topology, manifests = where / "lab.yaml", where / "services.yaml"
    topology.write_text(yaml.safe_dump(TOPOLOGY))
    manifests.write_text(MANIFESTS)
    with running_lab("-f", str(topology), "--mode", request.param) as name:
        kproxy("apply", "--lab", name, "-f", str(manifests))
        yield Lab(name)


def answers(lab: Lab, client: str, ip: str, port: int) -> list[str]:
    return [lab.ask(client, ip, port, timeout=TIMEOUT)["pod"] for _ in range(REQUESTS)]


def test_cluster_ip_with_the_endpoint_on_the_clients_node(lab: Lab) -> None:
    placed = {pod["name"]: pod["node"] for pod in lab.info["pods"]}
    assert placed == {"client": "node1", "near": "node1", "far": "node2"}
    assert answers(lab, "client", lab.ip("near"), 80) == ["near"] * REQUESTS


def test_cluster_ip_with_the_endpoint_on_another_node(lab: Lab) -> None:
    assert answers(lab, "client", lab.ip("far"), 80) == ["far"] * REQUESTS


def test_node_port_from_outside_on_the_endpoints_node_and_on_another(lab: Lab) -> None:
    for node in lab.info["nodes"]:
        assert answers(lab, "external", node["ip"], 30081) == ["near"] * REQUESTS, node["name"]


def test_a_pod_reaches_itself_through_its_service(lab: Lab) -> None:
    assert answers(lab, "near", lab.ip("near"), 80) == ["near"] * REQUESTS  # hairpin

