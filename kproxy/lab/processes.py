"""The lab's own processes (one pod workload per node): start, find, stop.

Each is started detached with a pidfile in the lab directory. A pid is only
ever signalled after /proc/<pid>/cmdline shows it is ours (the workload
module with this lab's spec file), so a recycled pid is never hit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kproxy.errors import KproxyError

WORKLOAD_MODULE = "kproxy.lab.workload"


def spec_path(lab_dir: Path, node: str) -> Path:
    return lab_dir / f"workload-{node}.json"


def pidfile(lab_dir: Path, node: str) -> Path:
    return lab_dir / f"workload-{node}.pid"


def running_pid(lab_dir: Path, node: str) -> int | None:
    """The pid of this node's workload if it is alive and really ours."""
    try:
        pid = int(pidfile(lab_dir, node).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    ours = WORKLOAD_MODULE.encode() in cmdline and str(spec_path(lab_dir, node)).encode() in cmdline
    return pid if ours else None


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


def ensure_workload(lab_dir: Path, node: str, node_ns: str, pods: list[dict[str, Any]], reload: bool = False) -> int:
    """Start the node's workload, or have a running one re-read its spec.

    reload: re-read even an unchanged spec (a pod namespace was recreated under
    the same name; the workload notices by inode and listens in the new one).
    """
    changed = write_spec(lab_dir, node, pods)
    pid = running_pid(lab_dir, node)
    if pid is not None:
        if changed or reload:
            os.kill(pid, signal.SIGHUP)
        return pid
    pidfile(lab_dir, node).unlink(missing_ok=True)
    log = open(lab_dir / f"workload-{node}.log", "ab")
    # Started inside the node's namespace, so `ip netns pids` shows it on its node.
    argv = ["nsenter", f"--net={node_ns}", "--", sys.executable, "-m", WORKLOAD_MODULE,
            "--spec", str(spec_path(lab_dir, node)), "--pidfile", str(pidfile(lab_dir, node))]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pid = running_pid(lab_dir, node)
        if pid is not None:
            return pid
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    raise KproxyError(f"the workload of node {node} did not start; see {lab_dir / f'workload-{node}.log'}")


def stop_workload(lab_dir: Path, node: str) -> None:
    pid = running_pid(lab_dir, node)
    if pid is not None:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 3
        # A zombie has an empty cmdline, so running_pid() no longer calls it ours.
        while time.monotonic() < deadline and running_pid(lab_dir, node) == pid:
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be our child
            except ChildProcessError:
                pass
            time.sleep(0.01)
        if running_pid(lab_dir, node) == pid:
            os.kill(pid, signal.SIGKILL)
    for path in (pidfile(lab_dir, node), spec_path(lab_dir, node)):
        path.unlink(missing_ok=True)


def workload_nodes(lab_dir: Path) -> list[str]:
    """Nodes that have a workload pidfile (also after the state file is lost)."""
    if not lab_dir.is_dir():
        return []
    return sorted(p.name[len("workload-"):-len(".pid")] for p in lab_dir.glob("workload-*.pid"))
