"""The `nft -f` inputs of a sync, each one transaction: all of it is committed, or none.

``full_transaction``: every object of ours written afresh (chains flushed and refilled,
sets and maps flushed and refilled, except the affinity sets, whose members are the
clients' memory) and every stale one deleted, as kube-proxy's full sync.
``partial_transaction``: only what differs from the ruleset the kernel has, as
kube-proxy's partial sync: new chains added, changed ones flushed and refilled, gone
ones flushed and then deleted; elements added and deleted one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.render import Ruleset
from kproxy.proxy.nftables.rules import Element, SetSpec

HEAD = f"{n.FAMILY} {n.TABLE}"
TABLE = f'add table {HEAD} {{ comment "{n.TABLE_COMMENT}" ; }}'


@dataclass
class Existing:
    """What of ours the kernel has, as far as the proxier knows: names, and specs where known."""

    chains: set[str] = field(default_factory=set)
    sets: dict[str, SetSpec | None] = field(default_factory=dict)  # None: spec unknown


def existing_of(ruleset: Ruleset) -> Existing:
    return Existing(set(ruleset.chains()), dict(ruleset.sets()))


class _Batch:
    """A transaction in phases, so that nothing is referenced before it exists or deleted while referenced."""

    def __init__(self) -> None:
        self.create: list[str] = []  # add table, chains, sets
        self.flush: list[str] = []  # flush chains, sets, maps
        self.unlink: list[str] = []  # delete elements
        self.respec: list[str] = []  # delete sets (gone or changed), add the changed ones again
        self.fill: list[str] = []  # add rules
        self.elements: list[str] = []  # add elements
        self.delete: list[str] = []  # delete chains

    def add_chain(self, name: str, spec: str = "") -> None:
        self.create.append(f"add chain {HEAD} {name}" + (f" {spec}" if spec else ""))

    def rules(self, chain: str, rules: Iterable[str]) -> None:
        self.fill += [f"add rule {HEAD} {chain} {rule}" for rule in rules]

    def add_elements(self, where: str, elements: list[Element]) -> None:
        if elements:
            self.elements.append(f"add element {HEAD} {where} {{ {', '.join(e.text() for e in elements)} }}")

    def delete_elements(self, where: str, keys: list[str]) -> None:
        if keys:
            self.unlink.append(f"delete element {HEAD} {where} {{ {', '.join(keys)} }}")

    def text(self) -> str:
        lines = [*self.create, *self.flush, *self.unlink, *self.respec, *self.fill, *self.elements, *self.delete]
        return "\n".join(lines) + "\n" if lines else ""


def full_transaction(desired: Ruleset, existing: Existing | None) -> str:
    """Everything of desired; existing: what the kernel may hold of ours (None: no table)."""
    batch = _Batch()
    batch.create.append(TABLE)
    have = existing or Existing()
    chains, sets, specs = desired.chains(), desired.sets(), desired.shared.specs
    for name in chains:
        batch.add_chain(name, specs.get(name, ""))
        if name in have.chains:
            batch.flush.append(f"flush chain {HEAD} {name}")
    stale_chains = sorted(have.chains - chains.keys())
    batch.flush += [f"flush chain {HEAD} {name}" for name in stale_chains]
    batch.delete += [f"delete chain {HEAD} {name}" for name in stale_chains]
    for name, spec in sets.items():
        if name in have.sets and have.sets[name] not in (spec, None):
            batch.respec += [f"delete {spec.kind} {HEAD} {name}", f"add {spec.kind} {HEAD} {name} {spec.spec}"]
            continue
        batch.create.append(f"add {spec.kind} {HEAD} {name} {spec.spec}")
        if name in desired.shared.sets and name in have.sets:
            batch.flush.append(f"flush {spec.kind} {HEAD} {name}")
    for name in sorted(have.sets.keys() - sets.keys()):
        old = have.sets[name]
        batch.respec.append(f"delete {old.kind if old else 'set'} {HEAD} {name}")
    for name, rules in chains.items():
        batch.rules(name, rules)
    for where, elements in desired.elements().items():
        batch.add_elements(where, elements)
    return batch.text()


def partial_transaction(desired: Ruleset, previous: Ruleset) -> str:
    """What turns previous (what the kernel has) into desired; "" when nothing differs.
    Their shared objects and layout are the same (else the sync is a full one)."""
    batch = _Batch()
    keys = desired.keys_to_compare(previous)
    added_ips: list[Element] = []
    gone_ips: list[str] = []
    elements: dict[str, list[Element]] = {}
    gone: dict[str, list[str]] = {}
    for key in sorted(keys):
        old = previous.services.get(key)
        new = desired.services.get(key)
        if old is new or old == new:
            continue
        old_chains = old.chains if old is not None else {}
        new_chains = new.chains if new is not None else {}
        old_sets = old.sets if old is not None else {}
        new_sets = new.sets if new is not None else {}
        # A set is deleted (gone, or to be added again with another timeout) only once no
        # rule refers to it: then every chain of the service is flushed and written again.
        dropped = [name for name, spec in old_sets.items() if new_sets.get(name) != spec]
        for name, rules in new_chains.items():
            before = old_chains.get(name)
            if before == rules and not dropped:
                continue
            if before is None:
                batch.add_chain(name)
            else:
                batch.flush.append(f"flush chain {HEAD} {name}")
            batch.rules(name, rules)
        for name in (name for name in old_chains if name not in new_chains):
            batch.flush.append(f"flush chain {HEAD} {name}")
            batch.delete.append(f"delete chain {HEAD} {name}")
        batch.respec += [f"delete set {HEAD} {name}" for name in dropped]
        batch.respec += [f"add set {HEAD} {name} {spec.spec}" for name, spec in new_sets.items()
                         if name in dropped]
        batch.create += [f"add set {HEAD} {name} {spec.spec}" for name, spec in new_sets.items()
                         if name not in old_sets]
        old_elements = {(where, e.key): e for where, e in old.elements} if old is not None else {}
        new_elements = {(where, e.key): e for where, e in new.elements} if new is not None else {}
        for (where, key_text), element in new_elements.items():
            before_element = old_elements.get((where, key_text))
            if before_element == element:
                continue
            if before_element is not None:
                gone.setdefault(where, []).append(key_text)
            elements.setdefault(where, []).append(element)
        for where, key_text in (found for found in old_elements if found not in new_elements):
            gone.setdefault(where, []).append(key_text)
        if (old.cluster_ip if old else None) != (new.cluster_ip if new else None):
            if old is not None and old.cluster_ip not in desired.cluster_ips:
                gone_ips.append(old.cluster_ip)
            if new is not None and new.cluster_ip not in previous.cluster_ips:
                added_ips.append(Element(new.cluster_ip))
    for where, keys_gone in sorted(gone.items()):
        batch.delete_elements(where, sorted(set(keys_gone)))
    batch.delete_elements(n.CLUSTER_IPS, sorted(set(gone_ips)))
    for where, found in sorted(elements.items()):
        batch.add_elements(where, found)
    batch.add_elements(n.CLUSTER_IPS, list({e.key: e for e in added_ips}.values()))
    return batch.text()
