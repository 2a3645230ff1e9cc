"""The one pod scheduler (kproxy.scheduler), as topologies and `kproxy apply` use it (no root)."""

from __future__ import annotations

from kproxy.lab.topology import parse_topology, place_pods
from kproxy.scheduler import choose_node


def test_least_loaded_then_the_labs_order_not_the_names() -> None:
    nodes = {"node2": {}, "node10": {}, "node1": {}}
    assert choose_node(nodes, {"node2": 1, "node10": 0, "node1": 0}, {}) == "node10"
    assert choose_node(nodes, {"node2": 0, "node10": 0, "node1": 0}, {}) == "node2"


def test_replicas_spread_over_the_nodes_before_load_counts() -> None:
    nodes = {"node1": {}, "node2": {}}
    load = {"node1": 3, "node2": 1}
    assert choose_node(nodes, load, {}, {"node2": 1}) == "node1"  # coredns' second replica
    assert choose_node(nodes, load, {}, {"node1": 1, "node2": 1}) == "node2"


def test_node_selector_sees_the_registered_labels_too() -> None:
    nodes = {"a": {"zone": "x"}, "b": {"zone": "y"}}
    load = {"a": 0, "b": 0}
    assert choose_node(nodes, load, {"zone": "y"}) == "b"
    assert choose_node(nodes, load, {"kubernetes.io/hostname": "b"}) == "b"
    assert choose_node(nodes, load, {"kubernetes.io/os": "linux", "zone": "x"}) == "a"
    assert choose_node(nodes, load, {"zone": "z"}) is None


def test_a_topology_places_by_the_same_rule() -> None:
    topology = parse_topology({"nodes": ["n2", "n1"], "pods": [
        {"name": "p1"}, {"name": "p2"}, {"name": "p3", "nodeSelector": {"kubernetes.io/hostname": "n1"}}]})
    assert place_pods(topology) == {"p1": "n2", "p2": "n1", "p3": "n1"}
