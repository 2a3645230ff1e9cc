"""Benchmark: the overlays side by side, cross node: TCP throughput, latency, and CPU per GB.

    sudo scripts/bench-overlays [--seconds 5] [--runs 3]

For each overlay (udp, vxlan, host-gw) a lab of two nodes with one pod each
(--no-dns), then, interleaved over the runs so the machine's noise spreads
evenly: iperf3 from the pod on node1 to the pod on node2 (TCP, one stream),
and 200 pings for the round trip. CPU is the machine's busy time during the
iperf3 run (/proc/stat: the kernel's encapsulation, softirqs and, for udp,
the copiers) per GB moved. Figures are min/median/max over the runs, and
each overlay's throughput is also given as a ratio to host-gw's median, the
ceiling (no encapsulation at all).
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

import yaml

from kproxy.bench import require_root
from kproxy.lab.state import ns_path
from kproxy.lab.topology import OVERLAYS

KPROXY = str(Path(sys.executable).parent / "kproxy")
TOPOLOGY = {"nodes": [{"name": "node1"}, {"name": "node2"}],
            "pods": [{"name": "sender", "nodeName": "node1"}, {"name": "receiver", "nodeName": "node2"}]}


def cpu_busy_seconds() -> float:
    """The machine's non-idle CPU time so far (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def in_ns(lab: str, member: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={ns_path(lab, member)}", "--", *argv], capture_output=True,
                          text=True, check=check)


def pod_ip(lab: str, pod: str) -> str:
    info = json.loads(subprocess.run([KPROXY, "lab", "status", lab, "-o", "json"], check=True,
                                     capture_output=True, text=True).stdout)
    return next(p["ip"] for p in info["pods"] if p["name"] == pod)


def one_run(lab: str, seconds: float) -> dict[str, float]:
    target = pod_ip(lab, "receiver")
    # One test per server (-1), started once the server listens.
    server = subprocess.Popen(["nsenter", f"--net={ns_path(lab, 'receiver')}", "--", "iperf3", "-s", "-1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = None
    try:
        deadline = time.monotonic() + 10
        while not in_ns(lab, "receiver", "ss", "-Hltn", "sport", "=", ":5201").stdout.strip():
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError(f"iperf3 server in lab {lab} did not listen")
            time.sleep(0.02)
        busy = cpu_busy_seconds()
        done = in_ns(lab, "sender", "iperf3", "-c", target, "-t", str(seconds), "-J", check=False)
        busy = cpu_busy_seconds() - busy
        result = json.loads(done.stdout) if done.stdout.strip() else {}
        if done.returncode == 0 and "sum_received" in result.get("end", {}):
            out = result
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
    if out is None:
        raise RuntimeError(f"iperf3 to {target} in lab {lab} did not run")
    moved = out["end"]["sum_received"]["bytes"]
    ping = in_ns(lab, "sender", "ping", "-q", "-c", "200", "-i", "0.002", target).stdout
    rtt = ping.strip().splitlines()[-1].split("=")[1].split("/")  # min/avg/max/mdev
    return {"gbit_per_s": out["end"]["sum_received"]["bits_per_second"] / 1e9,
            "rtt_avg_ms": float(rtt[1]), "cpu_s_per_gb": busy / (moved / 1e9)}


def summary(values: list[float]) -> str:
    return f"{min(values):.3g} / {statistics.median(values):.3g} / {max(values):.3g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-overlays", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per run (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="runs per overlay, interleaved (default 3)")
    args = parser.parse_args(argv)
    if not require_root("bench-overlays"):
        return 1
    labs = {overlay: f"bov-{overlay}" for overlay in OVERLAYS}
    results: dict[str, list[dict[str, float]]] = {overlay: [] for overlay in OVERLAYS}
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "lab.yaml"
        topology.write_text(yaml.safe_dump(TOPOLOGY))
        try:
            for overlay, lab in labs.items():
                subprocess.run([KPROXY, "lab", "up", "-f", str(topology), "--name", lab, "--overlay", overlay,
                                "--no-dns"], check=True, stdout=subprocess.DEVNULL)
            for _ in range(args.runs):
                for overlay, lab in labs.items():
                    results[overlay].append(one_run(lab, args.seconds))
        finally:
            for lab in labs.values():
                subprocess.run([KPROXY, "lab", "down", lab], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ceiling = statistics.median(r["gbit_per_s"] for r in results["host-gw"])
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"], capture_output=True,
                         text=True).stdout.strip()
    print(f"cross-node TCP, one stream, {args.runs} runs of {args.seconds:g} s, min / median / max "
          f"({cpu}, {os.cpu_count()} CPUs, kernel {os.uname().release}, on this host)")
    print(f"{'overlay':8} {'Gbit/s':>22} {'vs host-gw':>10} {'RTT avg ms':>22} {'CPU s per GB':>22}")
    for overlay in OVERLAYS:
        runs = results[overlay]
        rate = [r["gbit_per_s"] for r in runs]
        print(f"{overlay:8} {summary(rate):>22} {statistics.median(rate) / ceiling:>10.2f} "
              f"{summary([r['rtt_avg_ms'] for r in runs]):>22} {summary([r['cpu_s_per_gb'] for r in runs]):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
