"""Benchmark: the lab's store, the embedded file store against etcd, on the same machine (docs/store.md).

    sudo scripts/bench-store [--services 10000] [--changes 30]

For each store a fresh 2-node lab in iptables mode (`kproxy lab up --store S --no-dns`), side by side:
- load: one apply of N Services into the fresh lab, until every node has them live;
- programming: one Service change (its port flips) applied, as one `kproxy apply` would (a
  Cluster of its own, which reads the store in full once), until every node's agent has it live:
  the network-programming latency a user waits for (p50 / p99 / max), with N Services stored;
- watch: one change written straight to the store until a watcher in this process (as an agent
  holds one) has it, with N Services stored: what the store itself adds to each change.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from kproxy.bench import require_root
from kproxy.bench.dataplane import filler, programmed_change, settled
from kproxy.bench.labs import up_all
from kproxy.bench.stats import percentile
from kproxy.children import terminated_as_interrupt
from kproxy.cluster import Cluster
from kproxy.errors import KproxyError
from kproxy.lab.state import lab_dir
from kproxy.store import open_store

STORES = ("file", "etcd")
TOPOLOGY = {"nodes": [{"name": "node1"}, {"name": "node2"}]}


def watch_delays(lab: str, changes: int) -> list[float]:
    """Seconds from one write until a watcher of the lab's store has it."""
    store = open_store(lab_dir(lab))
    watcher = store.watch()
    watcher.poll()
    delays = []
    for i in range(changes):
        started = time.monotonic()
        store.write({"ConfigMap/default/bench-watch": {"apiVersion": "v1", "kind": "ConfigMap",
                                                       "metadata": {"name": "bench-watch", "namespace": "default"},
                                                       "data": {"change": str(i)}}})
        while "ConfigMap/default/bench-watch" not in watcher.poll():
            time.sleep(0.0002)
        delays.append(time.monotonic() - started)
    watcher.close()
    return delays


def summary(delays: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(delays, 0.5) * 1e3, "p99_ms": percentile(delays, 0.99) * 1e3,
            "max_ms": max(delays) * 1e3}


def measure(services: int, changes: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    labs = {store: f"bench-store-{store}" for store in STORES}
    with ExitStack() as downs:
        up_all(TOPOLOGY, {lab: ["--store", store] for store, lab in labs.items()}, downs)
        for store, lab in labs.items():
            print(f"step: {store}: loading {services} Services", file=sys.stderr, flush=True)
            started = time.monotonic()
            with Cluster(lab) as cluster:
                settled(cluster, [filler(i) for i in range(services)])
            load = time.monotonic() - started
            print(f"step: {store}: {changes} changes applied until live", file=sys.stderr, flush=True)
            programming = []
            for generation in range(changes):
                started = time.monotonic()
                with Cluster(lab) as cluster:  # each change as one `kproxy apply`: its own full read
                    settled(cluster, [programmed_change(generation)])
                programming.append(time.monotonic() - started)
            results[store] = {"load_s": load, "programming": summary(programming),
                              "watch": summary(watch_delays(lab, changes))}
    return {"services": services, "changes": changes, "stores": results}


def render(doc: dict[str, Any]) -> str:
    lines = [f"{doc['services']} Services stored, {doc['changes']} changes each",
             f"{'store':6} {'load (s)':>9} {'apply->live p50/p99 (ms)':>26} {'watch p50/p99 (ms)':>20}"]
    for store, got in doc["stores"].items():
        p, w = got["programming"], got["watch"]
        lines.append(f"{store:6} {got['load_s']:9.2f} {p['p50_ms']:>13.1f} / {p['p99_ms']:<10.1f}"
                     f" {w['p50_ms']:>9.2f} / {w['p99_ms']:<8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-store", description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10000, help="Services stored (default 10000)")
    parser.add_argument("--changes", type=int, default=30, help="changes measured per store (default 30)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if not require_root("bench-store"):
        return 1
    try:
        with terminated_as_interrupt():
            doc = measure(args.services, args.changes)
    except KproxyError as exc:
        print(f"bench-store: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench-store: interrupted", file=sys.stderr)
        return 130
    print(render(doc))
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
