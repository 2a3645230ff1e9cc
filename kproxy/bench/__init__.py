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


SYNC_TIMEOUT = 3600.0  # a state's sync in a benchmark: 10k Services take minutes in the emulated guest


class SyncFailed(KproxyError):
    """A mode could not program a benchmark's state (or not in time): a finding of the run, not its end."""
