"""The kubelet of every node at once: pods in the store become pods in the kernel.

For each Pod the store assigns to a node: a namespace, an interface and address
from our CNI (in-process), the workload listening on its ports (a cluster DNS
pod gets kproxy.dns.server instead), its resolv.conf (ClusterFirst); then a
readiness probe (the pod is Ready once its workload answers), the Pod's
status written back, and the EndpointSlices brought up to date. Pods gone
from the store are unwired and their namespaces removed.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field
from typing import Any

from kproxy import controllers
from kproxy.dns import READY_PORT, addon
from kproxy.proxy import mode as proxy_mode
from kproxy.lab import processes, supervisor
from kproxy.lab.probe import http_get, probe_tcp
from kproxy.lab.state import LabState, PodState, lab_dir, lab_namespaces, member_name, ns_name, ns_path
from kproxy.lab.workloadspec import DEFAULT_PORT
from kproxy.lab.wiring import CONTROL_PLANE, delete_namespaces, ensure_namespaces, pod_address, remove_resolv_conf, \
    run_cni, wire_pod, write_resolv_conf
from kproxy.store import Store, View

READY_TIMEOUT = 10.0
READY_POLL = 0.02  # seconds between readiness probes of a pod that does not answer yet


@dataclass
class Report:
    wired: int = 0
    removed: int = 0
    unready: list[str] = field(default_factory=list)  # "ns/name" of pods that did not answer in time


def pod_ports(pod: dict[str, Any], services: list[dict[str, Any]]) -> list[int]:
    """What the pod's workload listens on: its declared ports, and every numeric
    targetPort of a Service selecting it (our workload stands in for any image)."""
    ports = {int(p["containerPort"]) for p in controllers.container_ports(pod["spec"])}
    labels = pod["metadata"].get("labels") or {}
    for svc in services:
        if svc["metadata"]["namespace"] == pod["metadata"]["namespace"] and \
                controllers.selects(svc["spec"].get("selector") or {}, labels):
            for port in svc["spec"].get("ports", []):
                target = controllers.resolve_target_port(port, pod["spec"])
                if target is not None:
                    ports.add(target)
    return sorted(ports) or [DEFAULT_PORT]


def _desired(state: LabState, view: View) -> dict[str, dict[str, Any]]:
    out = {}
    for pod in view.of_kind("Pod"):
        if pod["spec"].get("nodeName") in state.nodes:
            out[member_name(pod["metadata"]["namespace"], pod["metadata"]["name"])] = pod
    return out


def pod_is_wired(state: LabState, member: str) -> bool:
    spec = state.pods.get(member)
    return spec is not None and bool(spec.ip) and pod_address(state.name, member) == spec.ip


def _ready(state: LabState, member: str) -> bool:
    """Whether the pod answers within READY_TIMEOUT. Probed until it does, as a kubelet repeats its
    readiness probe: a workload told of a new pod opens its sockets a moment later, and one
    refused probe then would leave the pod out of its Services until the next sync."""
    spec = state.pods[member]
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        timeout = max(0.1, min(2.0, deadline - time.monotonic()))
        try:
            if spec.dns_server:  # CoreDNS's readinessProbe: httpGet /ready on 8181
                http_get(ns_path(state.name, spec.node), spec.ip, READY_PORT, "/ready", timeout)
            else:
                probe_tcp(ns_path(state.name, spec.node), spec.ip, spec.ports[0], timeout=timeout)
            return True
        except OSError:
            if time.monotonic() + READY_POLL >= deadline:
                return False
            time.sleep(READY_POLL)


def sync(state: LabState, store: Store) -> Report:
    report = Report()
    view = store.read()
    desired = _desired(state, view)
    services = view.of_kind("Service")

    present = set(lab_namespaces(state.name))
    gone = [m for m in state.pods if m not in desired]
    for member in gone:
        spec = state.pods.pop(member)
        if spec.node in state.nodes and ns_name(state.name, member) in present:
            run_cni(state, spec.node, member, "DEL")
        report.removed += 1
    delete_namespaces([ns_name(state.name, m) for m in gone if ns_name(state.name, m) in present])

    ensure_namespaces(state.name, list(desired))
    rewired_nodes: set[str] = set()
    fresh: set[str] = set()
    for member, pod in desired.items():
        meta = pod["metadata"]
        old = state.pods.get(member)
        state.pods[member] = PodState(meta["name"], pod["spec"]["nodeName"], meta["namespace"],
                                      dict(meta.get("labels") or {}), pod_ports(pod, services),
                                      old.ip if old and old.node == pod["spec"]["nodeName"] else "",
                                      addon.runs_dns(pod["spec"]))
        if wire_pod(state, member):
            report.wired += 1
            rewired_nodes.add(pod["spec"]["nodeName"])
            fresh.add(member)
            write_resolver(state, member)
    directory = lab_dir(state.name)
    for node in state.nodes:
        workload_pods = [{"name": spec.name, "netns": ns_path(state.name, m), "tcp": spec.ports, "udp": spec.ports}
                         for m, spec in sorted(state.pods.items()) if spec.node == node and not spec.dns_server]
        processes.ensure_workload(directory, node, workload_pods, reload=node in rewired_nodes)
    ensure_workloads(state)  # those that were not running start with their spec

    changes = _pod_statuses(state, desired, fresh)
    report.unready = sorted(f"{p['metadata']['namespace']}/{p['metadata']['name']}"
                            for p in changes.values() if not controllers.pod_is_ready(p))
    # Every pod of the lab, also those the kubelets of other machines wired (a lab others joined).
    pods_now = [changes.get(f"Pod/{pod['metadata']['namespace']}/{pod['metadata']['name']}") or pod
                for pod in view.of_kind("Pod")]
    previous = {key: obj for key, obj in view.objects.items() if key.startswith(("EndpointSlice/", "Endpoints/"))}
    changes.update(controllers.all_endpoint_slices(services, pods_now, previous))
    changes.update(controllers.workload_statuses({k: v for k, v in (view.objects | changes).items() if v is not None}))
    if changes:
        store.write(changes)
    return report


def forget_nodes(state: LabState, store: Store) -> None:
    """This machine's Nodes out of the store, with their pods, and every Service's EndpointSlices
    without those pods: in one write, what a machine leaving a lab others share leaves behind."""
    view = store.read()
    gone = {key: None for key, obj in view.objects.items()
            if (key.startswith("Node/") and obj["metadata"]["name"] in state.nodes)
            or (key.startswith("Pod/") and obj["spec"].get("nodeName") in state.nodes)}
    pods = [pod for pod in view.of_kind("Pod") if f"Pod/{pod['metadata']['namespace']}/{pod['metadata']['name']}" not in gone]
    previous = {key: obj for key, obj in view.objects.items() if key.startswith(("EndpointSlice/", "Endpoints/"))}
    gone.update(controllers.all_endpoint_slices(view.of_kind("Service"), pods, previous))
    store.write(gone)


def write_resolver(state: LabState, member: str) -> None:
    """dnsPolicy ClusterFirst: the pod resolves through kube-dns; a DNS pod (dnsPolicy Default) and
    every pod of a lab without DNS keep the machine's resolver. Written when a pod is wired, and
    for every pod when a lab's DNS is turned on or off (kproxy.lab.build.up)."""
    spec = state.pods[member]
    if state.dns and not spec.dns_server:
        write_resolv_conf(ns_name(state.name, member), addon.resolv_conf(spec.namespace))
    else:
        remove_resolv_conf(ns_name(state.name, member))


def _pod_statuses(state: LabState, desired: dict[str, dict[str, Any]], fresh: set[str]) -> dict[str, Any]:
    """Probe pods whose status is stale; the changed Pod objects by store key."""
    stale = [m for m, pod in desired.items() if m in fresh or not controllers.pod_is_ready(pod)
             or pod.get("status", {}).get("podIP") != state.pods[m].ip]
    with ThreadPoolExecutor(max_workers=16) as pool:
        ready = dict(zip(stale, pool.map(lambda m: _ready(state, m), stale)))
    changes = {}
    for member in stale:
        pod = json.loads(json.dumps(desired[member]))
        spec = state.pods[member]
        pod["status"] = controllers.pod_status(pod, spec.ip, state.nodes[spec.node].ip, ready[member])
        changes[f"Pod/{spec.namespace}/{spec.name}"] = pod
    return changes


def agent_args(state: LabState, node: str) -> list[str]:
    return (["--lab-dir", str(lab_dir(state.name)), "--node", node, "--mode", state.mode,
             "--cluster-cidr", state.pod_cidr]
            + [arg for name, value in sorted(proxy_mode(state.mode).options_of(state.mode_options).items())
               for arg in ("--mode-opt", f"{name}={value}")])


def flannelds(state: LabState) -> list[supervisor.Wanted]:
    return [supervisor.Wanted(processes.FLANNELD.kind, node, ns_path(state.name, node),
                              ("--lab-dir", str(lab_dir(state.name)), "--node", node, "--overlay", state.overlay,
                               "--cluster-cidr", state.pod_cidr))
            for node in sorted(state.nodes)]


def control_plane(state: LabState) -> list[supervisor.Wanted]:
    """etcd, where this lab runs it in its control-plane member (started first: everything else
    reads the store)."""
    if not state.runs_etcd:
        return []
    return [supervisor.Wanted(processes.ETCD.kind, CONTROL_PLANE, ns_path(state.name, CONTROL_PLANE),
                              ("--lab-dir", str(lab_dir(state.name)), "--ip", state.control_plane_ip))]


def _workloads(state: LabState) -> list[supervisor.Wanted]:
    """The control plane's etcd, each node's flanneld (what carries pods' packets between nodes), each
    node's workload that has a spec (the kubelet's sync writes it), and each wired DNS pod's server."""
    directory = lab_dir(state.name)
    return control_plane(state) + flannelds(state) + [supervisor.Wanted(processes.WORKLOAD.kind, node, ns_path(state.name, node),
                              ("--spec", str(processes.spec_path(directory, node))))
            for node in sorted(state.nodes) if processes.spec_path(directory, node).exists()] + \
        [supervisor.Wanted(processes.DNS.kind, member, ns_path(state.name, member), ("--lab-dir", str(directory)))
         for member, spec in sorted(state.pods.items()) if spec.dns_server and spec.ip]


def ensure_workloads(state: LabState) -> None:
    """The lab's supervisor runs every node's workload, and the agents it runs now (up starts
    those once the pods are in place, ensure_daemons); returns once each runs."""
    directory = lab_dir(state.name)
    agents = [w for w in supervisor.current(directory) if w.kind == processes.AGENT.kind and w.node in state.nodes]
    supervisor.ensure(directory, _workloads(state) + agents)


def ensure_daemons(state: LabState) -> None:
    """The lab's supervisor runs every node's workload and agent, as state says; returns once each runs.

    Missing agents start one after the other: their first syncs, each importing its proxy mode
    and reading the kernel, then overlap less (three at once took a QEMU guest twice as long)."""
    directory = lab_dir(state.name)
    agents = [supervisor.Wanted(processes.AGENT.kind, node, ns_path(state.name, node), tuple(agent_args(state, node)))
              for node in sorted(state.nodes)]
    running = set(supervisor.current(directory))
    wanted = _workloads(state) + [a for a in agents if a in running]
    for agent in agents:
        if agent not in wanted:
            wanted.append(agent)
            supervisor.ensure(directory, wanted)
    supervisor.ensure(directory, _workloads(state) + agents)
