"""The few kernel touches every proxy mode shares, made from inside the node's namespace.

Commands are children of the calling thread, and /proc/sys/net follows the
namespace of the thread that opens it: both act on the node the agent runs in.
"""

from __future__ import annotations

import os
import subprocess
import sys


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool (iptables-legacy-*, ipset, conntrack); RuntimeError with its stderr on failure."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def set_sysctl(name: str, value: str, mode: str) -> None:
    """Set a net.* sysctl (e.g. "net/ipv4/vs/conntrack") in this namespace; a failure is reported, not fatal."""
    try:
        with open(os.path.join("/proc/sys", name), "w") as f:
            f.write(value)
    except OSError as exc:
        print(f"kproxy {mode}: cannot set {name}={value}: {exc}", file=sys.stderr)
