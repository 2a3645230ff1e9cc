"""The warm CNI server: runs plugin calls for thin exec'd clients (cni/client.py).

    python -m cni.server [--socket PATH]     (default /run/kproxy/cni.sock,
                                              or $KPROXY_CNI_SOCKET)

Like Cilium's agent behind cilium-cni or Multus' thick-plugin daemon: the
costly part of a plugin call (interpreter with pyroute2 and our modules
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
there too. The server itself stays in its own namespace and only acts on the
ones its callers are in and name (CNI_NETNS).

One thread per connection; host-local serialises on its flock like the
exec'd plugins do. SIGTERM or SIGINT: stop listening, remove the socket.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any

from cni import skel
from cni.bridge import Bridge
from cni.client import DEFAULT_SOCKET, MAGIC, PLUGINS, SOCKET_ENV, encode_response
from cni.errors import DECODE_FAILURE, IO_FAILURE, CNIError
from cni.ipam import HostLocal
from cni.netns import entered, iproute_in

REQUEST_TIMEOUT = 30.0  # seconds a client may take to send its request
_PEERCRED = struct.Struct("3i")


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


def read_request(conn: socket.socket) -> tuple[str, dict[str, str], bytes]:
    first = conn.recv(len(MAGIC))
    if not first:
        raise NoRequest()
    if first + _recv_exact(conn, len(MAGIC) - len(first)) != MAGIC:
        raise ProtocolError("not a kproxy CNI request")
    head = _recv_exact(conn, int.from_bytes(_recv_exact(conn, 4), "big"))
    stdin = _recv_exact(conn, int.from_bytes(_recv_exact(conn, 4), "big"))
    plugin, *pairs = head.decode().split("\0")
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.startswith("CNI_"):
            raise ProtocolError(f"bad environment entry {pair!r}")
        env[key] = value
    if plugin not in PLUGINS:
        raise ProtocolError(f"unknown plugin {plugin!r}")
    return plugin, env, stdin


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
    return encode_response(1, skel.render(CNIError(code, msg, details).to_dict(skel.LATEST_VERSION)).encode())


def handle(conn: socket.socket, log: Any) -> None:
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
            plugin, env, stdin = read_request(conn)
        except NoRequest:
            return
        except (ProtocolError, UnicodeDecodeError, OSError) as exc:
            conn.sendall(_error(DECODE_FAILURE, "kproxy CNI server: bad request", str(exc)))
            return
        conn.settimeout(None)
        what = f"{plugin} {env.get('CNI_COMMAND', '-')} {env.get('CNI_CONTAINERID', '-')} pid={pid}"
        # A path any process of ours (nsenter for ipMasq too) can open while ns_fd is held.
        host_ns = f"/proc/{os.getpid()}/fd/{ns_fd}"
        out, status = run_plugin(plugin, env, stdin, host_ns)
        conn.sendall(encode_response(status, out))
        log(f"{what} -> {status} in {(time.perf_counter() - start) * 1000:.1f} ms")
    except OSError as exc:  # the client went away; nothing to answer
        log(f"{what}: {exc}")
    finally:
        if ns_fd >= 0:
            os.close(ns_fd)
        conn.close()


def bind(path: str) -> socket.socket:
    """Listen on path, replacing a stale socket but never a live server's."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    os.unlink(path)  # stale: its server is gone
                else:
                    raise SystemExit(f"cni.server: another server is listening on {path}")
        else:
            raise SystemExit(f"cni.server: {path} exists and is not a socket")
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


def serve(path: str, quiet: bool = False) -> None:
    def log(msg: str) -> None:
        if not quiet:
            print(f"cni.server: {msg}", file=sys.stderr, flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    warm_up()
    listener = bind(path)
    ino = os.stat(path).st_ino
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log(f"listening on {path} (pid {os.getpid()})")
    try:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=handle, args=(conn, log), daemon=True).start()
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == ino:  # still ours
                os.unlink(path)
        except FileNotFoundError:
            pass
        log("stopped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cni.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", default=os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET,
                        help=f"unix socket to listen on (default ${SOCKET_ENV} or {DEFAULT_SOCKET})")
    parser.add_argument("--quiet", action="store_true", help="no log line per request")
    args = parser.parse_args(argv)
    serve(args.socket, quiet=args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
