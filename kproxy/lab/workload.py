"""The pod workload: one process, one event loop, sockets in many pods.

Each pod answers on its ports with its name and the client address it saw:

    TCP  an HTTP/1.0 200 response, body  "pod=<name> client=<ip>:<port>\\n"
    UDP  one datagram                    "pod=<name> client=<ip>:<port>\\n"

A socket stays in the namespace it was created in, so this process enters each
pod's namespace on its (only) thread just long enough to create the listening
sockets, comes back, and serves every pod from one selector loop. Hundreds of
pods cost one interpreter.

    python -m kproxy.lab.workload --spec pods.json [--pidfile workload.pid]

The spec (JSON, written by the kubelet) is kproxy.lab.workloadspec's.

Signals: SIGHUP re-reads the spec (opens sockets for new pods and ports, closes
those of removed pods, leaves the others alone; an unreadable spec keeps the
current sockets); SIGTERM / SIGINT close everything and exit 0. A pod whose
namespace does not exist is reported on stderr and skipped; a SIGHUP retries it.
The pidfile is written (atomically) once the initial sockets are open.
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from cni.netns import NamespaceMissing, entered, ns_identity
from kproxy.fdlimit import raise_fd_limit
from kproxy.lab.workloadspec import SpecError, WorkloadPod, load_spec
BACKLOG = 1024
READ_WAIT = 1.0  # answer whatever arrived after this long without a full request
WRITE_WAIT = 5.0  # give up on a client that does not read its answer
LINGER_WAIT = 2.0  # after answering, drain the client's leftovers before closing
MAX_REQUEST = 16 * 1024
TICK = 0.25

PROG = "kproxy-workload"


def log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def answer_line(pod: str, addr: tuple[Any, ...]) -> str:
    return f"pod={pod} client={addr[0]}:{addr[1]}\n"


def http_response(body: str, head_only: bool = False) -> bytes:
    data = body.encode()
    header = (
        "HTTP/1.0 200 OK\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(data)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()
    return header if head_only else header + data


# --------------------------------------------------------------------------- sockets

# (namespace st_dev, st_ino, "tcp"/"udp", port): the identity of a listening socket.
# Keyed on the namespace's inode, not its path, so a namespace that was deleted and
# recreated under the same name gets fresh sockets on the next SIGHUP.
Key = tuple[int, int, str, int]


@dataclass
class Listener:
    key: Key
    pod: str
    netns: str
    proto: str
    port: int
    sock: socket.socket
    paused_until: float = 0.0


@dataclass
class Conn:
    sock: socket.socket
    pod: str
    peer: tuple[Any, ...]
    deadline: float
    state: str = "read"  # read -> write -> linger
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""


def open_listener(netns: str, proto: str, port: int) -> socket.socket:
    """A non-blocking socket bound to 0.0.0.0:port inside the namespace at netns."""
    with entered(netns):
        if proto == "tcp":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", port))
        if proto == "tcp":
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def request_complete(buf: bytes) -> bool:
    """True when buf holds a whole HTTP header block, or one line of something else."""
    if b"\r\n\r\n" in buf or b"\n\n" in buf:
        return True
    newline = buf.find(b"\n")
    if newline < 0:
        return False
    first = buf[:newline].rstrip(b"\r")
    # An HTTP request line ends with the version; anything else is a plain line.
    return not first.rsplit(b" ", 1)[-1].startswith(b"HTTP/")


class Workload:
    def __init__(self, spec_path: str) -> None:
        self.spec_path = spec_path
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[Key, Listener] = {}
        self.conns: dict[int, Conn] = {}
        self.running = True
        self.reload_wanted = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))

    # ---- signals

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGHUP, self._on_hup)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)

    def _on_hup(self, signum: int, frame: Any) -> None:
        self.reload_wanted = True

    def _on_stop(self, signum: int, frame: Any) -> None:
        self.running = False

    # ---- desired state

    def apply(self, pods: list[WorkloadPod]) -> None:
        """Make the open sockets match pods: close what went away, open what is new."""
        desired: dict[Key, tuple[WorkloadPod, str, int]] = {}
        for pod in pods:
            try:
                dev, ino = ns_identity(pod.netns)
            except NamespaceMissing:
                log(f"pod {pod.name}: network namespace {pod.netns} does not exist, skipped")
                continue
            for proto, ports in (("tcp", pod.tcp), ("udp", pod.udp)):
                for port in ports:
                    key = (dev, ino, proto, port)
                    if key in desired:
                        other = desired[key][0].name
                        log(f"pod {pod.name}: {proto}/{port} in {pod.netns} already belongs to pod {other}, skipped")
                        continue
                    desired[key] = (pod, proto, port)

        for key in [k for k in self.listeners if k not in desired]:
            self._close_listener(self.listeners.pop(key))

        skipped: set[str] = set()
        for key, (pod, proto, port) in desired.items():
            listener = self.listeners.get(key)
            if listener is not None:
                listener.pod = pod.name  # a rename answers with the new name, same socket
                listener.netns = pod.netns
                continue
            if pod.name in skipped:
                continue
            try:
                sock = open_listener(pod.netns, proto, port)
            except NamespaceMissing as exc:
                log(f"pod {pod.name}: {exc.strerror}, skipped")
                skipped.add(pod.name)
                continue
            except OSError as exc:
                log(f"pod {pod.name}: cannot open {proto}/{port} in {pod.netns}: {exc.strerror or exc}, skipped")
                continue
            listener = Listener(key, pod.name, pod.netns, proto, port, sock)
            self.listeners[key] = listener
            self.sel.register(sock, selectors.EVENT_READ, ("listen", listener))

        npods = len({lst.pod for lst in self.listeners.values()})
        log(f"serving {len(self.listeners)} sockets for {npods} pods")

    def reload(self) -> None:
        try:
            pods = load_spec(self.spec_path)
        except SpecError as exc:
            log(f"reload: {exc}; keeping the current sockets")
            return
        self.apply(pods)

    def _close_listener(self, listener: Listener) -> None:
        if listener.paused_until == 0.0:
            self.sel.unregister(listener.sock)
        listener.sock.close()

    # ---- the loop

    def run(self) -> None:
        while self.running:
            if self.reload_wanted:
                self.reload_wanted = False
                self.reload()
                continue
            timeout = TICK if self.conns or self._any_paused() else None
            for key, mask in self.sel.select(timeout):
                kind, obj = key.data
                if kind == "listen":
                    if obj.proto == "tcp":
                        self._accept(obj)
                    else:
                        self._datagrams(obj)
                elif kind == "conn":
                    self._conn_event(obj, mask)
                else:
                    self._drain_wakeup()
            self._expire()

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        for listener in self.listeners.values():
            self._close_listener(listener)
        self.listeners.clear()
        signal.set_wakeup_fd(-1)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def _drain_wakeup(self) -> None:
        try:
            while self._wake_r.recv(512):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _any_paused(self) -> bool:
        return any(lst.paused_until for lst in self.listeners.values())

    # ---- TCP

    def _accept(self, listener: Listener) -> None:
        for _ in range(128):
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: stop accepting here for a moment instead of
                    # spinning on a listener that stays readable.
                    log(f"pod {listener.pod}: accept: {exc.strerror}; pausing tcp/{listener.port}")
                    self.sel.unregister(listener.sock)
                    listener.paused_until = time.monotonic() + 0.5
                    return
                continue  # ECONNABORTED and friends: that client is gone
            sock.setblocking(False)
            conn = Conn(sock, listener.pod, peer, time.monotonic() + READ_WAIT)
            self.conns[sock.fileno()] = conn
            self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _conn_event(self, conn: Conn, mask: int) -> None:
        if conn.state == "write":
            self._write(conn)
            return
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if conn.state == "linger":
            if not data:
                self._drop(conn)
            return
        conn.inbuf += data
        if not data or len(conn.inbuf) >= MAX_REQUEST or request_complete(bytes(conn.inbuf)):
            self._respond(conn)

    def _respond(self, conn: Conn) -> None:
        head_only = bytes(conn.inbuf[:5]) == b"HEAD "
        conn.outbuf = http_response(answer_line(conn.pod, conn.peer), head_only)
        conn.inbuf = bytearray()
        conn.state = "write"
        conn.deadline = time.monotonic() + WRITE_WAIT
        self.sel.modify(conn.sock, selectors.EVENT_WRITE, ("conn", conn))
        self._write(conn)

    def _write(self, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if conn.outbuf:
            return
        # Half-close and read what the client still sends until it closes: closing
        # with unread data would reset the connection and could eat the answer.
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._drop(conn)
            return
        conn.state = "linger"
        conn.deadline = time.monotonic() + LINGER_WAIT
        self.sel.modify(conn.sock, selectors.EVENT_READ, ("conn", conn))

    def _drop(self, conn: Conn) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.state == "read":
                self._respond(conn)  # answer whatever arrived
            else:
                self._drop(conn)
        for listener in self.listeners.values():
            if listener.paused_until and listener.paused_until <= now:
                listener.paused_until = 0.0
                self.sel.register(listener.sock, selectors.EVENT_READ, ("listen", listener))

    # ---- UDP

    def _datagrams(self, listener: Listener) -> None:
        for _ in range(128):
            try:
                _, peer = listener.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. ECONNREFUSED from an earlier reply's ICMP
            try:
                listener.sock.sendto(answer_line(listener.pod, peer).encode(), peer)
            except OSError:
                pass


# --------------------------------------------------------------------------- main


def write_pidfile(path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_pidfile(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.lab.workload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON file {\"pods\": [{name, netns, tcp, udp}, ...]}")
    parser.add_argument("--pidfile", help="write our PID here (atomically) once the sockets are open")
    args = parser.parse_args(argv)

    try:
        pods = load_spec(args.spec)
    except SpecError as exc:
        log(str(exc))
        return 2

    raise_fd_limit()
    workload = Workload(args.spec)
    workload.install_signals()
    try:
        workload.apply(pods)
        if args.pidfile:
            write_pidfile(args.pidfile)
        workload.run()
    finally:
        workload.close()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
