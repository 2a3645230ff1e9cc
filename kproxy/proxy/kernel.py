"""The few kernel touches every proxy mode shares, made from inside the node's namespace.

Commands are children of the calling thread, and /proc/sys/net follows the
namespace of the thread that opens it: both act on the node the agent runs in.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import subprocess
import sys
import termios
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from cni.masq import IPTABLES
from cni.masq import IPTABLES_RESTORE as RESTORE
from cni.masq import IPTABLES_SAVE as SAVE

__all__ = ["IPTABLES", "RESTORE", "SAVE", "RestoreError", "restore", "restore_lock", "restore_stream", "run",
           "set_sysctl"]


PIPE_BYTES = 1 << 20
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
RESTORE_LOCK = b"\0kproxy-iptables-restore"


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
    """One iptables-restore --noflush fed (whole lines per call) while its input is still being
    made: it parses while the caller renders.

    The input reaches the kernel whole or not at all. iptables-nft-restore commits each table
    at its COMMIT line, one nf_tables transaction per table, so a writer that dies between two
    COMMITs would leave one table new and the next one old. Hence everything from the first
    COMMIT on is held back and handed over at the end in one write into room the pipe has
    (the kernel copies such a write whole, a SIGKILL cannot split it): until then the pipe holds
    no COMMIT, and a writer that dies leaves the restore an input without one (EOF: it commits
    nothing); after it, the restore has every COMMIT and finishes on its own. If the caller
    fails midway, the process is killed before it sees a COMMIT.

    The restore holds this namespace's restore lock (restore_lock) until it exits, also when it
    outlives its writer: the next restore of ours waits for it instead of reading a kernel that
    is about to change."""
    # -w: wait for the xtables lock if a legacy tool holds it (iptables-nft accepts and ignores it).
    argv = [RESTORE, "-w", "5", "--noflush"] + (["--counters"] if counters else [])
    with restore_lock() as lock:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, pass_fds=(lock.fileno(),))
        assert proc.stdin is not None and proc.stderr is not None
        stdin = proc.stdin
        try:
            # With the default 64 KiB pipe, writer and parser take turns every few KiB; a large
            # pipe lets both run at once (10k services: a streamed full sync 12% slower than the
            # same text written at once, and as fast with 1 MiB).
            fcntl.fcntl(stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # above /proc/sys/fs/pipe-max-size for an unprivileged caller: keep the default
            pass
        held: list[str] = []

        def feed(chunk: str) -> None:
            if not held:
                at = ("\n" + chunk).find("\nCOMMIT\n")  # where a COMMIT line starts in chunk
                if at < 0:
                    stdin.write(chunk)
                    return
                stdin.write(chunk[:at])
                chunk = chunk[at:]
            held.append(chunk)

        broken = False
        try:
            yield feed
            stdin.flush()
            write_whole(proc, "".join(held).encode())
            stdin.close()
        except BrokenPipeError:  # it stopped reading: refused the input; its stderr says why
            broken = True
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        error = proc.stderr.read()
        if proc.wait() != 0 or broken:
            raise RestoreError(f"{RESTORE} failed ({proc.returncode}): {error.strip()}")


def write_whole(proc: subprocess.Popen[str], data: bytes) -> None:
    """Write data to proc's stdin pipe in one write(2) that the kernel copies whole: first make
    the pipe big enough (root may exceed pipe-max-size) and wait until the reader left room."""
    assert proc.stdin is not None
    fd = proc.stdin.fileno()
    need = len(data) + 2 * PAGE_BYTES  # the pipe is made of pages; the last one may be partly used
    size = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    if need > size:
        try:
            size = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, need)
        except OSError:  # not allowed: the write below may block midway, as any large write
            need = size
    # The restore drains the pipe as it parses (10k services: ~1 MiB in well under a second).
    while size - _unread(fd) < need and proc.poll() is None:
        time.sleep(0.001)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _unread(fd: int) -> int:
    """Bytes in the pipe not yet read (FIONREAD works on either end of a pipe)."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@contextmanager
def restore_lock(timeout: float = 60.0) -> Iterator[socket.socket]:
    """The calling thread's network namespace's lock for our iptables restores.

    An abstract unix socket name exists once per network namespace and vanishes with the last
    process holding the socket, so a restore that outlives its writer (killed agent) keeps it
    until it is done, and nothing stale is ever left behind. Waits for a holder to finish."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                sock.bind(RESTORE_LOCK)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if time.monotonic() > deadline:
                    raise RestoreError(f"another iptables-restore of ours has run for over {timeout:.0f} s "
                                       "in this namespace") from None
                time.sleep(0.005)
        yield sock
    finally:
        sock.close()


def set_sysctl(name: str, value: str, mode: str) -> None:
    """Set a net.* sysctl (e.g. "net/ipv4/vs/conntrack") in this namespace; a failure is reported, not fatal."""
    try:
        with open(os.path.join("/proc/sys", name), "w") as f:
            f.write(value)
    except OSError as exc:
        print(f"kproxy {mode}: cannot set {name}={value}: {exc}", file=sys.stderr)
