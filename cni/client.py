"""The exec'd plugin as a thin client of the warm CNI server (cni/server.py).

A runtime execs a plugin per ADD/DEL. Importing pyroute2 alone costs more
than the reference plugin's whole ADD, so when a server is listening the
exec'd process only forwards its CNI_* environment and stdin over a unix
socket and copies the answer (stdout bytes and exit status) back. The server
finds the network namespace to act in from the connection itself
(SO_PEERCRED pid -> /proc/<pid>/ns/net): the namespace this process was
exec'd in, as if it had done the work itself.

This module is on the hot path of every exec: it imports only os, sys and
_socket (not even `socket`, whose enum import costs about a millisecond).
No server (socket missing or nobody listening): run() returns None and the
entry point runs the plugin in-process, exactly as without a server.

Wire format (all lengths 4-byte big-endian):
  request:  b"KPCNI1" len(head) head len(stdin) stdin
            head = b"\\0".join([plugin, b"K=V" for every CNI_* variable])
  response: status(1 byte) len(stdout) stdout stderr...EOF
"""

import os
import sys

import _socket

DEFAULT_SOCKET = "/run/kproxy/cni.sock"
SOCKET_ENV = "KPROXY_CNI_SOCKET"  # empty: never use a server
MAGIC = b"KPCNI1"
PLUGINS = ("bridge", "host-local")
_HELP = ("-h", "--help", "--version")


def socket_path() -> str:
    return os.environ.get(SOCKET_ENV, DEFAULT_SOCKET)


def encode_request(plugin: str, env: "os._Environ[str] | dict[str, str]", stdin: bytes) -> bytes:
    fields = [plugin.encode()]
    fields += [f"{key}={value}".encode() for key, value in env.items() if key.startswith("CNI_")]
    head = b"\0".join(fields)
    return MAGIC + len(head).to_bytes(4, "big") + head + len(stdin).to_bytes(4, "big") + stdin


def encode_response(status: int, stdout: bytes, stderr: bytes = b"") -> bytes:
    return bytes([status & 0xFF]) + len(stdout).to_bytes(4, "big") + stdout + stderr


def _read_stdin() -> bytes:
    try:
        if os.isatty(0):
            return b""
        chunks = []
        while chunk := os.read(0, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:  # stdin closed
        return b""


def _write(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


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


_stdin_copy = b""


def run(plugin: str) -> int | None:
    """Forward this exec to the server; its exit status, or None if there is no server."""
    global _stdin_copy
    path = socket_path()
    if not path or not os.environ.get("CNI_COMMAND") or any(a in _HELP for a in sys.argv[1:]):
        return None  # no server wanted, or not a CNI call: the plugin answers itself
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError:  # no socket, a stale one, or not allowed: no server
            return None
        _stdin_copy = _read_stdin()
        try:
            sock.sendall(encode_request(plugin, os.environ, _stdin_copy))
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
    size = int.from_bytes(reply[1:5], "big")
    if len(reply) < 5 + size:
        return _lost(f"{path}: truncated answer")
    _write(1, reply[5 : 5 + size])
    if len(reply) > 5 + size:
        _write(2, reply[5 + size :])
    return reply[0]
