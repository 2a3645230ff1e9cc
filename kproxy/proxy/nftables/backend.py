"""Everything the nftables proxier asks of the kernel, behind one Protocol.

``Backend`` is what a fake stands in for in the sync tests (tests/fakes/nftables.py).
``Libnftables`` is the real one: nft's own library (Debian's python3-nftables) in this
process, acting in the network namespace of the calling thread (the agent runs inside
its node's). Why the library and not an `nft -f` child: one endpoint change at 10k
services costs 103 ms through a kept context and 168 ms through `nft -f -`, the same
text either way (docs/nftables.md).
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from kproxy.memory import release_free_memory
from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.transaction import Existing


class TransactionError(RuntimeError):
    """nft refused a transaction; the kernel kept what it had (a transaction is all or nothing)."""


class Backend(Protocol):
    def run(self, text: str) -> None:
        """One `nft -f` transaction; TransactionError if it is refused."""
        ...

    def existing(self) -> Existing | None:
        """The names of the chains, sets and maps of our table (None: no table)."""
        ...

    def delete_table(self) -> None:
        """Remove our table and everything in it, if it is there."""
        ...

    def show(self, commands: str) -> str:
        """What `nft -f` prints for list and get commands (e.g. `list chain ip kube-proxy NAME`)."""
        ...

    def close(self) -> None:
        """Let go of what it holds open."""
        ...


# The library frees its parse of a big transaction (~340 MiB at 10k services), but glibc keeps
# the pages: kproxy.memory hands them back (the agent's RSS at 10k: 466 MiB without it).
TRIM_AFTER = 1 << 20  # bytes of transaction text


def _netns() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def _refusal(error: str, rc: int) -> str:
    """nft's complaint, in the few lines that say what and where."""
    lines = [line for line in error.splitlines() if line.strip()]
    return " | ".join(lines[:3]) or f"status {rc}"


class Libnftables:
    """The real backend. Its context (a netlink socket, and nft's cache of the kernel's
    objects while nothing changes them) is kept for the namespace it was opened in, and
    opened afresh when the calling thread is in another one."""

    def __init__(self) -> None:
        self._context: Any = None
        self._netns = 0

    def _nft(self, command: str, *, as_json: bool = False) -> tuple[int, str, str]:
        if self._context is None or self._netns != _netns():
            try:
                import nftables
            except ImportError:
                raise TransactionError("nftables mode needs nft's Python library: apt-get install "
                                       "python3-nftables, then scripts/setup") from None
            self._context, self._netns = nftables.Nftables(), _netns()
        self._context.set_json_output(as_json)
        self._context.set_terse_output(as_json)
        rc, output, error = self._context.cmd(command)
        return rc, output, error

    def run(self, text: str) -> None:
        rc, _, error = self._nft(text)
        if len(text) > TRIM_AFTER:
            release_free_memory()
        if rc != 0:
            raise TransactionError(f"nft refused the transaction: {_refusal(error, rc)}")

    def existing(self) -> Existing | None:
        found = Existing()
        table = False
        # Names only: chains without their rules, sets and maps without their elements.
        for what in ("chains", "sets", "maps"):
            rc, output, error = self._nft(f"list {what} {n.FAMILY}", as_json=True)
            if rc != 0:
                raise TransactionError(f"nft list {what} failed: {_refusal(error, rc)}")
            for item in json.loads(output or "{}").get("nftables", []):
                kind = next((k for k in ("chain", "set", "map") if k in item), None)
                if kind is None or item[kind].get("table") != n.TABLE:
                    continue
                table = True
                if kind == "chain":
                    found.chains.add(item[kind]["name"])
                else:
                    found.sets[item[kind]["name"]] = None
        if not table:
            table = self._nft(f"list table {n.FAMILY} {n.TABLE}", as_json=True)[0] == 0
        return found if table else None

    def delete_table(self) -> None:
        rc, _, error = self._nft(f"delete table {n.FAMILY} {n.TABLE}")
        if rc != 0 and "No such file or directory" not in error:
            raise TransactionError(f"nft delete table {n.FAMILY} {n.TABLE} failed: {_refusal(error, rc)}")

    def show(self, commands: str) -> str:
        rc, output, error = self._nft(commands)
        if rc != 0:
            raise TransactionError(f"nft could not list: {_refusal(error, rc)}")
        return output

    def close(self) -> None:
        self._context = None  # the library frees the context and its socket
