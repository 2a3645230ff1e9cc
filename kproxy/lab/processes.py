"""The lab's own daemons (per node the pod workload, the node agent and flanneld; per DNS pod its
server; with the etcd store, etcd): start, find, stop.

Each runs inside its node's namespace, detached, with a pidfile in the lab
directory that the daemon writes once it is initialised. In a lab they are
children of the lab's supervisor (kproxy.lab.supervisor), which starts them
with spawn(); start() is for a daemon on its own (the benchmarks). A pid is only
ever signalled after /proc/<pid>/cmdline shows it is ours (the daemon's module
and this lab's directory), so a recycled pid is never hit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kproxy.errors import KproxyError


@dataclass(frozen=True)
class Daemon:
    kind: str  # file name prefix: workload-node1.pid
    module: str

    def pidfile(self, lab_dir: Path, node: str) -> Path:
        return lab_dir / f"{self.kind}-{node}.pid"

    def logfile(self, lab_dir: Path, node: str) -> Path:
        return lab_dir / f"{self.kind}-{node}.log"


WORKLOAD = Daemon("workload", "kproxy.lab.workload")
AGENT = Daemon("agent", "kproxy.agent")
DNS = Daemon("dns", "kproxy.dns.server")  # one per cluster DNS pod: its "node" is the pod's member name
FLANNELD = Daemon("flanneld", "kproxy.lab.flanneld")  # per node: its overlay, from the Nodes' leases
ETCD = Daemon("etcd", "kproxy.store.etcdserver")  # with --store etcd: its "node" is the control-plane member
DAEMONS = (AGENT, WORKLOAD, DNS, FLANNELD, ETCD)


def spec_path(lab_dir: Path, node: str) -> Path:
    return lab_dir / f"workload-{node}.json"


def verified_pid(pidfile: Path, module: str, lab_dir: Path) -> int | None:
    """The pid in pidfile if that process is alive and really ours (a zombie has an empty cmdline)."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    ours = module.encode() in cmdline and str(lab_dir).encode() in cmdline
    return pid if ours else None


def running_pid(daemon: Daemon, lab_dir: Path, node: str) -> int | None:
    """The daemon's pid if it is alive, initialised and really ours."""
    return verified_pid(daemon.pidfile(lab_dir, node), daemon.module, lab_dir)


def argv(daemon: Daemon, lab_dir: Path, node: str, node_ns: str, args: list[str]) -> list[str]:
    """The daemon's command line: nsenter execs it (no fork), so the pid started is the daemon's."""
    return ["nsenter", f"--net={node_ns}", "--", sys.executable, "-m", daemon.module, *args,
            "--pidfile", str(daemon.pidfile(lab_dir, node))]


def spawn(daemon: Daemon, lab_dir: Path, node: str, node_ns: str, args: list[str]) -> subprocess.Popen[bytes]:
    """Start the daemon in the node's namespace, logging to its log file; returns at once."""
    daemon.pidfile(lab_dir, node).unlink(missing_ok=True)
    with open(daemon.logfile(lab_dir, node), "ab") as log:
        return subprocess.Popen(argv(daemon, lab_dir, node, node_ns, args), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)


def log_tail(log: Path) -> str:
    """The last line a daemon logged (why it did not start)."""
    try:
        lines = log.read_text().strip().splitlines()
    except FileNotFoundError:
        lines = []
    return lines[-1] if lines else "no output"


def start(daemon: Daemon, lab_dir: Path, node: str, node_ns: str, args: list[str]) -> int:
    """Start the daemon in the node's namespace; returns once it wrote its pidfile."""
    proc = spawn(daemon, lab_dir, node, node_ns, args)
    deadline = time.monotonic() + 60  # a Python start in the emulated guest under load took over 20 s
    while time.monotonic() < deadline:
        pid = running_pid(daemon, lab_dir, node)
        if pid is not None:
            return pid
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise KproxyError(f"the {daemon.kind} of node {node} did not start: {log_tail(daemon.logfile(lab_dir, node))}")


def stop(daemon: Daemon, lab_dir: Path, node: str) -> None:
    pid = running_pid(daemon, lab_dir, node)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and running_pid(daemon, lab_dir, node) == pid:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
            except ChildProcessError:
                pass
            time.sleep(0.01)
        if running_pid(daemon, lab_dir, node) == pid:
            os.kill(pid, signal.SIGKILL)
    daemon.pidfile(lab_dir, node).unlink(missing_ok=True)


def nodes_with(daemon: Daemon, lab_dir: Path) -> list[str]:
    """Nodes that have a pidfile of this daemon (also after the state file is lost)."""
    if not lab_dir.is_dir():
        return []
    prefix = f"{daemon.kind}-"
    return sorted(p.name[len(prefix):-len(".pid")] for p in lab_dir.glob(f"{prefix}*.pid"))


def write_spec(lab_dir: Path, node: str, pods: list[dict[str, Any]]) -> bool:
    """Write the node's workload spec; True when it changed."""
    path = spec_path(lab_dir, node)
    text = json.dumps({"pods": pods}, indent=1, sort_keys=True)
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


def ensure_workload(lab_dir: Path, node: str, pods: list[dict[str, Any]], reload: bool = False) -> int | None:
    """Give the node's workload its spec; a running one re-reads it. Returns its pid.

    reload: re-read even an unchanged spec (a pod namespace was recreated under
    the same name; the workload notices by inode and listens in the new one).
    A workload that is not running reads the spec when the supervisor starts it.
    """
    changed = write_spec(lab_dir, node, pods)
    pid = running_pid(WORKLOAD, lab_dir, node)
    if pid is not None and (changed or reload):
        os.kill(pid, signal.SIGHUP)
    return pid
