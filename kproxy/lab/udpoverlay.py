"""flannel's UDP backend on one node: the TUN device flannel0 and the userspace copier behind it.

flanneld's oldest backend, as flannel's backend/udp does it:

- flannel0, a TUN device, holds the node's subnet address with the whole pod
  network's prefix (10.244.1.0/16), so the kernel routes every other node's
  pods into it (the node's own /24 stays on cni0, the longer prefix); its
  MTU is the underlay's less the 28 bytes of the outer IPv4 and UDP headers,
  and so is the pods';
- this process reads each packet the kernel routes into flannel0, finds the
  node whose subnet holds the destination, and sends the whole IP packet as
  the payload of one UDP datagram to that node's port 8285; what arrives on
  8285 from a node of the lab it writes back into flannel0, and the kernel
  delivers it to the pod.

Every packet crosses into userspace twice (a read and a send here, a receive
and a write on the other side): that is why the seeds call it the slowest
backend. One process per node, run by the lab's supervisor (restarted if it
dies; the TUN device goes with it and comes back with the new one). It
follows the lab's state file, so nodes added or removed are peers at once.

    python -m kproxy.lab.udpoverlay --lab-dir /run/kproxy/LAB --node node1 [--pidfile F]
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from kproxy.lab.overlay import UDP_DEVICE as TUN_DEVICE, UDP_PORT, pod_mtu
from kproxy.lab.workload import remove_pidfile, write_pidfile

MTU = pod_mtu("udp")
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # bare IP packets, no 4-byte packet-information header
RELOAD_SECONDS = 0.5  # how often the state file is looked at


def log(message: str) -> None:
    print(f"kproxy-udpoverlay: {message}", file=sys.stderr, flush=True)


def peers_of(state: dict[str, Any], node: str) -> dict[int, str]:
    """Every other node's /24 (its network address >> 8) -> that node's IP, from the lab's state (pure)."""
    return {int(ipaddress.IPv4Network(spec["pod_cidr"]).network_address) >> 8: spec["ip"]
            for name, spec in state["nodes"].items() if name != node}


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
    """The loop between flannel0 and UDP port 8285."""

    def __init__(self, state_file: Path, node: str) -> None:
        self.state_file = state_file
        self.node = node
        self.running = True
        self._mtime = 0.0
        state = self._reload()
        own = state["nodes"][node]
        self.tun = open_tun(TUN_DEVICE)
        network = ipaddress.IPv4Network(state["pod_cidr"])
        configure(TUN_DEVICE, str(ipaddress.IPv4Network(own["pod_cidr"]).network_address), network.prefixlen)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((own["ip"], UDP_PORT))
        self.sock.setblocking(False)

    def _reload(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_file.read_text())
        self.peers = peers_of(state, self.node)
        self.known = set(self.peers.values())
        self._mtime = self.state_file.stat().st_mtime
        return state

    def _maybe_reload(self) -> None:
        try:
            if self.state_file.stat().st_mtime != self._mtime:
                self._reload()
        except (OSError, ValueError, KeyError) as exc:  # mid-rewrite or gone: keep the peers we have
            log(f"state not reloaded: {exc}")

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

    def run(self) -> None:
        poller = select.poll()
        poller.register(self.tun, select.POLLIN)
        poller.register(self.sock.fileno(), select.POLLIN)
        while self.running:
            for fd, _ in poller.poll(RELOAD_SECONDS * 1000):
                if fd == self.tun:
                    self._from_tun()
                else:
                    self._from_udp()
            self._maybe_reload()

    def close(self) -> None:
        self.sock.close()
        os.close(self.tun)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.lab.udpoverlay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", required=True, type=Path)
    parser.add_argument("--node", required=True)
    parser.add_argument("--pidfile", help="write our PID here (atomically) once flannel0 is up")
    args = parser.parse_args(argv)
    try:
        copier = Copier(args.lab_dir / "state.json", args.node)
    except (OSError, ValueError, KeyError) as exc:
        log(f"cannot start: {exc}")
        return 1

    def stop(signum: int, frame: Any) -> None:
        copier.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        if args.pidfile:
            write_pidfile(args.pidfile)
        log(f"{TUN_DEVICE} up, {len(copier.peers)} peers, UDP {UDP_PORT}")
        copier.run()
    finally:
        copier.close()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
