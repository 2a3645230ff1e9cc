"""Benchmark: the userspace proxy against going straight to the pod, in one run.

    sudo scripts/bench-userspace [--copy splice,copy] [--seconds 5] [--requests 2000]

For each copy strategy of the proxy (splice through a pipe, or recv/send
through one buffer) a fresh lab (2 nodes, vxlan, `--mode userspace`, the
strategy given as `--mode-opt copy=...`) with a client pod and
a server pod on node1 and another server pod on node2, one ClusterIP Service
per server pod. From the client pod:

  throughput  iperf3, one TCP stream, client -> server, same node and cross
              node, to the pod IP (direct) and to the ClusterIP (proxied),
              alternated --rounds times, median of each
  latency     short TCP request/response against the pod workload (:8080):
              connect, GET, read the answer until close; direct and proxied
              requests interleaved one by one; p50/p99 of N each

The lab is always taken down, the iperf3 servers stopped by their PID.
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
from pathlib import Path
from typing import Any

import yaml

from cni.netns import entered
from kproxy.bench import require_root
from kproxy.lab.processes import AGENT, running_pid
from kproxy.lab.state import lab_dir, ns_path

KPROXY = str(Path(sys.executable).parent / "kproxy")
IPERF_PORT = 5201
HTTP_PORT = 8080

TOPOLOGY = {
    "overlay": "vxlan",
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "pods": [
        {"name": "client", "labels": {"app": "client"}, "nodeName": "node1"},
        {"name": "srv-same", "labels": {"app": "srv-same"}, "nodeName": "node1"},
        {"name": "srv-cross", "labels": {"app": "srv-cross"}, "nodeName": "node2"},
    ],
}


def services() -> str:
    docs = []
    for name in ("srv-same", "srv-cross"):
        docs.append({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                     "spec": {"selector": {"app": name},
                              "ports": [{"name": "iperf", "port": IPERF_PORT, "targetPort": IPERF_PORT},
                                        {"name": "http", "port": 80, "targetPort": HTTP_PORT}]}})
    return yaml.safe_dump_all(docs)


def kproxy(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([KPROXY, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"kproxy {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU time of a process (all its threads)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def iperf(client_ns: str, ip: str, seconds: float, proxy_pid: int | None = None,
          cpu: list[float] | None = None) -> float:
    """Gbit/s received, one stream; with proxy_pid, its CPU seconds per GB moved go to cpu."""
    before = cpu_seconds(proxy_pid)
    done = subprocess.run(["nsenter", f"--net={client_ns}", "--", "iperf3", "-c", ip, "-p", str(IPERF_PORT),
                           "-t", str(seconds), "-J"], capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"iperf3 to {ip} failed: {done.stdout[-300:]} {done.stderr[-300:]}")
    result = json.loads(done.stdout)
    if "error" in result or "sum_received" not in result.get("end", {}):
        raise RuntimeError(f"iperf3 to {ip}: {result.get('error', 'no result')}")
    if proxy_pid is not None and cpu is not None:
        moved = float(result["end"]["sum_received"]["bytes"]) / 1e9
        cpu.append((cpu_seconds(proxy_pid) - before) / moved)
    return float(result["end"]["sum_received"]["bits_per_second"]) / 1e9


def one_request(client_ns: str, ip: str, port: int) -> float:
    """Seconds for one short request: connect, send a GET, read the answer until the server closes."""
    with entered(client_ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    started = time.perf_counter()
    with sock:
        sock.settimeout(5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.connect((ip, port))
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        got = b""
        while True:
            data = sock.recv(4096)
            if not data:
                break
            got += data
    took = time.perf_counter() - started
    if b"pod=" not in got:
        raise RuntimeError(f"unexpected answer from {ip}:{port}: {got[:80]!r}")
    return took


def request_latencies(client_ns: str, targets: list[tuple[str, int]], n: int) -> list[list[float]]:
    """n short requests to each target, interleaved (direct, proxied, direct, ...) so that both see
    the same machine; the first 20 of each are a warm-up and left out."""
    out: list[list[float]] = [[] for _ in targets]
    for i in range(n + 20):
        for k, (ip, port) in enumerate(targets):
            took = one_request(client_ns, ip, port)
            if i >= 20:
                out[k].append(took)
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_lab(copy: str, seconds: float, requests: int, rounds: int) -> list[dict[str, Any]]:
    name = f"kpus{os.getpid() % 10000}{copy[0]}"
    rows: list[dict[str, Any]] = []
    servers: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        topo = Path(tmp) / "lab.yaml"
        topo.write_text(yaml.safe_dump({"name": name, **TOPOLOGY}))
        manifests = Path(tmp) / "svc.yaml"
        manifests.write_text(services())
        try:
            kproxy("lab", "up", "-f", str(topo), "--name", name, "--mode", "userspace", "--mode-opt", f"copy={copy}")
            for pod in ("srv-same", "srv-cross"):
                servers.append(subprocess.Popen(["nsenter", f"--net={ns_path(name, pod)}", "--", "iperf3", "-s",
                                                 "-p", str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
            time.sleep(0.5)
            # After the servers: the lab's workload also opens the Services' target ports it finds free.
            kproxy("apply", "--lab", name, "-f", str(manifests))
            info = json.loads(kproxy("lab", "status", name, "-o", "json"))
            pod_ip = {p["name"]: p["ip"] for p in info["pods"]}
            svcs = {s["metadata"]["name"]: s["spec"]["clusterIP"]
                    for s in json.loads(kproxy("get", "svc", "--lab", name, "-o", "json"))["items"]}
            client = ns_path(name, "client")
            for where, pod in (("same node", "srv-same"), ("cross node", "srv-cross")):
                row: dict[str, Any] = {"copy": copy, "where": where}
                direct_runs, proxy_runs, cpu = [], [], []
                agent = running_pid(AGENT, lab_dir(name), "node1")  # the client's node proxies
                for _ in range(rounds):  # alternated, so that both see the same machine; median kept
                    direct_runs.append(iperf(client, pod_ip[pod], seconds))
                    proxy_runs.append(iperf(client, svcs[pod], seconds, agent, cpu))
                row["direct_gbps"] = statistics.median(direct_runs)
                row["proxy_gbps"] = statistics.median(proxy_runs)
                row["cpu_per_gb"] = statistics.median(cpu)
                direct, proxied = request_latencies(client, [(pod_ip[pod], HTTP_PORT), (svcs[pod], 80)], requests)
                row.update(direct_p50=pct(direct, 0.5), direct_p99=pct(direct, 0.99),
                           proxy_p50=pct(proxied, 0.5), proxy_p99=pct(proxied, 0.99),
                           direct_mean=statistics.mean(direct), proxy_mean=statistics.mean(proxied))
                rows.append(row)
                print_row(row)
            shown = kproxy("rules", "--lab", name, "node1")
            print(shown[shown.find("# listeners"):], flush=True)
        finally:
            for proc in servers:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            down = subprocess.run([KPROXY, "lab", "down", name], capture_output=True, text=True)
            if down.returncode != 0:
                print(f"bench-userspace: kproxy lab down {name} failed: {down.stderr.strip()}", file=sys.stderr)
    return rows


HEADER = (f"{'copy':<7} {'path':<11} {'direct Gbit/s':>13} {'proxy Gbit/s':>12} {'ratio':>6} {'proxy CPU s/GB':>14}   "
          f"{'direct p50/p99 ms':>18} {'proxy p50/p99 ms':>17} {'p50 ratio':>9}")


def print_row(row: dict[str, Any]) -> None:
    print(f"{row['copy']:<7} {row['where']:<11} {row['direct_gbps']:13.2f} {row['proxy_gbps']:12.2f} "
          f"{row['proxy_gbps'] / row['direct_gbps']:6.0%} {row['cpu_per_gb']:14.3f}   "
          f"{row['direct_p50'] * 1e3:8.3f}/{row['direct_p99'] * 1e3:<9.3f} "
          f"{row['proxy_p50'] * 1e3:7.3f}/{row['proxy_p99'] * 1e3:<9.3f} "
          f"{row['proxy_p50'] / row['direct_p50']:8.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-userspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copy", default="splice,copy", help="copy strategies to measure (comma separated)")
    parser.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per measurement")
    parser.add_argument("--requests", type=int, default=2000, help="short requests per latency measurement")
    parser.add_argument("--rounds", type=int, default=3, help="iperf3 runs per path (median kept)")
    args = parser.parse_args(argv)
    if not require_root("bench-userspace"):
        return 1
    rows = []
    print(HEADER, flush=True)
    for copy in args.copy.split(","):
        rows += run_lab(copy.strip(), args.seconds, args.requests, args.rounds)
    print("\nsummary")
    print(HEADER)
    for row in rows:
        print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
