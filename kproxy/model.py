"""Kubernetes objects kproxy understands: validated and defaulted in one pass, as the API server does.

    objs = parse_manifests(Path("web.yaml").read_text(), "web.yaml")   # kproxy apply -f: what it stores

Each object comes out in its stored Kubernetes form (kproxy.store.Obj, built by
kproxy.k8sform), every default written out, so nothing after this fills one again.

Objects: v1 Service (ClusterIP, NodePort, LoadBalancer, headless, ExternalName), v1 Pod, apps/v1 Deployment, and the
v1 List (plus ServiceList, PodList, DeploymentList) wrappers kubectl accepts.
Validation follows the API server's where a user would notice; messages name
the object and the field:

    Service default/web: spec.ports[1].nodePort: 40000 is outside the NodePort range 30000-32767

Problems found before the object has a name (YAML syntax, unknown kind or
apiVersion, missing metadata.name) name the source and the document instead
(documents count from 1; empty documents are skipped, as kubectl does).

Unknown fields are refused (as `kubectl apply --validate=strict`) at the top
level of an object, in Service .spec, .spec.ports[], label selectors and
container ports; metadata, pod specs and containers are read leniently (only
the fields below are kept). Features kproxy does not emulate (dual stack,
publishNotReadyAddresses, SCTP) are refused as unsupported instead of being
silently ignored. Headless Services
(clusterIP: None) and ExternalName Services get no proxy rules, as in
Kubernetes; cluster DNS (kproxy.dns) serves them.

Not kept: image pull policy, resources, probes, hostPort, appProtocol, and
the like. Container port names are unique across the whole Pod (Kubernetes
checks each container only) so a named targetPort resolves unambiguously.

Status in the input is not kept (a new object's status is the API server's: a
Pod is Pending), nor is the store's identity (uid, resourceVersion, ...), so a
stored object parses to what `apply` would store for it. The returned objects
share nothing with the input. The field checks are kproxy.fields.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import yaml

from kproxy import fields
from kproxy.errors import KproxyError
from kproxy.k8sform import ExternalAccess, container, container_port, deployment_object, external_name_service_object, \
    metadata, pod_object, pod_spec, service_object, service_port
from kproxy.selectors import selector_from_match, validate_labels
from kproxy.store import Obj

# The NodePort range, inclusive (the API server's --service-node-port-range); the parser
# checks given nodePorts and the allocator (kproxy.controllers) hands them out in it.
NODE_PORT_RANGE: tuple[int, int] = (30000, 32767)  # read at use: patch it to change the range
DEFAULT_AFFINITY_SECONDS = 10800
MAX_AFFINITY_SECONDS = 86400
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
NODE_PORT_TYPES = ("NodePort", "LoadBalancer")
HEADLESS = "None"  # spec.clusterIP of a headless Service


# --- parsing ---------------------------------------------------------------------------


_TOP = ("apiVersion", "kind", "metadata", "spec", "status")
_KINDS: dict[str, str] = {"Service": "v1", "Pod": "v1", "Deployment": "apps/v1"}
_LISTS: dict[str, str] = {"List": "v1", "ServiceList": "v1", "PodList": "v1", "DeploymentList": "apps/v1"}


def parse_manifests(text: str, source: str) -> list[Obj]:
    """Every object in a multi-document YAML text, in order (List items flattened)."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise KproxyError(f"{source}: invalid YAML: {problem}{at}") from None
    out: list[Obj] = []
    for n, doc in enumerate(docs, start=1):
        if doc is None:
            continue
        out.extend(_parse_doc(doc, f"{source}: document {n}"))
    return out


def _parse_doc(doc: Any, where: str) -> list[Obj]:
    if not isinstance(doc, dict):
        raise KproxyError(f"{where}: not a Kubernetes object (a map with apiVersion and kind)")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    if isinstance(kind, str) and kind in _LISTS and api == _LISTS[kind]:
        out: list[Obj] = []
        for i, item in enumerate(fields.as_list(doc.get("items"), f"{where}: items")):
            out.extend(_parse_doc(item, f"{where}, items[{i}]"))
        return out
    return [parse_object(doc, where)]


def parse_object(doc: Any, where: str = "object") -> Obj:
    """One Service, Pod or Deployment, validated and defaulted (as YAML loads it, or the store holds it).

    `where` names the document in errors found before the object's name is known.
    """
    if not isinstance(doc, dict):
        raise KproxyError(f"{where}: not a Kubernetes object (a map with apiVersion and kind)")
    kind, api = doc.get("kind"), doc.get("apiVersion")
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    what = f"{kind}/{name}" if isinstance(kind, str) and isinstance(name, str) and name else (
        kind if isinstance(kind, str) and kind else "")
    at = f"{where} ({what})" if what else where
    missing = [f for f in ("apiVersion", "kind") if not doc.get(f)]
    if missing:
        raise KproxyError(f"{at}: {' and '.join(missing)} not set")
    if not isinstance(kind, str) or (kind not in _KINDS and kind not in _LISTS):
        raise KproxyError(
            f"{at}: unknown kind {fields.show(kind)} (kproxy knows v1 Service, v1 Pod, apps/v1 Deployment and v1 List)")
    expected = _KINDS.get(kind) or _LISTS[kind]
    if api != expected:
        raise KproxyError(f"{at}: unknown apiVersion {fields.show(api)} for kind {kind} (use {expected})")
    if kind in _LISTS:
        raise KproxyError(f"{at}: a {kind} here must be a single object")
    if not isinstance(meta, dict) or not isinstance(name, str) or not name:
        if isinstance(meta, dict) and meta.get("generateName"):
            raise KproxyError(f"{at}: metadata.generateName is not supported, set metadata.name")
        raise KproxyError(f"{at}: metadata.name: required")
    namespace = meta.get("namespace") or "default"
    obj_id = f"{kind} {namespace}/{name}" if isinstance(namespace, str) else f"{kind} {name}"
    try:
        fields.known(doc, _TOP, "")
        ns = fields.dns_name(fields.as_str(namespace, "metadata.namespace"), fields.DNS1123_LABEL, 63,
                       f"namespace: a {fields.LABEL_RULE}", "metadata.namespace")
        labels = validate_labels(meta.get("labels"), "metadata.labels")
        annotations = fields.annotations(meta.get("annotations"), "metadata.annotations")
        spec = fields.as_map(doc.get("spec"), "spec")
        if kind == "Service":
            fields.dns_name(name, fields.DNS1035_LABEL, 63, fields.SERVICE_NAME_RULE, "metadata.name")
            return _service(name, ns, labels, annotations, spec)
        fields.dns_name(name, fields.DNS1123_SUBDOMAIN, 253, f"{kind} name: a {fields.SUBDOMAIN_RULE}", "metadata.name")
        if kind == "Pod":
            return pod_object(metadata(name, ns, labels, annotations), _pod_spec(spec, "spec"))
        return _deployment(name, ns, labels, annotations, spec)
    except KproxyError as e:
        msg = str(e).removeprefix(": ")
        raise KproxyError(f"{obj_id}: {msg}") from None


_SERVICE_SPEC = (
    "ports", "selector", "clusterIP", "clusterIPs", "type", "externalIPs", "sessionAffinity",
    "loadBalancerIP", "loadBalancerSourceRanges", "externalName", "externalTrafficPolicy",
    "healthCheckNodePort", "publishNotReadyAddresses", "sessionAffinityConfig", "ipFamilies",
    "ipFamilyPolicy", "allocateLoadBalancerNodePorts", "loadBalancerClass", "internalTrafficPolicy",
    "trafficDistribution",
)
_SERVICE_PORT = ("name", "protocol", "appProtocol", "port", "targetPort", "nodePort")


def _service(name: str, ns: str, labels: dict[str, str], annotations: dict[str, str],
             spec: dict[str, Any]) -> Obj:
    fields.known(spec, _SERVICE_SPEC, "spec")
    type_ = fields.as_str(spec.get("type"), "spec.type") or "ClusterIP"
    if type_ not in SERVICE_TYPES:
        raise KproxyError(f"spec.type: {fields.show(type_)} is not a valid Service type "
                          "(ClusterIP, NodePort, LoadBalancer or ExternalName)")
    _unsupported(spec)
    if type_ == "ExternalName":
        return _external_name_service(name, ns, labels, annotations, spec)
    if spec.get("externalName"):
        raise KproxyError("spec.externalName: may only be set when spec.type is ExternalName")
    cluster_ip = _cluster_ip(spec)
    if cluster_ip == HEADLESS and type_ != "ClusterIP":
        raise KproxyError(f"spec.clusterIP: None (headless) requires spec.type ClusterIP, not {type_}")
    selector = validate_labels(spec.get("selector"), "spec.selector")
    ports = _service_ports(spec.get("ports"), type_, required=cluster_ip != HEADLESS)
    affinity = fields.as_str(spec.get("sessionAffinity"), "spec.sessionAffinity") or "None"
    if affinity not in ("None", "ClientIP"):
        raise KproxyError(f"spec.sessionAffinity: {fields.show(affinity)} is not valid (None or ClientIP)")
    timeout = 0
    config = fields.as_map(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    if affinity == "None" and config:
        raise KproxyError("spec.sessionAffinityConfig: must not be set when spec.sessionAffinity is None")
    if affinity == "ClientIP":
        fields.known(config, ("clientIP",), "spec.sessionAffinityConfig")
        client = fields.as_map(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
        fields.known(client, ("timeoutSeconds",), "spec.sessionAffinityConfig.clientIP")
        where = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
        raw = client.get("timeoutSeconds")
        timeout = DEFAULT_AFFINITY_SECONDS if raw is None else fields.as_int(raw, where)
        if not 1 <= timeout <= MAX_AFFINITY_SECONDS:
            raise KproxyError(f"{where}: {timeout} is outside the range 1-{MAX_AFFINITY_SECONDS}")
    access = _external_access(spec, type_, cluster_ip)
    return service_object(metadata(name, ns, labels, annotations), ports, type_=type_, cluster_ip=cluster_ip,
                          selector=selector, session_affinity=affinity, affinity_timeout_seconds=timeout,
                          access=access)


def _ipv4(v: Any, where: str) -> str:
    text = fields.as_str(v, where)
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise KproxyError(f"{where}: {fields.show(text)} is not a valid IP address") from None
    if addr.version != 4:
        raise KproxyError(f"{where}: {fields.show(text)}: IPv6 is not supported")
    return text


def _only_for_load_balancer(spec: dict[str, Any], type_: str) -> None:
    for name in ("loadBalancerIP", "loadBalancerSourceRanges", "allocateLoadBalancerNodePorts", "loadBalancerClass"):
        if spec.get(name) not in (None, "", []) and type_ != "LoadBalancer":
            raise KproxyError(f"spec.{name}: may only be used when spec.type is LoadBalancer")


def _external_access(spec: dict[str, Any], type_: str, cluster_ip: str) -> ExternalAccess:
    """The fields of how the Service is reached from outside, checked and defaulted as the API server does."""
    _only_for_load_balancer(spec, type_)
    external_ips = tuple(_ipv4(v, f"spec.externalIPs[{i}]")
                         for i, v in enumerate(fields.as_list(spec.get("externalIPs"), "spec.externalIPs")))
    if external_ips and cluster_ip == HEADLESS:
        raise KproxyError("spec.externalIPs: may not be set for a headless Service")
    accessible = type_ in NODE_PORT_TYPES or bool(external_ips)
    external_policy = fields.as_str(spec.get("externalTrafficPolicy"), "spec.externalTrafficPolicy")
    if external_policy and not accessible:
        raise KproxyError("spec.externalTrafficPolicy: may only be set for externally-accessible Services "
                          "(NodePort, LoadBalancer, or externalIPs)")
    external_policy = external_policy or ("Cluster" if accessible else "")
    internal_policy = fields.as_str(spec.get("internalTrafficPolicy"), "spec.internalTrafficPolicy") or "Cluster"
    for where, policy in (("externalTrafficPolicy", external_policy), ("internalTrafficPolicy", internal_policy)):
        if policy not in ("", "Cluster", "Local"):
            raise KproxyError(f"spec.{where}: {fields.show(policy)} is not valid (Cluster or Local)")
    health = 0
    if spec.get("healthCheckNodePort") is not None and not fields.is_zero(spec["healthCheckNodePort"]):
        health = fields.as_int(spec["healthCheckNodePort"], "spec.healthCheckNodePort")
        if type_ != "LoadBalancer" or external_policy != "Local":
            raise KproxyError("spec.healthCheckNodePort: may only be set when spec.type is LoadBalancer "
                              "and spec.externalTrafficPolicy is Local")
        lo, hi = NODE_PORT_RANGE
        if not lo <= health <= hi:
            raise KproxyError(f"spec.healthCheckNodePort: {health} is outside the NodePort range {lo}-{hi}")
    load_balancer_ip = _ipv4(spec["loadBalancerIP"], "spec.loadBalancerIP") if spec.get("loadBalancerIP") else ""
    ranges = []
    for i, raw in enumerate(fields.as_list(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")):
        where = f"spec.loadBalancerSourceRanges[{i}]"
        text = fields.as_str(raw, where).strip()
        try:
            network = ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise KproxyError(f"{where}: {fields.show(text)} is not a valid CIDR (e.g. 192.168.0.0/24)") from None
        if network.version != 4:
            raise KproxyError(f"{where}: {fields.show(text)}: IPv6 is not supported")
        ranges.append(text)
    allocate = spec.get("allocateLoadBalancerNodePorts")
    if allocate is not None and not isinstance(allocate, bool):
        raise KproxyError(f"spec.allocateLoadBalancerNodePorts: must be true or false, got {fields.show(allocate)}")
    return ExternalAccess(
        external_ips=external_ips, external_policy=external_policy, internal_policy=internal_policy,
        health_check_node_port=health, load_balancer_ip=load_balancer_ip, source_ranges=tuple(ranges),
        allocate_node_ports=True if allocate is None else allocate,
        load_balancer_class=fields.as_str(spec.get("loadBalancerClass"), "spec.loadBalancerClass"))


def _external_name_service(name: str, ns: str, labels: dict[str, str], annotations: dict[str, str],
                           spec: dict[str, Any]) -> Obj:
    """An ExternalName Service: a DNS alias (CNAME) and nothing else, no ClusterIP, no proxying."""
    external = fields.as_str(spec.get("externalName"), "spec.externalName").removesuffix(".")
    if not external:
        raise KproxyError("spec.externalName: required when spec.type is ExternalName")
    fields.dns_name(external, fields.DNS1123_SUBDOMAIN, 253, f"externalName: a {fields.SUBDOMAIN_RULE}",
                    "spec.externalName")
    if spec.get("clusterIP") or spec.get("clusterIPs"):
        raise KproxyError("spec.clusterIP: must not be set when spec.type is ExternalName")
    ports = _service_ports(spec.get("ports"), "ExternalName", required=False)
    return external_name_service_object(metadata(name, ns, labels, annotations), external, ports)


def _unsupported(spec: dict[str, Any]) -> None:
    if spec.get("publishNotReadyAddresses"):
        raise KproxyError("spec.publishNotReadyAddresses: unsupported")
    families = fields.as_list(spec.get("ipFamilies"), "spec.ipFamilies")
    if families not in ([], ["IPv4"]):
        raise KproxyError(f"spec.ipFamilies: {families} is unsupported (kproxy is IPv4 single-stack)")
    if spec.get("ipFamilyPolicy") not in (None, "SingleStack", "PreferDualStack"):
        raise KproxyError(f"spec.ipFamilyPolicy: {fields.show(spec['ipFamilyPolicy'])} is unsupported "
                          "(kproxy is IPv4 single-stack)")


def _cluster_ip(spec: dict[str, Any]) -> str:
    ip = fields.as_str(spec.get("clusterIP"), "spec.clusterIP")
    ips = [fields.as_str(v, "spec.clusterIPs") for v in fields.as_list(spec.get("clusterIPs"), "spec.clusterIPs")]
    if len(ips) > 1:
        raise KproxyError("spec.clusterIPs: dual-stack Services are not supported")
    if ips and ip and ips[0] != ip:
        raise KproxyError(f"spec.clusterIPs[0]: {fields.show(ips[0])} must match spec.clusterIP {fields.show(ip)}")
    ip = ip or (ips[0] if ips else "")
    if ip == HEADLESS:
        return ip
    return _ipv4(ip, "spec.clusterIP") if ip else ip


def _service_ports(raw: Any, type_: str, required: bool = True) -> list[Obj]:
    """spec.ports; a headless or ExternalName Service may have none."""
    items = fields.as_list(raw, "spec.ports")
    if not items and required:
        raise KproxyError("spec.ports: required (at least one port)")
    lo, hi = NODE_PORT_RANGE
    ports: list[Obj] = []
    names: dict[str, int] = {}
    seen: dict[tuple[int, str], int] = {}
    node_ports: dict[tuple[int, str], int] = {}
    for i, item in enumerate(items):
        at = f"spec.ports[{i}]"
        p = fields.as_map(item, at)
        fields.known(p, _SERVICE_PORT, at)
        name = fields.as_str(p.get("name"), f"{at}.name")
        if name:
            fields.dns_name(name, fields.DNS1123_LABEL, 63, f"port name: a {fields.LABEL_RULE}", f"{at}.name")
            if name in names:
                raise KproxyError(f"{at}.name: duplicate port name {fields.show(name)} (also spec.ports[{names[name]}])")
            names[name] = i
        elif len(items) > 1:
            raise KproxyError(f"{at}.name: required when the Service has more than one port")
        protocol = fields.protocol(p.get("protocol"), f"{at}.protocol")
        port = fields.port_number(p.get("port"), f"{at}.port")
        if (port, protocol) in seen:
            raise KproxyError(f"{at}: duplicate port {port}/{protocol} (also spec.ports[{seen[port, protocol]}])")
        seen[port, protocol] = i
        target: int | str
        raw_target = p.get("targetPort")
        if raw_target is None or raw_target == "" or fields.is_zero(raw_target):
            target = port
        elif isinstance(raw_target, str):
            target = fields.iana_port_name(raw_target, f"{at}.targetPort")
        else:
            target = fields.port_number(raw_target, f"{at}.targetPort")
        node_port = 0
        if p.get("nodePort") is not None and not fields.is_zero(p["nodePort"]):
            node_port = fields.as_int(p["nodePort"], f"{at}.nodePort")
            if type_ not in NODE_PORT_TYPES:
                raise KproxyError(f"{at}.nodePort: may not be used when spec.type is {type_}")
            if not lo <= node_port <= hi:
                raise KproxyError(f"{at}.nodePort: {node_port} is outside the NodePort range {lo}-{hi}")
            if (node_port, protocol) in node_ports:
                raise KproxyError(f"{at}.nodePort: duplicate nodePort {node_port}/{protocol} "
                                  f"(also spec.ports[{node_ports[node_port, protocol]}])")
            node_ports[node_port, protocol] = i
        ports.append(service_port(port, target, protocol, name, node_port))
    return ports


def _pod_spec(spec: dict[str, Any], at: str) -> Obj:
    node_name = fields.as_str(spec.get("nodeName"), f"{at}.nodeName")
    node_selector = validate_labels(spec.get("nodeSelector"), f"{at}.nodeSelector")
    raw = fields.as_list(spec.get("containers"), f"{at}.containers")
    if not raw:
        raise KproxyError(f"{at}.containers: required (at least one container)")
    containers: list[Obj] = []
    cnames: set[str] = set()
    port_names: dict[str, str] = {}
    for i, item in enumerate(raw):
        cat = f"{at}.containers[{i}]"
        c = fields.as_map(item, cat)
        cname = fields.as_str(c.get("name"), f"{cat}.name")
        if not cname:
            raise KproxyError(f"{cat}.name: required")
        fields.dns_name(cname, fields.DNS1123_LABEL, 63, f"container name: a {fields.LABEL_RULE}", f"{cat}.name")
        if cname in cnames:
            raise KproxyError(f"{cat}.name: duplicate container name {fields.show(cname)}")
        cnames.add(cname)
        ports: list[Obj] = []
        for j, pitem in enumerate(fields.as_list(c.get("ports"), f"{cat}.ports")):
            pat = f"{cat}.ports[{j}]"
            p = fields.as_map(pitem, pat)
            fields.known(p, ("name", "containerPort", "protocol", "hostPort", "hostIP"), pat)
            pname = fields.iana_port_name(p["name"], f"{pat}.name") if p.get("name") else ""
            if pname:
                if pname in port_names:
                    raise KproxyError(f"{pat}.name: duplicate port name {fields.show(pname)} (also {port_names[pname]})")
                port_names[pname] = pat
            number = fields.port_number(p.get("containerPort"), f"{pat}.containerPort")
            ports.append(container_port(number, pname, fields.protocol(p.get("protocol"), f"{pat}.protocol")))
        containers.append(container(cname, fields.as_str(c.get("image"), f"{cat}.image"), ports))
    hostname = fields.as_str(spec.get("hostname"), f"{at}.hostname")
    subdomain = fields.as_str(spec.get("subdomain"), f"{at}.subdomain")
    if hostname:
        fields.dns_name(hostname, fields.DNS1123_LABEL, 63, f"hostname: a {fields.LABEL_RULE}", f"{at}.hostname")
    if subdomain:
        fields.dns_name(subdomain, fields.DNS1123_LABEL, 63, f"subdomain: a {fields.LABEL_RULE}", f"{at}.subdomain")
    grace = None
    if spec.get("terminationGracePeriodSeconds") is not None:
        grace = fields.as_int(spec["terminationGracePeriodSeconds"], f"{at}.terminationGracePeriodSeconds")
        if not 0 <= grace <= fields.MAX_GRACE_SECONDS:
            raise KproxyError(f"{at}.terminationGracePeriodSeconds: {grace} is outside the range "
                              f"0-{fields.MAX_GRACE_SECONDS} (kproxy waits it out)")
    return pod_spec(containers, node_name, node_selector, hostname, subdomain, grace)


def _deployment(name: str, ns: str, labels: dict[str, str], annotations: dict[str, str],
                spec: dict[str, Any]) -> Obj:
    replicas = 1 if spec.get("replicas") is None else fields.as_int(spec["replicas"], "spec.replicas")
    if replicas < 0:
        raise KproxyError(f"spec.replicas: {replicas} must be greater than or equal to 0")
    if spec.get("selector") is None:
        raise KproxyError("spec.selector: required")
    try:
        selector = selector_from_match(spec["selector"])
    except KproxyError as e:
        msg = str(e)
        sep = "." if msg.startswith(("matchLabels", "matchExpressions")) else ": "
        raise KproxyError(f"spec.selector{sep}{msg}") from None
    if selector.empty():
        raise KproxyError("spec.selector: empty selector is invalid for a Deployment")
    tmpl = fields.as_map(spec.get("template"), "spec.template")
    tmeta = fields.as_map(tmpl.get("metadata"), "spec.template.metadata")
    tlabels = validate_labels(tmeta.get("labels"), "spec.template.metadata.labels")
    if not selector.matches(tlabels):
        raise KproxyError(f"spec.template.metadata.labels: selector {str(selector)!r} does not match template labels")
    tspec = _pod_spec(fields.as_map(tmpl.get("spec"), "spec.template.spec"), "spec.template.spec")
    tannotations = fields.annotations(tmeta.get("annotations"), "spec.template.metadata.annotations")
    strategy = fields.as_map(spec.get("strategy"), "spec.strategy")
    stype = fields.as_str(strategy.get("type"), "spec.strategy.type") or "RollingUpdate"
    if stype not in ("RollingUpdate", "Recreate"):
        raise KproxyError(f"spec.strategy.type: {fields.show(stype)} is not valid (RollingUpdate or Recreate)")
    return deployment_object(metadata(name, ns, labels, annotations), replicas=replicas, selector=selector.to_match(),
                             template_labels=tlabels, template_annotations=tannotations, template_spec=tspec,
                             strategy=stype)
