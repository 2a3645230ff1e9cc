"""The few kernel touches every proxy mode shares, made from inside the node's namespace.

Commands are children of the calling thread, and /proc/sys/net follows the
namespace of the thread that opens it: both act on the node the agent runs in.
"""

from __future__ import annotations

import os
import subprocess
import sys

from cni.masq import IPTABLES_RESTORE as RESTORE
from cni.masq import IPTABLES_SAVE as SAVE

__all__ = ["RESTORE", "SAVE", "RestoreError", "restore", "run", "set_sysctl"]


class RestoreError(RuntimeError):
    """iptables-restore refused the input; the kernel kept the tables it had not committed."""


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool (iptables-legacy-*, ipset, conntrack); RuntimeError with its stderr on failure."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def restore(text: str, counters: bool = False) -> None:
    """One iptables-restore --noflush of text (the CNI's backend: never two in one namespace).

    -w waits for the xtables lock, a file shared by all namespaces."""
    argv = [RESTORE, "-w", "5", "--noflush"] + (["--counters"] if counters else [])
    done = subprocess.run(argv, input=text, text=True, capture_output=True)
    if done.returncode != 0:
        raise RestoreError(f"{RESTORE} failed ({done.returncode}): {done.stderr.strip()}")


def set_sysctl(name: str, value: str, mode: str) -> None:
    """Set a net.* sysctl (e.g. "net/ipv4/vs/conntrack") in this namespace; a failure is reported, not fatal."""
    try:
        with open(os.path.join("/proc/sys", name), "w") as f:
            f.write(value)
    except OSError as exc:
        print(f"kproxy {mode}: cannot set {name}={value}: {exc}", file=sys.stderr)
