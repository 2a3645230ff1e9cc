"""A node's netfilter tables as the modes that write iptables reach them: restores, a few
reads, sysctls.

``Backend`` is all of it, so a proxier's bookkeeping (full or partial, what a partial
sync writes, what a failed restore forces) can be tested against a fake that keeps the
tables in memory (tests/fakes/iptables.py), as kube-proxy tests its proxiers against
its fake iptables. ``Commands`` is the real one: every method runs a child process (or
opens /proc/sys) in the calling thread's network namespace, the node's.
``read_tables`` and ``remove_chains`` are what every such mode reads and removes alike.
"""

from __future__ import annotations

import subprocess
from contextlib import AbstractContextManager
from typing import Callable, Iterable, Protocol, TypeVar

from kproxy.proxy import kernel
from kproxy.proxy.netfilter import Jump
from kproxy.proxy.saved import Owns, has_jump, parse_save, removal_input

T = TypeVar("T")
Reading = Callable[[], T]  # a read under way: calling it waits for the answer
Feed = Callable[[str], object]  # hands whole lines of restore input on
Tables = dict[str, dict[str, list[str]]]  # table -> chain -> its "-A" lines, as saved.parse_save gives them


class Backend(Protocol):
    def restore(self, text: str, *, counters: bool = False) -> None:
        """One iptables-restore --noflush of text; kernel.RestoreError if it is refused."""
        ...

    def restore_stream(self, *, counters: bool = False) -> AbstractContextManager[Feed]:
        """One iptables-restore --noflush fed while its input is made (whole or nothing, as
        kernel.restore_stream)."""
        ...

    def chain_names(self) -> Reading[dict[str, list[str]]]:
        """Start reading the names of every chain of the filter and nat tables (table -> names)."""
        ...

    def chain_rules(self, table: str, chain: str) -> Reading[list[str]]:
        """Start reading one chain's rules, as "-A CHAIN ..." lines."""
        ...

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        """iptables-save of one table (None: all), with [packets:bytes] if counters."""
        ...

    def set_sysctl(self, name: str, value: str) -> None:
        """Set a sysctl under /proc/sys (e.g. "net/ipv4/conf/all/route_localnet"); a failure is reported."""
        ...

    def sysctl(self, name: str) -> str | None:
        """A sysctl's value (None if it cannot be read)."""
        ...


class Commands:
    """The real backend: iptables-nft-restore, nft, iptables -S and iptables-save as children.
    mode: the mode it works for, named in what it reports."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def restore(self, text: str, *, counters: bool = False) -> None:
        kernel.restore(text, counters=counters)

    def restore_stream(self, *, counters: bool = False) -> AbstractContextManager[Feed]:
        return kernel.restore_stream(counters=counters)

    def chain_names(self) -> Reading[dict[str, list[str]]]:
        # One dump of the chain names, no rules: iptables-nft-save would print every rule
        # (4.7 s at 10k services).
        proc = _spawn(["nft", "list", "chains", "ip"])
        return lambda: _parse_chain_list(_output(proc))

    def chain_rules(self, table: str, chain: str) -> Reading[list[str]]:
        proc = _spawn([kernel.IPTABLES, "-w", "5", "-t", table, "-S", chain])
        return lambda: [line for line in _output(proc).splitlines() if line.startswith("-A ")]

    def save(self, table: str | None = None, *, counters: bool = False) -> str:
        argv = [kernel.SAVE, *(["-t", table] if table is not None else []), *(["-c"] if counters else [])]
        return kernel.run(argv).stdout

    def set_sysctl(self, name: str, value: str) -> None:
        kernel.set_sysctl(name, value, self.mode)

    def sysctl(self, name: str) -> str | None:
        try:
            with open(f"/proc/sys/{name}") as f:
                return f.read().strip()
        except OSError:
            return None


def read_tables(backend: Backend) -> Tables:
    """The filter and nat tables as they are now."""
    return parse_save(backend.save("filter") + backend.save("nat"))


def remove_chains(backend: Backend, owns: Owns) -> None:
    """Delete, in one restore, the chains owns(table, chain) and every jump into them."""
    text = removal_input(read_tables(backend), owns)
    if text:
        backend.restore(text)


def missing_jumps(backend: Backend, jumps: Iterable[Jump]) -> list[Jump]:
    """The jumps (with their comments) the built-in chains lack now."""
    saved = read_tables(backend)
    return [j for j in jumps if not has_jump(saved.get(j.table, {}).get(j.chain, []), j.target, j.comment)]


def _parse_chain_list(text: str) -> dict[str, list[str]]:
    """`nft list chains ip` -> the chain names of its filter and nat tables."""
    chains: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        words = line.split()
        if words[:2] == ["table", "ip"]:
            table = words[2]
        elif words[:1] == ["chain"] and table in ("filter", "nat"):
            chains.setdefault(table, []).append(words[1])
    return chains


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _output(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        argv = proc.args if isinstance(proc.args, list) else [proc.args]  # a list: _spawn's
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({proc.returncode}): {err.strip()}")
    return out
