"""The listener of one service port (the old proxier's proxy socket) and what came through it.

It binds a port the kernel chooses (the portal rules REDIRECT/DNAT to it), hands
new TCP connections to TcpConnection and new UDP clients to UdpAssociation, and
swaps its endpoint list in place: connections to endpoints that remain, or are
only terminating, live on; those to an endpoint that is gone are closed.
"""

from __future__ import annotations

import socket
import sys
from typing import Any, Iterable

from kproxy.proxy.topology import categorize
from kproxy.proxy.types import Endpoint, ServicePort
from kproxy.proxy.userspace.balancer import Balancer
from kproxy.proxy.userspace.loop import ProxyLoop, R
from kproxy.proxy.userspace.tcp import TcpConnection
from kproxy.proxy.userspace.udp import IP_PKTINFO, UdpAssociation

LISTEN_BACKLOG = 1024


def ready_addresses(svc: ServicePort, endpoints: Iterable[Endpoint]) -> list[str]:
    """The endpoints new connections go to (the ready ones, or while none is, the serving
    terminating ones), "ip:port", in the order round robin walks."""
    return [ep.address for ep in categorize(endpoints, svc, "").cluster]


def kept_endpoints(endpoints: Iterable[Endpoint]) -> set[str]:
    """Endpoints whose established connections live on: every one still listed (ready or terminating)."""
    return {ep.address for ep in endpoints}


class ServiceProxy:
    """The listener of one service port and everything that came through it."""

    def __init__(self, loop: ProxyLoop, svc: ServicePort, copy: str, udp_timeout: float) -> None:
        self.loop = loop
        self.svc = svc
        self.copy = copy
        self.udp_timeout = udp_timeout
        self.udp = svc.protocol.upper() == "UDP"
        self.balancer = Balancer(svc.affinity_seconds)
        self.keep: set[str] = set()
        self.conns: set[TcpConnection] = set()
        self.assocs: dict[tuple[str, int], UdpAssociation] = {}
        self.accepted = 0
        self.dial_failures = 0
        self.sock = self._listen()
        self.port: int = self.sock.getsockname()[1]

    def _listen(self) -> socket.socket:
        """The service port's socket, on a port the kernel picks, served by the loop."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", 0))
        sock.setblocking(False)
        if self.udp:
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            self.loop.set_interest(sock.fileno(), R, self._datagrams)
        else:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.listen(LISTEN_BACKLOG)
            self.loop.set_interest(sock.fileno(), R, self._accept)
        return sock

    def update(self, svc: ServicePort, endpoints: list[Endpoint]) -> bool:
        """Serve svc with endpoints from now on; whether that changed what this listener does."""
        before = self._programming()
        self.svc = svc
        self.balancer.set_affinity(svc.affinity_seconds)
        self.balancer.update(ready_addresses(self.svc, endpoints))
        self.keep = kept_endpoints(endpoints)
        for conn in [c for c in self.conns if c.ways is not None and c.endpoint not in self.keep]:
            conn.close()
        for assoc in [a for a in self.assocs.values() if a.endpoint not in self.keep]:
            assoc.close()
        return self._programming() != before

    def _programming(self) -> tuple[ServicePort, tuple[str, ...], frozenset[str]]:
        """What decides where this listener's connections go and which live on."""
        return self.svc, tuple(self.balancer.endpoints), frozenset(self.keep)

    def _accept(self, mask: int) -> None:
        # One per event: epoll is level triggered, so the next round reports the rest of the backlog,
        # and a quiet listener costs no extra accept() that fails with EAGAIN.
        try:
            fd, peer = self.sock._accept()  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        except OSError as exc:  # EMFILE and friends: leave it in the backlog for later
            print(f"kproxy userspace: accept on :{self.port}: {exc}", file=sys.stderr, flush=True)
            return
        self.accepted += 1
        TcpConnection(self, socket.socket(socket.AF_INET, socket.SOCK_STREAM, 0, fd), peer)

    def _datagrams(self, mask: int) -> None:
        for _ in range(64):
            try:
                data, ancdata, _, client = self.sock.recvmsg(65535, socket.CMSG_SPACE(12))
            except BlockingIOError:
                return
            except OSError:
                continue
            assoc = self.assocs.get(client)
            if assoc is None or assoc.closed:
                endpoint = self.balancer.next(client[0])
                if endpoint is None:
                    continue
                assoc = self.assocs[client] = UdpAssociation(self, client, endpoint)
                self.accepted += 1
            for level, kind, value in ancdata:
                if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
                    assoc.local = socket.inet_ntoa(value[8:12])  # ipi_addr: the datagram's destination
            assoc.send(data)

    def close(self) -> None:
        self.loop.forget(self.sock.fileno())
        self.sock.close()
        for conn in list(self.conns):
            conn.close()
        for assoc in list(self.assocs.values()):
            assoc.close()

    def snapshot(self) -> dict[str, Any]:
        live: dict[str, int] = {}
        dialling = 0
        for conn in self.conns:
            if conn.ways is None:
                dialling += 1
            else:
                live[conn.endpoint] = live.get(conn.endpoint, 0) + 1
        for assoc in self.assocs.values():
            live[assoc.endpoint] = live.get(assoc.endpoint, 0) + 1
        return {"service": self.svc.service_port_name, "protocol": self.svc.protocol, "proxyPort": self.port,
                "clusterIP": self.svc.cluster_ip, "port": self.svc.port, "nodePort": self.svc.node_port,
                "affinitySeconds": self.svc.affinity_seconds, "endpoints": list(self.balancer.endpoints),
                "terminating": sorted(self.keep - set(self.balancer.endpoints)), "live": live,
                "dialling": dialling, "accepted": self.accepted, "dialFailures": self.dial_failures,
                "copy": "datagram" if self.udp else self.copy}

