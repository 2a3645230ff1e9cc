"""One operation at a time on a lab: an exclusive flock on <state root>/.<lab>.lock.

The lock file lives beside the lab's directory, not in it: `down` removes the
directory while holding the lock, and taking the lock of a lab that is not
there creates nothing of that lab but the lock file, which goes again on
release. Whoever releases the lock of a lab that no longer exists removes the
file while still holding it; a waiter that then gets the lock of that removed
file sees so and takes the lock of the file now at the path.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kproxy.lab.state import lab_exists, state_root


def lock_path(lab: str) -> Path:
    return state_root() / f".{lab}.lock"


@contextmanager
def lab_lock(lab: str) -> Iterator[None]:
    """Held for a whole lab operation (up, down, add-node, remove-node, apply, delete, scale, rollout)."""
    path = lock_path(lab)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock(path)
    try:
        yield
    finally:
        try:
            if not lab_exists(lab):
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def _lock(path: Path) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass  # removed by the holder we waited for: take the lock of the next file
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
