"""Ending a child process this process started: asked first (SIGTERM), then told (SIGKILL)."""

from __future__ import annotations

import subprocess
from typing import Any


def end(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM proc unless it has exited, wait grace seconds for it, then SIGKILL; reaped either way."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
