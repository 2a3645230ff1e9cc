"""The Kubernetes object layer: manifests parse, validate and print like Kubernetes (no root)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from kproxy import controllers, model
from kproxy.controllers import obj_key
from kproxy.errors import KproxyError
from kproxy.model import parse_manifests, parse_object
from kproxy.selectors import parse_selector, selector_from_match

# --- the examples of the Kubernetes docs, unchanged ------------------------------------

DOCS_NODEPORT = """\
apiVersion: v1
kind: Service
metadata:
  name: service-python
spec:
  ports:
  - port: 3000
    protocol: TCP
    targetPort: 80
    nodePort: 30080
  selector:
    run: pod-python
  type: NodePort
"""

DOCS_NGINX_DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: nginx-deployment
  labels:
    app: nginx
spec:
  replicas: 3
  selector:
    matchLabels:
      app: nginx
  template:
    metadata:
      labels:
        app: nginx
    spec:
      containers:
      - name: nginx
        image: nginx:1.14.2
        ports:
        - containerPort: 80
"""

DOCS_NAMED_TARGET_PORT = """\
apiVersion: v1
kind: Pod
metadata:
  name: nginx
  labels:
    app.kubernetes.io/name: proxy
spec:
  containers:
  - name: nginx
    image: nginx:stable
    ports:
      - containerPort: 80
        name: http-web-svc

---
apiVersion: v1
kind: Service
metadata:
  name: nginx-service
spec:
  selector:
    app.kubernetes.io/name: proxy
  ports:
  - name: name-of-service-port
    protocol: TCP
    port: 80
    targetPort: http-web-svc
"""

DOCS_MULTI_PORT = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 9376
    - name: https
      protocol: TCP
      port: 443
      targetPort: 9377
"""

DOCS_NODEPORT_MYAPP = """\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  type: NodePort
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - port: 80
      # By default and for convenience, the `targetPort` is set to
      # the same value as the `port` field.
      targetPort: 80
      # Optional field
      # By default and for convenience, the Kubernetes control plane
      # will allocate a port from a range (default: 30000-32767)
      nodePort: 30007
"""


def test_docs_nodeport_service() -> None:
    [svc] = parse_manifests(DOCS_NODEPORT, "svc.yaml")
    assert svc == {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "service-python", "namespace": "default"},
        "spec": {"externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"],
                 "ipFamilyPolicy": "SingleStack",
                 "ports": [{"port": 3000, "protocol": "TCP", "targetPort": 80, "nodePort": 30080}],
                 "selector": {"run": "pod-python"}, "sessionAffinity": "None", "type": "NodePort"},
        "status": {"loadBalancer": {}},
    }
    # the API server's field order, as `kproxy get -o json` prints it
    assert list(svc) == ["apiVersion", "kind", "metadata", "spec", "status"]
    assert list(svc["spec"]) == sorted(svc["spec"])
    assert "clusterIP" not in svc["spec"]  # to allocate
    assert obj_key(svc) == "Service/default/service-python"


def test_docs_nginx_deployment() -> None:
    [dep] = parse_manifests(DOCS_NGINX_DEPLOYMENT, "nginx.yaml")
    assert dep["kind"] == "Deployment" and dep["apiVersion"] == "apps/v1"
    meta, spec = dep["metadata"], dep["spec"]
    assert (meta["name"], meta["namespace"], spec["replicas"], spec["strategy"]["type"]) == \
        ("nginx-deployment", "default", 3, "RollingUpdate")
    assert meta["labels"] == {"app": "nginx"}
    assert selector_from_match(spec["selector"]) == parse_selector("app=nginx")
    assert spec["template"]["metadata"] == {"labels": {"app": "nginx"}}
    assert spec["template"]["spec"]["containers"] == [
        {"name": "nginx", "image": "nginx:1.14.2", "ports": [{"containerPort": 80, "protocol": "TCP"}]},
    ]


def test_docs_named_target_port() -> None:
    pod, svc = parse_manifests(DOCS_NAMED_TARGET_PORT, "nginx.yaml")
    assert pod["kind"] == "Pod" and svc["kind"] == "Service"
    assert svc["spec"]["ports"] == [{"name": "name-of-service-port", "port": 80, "protocol": "TCP",
                                     "targetPort": "http-web-svc"}]
    # The named targetPort resolves on the pod as the endpoint-slice controller reads both.
    assert controllers.selects(svc["spec"]["selector"], pod["metadata"]["labels"])
    port, pod_spec = svc["spec"]["ports"][0], pod["spec"]
    assert controllers.resolve_target_port(port, pod_spec) == 80
    assert controllers.resolve_target_port(port | {"protocol": "UDP"}, pod_spec) is None
    assert controllers.resolve_target_port(port | {"targetPort": 8080}, pod_spec) == 8080


def test_docs_multi_port_and_nodeport() -> None:
    [multi] = parse_manifests(DOCS_MULTI_PORT, "a.yaml")
    assert [(p["name"], p["port"], p["targetPort"]) for p in multi["spec"]["ports"]] == \
        [("http", 80, 9376), ("https", 443, 9377)]
    [np] = parse_manifests(DOCS_NODEPORT_MYAPP, "b.yaml")
    assert np["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80, "nodePort": 30007}]


def test_defaults() -> None:
    [svc, pod, dep] = parse_manifests(
        """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, annotations: {kproxy.io/scheduler: wrr}}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, labels: {app: web}}
spec:
  nodeName: node1
  nodeSelector: {kubernetes.io/hostname: node1}
  containers: [{name: c, ports: [{containerPort: 53, protocol: UDP, name: dns}]}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  selector: {matchExpressions: [{key: app, operator: In, values: [web]}]}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c}]}
""",
        "all.yaml",
    )
    assert svc["metadata"] == {"name": "web", "namespace": "shop", "annotations": {"kproxy.io/scheduler": "wrr"}}
    assert svc["spec"]["type"] == "ClusterIP" and "externalTrafficPolicy" not in svc["spec"]
    assert svc["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 10800}}
    assert svc["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    assert pod["metadata"]["namespace"] == "default"
    assert pod["spec"] == {
        "containers": [{"name": "c", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}],
        "nodeName": "node1",
        "nodeSelector": {"kubernetes.io/hostname": "node1"},
    }
    assert pod["status"] == {"phase": "Pending"}
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "25%"}}
    assert dep["spec"]["selector"] == {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web"]}]}
    assert dep["status"] == {}


def test_headless_external_name_and_a_pod_named_under_a_service() -> None:
    [headless, alias, pod] = parse_manifests(
        """\
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}}
---
apiVersion: v1
kind: Service
metadata: {name: search}
spec: {type: ExternalName, externalName: search.example.com.}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: c}]}
""",
        "dns.yaml",
    )
    assert headless["spec"] == {"clusterIP": "None", "clusterIPs": ["None"], "internalTrafficPolicy": "Cluster",
                                "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "selector": {"app": "db"},
                                "sessionAffinity": "None", "type": "ClusterIP"}
    assert alias["spec"] == {"externalName": "search.example.com", "sessionAffinity": "None", "type": "ExternalName"}
    assert pod["spec"] == {"containers": [{"name": "c"}], "hostname": "db-0", "subdomain": "db"}
    assert parse_object(headless) == headless and parse_object(alias) == alias and parse_object(pod) == pod


def test_load_balancer_and_external_ips_are_defaulted_as_the_api_server_does() -> None:
    [lb, external] = parse_manifests(
        """\
apiVersion: v1
kind: Service
metadata: {name: shop}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  loadBalancerIP: 172.18.255.20
  loadBalancerSourceRanges: [" 172.18.0.254/32"]
  selector: {app: shop}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: legacy}
spec:
  externalIPs: [192.168.50.10]
  internalTrafficPolicy: Local
  selector: {app: legacy}
  ports: [{port: 80}]
""",
        "lb.yaml",
    )
    assert lb["spec"] == {"externalTrafficPolicy": "Local", "loadBalancerIP": "172.18.255.20",
                          "loadBalancerSourceRanges": ["172.18.0.254/32"], "allocateLoadBalancerNodePorts": True,
                          "internalTrafficPolicy": "Cluster", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                          "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}], "selector": {"app": "shop"},
                          "sessionAffinity": "None", "type": "LoadBalancer"}
    assert lb["status"] == {"loadBalancer": {}}  # the lab's load balancer fills it (kproxy.controllers)
    assert external["spec"] == {"externalIPs": ["192.168.50.10"], "externalTrafficPolicy": "Cluster",
                                "internalTrafficPolicy": "Local", "ipFamilies": ["IPv4"],
                                "ipFamilyPolicy": "SingleStack", "ports": [{"port": 80, "protocol": "TCP",
                                                                            "targetPort": 80}],
                                "selector": {"app": "legacy"}, "sessionAffinity": "None", "type": "ClusterIP"}
    assert parse_object(lb) == lb and parse_object(external) == external


def test_list_and_empty_documents() -> None:
    text = "---\n" + DOCS_MULTI_PORT + "---\n---\n" + yaml.safe_dump(
        {"apiVersion": "v1", "kind": "List", "items": [yaml.safe_load(DOCS_NODEPORT), yaml.safe_load(DOCS_NGINX_DEPLOYMENT)]}
    )
    names = [(o["kind"], o["metadata"]["name"]) for o in parse_manifests(text, "x.yaml")]
    assert names == [("Service", "my-service"), ("Service", "service-python"), ("Deployment", "nginx-deployment")]
    assert parse_manifests("", "empty.yaml") == []


# --- invalid input: the exact message ------------------------------------------------------


def service(spec: dict[str, Any], name: str = "web", **meta: Any) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, **meta}, "spec": spec})


def ports(*items: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {"selector": {"app": "web"}, "ports": list(items), **spec}


SERVICE_ERRORS = [
    (
        ports({"name": "a", "port": 80, "nodePort": 30080}, {"name": "b", "port": 81, "nodePort": 40000}, type="NodePort"),
        "Service default/web: spec.ports[1].nodePort: 40000 is outside the NodePort range 30000-32767",
    ),
    (ports({"port": 0}), "Service default/web: spec.ports[0].port: 0 is not a valid port number (1-65535)"),
    (ports({"port": 65536}), "Service default/web: spec.ports[0].port: 65536 is not a valid port number (1-65535)"),
    (ports({"port": "80"}), 'Service default/web: spec.ports[0].port: must be an integer, got "80"'),
    (ports({"name": "x"}), "Service default/web: spec.ports[0].port: required"),
    (ports({"port": 80, "targetPort": 70000}),
     "Service default/web: spec.ports[0].targetPort: 70000 is not a valid port number (1-65535)"),
    (ports({"port": 80, "targetPort": "8080"}),
     'Service default/web: spec.ports[0].targetPort: "8080" is not a valid port name: must contain at least one letter (a-z)'),
    (ports({"port": 80, "targetPort": "Http"}),
     'Service default/web: spec.ports[0].targetPort: "Http" is not a valid port name: '
     "must contain only lowercase alphanumeric characters (a-z, 0-9) and '-'"),
    (ports({"port": 80, "protocol": "SCTP"}),
     'Service default/web: spec.ports[0].protocol: unsupported protocol "SCTP" (kproxy supports TCP and UDP)'),
    (ports({"port": 80, "protocol": "tcp"}),
     'Service default/web: spec.ports[0].protocol: unsupported protocol "tcp" (TCP or UDP)'),
    (ports({"port": 80}, {"port": 81}),
     "Service default/web: spec.ports[0].name: required when the Service has more than one port"),
    (ports({"name": "http", "port": 80}, {"name": "http", "port": 81}),
     'Service default/web: spec.ports[1].name: duplicate port name "http" (also spec.ports[0])'),
    (ports({"name": "a", "port": 80}, {"name": "b", "port": 80}),
     "Service default/web: spec.ports[1]: duplicate port 80/TCP (also spec.ports[0])"),
    (ports({"name": "a", "port": 53, "protocol": "UDP", "nodePort": 30053},
           {"name": "b", "port": 54, "protocol": "UDP", "nodePort": 30053}, type="NodePort"),
     "Service default/web: spec.ports[1].nodePort: duplicate nodePort 30053/UDP (also spec.ports[0])"),
    (ports({"port": 80, "nodePort": 30080}),
     "Service default/web: spec.ports[0].nodePort: may not be used when spec.type is ClusterIP"),
    (ports({"name": "Http", "port": 80}),
     'Service default/web: spec.ports[0].name: "Http" is not a valid port name: a DNS-1123 label (lowercase '
     "alphanumeric characters or '-', starting and ending with an alphanumeric character, at most 63 characters)"),
    (ports({"port": 80, "nodeport": 30080}), 'Service default/web: spec.ports[0]: unknown field "nodeport"'),
    ({"selector": {"app": "web"}}, "Service default/web: spec.ports: required (at least one port)"),
    (ports({"port": 80}, clusterIP="None", type="NodePort"),
     "Service default/web: spec.clusterIP: None (headless) requires spec.type ClusterIP, not NodePort"),
    ({"type": "ExternalName"}, "Service default/web: spec.externalName: required when spec.type is ExternalName"),
    ({"type": "ExternalName", "externalName": "DB.example.com"},
     'Service default/web: spec.externalName: "DB.example.com" is not a valid externalName: a DNS-1123 subdomain '
     "(lowercase alphanumeric characters, '-' or '.', starting and ending with an alphanumeric character, "
     "at most 253 characters)"),
    ({"type": "ExternalName", "externalName": "db.example.com", "clusterIP": "10.96.0.20"},
     "Service default/web: spec.clusterIP: must not be set when spec.type is ExternalName"),
    (ports({"port": 80, "nodePort": 30080}, type="ExternalName", externalName="db.example.com"),
     "Service default/web: spec.ports[0].nodePort: may not be used when spec.type is ExternalName"),
    (ports({"port": 80}, externalName="db.example.com"),
     "Service default/web: spec.externalName: may only be set when spec.type is ExternalName"),
    (ports({"port": 80}, clusterIP="10.96.0.300"),
     'Service default/web: spec.clusterIP: "10.96.0.300" is not a valid IP address'),
    (ports({"port": 80}, clusterIP="fd00::1"), 'Service default/web: spec.clusterIP: "fd00::1": IPv6 is not supported'),
    (ports({"port": 80}, clusterIP="10.96.0.10", clusterIPs=["10.96.0.11"]),
     'Service default/web: spec.clusterIPs[0]: "10.96.0.11" must match spec.clusterIP "10.96.0.10"'),
    (ports({"port": 80}, type="Nodeport"),
     'Service default/web: spec.type: "Nodeport" is not a valid Service type '
     '(ClusterIP, NodePort, LoadBalancer or ExternalName)'),
    (ports({"port": 80}, externalIPs=["192.168.1.300"]),
     'Service default/web: spec.externalIPs[0]: "192.168.1.300" is not a valid IP address'),
    (ports({"port": 80}, externalIPs=["fd00::1"]),
     'Service default/web: spec.externalIPs[0]: "fd00::1": IPv6 is not supported'),
    (ports({"port": 80}, clusterIP="None", externalIPs=["192.168.1.10"]),
     "Service default/web: spec.externalIPs: may not be set for a headless Service"),
    (ports({"port": 80}, externalTrafficPolicy="Local"),
     "Service default/web: spec.externalTrafficPolicy: may only be set for externally-accessible Services "
     "(NodePort, LoadBalancer, or externalIPs)"),
    (ports({"port": 80}, externalTrafficPolicy="local", type="NodePort"),
     'Service default/web: spec.externalTrafficPolicy: "local" is not valid (Cluster or Local)'),
    (ports({"port": 80}, internalTrafficPolicy="Node"),
     'Service default/web: spec.internalTrafficPolicy: "Node" is not valid (Cluster or Local)'),
    (ports({"port": 80}, type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=30100),
     "Service default/web: spec.healthCheckNodePort: may only be set when spec.type is LoadBalancer "
     "and spec.externalTrafficPolicy is Local"),
    (ports({"port": 80}, type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=100),
     "Service default/web: spec.healthCheckNodePort: 100 is outside the NodePort range 30000-32767"),
    (ports({"port": 80}, type="NodePort", loadBalancerSourceRanges=["10.0.0.0/8"]),
     "Service default/web: spec.loadBalancerSourceRanges: may only be used when spec.type is LoadBalancer"),
    (ports({"port": 80}, loadBalancerIP="172.18.255.7"),
     "Service default/web: spec.loadBalancerIP: may only be used when spec.type is LoadBalancer"),
    (ports({"port": 80}, type="LoadBalancer", loadBalancerSourceRanges=["10.0.0.0/33"]),
     'Service default/web: spec.loadBalancerSourceRanges[0]: "10.0.0.0/33" is not a valid CIDR (e.g. 192.168.0.0/24)'),
    (ports({"port": 80}, type="LoadBalancer", loadBalancerIP="172.18.255.x"),
     'Service default/web: spec.loadBalancerIP: "172.18.255.x" is not a valid IP address'),
    (ports({"port": 80}, type="LoadBalancer", allocateLoadBalancerNodePorts="no"),
     'Service default/web: spec.allocateLoadBalancerNodePorts: must be true or false, got "no"'),
    (ports({"port": 80}, sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}}),
     "Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is outside the range 1-86400"),
    (ports({"port": 80}, sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
     "Service default/web: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is outside the range 1-86400"),
    (ports({"port": 80}, sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
     "Service default/web: spec.sessionAffinityConfig: must not be set when spec.sessionAffinity is None"),
    (ports({"port": 80}, sessionAffinity="Sticky"),
     'Service default/web: spec.sessionAffinity: "Sticky" is not valid (None or ClientIP)'),
    (ports({"port": 80}, selectr={"app": "web"}), 'Service default/web: spec: unknown field "selectr"'),
    ({"selector": {"version": 1}, "ports": [{"port": 80}]},
     "Service default/web: spec.selector.version: label value must be a string, got 1 (quote it)"),
]


@pytest.mark.parametrize(("spec", "message"), SERVICE_ERRORS)
def test_service_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(KproxyError) as e:
        parse_manifests(service(spec), "web.yaml")
    assert str(e.value) == message


def test_service_names() -> None:
    with pytest.raises(KproxyError) as e:
        parse_manifests(service(ports({"port": 80}), name="1web"), "web.yaml")
    assert str(e.value) == (
        'Service default/1web: metadata.name: "1web" is not a valid Service name: a DNS-1035 label (lowercase '
        "alphanumeric characters or '-', starting with a letter and ending with an alphanumeric character, "
        "at most 63 characters)"
    )
    with pytest.raises(KproxyError, match=r'^Service Shop/web: metadata.namespace: "Shop" is not a valid namespace'):
        parse_manifests(service(ports({"port": 80}), namespace="Shop"), "web.yaml")
    # Pods may start with a digit and hold dots (DNS-1123 subdomain)
    pod = yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "1.web"},
                          "spec": {"containers": [{"name": "c"}]}})
    assert parse_manifests(pod, "p.yaml")[0]["metadata"]["name"] == "1.web"


def test_node_port_range_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    text = service(ports({"port": 80, "nodePort": 40000}, type="NodePort"))
    monkeypatch.setattr(model, "NODE_PORT_RANGE", (20000, 40000))
    assert parse_manifests(text, "web.yaml")[0]["spec"]["ports"][0]["nodePort"] == 40000
    monkeypatch.setattr(model, "NODE_PORT_RANGE", (20000, 39999))
    with pytest.raises(KproxyError, match="outside the NodePort range 20000-39999$"):
        parse_manifests(text, "web.yaml")


def deployment(spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": spec})


TEMPLATE = {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c"}]}}

DEPLOYMENT_ERRORS = [
    ({"template": TEMPLATE}, "Deployment default/web: spec.selector: required"),
    ({"selector": {}, "template": TEMPLATE},
     "Deployment default/web: spec.selector: empty selector is invalid for a Deployment"),
    ({"selector": {"matchLabels": {"app": "db"}}, "template": TEMPLATE},
     "Deployment default/web: spec.template.metadata.labels: selector 'app=db' does not match template labels"),
    ({"selector": {"matchExpressions": [{"key": "app", "operator": "In"}]}, "template": TEMPLATE},
     "Deployment default/web: spec.selector.matchExpressions[0].values: must be specified when operator is In or NotIn"),
    ({"selector": {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["web"]}]}, "template": TEMPLATE},
     "Deployment default/web: spec.selector.matchExpressions[0].values: "
     "may not be specified when operator is Exists or DoesNotExist"),
    ({"selector": {"matchLabel": {"app": "web"}}, "template": TEMPLATE},
     "Deployment default/web: spec.selector: unknown field 'matchLabel' (expected matchLabels or matchExpressions)"),
    ({"replicas": -1, "selector": {"matchLabels": {"app": "web"}}, "template": TEMPLATE},
     "Deployment default/web: spec.replicas: -1 must be greater than or equal to 0"),
    ({"selector": {"matchLabels": {"app": "web"}}, "template": TEMPLATE, "strategy": {"type": "BlueGreen"}},
     'Deployment default/web: spec.strategy.type: "BlueGreen" is not valid (RollingUpdate or Recreate)'),
    ({"selector": {"matchLabels": {"app": "web"}},
      "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": []}}},
     "Deployment default/web: spec.template.spec.containers: required (at least one container)"),
    ({"selector": {"matchLabels": {"app": "web"}},
      "template": {"metadata": {"labels": {"app": "web"}},
                   "spec": {"containers": [{"name": "a", "ports": [{"name": "http", "containerPort": 80}]},
                                           {"name": "b", "ports": [{"name": "http", "containerPort": 81}]}]}}},
     'Deployment default/web: spec.template.spec.containers[1].ports[0].name: duplicate port name "http" '
     "(also spec.template.spec.containers[0].ports[0])"),
]


@pytest.mark.parametrize(("spec", "message"), DEPLOYMENT_ERRORS)
def test_deployment_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(KproxyError) as e:
        parse_manifests(deployment(spec), "dep.yaml")
    assert str(e.value) == message


def pod(spec: dict[str, Any]) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec})


POD_ERRORS = [
    ({"containers": [{"name": "c", "ports": [{"containerPort": 0}]}]},
     "Pod default/p: spec.containers[0].ports[0].containerPort: 0 is not a valid port number (1-65535)"),
    ({"containers": [{"name": "c", "ports": [{"name": "http"}]}]},
     "Pod default/p: spec.containers[0].ports[0].containerPort: required"),
    ({"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80},
                                             {"name": "http", "containerPort": 81}]}]},
     'Pod default/p: spec.containers[0].ports[1].name: duplicate port name "http" (also spec.containers[0].ports[0])'),
    ({"containers": [{"name": "c", "ports": [{"name": "a-very-long-port-name", "containerPort": 80}]}]},
     'Pod default/p: spec.containers[0].ports[0].name: "a-very-long-port-name" is not a valid port name: '
     "must be no more than 15 characters"),
    ({"containers": [{"name": "c", "ports": [{"containerPort": 80, "protocol": "SCTP"}]}]},
     'Pod default/p: spec.containers[0].ports[0].protocol: unsupported protocol "SCTP" (kproxy supports TCP and UDP)'),
    ({"containers": [{"image": "nginx"}]}, "Pod default/p: spec.containers[0].name: required"),
    ({"containers": [{"name": "c"}, {"name": "c"}]}, 'Pod default/p: spec.containers[1].name: duplicate container name "c"'),
    ({}, "Pod default/p: spec.containers: required (at least one container)"),
    ({"containers": [{"name": "c"}], "nodeSelector": {"disk": True}},
     "Pod default/p: spec.nodeSelector.disk: label value must be a string, got true (quote it)"),
]


@pytest.mark.parametrize(("spec", "message"), POD_ERRORS)
def test_pod_errors(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(KproxyError) as e:
        parse_manifests(pod(spec), "pod.yaml")
    assert str(e.value) == message


DOCUMENT_ERRORS = [
    ("apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: web}\n",
     'web.yaml: document 1 (Ingress/web): unknown kind "Ingress" '
     "(kproxy knows v1 Service, v1 Pod, apps/v1 Deployment and v1 List)"),
    (DOCS_NODEPORT + "---\napiVersion: extensions/v1beta1\nkind: Deployment\nmetadata: {name: old}\n",
     'web.yaml: document 2 (Deployment/old): unknown apiVersion "extensions/v1beta1" for kind Deployment (use apps/v1)'),
    ("kind: Service\nmetadata: {name: web}\n", "web.yaml: document 1 (Service/web): apiVersion not set"),
    ("metadata: {name: web}\n", "web.yaml: document 1: apiVersion and kind not set"),
    ("apiVersion: v1\nkind: Service\nspec: {}\n", "web.yaml: document 1 (Service): metadata.name: required"),
    ("- a\n- b\n", "web.yaml: document 1: not a Kubernetes object (a map with apiVersion and kind)"),
    ("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: ConfigMap, metadata: {name: c}}\n",
     'web.yaml: document 1, items[0] (ConfigMap/c): unknown kind "ConfigMap" '
     "(kproxy knows v1 Service, v1 Pod, apps/v1 Deployment and v1 List)"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: web\n", "web.yaml: invalid YAML: expected ',' or '}', but got "
     "'<stream end>' at line 4 column 1"),
    ("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspecs: {}\n", 'Service default/web: unknown field "specs"'),
]


@pytest.mark.parametrize(("text", "message"), DOCUMENT_ERRORS)
def test_document_errors(text: str, message: str) -> None:
    with pytest.raises(KproxyError) as e:
        parse_manifests(text, "web.yaml")
    assert str(e.value) == message


# --- the stored form parses to itself ---------------------------------------------------------


def test_service_stored_form_parses_to_itself() -> None:
    [svc] = parse_manifests(DOCS_NODEPORT, "svc.yaml")
    allocated = json.loads(json.dumps(svc))
    controllers.allocate_cluster_ips([allocated], [])
    ip = allocated["spec"]["clusterIP"]
    assert allocated["spec"]["clusterIPs"] == [ip]
    out = parse_object(allocated)
    assert out == allocated and out is not allocated
    assert list(out["spec"]) == sorted(out["spec"])  # an allocated clusterIP in its place
    assert parse_object(out) == out


def test_affinity_named_ports_parse_to_themselves() -> None:
    text = service(ports({"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"},
                         {"name": "web", "port": 80, "targetPort": 8080},
                         sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}}),
                   labels={"team": "a"}, annotations={"kproxy.io/scheduler": "rr"})
    [out] = parse_manifests(text, "web.yaml")
    assert "clusterIP" not in out["spec"]
    assert out["spec"]["sessionAffinityConfig"] == {"clientIP": {"timeoutSeconds": 60}}
    assert out["spec"]["ports"][0] == {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}
    assert out["metadata"] == {"name": "web", "namespace": "default", "labels": {"team": "a"},
                               "annotations": {"kproxy.io/scheduler": "rr"}}
    assert parse_object(out) == out


def test_pod_and_deployment_parse_to_themselves() -> None:
    pod_, _ = parse_manifests(DOCS_NAMED_TARGET_PORT, "nginx.yaml")
    assert pod_["spec"]["containers"][0]["ports"] == [{"name": "http-web-svc", "containerPort": 80, "protocol": "TCP"}]
    assert parse_object(pod_) == pod_
    # status is the API server's: what a manifest says there is not kept
    running = pod_ | {"status": {"podIP": "10.244.1.5", "phase": "Running"}}
    assert parse_object(running) == pod_ and running["status"]["phase"] == "Running"
    [dep] = parse_manifests(DOCS_NGINX_DEPLOYMENT, "nginx.yaml")
    assert dep["apiVersion"] == "apps/v1" and dep["spec"]["selector"] == {"matchLabels": {"app": "nginx"}}
    assert dep["spec"]["strategy"]["type"] == "RollingUpdate" and dep["status"] == {}
    assert parse_object(dep) == dep
    assert parse_object(dep | {"status": {"readyReplicas": 3}}) == dep


def test_parsing_shares_nothing_with_its_input() -> None:
    """Readers and the cluster change stored objects in place (allocations, nodeName):
    the input document must not change with them."""
    doc = yaml.safe_load(DOCS_NGINX_DEPLOYMENT)
    before = json.dumps(doc)
    dep = parse_object(doc)
    dep["metadata"]["labels"]["x"] = "y"
    dep["spec"]["template"]["metadata"]["labels"]["x"] = "y"
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = "UDP"
    assert json.dumps(doc) == before


def test_other_builders_make_what_a_manifest_would() -> None:
    """The lab's topology pods and the benchmark's Services come from k8sform's builders,
    as manifests do: each parses to itself, every default written out."""
    from kproxy.bench.controlplane import service as bench_service
    from kproxy.lab.planning import TOPOLOGY_ANNOTATION, topology_pod_objects
    from kproxy.lab.topology import parse_topology, place_pods

    topology = parse_topology({"nodes": [{"name": "node1"}],
                               "pods": [{"name": "web-1", "labels": {"app": "web"}, "ports": [8080, 9090]}]}, name="lab")
    (pod,) = topology_pod_objects(topology, place_pods(topology)).values()
    assert pod["metadata"]["annotations"] == {TOPOLOGY_ANNOTATION: "true"}
    assert pod["spec"]["containers"][0]["ports"] == [{"containerPort": 8080, "protocol": "TCP"},
                                                     {"containerPort": 9090, "protocol": "TCP"}]
    assert parse_object(pod) == pod
    svc = bench_service(300)
    assert svc["spec"]["clusterIP"] == "10.96.1.44" and svc["metadata"]["namespace"] == "bench"
    assert parse_object(svc) == svc
