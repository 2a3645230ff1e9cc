"""Lab topology files: parsing, validation and pod placement (pure, no root).

A topology names the lab, its nodes (with labels), the cluster pod CIDR (a /24
per node), the node network, the load-balancer pool, the overlay, and pods with
labels and placement.
Everything is checked here, before anything is created.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import KproxyError
from kproxy.lab.workloadspec import DEFAULT_PORT
from kproxy.scheduler import choose_node
from kproxy.selectors import validate_labels
from kproxy.textinput import read_text

OVERLAYS = ("vxlan", "host-gw", "udp")
DEFAULT_POD_CIDR = "10.244.0.0/16"
DEFAULT_NODE_CIDR = "172.18.0.0/24"  # the underlay: node IPs, like kind's docker network
SERVICE_CIDR = "10.96.0.0/12"
# LoadBalancer Services' addresses (kproxy.controllers hands them out, as MetalLB would); routed to
# the nodes from the underlay's clients (kproxy.lab.announce), so apart from the node range.
DEFAULT_LOAD_BALANCER_CIDR = "172.18.255.0/24"
# Namespace names are kp_<lab>_<name>; link names on the underlay are to-<node>.
LAB_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,18}[a-z0-9])?$")
OBJECT_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
NODE_NAME_MAX = 12  # "to-" + name must fit IFNAMSIZ
RESERVED_NAMES = ("underlay", "external", "control-plane")  # the lab's own members
PODS_PER_NODE = 253  # .2 .. .254 of the node's /24 (.1 is the bridge)


@dataclass(frozen=True)
class Node:
    name: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Pod:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    node_name: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    ports: tuple[int, ...] = (DEFAULT_PORT,)


@dataclass(frozen=True)
class Topology:
    name: str
    nodes: tuple[Node, ...]
    pods: tuple[Pod, ...]
    pod_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_POD_CIDR)
    node_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_NODE_CIDR)
    overlay: str = "vxlan"
    load_balancer_cidr: ipaddress.IPv4Network = ipaddress.IPv4Network(DEFAULT_LOAD_BALANCER_CIDR)

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KproxyError(f"lab {self.name} has no node {name!r}")


def node_subnet_count(pod_cidr: ipaddress.IPv4Network) -> int:
    # The first /24 is left out so that node N tends to get 10.244.N.0/24.
    return 2 ** (24 - pod_cidr.prefixlen) - 1


def _name(value: object, what: str, pattern: re.Pattern[str] = OBJECT_NAME_RE) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise KproxyError(f"{what} {value!r} is not a valid name (lowercase letters, digits and '-')")
    return value


def lab_name(value: object) -> str:
    if not isinstance(value, str) or not LAB_NAME_RE.match(value):
        raise KproxyError(f"lab name {value!r} is not a valid name (lowercase letters, digits and '-', "
                          "at most 20 characters)")
    return value


def valid_node_name(value: object) -> str:
    name = _name(value, "node name")
    if len(name) > NODE_NAME_MAX:
        raise KproxyError(f"node name {name!r} is longer than {NODE_NAME_MAX} characters")
    return name


def _labels(value: object, what: str) -> dict[str, str]:
    """Labels as Kubernetes validates them; YAML scalars (zone: 1) are taken as their text."""
    if isinstance(value, dict):
        value = {k: "" if v is None else v if isinstance(v, str) else str(v) for k, v in value.items()}
    return validate_labels(value, what)


def _network(value: object, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(str(value), strict=True)
    except ValueError as exc:
        raise KproxyError(f"{what} {value!r} is not a valid CIDR: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network):
        raise KproxyError(f"{what} {value}: only IPv4 is supported")
    return net


def _ports(value: object, pod: str) -> tuple[int, ...]:
    if value is None:
        return (DEFAULT_PORT,)
    if not isinstance(value, list) or not value:
        raise KproxyError(f"pod {pod}: ports must be a non-empty list of port numbers")
    ports = []
    for port in value:
        if isinstance(port, dict):  # containerPort style
            port = port.get("containerPort")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise KproxyError(f"pod {pod}: port {port!r} is not a number from 1 to 65535")
        ports.append(port)
    if len(set(ports)) != len(ports):
        raise KproxyError(f"pod {pod}: duplicate ports {ports}")
    return tuple(ports)


def parse_topology(raw: object, name: str | None = None, overlay: str | None = None) -> Topology:
    """Validate a topology mapping; name/overlay override the file's."""
    if not isinstance(raw, dict):
        raise KproxyError("a topology must be a YAML mapping with nodes and pods")
    unknown = set(raw) - {"name", "podCIDR", "nodeCIDR", "loadBalancerCIDR", "overlay", "nodes", "pods"}
    if unknown:
        raise KproxyError(f"unknown topology field(s): {', '.join(sorted(map(str, unknown)))}")
    lab = lab_name(name or raw.get("name") or "kproxy")
    overlay = overlay or raw.get("overlay") or "vxlan"
    if overlay not in OVERLAYS:
        raise KproxyError(f"overlay {overlay!r} is not one of {', '.join(OVERLAYS)}")
    pod_cidr = _network(raw.get("podCIDR", DEFAULT_POD_CIDR), "podCIDR")
    node_cidr = _network(raw.get("nodeCIDR", DEFAULT_NODE_CIDR), "nodeCIDR")
    lb_cidr = _network(raw.get("loadBalancerCIDR", DEFAULT_LOAD_BALANCER_CIDR), "loadBalancerCIDR")
    networks = {"podCIDR": pod_cidr, "nodeCIDR": node_cidr, "the service CIDR": ipaddress.IPv4Network(SERVICE_CIDR),
                "loadBalancerCIDR": lb_cidr}
    names = list(networks)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if networks[a].overlaps(networks[b]):
                raise KproxyError(f"{a} and {b} overlap ({networks[a]}, {networks[b]})")
    if pod_cidr.prefixlen > 24:
        raise KproxyError(f"podCIDR {pod_cidr} is smaller than one /24 per node")

    raw_nodes = raw.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        raise KproxyError("a topology needs at least one node")
    nodes = []
    for item in raw_nodes:
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            raise KproxyError(f"node entry {item!r} must be a name or a mapping")
        node_name = valid_node_name(item.get("name"))
        nodes.append(Node(node_name, _labels(item.get("labels"), f"node {node_name} labels")))
    if len(nodes) > node_subnet_count(pod_cidr):
        raise KproxyError(f"podCIDR {pod_cidr} has room for {node_subnet_count(pod_cidr)} nodes, not {len(nodes)}")
    if len(nodes) > node_cidr.num_addresses - 4:
        raise KproxyError(f"nodeCIDR {node_cidr} is too small for {len(nodes)} nodes and the external client")

    raw_pods = raw.get("pods") or []
    if not isinstance(raw_pods, list):
        raise KproxyError("pods must be a list")
    pods = []
    for item in raw_pods:
        if not isinstance(item, dict):
            raise KproxyError(f"pod entry {item!r} must be a mapping")
        pod_name = _name(item.get("name"), "pod name")
        unknown = set(item) - {"name", "labels", "nodeName", "nodeSelector", "ports"}
        if unknown:
            raise KproxyError(f"pod {pod_name}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        node_name = item.get("nodeName")
        if node_name is not None and node_name not in [n.name for n in nodes]:  # a list: no hashing of node_name
            raise KproxyError(f"pod {pod_name}: nodeName {node_name!r} is not a node of this lab")
        pods.append(Pod(pod_name, _labels(item.get("labels"), f"pod {pod_name} labels"), node_name,
                        _labels(item.get("nodeSelector"), f"pod {pod_name} nodeSelector"),
                        _ports(item.get("ports"), pod_name)))

    seen: set[str] = set()
    for obj in [*nodes, *pods]:
        if obj.name in seen or obj.name in RESERVED_NAMES:
            raise KproxyError(f"duplicate or reserved name {obj.name!r} (names of nodes and pods must be unique)")
        seen.add(obj.name)
    topology = Topology(lab, tuple(nodes), tuple(pods), pod_cidr, node_cidr, overlay, lb_cidr)
    place_pods(topology)  # refuses unschedulable pods and full nodes now
    return topology


def read_topology_file(path: Path) -> Any:
    """The YAML of a topology file ("-": standard input), not yet validated."""
    text = read_text(str(path), "topology")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KproxyError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def load_topology(path: Path | None, name: str | None = None, overlay: str | None = None) -> Topology:
    return parse_topology(read_topology_file(path or default_topology_path()), name, overlay)


def default_topology_path() -> Path:
    return Path(__file__).resolve().parents[2] / "examples" / "lab.yaml"


def place_pods(topology: Topology, existing: dict[str, str] | None = None) -> dict[str, str]:
    """pod name -> node name: nodeName, else the node kproxy.scheduler chooses.

    existing keeps pods where they already run, so re-applying never moves a pod.
    """
    existing = existing or {}
    node_names = [n.name for n in topology.nodes]
    load = {name: 0 for name in node_names}
    placement: dict[str, str] = {}
    pending = []
    for pod in topology.pods:
        where = pod.node_name or existing.get(pod.name)
        if where in load:
            placement[pod.name] = where
            load[where] += 1
        else:
            pending.append(pod)
    nodes = {n.name: n.labels for n in topology.nodes}
    for pod in pending:
        where = choose_node(nodes, load, pod.node_selector)
        if where is None:
            raise KproxyError(f"pod {pod.name}: no node matches nodeSelector {pod.node_selector}")
        placement[pod.name] = where
        load[where] += 1
    for name, count in load.items():
        if count > PODS_PER_NODE:
            raise KproxyError(f"node {name} would get {count} pods; a /24 holds at most {PODS_PER_NODE}")
    return placement


def to_raw(topology: Topology) -> dict[str, Any]:
    """The topology as a mapping parse_topology accepts (kept in the lab state)."""
    pods = []
    for pod in topology.pods:
        raw: dict[str, Any] = {"name": pod.name, "labels": dict(pod.labels), "ports": list(pod.ports)}
        if pod.node_name:
            raw["nodeName"] = pod.node_name
        if pod.node_selector:
            raw["nodeSelector"] = dict(pod.node_selector)
        pods.append(raw)
    return {
        "name": topology.name,
        "overlay": topology.overlay,
        "podCIDR": str(topology.pod_cidr),
        "nodeCIDR": str(topology.node_cidr),
        "loadBalancerCIDR": str(topology.load_balancer_cidr),
        "nodes": [{"name": n.name, "labels": dict(n.labels)} for n in topology.nodes],
        "pods": pods,
    }
