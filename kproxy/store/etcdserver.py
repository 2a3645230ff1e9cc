"""etcd 3.4 for a lab: one member, in the lab's control-plane namespace, supervised like the lab's
other daemons (python -m kproxy.store.etcdserver runs etcd as its child, answers for it to the
supervisor, and stops it on SIGTERM).

The binary is the machine's `etcd` where one is installed, else Debian's etcd-server unpacked
into .cache/etcd (kproxy.debs: never installed, so no etcd service starts on the machine's own
addresses). The flags a lab needs beyond the defaults:
- --max-txn-ops / --max-request-bytes: one `apply` is one transaction (etcd's defaults, 128
  operations and 1.5 MiB, would refuse an apply of 100 Services);
- short raft timers: a lone member elects itself in ~0.1 s instead of ~1 s;
- progress notices every 5 s, so a watcher tells a quiet stream from a dead one;
- compaction of the history older than 10,000 revisions, as the API server compacts etcd.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from cni.netns import entered
from kproxy import children, debs
from kproxy.errors import KproxyError
from kproxy.lab.workload import remove_pidfile, write_pidfile

CACHE = Path(__file__).resolve().parent.parent.parent / ".cache" / "etcd"
CLIENT_PORT = 2379
PEER_PORT = 2380
START_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h
MAX_TXN_OPS = 1_000_000
MAX_REQUEST_BYTES = 1 << 30  # etcd's own ceiling is 2 GiB; an apply of 100k objects is ~150 MiB


def binary(log=print) -> str:
    installed = shutil.which("etcd")
    if installed:
        return installed
    cached = CACHE / "root" / "usr" / "bin" / "etcd"
    if not cached.exists():
        debs.unpacked(["etcd-server"], CACHE, log=lambda message: log(f"etcd: {message}"))
    return str(cached)


def argv(etcd: str, name: str, ip: str, data_dir: Path) -> list[str]:
    client, peer = f"http://{ip}:{CLIENT_PORT}", f"http://{ip}:{PEER_PORT}"
    return [etcd, f"--name={name}", f"--data-dir={data_dir}",
            f"--listen-client-urls={client}", f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster={name}={peer}", "--initial-cluster-state=new",
            f"--max-txn-ops={MAX_TXN_OPS}", f"--max-request-bytes={MAX_REQUEST_BYTES}",
            "--heartbeat-interval=10", "--election-timeout=100",
            "--experimental-watch-progress-notify-interval=5s",
            "--auto-compaction-mode=revision", "--auto-compaction-retention=10000"]


def start(name: str, ip: str, data_dir: Path, log_path: Path, netns: str | None = None) -> subprocess.Popen[bytes]:
    """etcd listening on ip, in the namespace at netns (None: this one); returns once it answers /health."""
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [*(["nsenter", f"--net={netns}", "--"] if netns else []), *argv(binary(), name, ip, data_dir)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                                env=_environment(), preexec_fn=_die_with_parent)
    try:
        wait_healthy(f"http://{ip}:{CLIENT_PORT}", proc, log_path, netns)
    except BaseException:
        children.end(proc)
        raise
    return proc


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when its parent dies, however it dies. A daemon killed with
    SIGKILL would otherwise leave etcd holding the ports, and the one the supervisor starts next
    could not listen."""
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _environment() -> dict[str, str]:
    """etcd 3.4 refuses arm64 (an Apple-silicon laptop's VM) unless told it is meant."""
    machine = platform.machine()
    return {**os.environ, **({"ETCD_UNSUPPORTED_ARCH": "arm64"} if machine in ("aarch64", "arm64") else {})}


def wait_healthy(endpoint: str, proc: subprocess.Popen[bytes], log_path: Path, netns: str | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise KproxyError(f"etcd exited ({proc.returncode}) before it answered: {_last_line(log_path)}")
        try:
            with entered(netns):
                if requests.get(f"{endpoint}/health", timeout=1).json().get("health") == "true":
                    return
        except (requests.RequestException, ValueError):
            pass
        if time.monotonic() > deadline:
            raise KproxyError(f"etcd at {endpoint} did not answer within {START_TIMEOUT:.0f} s: {_last_line(log_path)}")
        time.sleep(0.02)


def _last_line(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1] if lines else "no log"


def main(args: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.store.etcdserver", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", required=True, type=Path)
    parser.add_argument("--ip", required=True, help="the control-plane member's underlay address")
    parser.add_argument("--pidfile", help="write our PID here (atomically) once etcd answers")
    parsed = parser.parse_args(args)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    try:
        etcd = start("control-plane", parsed.ip, parsed.lab_dir / "etcd", parsed.lab_dir / "etcd-server.log")
    except KproxyError as exc:
        print(f"kproxy-etcd: cannot start: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        if parsed.pidfile:
            write_pidfile(parsed.pidfile)
        print(f"kproxy-etcd: etcd (pid {etcd.pid}) answers on http://{parsed.ip}:{CLIENT_PORT}", file=sys.stderr,
              flush=True)
        while not stopping.wait(0.2):
            if etcd.poll() is not None:
                print(f"kproxy-etcd: etcd exited ({etcd.returncode}): {_last_line(parsed.lab_dir / 'etcd-server.log')}",
                      file=sys.stderr, flush=True)
                return 1
        children.end(etcd, grace=10)
        return 0
    finally:
        if parsed.pidfile:
            remove_pidfile(parsed.pidfile)


if __name__ == "__main__":
    sys.exit(main())
