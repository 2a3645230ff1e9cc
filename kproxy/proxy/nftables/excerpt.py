"""`kproxy rules` for this mode: the live table, or one service's chains, sets and elements,
as `nft` lists them (with the counters, when the lab runs with counters=true)."""

from __future__ import annotations

from kproxy.errors import KproxyError
from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.backend import Backend, Libnftables, TransactionError
from kproxy.proxy.nftables.render import VMAP_LIMIT, Ruleset
from kproxy.proxy.types import names_service_port

HEAD = f"{n.FAMILY} {n.TABLE}"


def layout_line(ruleset: Ruleset) -> str:
    """Which endpoint choice the rules use, and why: the switch kube-proxy does not have."""
    ports = len(ruleset.services)
    if ruleset.layout.cascade:
        choice = "cascade: one numgen rule per endpoint, no anonymous vmaps"
    else:
        choice = "numgen random mod N vmap (kube-proxy's)"
    counters = "a counter in every service rule" if ruleset.layout.counters else \
        "no counters (as kube-proxy; --mode-opt counters=true adds them)"
    return f"# endpoint choice: {choice}; {ports} service ports (auto switches above {VMAP_LIMIT}); {counters}"


def live_rules(ruleset: Ruleset | None, service: str | None, backend: Backend | None = None) -> str:
    """The node's table (service None), or the chains, affinity sets and map elements of one
    service ("ns/name" or "ns/name:port") as the kernel has them now."""
    nft = backend or Libnftables()
    if ruleset is None or service is None:
        commands = [f"list table {HEAD}"]
    else:
        commands = []
        for objects in ruleset.services.values():
            if not names_service_port(service, objects.owner):
                continue
            commands += [f"list chain {HEAD} {chain}" for chain in sorted(objects.chains)]
            commands += [f"list set {HEAD} {name}" for name in sorted(objects.sets)]
            commands += [f"get element {HEAD} {where} {{ {element.key} }}" for where, element in objects.elements]
            commands.append(f"get element {HEAD} {n.CLUSTER_IPS} {{ {objects.cluster_ip} }}")
    try:
        listed = nft.show("\n".join(dict.fromkeys(commands)) + "\n") if commands else ""
    except TransactionError as exc:
        raise KproxyError(f"the node has no nftables rules of kproxy to show ({exc})") from None
    head = layout_line(ruleset) + "\n" if ruleset is not None else ""
    return head + _one_table(listed)


def _one_table(listed: str) -> str:
    """nft's answers to several commands, each in its own "table ip kube-proxy { ... }", as one table."""
    opening = f"table {HEAD} {{"
    body = [line for line in listed.splitlines() if line not in (opening, "}")]
    return "\n".join([opening, *body, "}"]) if body else ""
