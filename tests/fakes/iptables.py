"""An in-memory iptables (kproxy.proxy.tables.Backend), no root: the one fake of every mode
that writes iptables.

It keeps the filter and nat tables as chain -> rule lines and applies restore input
as ``iptables-restore --noflush`` does, strictly: a chain is declared (``:CHAIN``,
created or flushed) before a rule goes into it or jumps to it, ``-D`` needs the rule,
``-X`` needs an empty chain nothing jumps to, and each table is committed at its
``COMMIT`` (a refused table leaves it as it was; tables committed before it stay, as
iptables-nft-restore commits table by table). Rules are kept as written; the real
iptables-save would respell them, which nothing here depends on.
"""

from __future__ import annotations

import shlex
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator

from kproxy.proxy.kernel import RestoreError
from kproxy.proxy.saved import jump_target, parse_save
from kproxy.proxy.tables import Feed, Reading, Tables

BUILTIN = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING")}
# Targets that are extensions, not chains.
TARGETS = {"ACCEPT", "DROP", "RETURN", "REJECT", "MARK", "MASQUERADE", "DNAT", "SNAT", "REDIRECT", "LOG", "CONNMARK"}



class FakeIptables:
    """The tables of one fake node, and a record of what was asked of it."""

    def __init__(self, saved: str = "") -> None:
        """saved: iptables-save text the node holds already (e.g. the CNI's chains)."""
        self.tables: Tables = {}  # as a fresh nft namespace: no table until something writes one
        for table, chains in parse_save(saved).items():
            self.tables[table] = {**{chain: [] for chain in BUILTIN[table]}, **chains}
        self.sysctls: dict[str, str] = {}
        self.restores: list[str] = []  # every restore input applied or refused, in order
        self.refuse: Callable[[str], bool] = lambda text: False  # a test's way to make a restore fail

    # --- the Backend ---------------------------------------------------------------

    def restore(self, text: str, *, counters: bool = False) -> None:
        self.restores.append(text)
        if self.refuse(text):
            raise RestoreError("fake iptables-restore: refused (test)")
        self.apply(text)

    @contextmanager
    def restore_stream(self, *, counters: bool = False) -> Iterator[Feed]:
        chunks: list[str] = []
        yield chunks.append  # nothing is applied if the caller fails midway, as the real stream
        self.restore("".join(chunks), counters=counters)

    def chain_names(self) -> Reading[dict[str, list[str]]]:
        names = {table: list(chains) for table, chains in self.tables.items()}  # read when started
        return lambda: names

    def chain_rules(self, table: str, chain: str) -> Reading[list[str]]:
        if chain not in self.tables.get(table, {}):
            raise RuntimeError(f"iptables -t {table} -S {chain}: No chain/target/match by that name")
        rules = list(self.tables[table][chain])
        return lambda: rules

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        out: list[str] = []
        for name in [table] if table is not None else list(self.tables):
            chains = self.tables.get(name)
            if chains is None:
                continue
            out.append(f"*{name}")
            out += [f":{chain} {'ACCEPT' if chain in BUILTIN[name] else '-'} [0:0]" for chain in chains]
            out += [("[0:0] " if counters else "") + rule for rules in chains.values() for rule in rules]
            out.append("COMMIT")
        return "".join(line + "\n" for line in out)

    def set_sysctl(self, name: str, value: str) -> None:
        self.sysctls[name] = value

    def sysctl(self, name: str) -> str | None:
        return self.sysctls.get(name)

    # --- for tests ------------------------------------------------------------------

    def refuse_next(self) -> None:
        """The next restore is refused (as a bad input is); the ones after it are not."""
        refused = iter([True])
        self.refuse = lambda text: next(refused, False)

    def add(self, table: str, chain: str, *rules: str) -> None:
        """Someone else's chain (e.g. the CNI's) with rules ("-A CHAIN ..."), or rules in a built-in one."""
        self.apply(f"*{table}\n" + (f":{chain} - [0:0]\n" if chain not in BUILTIN[table] else "")
                   + "".join(rule + "\n" for rule in rules) + "COMMIT\n")

    def apply(self, text: str) -> None:
        """Apply restore --noflush input; RestoreError (naming the line) if a table refuses it."""
        work: dict[str, list[str]] | None = None
        table = ""
        for number, line in enumerate(text.splitlines(), 1):
            try:
                if not line or line.startswith("#"):
                    continue
                if line.startswith("*"):
                    table = line[1:]
                    work = {c: list(r) for c, r in self.tables.get(table, dict.fromkeys(BUILTIN[table], [])).items()}
                elif work is None:
                    raise ValueError("no table")
                elif line == "COMMIT":
                    self.tables[table], work = work, None
                else:
                    _apply_line(work, line)
            except (ValueError, KeyError) as exc:
                raise RestoreError(f"fake iptables-restore: line {number} failed ({exc}): {line}") from None
        if work is not None:
            raise RestoreError("fake iptables-restore: no COMMIT at the end")


def _apply_line(chains: dict[str, list[str]], line: str) -> None:
    if line == "-Z":  # counters: not kept
        return
    if line.startswith(":"):
        chain = line[1:].split()[0]
        if chain not in chains or chain not in _builtins(chains):
            chains[chain] = []  # declared: created, or flushed
        return
    op, chain, *rest = line.split(" ", 2)
    if chain not in chains:
        raise ValueError(f"no chain {chain}")
    if op == "-X":
        if chains[chain]:
            raise ValueError(f"chain {chain} is not empty")
        if any(jump_target(rule) == chain for rules in chains.values() for rule in rules):
            raise ValueError(f"chain {chain} is still jumped to")
        del chains[chain]
        return
    spec = rest[0] if rest else ""
    if op == "-I":
        position, _, spec = spec.partition(" ")
        _check_target(chains, spec)
        chains[chain].insert(int(position) - 1, f"-A {chain} {spec}")
    elif op == "-A":
        _check_target(chains, spec)
        chains[chain].append(f"-A {chain} {spec}")
    elif op == "-D":
        chains[chain].remove(f"-A {chain} {spec}")  # ValueError if it is not there
    else:
        raise ValueError(f"unknown command {op}")


def _builtins(chains: dict[str, list[str]]) -> set[str]:
    return {chain for names in BUILTIN.values() for chain in names if chain in chains}


def _check_target(chains: dict[str, list[str]], spec: str) -> None:
    shlex.split(spec)  # balanced quotes
    target = jump_target(spec)
    if target and target not in TARGETS and target not in chains:
        raise ValueError(f"no chain/target {target}")


if TYPE_CHECKING:
    from kproxy.proxy.tables import Backend

    _backend: type[Backend] = FakeIptables
