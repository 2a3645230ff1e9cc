"""The node agent: kube-proxy for one node of a lab.

Runs inside the node's network namespace. Watches the lab's store; on every
change of Services or EndpointSlices it hands the proxy mode the desired
state; after each sync it reports the store version it reached (apply waits
for that). Serves /healthz on :10256, Prometheus /metrics on
127.0.0.1:10249 with kube-proxy's metric names, and the service health check
on every healthCheckNodePort (kproxy.healthcheck).

    python -m kproxy.agent --lab-dir /run/kproxy/LAB --node node1 --mode iptables
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, start_http_server

from kproxy.controllers import SERVICE_CIDR
from kproxy.errors import KproxyError
from kproxy.healthcheck import HealthServer
from kproxy.proxy import DEFAULT_MODE, MODES, mode as proxy_mode
from kproxy.proxy.mode import Proxier, parse_option_pairs
from kproxy.proxy.source import TRIGGER_TIME_ANNOTATION, StateTracker, node_info
from kproxy.store import View, open_store

HEALTHZ_PORT = 10256
METRICS_PORT = 10249
POLL_SECONDS = 0.005
SYNC_PERIOD = 30.0  # resync at least this often, like kube-proxy's --iptables-sync-period
RELEVANT = ("Service/", "EndpointSlice/", "Node/")
# kube-proxy's buckets (exponential from 1 ms)
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
PROGRAMMING_BUCKETS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                       22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
                       44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 65, 70, 75, 80, 85,
                       90, 95, 100, 105, 110, 115, 120, 150, 180, 210, 240, 270, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sync = Histogram("kubeproxy_sync_proxy_rules_duration_seconds",
                              "SyncProxyRules latency in seconds", buckets=SYNC_BUCKETS, registry=self.registry)
        self.sync_full = Histogram("kubeproxy_sync_full_proxy_rules_duration_seconds",
                                   "SyncProxyRules latency in seconds for full resyncs", buckets=SYNC_BUCKETS,
                                   registry=self.registry)
        self.sync_partial = Histogram("kubeproxy_sync_partial_proxy_rules_duration_seconds",
                                      "SyncProxyRules latency in seconds for partial resyncs", buckets=SYNC_BUCKETS,
                                      registry=self.registry)
        self.programming = Histogram("kubeproxy_network_programming_duration_seconds",
                                     "In Cluster Network Programming Latency in seconds",
                                     buckets=PROGRAMMING_BUCKETS, registry=self.registry)
        self.last_sync = Gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                               "The last time proxy rules were successfully synced", registry=self.registry)
        self.last_queued = Gauge("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                                 "The last time a sync of proxy rules was queued", registry=self.registry)


class Agent:
    def __init__(self, lab_dir: Path, node: str, mode: str, cluster_cidr: str,
                 mode_options: dict[str, str] | None = None) -> None:
        self.lab_dir = lab_dir
        self.node = node
        self.mode = proxy_mode(mode)
        self.mode_options = self.mode.options_of(mode_options or {})
        self.cluster_cidr = cluster_cidr
        self.store = open_store(lab_dir, on_underlay=True)
        self.watcher = self.store.watch()
        self.metrics = Metrics()
        self.proxier: Proxier | None = None
        self.tracker = StateTracker(self.mode.service_info)
        self.running = True
        self.last_ok = 0.0
        self.last_error = ""
        self.full_syncs = 0  # a restarted agent's first sync is full: the report shows it
        self.unsent: dict[str, Any] = {}  # the latest report, until the store has it
        self.report_failed_at: object = None  # the version of the last report that could not be sent
        self.health = HealthServer(self.healthy)

    def healthy(self) -> bool:
        """kube-proxy's healthz: a sync succeeded lately (within two sync periods)."""
        return self.last_ok > 0 and time.time() - self.last_ok < 2 * SYNC_PERIOD + 5

    def _proxier(self, view: View) -> Proxier:
        if self.proxier is None:
            node = view.objects.get(f"Node/{self.node}")
            if node is None:
                raise RuntimeError(f"node {self.node} is not in the store")
            self.proxier = self.mode.make_proxier(node_info(node, self.cluster_cidr, str(SERVICE_CIDR)),
                                                 self.mode_options)
        return self.proxier

    def sync(self, changed: set[str]) -> None:
        view = self.watcher.view
        self.metrics.last_queued.set_to_current_time()
        # A sync makes objects by the ten thousand, most of them kept (the caches): the
        # collector's passes over them would cost a quarter of a 10k-service sync.
        gc.disable()
        try:
            # Made (and its module imported) once the node is known, like kube-proxy's proxier at startup.
            proxier = self._proxier(view)
            # Only the Services touched by this change are re-derived (and re-rendered by the mode).
            # kube-proxy's change trackers do this work in its event handlers, outside the sync it
            # times; it is timed apart here (tracker_seconds in the status), the sync as kube-proxy's.
            tracking = time.monotonic()
            state = self.tracker.update(view.objects, changed)
            started = time.monotonic()
            result = proxier.sync(state)
        except Exception as exc:  # reported, retried on the next change or period
            self.last_error = f"{type(exc).__name__}: {exc}"
            print(f"kproxy-agent {self.node}: sync failed: {self.last_error}", file=sys.stderr, flush=True)
            self._report(view.version, ok=False)
            return
        finally:
            gc.enable()
        took = time.monotonic() - started
        self.metrics.sync.observe(took)
        (self.metrics.sync_full if result.full else self.metrics.sync_partial).observe(took)
        self.metrics.last_sync.set_to_current_time()
        now = time.time()
        for key in changed:
            trigger = (view.objects.get(key, {}).get("metadata", {}).get("annotations") or {}).get(
                TRIGGER_TIME_ANNOTATION)
            if key.startswith("EndpointSlice/") and trigger:
                self.metrics.programming.observe(max(0.0, now - _parse_time(trigger)))
        self.last_ok = now
        self.last_error = ""
        self.full_syncs += result.full
        self.health.sync(state, self.node)
        self._report(view.version, ok=True, full=result.full, seconds=took, tracker_seconds=started - tracking)

    def _report(self, version: int, ok: bool, **extra: Any) -> None:
        """The sync's report into the store (apply waits for it); one the store did not take (etcd
        away) is sent again by run()."""
        self.unsent = {"version": version, "ok": ok, "mode": self.mode.name, "error": self.last_error,
                       "time": time.time(), "pid": os.getpid(), "fullSyncs": self.full_syncs, **extra}
        self._send_report()

    def _send_report(self) -> None:
        try:
            self.store.put_report(self.node, self.unsent)
        except KproxyError as exc:
            if self.unsent.get("version") != self.report_failed_at:  # one line per report, not per retry
                print(f"kproxy-agent {self.node}: could not report: {exc}", file=sys.stderr, flush=True)
                self.report_failed_at = self.unsent.get("version")
            return
        self.unsent = {}

    def run(self) -> None:
        self.sync(set())
        next_resync = time.monotonic() + SYNC_PERIOD
        reported = self.watcher.view.version
        while self.running:
            changed = self.watcher.poll()
            if any(key.startswith(RELEVANT) for key in changed) or time.monotonic() >= next_resync \
                    or (self.last_error and changed):
                self.sync(changed)
                next_resync = time.monotonic() + SYNC_PERIOD
                reported = self.watcher.view.version
            elif self.watcher.view.version != reported:
                # Nothing for us in this change, but apply waits for every agent's version.
                self._report(self.watcher.view.version, ok=not self.last_error)
                reported = self.watcher.view.version
            elif self.unsent:
                self._send_report()
            time.sleep(POLL_SECONDS)


def _parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=timezone.utc).timestamp()


def serve_healthz(agent: Agent) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            if self.path.split("?")[0] not in ("/healthz", "/livez"):
                self.send_error(404)
                return
            body = json.dumps({"lastUpdated": _iso(agent.last_ok), "currentTime": _iso(time.time()),
                               "nodeEligible": True}).encode()
            self.send_response(200 if agent.healthy() else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("0.0.0.0", HEALTHZ_PORT), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat().replace("+00:00", "Z") if ts else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kproxy-agent", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lab-dir", required=True, type=Path)
    parser.add_argument("--node", required=True)
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    parser.add_argument("--cluster-cidr", default="10.244.0.0/16")
    parser.add_argument("--pidfile", type=Path)
    parser.add_argument("--mode-opt", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of the mode (repeatable)")
    args = parser.parse_args(argv)
    agent = Agent(args.lab_dir, args.node, args.mode, args.cluster_cidr, parse_option_pairs(args.mode_opt))

    def stop(signum: int, frame: Any) -> None:
        agent.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    start_http_server(METRICS_PORT, addr="127.0.0.1", registry=agent.metrics.registry)
    serve_healthz(agent)
    if args.pidfile:
        tmp = args.pidfile.with_name(args.pidfile.name + ".tmp")
        tmp.write_text(str(os.getpid()))
        os.replace(tmp, args.pidfile)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
