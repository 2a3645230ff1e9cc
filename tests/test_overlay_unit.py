"""What each overlay asks of a node, without root: routes, MTUs, and the udp copier's peer table."""

from __future__ import annotations

from kproxy.lab.overlay import Peer, Route, desired_routes, lease_annotations, lease_of, pod_mtu
from kproxy.lab.udpoverlay import peer_table

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


def test_the_copier_knows_every_other_node_by_its_subnet() -> None:
    # keyed as the copier looks a packet up: the destination's first three bytes
    assert peer_table(PEERS) == {int.from_bytes(bytes([10, 244, 2]), "big"): "172.18.0.3",
                                 int.from_bytes(bytes([10, 244, 3]), "big"): "172.18.0.4"}


def test_a_nodes_lease_is_written_and_read_as_flannel_keeps_it_on_the_node() -> None:
    annotations = lease_annotations("vxlan", "172.18.0.3", "aa:bb:cc:00:00:02")
    assert annotations == {"flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:02"}',
                           "flannel.alpha.coreos.com/backend-type": "vxlan",
                           "flannel.alpha.coreos.com/kube-subnet-manager": "true",
                           "flannel.alpha.coreos.com/public-ip": "172.18.0.3"}
    node = {"metadata": {"name": "node2", "annotations": annotations}, "spec": {"podCIDR": "10.244.2.0/24"}}
    assert lease_of(node) == PEERS[0]
    assert lease_annotations("host-gw", "172.18.0.3", "aa:bb:cc:00:00:02")["flannel.alpha.coreos.com/backend-data"] \
        == "null"
    host_gw = {"metadata": {"name": "node2", "annotations": lease_annotations("host-gw", "172.18.0.3", "")},
               "spec": {"podCIDR": "10.244.2.0/24"}}
    assert lease_of(host_gw) == Peer("node2", "172.18.0.3", "10.244.2.0/24", "")
    assert lease_of({"metadata": {"name": "node9"}, "spec": {"podCIDR": "10.244.9.0/24"}}) is None  # not yet leased
