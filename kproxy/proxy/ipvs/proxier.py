"""IpvsProxier: keeps a node's IPVS table, kube-ipvs0, ipsets and iptables rules as rendered.

Each sync renders only the service ports whose Service or endpoints changed
(render.render_service) and changes in the kernel only what they change, in
named steps: diff, shares (ipset entries, addresses and blocked load-balancer
IPs several service ports may hold), ipsets, iptables (rewritten when the sets
that have entries, or the blocked IPs, change), addresses, virtual servers,
terminating real servers, removals. A full sync (the first, one after an error,
one per full_sync_period) reads what the kernel holds first, so it repairs
whatever drifted.

Endpoint removal is graceful, as kube-proxy's graceful_termination.go: a TCP
real server that leaves gets weight 0 (no new connections, established ones go
on) and is deleted by a later sync once ActiveConn + InActConn is 0; UDP (and
SCTP) real servers go at once, and their conntrack entries with them.
"""

from __future__ import annotations

import time
from typing import Sequence

from kproxy.proxy.conntrack import StaleUdpCleaner
from kproxy.proxy.fullsync import FULL_SYNC_PERIOD, FullSyncs
from kproxy.proxy.ipvs.backend import Backend, NetlinkBackend, RealServer
from kproxy.proxy.ipvs.excerpt import live_excerpt, vs_name
from kproxy.proxy.ipvs.render import (DEFAULT_SCHEDULER, SCHEDULERS, Dest, Piece, VirtualServer, VsKey,
                                      kernel_modules, render_service)
from kproxy.proxy.ipvs.rules import JUMPS, Blocked, iptables_rules, is_own_chain
from kproxy.proxy.ipvs.sets import IPSETS, ipset_swap_text, tmp_set
from kproxy.proxy.ipvs.tracking import Diff, EntryShares, Programmed, ShareChanges, Shares, Signature
from kproxy.proxy.netfilter import restore_tables
from kproxy.proxy.tables import missing_jumps, remove_chains
from kproxy.proxy.topology import categorize
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult

SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",  # netfilter NAT and masquerade see IPVS traffic
    "net/ipv4/vs/expire_nodest_conn": "1",  # a connection to a deleted real server is dropped, not blackholed
    "net/ipv4/vs/expire_quiescent_template": "1",  # persistence does not pin clients to weight-0 servers
    "net/ipv4/ip_forward": "1",
}


class IpvsProxier:
    """kube-proxy's IPVS mode on the node whose network namespace the calling thread is in.

    backend: the kernel (default: NetlinkBackend, opened in the calling thread's namespace at
    the first sync). conntrack: what deletes stale UDP conntrack entries after a sync.
    """

    mode = "ipvs"

    def __init__(self, node: NodeInfo, *, scheduler: str = DEFAULT_SCHEDULER, full_sync_period: float = FULL_SYNC_PERIOD,
                 backend: Backend | None = None, conntrack: StaleUdpCleaner | None = None) -> None:
        self.node = node
        self.scheduler = scheduler
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown IPVS scheduler {self.scheduler!r} (known: {', '.join(SCHEDULERS)})")
        self.full_syncs = FullSyncs(period=full_sync_period)
        self.backend: Backend = backend if backend is not None else NetlinkBackend(kernel_modules(scheduler))
        self.conntrack = conntrack if conntrack is not None else StaleUdpCleaner(self.mode)
        self.programmed = Programmed()
        self._pieces: dict[str, tuple[Signature, Piece]] = {}  # by ServicePort.key: (its inputs, its render)
        self._services: Sequence[ServicePort] | None = None  # the last state's services, and them by key
        self._by_key: dict[str, ServicePort] = {}
        self._generation = -1
        self._entries = EntryShares()
        self._addresses: Shares[str] = Shares()
        self._blocked: Shares[Blocked] = Shares()
        # virtual servers with weight-0 real servers -> the real servers they want
        self._terminating: dict[VsKey, tuple[Dest, ...]] = {}

    def _forget_shares(self) -> None:
        """Start counting holders afresh (the next sync is a full one, which takes them all again)."""
        self._entries = EntryShares()
        self._addresses = Shares()
        self._blocked = Shares()
        self._terminating = {}

    def close(self) -> None:
        self.backend.close()

    # sync ------------------------------------------------------------------

    def sync(self, state: ProxyState) -> SyncResult:
        """Program state; changed_services counts the service ports whose virtual servers, real
        servers, addresses or (at a partial sync) ipset entries it changed. A full sync rewrites
        every ipset whole, so an ipset repaired there is not counted; what it removes that no
        service port of state owns counts once per virtual server or address."""
        started = time.monotonic()
        full = self.full_syncs.due(started)
        self.backend.open()
        try:
            if full:
                self._prepare_node()
                self._read_back()
                self._pieces = {}
            changed = self._apply(state, full)
        except Exception:
            self.full_syncs.needed = True
            raise
        self.full_syncs.done(full, started)
        self.conntrack.sync(state, self._by_key, self._reachable)
        return SyncResult(full=full, changed_services=changed, seconds=time.monotonic() - started)

    def _reachable(self, svc: ServicePort, endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
        """The endpoints some virtual server of svc sends to on this node (for conntrack cleanup)."""
        return categorize(endpoints, svc, self.node.name).reachable

    def _apply(self, state: ProxyState, full: bool) -> int:
        """Change in the kernel what the service ports that changed since the last sync change (at
        a full sync: everything, against what the kernel was read to hold). Returns how many
        service ports' programming changed."""
        diff = self._diff(state, full)
        if not diff.changed and not diff.removed and not full and not self._terminating:
            return 0
        shares = self._count_shares(diff)
        touched: set[str] = set()  # keys of the service ports changed, or names of what no port owns
        self._sync_ipsets(shares, full, touched)
        self._sync_iptables()
        self._add_addresses(diff, shares, full, touched)
        wanted = self._sync_virtual_servers(diff, full, touched)
        self._sync_terminating(diff, wanted, touched)
        self._remove_virtual_servers(diff, full, wanted, touched)
        self._remove_addresses(shares, full, touched)
        self._pieces = diff.pieces
        return len(touched)

    def _diff(self, state: ProxyState, full: bool) -> Diff:
        """Render the service ports that may have changed; keep the pieces of the others."""
        old = self._pieces
        if self._services is not state.services:
            self._services, self._by_key = state.services, {svc.key: svc for svc in state.services}
        # The tracker says which service ports may have changed since the state we synced last;
        # without that (or at a full sync) every one is compared.
        hint = state.changed if not full and state.generation == self._generation + 1 else None
        self._generation = state.generation
        candidates = state.services if hint is None else [self._by_key[k] for k in sorted(hint) if k in self._by_key]
        pieces = {} if hint is None else dict(old)
        changed: list[str] = []
        for svc in candidates:
            signature = (svc, tuple(state.endpoints.get(svc.key, ())))
            before = old.get(svc.key)
            if before is not None and before[0] == signature:
                pieces[svc.key] = before
                continue
            pieces[svc.key] = (signature, render_service(svc, signature[1], self.node, self.scheduler))
            changed.append(svc.key)
        if hint is not None:
            removed = [key for key in sorted(hint) if key in old and key not in self._by_key]
            for key in removed:
                del pieces[key]
        else:
            removed = [key for key in old if key not in pieces]
        return Diff(old, pieces, changed, removed)

    def _count_shares(self, diff: Diff) -> ShareChanges:
        """Let the old pieces of changed and removed service ports go, take the new ones."""
        out = ShareChanges()
        for key in diff.removed + diff.changed:
            before = diff.old.get(key)
            if before is None:
                continue
            for item in before[1].entries:
                if self._entries.drop(item):
                    out.deleted_entries[item] = key
            for ip in before[1].addresses:
                if self._addresses.drop(ip):
                    out.deleted_addresses[ip] = key
            for blocked in before[1].blocked:
                self._blocked.drop(blocked)
        for key in diff.changed:
            piece = diff.pieces[key][1]
            for item in piece.entries:
                if self._entries.take(item):
                    out.added_entries[item] = key
            for ip in piece.addresses:
                if self._addresses.take(ip):
                    out.added_addresses[ip] = key
            for blocked in piece.blocked:
                self._blocked.take(blocked)
        return out

    def _sync_ipsets(self, shares: ShareChanges, full: bool, touched: set[str]) -> None:
        """One ``ipset restore``: at a full sync every set rebuilt and swapped in, else the entries
        whose first holder came or last holder went (an entry that only moved stays)."""
        if full:
            sets: dict[str, list[str]] = {name: [] for name in IPSETS}
            for name, entry in self._entries.counts:
                sets[name].append(entry)
            self.backend.ipset_restore(ipset_swap_text(sets))
            return
        moved = shares.added_entries.keys() & shares.deleted_entries.keys()
        deleted = [(item, key) for item, key in shares.deleted_entries.items() if item not in moved]
        added = [(item, key) for item, key in shares.added_entries.items() if item not in moved]
        lines = [f"del {name} {entry} -exist" for (name, entry), _ in deleted]
        lines += [f"add {name} {entry} -exist" for (name, entry), _ in added]
        if lines:
            self.backend.ipset_restore("\n".join(lines) + "\n")
            touched.update(key for _, key in deleted + added)

    def _sync_iptables(self) -> None:
        """The rules that use the ipsets, when they changed: with the sets that have entries, or
        the load-balancer IPs the node may not reach."""
        iptables = iptables_rules(self.node, self._entries.sizes, self._blocked.counts)
        if iptables != self.programmed.iptables:
            self.backend.netfilter.restore(iptables + self._missing_jumps())
            self.programmed.iptables = iptables

    def _missing_jumps(self) -> str:
        missing = missing_jumps(self.backend.netfilter, JUMPS)
        tables = {table: ((), ()) for table in ("nat", "filter") if any(j.table == table for j in missing)}
        return restore_tables(tables, missing) if tables else ""

    def _add_addresses(self, diff: Diff, shares: ShareChanges, full: bool, touched: set[str]) -> None:
        """The addresses that came onto kube-ipvs0 (at a full sync: every one it lacks)."""
        wanted = self._addresses.counts
        if full:
            missing = sorted(wanted.keys() - self.programmed.addresses)
            holders = ({ip: key for key, (_, piece) in diff.pieces.items() for ip in piece.addresses}
                       if missing else {})
            adding = {ip: holders[ip] for ip in missing}
        else:
            adding = shares.added_addresses
        for ip, key in adding.items():
            if ip not in self.programmed.addresses:
                self.backend.add_address(ip)
                self.programmed.addresses.add(ip)
                touched.add(key)

    def _sync_virtual_servers(self, diff: Diff, full: bool, touched: set[str]) -> set[VsKey]:
        """Add or update the virtual servers of the changed service ports (at a full sync: of
        every one) and their real servers; returns the keys of those virtual servers."""
        keys = diff.pieces if full else diff.changed
        wanted = {vs.key for key in keys for vs, _ in diff.pieces[key][1].services}
        for key in keys:
            piece = diff.pieces[key][1]
            for vs, dests in piece.services:
                current = self.programmed.services.get(vs.key)
                if current is None:
                    self.backend.add_virtual_server(vs)
                    self.programmed.services[vs.key] = vs
                    self.programmed.dests[vs.key] = {}
                    touched.add(key)
                elif current != vs:  # scheduler or persistence changed
                    self.backend.set_virtual_server(vs)
                    self.programmed.services[vs.key] = vs
                    touched.add(key)
                if self._sync_dests(vs, dests):
                    touched.add(key)
        return wanted

    def _sync_terminating(self, diff: Diff, visited: set[VsKey], touched: set[str]) -> None:
        """Real servers still terminating in virtual servers this sync did not visit: deleted once idle."""
        owners: dict[VsKey, str] | None = None
        for vs_key, wanted in list(self._terminating.items()):
            vs = self.programmed.services.get(vs_key)
            if vs is None or vs_key in visited:
                continue
            if self._sync_dests(vs, wanted):
                if owners is None:
                    owners = {v.key: key for key, (_, piece) in diff.pieces.items() for v, _ in piece.services}
                touched.add(owners.get(vs_key, vs_name(vs)))

    def _remove_virtual_servers(self, diff: Diff, full: bool, wanted: set[VsKey], touched: set[str]) -> None:
        """Delete the virtual servers (with their real servers) that no service port wants any more."""
        if full:
            gone = {k: vs_name(self.programmed.services[k]) for k in self.programmed.services if k not in wanted}
        else:
            gone = {vs.key: key for key in diff.removed + diff.changed if key in diff.old
                    for vs, _ in diff.old[key][1].services if vs.key not in wanted}
        for vs_key, owner in gone.items():
            if vs_key in self.programmed.services:
                self.backend.delete_virtual_server(self.programmed.services[vs_key])
                del self.programmed.services[vs_key]
                self.programmed.dests.pop(vs_key, None)
                self._terminating.pop(vs_key, None)
                touched.add(owner)

    def _remove_addresses(self, shares: ShareChanges, full: bool, touched: set[str]) -> None:
        """The addresses whose last service port went (at a full sync: every one not wanted)."""
        wanted = self._addresses.counts
        if full:
            removing = {ip: f"address {ip}" for ip in sorted(self.programmed.addresses - wanted.keys())}
        else:
            removing = shares.deleted_addresses
        for ip, key in removing.items():
            if ip in self.programmed.addresses and ip not in wanted:
                self.backend.delete_address(ip)
                self.programmed.addresses.discard(ip)
                touched.add(key)

    def _sync_dests(self, vs: VirtualServer, wanted: tuple[Dest, ...]) -> bool:
        """Give vs the real servers wanted (weight 1); those that leave go at once (UDP, SCTP) or
        through weight 0 until idle (TCP). Returns whether anything changed."""
        have = self.programmed.dests.setdefault(vs.key, {})
        changed = False
        for dest in wanted:
            current = have.get(dest)
            if current is None:
                self.backend.add_real_server(vs, dest, 1)
                have[dest] = RealServer(1)
                changed = True
            elif current.weight != 1:  # back from graceful termination
                self.backend.set_real_server(vs, dest, 1)
                current.weight = 1
                changed = True
        wanted_set = set(wanted)
        leaving = [d for d in have if d not in wanted_set]
        if not leaving:
            self._terminating.pop(vs.key, None)
            return changed
        graceful = vs.protocol == "TCP"  # kube-proxy: no graceful termination for UDP and SCTP
        counts = self.backend.real_servers(vs) if graceful and any(have[d].weight == 0 for d in leaving) else {}
        for dest in leaving:
            if graceful and have[dest].weight != 0:
                self.backend.set_real_server(vs, dest, 0)
                have[dest].weight = 0
                changed = True
                continue
            live = counts.get(dest)
            if graceful and live is not None and live.active + live.inactive > 0:
                continue  # still has connections: a later sync deletes it
            self.backend.delete_real_server(vs, dest)
            del have[dest]
            changed = True
        if any(d.weight == 0 for d in have.values()):
            self._terminating[vs.key] = tuple(wanted)
        else:
            self._terminating.pop(vs.key, None)
        return changed

    def _prepare_node(self) -> None:
        self.backend.ensure_link()
        for name, value in SYSCTLS.items():  # /proc/sys/net/ipv4/vs exists once ip_vs is loaded
            self.backend.netfilter.set_sysctl(name, value)

    def _read_back(self) -> None:
        """Start over from what the kernel holds (the full sync that follows visits every virtual
        server, so nothing is left terminating unseen)."""
        programmed = Programmed()
        for vs in self.backend.virtual_servers():
            programmed.services[vs.key] = vs
        for key, vs in programmed.services.items():
            programmed.dests[key] = self.backend.real_servers(vs)
        programmed.addresses = self.backend.link_addresses()
        self.programmed = programmed
        self._forget_shares()

    # looking ---------------------------------------------------------------

    @property
    def owners(self) -> dict[VsKey, str]:
        """Which service port each virtual server of the last sync belongs to."""
        return {vs.key: piece.owner for _, piece in self._pieces.values() for vs, _ in piece.services}

    def terminating(self) -> dict[str, list[str]]:
        """Real servers kept at weight 0 until their connections end, by virtual server ("TCP ip:port")."""
        out = {}
        for key, vs in self.programmed.services.items():
            idle = [f"{ip}:{port}" for (ip, port), d in self.programmed.dests.get(key, {}).items() if d.weight == 0]
            if idle:
                out[vs_name(vs)] = idle
        return out

    def rules_excerpt(self, service: str | None = None, owners: dict[VsKey, str] | None = None) -> str:
        """``ipvsadm -Ln``-like: the live virtual servers (of one service, or all), then our ipsets'
        sizes. owners: which service port each virtual server belongs to (default: what this
        proxier synced)."""
        self.backend.open()
        return live_excerpt(self.backend, self.owners if owners is None else owners, service)

    # cleanup ---------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove every trace of IPVS mode: virtual servers, kube-ipvs0, our iptables rules and ipsets.
        The netlink sockets are closed afterwards (a later sync opens new ones)."""
        self.backend.open()
        try:
            for vs in self.backend.virtual_servers():
                self.backend.delete_virtual_server(vs)
            self.backend.delete_link()
        finally:
            self.close()
        remove_chains(self.backend.netfilter, is_own_chain)
        for name in IPSETS:
            for set_name in (name, tmp_set(name)):
                self.backend.ipset_destroy(set_name)
        self.programmed = Programmed()
        self.full_syncs.needed = True
        self.conntrack.reset()
        self._pieces = {}
        self._forget_shares()

