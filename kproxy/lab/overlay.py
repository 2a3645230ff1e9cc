"""The node overlays, as flannel programs them: vxlan, host-gw and udp.

vxlan: a VTEP flannel.1 per node (VNI 1, UDP 8472, learning off, the node
subnet's .0/32 as its address, MTU = underlay MTU - 50) and, per remote node,
one FDB entry (VTEP MAC -> node IP), one permanent neighbour (remote .0 ->
VTEP MAC) and one onlink route (remote /24 via remote .0).
host-gw: per remote node a route to its /24 via its node IP.
udp: nothing here but the MTU; flannel0 and its copier (kproxy.lab.udpoverlay)
are flanneld's, and the kernel routes the pod network into flannel0.

Each node's part comes from the leases on the Node objects (lease_of), which
kproxy.lab.flanneld follows in every node.

desired_* are pure; apply() makes one node's kernel match, removing entries of
nodes that are gone.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any, Mapping

from pyroute2 import IPRoute

VXLAN_DEVICE = "flannel.1"
VXLAN_VNI = 1
VXLAN_PORT = 8472
VXLAN_OVERHEAD = 50
UDP_DEVICE = "flannel0"  # flannel's udp backend: a TUN device, and a copier behind it
UDP_PORT = 8285
UDP_OVERHEAD = 28  # outer IPv4 (20) + UDP (8)
UNDERLAY_MTU = 1500
UNDERLAY_DEVICE = "eth0"
NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4
RTPROT_BOOT = 3  # what flannel's routes carry (ip route shows no proto for it)


def pod_mtu(overlay: str) -> int:
    """The pods' MTU: the underlay's, less what the overlay wraps around each packet."""
    return UNDERLAY_MTU - {"vxlan": VXLAN_OVERHEAD, "udp": UDP_OVERHEAD}.get(overlay, 0)


@dataclass(frozen=True)
class Peer:
    """A node's lease, as flannel's kube subnet manager keeps it on the Node object."""

    name: str
    node_ip: str
    pod_cidr: str
    vtep_mac: str

    @property
    def vtep_ip(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr).network_address)


ANNOTATIONS = "flannel.alpha.coreos.com/"
BACKEND_TYPE = ANNOTATIONS + "backend-type"
BACKEND_DATA = ANNOTATIONS + "backend-data"
PUBLIC_IP = ANNOTATIONS + "public-ip"
SUBNET_MANAGER = ANNOTATIONS + "kube-subnet-manager"


def lease_annotations(overlay: str, node_ip: str, vtep_mac: str) -> dict[str, str]:
    """What flanneld writes on its Node: the backend, its data (vxlan: VNI and VTEP MAC), the public IP."""
    data = json.dumps({"VNI": VXLAN_VNI, "VtepMAC": vtep_mac}, separators=(",", ":")) if overlay == "vxlan" \
        else "null"
    return {BACKEND_DATA: data, BACKEND_TYPE: overlay, SUBNET_MANAGER: "true", PUBLIC_IP: node_ip}


def lease_of(node: Mapping[str, Any]) -> Peer | None:
    """The lease a Node object holds; None while it has none (no podCIDR or no flannel annotations)."""
    annotations = node["metadata"].get("annotations") or {}
    cidr = (node.get("spec") or {}).get("podCIDR")
    if not cidr or PUBLIC_IP not in annotations:
        return None
    data = json.loads(annotations.get(BACKEND_DATA) or "null") or {}
    return Peer(node["metadata"]["name"], annotations[PUBLIC_IP], cidr, data.get("VtepMAC", ""))


@dataclass(frozen=True)
class Route:
    dst: str
    gateway: str
    device: str
    onlink: bool


def desired_routes(overlay: str, peers: list[Peer]) -> list[Route]:
    if overlay == "vxlan":
        return [Route(p.pod_cidr, p.vtep_ip, VXLAN_DEVICE, True) for p in peers]
    if overlay == "udp":
        return []  # flannel0's own prefix covers the other nodes' subnets
    return [Route(p.pod_cidr, p.node_ip, UNDERLAY_DEVICE, False) for p in peers]


def desired_fdb(peers: list[Peer]) -> set[tuple[str, str]]:
    return {(p.vtep_mac, p.node_ip) for p in peers}


def desired_neighbours(peers: list[Peer]) -> set[tuple[str, str]]:
    return {(p.vtep_ip, p.vtep_mac) for p in peers}


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_vtep(ipr: IPRoute, node_ip: str, pod_cidr: str, mac: str) -> int:
    """flannel.1 with the right identity; recreated if something else holds the name."""
    underlay = _index(ipr, UNDERLAY_DEVICE)
    index = _index(ipr, VXLAN_DEVICE)
    if index is not None:
        link = ipr.get_links(index)[0]
        info = link.get("IFLA_LINKINFO")
        data = info.get("IFLA_INFO_DATA") if info else None
        if (info is None or info.get("IFLA_INFO_KIND") != "vxlan" or data is None
                or data.get("IFLA_VXLAN_ID") != VXLAN_VNI or link.get("IFLA_ADDRESS") != mac
                or data.get("IFLA_VXLAN_LOCAL") != node_ip):
            ipr.link("del", index=index)
            index = None
    if index is None:
        ipr.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_id=VXLAN_VNI, vxlan_port=VXLAN_PORT,
                 vxlan_learning=0, vxlan_local=node_ip, vxlan_link=underlay, address=mac,
                 mtu=UNDERLAY_MTU - VXLAN_OVERHEAD)
        index = _index(ipr, VXLAN_DEVICE)
    vtep_ip = str(ipaddress.ip_network(pod_cidr).network_address)
    if not any(a.get("IFA_ADDRESS") == vtep_ip for a in ipr.get_addr(index=index, family=socket.AF_INET)):
        ipr.addr("add", index=index, address=vtep_ip, prefixlen=32)
    ipr.link("set", index=index, state="up")
    return index  # type: ignore[no-any-return]


def _sync_fdb(ipr: IPRoute, index: int, want: set[tuple[str, str]]) -> None:
    have = set()
    for entry in ipr.fdb("dump", ifindex=index):
        if entry.get("NDA_DST") and entry["ifindex"] == index:
            have.add((entry.get("NDA_LLADDR"), entry.get("NDA_DST")))
    for mac, dst in have - want:
        ipr.fdb("del", ifindex=index, lladdr=mac, dst=dst)
    for mac, dst in want - have:
        ipr.fdb("append", ifindex=index, lladdr=mac, dst=dst, state=NUD_PERMANENT)


def _sync_neighbours(ipr: IPRoute, index: int, want: set[tuple[str, str]]) -> None:
    have = {(n.get("NDA_DST"), n.get("NDA_LLADDR")) for n in ipr.get_neighbours(ifindex=index, family=socket.AF_INET)
            if n["state"] & NUD_PERMANENT}
    for dst, mac in have - want:
        ipr.neigh("del", ifindex=index, dst=dst, lladdr=mac)
    for dst, mac in want - have:
        ipr.neigh("replace", ifindex=index, dst=dst, lladdr=mac, state=NUD_PERMANENT)


def _sync_routes(ipr: IPRoute, cluster_cidr: str, own_cidr: str, want: list[Route]) -> None:
    """Routes to other nodes' pod subnets: those in the cluster CIDR via a gateway, except our own."""
    cluster = ipaddress.ip_network(cluster_cidr)
    have = set()
    for r in ipr.get_routes(family=socket.AF_INET, table=254):
        dst = r.get("RTA_DST")
        if dst and r.get("RTA_GATEWAY") and ipaddress.ip_address(dst) in cluster:
            have.add(f"{dst}/{r['dst_len']}")
    have.discard(own_cidr)
    for dst in have - {r.dst for r in want}:
        ipr.route("del", dst=dst)
    for route in want:
        ipr.route("replace", dst=route.dst, gateway=route.gateway, oif=_index(ipr, route.device),
                  flags=RTNH_F_ONLINK if route.onlink else 0, proto=RTPROT_BOOT)


def apply(ipr: IPRoute, overlay: str, cluster_cidr: str, node_ip: str, pod_cidr: str, vtep_mac: str,
          peers: list[Peer]) -> None:
    """Make one node's overlay match: its own VTEP (vxlan) and one entry set per peer."""
    if overlay == "vxlan":
        index = ensure_vtep(ipr, node_ip, pod_cidr, vtep_mac)
        _sync_fdb(ipr, index, desired_fdb(peers))
        _sync_neighbours(ipr, index, desired_neighbours(peers))
    else:
        stale = _index(ipr, VXLAN_DEVICE)
        if stale is not None:
            ipr.link("del", index=stale)
    _sync_routes(ipr, cluster_cidr, pod_cidr, desired_routes(overlay, peers))
