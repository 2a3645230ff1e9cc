"""Ending processes: a child this process started (asked first with SIGTERM, then told with SIGKILL),
and every process left in namespaces a lab made (signals through pidfds: never to a recycled pid);
and this process ended by SIGTERM as by Ctrl-C, so that its cleanups run."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, Iterator


def end(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM proc unless it has exited, wait grace seconds for it, then SIGKILL; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def send(pidfd: int, sig: int) -> None:
    """sig to the pidfd's process; nothing when it has exited."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass


def still_running(pidfds: list[int], timeout: float) -> list[int]:
    """Wait up to timeout for the processes to exit (a pidfd is readable once its process has);
    the pidfds of those that did not."""
    left = list(pidfds)
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        ready, _, _ = select.select(left, [], [], max(0.0, deadline - time.monotonic()))
        left = [fd for fd in left if fd not in ready]
    return left


def _net_namespace(pid: str) -> tuple[int, int] | None:
    try:
        found = os.stat(f"/proc/{pid}/ns/net")
    except OSError:  # exited meanwhile, or a kernel thread
        return None
    return found.st_dev, found.st_ino


def end_all_in(namespaces: list[Path], grace: float = 2.0) -> int:
    """End every process whose network namespace is one of these (bind-mounted) namespaces: what a
    pod's deletion ends, also what a crashed command started there (a benchmark's iperf3 server, say).
    SIGTERM, then SIGKILL after grace. Returns how many there were."""
    wanted = set()
    for path in namespaces:
        try:
            found = os.stat(path)
        except OSError:
            continue
        wanted.add((found.st_dev, found.st_ino))
    if not wanted:
        return 0
    pidfds = []
    try:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if _net_namespace(pid) not in wanted or int(pid) == os.getpid():
                continue
            try:
                pidfd = os.pidfd_open(int(pid))
            except ProcessLookupError:
                continue
            if _net_namespace(pid) in wanted:  # still that process, not a recycled pid
                pidfds.append(pidfd)
            else:
                os.close(pidfd)
        for pidfd in pidfds:
            send(pidfd, signal.SIGTERM)
            send(pidfd, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
        for pidfd in still_running(pidfds, grace):
            send(pidfd, signal.SIGKILL)
        still_running(pidfds, grace)
        return len(pidfds)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


@contextmanager
def terminated_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so every cleanup below runs."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
