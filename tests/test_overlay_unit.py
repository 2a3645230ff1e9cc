"""What each overlay asks of a node, without root: routes, MTUs, and the udp copier's peer table."""

from __future__ import annotations

from kproxy.lab.overlay import Peer, Route, desired_routes, pod_mtu, runs_copier
from kproxy.lab.udpoverlay import peers_of

PEERS = [Peer("node2", "172.18.0.3", "10.244.2.0/24", "aa:bb:cc:00:00:02"),
         Peer("node3", "172.18.0.4", "10.244.3.0/24", "aa:bb:cc:00:00:03")]


def test_each_overlay_routes_the_other_nodes_subnets_its_own_way() -> None:
    assert desired_routes("vxlan", PEERS) == [Route("10.244.2.0/24", "10.244.2.0", "flannel.1", True),
                                              Route("10.244.3.0/24", "10.244.3.0", "flannel.1", True)]
    assert desired_routes("host-gw", PEERS) == [Route("10.244.2.0/24", "172.18.0.3", "eth0", False),
                                                Route("10.244.3.0/24", "172.18.0.4", "eth0", False)]
    assert desired_routes("udp", PEERS) == []  # flannel0's /16 holds them all


def test_pod_mtu_leaves_room_for_what_the_overlay_wraps_around_a_packet() -> None:
    assert [pod_mtu(o) for o in ("vxlan", "udp", "host-gw")] == [1450, 1472, 1500]
    assert [runs_copier(o) for o in ("vxlan", "udp", "host-gw")] == [False, True, False]


def test_the_copier_knows_every_other_node_by_its_subnet() -> None:
    state = {"nodes": {"node1": {"ip": "172.18.0.2", "pod_cidr": "10.244.1.0/24"},
                       "node2": {"ip": "172.18.0.3", "pod_cidr": "10.244.2.0/24"},
                       "node3": {"ip": "172.18.0.4", "pod_cidr": "10.244.3.0/24"}}}
    peers = peers_of(state, "node1")
    # keyed as the copier looks a packet up: the destination's first three bytes
    assert peers == {int.from_bytes(bytes([10, 244, 2]), "big"): "172.18.0.3",
                     int.from_bytes(bytes([10, 244, 3]), "big"): "172.18.0.4"}
