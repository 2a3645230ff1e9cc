"""Benchmark: cluster DNS under dnsperf, from a pod, through the kube-dns Service.

    sudo scripts/bench-dns [--services 10000] [--mode iptables] [--seconds 10] [--rate 2000]

Brings up its own lab (the default topology, --mode), applies --services
Services, then runs dnsperf in the `client` pod against 10.96.0.10 (the kube-dns
ClusterIP: every query crosses the node's DNAT and conntrack to one of the two
coredns pods), asking A records of the Services' names in turn:

  max rate      dnsperf unthrottled (-q 100 outstanding): queries per second, and
                queries lost (sent without an answer within dnsperf's 5 s)
  at --rate     dnsperf -Q RATE -v: the latency of every answer, p50 / p99 / max
  server RSS    each DNS server's resident memory with the Services loaded

It prints the machine it ran on; docs/dns.md has the figures and how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kproxy.bench import require_root
from kproxy.controllers import DNS_SERVICE_IP
from kproxy.lab.processes import DNS, nodes_with, running_pid
from kproxy.lab.state import lab_dir
from kproxy.proxy import DEFAULT_MODE, MODES

LAB = "kpbench-dns"
KPROXY = [sys.executable, "-m", "kproxy.cli"]


def kproxy(*args: str) -> str:
    done = subprocess.run([*KPROXY, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"kproxy {' '.join(args[:3])}: {done.stderr.strip()}")
    return done.stdout


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} CPUs, kernel {platform.release()}"


def services_manifest(count: int) -> str:
    items = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": f"svc-{i}"},
              "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}}
             for i in range(count)]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def dnsperf(queries: Path, seconds: int, rate: int = 0, verbose: bool = False) -> str:
    argv = ["dnsperf", "-s", str(DNS_SERVICE_IP), "-d", str(queries), "-l", str(seconds), "-q", "100"]
    if rate:
        argv += ["-Q", str(rate)]
    if verbose:
        argv.append("-v")
    done = subprocess.run([*KPROXY, "exec", "--lab", LAB, "client", "--", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf: {done.stderr.strip() or done.stdout[-300:]}")
    return done.stdout


def summary(out: str) -> dict[str, float]:
    def number(label: str) -> float:
        found = re.search(rf"{label}:\s+([\d.]+)", out)
        if not found:
            raise RuntimeError(f"dnsperf printed no {label!r}")
        return float(found.group(1))
    return {"sent": number("Queries sent"), "completed": number("Queries completed"),
            "lost": number("Queries lost"), "qps": number("Queries per second")}


def latencies(out: str) -> list[float]:
    """dnsperf -v: one line per answer, its latency in seconds last."""
    return sorted(float(line.split()[-1]) for line in out.splitlines()
                  if line.startswith("> ") and re.fullmatch(r"[\d.]+", line.split()[-1]))


def server_rss_mib() -> list[float]:
    out = []
    for member in nodes_with(DNS, lab_dir(LAB)):
        pid = running_pid(DNS, lab_dir(LAB), member)
        if pid is not None:
            rss = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
            out.append(int(rss.split()[1]) / 1024)
    return out


def run(services: int, mode: str, seconds: int, rate: int) -> dict[str, Any]:
    kproxy("lab", "up", "--name", LAB, "--mode", mode)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "services.json"
            manifest.write_text(services_manifest(services))
            started = time.monotonic()
            kproxy("apply", "--lab", LAB, "-f", str(manifest))
            loaded = time.monotonic() - started
            queries = Path(tmp) / "queries.txt"
            queries.write_text("".join(f"svc-{i % services}.default.svc.cluster.local A\n"
                                       for i in range(min(services, 5000))))
            full = summary(dnsperf(queries, seconds))
            paced_out = dnsperf(queries, seconds, rate=rate, verbose=True)
            paced = summary(paced_out)
            times = latencies(paced_out)
        return {"machine": machine(), "mode": mode, "services": services, "apply_seconds": round(loaded, 1),
                "max_rate": full, "paced": paced | {
                    "rate": rate, "p50_ms": 1000 * statistics.median(times),
                    "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))], "max_ms": 1000 * times[-1]},
                "server_rss_mib": server_rss_mib()}
    finally:
        kproxy("lab", "down", LAB)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-dns", description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=2000, help="queries per second of the latency run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if not require_root("bench-dns"):
        return 1
    try:
        result = run(args.services, args.mode, args.seconds, args.rate)
    except RuntimeError as exc:
        print(f"bench-dns: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    full, paced = result["max_rate"], result["paced"]
    print(f"machine: {result['machine']}; {result['mode']} mode, {result['services']} Services "
          f"(applied in {result['apply_seconds']} s)")
    print(f"max rate:  {full['qps']:.0f} queries/s, {full['completed']:.0f} of {full['sent']:.0f} answered, "
          f"{full['lost']:.0f} lost")
    print(f"at {paced['rate']}/s:  p50 {paced['p50_ms']:.2f} ms, p99 {paced['p99_ms']:.2f} ms, "
          f"max {paced['max_ms']:.2f} ms, {paced['lost']:.0f} lost")
    print("server RSS: " + ", ".join(f"{rss:.0f} MiB" for rss in result["server_rss_mib"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
