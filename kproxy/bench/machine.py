"""Which machine a figure was measured on: every absolute figure carries this label."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from kproxy.guest import CPUS as GUEST_CPUS, in_guest

HOST_CPU_ENV = "KPROXY_BENCH_HOST_CPU"  # the guest sees QEMU's CPU model: the host says what runs it


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe() -> dict[str, Any]:
    """The document's machine object for where this process runs (host, or the QEMU guest)."""
    cores = os.cpu_count() or 1
    kernel = platform.release()
    emulated = in_guest()
    if emulated:
        host = os.environ.get(HOST_CPU_ENV, "an unnamed host CPU")
        label = f"QEMU TCG guest ({GUEST_CPUS} vCPUs emulated on {host}), Debian kernel {kernel}"
    else:
        label = f"host: {cpu_model()}, {cores} cores, kernel {kernel}"
    return {"label": label, "cpu": cpu_model(), "cores": cores, "kernel": kernel, "emulated": emulated}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    """A process's peak resident memory (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def busy_cpu_seconds() -> float:
    """The machine's non-idle CPU time so far (all CPUs), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
