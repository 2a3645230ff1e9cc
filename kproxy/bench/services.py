"""Benchmark: syncing many Services into one node, through the real agent.

    sudo scripts/bench-services [--sizes 1000,5000,10000] [--mode iptables]

For each size N (N Services, 2 endpoints each) in a fresh node namespace:
  full sync      the agent's first sync of the whole store (its own timing)
  restore alone  the agent's iptables-restore command on the same rules text, nothing else
  one change     one EndpointSlice written to the store, until the agent has
                 the new rules in the kernel (end to end, median of 5)
  agent RSS      the agent's memory with N Services loaded
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cni.netns import entered
from kproxy.agent import status_path
from kproxy.bench import require_root
from kproxy.lab.processes import AGENT, start, stop
from kproxy.proxy.iptables import write_full_restore
from kproxy.proxy.kernel import restore
from kproxy.proxy.source import TRIGGER_TIME_ANNOTATION, node_info, proxy_state
from kproxy.store import Store

NODE = "node1"
NODE_IP = "172.18.0.2"
CLUSTER_CIDR = "10.244.0.0/16"


def service(i: int) -> dict[str, Any]:
    ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}", "namespace": "bench"},
            "spec": {"type": "ClusterIP", "clusterIP": ip, "selector": {"app": f"a{i}"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}


def endpoint_slice(i: int, generation: int = 0) -> dict[str, Any]:
    base = 2 * i + generation * 7
    ips = [f"10.244.{(base + k) // 250 % 250}.{(base + k) % 250 + 2}" for k in range(2)]
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"svc-{i}", "namespace": "bench",
                         "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                         "annotations": {TRIGGER_TIME_ANNOTATION: "2026-01-01T00:00:00Z"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}, "nodeName": NODE} for ip in ips],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}


def node_object() -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
            "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}


def wait_version(lab_dir: Path, version: int, timeout: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = json.loads(status_path(lab_dir, NODE).read_text())
            if status.get("version", 0) >= version:
                if not status.get("ok"):
                    raise RuntimeError(f"agent sync failed: {status.get('error')}")
                return status
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.001)
    raise TimeoutError(f"the agent did not reach version {version}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def netns(name: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", *argv, name], check=True)


def restore_alone(text: str, ns: str) -> float:
    with entered(ns):
        started = time.monotonic()
        restore(text, counters=True)
        return time.monotonic() - started


def bench_size(n: int, mode: str, prefix: str) -> dict[str, float]:
    ns_name, spare = f"{prefix}-n{n}", f"{prefix}-r{n}"
    ns = f"/var/run/netns/{ns_name}"
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        lab_dir = Path(tmp)
        store = Store(lab_dir / "store")
        objects: dict[str, Any] = {f"Node/{NODE}": node_object()}
        for i in range(n):
            objects[f"Service/bench/svc-{i}"] = service(i)
            objects[f"EndpointSlice/bench/svc-{i}"] = endpoint_slice(i)
        version = store.write(objects)
        netns(ns_name, "add")
        netns(spare, "add")
        pid = 0
        try:
            pid = start(AGENT, lab_dir, NODE, ns, ["--lab-dir", str(lab_dir), "--node", NODE, "--mode", mode,
                                                   "--cluster-cidr", CLUSTER_CIDR])
            full = wait_version(lab_dir, version)["seconds"]
            row = {"full": full}
            if mode == "iptables":
                state = proxy_state([o for k, o in objects.items() if k.startswith("Service/")],
                                    [o for k, o in objects.items() if k.startswith("EndpointSlice/")])
                chunks: list[str] = []  # the agent's full-sync text, as it writes it
                write_full_restore(state, node_info(node_object(), CLUSTER_CIDR), chunks.append)
                text = "".join(chunks)
                row["restore"] = restore_alone(text, f"/var/run/netns/{spare}")
            changes = []
            for g in range(1, 6):
                i = (g * 7919) % n
                started = time.monotonic()
                version = store.write({f"EndpointSlice/bench/svc-{i}": endpoint_slice(i, g)})
                wait_version(lab_dir, version)
                changes.append(time.monotonic() - started)
            row["change"] = statistics.median(changes)
            row["rss"] = rss_mib(pid)
            return row
        finally:
            if pid:
                stop(AGENT, lab_dir, NODE)
            subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)
            subprocess.run(["ip", "netns", "del", spare], capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--mode", default="iptables")
    args = parser.parse_args(argv)
    if not require_root("bench-services"):
        return 1
    prefix = f"kpbench{os.getpid() % 10000}"
    print(f"mode {args.mode}, {os.cpu_count()} CPUs, 2 endpoints per service")
    print(f"{'services':>8}  {'full sync':>10}  {'restore alone':>13}  {'ratio':>5}  {'one change':>10}  {'agent RSS':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        row = bench_size(n, args.mode, prefix)
        alone = row.get("restore")
        alone_text = f"{alone * 1000:.0f}ms" if alone else "-"
        ratio = f"{row['full'] / alone:.2f}" if alone else "-"
        print(f"{n:>8}  {row['full'] * 1000:>8.0f}ms  {alone_text:>13}  {ratio:>5}  "
              f"{row['change'] * 1000:>8.1f}ms  {row['rss']:>6.0f}MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
