"""Benchmark: IPVS mode against iptables mode, in one run on one kernel.

    sudo scripts/bench-ipvs [--sizes 1000,5000,10000] [--latency-sizes 100,10000] [--out FILE.json]

Where this kernel has no IPVS, scripts/bench-ipvs runs this inside the QEMU
guest of the test suite's guest lane (kproxy/guest.py: Debian's kernel under
TCG emulation, so every number is slower than on hardware; the two modes
share that handicap, and the output says where it ran).

For each mode and each size N (N ClusterIP Services, 2 endpoints each, 1 in 4
also a NodePort), in a fresh node namespace, calling the mode's proxier the
way the agent does:
  full sync     the first sync of all N services (seconds)
  one change    the endpoints of one service replaced, then a sync (median of 5)
For latency, a node namespace with a client pod and a server pod (veths), N
services of which one leads to the server: connect + request + answer + close
from the client pod to that ClusterIP, p50 / p99 of many; for iptables the
target service is the last one KUBE-SERVICES scans.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Iterator
from contextlib import contextmanager

from cni.netns import entered, iproute_in
from kproxy.proxy import mode as proxy_mode
from kproxy.proxy.mode import Proxier
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo("node1", "192.168.99.11", "10.244.0.0/16")
PREFIX = f"kpb{os.getpid() % 100000}"
SERVER_IP = "10.244.200.2"
CLIENT_IP = "10.244.201.2"


def state_of(n: int, generation: int = 0, target: int | None = None) -> ProxyState:
    services: list[ServicePort] = []
    endpoints: dict[str, list[Endpoint]] = {}
    for i in range(n):
        ip = f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"
        svc = ServicePort("bench", f"svc-{i:05d}", "http", "TCP", ip, 80,
                          node_port=30000 + i // 4 if i % 4 == 0 and 30000 + i // 4 < 32768 else 0)
        if i == target:
            eps = [Endpoint(SERVER_IP, 8080, "node1")]
        else:
            base = 2 * i + generation * 7
            eps = [Endpoint(f"10.244.{(base + k) // 250 % 200}.{(base + k) % 250 + 2}", 8080, "node2") for k in range(2)]
        services.append(svc)
        endpoints[svc.key] = eps
    return ProxyState(services, endpoints)


def changed(state: ProxyState, which: int, generation: int) -> ProxyState:
    # As the agent's StateTracker hands it over: the same services, a new generation, the changed key.
    svc = state.services[which]
    new = ProxyState(state.services, dict(state.endpoints), generation=state.generation + 1,
                     changed=frozenset({svc.key}))
    new.endpoints[svc.key] = [Endpoint(f"10.244.{210 + generation % 40}.{k + 2}", 8080, "node2") for k in range(2)]
    return new


def ns(name: str) -> str:
    path = f"/var/run/netns/{name}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return path


def ns_del(*names: str) -> None:
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def node_ns(name: str) -> str:
    path = ns(name)
    with iproute_in(path) as ipr:
        ipr.link("add", ifname="eth0", kind="dummy")
        idx = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=idx, address=NODE.ip, prefixlen=24)
        ipr.link("set", index=idx, state="up")
    subprocess.run(["ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True)
    return path


def _proxier(mode: str) -> Proxier:
    chosen = proxy_mode(mode)
    return chosen.make_proxier(NODE, chosen.options_of({}))


def bench_sync(mode: str, n: int, repeats: int = 5) -> dict[str, float]:
    name = f"{PREFIX}-{mode}-{n}"
    path = node_ns(name)
    try:
        with entered(path):
            proxier = _proxier(mode)
            state = state_of(n)
            started = time.perf_counter()
            proxier.sync(state)
            full = time.perf_counter() - started
            ones = []
            for g in range(1, repeats + 1):
                state = changed(state, (n // 2 + g) % n, g)
                started = time.perf_counter()
                proxier.sync(state)
                ones.append(time.perf_counter() - started)
            # A resync with nothing changed, as the agent's tracker hands it over (no key changed).
            state = ProxyState(state.services, state.endpoints, generation=state.generation + 1,
                               changed=frozenset())
            started = time.perf_counter()
            proxier.sync(state)
            nothing = time.perf_counter() - started
            proxier.close()
        return {"full_sync_s": full, "one_change_s": statistics.median(ones), "no_change_s": nothing}
    finally:
        ns_del(name)


@contextmanager
def latency_lab(mode: str, n: int) -> Iterator[tuple[str, str]]:
    node, client, server = f"{PREFIX}-ln", f"{PREFIX}-lc", f"{PREFIX}-ls"
    node_path = node_ns(node)
    client_path, server_path = ns(client), ns(server)
    try:
        for pod_path, veth, gw, ip in ((client_path, "vc", "10.244.201.1", CLIENT_IP),
                                       (server_path, "vs", "10.244.200.1", SERVER_IP)):
            fd = os.open(pod_path, os.O_RDONLY)
            try:
                with iproute_in(node_path) as ipr:
                    ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": fd})
                    idx = ipr.link_lookup(ifname=veth)[0]
                    ipr.addr("add", index=idx, address=gw, prefixlen=24)
                    ipr.link("set", index=idx, state="up")
            finally:
                os.close(fd)
            with iproute_in(pod_path) as ipr:
                idx = ipr.link_lookup(ifname="eth0")[0]
                ipr.addr("add", index=idx, address=ip, prefixlen=24)
                ipr.link("set", index=idx, state="up")
                ipr.route("add", dst="0.0.0.0/0", gateway=gw)
        yield node_path, client_path, server_path
    finally:
        ns_del(client, server, node)


def serve(server_path: str, stop: threading.Event) -> socket.socket:
    with entered(server_path):
        srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", 8080))
    srv.listen(128)
    srv.settimeout(0.2)

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(100)
                conn.sendall(b"pong")
    threading.Thread(target=loop, daemon=True).start()
    return srv


def bench_latency(mode: str, n: int, count: int) -> dict[str, float]:
    target = n - 1  # services sort by name: the last one KUBE-SERVICES scans
    state = state_of(n, target=target)
    ip = state.services[target].cluster_ip
    with latency_lab(mode, n) as (node_path, client_path, server_path):
        with entered(node_path):
            proxier = _proxier(mode)
            proxier.sync(state)
        stop = threading.Event()
        srv = serve(server_path, stop)
        try:
            times = []
            with entered(client_path):
                for i in range(count + 20):
                    started = time.perf_counter()
                    with socket.create_connection((ip, 80), timeout=5) as sock:
                        sock.sendall(b"ping")
                        assert sock.recv(10) == b"pong"
                    if i >= 20:  # warm-up
                        times.append(time.perf_counter() - started)
            times.sort()
            return {"p50_ms": 1000 * statistics.median(times), "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))]}
        finally:
            stop.set()
            srv.close()
            proxier.close()


def where() -> str:
    guest = os.environ.get("KPROXY_IN_GUEST") == "1"
    return (f"{'QEMU TCG guest (kernel ' + platform.release() + ', 2 vCPUs; the host kernel has no IPVS)' if guest else 'host kernel ' + platform.release()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--latency-sizes", default="100,10000")
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--modes", default="iptables,ipvs")
    parser.add_argument("--out", help="write the results as JSON here too")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench-ipvs: run as root", file=sys.stderr)
        return 1
    results: dict[str, Any] = {"where": where(), "sync": {}, "latency": {}}
    print(f"# {results['where']}", flush=True)
    for mode in args.modes.split(","):
        for n in map(int, args.sizes.split(",")):
            r = bench_sync(mode, n)
            results["sync"][f"{mode}/{n}"] = r
            print(f"sync {mode:8} {n:>6} services: full {r['full_sync_s']:.3f} s  one change {r['one_change_s']*1000:.1f} ms"
                  f"  no change {r['no_change_s']*1000:.1f} ms", flush=True)
        for n in map(int, args.latency_sizes.split(",")):
            r = bench_latency(mode, n, args.connections)
            results["latency"][f"{mode}/{n}"] = r
            print(f"latency {mode:8} {n:>6} services: p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
