"""Ask a pod workload who answered, from inside any namespace.

The client socket is created inside the namespace at netns_path (the calling
thread enters it and comes straight back; the socket stays there), so one
process can probe from every pod, node or client namespace of a lab.

    probe_tcp("/var/run/netns/lab-client", "10.96.0.10", 80)
        -> "pod=web-1 client=10.244.1.5:40312"
    parse_answer(_) -> {"pod": "web-1", "client": "10.244.1.5:40312"}

Both raise OSError subclasses (ConnectionRefusedError, TimeoutError, ...) when
nothing answers, and ProbeError when something answers that is not a workload.
"""

from __future__ import annotations

import socket
import time

from cni.netns import entered


class ProbeError(OSError):
    """The peer answered, but not like a kproxy workload."""


def _socket(netns_path: str | None, kind: int) -> socket.socket:
    with entered(netns_path):
        return socket.socket(socket.AF_INET, kind)


def probe_tcp(netns_path: str | None, ip: str, port: int = 8080, timeout: float = 2.0) -> str:
    """GET / from inside netns_path; the answer's body line ("pod=... client=...")."""
    return _line(http_get(netns_path, ip, port, "/", timeout), f"tcp {ip}:{port}")


def http_get(netns_path: str | None, ip: str, port: int, path: str = "/", timeout: float = 2.0) -> bytes:
    """GET path from inside netns_path (a kubelet's httpGet probe); the body of a 200 answer."""
    deadline = time.monotonic() + timeout
    with _socket(netns_path, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {ip}:{port}\r\nUser-Agent: kproxy-probe\r\n\r\n".encode())
        chunks = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"tcp {ip}:{port}: no complete answer within {timeout}s")
            sock.settimeout(remaining)
            data = sock.recv(4096)
            if not data:
                break
            chunks.append(data)
    raw = b"".join(chunks)
    head, sep, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status) < 2 or not status[0].startswith(b"HTTP/") or status[1] != b"200":
        raise ProbeError(f"tcp {ip}:{port}: not an HTTP 200 answer: {raw[:80]!r}")
    return body


def probe_udp(netns_path: str | None, ip: str, port: int = 8080, timeout: float = 2.0, tries: int = 3) -> str:
    """One datagram from inside netns_path (resent up to tries times); the answer line."""
    with _socket(netns_path, socket.SOCK_DGRAM) as sock:
        sock.connect((ip, port))  # only the answer from ip:port is accepted
        per_try = timeout / max(tries, 1)
        for _ in range(max(tries, 1)):
            sock.send(b"kproxy-probe\n")
            sock.settimeout(per_try)
            try:
                data = sock.recv(2048)
            except TimeoutError:
                continue
            return _line(data, f"udp {ip}:{port}")
    raise TimeoutError(f"udp {ip}:{port}: no answer within {timeout}s")


def _line(body: bytes, where: str) -> str:
    text = body.decode("utf-8", "replace").strip()
    if not text.startswith("pod=") or "\n" in text:
        raise ProbeError(f"{where}: unexpected answer {text[:80]!r}")
    return text


def parse_answer(line: str) -> dict[str, str]:
    """'pod=web-1 client=10.0.0.1:5000' -> {'pod': 'web-1', 'client': '10.0.0.1:5000'}."""
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    if "pod" not in fields or "client" not in fields:
        raise ValueError(f"not a workload answer: {line!r}")
    return fields
