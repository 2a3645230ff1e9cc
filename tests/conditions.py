"""Waiting on a condition in tests, never on a sleep of a guessed length."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60) -> Any:
    """check()'s first truthy value, tried every 2 ms; AssertionError naming what after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.002)
