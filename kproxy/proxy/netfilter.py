"""What every mode that writes iptables writes the same way.

All three modes program netfilter through iptables-nft-restore: they own some
chains (``OwnedChains``), hook them into built-in chains (``Jump``), send only
ready endpoints traffic (``usable_endpoints``) and, where they masquerade,
use kube-proxy's mark-then-masquerade pair of chains (``mark_masq_rules``,
``postrouting_rules``, ``forward_rules``). The restore text of a set of whole
chains is ``restore_tables``. Mode packages import this module, never each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from kproxy.proxy.types import Endpoint

MASQ_MARK = "0x4000"  # 1 << --iptables-masquerade-bit (default 14)
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_FORWARD = "KUBE-FORWARD"

_BARE = re.compile(r"[\w./:-]+")


def comment(text: str) -> str:
    """A --comment argument as iptables-save spells it: bare when it is one plain word, else quoted."""
    return text if _BARE.fullmatch(text) else f'"{text}"'


class OwnedChains:
    """Which chains a mode owns: by name per table, and (in nat) by prefix, e.g. KUBE-SVC-."""

    def __init__(self, chains: Mapping[str, Iterable[str]], nat_prefixes: tuple[str, ...] = ()) -> None:
        self.chains = {table: frozenset(names) for table, names in chains.items()}
        self.nat_prefixes = nat_prefixes

    def __call__(self, table: str, chain: str) -> bool:
        return chain in self.chains.get(table, ()) or (
            table == "nat" and bool(self.nat_prefixes) and chain.startswith(self.nat_prefixes))


@dataclass(frozen=True)
class Jump:
    """A rule a mode puts in a built-in chain to send traffic into one of its own."""

    table: str
    chain: str  # built-in: PREROUTING, INPUT, ...
    target: str  # ours
    comment: str = ""
    extra: str = ""  # matches before the comment, e.g. "-m conntrack --ctstate NEW"
    first: bool = True  # inserted at the top of the chain, or appended

    @property
    def spec(self) -> str:
        """The rule after the chain name, as iptables-save prints it."""
        parts = [self.extra] if self.extra else []
        if self.comment:
            parts.append(f"-m comment --comment {comment(self.comment)}")
        parts.append(f"-j {self.target}")
        return " ".join(parts)

    @property
    def rule(self) -> str:
        """The restore line that adds it."""
        return f"-I {self.chain} 1 {self.spec}" if self.first else f"-A {self.chain} {self.spec}"


def usable_endpoints(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """The endpoints that get new traffic: ready ones, deduplicated and sorted by their "ip:port"
    string, as kube-proxy's EndpointsMap orders them."""
    by_address = {ep.address: ep for ep in endpoints if ep.ready}
    return [by_address[a] for a in sorted(by_address)]


def mark_masq_rules() -> tuple[str, ...]:
    """KUBE-MARK-MASQ: mark a packet for masquerading at POSTROUTING."""
    return (f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {MASQ_MARK}",)


def postrouting_rules() -> tuple[str, ...]:
    """KUBE-POSTROUTING: masquerade marked packets (clearing the mark, so a re-routed packet is not
    masqueraded twice)."""
    return (
        f"-A {KUBE_POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    )


def forward_rules() -> tuple[str, ...]:
    """KUBE-FORWARD: accept forwarded service traffic (marked) and its replies, whatever the
    FORWARD policy."""
    return (
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    )


def restore_tables(tables: Mapping[str, tuple[Sequence[str], Sequence[str]]], jumps: Iterable[Jump] = ()) -> str:
    """iptables-restore --noflush input writing whole chains: per table (name -> (chains, rules)),
    each chain declared (so flushed), the rules, then the jumps from built-in chains."""
    jumps = list(jumps)
    out: list[str] = []
    for table, (chains, rules) in tables.items():
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in chains]
        out += rules
        out += [jump.rule for jump in jumps if jump.table == table]
        out.append("COMMIT")
    return "\n".join(out) + "\n"
