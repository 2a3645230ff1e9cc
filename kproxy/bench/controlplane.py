"""The control plane, per mode and per number of Services, through the real agent.

For each size N (N ClusterIP Services, --endpoints each) the store is written once;
then, in each repetition, every mode in turn (so that all see the same machine) gets
a fresh node namespace and its own agent process, which starts with a full sync:

  full sync        the agent's first sync of the N Services, as it times it
                   (kube-proxy's kubeproxy_sync_proxy_rules_duration_seconds)
  load alone       the kernel's own tool loading what the mode's first sync writes, into
                   a fresh namespace, nothing else: the same-run baseline of the full sync
                   (iptables: iptables-nft-restore, nftables: nft -f; modes that write no
                   such text, userspace and IPVS, are held against iptables mode's restore)
  one-change sync  one EndpointSlice replaced in the store: the agent's sync of it
  agent CPU        the agent's CPU seconds from its start to the full sync done
  agent peak RSS   the agent's peak memory (VmHWM) after the full sync and the changes
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from cni.netns import entered
from kproxy.bench import SYNC_TIMEOUT, SyncFailed
from kproxy.bench.machine import cpu_seconds, peak_rss_mib
from kproxy.bench.stats import spread
from kproxy.controllers import SERVICE_CIDR
from kproxy.k8sform import metadata, service_object, service_port
from kproxy.lab.processes import AGENT, log_tail, start, stop
from kproxy.proxy import DEFAULT_MODE, mode as proxy_mode
from kproxy.proxy.source import TRIGGER_TIME_ANNOTATION, StateTracker, node_info
from kproxy.store import open_store

NODE = "node1"
NODE_IP = "172.18.0.2"
CLUSTER_CIDR = "10.244.0.0/16"


@dataclass(frozen=True)
class Plan:
    modes: tuple[str, ...]
    sizes: tuple[int, ...]
    repeats: int
    changes: int  # one-endpoint changes per repetition
    endpoints: int = 2
    prefix: str = "kp_bench-cp_"  # namespaces of ours, with a lab-like prefix


def cluster_ip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def service(i: int) -> dict[str, Any]:
    return service_object(metadata(f"svc-{i}", "bench"), [service_port(80, 8080, name="http")],
                          cluster_ip=cluster_ip(i), selector={"app": f"a{i}"})


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


def wait_version(lab_dir: Path, version: int, pid: int, poll: float) -> dict[str, Any]:
    """The agent's status once it has synced version; SyncFailed if it failed to, or exited."""
    deadline = time.monotonic() + SYNC_TIMEOUT
    while time.monotonic() < deadline:
        status = open_store(lab_dir).reports().get(NODE, {})
        if status.get("version", 0) >= version:
            if not status.get("ok"):
                raise SyncFailed(f"the agent's sync failed: {status.get('error')}")
            return status
        if exited(pid):
            raise SyncFailed(f"the agent exited: {log_tail(AGENT.logfile(lab_dir, NODE))}")
        time.sleep(poll)
    raise SyncFailed(f"the agent did not sync version {version} within {SYNC_TIMEOUT:.0f} s")


def exited(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid  # our child: reaped here
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()


def netns(name: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", *argv, name], check=True, capture_output=True)


def load_alone(objects: dict[str, Any], mode: str, ns_name: str) -> float:
    """The kernel's tool loading the mode's first sync of objects into a fresh namespace."""
    chosen = proxy_mode(mode)
    if chosen.load_alone is None:
        chosen = proxy_mode(DEFAULT_MODE)
    assert chosen.load_alone is not None
    state = StateTracker().update(objects)
    node = node_info(node_object(), CLUSTER_CIDR, str(SERVICE_CIDR))
    netns(ns_name, "add")
    try:
        with entered(f"/var/run/netns/{ns_name}"):
            started = time.monotonic()
            chosen.load_alone(state, node, chosen.options_of({}))
            return time.monotonic() - started
    finally:
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)


@contextmanager
def agent_on_fresh_node(lab_dir: Path, ns_name: str, mode: str) -> Iterator[int]:
    """The agent (its pid) on a new node namespace; it starts with a full sync of the store."""
    netns(ns_name, "add")
    try:
        yield start(AGENT, lab_dir, NODE, f"/var/run/netns/{ns_name}",
                    ["--lab-dir", str(lab_dir), "--node", NODE, "--mode", mode, "--cluster-cidr", CLUSTER_CIDR])
    finally:
        stop(AGENT, lab_dir, NODE)
        open_store(lab_dir).delete_report(NODE)  # the next agent reports afresh
        subprocess.run(["ip", "netns", "del", ns_name], capture_output=True)


def steps(plan: Plan) -> int:
    return len(plan.sizes) * plan.repeats * len(plan.modes)


def measure(plan: Plan, step: Callable[[str], None]) -> dict[str, list[Any]]:
    """The document's control_plane entries (one per mode and size), and notes on the modes that
    could not hold a size (e.g. userspace's listeners past the ephemeral port range): those are
    not measured at that size or above."""
    rows: list[Any] = []
    stopped: dict[str, str] = {}  # mode -> why it stopped
    generation = 0
    for n in plan.sizes:
        samples: dict[str, dict[str, list[float]]] = {
            mode: {"full": [], "alone": [], "change": [], "cpu": [], "rss": []} for mode in plan.modes}
        with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
            lab_dir = Path(tmp)
            store = open_store(lab_dir)
            objects: dict[str, Any] = {f"Node/{NODE}": node_object()}
            for i in range(n):
                objects[f"Service/bench/svc-{i}"] = service(i)
                objects[f"EndpointSlice/bench/svc-{i}"] = endpoint_slice(i, 0, plan.endpoints)
            store.write(objects)
            for repeat in range(plan.repeats):
                for mode in (m for m in plan.modes if m not in stopped):
                    step(f"control plane: {mode}, {n} Services, repetition {repeat + 1}/{plan.repeats}")
                    got = samples[mode]
                    try:
                        with agent_on_fresh_node(lab_dir, f"{plan.prefix}{mode}", mode) as pid:
                            status = wait_version(lab_dir, store.version(), pid, poll=0.02)  # the agent times itself
                            got["full"].append(status["seconds"])
                            got["cpu"].append(cpu_seconds(pid))
                            for _ in range(plan.changes):
                                generation += 1
                                i = generation * 7919 % n
                                version = store.write({f"EndpointSlice/bench/svc-{i}":
                                                       endpoint_slice(i, generation, plan.endpoints)})
                                got["change"].append(wait_version(lab_dir, version, pid, poll=0.001)["seconds"])
                            got["rss"].append(peak_rss_mib(pid))
                    except SyncFailed as exc:
                        stopped[mode] = f"{mode}: not measured from {n} Services on: {exc}"
                        continue
                    got["alone"].append(load_alone(objects, mode, f"{plan.prefix}alone"))
        for mode in (m for m in plan.modes if m not in stopped):
            got = samples[mode]
            rows.append({"mode": mode, "services": n, "endpoints_per_service": plan.endpoints,
                         "full_sync_s": spread(got["full"]), "load_alone_s": spread(got["alone"]),
                         "one_change_sync_s": spread(got["change"]), "agent_cpu_s": spread(got["cpu"]),
                         "agent_peak_rss_mib": spread(got["rss"])})
    return {"control_plane": rows, "notes": [f"control plane, {why}" for why in stopped.values()]}
