"""Benchmark: how nftables mode's transactions reach the kernel, at N services.

    sudo scripts/bench-nftables [--services 10000] [--changes 10]

N Services with 2 endpoints each are rendered (endpoint choice cascade) and loaded into
a fresh namespace; then --changes endpoint changes (each in another service: one
endpoint replaced, as a rollout does) are applied as the proxier's partial-sync
transactions, each way in turn:

  nft -f         the transaction on the stdin of an `nft -f -` child
  libnftables    the same text through the library, one context kept (the mode's backend)
  elements only  through the library, a transaction that only deletes and adds one
                 service-ips element (no chain, no rule): what the map costs alone

Each figure is the median in ms. docs/nftables.md has the numbers and what they are made of.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

from cni.netns import entered
from kproxy.bench import require_root
from kproxy.proxy.nftables.backend import Libnftables
from kproxy.proxy.nftables.render import render
from kproxy.proxy.nftables.transaction import full_transaction, partial_transaction
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo("node1", "172.18.0.2", "10.244.0.0/16", "10.96.0.0/12")


def services(n: int) -> list[ServicePort]:
    return [ServicePort("bench", f"svc-{i}", "http", "TCP", f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}", 80)
            for i in range(n)]


def endpoints(i: int, generation: int) -> list[Endpoint]:
    base = 2 * i + generation * 7919
    return [Endpoint(f"10.244.{(base + k) // 250 % 250}.{(base + k) % 250 + 2}", 8080, "node1") for k in range(2)]


def nft_child(text: str) -> None:
    done = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip())


def bench(n: int, changes: int) -> dict[str, float]:
    ports = services(n)
    state = ProxyState(ports, {svc.key: endpoints(i, 0) for i, svc in enumerate(ports)})
    current = render(state, NODE, choice="cascade")
    library = Libnftables()
    library.run(full_transaction(current, None))
    ways: dict[str, Callable[[str], None]] = {"nft -f": nft_child, "libnftables": library.run}
    timings: dict[str, list[float]] = {way: [] for way in [*ways, "elements only"]}
    for change in range(changes):
        for number, (way, run) in enumerate(ways.items()):
            count = change * len(ways) + number + 1  # every change at another service
            i = count * 7919 % n
            changed = dict(state.endpoints)
            changed[ports[i].key] = [endpoints(i, 0)[0], endpoints(i, count)[1]]
            state = ProxyState(ports, changed)
            desired = render(state, NODE, choice="cascade")
            text = partial_transaction(desired, current)
            assert text, "a change that changes nothing"
            started = time.perf_counter()
            run(text)
            timings[way].append(time.perf_counter() - started)
            current = desired
        svc = ports[(change * 31) % n]
        key = f"{svc.cluster_ip} . tcp . 80"
        chain = next(iter(current.services[svc.key].chains))
        started = time.perf_counter()
        library.run(f"delete element ip kube-proxy service-ips {{ {key} }}\n"
                    f"add element ip kube-proxy service-ips {{ {key} : goto {chain} }}\n")
        timings["elements only"].append(time.perf_counter() - started)
    return {way: statistics.median(values) * 1000 for way, values in timings.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-nftables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=10)
    args = parser.parse_args(argv)
    if args.services < 1 or args.changes < 1:
        parser.error("--services and --changes must be at least 1")
    if not require_root("bench-nftables"):
        return 1
    name = f"kpbench{os.getpid() % 10000}-nft"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        with entered(f"/var/run/netns/{name}"):
            row = bench(args.services, args.changes)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    print(f"{args.services} services x 2 endpoints, {os.cpu_count()} CPUs; one endpoint change, "
          f"median of {args.changes} (ms)")
    print("  ".join(f"{way}: {ms:.1f}" for way, ms in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
