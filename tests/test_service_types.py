"""LoadBalancer, externalIPs, traffic policies and terminating endpoints, on the real kernel, in every mode.

The Services below go into each mode's shared lab (tests/servicelab.py). The
`external` namespace is the client outside the cluster (and the router the
nodes announce load-balancer addresses to); a second address on it is a second
outside client. A mode that cannot program a feature (userspace: no traffic
policies, no source ranges) must refuse it at `apply` and store nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from cni.netns import entered, iproute_in
from kproxy.lab.probe import parse_answer
from kproxy.proxy import mode as proxy_mode
from kproxy.proxy.types import ServicePort
from tests.conditions import wait_for
from tests.labtools import Lab, asking_meanwhile, kproxy

pytestmark = pytest.mark.kernel

EXTERNAL_IP_ROUTED = "192.168.77.10"  # an externalIP the test routes to node1, as an administrator would
SECOND_CLIENT = "172.18.0.250"  # a second address of `external`: a client outside the source ranges

# What every mode programs: a LoadBalancer (Cluster policy) and an externalIP.
COMMON = f"""
apiVersion: v1
kind: Service
metadata: {{name: lb}}
spec:
  type: LoadBalancer
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: ext-ip}}
spec:
  externalIPs: [{EXTERNAL_IP_ROUTED}]
  selector: {{app: web}}
  ports: [{{port: 8000, targetPort: 8080}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: lone, labels: {{app: lone}}}}
spec:
  nodeName: node3
  containers: [{{name: c, ports: [{{containerPort: 8080}}]}}]
---
apiVersion: v1
kind: Service
metadata: {{name: lone-any}}
spec:
  selector: {{app: lone}}
  ports: [{{port: 80, targetPort: 8080}}]
"""

# What needs traffic policies or the load balancer's firewall, by Service, with the feature a mode
# that lacks them names in its refusal. `lone` is one pod on node3.
POLICIES = {
    "local": ("externalTrafficPolicy Local", """
apiVersion: v1
kind: Service
metadata: {name: local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: lone}
  ports: [{port: 80, targetPort: 8080}]
"""),
    "near": ("internalTrafficPolicy Local", """
apiVersion: v1
kind: Service
metadata: {name: near}
spec:
  internalTrafficPolicy: Local
  selector: {app: lone}
  ports: [{port: 80, targetPort: 8080}]
"""),
    "api-local": ("externalTrafficPolicy Local", """
apiVersion: v1
kind: Service
metadata: {name: api-local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector: {app: api}
  ports: [{port: 80, targetPort: 9000}]
"""),
    "fenced": ("loadBalancerSourceRanges", """
apiVersion: v1
kind: Service
metadata: {name: fenced}
spec:
  type: LoadBalancer
  loadBalancerSourceRanges: ["172.18.0.254/32"]
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""),
}
BYSTANDER = """
apiVersion: v1
kind: Service
metadata: {name: bystander}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"""


def policies_supported(lab: Lab) -> bool:
    probe = ServicePort("default", "local", "", "TCP", "10.96.0.99", 80, node_port=30000, external_policy_local=True)
    return not proxy_mode(lab.info["mode"]).unsupported(probe)


@pytest.fixture
def typed(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    """The lab with COMMON applied, and POLICIES where the mode supports them (applying twice changes nothing)."""
    directory = tmp_path_factory.mktemp("types")
    (directory / "common.yaml").write_text(COMMON)
    kproxy("apply", "--lab", lab.name, "-f", str(directory / "common.yaml"))
    if policies_supported(lab):
        (directory / "policies.yaml").write_text("---".join(text for _, text in POLICIES.values()))
        kproxy("apply", "--lab", lab.name, "-f", str(directory / "policies.yaml"))
    lab.refresh()
    return lab


def load_balancer_ip(lab: Lab, service: str) -> str:
    return str(lab.services[service]["status"]["loadBalancer"]["ingress"][0]["ip"])


def node_ips(lab: Lab) -> dict[str, str]:
    return {node["name"]: node["ip"] for node in lab.info["nodes"]}


def ask_from(lab: Lab, source: str, ip: str, port: int, timeout: float = 2.0) -> dict[str, str] | None:
    """GET / from the external namespace with the given source address; None when nothing answers."""
    try:
        with entered(lab.ns("external")), socket.socket() as sock:
            sock.settimeout(timeout)
            sock.bind((source, 0))
            sock.connect((ip, port))
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:  # refused, timed out, unreachable: no answer
        return None
    return parse_answer(data.decode().splitlines()[-1])


def http_status(lab: Lab, member: str, ip: str, port: int) -> tuple[int, dict[str, Any]]:
    """A GET's status code and JSON body, from member."""
    with entered(lab.ns(member)), socket.create_connection((ip, port), timeout=3) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_load_balancer_gets_an_address_from_the_pool_and_get_svc_shows_it(typed: Lab) -> None:
    ip = load_balancer_ip(typed, "lb")
    assert ip.startswith("172.18.255."), ip
    row = kproxy("get", "svc", "lb", "--lab", typed.name).stdout.splitlines()[1].split()
    port = typed.services["lb"]["spec"]["ports"][0]["nodePort"]
    assert row[:5] == ["lb", "LoadBalancer", typed.ip("lb"), ip, f"80:{port}/TCP"]
    ext = kproxy("get", "svc", "ext-ip", "--lab", typed.name).stdout.splitlines()[1].split()
    assert ext[:5] == ["ext-ip", "ClusterIP", typed.ip("ext-ip"), EXTERNAL_IP_ROUTED, "8000/TCP"]


def test_the_load_balancer_address_answers_outside_clients_and_pods(typed: Lab) -> None:
    ip = load_balancer_ip(typed, "lb")
    seen = Counter(typed.ask("external", ip, 80)["pod"] for _ in range(12))
    assert set(seen) <= {"web-1", "web-2", "web-3"} and seen, seen
    assert typed.ask("client", ip, 80)["pod"].startswith("web-")  # from inside: the same Service
    assert typed.ask("node2", ip, 80)["pod"].startswith("web-")


def test_every_node_announces_a_cluster_policy_address(typed: Lab) -> None:
    routes = json.loads(subprocess.run(["ip", "-n", f"kp_{typed.name}_external", "-j", "route", "show",
                                        "proto", "bgp"], check=True, capture_output=True, text=True).stdout)
    lb = next(r for r in routes if r["dst"] == load_balancer_ip(typed, "lb"))
    assert sorted(hop["gateway"] for hop in lb["nexthops"]) == sorted(node_ips(typed).values())


@pytest.fixture
def routed_external_ip(typed: Lab) -> Iterator[str]:
    """The externalIP routed from `external` to node1 (in a cluster the administrator's job)."""
    with iproute_in(typed.ns("external")) as ipr:
        ipr.route("replace", dst=f"{EXTERNAL_IP_ROUTED}/32", gateway=node_ips(typed)["node1"])
    try:
        yield EXTERNAL_IP_ROUTED
    finally:
        with iproute_in(typed.ns("external")) as ipr:
            ipr.route("del", dst=f"{EXTERNAL_IP_ROUTED}/32")


def test_an_external_ip_answers_when_routed_to_a_node(typed: Lab, routed_external_ip: str) -> None:
    assert typed.ask("external", routed_external_ip, 8000)["pod"].startswith("web-")
    assert typed.ask("client", routed_external_ip, 8000)["pod"].startswith("web-")  # pods too, via their node


def programs(lab: Lab, service: str, tmp_path: Path) -> bool:
    """Whether the lab's mode programs the Service's feature. Where it does not (userspace mode), this
    checks what it must do instead: refuse that Service in one line and store nothing of the apply."""
    if policies_supported(lab):
        return True
    feature, text = POLICIES[service]
    manifest = tmp_path / f"{service}.yaml"
    manifest.write_text(BYSTANDER + "---" + text)
    done = kproxy("apply", "--lab", lab.name, "-f", str(manifest), check=False)
    assert (done.returncode, done.stderr) == (
        1, f"kproxy: error: Service default/{service}: {feature} is not supported in {lab.info['mode']} mode\n")
    lab.refresh()
    assert service not in lab.services and "bystander" not in lab.services
    return False


def test_source_ranges_let_one_outside_client_in_and_drop_another(typed: Lab, tmp_path: Path) -> None:
    if not programs(typed, 'fenced', tmp_path):
        return
    ip = load_balancer_ip(typed, "fenced")
    outside = typed.info["external"]["ip"]
    with iproute_in(typed.ns("external")) as ipr:
        (uplink,) = ipr.link_lookup(ifname="eth0")
        ipr.addr("replace", index=uplink, address=SECOND_CLIENT, prefixlen=24)
    try:
        answer = ask_from(typed, outside, ip, 80)
        assert answer is not None and answer["pod"].startswith("web-")
        assert ask_from(typed, SECOND_CLIENT, ip, 80) is None
        # The ranges guard the load-balancer address only: NodePorts are open to all (kube-proxy: "for
        # better or for worse, nodeports are not subject to loadBalancerSourceRanges").
        assert ask_from(typed, SECOND_CLIENT, node_ips(typed)["node1"], typed.node_port("fenced")) is not None
    finally:
        with iproute_in(typed.ns("external")) as ipr:
            ipr.addr("del", index=uplink, address=SECOND_CLIENT, prefixlen=24)


def test_local_policy_keeps_the_client_address_and_nodes_without_an_endpoint_drop(typed: Lab, tmp_path: Path) -> None:
    if not programs(typed, 'local', tmp_path):
        return
    outside = typed.info["external"]["ip"]
    answer = typed.ask("external", load_balancer_ip(typed, "local"), 80)
    assert answer["pod"] == "lone" and answer["client"].split(":")[0] == outside
    port = typed.node_port("local")
    ips = node_ips(typed)
    answer = typed.ask("external", ips["node3"], port)
    assert answer["pod"] == "lone" and answer["client"].split(":")[0] == outside
    for node in ("node1", "node2"):
        assert ask_from(typed, outside, ips[node], port) is None, node
    # From inside the cluster the load-balancer address takes the cluster-wide path (kube-proxy's short circuit).
    assert typed.ask("client", load_balancer_ip(typed, "local"), 80)["pod"] == "lone"


def test_only_nodes_with_an_endpoint_announce_a_local_policy_address(typed: Lab, tmp_path: Path) -> None:
    if not programs(typed, 'local', tmp_path):
        return
    routes = json.loads(subprocess.run(["ip", "-n", f"kp_{typed.name}_external", "-j", "route", "show",
                                        "proto", "bgp"], check=True, capture_output=True, text=True).stdout)
    local = next(r for r in routes if r["dst"] == load_balancer_ip(typed, "local"))
    assert local["gateway"] == node_ips(typed)["node3"]


def test_the_health_check_node_port_says_which_nodes_have_an_endpoint(typed: Lab, tmp_path: Path) -> None:
    if not programs(typed, 'local', tmp_path):
        return
    port = int(typed.services["local"]["spec"]["healthCheckNodePort"])
    for node, ip in node_ips(typed).items():
        code, body = http_status(typed, "external", ip, port)
        local = 1 if node == "node3" else 0
        assert (code, body) == (200 if local else 503, {"service": {"namespace": "default", "name": "local"},
                                                        "localEndpoints": local, "serviceProxyHealthy": True}), node


def test_internal_local_policy_serves_pods_on_the_endpoints_node_only(typed: Lab, tmp_path: Path) -> None:
    if not programs(typed, 'near', tmp_path):
        return
    assert typed.ask("web-3", typed.ip("near"), 80)["pod"] == "lone"  # web-3 and lone share node3
    with pytest.raises(OSError):
        typed.ask("web-1", typed.ip("near"), 80, timeout=2)  # node1 has none: dropped


def test_a_rollout_behind_a_local_policy_load_balancer_fails_no_request(typed: Lab, tmp_path: Path) -> None:
    if not programs(typed, 'api-local', tmp_path):
        return
    ip = load_balancer_ip(typed, "api-local")
    with asking_meanwhile(lambda: typed.ask("external", ip, 80, timeout=3)) as (answers, errors):
        kproxy("rollout", "restart", "--lab", typed.name, "deploy/api")
    served = Counter(answer["pod"] for answer in answers)
    after = {p["metadata"]["name"] for p in typed.pods("app=api")}
    assert errors == [] and sum(served.values()) > 20, (errors[:5], served)
    assert {answer["client"].split(":")[0] for answer in answers} == {typed.info["external"]["ip"]}
    assert set(served) & after  # the new pods served too


# Long enough that the pod still serves while a test sees it terminating and asks it: in the
# emulated guest each `kproxy get` of that wait takes seconds, and a 6 s grace once ran out first.
TERMINATING_GRACE = 20


def _delete_in_background(lab: Lab, pod: str) -> threading.Thread:
    thread = threading.Thread(target=kproxy, args=("delete", "pod", pod, "--lab", lab.name,
                                                   "--grace-period", str(TERMINATING_GRACE)))
    thread.start()
    return thread


def _terminating(lab: Lab, pod: str) -> bool:
    slices = json.loads(kproxy("get", "endpointslices", "--lab", lab.name, "-o", "json").stdout)["items"]
    return any(ep["targetRef"]["name"] == pod and ep["conditions"] == {"ready": False, "serving": True,
                                                                       "terminating": True}
               for s in slices for ep in s.get("endpoints") or ())


def test_a_terminating_endpoint_serves_only_while_no_endpoint_is_ready(typed: Lab, tmp_path: Path) -> None:
    [first, second] = sorted(p["metadata"]["name"] for p in typed.pods("app=api"))
    going = _delete_in_background(typed, first)
    try:
        wait_for(f"{first} terminating", lambda: _terminating(typed, first), timeout=10)
        picks = Counter(typed.ask("client", typed.ip("api"), 80)["pod"] for _ in range(15))
        assert set(picks) == {second}, picks  # a ready endpoint is there: the terminating one gets nothing
    finally:
        going.join()
    local = programs(typed, "local", tmp_path)
    lone = _delete_in_background(typed, "lone")
    try:
        wait_for("lone terminating", lambda: _terminating(typed, "lone"), timeout=10)
        # lone is the only endpoint, terminating and still serving: the Service falls back to it.
        assert typed.ask("client", typed.ip("lone-any"), 80)["pod"] == "lone"
        if local:  # and so does a Local policy on lone's node
            assert typed.ask("external", node_ips(typed)["node3"], typed.node_port("local"))["pod"] == "lone"
    finally:
        lone.join()
        manifest = tmp_path / "common.yaml"
        manifest.write_text(COMMON)
        kproxy("apply", "--lab", typed.name, "-f", str(manifest))  # lone back, for a rerun
