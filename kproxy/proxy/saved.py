"""iptables-save output, read the way every mode needs it (all three program iptables):
the chains and rules of the filter and nat tables, the restore text that removes a
mode's chains, and an excerpt of a mode's rules with their counters (`kproxy rules`).
Pure text in, text out: kproxy/proxy/tables.py runs the commands.
"""

from __future__ import annotations

import re
from typing import Callable

TABLES = ("filter", "nat")
_COUNTERS = re.compile(r"^\[\d+:\d+\] ")
_JUMP = re.compile(r"(?:^| )-j (\S+)")

Owns = Callable[[str, str], bool]  # (table, chain) -> whether the mode owns that chain


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save output -> table -> chain -> its "-A" lines (counters, if any, stripped)."""
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            current.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith(("-A ", "[")):
            rule = _COUNTERS.sub("", line)
            current.setdefault(rule.split(" ", 2)[1], []).append(rule)
    return tables


def jump_target(rule: str) -> str:
    """The chain or target of a rule's -j ("" without one)."""
    m = _JUMP.search(rule)
    return m.group(1) if m else ""


def has_jump(rules: list[str], target: str, comment: str = "") -> bool:
    """Whether one of a chain's rules jumps to target (with comment in it, if given)."""
    return any(jump_target(rule) == target and comment in rule for rule in rules)


def removal_input(saved: dict[str, dict[str, list[str]]], owns: Owns) -> str:
    """The iptables-restore --noflush text that deletes every chain owns(table, chain) and
    every rule of another chain that jumps into one ("" if there are none)."""
    out: list[str] = []
    for table in TABLES:
        chains = saved.get(table, {})
        ours = [chain for chain in chains if owns(table, chain)]
        if not ours:
            continue
        mine = set(ours)
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in ours]  # flushed, so that -X finds them empty
        for chain, rules in chains.items():
            if chain not in mine:
                out += ["-D" + rule[2:] for rule in rules if jump_target(rule) in mine]
        out += [f"-X {chain}" for chain in ours]
        out.append("COMMIT")
    return "\n".join(out) + "\n" if out else ""


def excerpt(text: str, keep_chain: Owns, keep_rule: Callable[[str, str, str, str], bool]) -> str:
    """iptables-save -c output cut to the filter and nat tables' table headers, COMMITs, the
    chain lines keep_chain(table, chain) keeps and the rule lines (with their [packets:bytes])
    keep_rule(table, chain, target, rule without counters) keeps."""
    out: list[str] = []
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            if table in TABLES:
                out.append(line)
        elif table not in TABLES:
            continue
        elif line == "COMMIT":
            out.append(line)
        elif line.startswith(":"):
            if keep_chain(table, line[1:].split()[0]):
                out.append(line)
        elif line.startswith(("[", "-A")):
            rule = _COUNTERS.sub("", line)
            if keep_rule(table, rule.split()[1], jump_target(rule), rule):
                out.append(line)
    return "\n".join(out) + "\n"
