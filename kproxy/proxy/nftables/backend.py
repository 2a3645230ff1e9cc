"""Everything the nftables proxier asks of the kernel, behind one Protocol.

``Backend`` is what a fake stands in for in the sync tests (tests/fakes/nftables.py);
``NftCommands`` is the real one: `nft` as a child of the calling thread, so it acts in
that thread's network namespace (the agent runs inside its node's).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Protocol

from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.transaction import Existing

NFT = "nft"


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


def _nft(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([NFT, *args], input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise TransactionError("nft is not installed (apt-get install nftables)") from None


def _refusal(done: subprocess.CompletedProcess[str]) -> str:
    """nft's complaint, in the few lines that say what and where."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return " | ".join(lines[:3]) or f"exit status {done.returncode}"


class NftCommands:
    """The real backend: one `nft` child per call."""

    def run(self, text: str) -> None:
        done = _nft(["-f", "-"], text)
        if done.returncode != 0:
            raise TransactionError(f"nft -f refused the transaction: {_refusal(done)}")

    def existing(self) -> Existing | None:
        found = Existing()
        table = False
        # Names only: chains without their rules, sets and maps without their elements (-t).
        for what in ("chains", "sets", "maps"):
            done = _nft(["-j", "-t", "list", what, n.FAMILY])
            if done.returncode != 0:
                raise TransactionError(f"nft list {what} failed: {_refusal(done)}")
            for item in json.loads(done.stdout).get("nftables", []):
                obj: dict[str, Any] = item.get("chain") or item.get("set") or item.get("map") or {}
                if obj.get("table") != n.TABLE:
                    continue
                table = True
                if "chain" in item:
                    found.chains.add(obj["name"])
                else:
                    found.sets[obj["name"]] = None
        if not table:
            table = _nft(["-t", "list", "table", n.FAMILY, n.TABLE]).returncode == 0
        return found if table else None

    def delete_table(self) -> None:
        done = _nft(["delete", "table", n.FAMILY, n.TABLE])
        if done.returncode != 0 and "No such file or directory" not in done.stderr:
            raise TransactionError(f"nft delete table {n.FAMILY} {n.TABLE} failed: {_refusal(done)}")

    def show(self, commands: str) -> str:
        done = _nft(["-f", "-"], commands)
        if done.returncode != 0:
            raise TransactionError(f"nft could not list: {_refusal(done)}")
        return done.stdout
