"""The control plane's decisions, as pure functions over Kubernetes-shaped objects.

Allocation of ClusterIPs and NodePorts; EndpointSlices and Endpoints from
Service selectors and pod readiness (the endpoint-slice and endpoints
controllers); the ReplicaSet a Deployment's template wants and the pods a
ReplicaSet makes (the deployment and ReplicaSet controllers), with their
status; and the kubelet's pod status.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
from datetime import datetime, timezone
from typing import Iterable, Mapping

from kproxy import model
from kproxy.errors import KproxyError
from kproxy.k8sform import pod_object
from kproxy.lab import topology
from kproxy.proxy.source import SERVICE_NAME_LABEL, TRIGGER_TIME_ANNOTATION, has_cluster_ip
from kproxy.store import Obj, carry_identity, key_of, timestamp

SERVICE_CIDR = ipaddress.ip_network(topology.SERVICE_CIDR)
# The tenth address is cluster DNS's (kube-dns, kubeadm's choice), never handed out to another Service.
DNS_SERVICE_IP = SERVICE_CIDR.network_address + 10
FIRST_DYNAMIC_OFFSET = 11  # .1 would be the kubernetes Service's
POD_TEMPLATE_HASH = "pod-template-hash"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"
ENDPOINTSLICE_CONTROLLER = "endpointslice-controller.k8s.io"
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery's rand: no vowels, no look-alikes
MAX_GENERATE_NAME_PREFIX = 58  # 63 less the five random characters


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def name_of(obj: Obj) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}"


def obj_key(obj: Obj) -> str:
    meta = obj["metadata"]
    return key_of(obj["kind"], meta["namespace"] if obj["kind"] != "Node" else "", meta["name"])


# Allocation ----------------------------------------------------------------

def allocate_cluster_ips(services: list[Obj], existing: Iterable[Obj],
                         cidr: ipaddress.IPv4Network | ipaddress.IPv6Network = SERVICE_CIDR,
                         given_anywhere: bool = False) -> None:
    """Give every new Service a ClusterIP from cidr; refuse one that is taken or (unless
    given_anywhere) outside it (that a given one is an IPv4 address, kproxy.model checked)."""
    owners = {s["spec"]["clusterIP"]: name_of(s) for s in existing if has_cluster_ip(s)}
    for svc in services:
        ip = svc["spec"].get("clusterIP") or ""
        if ip and has_cluster_ip(svc):
            if not given_anywhere and ipaddress.ip_address(ip) not in cidr:
                raise KproxyError(f"Service {name_of(svc)}: spec.clusterIP {ip} is not in the service CIDR {cidr}")
            if owners.get(ip, name_of(svc)) != name_of(svc):
                raise KproxyError(f"Service {name_of(svc)}: spec.clusterIP {ip} is already allocated to {owners[ip]}")
            owners[ip] = name_of(svc)
    candidate = cidr.network_address + FIRST_DYNAMIC_OFFSET
    for svc in services:
        if svc["spec"].get("clusterIP") or svc["spec"].get("type") == "ExternalName":
            continue
        while str(candidate) in owners:
            candidate += 1
            if candidate not in cidr:
                raise KproxyError("the service CIDR is full")
        svc["spec"]["clusterIP"] = str(candidate)
        svc["spec"]["clusterIPs"] = [str(candidate)]
        owners[str(candidate)] = name_of(svc)


def _node_port_owners(existing: Iterable[Obj]) -> dict[tuple[int, str], str]:
    """The NodePorts and health-check node ports (TCP) that existing Services hold."""
    owners: dict[tuple[int, str], str] = {}
    for svc in existing:
        for port in svc["spec"].get("ports", []):
            if port.get("nodePort"):
                owners[(int(port["nodePort"]), port["protocol"])] = name_of(svc)
        if svc["spec"].get("healthCheckNodePort"):
            owners[(int(svc["spec"]["healthCheckNodePort"]), "TCP")] = name_of(svc)
    return owners


def wants_node_ports(spec: Obj) -> bool:
    """NodePort Services get NodePorts allocated, and LoadBalancers unless allocateLoadBalancerNodePorts is false."""
    return spec.get("type") == "NodePort" or (
        spec.get("type") == "LoadBalancer" and spec.get("allocateLoadBalancerNodePorts", True))


def wants_health_check_node_port(spec: Obj) -> bool:
    """A LoadBalancer with Local external policy: load balancers ask its nodes whether they have endpoints."""
    return spec.get("type") == "LoadBalancer" and spec.get("externalTrafficPolicy") == "Local"


def allocate_node_ports(services: list[Obj], existing: Iterable[Obj]) -> None:
    """Give every new NodePort (and LoadBalancer) port a NodePort, and a Local-policy LoadBalancer its
    healthCheckNodePort, from the range; refuse a given one that another Service holds."""
    owners = _node_port_owners(existing)

    def claim(number: int, protocol: str, svc: Obj, where: str) -> None:
        if owners.get((number, protocol), name_of(svc)) != name_of(svc):
            raise KproxyError(f"Service {name_of(svc)}: {where}: {number} is already allocated to "
                              f"{owners[(number, protocol)]}")
        owners[(number, protocol)] = name_of(svc)

    def free(svc: Obj, protocol: str) -> int:
        low, high = model.NODE_PORT_RANGE
        number = next((p for p in range(low, high + 1) if (p, protocol) not in owners), None)
        if number is None:
            raise KproxyError(f"Service {name_of(svc)}: no NodePort left in {low}-{high}")
        owners[(number, protocol)] = name_of(svc)
        return number

    for svc in services:
        for i, port in enumerate(svc["spec"].get("ports", [])):
            if port.get("nodePort"):
                claim(int(port["nodePort"]), port["protocol"], svc, f"spec.ports[{i}].nodePort")
        if svc["spec"].get("healthCheckNodePort"):
            claim(int(svc["spec"]["healthCheckNodePort"]), "TCP", svc, "spec.healthCheckNodePort")
    for svc in services:
        spec = svc["spec"]
        if wants_node_ports(spec):
            for port in spec.get("ports", []):
                if not port.get("nodePort"):
                    port["nodePort"] = free(svc, port["protocol"])
        if wants_health_check_node_port(spec) and not spec.get("healthCheckNodePort"):
            spec["healthCheckNodePort"] = free(svc, "TCP")


def load_balancer_ips(svc: Obj) -> list[str]:
    """The addresses in a Service's status.loadBalancer.ingress."""
    return [i["ip"] for i in svc.get("status", {}).get("loadBalancer", {}).get("ingress") or () if i.get("ip")]


def allocate_load_balancer_ips(services: list[Obj], existing: Iterable[Obj],
                               pool: ipaddress.IPv4Network | None) -> None:
    """The lab's load balancer (like MetalLB): every LoadBalancer Service without a loadBalancerClass
    gets an address from pool in status.loadBalancer.ingress, spec.loadBalancerIP when it names one
    (refused when outside the pool or taken). A Service that had an address keeps it. pool None:
    no load balancer, the ingress stays empty (pending), as in a cluster without one."""
    owners = {ip: name_of(s) for s in existing for ip in load_balancer_ips(s)}
    for svc in services:
        if svc["spec"]["type"] != "LoadBalancer" or svc["spec"].get("loadBalancerClass") or pool is None:
            svc["status"] = {**svc.get("status", {}), "loadBalancer": {}}
            continue
        wanted = svc["spec"].get("loadBalancerIP") or ""
        if wanted:
            if ipaddress.ip_address(wanted) not in pool:
                raise KproxyError(f"Service {name_of(svc)}: spec.loadBalancerIP {wanted} is not in the lab's "
                                  f"load-balancer pool {pool}")
            if owners.get(wanted, name_of(svc)) != name_of(svc):
                raise KproxyError(f"Service {name_of(svc)}: spec.loadBalancerIP {wanted} is already assigned "
                                  f"to {owners[wanted]}")
            owners[wanted] = name_of(svc)
    for svc in services:
        spec = svc["spec"]
        if spec["type"] != "LoadBalancer" or spec.get("loadBalancerClass") or pool is None:
            continue
        ip = spec.get("loadBalancerIP") or next(iter(load_balancer_ips(svc)), "")
        if not ip:
            ip = next((str(a) for a in pool.hosts() if str(a) not in owners), "")
            if not ip:
                raise KproxyError(f"Service {name_of(svc)}: the load-balancer pool {pool} is full")
        owners[ip] = name_of(svc)
        svc["status"] = {**svc.get("status", {}), "loadBalancer": {"ingress": [{"ip": ip, "ipMode": "VIP"}]}}


# Endpoints -----------------------------------------------------------------

def pod_is_ready(pod: Obj) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def pod_is_terminating(pod: Obj) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def container_ports(pod_spec: Obj) -> list[Obj]:
    """Every container's ports of a Pod's (or a pod template's) spec."""
    return [p for c in pod_spec["containers"] for p in c.get("ports", [])]


def resolve_target_port(port: Obj, pod_spec: Obj) -> int | None:
    """A Service port's targetPort on a pod (Kubernetes' FindPort): None if the name is not declared."""
    target = port["targetPort"]
    if isinstance(target, int):
        return target
    for cport in container_ports(pod_spec):
        if cport.get("name") == target and cport["protocol"] == port["protocol"]:
            return int(cport["containerPort"])
    return None


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """A Service selector: every key must match; an empty selector selects nothing."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def endpoint_slices(service: Obj, pods: Iterable[Obj], previous: Mapping[str, Obj]) -> dict[str, Obj]:
    """The EndpointSlices for one Service: pods grouped by their resolved port numbers.

    previous (key -> slice) keeps the name, identity and trigger-time annotation
    of the Service's slices whose ports are unchanged, so network programming
    latency is measured from the change that caused it. New slices are named
    like Kubernetes' (generateName "<service>-").
    """
    meta, spec = service["metadata"], service["spec"]
    namespace = meta["namespace"]
    selector = spec.get("selector") or {}
    groups: dict[tuple[int, ...], list[Obj]] = {}
    for pod in pods:
        pmeta = pod["metadata"]
        if pmeta["namespace"] != namespace or not selects(selector, pmeta.get("labels") or {}):
            continue
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            continue
        resolved = [resolve_target_port(p, pod["spec"]) for p in spec.get("ports", [])]
        if any(r is None for r in resolved):
            continue  # like Kubernetes: a pod without the named port is not an endpoint
        terminating = pod_is_terminating(pod)
        ready = pod_is_ready(pod) and not terminating
        target = {"kind": "Pod", "namespace": namespace, "name": pmeta["name"]}
        if pmeta.get("uid"):
            target["uid"] = pmeta["uid"]
        endpoint: Obj = {"addresses": [ip],
                         "conditions": {"ready": ready, "serving": pod_is_ready(pod), "terminating": terminating}}
        if pod["spec"].get("hostname") and pod["spec"].get("subdomain") == meta["name"]:
            endpoint["hostname"] = pod["spec"]["hostname"]  # its DNS name under this headless Service
        endpoint |= {"nodeName": pod["spec"].get("nodeName", ""), "targetRef": target}
        groups.setdefault(tuple(r for r in resolved if r is not None), []).append(endpoint)
    if not groups and selector:
        groups[tuple(int(p["targetPort"]) if isinstance(p["targetPort"], int) else int(p["port"])
                     for p in spec.get("ports", []))] = []
    mine = {tuple(p["port"] for p in s["ports"]): s for s in previous.values()
            if s["metadata"]["namespace"] == namespace
            and s["metadata"].get("labels", {}).get(SERVICE_NAME_LABEL) == meta["name"]}
    prefix = f"{meta['name']}-"[:MAX_GENERATE_NAME_PREFIX]
    taken = {s["metadata"]["name"] for s in mine.values()}
    out = {}
    for numbers, endpoints in sorted(groups.items()):
        old = mine.get(numbers)
        name = old["metadata"]["name"] if old else _generated_name(prefix, taken)
        taken.add(name)
        slice_: Obj = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": name, "generateName": prefix, "namespace": namespace,
                         "labels": {SERVICE_NAME_LABEL: meta["name"], MANAGED_BY_LABEL: ENDPOINTSLICE_CONTROLLER},
                         "annotations": {}},
            "addressType": "IPv4",
            "endpoints": sorted(endpoints, key=lambda e: e["addresses"][0]),
            "ports": [{"name": p.get("name") or "", "port": n, "protocol": p["protocol"]}
                      for p, n in zip(spec.get("ports", []), numbers)],
        }
        if meta.get("uid"):
            slice_["metadata"]["ownerReferences"] = [controller_ref(service)]
        same = old is not None and {k: v for k, v in old.items() if k != "metadata"} == \
            {k: v for k, v in slice_.items() if k != "metadata"}
        slice_["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] = (
            old["metadata"]["annotations"][TRIGGER_TIME_ANNOTATION] if same and old is not None else now_iso())
        out[key_of("EndpointSlice", namespace, name)] = carry_identity(slice_, old)
    return out


def endpoints_object(service: Obj, slices: Iterable[Obj]) -> Obj:
    """The v1 Endpoints of a Service (what `kubectl get endpoints` lists), mirrored from its
    slices as the endpoints controller would: ready addresses, not-ready ones, terminating ones left out."""
    meta = service["metadata"]
    subsets = []
    for slice_ in slices:
        ready: list[Obj] = []
        not_ready: list[Obj] = []
        for endpoint in slice_["endpoints"]:
            if endpoint["conditions"]["terminating"]:
                continue
            address = {"ip": endpoint["addresses"][0], "nodeName": endpoint["nodeName"],
                       "targetRef": endpoint["targetRef"]}
            (ready if endpoint["conditions"]["ready"] else not_ready).append(address)
        subset: Obj = {"ports": [dict(p) if p["name"] else {k: v for k, v in p.items() if k != "name"}
                                 for p in slice_["ports"]]}
        if ready:
            subset["addresses"] = ready
        if not_ready:
            subset["notReadyAddresses"] = not_ready
        if ready or not_ready:
            subsets.append(subset)
    out: Obj = {"apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "labels": dict(meta.get("labels") or {})}}
    if subsets:
        out["subsets"] = subsets
    return out


def all_endpoint_slices(services: Iterable[Obj], pods: list[Obj],
                        previous: Mapping[str, Obj]) -> dict[str, Obj | None]:
    """Store changes that make every Service's EndpointSlices and Endpoints current (None deletes).

    previous: the store's EndpointSlice and Endpoints objects, by key."""
    by_service: dict[tuple[str, str], dict[str, Obj]] = {}
    for key, obj in previous.items():
        if obj["kind"] == "EndpointSlice":
            owner = (obj["metadata"]["namespace"], obj["metadata"]["labels"].get(SERVICE_NAME_LABEL, ""))
            by_service.setdefault(owner, {})[key] = obj
    wanted: dict[str, Obj] = {}
    for service in services:
        if not service["spec"].get("selector"):
            continue  # no managed endpoints, as in Kubernetes
        slices = endpoint_slices(service, pods, by_service.get((service["metadata"]["namespace"],
                                                                service["metadata"]["name"]), {}))
        wanted.update(slices)
        endpoints = endpoints_object(service, slices.values())
        key = obj_key(endpoints)
        wanted[key] = carry_identity(endpoints, previous.get(key))
    changes: dict[str, Obj | None] = {k: v for k, v in wanted.items() if previous.get(k) != v}
    for key in previous:
        if key not in wanted:
            changes[key] = None
    return changes


# Owners ----------------------------------------------------------------------

def controller_ref(owner: Obj) -> Obj:
    """The ownerReference a controller puts on what it makes (it needs the owner's uid: a stored owner)."""
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


def owned(owner: Obj, objects: Iterable[Obj]) -> list[Obj]:
    """The objects whose controller is owner (by uid, as Kubernetes' garbage collector matches them)."""
    uid = owner["metadata"].get("uid")
    return [o for o in objects
            if any(r.get("controller") and r.get("uid") == uid for r in o["metadata"].get("ownerReferences", []))]


# Deployments and ReplicaSets ---------------------------------------------------

def _random_string(length: int) -> str:
    return "".join(random.choices(SAFE_ALPHABET, k=length))


def _generated_name(prefix: str, taken: set[str]) -> str:
    """metadata.generateName: the prefix and five random characters, as the API server does."""
    while True:
        name = prefix + _random_string(5)
        if name not in taken:
            return name


def template_hash(deployment: Obj) -> str:
    """The pod-template-hash: a 32-bit hash of the pod template (FNV-32a in Kubernetes),
    written in Kubernetes' safe alphabet (rand.SafeEncodeString of its decimal form)."""
    template = json.dumps(deployment["spec"]["template"], sort_keys=True).encode()
    number = int.from_bytes(hashlib.sha256(template).digest()[:4], "big")
    return "".join(SAFE_ALPHABET[ord(digit) % len(SAFE_ALPHABET)] for digit in str(number))


def replica_set_for(deployment: Obj, replicas: int) -> Obj:
    """The ReplicaSet running the Deployment's current template: <deployment>-<pod-template-hash>."""
    meta, spec = deployment["metadata"], deployment["spec"]
    phash = template_hash(deployment)
    template = json.loads(json.dumps(spec["template"]))
    template_meta = template.setdefault("metadata", {})
    template_meta["labels"] = {**(template_meta.get("labels") or {}), POD_TEMPLATE_HASH: phash}
    selector = json.loads(json.dumps(spec["selector"]))
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), POD_TEMPLATE_HASH: phash}
    return {
        "apiVersion": "apps/v1",
        "kind": "ReplicaSet",
        "metadata": {"name": f"{meta['name']}-{phash}", "namespace": meta["namespace"],
                     "labels": dict(template_meta["labels"]), "ownerReferences": [controller_ref(deployment)]},
        "spec": {"replicas": replicas, "selector": selector, "template": template},
        "status": {"replicas": 0},
    }


def new_pod_for(replica_set: Obj, existing_names: set[str]) -> Obj:
    """A pod of the ReplicaSet: named <replicaset>-<5 random characters>, owned by it."""
    meta, template = replica_set["metadata"], replica_set["spec"]["template"]
    template_meta = template.get("metadata") or {}
    prefix = f"{meta['name']}-"[:MAX_GENERATE_NAME_PREFIX]
    pod_meta: Obj = {"name": _generated_name(prefix, existing_names), "generateName": prefix,
                     "namespace": meta["namespace"], "labels": dict(template_meta.get("labels") or {}),
                     "ownerReferences": [controller_ref(replica_set)]}
    if template_meta.get("annotations"):
        pod_meta["annotations"] = dict(template_meta["annotations"])
    return pod_object(pod_meta, json.loads(json.dumps(template["spec"])))


def pods_to_remove(pods: list[Obj], count: int) -> list[Obj]:
    """Which pods a ReplicaSet scaling down removes first, as Kubernetes ranks them:
    unready before ready, then more restarts, then the newest."""
    newest_first = sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)
    ranked = sorted(newest_first, key=lambda p: (pod_is_ready(p), -restart_count(p)))
    return ranked[:max(0, count)]


def workload_statuses(objects: Mapping[str, Obj]) -> dict[str, Obj]:
    """ReplicaSets' and Deployments' status counted from their pods: the changed objects by key."""
    pods = [o for k, o in objects.items() if k.startswith("Pod/") and not pod_is_terminating(o)]
    sets = [o for k, o in objects.items() if k.startswith("ReplicaSet/")]
    changes: dict[str, Obj] = {}
    counted: dict[str, Obj] = {}
    for replica_set in sets:
        mine = owned(replica_set, pods)
        ready = sum(1 for p in mine if pod_is_ready(p))
        status: Obj = {"replicas": len(mine), "fullyLabeledReplicas": len(mine)}
        if ready:
            status |= {"readyReplicas": ready, "availableReplicas": ready}  # minReadySeconds 0
        counted[replica_set["metadata"]["uid"]] = status
        if replica_set.get("status") != status:
            changes[obj_key(replica_set)] = _with_status(replica_set, status)
    for key, deployment in objects.items():
        if not key.startswith("Deployment/"):
            continue
        mine = owned(deployment, sets)
        current = next((rs for rs in mine if rs["metadata"]["name"] ==
                        f"{deployment['metadata']['name']}-{template_hash(deployment)}"), None)
        total = {field_: sum(counted[rs["metadata"]["uid"]].get(field_, 0) for rs in mine)
                 for field_ in ("replicas", "readyReplicas", "availableReplicas")}
        status = {"replicas": total["replicas"],
                  "updatedReplicas": counted[current["metadata"]["uid"]]["replicas"] if current else 0,
                  "readyReplicas": total["readyReplicas"], "availableReplicas": total["availableReplicas"]}
        unavailable = int(deployment["spec"].get("replicas", 1)) - total["availableReplicas"]
        status = {k: v for k, v in status.items() if v}  # zero counts are omitted, as in Kubernetes
        if unavailable > 0:
            status["unavailableReplicas"] = unavailable
        if deployment.get("status") != status:
            changes[key] = _with_status(deployment, status)
    return changes


def _with_status(obj: Obj, status: Obj) -> Obj:
    return {**obj, "metadata": dict(obj["metadata"]), "status": status}


# Pod status (the kubelet's) ----------------------------------------------------

def restart_count(pod: Obj) -> int:
    return sum(int(c.get("restartCount", 0)) for c in pod.get("status", {}).get("containerStatuses", []))


def pod_status(pod: Obj, ip: str, host_ip: str, ready: bool) -> Obj:
    """A running pod's status as the kubelet reports it; conditions keep their transition
    time and containers their restarts from the pod's previous status."""
    now = timestamp()
    old = pod.get("status") or {}
    before = {c["type"]: c for c in old.get("conditions", [])}
    ready_text = "True" if ready else "False"

    def condition(kind: str, status: str) -> Obj:
        same = before.get(kind, {}).get("status") == status
        return {"type": kind, "status": status,
                "lastTransitionTime": before[kind]["lastTransitionTime"] if same else now}

    previous = {c["name"]: c for c in old.get("containerStatuses", [])}
    containers = []
    for container in pod["spec"].get("containers", []):
        was = previous.get(container["name"], {})
        containers.append({"name": container["name"], "image": container.get("image", ""), "imageID": "",
                           "ready": ready, "started": True, "restartCount": was.get("restartCount", 0),
                           "state": was.get("state") or {"running": {"startedAt": now}},
                           "lastState": was.get("lastState", {})})
    return {
        "phase": "Running",
        "conditions": [condition("PodReadyToStartContainers", "True"), condition("Initialized", "True"),
                       condition("Ready", ready_text), condition("ContainersReady", ready_text),
                       condition("PodScheduled", "True")],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": ip, "podIPs": [{"ip": ip}],
        "startTime": old.get("startTime", now),
        "containerStatuses": containers,
        "qosClass": "BestEffort",
    }


def record_restart(pod: Obj, restarted_at: str, last_exit: Obj | None = None) -> Obj:
    """The pod after its workload restarted at restarted_at (what the lab's supervisor writes):
    each container's restartCount + 1 and a new run; the run that ended, when known, as
    lastState.terminated. last_exit: exitCode (None for a daemon adopted from an earlier
    supervisor, whose exit status is not ours to know), startedAt, finishedAt."""
    pod = json.loads(json.dumps(pod))
    for container in pod.get("status", {}).get("containerStatuses", []):
        container["restartCount"] = int(container.get("restartCount", 0)) + 1
        container["started"] = True
        container["state"] = {"running": {"startedAt": restarted_at}}
        if last_exit is not None:
            code = last_exit["exitCode"]
            container["lastState"] = {"terminated": {
                "exitCode": 137 if code is None else code,
                "reason": "ContainerStatusUnknown" if code is None else ("Completed" if code == 0 else "Error"),
                "startedAt": last_exit["startedAt"], "finishedAt": last_exit["finishedAt"]}}
    return pod
