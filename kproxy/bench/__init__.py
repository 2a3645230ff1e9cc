"""Benchmarks a person runs by hand (scripts/bench-*); results live in docs/.

They ship in the product, not under tests/, because users run them to compare modes and
overlays on their own machines; no test depends on their numbers."""

import os
import sys

from kproxy.errors import KproxyError


def require_root(prog: str) -> bool:
    """Benchmarks create namespaces: say so and refuse without root."""
    if os.geteuid() == 0:
        return True
    print(f"{prog}: run as root (sudo scripts/{prog})", file=sys.stderr)
    return False


class SyncFailed(KproxyError):
    """A mode could not program a benchmark's state (or not in time): a finding of the run, not its end."""
