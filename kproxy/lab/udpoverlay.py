"""flannel's UDP backend on one node: the TUN device flannel0 and the userspace copier behind it.

flanneld's oldest backend, as flannel's backend/udp does it:

- flannel0, a TUN device, holds the node's subnet address with the whole pod
  network's prefix (10.244.1.0/16), so the kernel routes every other node's
  pods into it (the node's own /24 stays on cni0, the longer prefix); its
  MTU is the underlay's less the 28 bytes of the outer IPv4 and UDP headers,
  and so is the pods';
- the copier reads each packet the kernel routes into flannel0, finds the
  node whose subnet holds the destination, and sends the whole IP packet as
  the payload of one UDP datagram to that node's port 8285; what arrives on
  8285 from a node of the lab it writes back into flannel0, and the kernel
  delivers it to the pod.

Every packet crosses into userspace twice (a read and a send here, a receive
and a write on the other side): that is why the seeds call it the slowest
backend. The copier runs inside the node's flanneld (kproxy.lab.flanneld),
which gives it the other nodes' leases as they change; the TUN device lives
and dies with that process.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import select
import socket
import struct

from pyroute2 import IPRoute

from kproxy.lab.overlay import UDP_DEVICE as TUN_DEVICE, UDP_PORT, Peer, pod_mtu

MTU = pod_mtu("udp")
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # bare IP packets, no 4-byte packet-information header


def peer_table(peers: list[Peer]) -> dict[int, str]:
    """Every other node's /24 (its network address >> 8) -> that node's IP (pure)."""
    return {int(ipaddress.IPv4Network(p.pod_cidr).network_address) >> 8: p.node_ip for p in peers}


def open_tun(name: str) -> int:
    """A TUN device of that name in this network namespace, owned by this process (gone when it exits)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def configure(name: str, address: str, prefixlen: int) -> None:
    """flannel0's address (the node subnet's first address, the pod network's prefix), MTU, up."""
    with IPRoute() as ipr:
        (index,) = ipr.link_lookup(ifname=name)
        ipr.link("set", index=index, mtu=MTU)
        ipr.addr("replace", index=index, address=address, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")


class Copier:
    """The loop between flannel0 and UDP port 8285, for the node with lease own."""

    def __init__(self, own: Peer, cluster_cidr: str) -> None:
        self.peers: dict[int, str] = {}
        self.known: set[str] = set()
        self.tun = open_tun(TUN_DEVICE)
        network = ipaddress.IPv4Network(cluster_cidr)
        configure(TUN_DEVICE, own.vtep_ip, network.prefixlen)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((own.node_ip, UDP_PORT))
        self.sock.setblocking(False)
        self.poller = select.poll()
        self.poller.register(self.tun, select.POLLIN)
        self.poller.register(self.sock.fileno(), select.POLLIN)

    def set_peers(self, peers: list[Peer]) -> None:
        self.peers = peer_table(peers)
        self.known = set(self.peers.values())

    def _from_tun(self) -> None:
        while True:
            try:
                packet = os.read(self.tun, 65535)
            except BlockingIOError:
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue
            peer = self.peers.get(int.from_bytes(packet[16:19], "big"))
            if peer is not None:  # else no node holds that address: dropped, as flannel drops it
                try:
                    self.sock.sendto(packet, (peer, UDP_PORT))
                except OSError:
                    pass  # a peer just gone; the kernel's ICMP reaches the sender, as with any lost packet

    def _from_udp(self) -> None:
        while True:
            try:
                packet, (source, _) = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            if source in self.known:
                try:
                    os.write(self.tun, packet)
                except OSError:
                    pass  # not an IP packet the kernel takes

    def serve(self, seconds: float) -> None:
        """Copy what arrives within seconds (flanneld looks at its leases between two calls)."""
        for fd, _ in self.poller.poll(seconds * 1000):
            if fd == self.tun:
                self._from_tun()
            else:
                self._from_udp()

    def close(self) -> None:
        self.sock.close()
        os.close(self.tun)
