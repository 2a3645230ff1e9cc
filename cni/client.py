"""The exec'd plugin as a thin client of the machine's CNI server (cni/server.py).

A runtime execs a plugin per ADD/DEL. Importing pyroute2 alone costs more
than the reference plugin's whole ADD, so the exec'd process only forwards
its CNI_* environment and stdin over a unix socket and copies the answer
(stdout bytes and exit status) back. The server finds the network namespace
to act in from the connection itself (SO_PEERCRED pid -> /proc/<pid>/ns/net):
the namespace this process was exec'd in, as if it had done the work itself.

Which server: one per code identity (this checkout's cni/*.py names, mtimes
and sizes, and the interpreter's directory), at /run/kproxy/cni-<crc32>.sock, so
an upgraded or another checkout never talks to a server running other code;
the identity also travels in every request and a server with other code
refuses it. No server listening: the first exec starts one (detached, in its
own session, logging to <socket>.log; the flock on <socket>.lock, held by the
server for its whole life, makes concurrent first execs start only one),
waits until it listens and goes through it. If no server can be had (start
failed or timed out, refused, KPROXY_CNI_SOCKET=""), run() returns None and
the entry point runs the plugin in-process, exactly as without a server.

This module is on the hot path of every exec: it imports only the built-in
posix, sys and _socket. Not `os`: under `python -IS` (the launchers
scripts/setup writes) nothing else imports it, and its collections.abc
costs 1.5 ms of CPU; not `socket`, whose enum costs about a millisecond.
What starting a server needs is imported only then.

Wire format (all lengths 4-byte big-endian):
  request:  b"KPCNI2" len(head) head len(stdin) stdin
            head = b"\\0".join([plugin, identity, b"K=V" for every CNI_* variable])
  response: status(1 byte) len(stdout) stdout stderr...EOF
            status NOT_SERVED: the server runs other code and did nothing
"""

import posix
import sys

import _socket

TYPE_CHECKING = False  # not typing's: importing typing costs more than this whole client
if TYPE_CHECKING:
    from typing import NoReturn

RUN_DIR = "/run/kproxy"
SOCKET_ENV = "KPROXY_CNI_SOCKET"  # a socket path; empty: never use a server
IDLE_ENV = "KPROXY_CNI_IDLE_SECONDS"  # how long a server started here lives without calls
MAGIC = b"KPCNI2"
NOT_SERVED = 0xFF
PLUGINS = ("bridge", "host-local")
START_TIMEOUT = 20.0  # seconds to wait for a starting server before working in-process
PACKAGE_DIR = (__file__ if __file__.startswith("/") else f"{posix.getcwd()}/{__file__}").rpartition("/")[0]
ROOT = PACKAGE_DIR.rpartition("/")[0]  # the directory `cni` is imported from
_HELP = ("-h", "--help", "--version")


def code_identity() -> str:
    """What a server must be running to serve us: this cni/ package and interpreter."""
    parts = [PACKAGE_DIR, sys.executable.rpartition("/")[0]]  # the venv's bin/ (sys.prefix needs site)
    for name in sorted(posix.listdir(PACKAGE_DIR)):
        if name.endswith(".py"):
            st = posix.stat(f"{PACKAGE_DIR}/{name}")
            parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


def default_socket(identity: str) -> str:
    import zlib  # ~0.1 ms, only where no socket path is given

    return f"{RUN_DIR}/cni-{zlib.crc32(identity.encode()):08x}.sock"


def _env(name: str) -> str | None:
    value = posix.environ.get(name.encode())
    return None if value is None else value.decode("utf-8", "surrogateescape")


def socket_path(identity: str) -> str:
    """The socket to use ("" when the server is disabled)."""
    path = _env(SOCKET_ENV)
    return default_socket(identity) if path is None else path


def lock_path(sock: str) -> str:
    return sock + ".lock"


def log_path(sock: str) -> str:
    return sock + ".log"


def encode_request(plugin: str, identity: str, env: "dict[str, str]", stdin: bytes) -> bytes:
    fields = [plugin.encode(), identity.encode()]
    fields += [f"{key}={value}".encode("utf-8", "surrogateescape") for key, value in env.items()
               if key.startswith("CNI_")]
    head = b"\0".join(fields)
    return MAGIC + len(head).to_bytes(4, "big") + head + len(stdin).to_bytes(4, "big") + stdin


def encode_response(status: int, stdout: bytes, stderr: bytes = b"") -> bytes:
    return bytes([status & 0xFF]) + len(stdout).to_bytes(4, "big") + stdout + stderr


def _read_stdin() -> bytes:
    try:
        if posix.isatty(0):
            return b""
        chunks = []
        while chunk := posix.read(0, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:  # stdin closed
        return b""


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[posix.write(fd, data):]


_stdin_copy: bytes | None = None


def consumed_stdin() -> bytes | None:
    """The stdin bytes run() already read (None: stdin is untouched)."""
    return _stdin_copy


def exit_now(status: int) -> "NoReturn":
    """End a thin client's exec without the interpreter's teardown (~1.5 ms of
    its ~10): everything went out through posix.write, nothing is buffered."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    posix._exit(status)


def prepare_in_process() -> None:
    """Before a plugin process does the work itself (cni.bridge, pyroute2).

    The venv's site-packages, which the launchers' `python -IS` skipped to start
    faster (scripts/setup writes them). And pyroute2 without its package
    __init__, which imports the whole library (NDB, IPDB, conntrack, nftables,
    wireguard...) when cni needs pyroute2.iproute.linux and
    pyroute2.netlink.exceptions: half of pyroute2's import time. Only for
    processes that exist to run our plugins (an exec'd plugin, the server):
    after it, `from pyroute2 import NDB` would fail in the same process.
    """
    if sys.flags.no_site:
        import site

        site.main()
    if "pyroute2" not in sys.modules:
        import importlib.util

        spec = importlib.util.find_spec("pyroute2")
        if spec is not None:
            sys.modules["pyroute2"] = importlib.util.module_from_spec(spec)  # its __path__, not its __init__
            import pyroute2.config.log  # noqa: F401  (what __init__ does besides importing: a NullHandler)


def _lost(detail: str) -> int:
    """The server took the request but no complete answer came back."""
    import json  # error path only

    try:
        version = json.loads(_stdin_copy or b"{}").get("cniVersion") or "1.1.0"
    except (ValueError, AttributeError):
        version = "1.1.0"
    # 11 "try again later": the request may or may not have been carried out.
    out = {"cniVersion": version, "code": 11, "msg": "kproxy CNI server did not answer", "details": detail}
    _write(1, (json.dumps(out) + "\n").encode())
    return 1


def _connect(path: str) -> "_socket.socket | None":
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return sock
    except OSError:  # no socket, a stale one (its server is gone), or not allowed
        sock.close()
        return None


def _spawn_server(path: str, lock_fd: int) -> bool:
    """Start the server for path, handing it the lock we hold; True once it listens."""
    import os
    import select

    log = log_path(path)
    try:
        os.replace(log, log + ".1")  # keep the previous server's last words
    except FileNotFoundError:
        pass
    log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    ready_r, ready_w = os.pipe()
    os.set_inheritable(lock_fd, True)
    os.set_inheritable(ready_w, True)
    # -I: neither the caller's cwd nor PYTHON* variables choose which code runs; ROOT does.
    argv = [sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
            "from cni import client; client.prepare_in_process(); from cni.server import main; sys.exit(main())",
            ROOT, "--socket", path,
            "--lock-fd", str(lock_fd), "--ready-fd", str(ready_w), "--own-netns"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("CNI_")}
    try:
        os.posix_spawn(sys.executable, argv, env, setsid=True, file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log_fd, 1),
            (os.POSIX_SPAWN_DUP2, log_fd, 2),
        ])
    except OSError:
        return False
    finally:
        os.close(ready_w)
        os.close(log_fd)
    try:
        readable, _, _ = select.select([ready_r], [], [], START_TIMEOUT)
        return bool(readable) and os.read(ready_r, 16).startswith(b"ready")
    finally:
        os.close(ready_r)


def _start_or_wait(path: str) -> "_socket.socket | None":
    """Nobody listens on path: start the server, or wait for the one starting."""
    import fcntl
    import os
    import time

    deadline = time.monotonic() + START_TIMEOUT
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        lock = os.open(lock_path(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return None
    try:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a server holds it: listening soon, or stopping
                pass
            else:  # no server alive for path: ours will be
                # Never unlock here: the server shares this lock (one open file) and keeps it.
                return _connect(path) if _spawn_server(path, lock) else None
            sock = _connect(path)
            if sock is not None or time.monotonic() > deadline:
                return sock
            time.sleep(0.005)
    finally:
        os.close(lock)


def run(plugin: str) -> int | None:
    """Forward this exec to the server; its exit status, or None to run in-process."""
    global _stdin_copy
    if not _env("CNI_COMMAND") or any(a in _HELP for a in sys.argv[1:]):
        return None  # not a CNI call: the plugin answers itself
    identity = code_identity()
    path = socket_path(identity)
    if not path:
        return None  # no server wanted
    sock = _connect(path) or _start_or_wait(path)
    if sock is None:
        return None
    try:
        _stdin_copy = _read_stdin()
        try:
            env = {key.decode("utf-8", "surrogateescape"): value.decode("utf-8", "surrogateescape")
                   for key, value in posix.environ.items() if key.startswith(b"CNI_")}
            sock.sendall(encode_request(plugin, identity, env, _stdin_copy))
            sock.shutdown(_socket.SHUT_WR)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            return _lost(f"{path}: {exc}")
    finally:
        sock.close()
    reply = b"".join(chunks)
    if len(reply) < 5:
        return _lost(f"{path}: connection closed after {len(reply)} bytes")
    if reply[0] == NOT_SERVED:
        return None  # another checkout's server: it did nothing, we do it ourselves
    size = int.from_bytes(reply[1:5], "big")
    if len(reply) < 5 + size:
        return _lost(f"{path}: truncated answer")
    _write(1, reply[5 : 5 + size])
    if len(reply) > 5 + size:
        _write(2, reply[5 + size :])
    return reply[0]
