"""``NftablesProxier``: the Proxier of this mode, on the node whose namespace the calling thread is in."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kproxy.proxy.conntrack import StaleUdpCleaner
from kproxy.proxy.fullsync import FULL_SYNC_PERIOD, FullSyncs
from kproxy.proxy.nftables.backend import Backend, Libnftables, TransactionError
from kproxy.proxy.nftables.excerpt import live_rules
from kproxy.proxy.nftables.render import RenderCache, Ruleset, render
from kproxy.proxy.nftables.transaction import Existing, existing_of, full_transaction, partial_transaction
from kproxy.proxy.topology import categorize
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult

class NftablesProxier:
    """kube-proxy's nftables mode: the table ``ip kube-proxy``, one `nft -f` transaction per sync.

    A sync is full the first time, after a failure, after a change of the shared objects
    or of the layout, every `full_sync_every`-th time (0: never for that reason) and
    once `full_sync_period` seconds have passed since the last full one: every object
    is written again and stale ones deleted (what the kernel has is read only when the
    proxier has not written it itself: the first sync). The others are partial: only
    what differs from the last sync. A refused full sync is tried once more as a rebuild
    (the table deleted and written whole, in the same transaction).

    choice: endpoint choice ("auto", "vmap", "cascade"; render.render); counters: a
    counter in every rule of a service's chains. backend: what talks to the kernel (tests use a fake).
    """

    mode = "nftables"

    def __init__(self, node: NodeInfo, *, choice: str = "auto", counters: bool = False,
                 full_sync_every: int = 0, full_sync_period: float = FULL_SYNC_PERIOD,
                 backend: Backend | None = None) -> None:
        self.node = node
        self.choice = choice
        self.counters = counters
        self.full_syncs = FullSyncs(full_sync_every, full_sync_period)
        self.backend: Backend = backend if backend is not None else Libnftables()
        self.ruleset: Ruleset | None = None  # what the kernel has from our last successful sync
        self.last_transaction = ""  # the input of the last transaction attempted (tests, debugging)
        self.conntrack = StaleUdpCleaner(self.mode)
        self._cache = RenderCache()

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        desired = render(state, self.node, choice=self.choice, counters=self.counters, cache=self._cache)
        previous = self.ruleset
        full = self.full_syncs.due(started) or self._layout_changed(desired)
        try:
            if full:
                self._sync_full(desired)
            else:
                assert previous is not None
                self.last_transaction = partial_transaction(desired, previous)
                if self.last_transaction:
                    self.backend.run(self.last_transaction)
        except TransactionError:
            self.full_syncs.needed = True  # nothing of it was applied; the next sync reads what the kernel has
            raise
        changed = len(desired.services) if full else _changed(desired, previous)
        self.ruleset = desired
        self.full_syncs.done(full, started)
        self.conntrack.sync(state, self._cache.by_key, self._reachable)
        return SyncResult(full=full, changed_services=changed, seconds=time.monotonic() - started)

    def _reachable(self, svc: ServicePort, endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
        """The endpoints this node has chains for (their UDP conntrack entries go when they leave)."""
        return categorize(endpoints, svc, self.node.name).reachable

    def _layout_changed(self, desired: Ruleset) -> bool:
        """Whether what every service port shares (node, settings, layout) differs from the kernel's."""
        previous = self.ruleset
        return previous is None or previous.shared != desired.shared or previous.layout != desired.layout

    def _sync_full(self, desired: Ruleset) -> None:
        existing: Existing | None = (existing_of(self.ruleset) if self.ruleset is not None and not self.full_syncs.needed
                                     else self.backend.existing())
        self.last_transaction = full_transaction(desired, existing)
        try:
            self.backend.run(self.last_transaction)
        except TransactionError:
            if existing is None:
                raise
            # Something of ours is not as we think (a set's spec, a chain someone else added
            # a rule to): write the table whole.
            self.last_transaction = _rebuild(desired)
            self.backend.run(self.last_transaction)

    def cleanup(self) -> None:
        """`delete table ip kube-proxy`: every chain, set and map of ours goes with it."""
        self.backend.delete_table()
        self.ruleset = None
        self.full_syncs.needed = True
        self._cache = RenderCache()
        self.conntrack.reset()

    def close(self) -> None:
        """The library's context goes; the kernel's table stays."""
        self.backend.close()

    def rules_excerpt(self, service: str | None = None) -> str:
        return live_rules(self.ruleset, service, self.backend)


def _rebuild(desired: Ruleset) -> str:
    """One transaction that deletes the table (whatever it holds) and writes desired whole."""
    return (f"add table ip kube-proxy\ndelete table ip kube-proxy\n"
            f"{full_transaction(desired, None)}")


def _changed(desired: Ruleset, previous: Ruleset | None) -> int:
    """Service ports whose objects differ between the two rulesets."""
    if previous is None:
        return len(desired.services)
    return sum(1 for key in desired.keys_to_compare(previous)
               if desired.services.get(key) != previous.services.get(key))


if TYPE_CHECKING:
    from kproxy.proxy.mode import Proxier

    _proxier: type[Proxier] = NftablesProxier
    _backend: type[Backend] = Libnftables
