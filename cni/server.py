"""The machine's CNI server: runs plugin calls for thin exec'd clients (cni/client.py).

    python -m cni.server [--socket PATH] [--idle SECONDS] [--quiet]

Nobody needs to start it: the first exec'd kproxy-bridge or kproxy-host-local
that finds no server starts one (cni/client.py), detached, at the socket of
its code identity (/run/kproxy/cni-<crc32>.sock, or $KPROXY_CNI_SOCKET), and
it exits by itself after --idle seconds without a call (default 600, or
$KPROXY_CNI_IDLE_SECONDS; 0: never). Started by hand it does the same in the
foreground, logging each call, and refuses to start where a server already
runs. Like Cilium's agent behind cilium-cni or Multus' thick-plugin daemon:
the costly part of a plugin call (interpreter with pyroute2 and our modules
imported) stays loaded here, and the exec'd plugin only forwards its CNI_*
environment and stdin. The answer is the exact stdout and exit status the
plugin would have produced itself.

Which node: the server does not trust the request for it. The kernel tells
it who connected (SO_PEERCRED: the client's pid, checked to be root or our
own uid), and /proc/<pid>/ns/net is the network namespace the runtime exec'd
the plugin in. That fd is opened as soon as the connection is accepted (the
client is blocked waiting for its answer, so the pid cannot be reused) and
held until the answer is sent; the plugin runs with Bridge(host_ns=<that
namespace>) on a thread that has entered it, so delegated IPAM execs run
there too. A server a plugin started lives in an empty network namespace of
its own, not in the node namespace of that first exec (holding that would
keep a deleted node's namespace alive), and only acts on the namespaces its
callers are in and name (CNI_NETNS).

Calls run on a pool of threads, kept warm (each keeps its asyncio loop for
pyroute2: a fresh thread pays ~0.3 ms more per call); host-local serialises
on its flock like the exec'd plugins do. The flock on <socket>.lock is held for the server's whole
life (the file says its pid), so there is one server per socket. Idle exit,
SIGTERM or SIGINT: remove the socket first (new execs start a new server),
answer what was already queued, then exit.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from cni import client, skel
from cni.bridge import Bridge
from cni.errors import DECODE_FAILURE, IO_FAILURE, CNIError
from cni.ipam import HostLocal
from cni.netns import entered, iproute_in, unshare_net

REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request
WORKERS = 64  # calls at once; more wait their turn (the kernel's rtnl lock serialises most of the work anyway)
DEFAULT_IDLE = 600.0
_PEERCRED = struct.Struct("3i")

Log = Callable[[str], None]


class ProtocolError(Exception):
    pass


class NoRequest(ProtocolError):
    """The peer connected and closed without a byte: a liveness probe."""


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError(f"request truncated ({size - left} of {size} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_request(conn: socket.socket) -> tuple[str, str, dict[str, str], bytes]:
    """(plugin, the client's code identity, CNI_* environment, stdin)."""
    first = conn.recv(len(client.MAGIC))
    if not first:
        raise NoRequest()
    if first + _recv_exact(conn, len(client.MAGIC) - len(first)) != client.MAGIC:
        raise ProtocolError("not a kproxy CNI request (or one from another version of the client)")
    head = _recv_exact(conn, int.from_bytes(_recv_exact(conn, 4), "big"))
    stdin = _recv_exact(conn, int.from_bytes(_recv_exact(conn, 4), "big"))
    plugin, identity, *pairs = head.decode().split("\0")
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("CNI_"):
            raise ProtocolError(f"bad environment entry {pair!r}")
        env[key] = value
    if plugin not in client.PLUGINS:
        raise ProtocolError(f"unknown plugin {plugin!r}")
    return plugin, identity, env, stdin


def peer(conn: socket.socket) -> tuple[int, int]:
    pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def run_plugin(plugin: str, env: dict[str, str], stdin: bytes, host_ns: str) -> tuple[bytes, int]:
    """One plugin call on this thread, inside host_ns; (stdout, exit status)."""
    impl: skel.Plugin = Bridge(host_ns=host_ns) if plugin == "bridge" else HostLocal()  # type: ignore[assignment]
    with entered(host_ns):
        out, status = skel.dispatch(impl, env, stdin)
    return skel.render(out).encode(), status


def _error(code: int, msg: str, details: str = "") -> bytes:
    return client.encode_response(1, skel.render(CNIError(code, msg, details).to_dict(skel.LATEST_VERSION)).encode())


def handle(conn: socket.socket, identity: str, log: Log) -> None:
    start = time.perf_counter()
    ns_fd = -1
    what = "?"
    try:
        pid, uid = peer(conn)
        if uid not in (0, os.geteuid()):
            conn.sendall(_error(IO_FAILURE, f"kproxy CNI server: uid {uid} may not call plugins"))
            return
        try:
            ns_fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            conn.sendall(_error(IO_FAILURE, "kproxy CNI server: cannot open the caller's network namespace", str(exc)))
            return
        conn.settimeout(REQUEST_TIMEOUT)
        try:
            plugin, theirs, env, stdin = read_request(conn)
        except NoRequest:
            return
        except (ProtocolError, UnicodeDecodeError, OSError, ValueError) as exc:
            conn.sendall(_error(DECODE_FAILURE, "kproxy CNI server: bad request", str(exc)))
            return
        conn.settimeout(None)
        what = f"{plugin} {env.get('CNI_COMMAND', '-')} {env.get('CNI_CONTAINERID', '-')} pid={pid}"
        if theirs != identity:
            conn.sendall(client.encode_response(client.NOT_SERVED, b""))
            log(f"{what}: not served, the client runs other code")
            return
        # A path any process of ours (nsenter for ipMasq too) can open while ns_fd is held.
        host_ns = f"/proc/{os.getpid()}/fd/{ns_fd}"
        out, status = run_plugin(plugin, env, stdin, host_ns)
        conn.sendall(client.encode_response(status, out))
        log(f"{what} -> {status} in {(time.perf_counter() - start) * 1000:.1f} ms")
    except OSError as exc:  # the client went away; nothing to answer
        log(f"{what}: {exc}")
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
        conn.close()


def take_lock(path: str) -> int:
    """The one-server-per-socket lock; SystemExit when a live server holds it."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    fd = os.open(client.lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SystemExit(f"cni.server: a server already serves {path} (pid {holder})") from None
    return fd


def running(path: str) -> int | None:
    """The pid of the server serving path, or None when none runs."""
    try:
        fd = os.open(client.lock_path(path), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a server lives, and the file says which
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None
    finally:
        os.close(fd)


def stop(path: str, timeout: float = REQUEST_TIMEOUT + 5) -> int | None:
    """SIGTERM the server serving path and wait for it to be gone; its pid, or None if none ran."""
    pid = running(path)
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except FileNotFoundError:
        return None
    if b"cni.server" not in b" ".join(argv):
        raise RuntimeError(f"pid {pid} in {client.lock_path(path)} is not a cni.server: {argv!r}")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(path) == pid:
        if time.monotonic() > deadline:
            raise RuntimeError(f"cni.server pid {pid} did not stop within {timeout:g} s")
        time.sleep(0.01)
    return pid


def bind(path: str) -> socket.socket:
    """Listen on path. We hold its lock, so whatever is there is a dead server's."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)  # root (or our uid) only: a caller can wire any namespace it is in
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(128)
    return sock


def warm_up() -> None:
    """Pay pyroute2's lazy imports and first socket before the first request."""
    iproute_in(None).close()


class Calls:
    """Calls in flight and when the last one ended, for the idle exit."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.active = 0
        self.served = 0
        self.last = time.monotonic()

    def begin(self) -> None:
        with self.cond:
            self.active += 1

    def end(self) -> None:
        with self.cond:
            self.active -= 1
            self.served += 1
            self.last = time.monotonic()
            self.cond.notify_all()

    def idle_for(self) -> float:
        """Seconds since the last call ended (0 while one runs)."""
        with self.cond:
            return 0.0 if self.active else time.monotonic() - self.last

    def wait_done(self, timeout: float) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.active == 0, timeout)


def serve(path: str, idle: float, log: Log, lock_fd: int | None = None, ready_fd: int | None = None) -> None:
    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    lock_fd = take_lock(path) if lock_fd is None else lock_fd
    os.ftruncate(lock_fd, 0)
    os.pwrite(lock_fd, f"{os.getpid()}\n".encode(), 0)
    identity = client.code_identity()
    warm_up()
    listener = bind(path)
    ino = os.stat(path).st_ino
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    calls = Calls()
    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="cni-call")

    def run(conn: socket.socket) -> None:
        try:
            handle(conn, identity, log)
        finally:
            calls.end()

    def start(conn: socket.socket) -> None:
        calls.begin()
        pool.submit(run, conn)

    log(f"listening on {path} (pid {os.getpid()}, idle exit after {idle:g} s)")
    if ready_fd is not None:
        os.write(ready_fd, b"ready\n")
        os.close(ready_fd)
    try:
        while True:
            left = idle - calls.idle_for()
            if idle and left <= 0:
                log(f"idle for {idle:g} s")
                break
            listener.settimeout(left if idle else None)
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            start(conn)
    finally:
        try:
            if os.stat(path).st_ino == ino:  # still ours: no new caller can reach us now
                os.unlink(path)
        except FileNotFoundError:
            pass
        listener.setblocking(False)
        while True:  # callers that connected before the unlink still get their answer
            try:
                conn, _ = listener.accept()
            except OSError:
                break
            conn.setblocking(True)
            start(conn)
        calls.wait_done(REQUEST_TIMEOUT)
        pool.shutdown(wait=False)
        listener.close()
        os.ftruncate(lock_fd, 0)  # the lock goes with our exit; the file says nobody runs
        log(f"stopped after {calls.served} calls")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cni.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", help=f"unix socket to listen on (default ${client.SOCKET_ENV}, or the one the"
                        f" plugins of this code use: {client.RUN_DIR}/cni-<crc32 of the code identity>.sock)")
    parser.add_argument("--idle", type=float, default=None, metavar="SECONDS",
                        help=f"exit after this long without a call (default ${client.IDLE_ENV} or"
                        f" {DEFAULT_IDLE:g}; 0: never)")
    parser.add_argument("--quiet", action="store_true", help="log nothing (no line per call)")
    parser.add_argument("--stop", action="store_true", help="stop the server running on the socket, and exit")
    # Set by the exec'd plugin that starts a server (cni/client.py), not by people.
    parser.add_argument("--lock-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--own-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    def log(msg: str) -> None:
        print(f"cni.server: {msg}", file=sys.stderr, flush=True)

    path = args.socket or client.socket_path(client.code_identity())
    if not path:
        parser.error(f"{client.SOCKET_ENV} is empty (the server is disabled); give --socket PATH")
    if args.stop:
        try:
            pid = stop(path)
        except (OSError, RuntimeError) as exc:
            print(f"cni.server: {exc}", file=sys.stderr)
            return 1
        print(f"cni.server: stopped pid {pid}" if pid else f"cni.server: no server runs on {path}")
        return 0
    try:
        idle = args.idle if args.idle is not None else float(os.environ.get(client.IDLE_ENV) or DEFAULT_IDLE)
    except ValueError:
        parser.error(f"{client.IDLE_ENV} must be a number of seconds")
    if idle < 0:
        parser.error("--idle must be >= 0")
    keep = sorted(fd for fd in (args.lock_fd, args.ready_fd) if fd is not None)
    if keep:  # started by a plugin: drop whatever else its runtime let it inherit
        for low, high in zip([2] + keep, keep + [1 << 20]):
            os.closerange(low + 1, high)
    if args.own_netns:  # before any thread exists: they all start where the main thread is
        try:
            unshare_net()
        except OSError as exc:
            log(f"staying in the network namespace we were started in: {exc}")
    try:
        serve(path, idle, log if not args.quiet else (lambda msg: None), args.lock_fd, args.ready_fd)
    except OSError as exc:  # e.g. a --socket in a directory we may not write, or a directory itself
        print(f"cni.server: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
