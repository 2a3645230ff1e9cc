"""The two iptables-restore --noflush inputs a sync writes, and what each changed.

``restore_input(new, old)``: a partial sync, only the chains that changed since the
ruleset the kernel got last and the ones that vanished. ``write_full_restore``: a full
sync, every chain, written while it renders, plus the repairs a look at the tables
found (chainscan.py). ``changed_service_ports``: the service ports a sync reprogrammed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from kproxy.proxy.iptables.names import KUBE_NODEPORTS, KUBE_SERVICES, NAT_TOP_CHAINS, chain_order
from kproxy.proxy.iptables.render import Rendered, RenderCache, Ruleset, render
from kproxy.proxy.iptables.rules import Chains
from kproxy.proxy.netfilter import Jump
from kproxy.proxy.types import NodeInfo, ProxyState

STREAM_LINES = 1024  # a full sync's text goes to iptables-restore in blocks of about this many lines


@dataclass
class Leftovers:
    """What a full sync found in the tables besides the desired rules."""

    stale: list[tuple[str, str]] = field(default_factory=list)  # (table, chain) of ours, no longer desired
    missing_jumps: list[Jump] = field(default_factory=list)  # from built-in chains
    unlink: list[tuple[str, str]] = field(default_factory=list)  # (table, "-A ...") jumps into stale chains


def restore_input(new: Ruleset, old: Ruleset) -> str:
    """The iptables-restore --noflush input of a partial sync ("" if nothing changed).

    old: the rules the kernel got last time. Only the chains whose rules changed
    are written, and chains that vanished flushed and deleted. kube-proxy rewrites
    its top-level chains on every partial sync too; we leave unchanged ones alone
    (the periodic full sync repairs drift), so one endpoint change at 10k services
    is not a 10k-rule write.
    """
    out: list[str] = []
    for table in ("filter", "nat"):
        chains = new.tables[table]
        before = old.tables.get(table, {})
        # A patch of old says which nat chains may differ; otherwise compare them all (the render
        # cache shares unchanged chains' rules, so that is mostly an identity check).
        candidates = new.touched if new.base is old and table == "nat" else None
        write = chain_order(c for c in (chains if candidates is None else candidates) if c in chains
                            and (was := before.get(c)) is not (rules := chains[c]) and was != rules)
        gone = chain_order(c for c in (before if candidates is None else candidates)
                           if c in before and c not in chains)
        if write or gone:
            out += _head(table, write) + _tail(chains, write, gone)
    return "\n".join(out) + "\n" if out else ""


def changed_service_ports(new: Ruleset, old: Ruleset | None, full: bool) -> set[str]:
    """The keys of the service ports whose rules (chains of their own or lines in the shared
    chains) a sync from old to new wrote or deleted: in a full sync every desired one and the
    ones gone since old; in a partial one those whose rules differ."""
    if full or old is None:
        return set(new.services) | (set(old.services) - set(new.services) if old is not None else set())
    keys: Iterable[str] = new.touched_services if new.base is old else new.services.keys() | old.services.keys()
    return {key for key in keys if (was := old.services.get(key)) is not (now := new.services.get(key))
            and was != now}


def write_full_restore(state: ProxyState, node: NodeInfo, write: Callable[[str], object], *,
                       find_leftovers: Callable[[Ruleset], Leftovers] | None = None,
                       localhost_nodeports: bool = True, conntrack_tcp_liberal: bool = False,
                       cache: RenderCache | None = None) -> Ruleset:
    """Render state and write the iptables-restore --noflush input of a full sync while rendering
    (the proxier pipes it into iptables-restore, which parses as the services render).

    The nat table comes first: its top-level chains declared (flushed), then each service
    port's chains, declared and written as they render, then the top-level chains' rules;
    then the filter table. find_leftovers(ruleset) says what else the tables hold: chains of
    ours the state no longer has (flushed and deleted), jumps from built-in chains that are
    missing, and others' rules jumping into chains that go.

    Each table starts with a chain-less ``-Z``: it makes iptables-nft-restore fetch the
    table's chains in one dump instead of keeping a sorted list of every chain name the
    input mentions, which costs O(chains²) string compares in iptables 1.8.9's
    nft_cache_level_set (10k services: 14 s instead of 2 s). It also zeroes the table's
    counters (ours restart at zero in a full sync anyway; others' do too).
    """
    write("\n".join(_head("nat", NAT_TOP_CHAINS, zero=True)) + "\n")
    stream = _ServiceStream(write)
    ruleset = render(state, node, localhost_nodeports=localhost_nodeports,
                     conntrack_tcp_liberal=conntrack_tcp_liberal, cache=cache, each=stream.add)
    leftovers = find_leftovers(ruleset) if find_leftovers is not None else Leftovers()
    out = stream.block
    for table in ("nat", "filter"):
        chains = ruleset.tables[table]
        gone = [c for t, c in leftovers.stale if t == table and c not in chains]
        jumps = [j for j in leftovers.missing_jumps if j.table == table]
        unlink = [rule for t, rule in leftovers.unlink if t == table]
        if table == "nat":
            top = list(NAT_TOP_CHAINS)
            rest = {chain: chains[chain][stream.streamed.get(chain, 0):] for chain in top}
        else:
            top = chain_order(chains)
            rest = chains
            out += _head(table, top, zero=True)
        out += _tail(rest, top, gone, jumps, unlink)
    write("\n".join(out) + "\n")
    return ruleset


class _ServiceStream:
    """Each service port's own chains, then its KUBE-SERVICES and KUBE-NODEPORTS rules (in the
    rendering order, which is those chains' order), written as they render: the restore parses
    them meanwhile and can commit soon after the last one."""

    def __init__(self, write: Callable[[str], object]) -> None:
        self.write = write
        self.block: list[str] = []
        self.streamed = {KUBE_SERVICES: 0, KUBE_NODEPORTS: 0}  # rules of these chains written so far

    def add(self, entry: Rendered) -> None:
        rules, block = entry.rules, self.block
        block.extend(f":{chain} - [0:0]" for chain in rules.chains)
        for lines in rules.chains.values():
            block.extend(lines)
        block.extend(rules.nat_services)
        block.extend(rules.nat_nodeports)
        self.streamed[KUBE_SERVICES] += len(rules.nat_services)
        self.streamed[KUBE_NODEPORTS] += len(rules.nat_nodeports)
        if len(block) >= STREAM_LINES:
            self.write("\n".join(block) + "\n")
            block.clear()


def _head(table: str, declare: Iterable[str], zero: bool = False) -> list[str]:
    return [f"*{table}", *(["-Z"] if zero else []), *(f":{chain} - [0:0]" for chain in declare)]


def _tail(chains: Chains, write: Iterable[str], gone: list[str], jumps: Iterable[Jump] = (),
          unlink: Iterable[str] = ()) -> list[str]:
    out = [rule for chain in write for rule in chains[chain]]
    out += [jump.rule for jump in jumps]
    out += ["-D" + rule[2:] for rule in unlink]
    out += [f":{chain} - [0:0]" for chain in gone]  # flushed, so -X finds them empty
    out += [f"-X {chain}" for chain in gone]
    out.append("COMMIT")
    return out
