"""One UDP client of a service port: an association (a connected socket) to one endpoint.

It is closed after an idle timeout (kube-proxy's --udp-timeout, 250 ms). Replies go
back from the address the client's datagram arrived at (IP_PKTINFO), so conntrack
un-NATs them.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import TYPE_CHECKING

from kproxy.proxy.userspace.balancer import split_address
from kproxy.proxy.userspace.loop import R

if TYPE_CHECKING:
    from kproxy.proxy.userspace.listener import ServiceProxy

UDP_IDLE_TIMEOUT = 0.25  # kube-proxy's --udp-timeout default
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


class UdpAssociation:
    """One client address of a UDP service port, bound to one endpoint until idle."""

    def __init__(self, proxy: ServiceProxy, client: tuple[str, int], endpoint: str) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.client = client
        self.endpoint = endpoint
        self.local = "0.0.0.0"  # where the client's datagrams arrive (after REDIRECT/DNAT): replies leave from it
        self.last = time.monotonic()
        self.closed = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(split_address(endpoint))
        self.loop.set_interest(self.sock.fileno(), R, self._reply)
        self.loop.at(self.last + proxy.udp_timeout, self._check_idle)

    def send(self, data: bytes) -> None:
        self.last = time.monotonic()
        try:
            self.sock.send(data)
        except OSError:  # e.g. ECONNREFUSED left by an ICMP error: the endpoint is not there
            self.close()

    def _reply(self, mask: int) -> None:
        listener = self.proxy.sock
        pktinfo = [(socket.IPPROTO_IP, IP_PKTINFO, struct.pack("=i4s4s", 0, socket.inet_aton(self.local),
                                                                  b"\0\0\0\0"))]
        for _ in range(64):
            try:
                data = self.sock.recv(65535)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self.last = time.monotonic()
            try:
                listener.sendmsg([data], pktinfo, 0, self.client)
            except OSError:
                pass

    def _check_idle(self) -> None:
        if self.closed:
            return
        idle_until = self.last + self.proxy.udp_timeout
        if time.monotonic() >= idle_until:
            self.close()
        else:
            self.loop.at(idle_until, self._check_idle)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.forget(self.sock.fileno())
            self.sock.close()
            if self.proxy.assocs.get(self.client) is self:
                del self.proxy.assocs[self.client]

