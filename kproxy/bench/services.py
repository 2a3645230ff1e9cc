"""Benchmark: syncing many Services into one node, through the real agent.

    sudo scripts/bench-services [--sizes 1000,5000,10000] [--mode iptables] [--mode-opt NAME=VALUE] [--repeat 5]

For each size N (N Services, --endpoints endpoints each, default 2):
  tracker        the agent turning the store's objects into service ports and
                 endpoints (kube-proxy's change trackers, which it does in its
                 event handlers, outside the sync it times)
  full sync      the agent's first sync into a fresh node namespace, timed as
                 kube-proxy's kubeproxy_sync_proxy_rules_duration_seconds: the
                 proxy mode's sync, from that state to rules in the kernel
  load alone     the kernel's own tool loading what the mode's first sync writes,
                 into a fresh namespace, nothing else (iptables: iptables-nft-restore;
                 nftables: nft -f of the same transaction); modes that write no such
                 text (userspace, ipvs) are held against iptables mode's restore
  ratio          full sync / load alone; "with tracker": (tracker + full sync) / load alone
  one change     one EndpointSlice written to the store, until the agent has
                 the new rules in the kernel (end to end, tracker included; median of 5)
  first packet   a TCP connect from the node to the last Service's ClusterIP, its
                 endpoint on the node's lo: the SYN through the mode's rules and the
                 answer back (the lowest median of 5 batches of 200)
  agent RSS      the agent's memory with N Services loaded
Tracker, full sync and load alone are each the median of --repeat runs,
taken in turns so that both see the same machine; the ratios are of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cni.netns import entered
from kproxy.agent import status_path
from kproxy.bench import require_root
from kproxy.controllers import SERVICE_CIDR as SERVICE_NETWORK
from kproxy.errors import KproxyError
from kproxy.k8sform import metadata, service_object, service_port
from kproxy.lab.processes import AGENT, start, stop
from kproxy.proxy import DEFAULT_MODE, MODES, mode as proxy_mode
from kproxy.proxy.mode import Options, parse_option
from kproxy.proxy.source import TRIGGER_TIME_ANNOTATION, StateTracker, node_info
from kproxy.store import Store

NODE = "node1"
NODE_IP = "172.18.0.2"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = str(SERVICE_NETWORK)


def service(i: int) -> dict[str, Any]:
    ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
    return service_object(metadata(f"svc-{i}", "bench"), [service_port(80, 8080, name="http")],
                          cluster_ip=ip, selector={"app": f"a{i}"})


def endpoint_slice(i: int, generation: int = 0, endpoints: int = 2) -> dict[str, Any]:
    base = endpoints * i + generation * 7
    ips = [f"10.244.{(base + k) // 250 % 250}.{(base + k) % 250 + 2}" for k in range(endpoints)]
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


def wait_version(lab_dir: Path, version: int, timeout: float = 600, poll: float = 0.001) -> dict[str, Any]:
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
        time.sleep(poll)
    raise TimeoutError(f"the agent did not reach version {version}")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def netns(name: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", *argv, name], check=True)


def load_alone(objects: dict[str, Any], mode: str, options: Options, ns_name: str) -> float:
    """The baseline: the kernel's tool loading the mode's first sync of objects (as the agent
    derives its state) into a fresh namespace."""
    chosen = proxy_mode(mode)
    if chosen.load_alone is None:
        chosen, options = proxy_mode(DEFAULT_MODE), proxy_mode(DEFAULT_MODE).options_of({})
    state = StateTracker().update(objects)
    node = node_info(node_object(), CLUSTER_CIDR, SERVICE_CIDR)
    netns(ns_name, "add")
    try:
        with entered(f"/var/run/netns/{ns_name}"):
            assert chosen.load_alone is not None
            started = time.monotonic()
            chosen.load_alone(state, node, options)
            return time.monotonic() - started
    finally:
        netns(ns_name, "del")


def first_packet(ns_name: str, n: int, endpoints: int, connects: int = 200, batches: int = 5) -> float:
    """Seconds of a TCP connect from the node to the last Service (svc-{n-1}), whose endpoints get
    addresses on the node's lo and a listener, with the service range routed there: the median of
    each batch of connects, the lowest of the batches (a busy moment of the machine spoils one batch,
    not the figure)."""
    path = f"/var/run/netns/{ns_name}"
    slice_ = endpoint_slice(n - 1, endpoints=endpoints)
    for ep in slice_["endpoints"]:
        subprocess.run(["ip", "-n", ns_name, "addr", "add", f"{ep['addresses'][0]}/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "-n", ns_name, "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "-n", ns_name, "route", "add", SERVICE_CIDR, "dev", "lo"], check=True)
    target = (service(n - 1)["spec"]["clusterIP"], 80)
    with entered(path):
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 8080))
        listener.listen(256)
        medians = []
        with listener:
            for _ in range(batches):
                times = []
                for _ in range(connects):
                    started = time.perf_counter()
                    with socket.create_connection(target, timeout=5):
                        times.append(time.perf_counter() - started)
                    listener.accept()[0].close()
                medians.append(statistics.median(times))
    return min(medians)


@contextmanager
def agent_on_fresh_node(lab_dir: Path, ns_name: str, mode: str, options: Options) -> Iterator[int]:
    """The agent (its pid) on a new node namespace; it starts with a full sync of the store."""
    netns(ns_name, "add")
    pairs = [arg for name, value in options.items() for arg in ("--mode-opt", f"{name}={value}")]
    try:
        yield start(AGENT, lab_dir, NODE, f"/var/run/netns/{ns_name}",
                    ["--lab-dir", str(lab_dir), "--node", NODE, "--mode", mode, "--cluster-cidr", CLUSTER_CIDR, *pairs])
    finally:
        stop(AGENT, lab_dir, NODE)
        status_path(lab_dir, NODE).unlink(missing_ok=True)  # the next agent reports afresh
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)


def bench_size(n: int, mode: str, options: Options, prefix: str, repeat: int, endpoints: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        lab_dir = Path(tmp)
        store = Store(lab_dir / "store")
        objects: dict[str, Any] = {f"Node/{NODE}": node_object()}
        for i in range(n):
            objects[f"Service/bench/svc-{i}"] = service(i)
            objects[f"EndpointSlice/bench/svc-{i}"] = endpoint_slice(i, endpoints=endpoints)
        version = store.write(objects)
        samples: dict[str, list[float]] = {"tracker": [], "full": [], "alone": []}
        for r in range(repeat):
            with agent_on_fresh_node(lab_dir, f"{prefix}-n{n}", mode, options) as pid:
                status = wait_version(lab_dir, version, poll=0.02)  # the agent times itself: no need to poll fast
                samples["tracker"].append(status["tracker_seconds"])
                samples["full"].append(status["seconds"])
                samples["alone"].append(load_alone(objects, mode, options, f"{prefix}-r{n}"))
                if r < repeat - 1:
                    continue
                changes = []
                for g in range(1, 6):
                    i = (g * 7919) % n
                    started = time.monotonic()
                    version = store.write({f"EndpointSlice/bench/svc-{i}": endpoint_slice(i, g, endpoints)})
                    wait_version(lab_dir, version)
                    changes.append(time.monotonic() - started)
                row = {key: statistics.median(values) for key, values in samples.items() if values}
                return row | {"change": statistics.median(changes), "rss": rss_mib(pid),
                              "packet": first_packet(f"{prefix}-n{n}", n, endpoints)}
        raise ValueError("--repeat must be at least 1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-services", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    parser.add_argument("--mode-opt", action="append", default=[], type=parse_option, metavar="NAME=VALUE",
                        help="an option of the mode (repeatable; 'kproxy modes' lists them)")
    parser.add_argument("--repeat", type=int, default=5, help="full syncs and loads alone per size (median)")
    parser.add_argument("--endpoints", type=int, default=2, help="endpoints per Service (default 2)")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.endpoints < 1:
        parser.error("--repeat and --endpoints must be at least 1")
    try:
        options = proxy_mode(args.mode).options_of(dict(args.mode_opt))
    except KproxyError as exc:
        parser.error(str(exc))
    if not require_root("bench-services"):
        return 1
    prefix = f"kpbench{os.getpid() % 10000}"
    shown = ", ".join(f"{name}={value}" for name, value in options.items())
    print(f"mode {args.mode}{f' ({shown})' if shown else ''}, {os.cpu_count()} CPUs, {args.endpoints} endpoints per service, "
          f"median of {args.repeat} full syncs")
    print(f"{'services':>8}  {'tracker':>8}  {'full sync':>9}  {'load alone':>10}  {'ratio':>5}  "
          f"{'with tracker':>12}  {'one change':>10}  {'first packet':>12}  {'agent RSS':>9}")
    for n in (int(s) for s in args.sizes.split(",")):
        row = bench_size(n, args.mode, options, prefix, args.repeat, args.endpoints)
        alone = row["alone"]
        ratios = [f"{row['full'] / alone:.2f}", f"{(row['tracker'] + row['full']) / alone:.2f}"]
        print(f"{n:>8}  {row['tracker'] * 1000:>6.0f}ms  {row['full'] * 1000:>7.0f}ms  "
              f"{f'{alone * 1000:.0f}ms':>10}  {ratios[0]:>5}  {ratios[1]:>12}  "
              f"{row['change'] * 1000:>8.1f}ms  {row['packet'] * 1000:>10.3f}ms  {row['rss']:>6.0f}MiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
