"""`kproxy bench`: the proxy modes and the overlays, measured side by side in one run.

    sudo kproxy bench [--quick] [--modes iptables,nftables] [--services 100,1000]
                      [--overlays udp,vxlan,host-gw] [--only control,data,overlays]
                      [--json PATH] [--out DIR]

Sections (kproxy/bench/controlplane.py, dataplane.py, overlays.py say what each figure is):
  control   per mode and number of Services: full sync, one-change sync, agent CPU and peak RSS
  data      per mode, in a 2-node lab each: apply-to-live latency on every node, request latency
            through ClusterIP and NodePort against the direct pod IP, iperf3 throughput
  overlays  udp, vxlan, host-gw cross node: throughput, round trip, CPU per GB against host-gw

Where this kernel lacks a module a mode needs (IPVS here), every mode's figures are also
measured in one QEMU guest (kproxy/guest.py) and reported apart: an emulated machine's
figures are compared only with each other. Results: the JSON document (schema:
kproxy/bench/schema.json, docs/benchmarks.md), PNG plots and report.md in --out.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path

from kproxy.errors import KproxyError
from kproxy.lab.topology import OVERLAYS
from kproxy.proxy import MODES

MEASURED_SERVICES = 3  # the data plane's own Services, part of every size (kproxy.bench.dataplane)
SECTIONS = ("control", "data", "overlays")


@dataclass(frozen=True)
class Profile:
    name: str
    services: tuple[int, ...]
    repeats: int
    requests: int  # per target and repetition
    changes: int  # one-change syncs and programmed changes per repetition
    iperf_seconds: float


FULL = Profile("full", (100, 1000, 10000, 30000), repeats=3, requests=300, changes=5, iperf_seconds=5.0)
QUICK = Profile("quick", (10, 100), repeats=2, requests=30, changes=1, iperf_seconds=1.0)


def names(value: str, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if value == "none":
        return ()
    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in chosen if v not in known]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or repr(value)} "
                                         f"(known: {', '.join(known)})")
    return chosen


def sizes(value: str) -> tuple[int, ...]:
    try:
        chosen = tuple(sorted({int(v) for v in value.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--services takes numbers separated by commas, not {value!r}")
    if not chosen or chosen[0] < MEASURED_SERVICES:
        raise argparse.ArgumentTypeError(f"each size must be at least {MEASURED_SERVICES} "
                                         "(the data plane's own Services count)")
    return chosen


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes ({','.join(map(str, QUICK.services))} Services), "
                        f"{QUICK.repeats} repetitions: a smoke run of a few minutes")
    p.add_argument("--modes", type=lambda v: names(v, MODES, "mode"), default=MODES,
                   help=f"proxy modes to measure (default all: {','.join(MODES)})")
    p.add_argument("--services", type=sizes, help="numbers of Services (default "
                   f"{','.join(map(str, FULL.services))}; --quick {','.join(map(str, QUICK.services))})")
    p.add_argument("--overlays", type=lambda v: names(v, OVERLAYS, "overlay"), default=OVERLAYS,
                   help=f"overlays to measure, or none (default {','.join(OVERLAYS)})")
    p.add_argument("--only", type=lambda v: names(v, SECTIONS, "section"), default=SECTIONS,
                   help=f"sections to run (default {','.join(SECTIONS)})")
    p.add_argument("--repeats", type=int, help=f"repetitions, interleaved (default {FULL.repeats}, "
                   f"--quick {QUICK.repeats})")
    p.add_argument("--json", type=Path, help="where to write the results (default OUT/bench.json)")
    p.add_argument("--out", type=Path, default=Path("kproxy-bench"),
                   help="directory for bench.json, the plots and report.md (default ./kproxy-bench)")


def profile_of(args: argparse.Namespace) -> Profile:
    chosen = QUICK if args.quick else FULL
    if args.services or args.repeats:
        chosen = replace(chosen, name="custom", services=args.services or chosen.services,
                         repeats=args.repeats or chosen.repeats)
    if chosen.repeats < 1:
        raise KproxyError("--repeats must be at least 1")
    return chosen


