"""What a lab should be: the state a topology asks for (plan), and the objects it stores of it.

Pure: nothing here touches the kernel or the store, so a plan is tested without root.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Iterable
from urllib.parse import urlsplit

from kproxy.errors import KproxyError
from kproxy.k8sform import container, container_port, metadata, pod_object, pod_spec
from kproxy.lab import overlay
from kproxy.lab.state import LabState, NodeState
from kproxy.lab.topology import Topology, node_subnet_count, to_raw
from kproxy.lab.wiring import random_mac
from kproxy.proxy import DEFAULT_MODE, mode as proxy_mode
from kproxy.scheduler import node_labels
from kproxy.store import View

TOPOLOGY_ANNOTATION = "kproxy.io/from-topology"
HOST_ANNOTATION = "kproxy.io/host"  # on a Node: the machine its namespace is on


@dataclass(frozen=True)
class Others:
    """What the lab's other machines hold, as the store had it at version: their Nodes' hosts
    by name, their node IPs and their pod CIDRs (none of which this machine may take)."""

    version: int = 0
    hosts: dict[str, str] = field(default_factory=dict)
    ips: frozenset[str] = frozenset()
    pod_cidrs: frozenset[str] = frozenset()


def others_in(view: View, ours: Iterable[str]) -> Others:
    """The Nodes in view that are not ours (the names of this machine's nodes)."""
    mine = set(ours)
    hosts, ips, cidrs = {}, set(), set()
    for obj in view.of_kind("Node"):
        name = obj["metadata"]["name"]
        lease = overlay.lease_of(obj)
        if name in mine:
            continue
        hosts[name] = (obj["metadata"].get("annotations") or {}).get(HOST_ANNOTATION, "")
        if lease is not None:
            ips.add(lease.node_ip)
            cidrs.add(lease.pod_cidr)
    return Others(view.version, hosts, frozenset(ips), frozenset(cidrs))


def plan(topology: Topology, previous: LabState | None, mode: str | None = None,
         mode_options: dict[str, str] | None = None, dns: bool | None = None, store: str | None = None,
         nic: str | None = None, others: Others = Others(), joined: bool = False,
         store_endpoint: str | None = None) -> LabState:
    """The state this topology asks for, keeping every assignment previous made. mode_options
    are merged over the running lab's when the mode stays, and replace them when it changes;
    dns None keeps the running lab's cluster DNS (a new lab has it); store None keeps the running
    lab's store (a new lab has the file store); nic (a MAC) None keeps the running lab's lab NIC
    (a new lab has none). others: the nodes of the lab's other machines, whose names, IPs and
    pod CIDRs are not this machine's to take (a kept assignment one of them took is made anew);
    joined: these nodes join a lab another machine made; store_endpoint: the http://IP:PORT of an
    etcd on the underlay that another machine runs (None: as the running lab, a new one none)."""
    mode = mode or (previous.mode if previous else DEFAULT_MODE)
    kept_options = previous.mode_options if previous is not None and previous.mode == mode else {}
    options = {**kept_options, **(mode_options or {})}
    proxy_mode(mode).options_of(options)  # refused here, before anything is made
    given_store, store = store, store or (previous.store if previous else "file")
    nic = nic if nic is not None else previous.nic if previous else ""
    kept_endpoint = previous.store_endpoint if previous is not None and given_store is None else ""
    endpoint = store_endpoint if store_endpoint is not None else kept_endpoint
    hosts = list(topology.node_cidr.hosts())
    if endpoint:
        _refuse_etcd_off_the_underlay(endpoint, topology, hosts[-1])
    if previous is not None:
        for what, old, new in (("store", _store_as_given(previous.store, previous.store_endpoint),
                                _store_as_given(store, endpoint)),
                               ("NIC", previous.nic or "none", nic or "none"),
                               ("overlay", previous.overlay, topology.overlay),
                               ("podCIDR", previous.pod_cidr, str(topology.pod_cidr)),
                               ("nodeCIDR", previous.node_cidr, str(topology.node_cidr)),
                               ("loadBalancerCIDR", previous.load_balancer_cidr or str(topology.load_balancer_cidr),
                                str(topology.load_balancer_cidr))):
            if old != new:
                raise KproxyError(f"lab {topology.name} runs with {what} {old}, not {new}; "
                                  f"take it down first ('kproxy lab down {topology.name}')")
    for node in topology.nodes:
        if node.name in others.hosts:
            raise KproxyError(f"lab {topology.name} has a node {node.name} already, on host "
                              f"{others.hosts[node.name] or 'unknown'}; choose another name")
    state = LabState(
        name=topology.name,
        overlay=topology.overlay,
        pod_cidr=str(topology.pod_cidr),
        node_cidr=str(topology.node_cidr),
        external_ip=str(hosts[-1]),
        load_balancer_cidr=str(topology.load_balancer_cidr),
        mode=mode,
        mode_options=options,
        generation=previous.generation if previous else 0,
        pods=dict(previous.pods) if previous else {},
        dns=dns if dns is not None else previous.dns if previous else True,
        store=store,
        control_plane_ip=str(hosts[-2]) if store == "etcd" and not endpoint else "",
        nic=nic,
        nic_name=previous.nic_name if previous else "",
        store_endpoint=endpoint,
        joined=joined,
    )
    wanted = {n.name for n in topology.nodes}
    kept = {name: n for name, n in (previous.nodes if previous else {}).items()
            if name in wanted and n.ip not in others.ips and n.pod_cidr not in others.pod_cidrs}
    # .1 stays free; the last two are the external client's and the control plane's
    used_ips = {n.ip for n in kept.values()} | others.ips | ({urlsplit(endpoint).hostname or ""} if endpoint else set())
    free_ips = iter([str(ip) for ip in hosts[1:-2] if str(ip) not in used_ips])
    subnets = list(topology.pod_cidr.subnets(new_prefix=24))[1:1 + node_subnet_count(topology.pod_cidr)]
    used_cidrs = {n.pod_cidr for n in kept.values()} | others.pod_cidrs
    free_cidrs = iter([str(net) for net in subnets if str(net) not in used_cidrs])
    for node in topology.nodes:
        old = kept.get(node.name)
        if old is not None:
            state.nodes[node.name] = NodeState(old.ip, old.pod_cidr, old.vtep_mac, dict(node.labels),
                                               old.host or socket.gethostname())
        else:
            ip, cidr = next(free_ips, None), next(free_cidrs, None)
            if ip is None or cidr is None:
                raise KproxyError(f"lab {topology.name} has no {'node IP' if ip is None else 'pod CIDR'} left "
                                  f"for node {node.name} ({len(others.hosts)} nodes on other machines)")
            state.nodes[node.name] = NodeState(ip, cidr, random_mac(), dict(node.labels), socket.gethostname())
    state.topology = to_raw(topology)
    return state


def _store_as_given(store: str, endpoint: str) -> str:
    """A store as --store names it: file, etcd, or etcd://IP:PORT (an etcd another machine runs)."""
    return f"etcd://{urlsplit(endpoint).netloc}" if endpoint else store


def _refuse_etcd_off_the_underlay(endpoint: str, topology: Topology, external_ip: Any) -> None:
    """The nodes reach etcd on their underlay subnet, and it cannot be the external client."""
    ip = ipaddress.IPv4Address(urlsplit(endpoint).hostname or "")
    if ip not in topology.node_cidr or ip in (topology.node_cidr.network_address, external_ip):
        raise KproxyError(f"etcd at {ip} is not an address for another machine on lab {topology.name}'s underlay "
                          f"(a host of nodeCIDR {topology.node_cidr} other than the external client's {external_ip}): "
                          "its nodes reach etcd there")


def node_object(state: LabState, name: str) -> dict[str, Any]:
    """The Node, with the lease flanneld keeps on it (kproxy.lab.flanneld)."""
    node = state.nodes[name]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": node_labels(name, node.labels),
                         "annotations": {HOST_ANNOTATION: node.host,
                                         **overlay.lease_annotations(state.overlay, node.ip, node.vtep_mac)}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": node.ip},
                                     {"type": "Hostname", "address": name}],
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "kubelet is posting ready status"}]}}


def topology_pod_objects(topology: Topology, placement: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for pod in topology.pods:
        spec = pod_spec([container("workload", ports=[container_port(p) for p in pod.ports])],
                        node_name=placement[pod.name])
        meta = metadata(pod.name, "default", pod.labels, {TOPOLOGY_ANNOTATION: "true"})
        out[f"Pod/default/{pod.name}"] = pod_object(meta, spec)
    return out
