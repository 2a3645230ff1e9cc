"""When a proxier's sync is full: kube-proxy's needFullSync and FullSyncPeriod, for every mode."""

from __future__ import annotations

FULL_SYNC_PERIOD = 3600.0  # kube-proxy's proxyutil.FullSyncPeriod (1 h) between forced full syncs


class FullSyncs:
    """A sync is full when it is the first, when one failed or a cleanup came since the last
    (``needed``), when it is every `every`-th (0: never for that reason), and once `period`
    seconds have passed since the last full one."""

    def __init__(self, every: int = 0, period: float = FULL_SYNC_PERIOD) -> None:
        self.every = every
        self.period = period
        self.needed = True
        self.count = 0
        self.last = 0.0

    def due(self, now: float) -> bool:
        """Whether the sync starting now is full (and counts it)."""
        self.count += 1
        return self.needed or (self.every > 0 and self.count % self.every == 0) or now - self.last >= self.period

    def done(self, full: bool, started: float) -> None:
        """A sync that started at `started` succeeded."""
        self.needed = False
        if full:
            self.last = started
