"""A fake of what a mode asks iptables for (kproxy.proxy.userspace.backend.RulesBackend): the
filter and nat tables held in memory, changed by restore text as iptables-restore --noflush
changes them, read back as iptables-save prints them.

Stricter than needed where a mistake would hide: a rule may only jump to a chain that exists,
-D must find its rule, -X only takes an empty chain nothing jumps to, and an input with any
error changes nothing (kproxy.proxy.kernel.restore hands the kernel its input whole or not at all).
"""

from __future__ import annotations

import copy

from kproxy.proxy.kernel import RestoreError
from kproxy.proxy.saved import jump_target, parse_save

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}
# Targets that are extensions, not chains.
TARGETS = {"ACCEPT", "DROP", "RETURN", "REJECT", "DNAT", "SNAT", "REDIRECT", "MASQUERADE", "MARK", "LOG"}

Tables = dict[str, dict[str, list[str]]]


class FakeRulesBackend:
    def __init__(self, saved: str = "") -> None:
        """Tables with the built-in chains, plus what saved (iptables-save text) holds."""
        self.tables: Tables = {table: {chain: [] for chain in chains} for table, chains in BUILTIN.items()}
        for table, chains in parse_save(saved).items():
            self.tables.setdefault(table, {}).update(chains)
        self.restores: list[str] = []  # every input restore was given, refused ones included
        self.refuse_next = False  # the next restore fails as a refused input does

    # RulesBackend ----------------------------------------------------------------

    def restore(self, text: str) -> None:
        self.restores.append(text)
        if self.refuse_next:
            self.refuse_next = False
            raise RestoreError("iptables-restore: line 1 failed (refused by the test)")
        tables = copy.deepcopy(self.tables)
        table = ""
        for number, line in enumerate(text.splitlines(), 1):
            try:
                table = self._line(tables, table, line)
            except (KeyError, ValueError, IndexError) as exc:
                raise RestoreError(f"iptables-restore: line {number} failed: {line!r}: {exc}") from None
        if table:
            raise RestoreError(f"iptables-restore: table {table} has no COMMIT")
        self.tables = tables

    def read_tables(self) -> Tables:
        return copy.deepcopy({table: self.tables[table] for table in ("filter", "nat")})

    def save_with_counters(self) -> str:
        out: list[str] = []
        for table, chains in self.tables.items():
            out.append(f"*{table}")
            out += [f":{chain} {'ACCEPT' if chain in BUILTIN.get(table, ()) else '-'} [0:0]" for chain in chains]
            out += [f"[0:0] {rule}" for rules in chains.values() for rule in rules]
            out.append("COMMIT")
        return "\n".join(out) + "\n"

    # restore, one line at a time -------------------------------------------------

    def _line(self, tables: Tables, table: str, line: str) -> str:
        """Apply one input line to tables; the table the next line is in ("" outside one)."""
        if not line or line.startswith("#"):
            return table
        if line.startswith("*"):
            if table:
                raise ValueError(f"table {table} has no COMMIT")
            return line[1:]
        if line == "COMMIT":
            if not table:
                raise ValueError("COMMIT outside a table")
            return ""
        chains = tables[table]
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name not in BUILTIN.get(table, ()):  # declared: created, or flushed (a built-in keeps its rules)
                chains[name] = []
            return table
        op, chain, *rest = line.split(" ")
        if op == "-A":
            chains[chain].append(self._checked(chains, chain, rest))
        elif op == "-I":
            position = int(rest.pop(0)) if rest and rest[0].isdigit() else 1
            chains[chain].insert(position - 1, self._checked(chains, chain, rest))
        elif op == "-D":
            chains[chain].remove(" ".join(["-A", chain, *rest]))
        elif op == "-F":
            chains[chain] = []
        elif op == "-X":
            self._delete_chain(chains, table, chain)
        else:
            raise ValueError(f"unknown command {op}")
        return table

    @staticmethod
    def _checked(chains: dict[str, list[str]], chain: str, rest: list[str]) -> str:
        rule = " ".join(["-A", chain, *rest])
        target = jump_target(rule)
        if target and target not in TARGETS and target not in chains:
            raise ValueError(f"no chain {target}")
        return rule

    @staticmethod
    def _delete_chain(chains: dict[str, list[str]], table: str, chain: str) -> None:
        if chain in BUILTIN.get(table, ()):
            raise ValueError(f"{chain} is built in")
        if chains[chain]:
            raise ValueError(f"{chain} is not empty")
        if any(jump_target(rule) == chain for rules in chains.values() for rule in rules):
            raise ValueError(f"{chain} is jumped to")
        del chains[chain]
