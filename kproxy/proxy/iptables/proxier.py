"""``IptablesProxier``: the Proxier of this mode, on the node whose namespace the calling thread is in."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from kproxy.proxy.conntrack import StaleUdpCleaner
from kproxy.proxy.fullsync import FULL_SYNC_PERIOD, FullSyncs
from kproxy.proxy.tables import Backend, Commands, remove_chains
from kproxy.proxy.iptables.chainscan import ChainScan
from kproxy.proxy.iptables.excerpt import live_rules
from kproxy.proxy.iptables.names import is_own_chain
from kproxy.proxy.iptables.render import RenderCache, Ruleset, render
from kproxy.proxy.iptables.restore import changed_service_ports, restore_input, write_full_restore
from kproxy.proxy.kernel import RestoreError
from kproxy.proxy.topology import categorize
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult

class IptablesProxier:
    """kube-proxy's iptables mode on the node whose network namespace the calling thread is in.

    Every command (iptables-nft-restore and friends, conntrack) is a child of the
    calling thread, so it acts on that thread's namespace: the agent runs inside
    its node; tests wrap calls in cni.netns.entered(path). backend: what runs
    them (tests/fakes/iptables.py keeps tables in memory instead).

    Syncs: the first one, the one after a failure or a cleanup, every
    `full_sync_every`-th one (0: never for that reason) and any once
    `full_sync_period` seconds have passed since the last full one (kube-proxy:
    1 h) are full: the tables' chain names and built-in chains are read to
    find stale chains of ours and missing jumps, and every chain is written
    (write_full_restore). The others are partial (restore_input). Either
    way: one iptables-nft-restore --noflush, so chains of others (CNI's) survive.
    """

    mode = "iptables"

    def __init__(self, node: NodeInfo, *, full_sync_every: int = 0, full_sync_period: float = FULL_SYNC_PERIOD,
                 localhost_nodeports: bool = True, backend: Backend | None = None) -> None:
        self.node = node
        self.full_syncs = FullSyncs(full_sync_every, full_sync_period)
        self.localhost_nodeports = localhost_nodeports
        self.backend: Backend = backend if backend is not None else Commands("iptables")
        self.ruleset: Ruleset | None = None  # what the kernel has from our last successful sync
        self.last_restore = ""  # the input of the last restore attempted (for tests and debugging)
        self.conntrack = StaleUdpCleaner(self.mode)
        self._cache = RenderCache()

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        full = self.full_syncs.due(started) or self.ruleset is None
        try:
            desired = self._sync_full(state) if full else self._sync_partial(state)
        except RestoreError:
            # The changes since the last good sync are still ours to compute (we keep the
            # previous ruleset), but the kernel may now hold half of them: resync fully.
            self.full_syncs.needed = True
            raise
        changed = changed_service_ports(desired, self.ruleset, full)
        self.ruleset = desired
        self.full_syncs.done(full, started)
        self.conntrack.sync(state, self._cache.by_key, self._reachable)  # by_key: filled by the render
        return SyncResult(full=full, changed_services=len(changed), seconds=time.monotonic() - started)

    def _reachable(self, svc: ServicePort, endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
        """The endpoints this node has KUBE-SEP- chains for: the ones its conntrack entries may NAT to."""
        return categorize(endpoints, svc, self.node.name).reachable

    def _sync_full(self, state: ProxyState) -> Ruleset:
        """Every chain of ours written, stale ones deleted, missing jumps added: one streamed restore."""
        liberal = self._tcp_liberal()
        written: list[str] = []
        # The restore starts first (its start-up overlaps ours), then the tables are read
        # while the rules render.
        with self.backend.restore_stream(counters=True) as feed:  # --counters, as kube-proxy
            self._prepare_node()
            scan = ChainScan(self.backend, self.localhost_nodeports)

            def write(chunk: str) -> None:
                written.append(chunk)
                feed(chunk)

            desired = write_full_restore(state, self.node, write, find_leftovers=scan.leftovers, cache=self._cache,
                                         localhost_nodeports=self.localhost_nodeports, conntrack_tcp_liberal=liberal)
        self.last_restore = "".join(written)
        return desired

    def _sync_partial(self, state: ProxyState) -> Ruleset:
        """Only the chains that changed since the last sync (no restore at all if none did)."""
        assert self.ruleset is not None
        desired = render(state, self.node, cache=self._cache, localhost_nodeports=self.localhost_nodeports,
                         conntrack_tcp_liberal=self._tcp_liberal())
        self.last_restore = restore_input(desired, self.ruleset)
        if self.last_restore:
            self.backend.restore(self.last_restore, counters=True)
        return desired

    def _prepare_node(self) -> None:
        if self.localhost_nodeports:
            # NodePorts on 127.0.0.1 need DNAT of loopback-destined packets to route out.
            self.backend.set_sysctl("net/ipv4/conf/all/route_localnet", "1")

    def _tcp_liberal(self) -> bool:
        return self.backend.sysctl("net/netfilter/nf_conntrack_tcp_be_liberal") not in (None, "", "0")

    def cleanup(self) -> None:
        """Remove every jump into our chains and all our chains (filter and nat), in one restore."""
        remove_chains(self.backend, is_own_chain)
        self.ruleset = None
        self.full_syncs.needed = True
        self.conntrack.reset()

    def close(self) -> None:
        """Nothing stays open between syncs (every command is a child that has exited)."""

    def rules_excerpt(self, service: str | None = None) -> str:
        return live_rules(self.ruleset.owners if self.ruleset is not None else {}, service, self.backend)


if TYPE_CHECKING:  # checked by a type checker, as kube-proxy's `var _ proxy.Provider = &Proxier{}`
    from kproxy.proxy.mode import Proxier

    _proxier: type[Proxier] = IptablesProxier
    _backend: type[Backend] = Commands
