"""Stale UDP conntrack entries: kube-proxy's conntrack.CleanStaleEntries, shared by the modes
that NAT in the kernel (iptables, IPVS), with the conntrack CLI like kube-proxy 1.28.

UDP has no connection teardown: after an endpoint leaves, the kernel keeps NATing a
client's flow to it until the entry times out. So when a UDP service port loses an
endpoint, its entries to that endpoint go; when it gets endpoints after having none,
its entries go too (packets sent meanwhile left entries that REJECT or blackhole); and
when it is deleted, the entries to its ClusterIP go. TCP needs none of this.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from kproxy.proxy.types import Endpoint, ProxyState, ServicePort


@dataclass(frozen=True)
class _Applied:
    service: ServicePort
    endpoints: frozenset[tuple[str, str]]  # ("ip:port", ip) of the reachable endpoints


class StaleUdpCleaner:
    """Remembers what the kernel got for UDP service ports and deletes the entries a sync left stale."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.last: list[list[str]] = []  # the conntrack arguments of the last sync
        self._applied: dict[str, _Applied] = {}  # UDP service ports by key
        self._generation = -1

    def reset(self) -> None:
        self._applied, self._generation = {}, -1

    def sync(self, state: ProxyState, by_key: Mapping[str, ServicePort],
             reachable: Callable[[ServicePort, list[Endpoint]], Iterable[Endpoint]]) -> None:
        """After the kernel got state: by_key maps every service port of state by key; reachable
        picks the endpoints of a service port the mode sends traffic to on this node."""
        if state.changed is not None and state.generation == self._generation + 1:
            keys: Iterable[str] = state.changed  # the others are as they were
        else:
            keys = set(self._applied) | set(by_key)
        self._generation = state.generation
        commands: list[list[str]] = []
        for key in sorted(keys):
            svc = by_key.get(key)
            new = None
            if svc is not None and svc.protocol.upper() == "UDP":
                new = _Applied(svc, frozenset((ep.address, ep.ip) for ep in reachable(svc, state.endpoints_of(svc))))
            old = self._applied.pop(key, None)
            if new is not None:
                self._applied[key] = new
            commands += stale_entries(old, new)
        self.last = commands
        for argv in commands:
            try:
                done = subprocess.run(["conntrack", *argv], capture_output=True, text=True)
            except FileNotFoundError:
                print(f"kproxy {self.mode}: conntrack not installed; stale UDP entries stay", file=sys.stderr)
                return
            # Exit 1 with "0 flow entries have been deleted" just means there was nothing to delete.
            if done.returncode != 0 and "0 flow entries" not in done.stderr:
                print(f"kproxy {self.mode}: conntrack {' '.join(argv)}: {done.stderr.strip()}", file=sys.stderr)


def _addresses(svc: ServicePort) -> tuple[str, ...]:
    """The service port's own addresses: ClusterIP, external IPs, load-balancer IPs."""
    return (svc.cluster_ip, *svc.external_ips, *svc.load_balancer_ips)


def stale_entries(old: _Applied | None, new: _Applied | None) -> list[list[str]]:
    """conntrack arguments for the entries one UDP service port's change left stale."""
    commands: list[list[str]] = []
    if old is not None and new is None:  # service port deleted: its addresses may have stale entries
        commands += [["-D", "--orig-dst", ip, "-p", "udp"] for ip in _addresses(old.service)]
    if old is not None and new is not None:
        svc = new.service
        addresses = {address for address, _ in new.endpoints}
        for ip in sorted({ip for address, ip in old.endpoints if address not in addresses}):
            if svc.node_port:
                commands.append(["-D", "-p", "udp", "--dport", str(svc.node_port), "--dst-nat", ip])
            commands += [["-D", "--orig-dst", own, "--dst-nat", ip, "-p", "udp"] for own in _addresses(svc)]
    if new is not None and new.endpoints and (old is None or not old.endpoints):
        commands += [["-D", "--orig-dst", ip, "-p", "udp"] for ip in _addresses(new.service)]
        if new.service.node_port:
            commands.append(["-D", "-p", "udp", "--dport", str(new.service.node_port)])
    return commands
