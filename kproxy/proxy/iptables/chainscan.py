"""What a full sync reads of the node's filter and nat tables before it writes them.

A full sync repairs what a partial one never looks at: chains of ours no state wants
any longer (e.g. from an agent that ran before) and jumps from built-in chains that
someone removed. ``ChainScan`` starts the reads when the sync starts and collects them
once the rules are rendered, so the reading overlaps the rendering.
"""

from __future__ import annotations

from kproxy.proxy.tables import Backend, Reading
from kproxy.proxy.iptables.names import is_own_chain, jumps_for
from kproxy.proxy.iptables.render import Ruleset
from kproxy.proxy.iptables.restore import Leftovers
from kproxy.proxy.saved import has_jump, jump_target


class ChainScan:
    """The names of all chains of the filter and nat tables (one dump, no rules) and, in a table
    that has chains of ours, the rules of the built-in chains our jumps live in. A table
    without any has no jump of ours to find (a jump needs its target chain), so a fresh node's
    first sync reads only the chain names."""

    def __init__(self, backend: Backend, localhost_nodeports: bool) -> None:
        self._backend = backend
        self._names: Reading[dict[str, list[str]]] = backend.chain_names()
        self._jumps = jumps_for(localhost_nodeports)

    def leftovers(self, desired: Ruleset) -> Leftovers:
        """What the tables hold besides desired: stale chains of ours, missing jumps, jumps into the stale."""
        chains, builtin = self.collect()
        stale = [(t, c) for t, names in chains.items() for c in names
                 if is_own_chain(t, c) and c not in desired.tables.get(t, {})]
        missing = [j for j in desired.jumps if not has_jump(builtin.get((j.table, j.chain), []), j.target, j.comment)]
        unlink = [(t, rule) for (t, _), rules in builtin.items() for rule in rules if (t, jump_target(rule)) in stale]
        return Leftovers(stale, missing, unlink)

    def collect(self) -> tuple[dict[str, list[str]], dict[tuple[str, str], list[str]]]:
        """(table -> chain names, (table, built-in chain) -> its "-A" rules)."""
        chains = self._names()
        ours = {t for t, names in chains.items() if any(is_own_chain(t, c) for c in names)}
        builtin = dict.fromkeys((j.table, j.chain) for j in self._jumps if j.table in ours)  # each chain once
        readings = {(t, c): self._backend.chain_rules(t, c) for t, c in builtin}  # all under way at once
        return chains, {key: reading() for key, reading in readings.items()}
