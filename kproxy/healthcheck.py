"""kube-proxy's service health check: one HTTP listener per healthCheckNodePort on the node.

A LoadBalancer Service with externalTrafficPolicy Local gets a healthCheckNodePort.
Every node's proxy answers on it, so the load balancer sends traffic only to
nodes that can serve it without leaving the node:

    GET http://<node>:<healthCheckNodePort>/   ->  200 when the node has a ready
    endpoint of the Service (and the proxy is healthy), else 503, with

    {
    	"service": {
    		"namespace": "default",
    		"name": "web"
    	},
    	"localEndpoints": 1,
    	"serviceProxyHealthy": true
    }

(the body, headers and status as kube-proxy's pkg/proxy/healthcheck writes them).
The agent calls sync() after every sync of its rules; listeners open and close
as Services gain and lose their port.
"""

from __future__ import annotations

import json
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from kproxy.proxy.topology import local_ready_count
from kproxy.proxy.types import ProxyState


@dataclass(frozen=True)
class ServiceHealth:
    namespace: str
    name: str
    port: int
    local_endpoints: int


def service_health(state: ProxyState, node: str) -> dict[tuple[str, str], ServiceHealth]:
    """What each Service with a healthCheckNodePort should report on this node (pure)."""
    out: dict[tuple[str, str], ServiceHealth] = {}
    for svc in state.services:
        if not svc.health_check_node_port:
            continue
        key = (svc.namespace, svc.name)
        count = local_ready_count(state.endpoints_of(svc), node)
        before = out.get(key)
        out[key] = ServiceHealth(svc.namespace, svc.name, svc.health_check_node_port,
                                 max(count, before.local_endpoints) if before else count)
    return out


def response(health: ServiceHealth, proxy_healthy: bool) -> tuple[int, bytes]:
    """The status and body kube-proxy answers with."""
    body = json.dumps({"service": {"namespace": health.namespace, "name": health.name},
                       "localEndpoints": health.local_endpoints, "serviceProxyHealthy": proxy_healthy},
                      indent="\t")
    return (200 if health.local_endpoints and proxy_healthy else 503), body.encode()


class HealthServer:
    """The listeners, one per healthCheckNodePort, answering from the last sync's counts."""

    def __init__(self, proxy_healthy: Callable[[], bool], address: str = "0.0.0.0") -> None:
        self.proxy_healthy = proxy_healthy
        self.address = address
        self._health: dict[tuple[str, str], ServiceHealth] = {}
        self._servers: dict[int, ThreadingHTTPServer] = {}
        self._lock = threading.Lock()

    def sync(self, state: ProxyState, node: str) -> None:
        wanted = service_health(state, node)
        with self._lock:
            self._health = wanted
        ports = {health.port: key for key, health in wanted.items()}
        for port in sorted(set(self._servers) - set(ports)):
            self._close(port)
        for port, key in sorted(ports.items()):
            if port not in self._servers:
                self._open(port, key)

    def lookup(self, key: tuple[str, str]) -> ServiceHealth | None:
        with self._lock:
            return self._health.get(key)

    def _open(self, port: int, key: tuple[str, str]) -> None:
        server_of = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                health = server_of.lookup(key)
                if health is None:  # closed meanwhile
                    self.send_error(404)
                    return
                status, body = response(health, server_of.proxy_healthy())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Load-Balancing-Endpoint-Weight", str(health.local_endpoints))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        try:
            server = ThreadingHTTPServer((self.address, port), Handler)
        except OSError as exc:  # kube-proxy logs and retries on the next sync, too
            print(f"kproxy-agent: health check node port {port} for {key[0]}/{key[1]}: {exc}",
                  file=sys.stderr, flush=True)
            return
        server.daemon_threads = True
        self._servers[port] = server
        threading.Thread(target=server.serve_forever, daemon=True, name=f"healthcheck-{port}").start()

    def _close(self, port: int) -> None:
        server = self._servers.pop(port)
        server.shutdown()
        server.server_close()

    def close(self) -> None:
        for port in list(self._servers):
            self._close(port)
