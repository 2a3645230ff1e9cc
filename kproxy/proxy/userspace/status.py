"""Looking at a running userspace proxy: its listener table, served to `kproxy rules`.

The table is served on an abstract unix socket, which (like everything abstract)
lives in the node's network namespace, so `kproxy rules`, running in that namespace,
can ask the agent's proxy without knowing its process.
"""

from __future__ import annotations

import json
import re
import socket
from typing import Any, Callable

from kproxy.proxy.saved import excerpt
from kproxy.proxy.tables import Backend, Commands
from kproxy.proxy.types import names_service_port
from kproxy.proxy.userspace.loop import ProxyLoop, R
from kproxy.proxy.userspace.rules import is_own_chain

STATUS_SOCKET = "\0kproxy-userspace"  # abstract: one per network namespace

Row = dict[str, Any]  # one listener, as ServiceProxy.snapshot() gives it (JSON on the socket)


class StatusServer:
    """Answers every connection on the abstract unix socket with the listener table (JSON) and closes."""

    def __init__(self, loop: ProxyLoop, table: Callable[[], list[Row]]) -> None:
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


def query_status(timeout: float = 2.0) -> list[Row] | None:
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


def format_table(table: list[Row], service: str | None = None) -> str:
    rows = [r for r in table if service is None or names_service_port(service, r["service"])]
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


def live_rules(service: str | None, table: list[Row] | None = None,
               backend: Backend | None = None) -> str:
    """Our portal rules from iptables-save -c (with [packets:bytes]), and the listener table;
    call inside the node's namespace. table None: ask the agent's proxy over its status socket."""
    named = re.compile(re.escape(service) + r'(?=[:\s"/]|$)') if service is not None else None

    def keep_rule(table: str, chain: str, target: str, rule: str) -> bool:
        if named is None:
            return is_own_chain(table, chain) or is_own_chain(table, target)
        return is_own_chain(table, chain) and bool(named.search(rule))

    rules = excerpt((backend or Commands("userspace")).save(counters=True), is_own_chain, keep_rule)
    if table is None:
        table = query_status()
    listeners = format_table(table, service) if table is not None else "(no userspace proxy answers in this node)\n"
    return rules + "\n# listeners\n" + listeners
