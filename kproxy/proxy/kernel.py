"""The few kernel touches every proxy mode shares, made from inside the node's namespace.

Commands are children of the calling thread, and /proc/sys/net follows the
namespace of the thread that opens it: both act on the node the agent runs in.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from cni.masq import IPTABLES
from cni.masq import IPTABLES_RESTORE as RESTORE
from cni.masq import IPTABLES_SAVE as SAVE

__all__ = ["IPTABLES", "RESTORE", "SAVE", "RestoreError", "restore", "restore_stream", "run", "set_sysctl"]


PIPE_BYTES = 1 << 20


class RestoreError(RuntimeError):
    """iptables-restore refused the input; the kernel kept the tables it had not committed."""


def run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool (iptables-nft-*, nft, ipset, conntrack); RuntimeError with its stderr on failure."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def restore(text: str, counters: bool = False) -> None:
    """One iptables-restore --noflush of text (the CNI's backend: never two in one namespace)."""
    with restore_stream(counters) as feed:
        feed(text)


@contextmanager
def restore_stream(counters: bool = False) -> Iterator[Callable[[str], object]]:
    """One iptables-restore --noflush fed while its input is still being made: it parses
    while the caller renders. If the caller fails midway, the process is killed before it
    sees a COMMIT, so nothing of the half-written input reaches the kernel."""
    # -w: wait for the xtables lock if a legacy tool holds it (iptables-nft accepts and ignores it).
    argv = [RESTORE, "-w", "5", "--noflush"] + (["--counters"] if counters else [])
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stderr is not None
    try:
        # With the default 64 KiB pipe, writer and parser take turns every few KiB; a large
        # pipe lets both run at once (10k services: a streamed full sync 12% slower than the
        # same text written at once, and as fast with 1 MiB).
        fcntl.fcntl(proc.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:  # above /proc/sys/fs/pipe-max-size for an unprivileged caller: keep the default
        pass
    broken = False
    try:
        yield proc.stdin.write
        proc.stdin.close()
    except BrokenPipeError:  # it stopped reading: refused the input; its stderr says why
        broken = True
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    error = proc.stderr.read()
    if proc.wait() != 0 or broken:
        raise RestoreError(f"{RESTORE} failed ({proc.returncode}): {error.strip()}")


def set_sysctl(name: str, value: str, mode: str) -> None:
    """Set a net.* sysctl (e.g. "net/ipv4/vs/conntrack") in this namespace; a failure is reported, not fatal."""
    try:
        with open(os.path.join("/proc/sys", name), "w") as f:
            f.write(value)
    except OSError as exc:
        print(f"kproxy {mode}: cannot set {name}={value}: {exc}", file=sys.stderr)
