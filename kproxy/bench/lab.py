"""Benchmark: how long `kproxy lab up` / `down` take, and what a lab costs in memory.

    sudo scripts/bench-lab [--pods 200] [--runs 3]

Runs the real CLI (interpreter start included), on the default 3-node lab and
on one node with N pods. Memory is the growth of the kernel's own memory
(slab, stacks, page tables, per-CPU: what namespaces, links and sockets cost)
while the lab is up, plus the RSS of the lab's processes (workloads, agents, supervisor).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from kproxy.bench import require_root
from kproxy.lab.processes import DAEMONS, running_pid
from kproxy.lab.state import lab_dir
from kproxy.lab.supervisor import supervisor_pid

KPROXY = str(Path(sys.executable).parent / "kproxy")


KERNEL_FIELDS = ("Slab", "KernelStack", "PageTables", "Percpu")


def kernel_kib() -> int:
    """Kernel memory that namespaces, links and sockets use (page cache left out: it is noise)."""
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        field, _, rest = line.partition(":")
        if field in KERNEL_FIELDS:
            total += int(rest.split()[0])
    return total


def lab_rss_kib(name: str, nodes: list[str]) -> int:
    pids = [running_pid(daemon, lab_dir(name), node) for daemon in DAEMONS for node in nodes]
    total = 0
    for pid in [*pids, supervisor_pid(lab_dir(name))]:
        if pid:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def timed(*argv: str) -> float:
    started = time.monotonic()
    subprocess.run([KPROXY, *argv], check=True, stdout=subprocess.DEVNULL)
    return time.monotonic() - started


def measure(label: str, name: str, up_args: list[str], nodes: list[str], runs: int) -> dict[str, float]:
    ups, downs, mems, rsss = [], [], [], []
    for _ in range(runs):
        before = kernel_kib()
        try:
            ups.append(timed("lab", "up", "--name", name, *up_args))
            time.sleep(0.5)
            mems.append((kernel_kib() - before) / 1024)
            rsss.append(lab_rss_kib(name, nodes) / 1024)
        finally:
            downs.append(timed("lab", "down", name))
    row = {"up": statistics.median(ups), "down": statistics.median(downs),
           "mem": statistics.median(mems), "rss": statistics.median(rsss)}
    print(f"{label:<28} up {row['up']:6.2f} s   down {row['down']:5.2f} s   "
          f"kernel +{row['mem']:5.0f} MiB   lab processes RSS {row['rss']:5.0f} MiB   "
          f"(total {row['mem'] + row['rss']:5.0f} MiB)", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=200, help="pods on the single-node lab (default 200)")
    parser.add_argument("--runs", type=int, default=3, help="runs per case; medians are printed (default 3)")
    args = parser.parse_args(argv)
    if not require_root("bench-lab"):
        return 1
    prefix = f"kpbench{os.getpid() % 10000}"
    print(f"kproxy lab benchmark: {os.cpu_count()} CPUs, medians of {args.runs} runs")
    measure("default lab (3 nodes, 5 pods)", f"{prefix}a", [], ["node1", "node2", "node3"], args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        topology = Path(tmp) / "big.yaml"
        topology.write_text(yaml.safe_dump({"nodes": ["node1"], "pods": [{"name": f"p{i}"} for i in range(args.pods)]}))
        measure(f"1 node, {args.pods} pods", f"{prefix}b", ["-f", str(topology)], ["node1"], args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
