"""The overlays side by side, cross node: TCP throughput, round trip, and CPU per GB.

For each overlay a lab of two nodes with one pod each (--no-dns), all up at once;
then, repetition by repetition, every overlay in turn (so the machine's noise
spreads evenly): iperf3 from the pod on node1 to the pod on node2 (TCP, one
stream) and 200 pings for the round trip. CPU is the machine's busy time during
the iperf3 run (/proc/stat: the kernel's encapsulation, softirqs and, for udp,
the copiers) per GB moved. host-gw, no encapsulation at all, is the ceiling the
others are held against.
"""

from __future__ import annotations

import subprocess
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable

from kproxy.bench.labs import iperf, start_iperf_server, up_all
from kproxy.bench.machine import busy_cpu_seconds
from kproxy.bench.stats import ratio, spread
from kproxy.lab.build import status as lab_status
from kproxy.lab.state import ns_path

CEILING = "host-gw"
TOPOLOGY = {"nodes": [{"name": "node1"}, {"name": "node2"}],
            "pods": [{"name": "sender", "nodeName": "node1"}, {"name": "receiver", "nodeName": "node2"}]}


@dataclass(frozen=True)
class Plan:
    overlays: tuple[str, ...]
    repeats: int
    iperf_seconds: float
    lab_prefix: str = "bench-ov-"


def in_ns(lab: str, member: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={ns_path(lab, member)}", "--", *argv], capture_output=True,
                          text=True, check=check)


def one_run(lab: str, target: str, seconds: float) -> dict[str, float]:
    busy = busy_cpu_seconds()
    gbit, moved = iperf(lab, "sender", target, seconds)
    busy = busy_cpu_seconds() - busy
    ping = in_ns(lab, "sender", "ping", "-q", "-c", "200", "-i", "0.002", target).stdout
    rtt = ping.strip().splitlines()[-1].split("=")[1].split("/")  # min/avg/max/mdev
    return {"gbit": gbit, "rtt": float(rtt[1]), "cpu": busy / (moved / 1e9)}


def lab_names(plan: Plan) -> dict[str, str]:
    return {overlay: f"{plan.lab_prefix}{overlay}" for overlay in plan.overlays}


def steps(plan: Plan) -> int:
    return 1 + len(plan.overlays) * plan.repeats


def measure(plan: Plan, step: Callable[[str], None]) -> list[dict[str, Any]]:
    """The document's overlays entries; vs_host_gw only where host-gw ran too."""
    labs = lab_names(plan)
    runs: dict[str, list[dict[str, float]]] = {overlay: [] for overlay in plan.overlays}
    with ExitStack() as downs:
        step(f"overlays: lab up {', '.join(labs.values())}")
        up_all(TOPOLOGY, {lab: ["--overlay", overlay] for overlay, lab in labs.items()}, downs)
        for lab in labs.values():
            start_iperf_server(lab, "receiver", downs)
        targets = {overlay: next(p["ip"] for p in lab_status(lab)["pods"] if p["name"] == "receiver")
                   for overlay, lab in labs.items()}
        for repeat in range(plan.repeats):
            for overlay, lab in labs.items():
                step(f"overlays: {overlay}, repetition {repeat + 1}/{plan.repeats}")
                runs[overlay].append(one_run(lab, targets[overlay], plan.iperf_seconds))
    rates = {overlay: spread([r["gbit"] for r in got]) for overlay, got in runs.items()}
    return [{"overlay": overlay, "gbit_per_s": rates[overlay], "rtt_ms": spread([r["rtt"] for r in got]),
             "cpu_s_per_gb": spread([r["cpu"] for r in got]),
             "vs_host_gw": ratio(rates[overlay], rates[CEILING]) if CEILING in rates else None}
            for overlay, got in runs.items()]
