"""What the modes' tracers (Mode.tracer, for `kproxy trace`) share: a command run in a node's
namespace, and a monitor process there whose lines are collected while the probe runs."""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Callable

from kproxy.children import end
from kproxy.errors import KproxyError

READY_TIMEOUT = 10.0  # seconds for a monitor to show it listens, on a loaded machine
TRACE_COMMENT = "kproxy trace"  # how every trace's rules begin their comment (Probe.comment)
TRACE_NAME = "kproxy-trace"  # how every trace's tables and chains begin their name (Probe.name)


def in_node(netns_path: str, *argv: str, stdin: str | None = None, check: bool = True) -> str:
    """argv inside the node's namespace; its stdout. A failure (check) is one KproxyError line."""
    done = subprocess.run(["nsenter", f"--net={netns_path}", "--", *argv], input=stdin, capture_output=True,
                          text=True)
    if check and done.returncode != 0:
        detail = done.stderr.strip().splitlines()
        raise KproxyError(f"{argv[0]} in {netns_path.rsplit('/', 1)[-1]} failed: "
                          f"{detail[-1] if detail else done.returncode}")
    return done.stdout


class Listener:
    """A monitor (xtables-monitor, nft monitor) in a node's namespace, its lines kept as they come."""

    def __init__(self, netns_path: str, argv: list[str], name: str) -> None:
        self.netns_path, self.argv, self.name = netns_path, argv, name
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def start(self, ready: Callable[[str], bool], poke: Callable[[], None]) -> None:
        """Start the monitor and poke (a change it prints) until a line is ready: from then on it
        sees everything. A monitor subscribes some time after it starts; one poke could come first."""
        self._proc = subprocess.Popen(["nsenter", f"--net={self.netns_path}", "--", *self.argv],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + READY_TIMEOUT
        with self._changed:
            while not any(ready(line) for line in self.lines):
                if time.monotonic() > deadline or self._proc.poll() is not None:
                    said = "; ".join(self.lines[-2:]) or "no output"
                    raise KproxyError(f"{self.name} in {self.netns_path.rsplit('/', 1)[-1]} did not start "
                                      f"listening: {said}")
                poke()
                self._changed.wait(0.25)

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def count(self) -> int:
        with self._changed:
            return len(self.lines)

    def stop(self) -> list[str]:
        """End the monitor (ours, by its process); every line it printed."""
        if self._proc is not None:
            end(self._proc)
            if self._reader is not None:
                self._reader.join(5)
            self._proc = None
        return list(self.lines)
