"""One TCP connection through the userspace proxy: dial an endpoint, then copy both ways.

The dial never blocks the loop: on failure the next endpoint is tried, with the old
proxier's timeouts (DIAL_TIMEOUTS: four tries, then the client is closed). The copy
is ``splice(2)`` socket -> pipe -> socket (the bytes never enter Python) or a plain
recv_into/send through the loop's one shared buffer; splice is the default, chosen by
measurement (docs/userspace.md).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import TYPE_CHECKING

from kproxy.proxy.userspace.balancer import split_address
from kproxy.proxy.userspace.loop import COPY_BUFFER, PIPE_SIZE, RDHUP, ProxyLoop, R, W

if TYPE_CHECKING:
    from kproxy.proxy.userspace.listener import ServiceProxy

DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)  # upstream's EndpointDialTimeouts: one dial per entry
BURST = 16  # chunks moved per readiness event before the loop serves others


class _Direction:
    """One way of a TCP connection: bytes from src to dst, through a pipe (splice) or a buffer (copy)."""

    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "queued", "pending", "want_read", "want_write", "done")

    def __init__(self, src: socket.socket, dst: socket.socket, loop: ProxyLoop | None) -> None:
        self.src, self.dst = src, dst
        self.pipe_r = self.pipe_w = -1
        if loop is not None:  # splice
            self.pipe_r, self.pipe_w = loop.pipe()
        self.queued = 0  # bytes waiting in the pipe (splice)
        self.pending: bytes | memoryview = b""  # bytes waiting for dst (copy)
        self.want_read = True
        self.want_write = False
        self.done = False

    def close(self, loop: ProxyLoop) -> None:
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

    def __init__(self, proxy: ServiceProxy, client: socket.socket, peer: tuple[str, int]) -> None:
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
            err = sock.connect_ex(split_address(endpoint))
            if err in (0, errno.EINPROGRESS):
                self.backend = sock
                if err == 0 or _connected_now(sock):
                    # A local veth peer often completes the handshake within connect(): skip an epoll round.
                    self._established()
                else:
                    self._await_handshake(sock)
                return
            sock.close()
            self.proxy.dial_failures += 1
            self.attempt += 1
        self.close()

    def _await_handshake(self, sock: socket.socket) -> None:
        """Wait for the dial to complete (writable) or for this try's timeout."""
        self.dialling += 1
        generation = self.dialling
        self.loop.set_interest(sock.fileno(), W, self._connected)
        self.loop.at(time.monotonic() + DIAL_TIMEOUTS[self.attempt], lambda: self._dial_timeout(generation))

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


