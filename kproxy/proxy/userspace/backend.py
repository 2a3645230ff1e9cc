"""What the userspace mode asks of netfilter for its rules, behind one small Protocol.

The proxier writes its chains with iptables-restore and reads the tables with
iptables-save; ``IptablesCommands`` runs those commands in the calling thread's
network namespace. Tests give the proxier a fake instead (tests/fakes/), so its
rule bookkeeping can be checked without root.
"""

from __future__ import annotations

from typing import Protocol

from kproxy.proxy import saved
from kproxy.proxy.kernel import SAVE, restore, run

Tables = dict[str, dict[str, list[str]]]  # table -> chain -> its "-A" lines, as saved.parse_save gives them


class RulesBackend(Protocol):
    def restore(self, text: str) -> None:
        """One iptables-restore --noflush of text; kproxy.proxy.kernel.RestoreError if it was refused."""
        ...

    def read_tables(self) -> Tables:
        """The filter and nat tables as they are now."""
        ...

    def save_with_counters(self) -> str:
        """iptables-save -c output: every table, each rule with its [packets:bytes]."""
        ...


class IptablesCommands:
    """The real backend: iptables-nft-restore and iptables-nft-save of the calling thread's namespace."""

    def restore(self, text: str) -> None:
        restore(text)

    def read_tables(self) -> Tables:
        return saved.read_tables()

    def save_with_counters(self) -> str:
        return run([SAVE, "-c"]).stdout
