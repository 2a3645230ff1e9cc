"""`kproxy rules` for this mode: the node's live rules of ours (or of one service), with counters."""

from __future__ import annotations

import re

from kproxy.proxy.tables import Backend, Commands
from kproxy.proxy.iptables.names import is_own_chain
from kproxy.proxy.saved import excerpt
from kproxy.proxy.types import names_service_port


def live_rules(owners: dict[str, str], service: str | None, backend: Backend | None = None) -> str:
    """iptables-save -c (with [packets:bytes]) of the filter and nat tables, cut down to our
    rules, or to those of one service ("ns/name" or "ns/name:port"): its chains (owners: service
    chain -> servicePortName), and the lines of the shared chains that jump to them or name the
    service in a comment. Runs in the calling thread's namespace."""
    mine = {c for c, owner in owners.items() if names_service_port(service, owner)} if service is not None else set()
    named = re.compile(re.escape(service) + r'(?=[:\s"]|$)') if service is not None else None

    def keep_chain(table: str, chain: str) -> bool:
        return (named is None and is_own_chain(table, chain)) or chain in mine

    def keep_rule(table: str, chain: str, target: str, rule: str) -> bool:
        if named is None:
            return is_own_chain(table, chain) or is_own_chain(table, target)
        return chain in mine or target in mine or (is_own_chain(table, chain) and bool(named.search(rule)))

    return excerpt((backend or Commands("iptables")).save(counters=True), keep_chain, keep_rule)
