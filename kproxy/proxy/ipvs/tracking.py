"""What IpvsProxier keeps between syncs: what it has programmed, the shares of ipset entries,
addresses and blocked load-balancer IPs, and the diff of one sync."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Generic, Hashable, TypeVar

from kproxy.proxy.ipvs.backend import RealServer
from kproxy.proxy.ipvs.render import Dest, Entry, Piece, VirtualServer, VsKey
from kproxy.proxy.types import Endpoint, ServicePort

Signature = tuple[ServicePort, tuple[Endpoint, ...]]  # what a Piece is rendered from
T = TypeVar("T", bound=Hashable)


@dataclass
class Programmed:
    """What this proxier has programmed into the kernel, as far as it knows: read back at a full
    sync, then kept up to date by every change it makes."""

    services: dict[VsKey, VirtualServer] = field(default_factory=dict)
    dests: dict[VsKey, dict[Dest, RealServer]] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)  # on kube-ipvs0
    iptables: str = ""  # the last restore text (empty after a read: rewritten at the full sync)


class Shares(Generic[T]):
    """How many service ports hold each item (an ipset entry, an address on kube-ipvs0, a blocked
    load-balancer IP): two ports of one Service share a ClusterIP, two Services may share a
    hairpin entry. An item goes into the kernel with its first holder and out with its last."""

    def __init__(self) -> None:
        self.counts: Counter[T] = Counter()

    def take(self, item: T) -> bool:
        """One more holder; True if it is the first."""
        self.counts[item] += 1
        return self.counts[item] == 1

    def drop(self, item: T) -> bool:
        """One holder fewer; True if it was the last."""
        self.counts[item] -= 1
        if self.counts[item] == 0:
            del self.counts[item]
            return True
        return False


class EntryShares(Shares[Entry]):
    """Shares of ipset entries that also know which sets have any: kube-proxy writes the
    iptables rule matching a set only while the set has entries."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: Counter[str] = Counter()  # entries per set, only sets that have some

    def take(self, item: Entry) -> bool:
        first = super().take(item)
        if first:
            self.sizes[item[0]] += 1
        return first

    def drop(self, item: Entry) -> bool:
        last = super().drop(item)
        if last:
            self.sizes[item[0]] -= 1
            if not self.sizes[item[0]]:
                del self.sizes[item[0]]
        return last


@dataclass
class Diff:
    """Which service ports a sync renders anew, against the pieces the last sync left."""

    old: dict[str, tuple[Signature, Piece]]  # by ServicePort.key
    pieces: dict[str, tuple[Signature, Piece]]  # every service port of the state
    changed: list[str]  # rendered anew (new, or their Service or endpoints changed)
    removed: list[str]  # gone from the state


@dataclass
class ShareChanges:
    """Items whose first holder came or last holder went, each with the service port (key) that did it."""

    added_entries: dict[Entry, str] = field(default_factory=dict)
    deleted_entries: dict[Entry, str] = field(default_factory=dict)
    added_addresses: dict[str, str] = field(default_factory=dict)
    deleted_addresses: dict[str, str] = field(default_factory=dict)
