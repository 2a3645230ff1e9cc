"""The lab's supervisor: keeps every node's agent and workload running, as the kubelet keeps kube-proxy.

    python -m kproxy.lab.supervisor --lab-dir /run/kproxy/LAB

One per lab, started by `kproxy lab up` (ensure()) and stopped by `kproxy lab
down` (stop()). The daemons are its children. It learns of a death at once (a
pidfd per daemon becomes readable when the daemon exits; nothing is polled)
and starts the daemon again: the first time at once, then after kubelet's
crash-loop back-off (10 s, doubled up to 5 min, forgotten after 10 min of
running). It counts each daemon's restarts and keeps them in
supervisor-status.json; a restarted workload also bumps the restartCount of
every running pod of its node in the store (each is a container that restarted).

Files in the lab directory: supervisor.json (what to run, written by ensure():
{"generation": N, "daemons": [Wanted, ...]}), supervisor-status.json (what
runs: {"pid", "applied": N, "daemons": {name: record}}), supervisor.pid,
supervisor.lock (held while it runs: never two per lab), supervisor.log.

SIGHUP: read supervisor.json again; stop the daemons no longer wanted or wanted
with other arguments; start the missing ones at once (a new generation is a
person's `lab up`: no back-off). SIGTERM / SIGINT: stop every daemon, exit.
It also stops its daemons and exits when its lab is gone (supervisor.json
removed, or the pidfile names another process). A daemon already running
when it starts (its supervisor died; `lab up` started this one) is adopted:
watched through a pidfd, and started again as a child when it dies.

What supervises the supervisor is `lab up`, as systemd restarts a kubelet.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kproxy import children
from kproxy.controllers import now_iso, record_restart
from kproxy.errors import KproxyError
from kproxy.lab import processes
from kproxy.store import Store, open_store

MODULE = "kproxy.lab.supervisor"
SPEC = "supervisor.json"
STATUS = "supervisor-status.json"
PIDFILE = "supervisor.pid"
LOCKFILE = "supervisor.lock"
LOGFILE = "supervisor.log"
INITIAL_BACKOFF = 10.0  # kubelet's crash-loop back-off
MAX_BACKOFF = 300.0
BACKOFF_RESET = 600.0  # a daemon that ran this long starts again at once
STOP_TIMEOUT = 5.0  # SIGTERM, then SIGKILL
LAB_CHECK = 2.0  # how often it looks whether its lab still exists
ENSURE_TIMEOUT = 60.0  # per daemon: a Python start in an emulated guest under load took over 20 s
KINDS = {d.kind: d for d in processes.DAEMONS}


@dataclass(frozen=True)
class Wanted:
    """A daemon the supervisor keeps running: AGENT or WORKLOAD of one node."""

    kind: str
    node: str
    netns: str
    args: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.node}"

    @property
    def daemon(self) -> processes.Daemon:
        return KINDS[self.kind]


class Backoff:
    """kubelet's crash-loop back-off of one daemon: how long to wait before its next start."""

    def __init__(self) -> None:
        self.delay = 0.0

    def after_exit(self, ran_for: float) -> float:
        if ran_for >= BACKOFF_RESET:
            self.delay = 0.0
        delay = self.delay
        self.delay = INITIAL_BACKOFF if delay == 0 else min(2 * delay, MAX_BACKOFF)
        return delay

    def reset(self) -> None:
        self.delay = 0.0


@dataclass
class Record:
    """One supervised daemon: what it is, how it runs, how often it was restarted."""

    wanted: Wanted
    restarts: int = 0
    started_at: str = ""  # wall clock of the last start ("": never started)
    last_exit: dict[str, Any] | None = None
    pid: int | None = None
    pidfd: int | None = None
    proc: subprocess.Popen[bytes] | None = None  # None when adopted (not our child)
    started: float = 0.0  # monotonic
    next_start: float | None = None  # monotonic time of a pending start
    backoff: Backoff = field(default_factory=Backoff)

    def public(self) -> dict[str, Any]:
        return {"kind": self.wanted.kind, "node": self.wanted.node, "args": list(self.wanted.args),
                "pid": self.pid, "restarts": self.restarts, "startedAt": self.started_at,
                "lastExit": self.last_exit,
                "waiting": "CrashLoopBackOff" if self.pid is None and self.next_start is not None else None}


# --- the supervisor process ----------------------------------------------------

class Supervisor:
    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.records: dict[str, Record] = {}
        self.generation = 0
        self.selector = selectors.DefaultSelector()
        self.wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wakeup_w)
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)  # the wakeup fd says which one came
        self.selector.register(self.wakeup_r, selectors.EVENT_READ)
        self.previous = read_status(lab_dir).get("daemons", {})  # an earlier supervisor's counts

    def run(self) -> None:
        wanted = self._load_spec()
        if wanted is None:
            return
        self.reconcile(wanted)
        while True:
            now = time.monotonic()
            due = [r.next_start for r in self.records.values() if r.next_start is not None]
            timeout = max(0.0, min([LAB_CHECK, *(t - now for t in due)]))
            ready = [key for key, _ in self.selector.select(timeout)]
            # Deaths first: a reconcile may stop daemons and close pidfds (whose numbers a new
            # pidfd may then reuse) that are still among these events.
            for key in ready:
                if key.fd != self.wakeup_r:
                    self._exited(key.data)
            if any(key.fd == self.wakeup_r for key in ready):
                signums = set(os.read(self.wakeup_r, 64))
                if signums & {signal.SIGTERM, signal.SIGINT}:
                    return
                wanted = self._load_spec()
                if wanted is None:
                    return
                self.reconcile(wanted)
            now = time.monotonic()
            for record in list(self.records.values()):
                if record.next_start is not None and record.next_start <= now:
                    self._start(record)
            if not self._lab_exists():
                return

    def _load_spec(self) -> dict[str, Wanted] | None:
        try:
            raw = json.loads((self.lab_dir / SPEC).read_text())
        except FileNotFoundError:
            return None
        self.generation = raw["generation"]
        wanted = (Wanted(d["kind"], d["node"], d["netns"], tuple(d["args"])) for d in raw["daemons"])
        return {w.name: w for w in wanted}

    def _lab_exists(self) -> bool:
        return (self.lab_dir / SPEC).exists() and supervisor_pid(self.lab_dir) == os.getpid()

    def reconcile(self, wanted: dict[str, Wanted]) -> None:
        stale = [r for name, r in self.records.items() if wanted.get(name) != r.wanted]
        self.stop([r for r in stale if r.pid is not None])
        for record in stale:
            del self.records[record.wanted.name]
        for daemon in processes.DAEMONS:  # an earlier supervisor's, no longer wanted
            for node in processes.nodes_with(daemon, self.lab_dir):
                if f"{daemon.kind}-{node}" not in wanted:
                    processes.stop(daemon, self.lab_dir, node)
        for name, want in wanted.items():
            record = self.records.get(name)
            if record is None:
                record = self.records[name] = self._record(want)
            if record.pid is None and not self._adopt(record):
                record.backoff.reset()
                self._start(record)
        self._save()

    def _record(self, want: Wanted) -> Record:
        """A new record, with the counts an earlier supervisor kept for the very same daemon."""
        old = self.previous.get(want.name) or {}
        if [old.get("kind"), old.get("node"), old.get("args")] != [want.kind, want.node, list(want.args)]:
            return Record(want)
        return Record(want, restarts=old.get("restarts", 0), started_at=old.get("startedAt", ""),
                      last_exit=old.get("lastExit"))

    def _adopt(self, record: Record) -> bool:
        """Watch a daemon that runs already, if it runs exactly as wanted (command line and
        namespace); stop it if it does not."""
        want = record.wanted
        pid = processes.running_pid(want.daemon, self.lab_dir, want.node)
        if pid is None:
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        if processes.running_pid(want.daemon, self.lab_dir, want.node) != pid:  # gone before the pidfd
            os.close(pidfd)
            return False
        self._watch(record, pid, pidfd, None)
        if not _runs_as(pid, processes.argv(want.daemon, self.lab_dir, want.node, want.netns, list(want.args)),
                        want.netns):
            self.stop([record])
            return False
        if not record.started_at:
            record.started_at = now_iso()
        log(f"adopted {want.name} (pid {pid})")
        return True

    def _watch(self, record: Record, pid: int, pidfd: int, proc: subprocess.Popen[bytes] | None) -> None:
        record.pid, record.pidfd, record.proc = pid, pidfd, proc
        record.started = time.monotonic()
        record.next_start = None
        self.selector.register(pidfd, selectors.EVENT_READ, record)

    def _start(self, record: Record) -> None:
        want = record.wanted
        restart = bool(record.started_at)
        try:
            proc = processes.spawn(want.daemon, self.lab_dir, want.node, want.netns, list(want.args))
            pidfd = os.pidfd_open(proc.pid)
        except OSError as exc:
            log(f"cannot start {want.name}: {exc}")
            record.next_start = time.monotonic() + record.backoff.after_exit(0.0)
            self._save()
            return
        self._watch(record, proc.pid, pidfd, proc)
        record.started_at = now_iso()
        if restart:
            record.restarts += 1
        self._save()
        log(f"{'restarted' if restart else 'started'} {want.name} (pid {proc.pid}, restarts {record.restarts})")
        if restart and want.kind == processes.WORKLOAD.kind:
            bump_restart_counts(open_store(self.lab_dir), want.node, record.started_at, record.last_exit)

    def _exited(self, record: Record) -> None:
        assert record.pidfd is not None
        code: int | None = None
        if record.proc is not None:
            code = record.proc.wait()  # it has exited: this only reaps it
        self._forget(record)
        ran_for = time.monotonic() - record.started
        record.last_exit = {"exitCode": 128 - code if code is not None and code < 0 else code,
                            "signal": signal.Signals(-code).name if code is not None and code < 0 else None,
                            "startedAt": record.started_at, "finishedAt": now_iso()}
        delay = record.backoff.after_exit(ran_for)
        record.next_start = time.monotonic() + delay
        self._save()
        how = f"exit code {code}" if code is None or code >= 0 else f"signal {-code}"
        log(f"{record.wanted.name} exited ({how}) after {ran_for:.1f}s; starting again in {delay:.0f}s")

    def _forget(self, record: Record) -> None:
        if record.pidfd is not None:
            self.selector.unregister(record.pidfd)
            os.close(record.pidfd)
        record.pid = record.pidfd = record.proc = None

    def stop(self, records: list[Record]) -> None:
        """SIGTERM each (through its pidfd: never a recycled pid), SIGKILL what is left after STOP_TIMEOUT."""
        pidfds = [r.pidfd for r in records if r.pidfd is not None]
        for pidfd in pidfds:
            children.send(pidfd, signal.SIGTERM)
            children.send(pidfd, signal.SIGCONT)  # a stopped process handles SIGTERM only once continued
        for pidfd in children.still_running(pidfds, STOP_TIMEOUT):
            children.send(pidfd, signal.SIGKILL)
        for record in records:
            if record.proc is not None:
                record.proc.wait()
            self._forget(record)
            record.wanted.daemon.pidfile(self.lab_dir, record.wanted.node).unlink(missing_ok=True)
            record.next_start = None

    def shutdown(self) -> None:
        self.stop([r for r in self.records.values() if r.pid is not None])
        for record in self.records.values():
            record.next_start = None
        if self.lab_dir.is_dir():  # the counts outlive this supervisor, not the lab
            self._save()

    def _save(self) -> None:
        _write_json(self.lab_dir / STATUS, {"pid": os.getpid(), "applied": self.generation,
                                             "daemons": {n: r.public() for n, r in sorted(self.records.items())}})


def _runs_as(pid: int, argv: list[str], netns: str) -> bool:
    """Whether pid runs argv (as nsenter execs it: what follows "--") in the namespace netns."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
        return cmdline == [a.encode() for a in argv[argv.index("--") + 1:]] and \
            os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino
    except FileNotFoundError:
        return False


def bump_restart_counts(store: Store, node: str, started_at: str, last_exit: dict[str, Any] | None) -> None:
    """Every running pod of node: its container restarted (Pod status.containerStatuses[0])."""
    changes = {}
    for key, pod in store.read().objects.items():
        if key.startswith("Pod/") and pod["spec"].get("nodeName") == node and \
                pod.get("status", {}).get("phase") == "Running":
            changes[key] = record_restart(pod, started_at, last_exit)
    if changes:
        store.write(changes)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} kproxy-supervisor: {message}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.lab.supervisor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    lock = os.open(args.lab_dir / LOCKFILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another supervisor runs for {args.lab_dir}")
        return 1
    supervisor = Supervisor(args.lab_dir)
    _write_json(args.lab_dir / PIDFILE, os.getpid())  # after the signal handlers: SIGHUP is safe from now on
    try:
        supervisor.run()
    finally:
        supervisor.shutdown()
        if supervisor_pid(args.lab_dir) == os.getpid():
            (args.lab_dir / PIDFILE).unlink(missing_ok=True)
    log("stopped")
    return 0


# --- what `lab up` and `lab down` use -------------------------------------------

def supervisor_pid(lab_dir: Path) -> int | None:
    return processes.verified_pid(lab_dir / PIDFILE, MODULE, lab_dir)


def read_status(lab_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((lab_dir / STATUS).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def current(lab_dir: Path) -> list[Wanted]:
    """What the lab's supervisor is asked to run."""
    try:
        daemons = json.loads((lab_dir / SPEC).read_text())["daemons"]
    except (FileNotFoundError, ValueError, KeyError):
        return []
    return [Wanted(d["kind"], d["node"], d["netns"], tuple(d["args"])) for d in daemons]


def ensure(lab_dir: Path, wanted: list[Wanted], wait_running: bool = True) -> None:
    """Make the lab's supervisor run exactly these daemons (starting the supervisor if it is not
    running). Returns once it stopped the others and, with wait_running, once each of these
    runs and wrote its pidfile."""
    spec_file = lab_dir / SPEC
    try:
        generation = json.loads(spec_file.read_text())["generation"]
    except (FileNotFoundError, ValueError, KeyError):
        generation = 0
    pid = supervisor_pid(lab_dir)
    if pid is not None and current(lab_dir) == wanted and \
            all(processes.running_pid(w.daemon, lab_dir, w.node) for w in wanted):
        return
    generation += 1
    _write_json(spec_file, {"generation": generation, "daemons": [asdict(w) for w in wanted]})
    started = None
    if pid is None:
        with open(lab_dir / LOGFILE, "ab") as out:
            # cwd /: neither it nor its daemons keep the caller's directory busy.
            started = subprocess.Popen([sys.executable, "-m", MODULE, "--lab-dir", str(lab_dir)], cwd="/",
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    else:
        os.kill(pid, signal.SIGHUP)
        os.kill(pid, signal.SIGCONT)  # up reconciles a stopped (SIGSTOP) supervisor too
    deadline = time.monotonic() + ENSURE_TIMEOUT
    running = 0
    while True:
        status = read_status(lab_dir)
        if status.get("applied", 0) >= generation and status.get("pid") == supervisor_pid(lab_dir):
            if not wait_running:
                return
            records = status.get("daemons", {})
            failing = [w for w in wanted if (records.get(w.name) or {}).get("waiting")]
            if failing:
                w = failing[0]
                raise KproxyError(f"the {w.kind} of node {w.node} did not start: "
                                  f"{processes.log_tail(w.daemon.logfile(lab_dir, w.node))}")
            now_running = sum(1 for w in wanted if processes.running_pid(w.daemon, lab_dir, w.node))
            if now_running == len(wanted):
                return
            if now_running > running:  # a slow machine gets ENSURE_TIMEOUT per daemon, not for all
                running, deadline = now_running, time.monotonic() + ENSURE_TIMEOUT
        if started is not None and started.poll() is not None:
            raise KproxyError(f"the supervisor of {lab_dir} did not start: {processes.log_tail(lab_dir / LOGFILE)}")
        if time.monotonic() > deadline:
            pending = [w.name for w in wanted if not processes.running_pid(w.daemon, lab_dir, w.node)]
            raise KproxyError(f"the supervisor of {lab_dir} did not start {', '.join(pending) or 'in time'} "
                              f"(nothing more started within {ENSURE_TIMEOUT:.0f} s)")
        time.sleep(0.005)


def stop(lab_dir: Path) -> None:
    """Stop the lab's supervisor (it stops its daemons first); a stopped (SIGSTOP) one is continued."""
    pid = supervisor_pid(lab_dir)
    if pid is None:
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if supervisor_pid(lab_dir) != pid:  # it exited and the pid was recycled before the pidfd was opened
            return
        for sig in (signal.SIGTERM, signal.SIGCONT):
            children.send(pidfd, sig)
        # Its daemons get STOP_TIMEOUT to stop, then SIGKILL: give it that and a little more.
        if children.still_running([pidfd], 2 * STOP_TIMEOUT + 1):
            children.send(pidfd, signal.SIGKILL)
            children.still_running([pidfd], STOP_TIMEOUT)
    finally:
        os.close(pidfd)
    (lab_dir / PIDFILE).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
