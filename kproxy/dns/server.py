"""The cluster DNS server of one DNS pod: UDP and TCP on port 53, metrics on 9153, the zone from the lab's store.

    python -m kproxy.dns.server --lab-dir /run/kproxy/LAB --pidfile F   (in the pod's namespace)

The kubelet runs one per pod of the coredns Deployment (kproxy.dns.addon),
through the lab's supervisor, in the pod's network namespace. It follows the
store as CoreDNS's `kubernetes` plugin follows the API server: Services and
EndpointSlices, read again when they change (the store is polled every
POLL_SECONDS, so a change is served within a fraction of a second).

One thread serves both transports from one selector; UDP datagrams are read
in batches while they queue. TCP connections carry length-prefixed messages
(RFC 1035 4.2.2, RFC 7766) and are closed after TCP_IDLE_SECONDS of silence.
The pidfile is written once both sockets listen; /ready on READY_PORT then
answers 200, as CoreDNS's `ready` plugin does for the kubelet's probe.
"""

from __future__ import annotations

import argparse
import selectors
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from kproxy.dns import DNS_SERVICE_KEY, READY_PORT
from kproxy.dns.metrics import DNSMetrics
from kproxy.dns.responder import Responder
from kproxy.dns.zone import SERVICE_NAME_LABEL, Zone, ZoneConfig
from kproxy.memory import release_free_memory
from kproxy.lab.workload import raise_fd_limit, remove_pidfile, write_pidfile
from kproxy.store import Obj, View, open_store

DNS_PORT = 53
METRICS_PORT = 9153
POLL_SECONDS = 0.1
UDP_BATCH = 256
TCP_IDLE_SECONDS = 10.0
MAX_TCP_BUFFER = 2 * 65537  # a client that sends more without reading our answers is dropped
VERSION = "1.11.3-kproxy"  # the CoreDNS release whose behaviour it follows (kubeadm's image)


class _Ready(BaseHTTPRequestHandler):
    """CoreDNS's `ready` plugin: 200 "OK" on /ready (the kubelet's readiness probe), 404 elsewhere."""

    def do_GET(self) -> None:
        ready = self.path == "/ready"
        body = b"OK" if ready else b"404 page not found\n"
        self.send_response(200 if ready else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # the kubelet probes often: no log line each
        pass


def serve_ready(port: int) -> None:
    server = ThreadingHTTPServer(("0.0.0.0", port), _Ready)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ready", daemon=True).start()


def dns_fields(key: str, obj: Obj) -> Obj | None:
    """What the zone is built from: a Service's and an EndpointSlice's DNS fields; nothing else is kept."""
    meta = obj["metadata"]
    if key.startswith("Service/"):
        spec = obj["spec"]
        return {"metadata": {"name": meta["name"], "namespace": meta["namespace"]},
                "spec": {k: spec[k] for k in ("clusterIP", "type", "externalName") if k in spec}
                | {"ports": [{k: p[k] for k in ("name", "port", "protocol") if k in p} for p in spec.get("ports", [])]}}
    if key.startswith("EndpointSlice/"):
        return {"metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "labels": {SERVICE_NAME_LABEL: (meta.get("labels") or {}).get(SERVICE_NAME_LABEL, "")}},
                "ports": obj.get("ports") or [],
                "endpoints": [{"addresses": e["addresses"], "conditions": {"ready": e["conditions"].get("ready")}}
                              | ({"hostname": e["hostname"]} if e.get("hostname") else {})
                              for e in obj.get("endpoints") or []]}
    return None


def build_zone(view: View, domain: str) -> Zone:
    dns_service = view.objects.get(DNS_SERVICE_KEY)
    config = ZoneConfig(domain, dns_ip=dns_service["spec"]["clusterIP"] if dns_service else "")
    return Zone.build(view.of_kind("Service"), view.of_kind("EndpointSlice"), config, serial=view.version)


class _Connection:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.inbox = b""
        self.outbox = b""
        self.last = time.monotonic()


class Server:
    def __init__(self, lab_dir: Path, domain: str, port: int = DNS_PORT) -> None:
        self.watcher = open_store(lab_dir).watch(keep=dns_fields)
        self.domain = domain
        self.metrics = DNSMetrics(VERSION)
        self.responder = Responder(build_zone(self.watcher.view, domain), self.metrics)
        release_free_memory()  # the whole snapshot was parsed before dns_fields slimmed it
        self.selector = selectors.DefaultSelector()
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # bursts wait here, not get dropped
        self.udp.bind(("0.0.0.0", port))
        self.udp.setblocking(False)
        self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", port))
        self.tcp.listen(128)
        self.tcp.setblocking(False)
        self.selector.register(self.udp, selectors.EVENT_READ, "udp")
        self.selector.register(self.tcp, selectors.EVENT_READ, "accept")
        self.connections: dict[socket.socket, _Connection] = {}
        self.running = True

    def run(self) -> None:
        next_poll = 0.0
        while self.running:
            for key, mask in self.selector.select(timeout=POLL_SECONDS):
                if key.data == "udp":
                    self._datagrams()
                elif key.data == "accept":
                    self._accept()
                else:
                    self._connection_event(key.data, mask)
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + POLL_SECONDS
                self._follow_store()
                self._expire(now)

    def _follow_store(self) -> None:
        changed = self.watcher.poll()
        if any(key.startswith(("Service/", "EndpointSlice/")) for key in changed):
            self.responder.set_zone(build_zone(self.watcher.view, self.domain))
            release_free_memory()

    def _datagrams(self) -> None:
        for _ in range(UDP_BATCH):
            try:
                data, peer = self.udp.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            reply = self.responder.respond(data, "udp")
            if reply is not None:
                try:
                    self.udp.sendto(reply, peer)
                except OSError:
                    pass  # the client's problem (unreachable, buffer full): DNS clients retry

    def _accept(self) -> None:
        try:
            sock, _ = self.tcp.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        conn = _Connection(sock)
        self.connections[sock] = conn
        self.selector.register(sock, selectors.EVENT_READ, conn)

    def _connection_event(self, conn: _Connection, mask: int) -> None:
        conn.last = time.monotonic()
        if mask & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._close(conn)
                return
            if data:
                conn.inbox += data
                self._answer_messages(conn)
        if conn.outbox:
            self._flush(conn)

    def _answer_messages(self, conn: _Connection) -> None:
        while len(conn.inbox) >= 2:
            length = int.from_bytes(conn.inbox[:2], "big")
            if len(conn.inbox) < 2 + length:
                break
            message, conn.inbox = conn.inbox[2:2 + length], conn.inbox[2 + length:]
            reply = self.responder.respond(message, "tcp")
            if reply is not None:
                conn.outbox += len(reply).to_bytes(2, "big") + reply
        if len(conn.outbox) > MAX_TCP_BUFFER:
            self._close(conn)

    def _flush(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.outbox)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.outbox = conn.outbox[sent:]
        if conn.sock in self.connections:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbox else 0)
            self.selector.modify(conn.sock, events, conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.connections.values() if now - c.last > TCP_IDLE_SECONDS]:
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if self.connections.pop(conn.sock, None) is not None:
            self.selector.unregister(conn.sock)
            conn.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.dns.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", required=True, type=Path)
    parser.add_argument("--domain", default="cluster.local", help="the cluster domain (default cluster.local)")
    parser.add_argument("--port", type=int, default=DNS_PORT)
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    parser.add_argument("--ready-port", type=int, default=READY_PORT)
    parser.add_argument("--pidfile")
    args = parser.parse_args(argv)
    raise_fd_limit()
    try:
        server = Server(args.lab_dir, args.domain, args.port)
    except OSError as exc:
        print(f"kproxy-dns: cannot listen on port {args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: Any) -> None:
        server.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    start_http_server(args.metrics_port, registry=server.metrics.registry)
    serve_ready(args.ready_port)
    if args.pidfile:
        write_pidfile(args.pidfile)
    try:
        server.run()
    finally:
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
