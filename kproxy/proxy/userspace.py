"""kube-proxy's first mode, the userspace proxy, for real, in one node's network namespace.

A Service here is what it always was underneath: a process that accepts a
connection and copies bytes to a chosen backend. What a reader finds, top to
bottom:

1. ``render(state, node, ports)``: pure, no root. The nat rules the old
   proxier (pkg/proxy/userspace, removed in Kubernetes 1.26) kept: per service
   port, in KUBE-PORTALS-CONTAINER (jumped to from PREROUTING, for traffic from
   pods and from outside) ``-d <clusterIP>/32 ... -j REDIRECT --to-ports
   <proxyPort>``, and in KUBE-PORTALS-HOST (from OUTPUT, for the node's own
   traffic) ``-j DNAT --to-destination <nodeIP>:<proxyPort>``: REDIRECT of a
   locally generated packet goes to 127.0.0.1, whose replies do not match the
   NAT (the upstream comments say so, and it is so). NodePorts likewise in
   KUBE-NODEPORT-CONTAINER / KUBE-NODEPORT-HOST (jumped to for
   ``--dst-type LOCAL`` only, after everything else), and filter
   KUBE-NODEPORT-NON-LOCAL accepts new connections to the proxy ports. One
   addition: a service port without endpoints gets no portal but a REJECT in
   filter KUBE-USERSPACE-REJECT, so clients get "connection refused" as with
   today's kube-proxy (the old proxier accepted and closed).

2. ``Balancer``: the old LoadBalancerRR: round robin over the ready
   endpoints, ClientIP affinity with its timeout (refreshed on every use),
   affinity reset after a failed dial.

3. ``ProxyLoop``: one epoll loop in one background thread of the agent
   process serves every listener, connection and UDP association of the node.
   TCP: accept, dial the chosen endpoint without blocking, on failure the
   next endpoint with the old dial timeouts (250 ms, 500 ms, 1 s, 2 s: four
   tries, then the client is closed), then copy both ways. The copy is
   ``splice(2)`` socket -> pipe -> socket (the bytes never enter Python) or a
   plain recv_into/send into one shared buffer; splice is the default, chosen
   by measurement (docs/userspace.md). UDP: one association (a connected
   socket) per client address to one endpoint, closed after an idle timeout
   (kube-proxy's --udp-timeout, 250 ms); replies go back from the address the
   client's datagram arrived at (IP_PKTINFO), so conntrack un-NATs them.

4. ``UserspaceProxier``: sync() opens/closes listeners and swaps endpoint
   lists in place (established connections to endpoints that remain, or are
   only terminating, live on; connections and associations to an endpoint
   that is gone are closed), then applies the portal rules with one
   ``iptables-nft-restore --noflush`` (our chains only, skipped when the
   text is unchanged: an endpoint change alone touches no rule).
   ``rules_excerpt()`` shows the live portal rules with counters and the
   listener table; the table is served on an abstract unix socket, which
   (like everything abstract) lives in the node's network namespace, so
   ``kproxy rules`` can ask the running agent.
"""

from __future__ import annotations

import errno
import fcntl
import heapq
import itertools
import json
import os
import re
import select
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from kproxy.proxy.kernel import SAVE, RestoreError, restore, run
from kproxy.proxy.mode import Mode, Option
from kproxy.proxy.netfilter import Jump, OwnedChains, comment, restore_tables, usable_endpoints
from kproxy.proxy.saved import excerpt, has_jump, read_tables, remove_chains
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult

# --- names and constants -----------------------------------------------------

PORTALS_CONTAINER = "KUBE-PORTALS-CONTAINER"
PORTALS_HOST = "KUBE-PORTALS-HOST"
NODEPORT_CONTAINER = "KUBE-NODEPORT-CONTAINER"
NODEPORT_HOST = "KUBE-NODEPORT-HOST"
NODEPORT_NON_LOCAL = "KUBE-NODEPORT-NON-LOCAL"
REJECT_CHAIN = "KUBE-USERSPACE-REJECT"  # ours, not upstream's: see the module doc

NAT_CHAINS = (PORTALS_CONTAINER, PORTALS_HOST, NODEPORT_CONTAINER, NODEPORT_HOST)
FILTER_CHAINS = (NODEPORT_NON_LOCAL, REJECT_CHAIN)
is_own_chain = OwnedChains({"nat": NAT_CHAINS, "filter": FILTER_CHAINS})


DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)  # upstream's EndpointDialTimeouts: one dial per entry
UDP_IDLE_TIMEOUT = 0.25  # kube-proxy's --udp-timeout default
LISTEN_BACKLOG = 1024
PIPE_SIZE = 1 << 20  # splice pipe capacity (fs/pipe-max-size allows 1 MiB)
COPY_BUFFER = 256 * 1024  # the shared buffer of the recv/send copier
BURST = 16  # chunks moved per readiness event before the loop serves others
STATUS_SOCKET = "\0kproxy-userspace"  # abstract: one per network namespace
COPY_MODES = ("splice", "copy")
DEFAULT_COPY = "splice"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


_CLUSTER_COMMENT = "handle ClusterIPs; NOTE: this must be before the NodePort rules"
_NODEPORT_COMMENT = "handle service NodePorts; NOTE: this must be the last rule in the chain"
_NON_LOCAL_COMMENT = "Ensure that non-local NodePort traffic can flow"
_REJECT_COMMENT = "kproxy userspace: service ports without endpoints"
_LOCAL = "-m addrtype --dst-type LOCAL"
_NEW = "-m conntrack --ctstate NEW"

JUMPS = (
    Jump("nat", "PREROUTING", PORTALS_CONTAINER, _CLUSTER_COMMENT),
    Jump("nat", "OUTPUT", PORTALS_HOST, _CLUSTER_COMMENT),
    Jump("nat", "PREROUTING", NODEPORT_CONTAINER, _NODEPORT_COMMENT, _LOCAL, first=False),
    Jump("nat", "OUTPUT", NODEPORT_HOST, _NODEPORT_COMMENT, _LOCAL, first=False),
    Jump("filter", "INPUT", NODEPORT_NON_LOCAL, _NON_LOCAL_COMMENT),
    # Only new connections need to see the rejects (as kube-proxy's jumps to its filter KUBE-SERVICES).
    Jump("filter", "INPUT", REJECT_CHAIN, _REJECT_COMMENT, _NEW),
    Jump("filter", "FORWARD", REJECT_CHAIN, _REJECT_COMMENT, _NEW),
    Jump("filter", "OUTPUT", REJECT_CHAIN, _REJECT_COMMENT, _NEW),
)


def ready_addresses(endpoints: Iterable[Endpoint]) -> list[str]:
    """The usable endpoints' "ip:port", in the order round robin walks."""
    return [ep.address for ep in usable_endpoints(endpoints)]


def kept_endpoints(endpoints: Iterable[Endpoint]) -> set[str]:
    """Endpoints whose established connections live on: every one still listed (ready or terminating)."""
    return {ep.address for ep in endpoints}


# --- 1. rendering -------------------------------------------------------------

@dataclass
class Portals:
    """Per table: our chains and their "-A" lines, in order."""

    tables: dict[str, dict[str, list[str]]]

    def restore_text(self, jumps: Iterable[Jump] = ()) -> str:
        return restore_tables({table: (list(chains), [rule for rules in chains.values() for rule in rules])
                               for table, chains in self.tables.items()}, jumps)


def render(state: ProxyState, node: NodeInfo, ports: dict[str, int | str]) -> Portals:
    """The rules of the userspace proxier on node; ports: ServicePort.key -> its proxy port."""
    nat: dict[str, list[str]] = {c: [] for c in NAT_CHAINS}
    filter_: dict[str, list[str]] = {c: [] for c in FILTER_CHAINS}
    services = sorted(state.services, key=lambda s: (s.service_port_name, s.protocol, s.cluster_ip, s.port))
    for svc in services:
        proto = svc.protocol.lower()
        name = comment(svc.service_port_name)
        if not usable_endpoints(state.endpoints_of(svc)):
            none = comment(f"{svc.service_port_name} has no endpoints")
            filter_[REJECT_CHAIN].append(f"-A {REJECT_CHAIN} -d {svc.cluster_ip}/32 -p {proto} -m comment "
                                         f"--comment {none} -m {proto} --dport {svc.port} -j REJECT "
                                         "--reject-with icmp-port-unreachable")
            if svc.node_port:
                filter_[REJECT_CHAIN].append(f"-A {REJECT_CHAIN} -p {proto} -m comment --comment {none} "
                                             f"-m addrtype --dst-type LOCAL -m {proto} --dport {svc.node_port} "
                                             "-j REJECT --reject-with icmp-port-unreachable")
            continue
        port = ports[svc.key]
        host = f"DNAT --to-destination {node.ip}:{port}" if node.ip else f"REDIRECT --to-ports {port}"
        portal = f"-d {svc.cluster_ip}/32 -p {proto} -m comment --comment {name} -m {proto} --dport {svc.port}"
        nat[PORTALS_CONTAINER].append(f"-A {PORTALS_CONTAINER} {portal} -j REDIRECT --to-ports {port}")
        nat[PORTALS_HOST].append(f"-A {PORTALS_HOST} {portal} -j {host}")
        if svc.node_port:
            public = f"-p {proto} -m comment --comment {name} -m {proto} --dport {svc.node_port}"
            nat[NODEPORT_CONTAINER].append(f"-A {NODEPORT_CONTAINER} {public} -j REDIRECT --to-ports {port}")
            nat[NODEPORT_HOST].append(f"-A {NODEPORT_HOST} {public} -j {host}")
            filter_[NODEPORT_NON_LOCAL].append(
                f"-A {NODEPORT_NON_LOCAL} -p {proto} -m comment --comment {name} -m {proto} --dport {port} "
                "-m state --state NEW -j ACCEPT")
    return Portals({"filter": filter_, "nat": nat})


def placeholder_ports(state: ProxyState) -> dict[str, int | str]:
    """For rendering without a running proxy: <proxy-port-N>, N counting service ports in key order."""
    keys = sorted({svc.key for svc in state.services})
    return {key: f"<proxy-port-{i}>" for i, key in enumerate(keys, 1)}


def render_text(state: ProxyState, node: NodeInfo) -> str:
    ports = placeholder_ports(state)
    head = ["# kproxy userspace: proxy ports are chosen by the kernel when the listeners open;",
            "# below they are placeholders:"]
    head += [f"#   <proxy-port-{i}> = {key}" for i, key in enumerate(sorted(ports), 1)]
    return "\n".join(head) + "\n" + render(state, node, ports).restore_text()


# --- 2. choosing an endpoint ---------------------------------------------------

class Balancer:
    """Round robin with optional ClientIP affinity (the old LoadBalancerRR), for one service port."""

    def __init__(self, affinity_seconds: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.affinity_seconds = affinity_seconds
        self.clock = clock
        self.endpoints: list[str] = []
        self.index = 0
        self.sticky: dict[str, list[Any]] = {}  # client IP -> [endpoint, last used]

    def update(self, endpoints: list[str]) -> None:
        if endpoints == self.endpoints:
            return
        self.endpoints = list(endpoints)
        self.index = 0  # as upstream: a new list starts over
        valid = set(endpoints)
        self.sticky = {ip: s for ip, s in self.sticky.items() if s[0] in valid}

    def set_affinity(self, seconds: int) -> None:
        if seconds != self.affinity_seconds:
            self.affinity_seconds = seconds
            self.sticky = {}

    def next(self, client_ip: str, reset: bool = False) -> str | None:
        """The endpoint for a new connection from client_ip; reset: the sticky one just failed."""
        if not self.endpoints:
            return None
        now = self.clock()
        if self.affinity_seconds and not reset:
            s = self.sticky.get(client_ip)
            if s is not None and now - s[1] < self.affinity_seconds:
                s[1] = now
                return str(s[0])
        endpoint = self.endpoints[self.index % len(self.endpoints)]
        self.index = (self.index + 1) % len(self.endpoints)
        if self.affinity_seconds:
            self.sticky[client_ip] = [endpoint, now]
        return endpoint

    def expire(self) -> None:
        if self.affinity_seconds:
            now = self.clock()
            self.sticky = {ip: s for ip, s in self.sticky.items() if now - s[1] < self.affinity_seconds}


def dial_schedule() -> list[float]:
    """The connect timeout of each try; after the last one the client is closed."""
    return list(DIAL_TIMEOUTS)


# --- 3. the loop ------------------------------------------------------------------

R, W = select.EPOLLIN, select.EPOLLOUT
RDHUP = select.EPOLLRDHUP  # the peer sent FIN: read on to the end in this round
_ERR = select.EPOLLERR | select.EPOLLHUP  # always reported: handlers treat them as readable and writable
PIPE_POOL = 64  # idle splice pipes kept for the next connections


def _split(address: str) -> tuple[str, int]:
    ip, port = address.rsplit(":", 1)
    return ip, int(port)


class ProxyLoop:
    """One epoll loop in one thread: listeners, TCP connections, UDP associations, timers."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.pipes: list[tuple[int, int]] = []  # idle, empty splice pipes
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.masks: dict[int, int] = {}
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._calls: list[tuple[Callable[[], Any], dict[str, Any], threading.Event]] = []
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.set_interest(self._wake_r, R, self._drain)
        self.buffer = bytearray(COPY_BUFFER)
        self.view = memoryview(self.buffer)
        self.running = True
        self.thread = threading.Thread(target=self._run, name="kproxy-userspace", daemon=True)
        self.thread.start()

    # plumbing ----------------------------------------------------------------

    def set_interest(self, fd: int, mask: int, handler: Callable[[int], None] | None = None) -> None:
        if handler is not None:
            self.handlers[fd] = handler
        old = self.masks.get(fd, 0)
        if mask == old:
            return
        if not mask:
            self.epoll.unregister(fd)
            del self.masks[fd]
        elif not old:
            self.epoll.register(fd, mask)
            self.masks[fd] = mask
        else:
            self.epoll.modify(fd, mask)
            self.masks[fd] = mask

    def forget(self, fd: int, closing: bool = True) -> None:
        """Stop watching fd; closing: the caller closes it next, which takes it out of epoll by itself."""
        if self.masks.pop(fd, 0) and not closing:
            self.epoll.unregister(fd)
        self.handlers.pop(fd, None)

    def pipe(self) -> tuple[int, int]:
        """An empty pipe for splice (from the pool, or new with PIPE_SIZE capacity)."""
        if self.pipes:
            return self.pipes.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        return r, w

    def release_pipe(self, r: int, w: int, empty: bool) -> None:
        if empty and len(self.pipes) < PIPE_POOL:
            self.pipes.append((r, w))
        else:
            os.close(r)
            os.close(w)

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (when, next(self._seq), callback))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn in the loop thread and return its result (or raise its exception)."""
        if threading.current_thread() is self.thread or not self.thread.is_alive():
            return fn()
        done = threading.Event()
        box: dict[str, Any] = {}
        with self._lock:
            self._calls.append((fn, box, done))
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("result")

    def _drain(self, mask: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, box, done in calls:
            try:
                box["result"] = fn()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            done.set()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(lambda: setattr(self, "running", False))
            self.thread.join(5)

    def _run(self) -> None:
        poll = self.epoll.poll
        handlers = self.handlers
        masks = self.masks
        while self.running:
            timeout = -1.0
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            try:
                events = poll(timeout)
            except InterruptedError:
                continue
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None and fd in masks:
                    if mask & _ERR:
                        mask |= R | W | RDHUP
                    try:
                        handler(mask)
                    except Exception as exc:  # one connection's trouble never stops the loop
                        print(f"kproxy userspace: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, callback = heapq.heappop(self.timers)
                try:
                    callback()
                except Exception as exc:
                    print(f"kproxy userspace: timer: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


class _Direction:
    """One way of a TCP connection: bytes from src to dst, through a pipe (splice) or a buffer (copy)."""

    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "queued", "pending", "want_read", "want_write", "done")

    def __init__(self, src: socket.socket, dst: socket.socket, loop: "ProxyLoop | None") -> None:
        self.src, self.dst = src, dst
        self.pipe_r = self.pipe_w = -1
        if loop is not None:  # splice
            self.pipe_r, self.pipe_w = loop.pipe()
        self.queued = 0  # bytes waiting in the pipe (splice)
        self.pending: bytes | memoryview = b""  # bytes waiting for dst (copy)
        self.want_read = True
        self.want_write = False
        self.done = False

    def close(self, loop: "ProxyLoop") -> None:
        if self.pipe_r >= 0:
            loop.release_pipe(self.pipe_r, self.pipe_w, self.queued == 0)
        self.pipe_r = self.pipe_w = -1


_SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0


def _connected_now(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
        return True
    except OSError:
        return False


class TcpConnection:
    """One client connection: dialling an endpoint (with retries), then copying both ways."""

    def __init__(self, proxy: "ServiceProxy", client: socket.socket, peer: tuple[str, int]) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.client = client
        self.peer = peer
        self.backend: socket.socket | None = None
        self.endpoint = ""
        self.attempt = 0
        self.dialling = 0  # generation of the current dial, for its timer
        self.ways: tuple[_Direction, _Direction] | None = None
        self.closed = False
        client.setblocking(False)  # TCP_NODELAY it inherited from the listener
        proxy.conns.add(self)
        self.dial()

    # dialling ------------------------------------------------------------------

    def dial(self) -> None:
        while self.attempt < len(DIAL_TIMEOUTS):
            endpoint = self.proxy.balancer.next(self.peer[0], reset=self.attempt > 0)
            if endpoint is None:
                break
            self.endpoint = endpoint
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(_split(endpoint))
            if err in (0, errno.EINPROGRESS):
                self.backend = sock
                if err == 0 or _connected_now(sock):
                    # A local veth peer often completes the handshake within connect(): skip an epoll round.
                    self._established()
                    return
                self.dialling += 1
                generation = self.dialling
                self.loop.set_interest(sock.fileno(), W, self._connected)
                self.loop.at(time.monotonic() + DIAL_TIMEOUTS[self.attempt], lambda: self._dial_timeout(generation))
                return
            sock.close()
            self.proxy.dial_failures += 1
            self.attempt += 1
        self.close()

    def _dial_failed(self) -> None:
        assert self.backend is not None
        self.loop.forget(self.backend.fileno())
        self.backend.close()
        self.backend = None
        self.proxy.dial_failures += 1
        self.attempt += 1
        self.dial()

    def _dial_timeout(self, generation: int) -> None:
        if not self.closed and self.ways is None and generation == self.dialling and self.backend is not None:
            self._dial_failed()

    def _connected(self, mask: int) -> None:
        assert self.backend is not None
        if self.backend.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._dial_failed()
            return
        if not _connected_now(self.backend):  # a stale event (the fd number was reused): still connecting
            return
        self._established()

    def _established(self) -> None:
        assert self.backend is not None
        self.dialling += 1  # the pending timer is now stale
        pipes = self.loop if self.proxy.copy == "splice" else None
        self.ways = (_Direction(self.client, self.backend, pipes), _Direction(self.backend, self.client, pipes))
        self.loop.set_interest(self.backend.fileno(), 0, lambda mask: self._event(1, mask))
        self.loop.handlers[self.client.fileno()] = lambda mask: self._event(0, mask)
        self.proxy.established += 1
        # The client has usually sent its request already: move it now instead of after another epoll round.
        self._pump(self.ways[0], False)
        self._update()

    # copying ---------------------------------------------------------------------

    def _event(self, side: int, mask: int) -> None:
        """Readiness of one socket (0: the client, 1: the backend): read from it into the
        way that starts there, write to it from the way that ends there."""
        assert self.ways is not None
        if mask & R:
            self._pump(self.ways[side], bool(mask & RDHUP))
        if mask & W and not self.closed:
            self._pump(self.ways[1 - side], True)
        self._update()

    def _pump(self, way: _Direction, drain: bool = True) -> None:
        """Move what src has to dst. drain False: a read shorter than asked for means src is empty
        for now (saves the read that would fail with EAGAIN; epoll is level triggered)."""
        if self.closed or way.done:
            return
        try:
            if way.pipe_r >= 0:
                self._splice(way, drain)
            else:
                self._copy(way, drain)
        except OSError:  # reset, broken pipe, ...: the connection is over
            self.close()

    def _splice(self, way: _Direction, drain: bool) -> None:
        src, dst = way.src.fileno(), way.dst.fileno()
        for _ in range(BURST):
            while way.queued:
                try:
                    way.queued -= os.splice(way.pipe_r, dst, way.queued, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    way.want_read, way.want_write = False, True
                    return
            try:
                n = os.splice(src, way.pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                way.want_read, way.want_write = True, False
                return
            if n == 0:
                self._eof(way)
                return
            way.queued = n
            if not drain and n < PIPE_SIZE:
                try:
                    way.queued -= os.splice(way.pipe_r, dst, n, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    pass
                if way.queued:
                    way.want_read, way.want_write = False, True
                    return
                break
        way.want_read, way.want_write = True, False

    def _copy(self, way: _Direction, drain: bool) -> None:
        view = self.loop.view
        for _ in range(BURST):
            if way.pending:
                try:
                    sent = way.dst.send(way.pending)
                except BlockingIOError:
                    way.want_read, way.want_write = False, True
                    return
                way.pending = way.pending[sent:]
                if way.pending:
                    way.want_read, way.want_write = False, True
                    return
            try:
                n = way.src.recv_into(self.loop.buffer)
            except BlockingIOError:
                way.want_read, way.want_write = True, False
                return
            if n == 0:
                self._eof(way)
                return
            try:
                sent = way.dst.send(view[:n])
            except BlockingIOError:
                sent = 0
            if sent < n:
                way.pending = bytes(view[sent:n])  # the shared buffer is reused: keep only the rest
                way.want_read, way.want_write = False, True
                return
            if not drain and n < COPY_BUFFER:
                break
        way.want_read, way.want_write = True, False

    def _eof(self, way: _Direction) -> None:
        way.done = True
        way.want_read = way.want_write = False
        try:
            way.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        assert self.ways is not None
        if all(w.done for w in self.ways):
            self.close()

    def _update(self) -> None:
        if self.closed or self.ways is None or self.backend is None:
            return
        up, down = self.ways
        self.loop.set_interest(self.client.fileno(), (R | RDHUP if up.want_read else 0) | (W if down.want_write else 0))
        self.loop.set_interest(self.backend.fileno(),
                               (R | RDHUP if down.want_read else 0) | (W if up.want_write else 0))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for sock in (self.client, self.backend):
            if sock is not None:
                self.loop.forget(sock.fileno())
                sock.close()
        for way in self.ways or ():
            way.close(self.loop)
        self.proxy.conns.discard(self)


class UdpAssociation:
    """One client address of a UDP service port, bound to one endpoint until idle."""

    def __init__(self, proxy: "ServiceProxy", client: tuple[str, int], endpoint: str) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.client = client
        self.endpoint = endpoint
        self.local = "0.0.0.0"  # where the client's datagrams arrive (after REDIRECT/DNAT): replies leave from it
        self.last = time.monotonic()
        self.closed = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(_split(endpoint))
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
        self.established = 0
        self.dial_failures = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM if self.udp else socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.setblocking(False)
        if self.udp:
            self.sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            loop.set_interest(self.sock.fileno(), R, self._datagrams)
        else:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.listen(LISTEN_BACKLOG)
            loop.set_interest(self.sock.fileno(), R, self._accept)
        self.port = self.sock.getsockname()[1]

    def update(self, svc: ServicePort, endpoints: list[Endpoint]) -> None:
        self.svc = svc
        self.balancer.set_affinity(svc.affinity_seconds)
        self.balancer.update(ready_addresses(endpoints))
        self.keep = kept_endpoints(endpoints)
        for conn in [c for c in self.conns if c.ways is not None and c.endpoint not in self.keep]:
            conn.close()
        for assoc in [a for a in self.assocs.values() if a.endpoint not in self.keep]:
            assoc.close()

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


class StatusServer:
    """Answers every connection on the abstract unix socket with the listener table (JSON) and closes."""

    def __init__(self, loop: ProxyLoop, table: Callable[[], list[dict[str, Any]]]) -> None:
        self.loop = loop
        self.table = table
        self.sock: socket.socket | None = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(STATUS_SOCKET)
        except OSError:  # another proxier of this namespace has it (a test's second proxier): no table
            self.sock.close()
            self.sock = None
            return
        self.sock.listen(16)
        self.sock.setblocking(False)
        loop.set_interest(self.sock.fileno(), R, self._accept)

    def _accept(self, mask: int) -> None:
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        with conn:
            conn.settimeout(1)
            try:
                conn.sendall(json.dumps(self.table()).encode())
            except OSError:
                pass

    def close(self) -> None:
        if self.sock is not None:
            self.loop.forget(self.sock.fileno())
            self.sock.close()
            self.sock = None


def query_status(timeout: float = 2.0) -> list[dict[str, Any]] | None:
    """The listener table of the proxier running in the calling thread's network namespace (None: none runs)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(STATUS_SOCKET)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except OSError:
        return None
    finally:
        sock.close()
    return list(json.loads(b"".join(chunks)))


# --- 4. the proxier -------------------------------------------------------------------



class UserspaceProxier:
    """The userspace mode on the node whose network namespace the calling thread is in (the agent's)."""

    mode = "userspace"

    def __init__(self, node: NodeInfo, *, copy: str = DEFAULT_COPY, udp_timeout: float = UDP_IDLE_TIMEOUT) -> None:
        self.node = node
        self.copy = copy
        if self.copy not in COPY_MODES:
            raise ValueError(f"copy must be one of {', '.join(COPY_MODES)}, not {self.copy!r}")
        if self.copy == "splice" and not hasattr(os, "splice"):
            self.copy = "copy"
        self.udp_timeout = udp_timeout
        self.loop: ProxyLoop | None = None
        self.proxies: dict[str, ServiceProxy] = {}
        self.status: StatusServer | None = None
        self.applied = ""  # the restore text the kernel got last
        self.last_restore = ""
        self._need_full = True

    def _ensure_loop(self) -> ProxyLoop:
        if self.loop is None or not self.loop.thread.is_alive():
            self.loop = ProxyLoop()
            self.status = self.loop.call(lambda: StatusServer(self.loop, self.table))  # type: ignore[arg-type]
        return self.loop

    # sync ----------------------------------------------------------------------------

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        loop = self._ensure_loop()
        changed = loop.call(lambda: self._sync_listeners(state))
        desired = render(state, self.node, {key: p.port for key, p in self.proxies.items()})
        full = self._need_full
        jumps: list[Jump] = []
        if full:
            jumps = self._missing_jumps()
        text = desired.restore_text(jumps)
        if full or text != self.applied:
            self.last_restore = text
            try:
                restore(text)
            except RestoreError:
                self._need_full = True
                raise
            self.applied = desired.restore_text()
            self._need_full = False
        return SyncResult(full=full, changed_services=changed, seconds=time.monotonic() - started)

    def _sync_listeners(self, state: ProxyState) -> int:
        changed = 0
        wanted = {svc.key: svc for svc in state.services}
        for key in [k for k in self.proxies if k not in wanted]:
            self.proxies.pop(key).close()
            changed += 1
        for key, svc in wanted.items():
            proxy = self.proxies.get(key)
            if proxy is None:
                proxy = self.proxies[key] = ServiceProxy(self.loop, svc, self.copy, self.udp_timeout)  # type: ignore
                changed += 1
            before = (proxy.svc, tuple(proxy.balancer.endpoints), frozenset(proxy.keep))
            proxy.update(svc, state.endpoints_of(svc))
            proxy.balancer.expire()
            if before != (proxy.svc, tuple(proxy.balancer.endpoints), frozenset(proxy.keep)):
                changed += 1
        return changed

    def _missing_jumps(self) -> list[Jump]:
        saved = read_tables()
        return [j for j in JUMPS if not has_jump(saved.get(j.table, {}).get(j.chain, []), j.target)]

    # cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Close every listener and connection, then remove our jumps and chains in one restore."""
        if self.loop is not None and self.loop.thread.is_alive():
            def close_all() -> None:
                for proxy in self.proxies.values():
                    proxy.close()
                if self.status is not None:
                    self.status.close()
            self.loop.call(close_all)
            self.loop.stop()
        self.proxies = {}
        self.loop = None
        self.status = None
        remove_chains(is_own_chain)
        self.applied = ""
        self._need_full = True

    def close(self) -> None:
        """Stop serving: every listener and connection closes with the loop (the rules stay)."""
        if self.loop is not None and self.loop.thread.is_alive():
            self.loop.stop()
        self.loop = None

    # looking ---------------------------------------------------------------------------

    def table(self) -> list[dict[str, Any]]:
        return [self.proxies[k].snapshot() for k in sorted(self.proxies)]

    def rules_excerpt(self, service: str | None = None) -> str:
        table = self.loop.call(self.table) if self.loop is not None else None
        return live_rules(service, table)


def _names(service_port_name: str, service: str) -> bool:
    return service_port_name == service or service_port_name.split(":")[0] == service


def format_table(table: list[dict[str, Any]], service: str | None = None) -> str:
    rows = [r for r in table if service is None or _names(r["service"], service)]
    head = ("SERVICE", "PROTO", "PORTAL", "PROXY PORT", "ENDPOINTS", "LIVE", "ACCEPTED", "DIAL FAILURES")
    lines = [head]
    for r in rows:
        portal = f"{r['clusterIP']}:{r['port']}" + (f" +nodePort {r['nodePort']}" if r["nodePort"] else "")
        eps = [f"{ep}({r['live'].get(ep, 0)})" for ep in r["endpoints"]]
        eps += [f"{ep}({r['live'].get(ep, 0)}, terminating)" for ep in r["terminating"]]
        live = sum(r["live"].values()) + r["dialling"]
        lines.append((r["service"], r["protocol"], portal, str(r["proxyPort"]), " ".join(eps) or "<none>",
                      str(live), str(r["accepted"]), str(r["dialFailures"])))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    return text + "\n(ENDPOINTS: ip:port(live connections or UDP associations); LIVE includes dials in progress)\n"


def live_rules(service: str | None, table: list[dict[str, Any]] | None = None) -> str:
    """Our portal rules from iptables-nft-save -c (with [packets:bytes]), and the listener table;
    call inside the node's namespace. table None: ask the agent's proxy over its status socket."""
    named = re.compile(re.escape(service) + r'(?=[:\s"/]|$)') if service is not None else None

    def keep_rule(table: str, chain: str, target: str, rule: str) -> bool:
        if named is None:
            return is_own_chain(table, chain) or is_own_chain(table, target)
        return is_own_chain(table, chain) and bool(named.search(rule))

    rules = excerpt(run([SAVE, "-c"]).stdout, is_own_chain, keep_rule)
    if table is None:
        table = query_status()
    listeners = format_table(table, service) if table is not None else "(no userspace proxy answers in this node)\n"
    return rules + "\n# listeners\n" + listeners


MODE = Mode(
    name="userspace",
    summary="kube-proxy's first mode: iptables portals REDIRECT to a proxy process that copies bytes",
    options=(Option("copy", "how the proxy moves bytes: splice(2) through a pipe, or recv/send "
                    "(docs/userspace.md)", DEFAULT_COPY, COPY_MODES),),
    make_proxier=lambda node, options: UserspaceProxier(node, copy=options["copy"]),
    render_text=lambda state, node, options: render_text(state, node),
    rules_excerpt=lambda state, node, service: live_rules(service),
)
