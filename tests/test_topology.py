"""Topology files and the lab plan, without root."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.errors import KproxyError
from kproxy.lab.planning import plan
from kproxy.lab.topology import default_topology_path, load_topology, parse_topology, place_pods


def topo(**over: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"name": "t", "nodes": ["n1", "n2"], "pods": [{"name": "a"}, {"name": "b"}]}
    raw.update(over)
    return raw


def test_the_shipped_default_lab_parses() -> None:
    t = load_topology(default_topology_path())
    assert [n.name for n in t.nodes] == ["node1", "node2", "node3"]
    assert (str(t.pod_cidr), t.overlay) == ("10.244.0.0/16", "vxlan")
    assert {p.name for p in t.pods} >= {"web-1", "web-2", "web-3", "client"}


def test_pods_are_placed_by_name_then_selector_then_spread() -> None:
    raw = topo(nodes=[{"name": "n1", "labels": {"zone": "a"}}, {"name": "n2", "labels": {"zone": "b"}}],
               pods=[{"name": "pinned", "nodeName": "n1"}, {"name": "picky", "nodeSelector": {"zone": "a"}},
                     {"name": "s1"}, {"name": "s2"}])
    placed = place_pods(parse_topology(raw))
    assert placed["pinned"] == "n1" and placed["picky"] == "n1"
    assert {placed["s1"], placed["s2"]} == {"n2"}  # spread: n2 had fewer pods


def test_plan_numbers_nodes_and_keeps_assignments_across_runs() -> None:
    first = plan(parse_topology(topo()), None)
    assert [(n.ip, n.pod_cidr) for n in first.nodes.values()] == [("172.18.0.2", "10.244.1.0/24"),
                                                                   ("172.18.0.3", "10.244.2.0/24")]
    assert first.external_ip == "172.18.0.254"
    grown = plan(parse_topology(topo(nodes=["n2", "n3"])), first)
    assert grown.nodes["n2"] == first.nodes["n2"]
    # n1's addresses are free again and go to the newcomer.
    assert (grown.nodes["n3"].ip, grown.nodes["n3"].pod_cidr) == ("172.18.0.2", "10.244.1.0/24")


def test_a_running_lab_cannot_switch_overlay_in_place() -> None:
    first = plan(parse_topology(topo()), None)
    with pytest.raises(KproxyError, match="runs with overlay vxlan, not host-gw; take it down first"):
        plan(parse_topology(topo(), overlay="host-gw"), first)


def test_an_etcd_lab_has_its_control_plane_at_the_last_address_but_one_and_keeps_its_store() -> None:
    first = plan(parse_topology(topo()), None, store="etcd")
    assert (first.store, first.control_plane_ip, first.external_ip) == ("etcd", "172.18.0.253", "172.18.0.254")
    assert plan(parse_topology(topo()), first).store == "etcd"  # up without --store keeps it
    assert plan(parse_topology(topo()), None).control_plane_ip == ""  # the file store has no control plane
    with pytest.raises(KproxyError, match="runs with store etcd, not file; take it down first"):
        plan(parse_topology(topo()), first, store="file")


@pytest.mark.parametrize(
    "over, message",
    [
        ({"podCIDR": "10.244.0.0/33"}, "podCIDR '10.244.0.0/33' is not a valid CIDR"),
        ({"podCIDR": "10.244.1.0/16"}, "host bits set"),
        ({"podCIDR": "172.18.0.0/16"}, "podCIDR and nodeCIDR overlap"),
        ({"podCIDR": "10.96.0.0/16"}, "podCIDR and the service CIDR overlap"),
        ({"loadBalancerCIDR": "172.18.0.128/25"}, "nodeCIDR and loadBalancerCIDR overlap"),
        ({"loadBalancerCIDR": "10.96.255.0/24"}, "the service CIDR and loadBalancerCIDR overlap"),
        ({"podCIDR": "10.244.0.0/25"}, "smaller than one /24 per node"),
        ({"podCIDR": "10.244.0.0/23", "nodes": ["n1", "n2"]}, "room for 1 nodes, not 2"),
        ({"overlay": "geneve"}, "overlay 'geneve' is not one of vxlan, host-gw, udp"),
        ({"name": "Bad_Name"}, "lab name 'Bad_Name' is not a valid name"),
        ({"nodes": []}, "at least one node"),
        ({"nodes": ["n1", "n1"]}, "duplicate or reserved name 'n1'"),
        ({"pods": [{"name": "n1"}]}, "duplicate or reserved name 'n1'"),
        ({"pods": [{"name": "external"}]}, "duplicate or reserved name 'external'"),
        ({"pods": [{"name": "a", "nodeName": "n9"}]}, "nodeName 'n9' is not a node of this lab"),
        ({"pods": [{"name": "a", "nodeSelector": {"zone": "x"}}]}, "no node matches nodeSelector"),
        ({"pods": [{"name": "a", "ports": [0]}]}, "port 0 is not a number from 1 to 65535"),
        ({"pods": [{"name": "a", "image": "nginx"}]}, "unknown field(s) image"),
        ({"nodes": ["a-very-long-node-name"]}, "longer than 12 characters"),
        ({"pods": [{"name": f"p{i}", "nodeName": "n1"} for i in range(254)]}, "a /24 holds at most 253"),
        ({"colour": "blue"}, "unknown topology field(s): colour"),
    ],
)
def test_bad_topologies_are_refused_with_one_line(over: dict[str, Any], message: str) -> None:
    with pytest.raises(KproxyError) as err:
        parse_topology(topo(**over))
    assert message in str(err.value) and "\n" not in str(err.value)
