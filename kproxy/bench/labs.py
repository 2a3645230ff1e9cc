"""The benchmark's own labs: refused where a lab of that name exists, brought up side by side,
and taken down again however the run ends."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import KproxyError
from kproxy.lab.state import lab_exists, ns_path

KPROXY = str(Path(sys.executable).parent / "kproxy")
IPERF_PORT = 5201


def refuse_existing(names: list[str]) -> None:
    for name in names:
        if lab_exists(name):
            raise KproxyError(f"a lab named {name} exists; the benchmark makes its own (kproxy lab down {name})")


def up_all(topology: dict[str, Any], labs: dict[str, list[str]], downs: ExitStack) -> None:
    """`kproxy lab up` of every lab (name -> its extra arguments) at once, each with `--no-dns`;
    downs takes each down when it closes. Setup only: nothing is measured meanwhile."""
    refuse_existing(list(labs))
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        path = Path(tmp) / "lab.yaml"
        path.write_text(yaml.safe_dump(topology))
        starting = {}
        for name, extra in labs.items():
            downs.callback(subprocess.run, [KPROXY, "lab", "down", name], capture_output=True)
            starting[name] = subprocess.Popen([KPROXY, "lab", "up", "-f", str(path), "--name", name, "--no-dns",
                                               *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        failed = [f"{name}: {proc.communicate()[1].strip()}" for name, proc in starting.items() if proc.wait() != 0]
    if failed:
        raise KproxyError(f"kproxy lab up failed: {'; '.join(failed)}")


def start_iperf_server(lab: str, pod: str, stops: ExitStack) -> None:
    """iperf3 -s in the pod for the whole run, listening before this returns; stops ends it. Started
    before a lab's Services exist: the lab's workload would otherwise open their free target port 5201."""
    server = subprocess.Popen(["nsenter", f"--net={ns_path(lab, pod)}", "--", "iperf3", "-s"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stops.callback(server.wait)
    stops.callback(server.kill)
    deadline = time.monotonic() + 30
    while not subprocess.run(["nsenter", f"--net={ns_path(lab, pod)}", "--", "ss", "-Hltn", "sport", "=",
                              f":{IPERF_PORT}"], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline or server.poll() is not None:
            raise KproxyError(f"lab {lab}: iperf3 did not listen in pod {pod}")
        time.sleep(0.02)


def iperf(lab: str, client: str, address: str, seconds: float) -> tuple[float, int]:
    """One TCP stream from the client pod to address: Gbit/s received, and bytes moved."""
    done = subprocess.run(["nsenter", f"--net={ns_path(lab, client)}", "--", "iperf3", "-c", address,
                           "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"], capture_output=True, text=True)
    result = json.loads(done.stdout) if done.stdout.strip() else {}
    received = result.get("end", {}).get("sum_received")
    if done.returncode != 0 or not received:
        raise KproxyError(f"lab {lab}: iperf3 to {address} failed: {result.get('error', done.stderr.strip())}")
    return float(received["bits_per_second"]) / 1e9, int(received["bytes"])
