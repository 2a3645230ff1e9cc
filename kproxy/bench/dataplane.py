"""The data plane, per mode, in real labs: one lab per mode, all up at once, measured in turns.

Each lab has two nodes and three pods (the client and srv-same on node1, srv-cross on
node2; the lab's own workload answers HTTP on 8080) and the Services zz-same and
zz-cross (NodePort, ports 80 -> 8080 and 5201 -> 5201). Their names sort after every
filler Service, so iptables mode's KUBE-SERVICES scans all the others first. For each
size N, filler ClusterIP Services (2 endpoints each: both servers) are applied with the
lab's own apply until the lab holds N Services, and every node has synced them. Then,
repetition by repetition, every mode in turn:

  programming  apply of one Service change until every node's agent has it live
               (the same code path as `kproxy apply`, in process)
  latency      connect + request + answer + close, p50/p99 of --requests each:
               from the client pod to the ClusterIP (same node, cross node), and from
               `external` to node1's NodePort (endpoint on node1, on node2); each against
               the same source's direct connection to the pod IP, interleaved request
               by request (external reaches pod IPs through a route per node's pod
               subnet, added in the bench lab's external namespace)
  throughput   iperf3, one TCP stream, client pod to srv-cross: the ClusterIP against
               the pod IP (at the smallest size only: no rule lookup per packet after the
               first, so N does not matter)
"""

from __future__ import annotations

import errno
import socket
import subprocess
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from itertools import cycle
from typing import Any, Callable, Iterator

from cni.netns import entered
from kproxy.bench import SYNC_TIMEOUT, SyncFailed
from kproxy.bench.labs import IPERF_PORT, iperf, start_iperf_server, up_all
from kproxy.bench.options import MEASURED_SERVICES
from kproxy.bench.stats import percentile, ratio, spread
from kproxy.cluster import Cluster
from kproxy.errors import KproxyError
from kproxy.k8sform import metadata, service_object, service_port
from kproxy.lab.build import status as lab_status
from kproxy.lab.state import ns_path

HTTP_PORT = 8080
REQUEST = b"GET / HTTP/1.0\r\n\r\n"
REQUEST_TIMEOUT = 5.0
SOURCE_PORT_BASE = 10000  # below the ephemeral range (32768-60999), where nothing else of the lab binds
SOURCE_PORTS_EACH = 10000
TOPOLOGY = {"nodes": [{"name": "node1"}, {"name": "node2"}],
            "pods": [{"name": "client", "nodeName": "node1"},
                     {"name": "srv-same", "nodeName": "node1", "labels": {"app": "srv-same", "bench": "filler"}},
                     {"name": "srv-cross", "nodeName": "node2", "labels": {"app": "srv-cross", "bench": "filler"}}]}


@dataclass(frozen=True)
class Plan:
    modes: tuple[str, ...]
    sizes: tuple[int, ...]  # Services in the lab, the measured ones included
    repeats: int
    requests: int  # per target per repetition
    changes: int  # programmed changes per repetition
    iperf_seconds: float
    lab_prefix: str = "bench-"


def lab_name(plan: Plan, mode: str) -> str:
    return f"{plan.lab_prefix}{mode}"


def measured_services() -> list[dict[str, Any]]:
    return [service_object(metadata(f"zz-{where}", "default"),
                           [service_port(80, HTTP_PORT, name="http"), service_port(IPERF_PORT, IPERF_PORT, name="iperf")],
                           selector={"app": f"srv-{where}"}, type_="NodePort") for where in ("same", "cross")]


def filler(i: int) -> dict[str, Any]:
    return service_object(metadata(f"svc-{i:05d}", "default"), [service_port(80, HTTP_PORT, name="http")],
                          selector={"bench": "filler"})


def programmed_change(generation: int) -> dict[str, Any]:
    """A Service whose port flips at every change: new rules on every node, every mode."""
    return service_object(metadata("zz-programmed", "default"),
                          [service_port(80 + generation % 2, HTTP_PORT, name="http")], selector={"bench": "filler"})


@dataclass(frozen=True)
class Targets:
    """What a lab's requests go to, read once its measured Services are applied (they keep their
    addresses: only the fillers and zz-programmed are applied again)."""
    client: str  # netns paths
    external: str
    pod_ip: dict[str, str]  # "same" / "cross" -> pod IP
    cluster_ip: dict[str, str]
    node_port: dict[str, int]
    node1_ip: str


@dataclass(frozen=True)
class BenchLab:
    cluster: Cluster
    targets: Targets


@contextmanager
def labs(plan: Plan, step: Callable[[str], None]) -> Iterator[dict[str, BenchLab]]:
    """One lab per mode, up side by side, each taken down again however the run ends."""
    with ExitStack() as downs:
        step(f"data plane: lab up {', '.join(lab_name(plan, mode) for mode in plan.modes)}")
        up_all(TOPOLOGY, {lab_name(plan, mode): ["--mode", mode] for mode in plan.modes}, downs)
        benched = {}
        for mode in plan.modes:
            cluster = downs.enter_context(Cluster(lab_name(plan, mode)))
            start_iperf_server(lab_name(plan, mode), "srv-cross", downs)
            settled(cluster, [*measured_services(), programmed_change(0)])
            route_pod_subnets_from_external(lab_name(plan, mode))
            benched[mode] = BenchLab(cluster, targets_of(cluster))
        yield benched


def settled(cluster: Cluster, objects: list[dict[str, Any]]) -> None:
    """Applied as `kproxy apply` does, until every node has it live (10k Services take minutes in the guest)."""
    outcome = cluster.apply(objects, timeout=SYNC_TIMEOUT)
    if outcome.lagging or outcome.unready:
        raise SyncFailed(f"lab {cluster.state.name}: not synced: {', '.join(outcome.lagging + outcome.unready)}")


def route_pod_subnets_from_external(lab: str) -> None:
    info = lab_status(lab)
    for node in info["nodes"]:
        subprocess.run(["ip", "-n", info["external"]["namespace"], "route", "replace", node["podCIDR"],
                        "via", node["ip"]], check=True, capture_output=True)


def targets_of(cluster: Cluster) -> Targets:
    lab = cluster.state.name
    info = lab_status(lab)
    pods = {p["name"]: p["ip"] for p in info["pods"]}
    services = {s["metadata"]["name"]: s for s in cluster.view().of_kind("Service")}
    return Targets(ns_path(lab, "client"), ns_path(lab, "external"),
                   {w: pods[f"srv-{w}"] for w in ("same", "cross")},
                   {w: services[f"zz-{w}"]["spec"]["clusterIP"] for w in ("same", "cross")},
                   {w: services[f"zz-{w}"]["spec"]["ports"][0]["nodePort"] for w in ("same", "cross")},
                   next(n["ip"] for n in info["nodes"] if n["name"] == "node1"))


def one_request(address: tuple[str, int], ports: Iterator[int]) -> float | str:
    """Seconds of one request, or why it failed (a refused or timed-out request is a finding, not a crash)."""
    started = time.perf_counter()
    try:
        with socket.socket() as sock:
            sock.settimeout(REQUEST_TIMEOUT)
            bind_next_free(sock, ports)
            sock.connect(address)
            sock.sendall(REQUEST)
            while sock.recv(4096):
                pass
    except OSError as exc:
        return f"{type(exc).__name__} {exc}".strip()
    return time.perf_counter() - started


def bind_next_free(sock: socket.socket, ports: Iterator[int]) -> None:
    for _ in range(SOURCE_PORTS_EACH):
        try:
            sock.bind(("0.0.0.0", next(ports)))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, "no free source port")


@dataclass
class Requests:
    seconds: list[float]
    failures: list[str]


def latencies(netns: str, addresses: list[tuple[str, int]], requests: int,
              source_ports: dict[tuple[str, int], Iterator[int]]) -> list[Requests]:
    """Each address's requests, the addresses taken in turns, after a warm-up. Each address gets source
    ports of its own: a direct connection reusing the port of a Service connection to the same pod just
    before would meet that connection's conntrack entry (its reply tuple) and be dropped, which is the
    kernel's answer to a benchmark's pattern, not a figure of the path. source_ports carries each
    source's cycle from call to call, so that a port comes round again only after all the others."""
    got = [Requests([], []) for _ in addresses]
    ports = [source_ports.setdefault((netns, i), cycle(range(SOURCE_PORT_BASE + i * SOURCE_PORTS_EACH,
                                                             SOURCE_PORT_BASE + (i + 1) * SOURCE_PORTS_EACH)))
             for i in range(len(addresses))]
    with entered(netns):
        for address, own in zip(addresses, ports):
            for _ in range(5):
                one_request(address, own)
        for _ in range(requests):
            for address, own, requested in zip(addresses, ports, got):
                result = one_request(address, own)
                if isinstance(result, str):
                    requested.failures.append(result)
                else:
                    requested.seconds.append(result)
    for address, requested in zip(addresses, got):
        if not requested.seconds:
            raise KproxyError(f"every request to {address[0]}:{address[1]} failed: {requested.failures[0]}")
    return got


def steps(plan: Plan) -> int:
    return 1 + len(plan.modes) * (len(plan.sizes) * (1 + plan.repeats) + plan.repeats)


PATHS = (("pod", "same-node", "clusterip"), ("pod", "cross-node", "clusterip"),
         ("external", "same-node", "nodeport"), ("external", "cross-node", "nodeport"))


def measure(plan: Plan, step: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """The document's programming, latency and throughput entries, and notes on failed requests."""
    out: dict[str, list[Any]] = {"programming": [], "latency": [], "throughput": [], "notes": []}
    reasons: dict[tuple[Any, ...], str] = {}  # the first failure of each path, for the run's notes
    stopped: list[str] = []  # modes that could not hold a size (e.g. userspace past its port range)
    source_ports: dict[tuple[str, int], Iterator[int]] = {}
    generation = 0
    with labs(plan, step) as benched:
        fillers = 0
        for n in plan.sizes:
            wanted = max(0, n - MEASURED_SERVICES)  # zz-same, zz-cross, zz-programmed count too
            for mode, lab in list(benched.items()):
                step(f"data plane: {mode}, {n} Services applied")
                try:
                    settled(lab.cluster, [filler(i) for i in range(fillers, wanted)])
                except SyncFailed as exc:
                    stopped.append(f"data plane, {mode}: not measured from {n} Services on: {exc}")
                    del benched[mode]
            fillers = max(fillers, wanted)
            changes: dict[str, list[float]] = {mode: [] for mode in plan.modes}
            samples: dict[str, dict[tuple[str, str, str], dict[str, list[float]]]] = {
                mode: {p: {"p50": [], "p99": [], "base50": [], "base99": []} for p in PATHS} for mode in plan.modes}
            failed = {mode: {p: [0, 0] for p in PATHS} for mode in plan.modes}  # through the Service, direct
            for repeat in range(plan.repeats):
                for mode, lab in benched.items():
                    step(f"data plane: {mode}, {n} Services, repetition {repeat + 1}/{plan.repeats}")
                    for _ in range(plan.changes):
                        generation += 1
                        started = time.monotonic()
                        settled(lab.cluster, [programmed_change(generation)])
                        changes[mode].append(time.monotonic() - started)
                    t = lab.targets
                    for source, netns, via in (("pod", t.client, "clusterip"), ("external", t.external, "nodeport")):
                        for where in ("same", "cross"):
                            service = ((t.cluster_ip[where], 80) if via == "clusterip"
                                       else (t.node1_ip, t.node_port[where]))
                            direct, proxied = latencies(netns, [(t.pod_ip[where], HTTP_PORT), service],
                                                        plan.requests, source_ports)
                            path = (source, f"{where}-node", via)
                            got = samples[mode][path]
                            got["p50"].append(percentile(proxied.seconds, 0.5) * 1e3)
                            got["p99"].append(percentile(proxied.seconds, 0.99) * 1e3)
                            got["base50"].append(percentile(direct.seconds, 0.5) * 1e3)
                            got["base99"].append(percentile(direct.seconds, 0.99) * 1e3)
                            failed[mode][path][0] += len(proxied.failures)
                            failed[mode][path][1] += len(direct.failures)
                            for failure in proxied.failures + direct.failures:
                                reasons.setdefault((mode, n, *path), failure)
            for mode in benched:
                delays = changes[mode]
                out["programming"].append({"mode": mode, "services": n, "changes": len(delays),
                                           "p50_s": percentile(delays, 0.5), "p99_s": percentile(delays, 0.99),
                                           "max_s": max(delays)})
                for (source, locality, via), got in samples[mode].items():
                    p50, base = spread(got["p50"]), spread(got["base50"])
                    out["latency"].append({"mode": mode, "services": n, "source": source, "locality": locality,
                                           "path": via, "p50_ms": p50, "p99_ms": spread(got["p99"]),
                                           "baseline_p50_ms": base, "baseline_p99_ms": spread(got["base99"]),
                                           "ratio_p50": ratio(p50, base),
                                           "failures": failed[mode][(source, locality, via)][0],
                                           "baseline_failures": failed[mode][(source, locality, via)][1]})
            if n == plan.sizes[0]:
                out["throughput"] = throughput(plan, benched, step)
    out["notes"] = stopped + [f"{mode}, {n} Services, {source} {locality} {via}: requests failed, the first with {reason} "
                    f"(latency over the answered ones; counts in failures / baseline_failures)"
                    for (mode, n, source, locality, via), reason in reasons.items()]
    return out


def throughput(plan: Plan, benched: dict[str, BenchLab], step: Callable[[str], None]) -> list[dict[str, Any]]:
    runs: dict[str, dict[str, list[float]]] = {mode: {"proxied": [], "direct": []} for mode in plan.modes}
    for repeat in range(plan.repeats):
        for mode, lab in benched.items():
            step(f"data plane: {mode}, iperf3, repetition {repeat + 1}/{plan.repeats}")
            name, t = lab.cluster.state.name, lab.targets
            runs[mode]["direct"].append(iperf(name, "client", t.pod_ip["cross"], plan.iperf_seconds)[0])
            runs[mode]["proxied"].append(iperf(name, "client", t.cluster_ip["cross"], plan.iperf_seconds)[0])
    rows = []
    for mode in benched:
        proxied, direct = spread(runs[mode]["proxied"]), spread(runs[mode]["direct"])
        rows.append({"mode": mode, "gbit_per_s": proxied, "baseline_gbit_per_s": direct, "ratio": ratio(proxied, direct)})
    return rows
