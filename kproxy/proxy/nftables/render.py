"""``render(state, node) -> Ruleset``: pure, no root.

The objects kube-proxy's nftables mode holds on this node for this state (rules.py),
by service port. ``Ruleset.text()`` is what `kproxy render` prints: the table as
kube-proxy's fake nftables (knftables.Fake) dumps it, which is also `nft -f` input.
With a RenderCache only the service ports that changed are rendered again.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kproxy.proxy.nftables import names as n
from kproxy.proxy.nftables.rules import Element, ServiceObjects, SetSpec, SharedObjects, service_objects, shared_objects
from kproxy.proxy.topology import Categorized, categorize
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

VMAP_LIMIT = 1000  # above this many service ports, "auto" endpoint choice is the cascade
CHOICES = ("auto", "vmap", "cascade")


@dataclass(frozen=True)
class Layout:
    """What, beyond the state, changes the text."""

    cascade: bool = False  # one rule per endpoint instead of kube-proxy's numgen vmap
    counters: bool = False


def layout_for(choice: str, services: int, counters: bool) -> Layout:
    """The layout of a ruleset of this many service ports, with endpoint choice "auto", "vmap"
    (kube-proxy's) or "cascade"."""
    if choice not in CHOICES:
        raise ValueError(f"endpoint choice {choice!r}")
    return Layout(cascade=choice == "cascade" or (choice == "auto" and services > VMAP_LIMIT), counters=counters)


@dataclass
class Ruleset:
    shared: SharedObjects
    services: dict[str, ServiceObjects]  # by ServicePort.key
    layout: Layout
    cluster_ips: Counter[str] = field(default_factory=Counter)  # ClusterIP -> service ports that have it
    # Set when rendered from a RenderCache that knew which keys changed: only these may differ from `base`.
    base: Ruleset | None = field(default=None, repr=False)
    touched: frozenset[str] | None = None

    def keys_to_compare(self, previous: Ruleset) -> Iterable[str]:
        """The service port keys whose objects may differ from previous: the patched ones when this
        ruleset was patched from it, else every key of either."""
        if self.base is previous and self.touched is not None:
            return self.touched
        return self.services.keys() | previous.services.keys()

    def owners(self) -> dict[str, str]:
        """Every chain and set of a service port -> its servicePortName."""
        return {name: objects.owner for objects in self.services.values()
                for name in (*objects.chains, *objects.sets)}

    def chains(self) -> dict[str, tuple[str, ...]]:
        """Every chain (shared and the service ports') and its rules."""
        chains = dict(self.shared.chains)
        for objects in self.services.values():
            chains.update(objects.chains)
        return chains

    def sets(self) -> dict[str, SetSpec]:
        """Every set and map: the shared ones and the affinity sets."""
        sets = dict(self.shared.sets)
        for objects in self.services.values():
            sets.update(objects.sets)
        return sets

    def elements(self) -> dict[str, list[Element]]:
        """Every set's and map's elements, the cluster-ips set's included."""
        elements = {name: list(found) for name, found in self.shared.elements.items()}
        elements[n.CLUSTER_IPS] = [Element(ip) for ip in self.cluster_ips]
        for objects in self.services.values():
            for where, element in objects.elements:
                elements.setdefault(where, []).append(element)
        return elements

    def text(self) -> str:
        """The table as knftables.Fake.Dump() writes it: table, chains, sets, maps (each
        sorted by name), then the rules chain by chain and the elements set by set."""
        chains, sets, elements = self.chains(), self.sets(), self.elements()
        specs = self.shared.specs
        head = f"{n.FAMILY} {n.TABLE}"
        out = [f'add table {head} {{ comment "{n.TABLE_COMMENT}" ; }}']
        out += [f"add chain {head} {name}" + (f" {specs[name]}" if specs.get(name) else "") for name in sorted(chains)]
        order = sorted(sets, key=lambda name: (sets[name].kind != "set", name))
        out += [f"add {sets[name].kind} {head} {name} {sets[name].spec}" for name in order]
        out += [f"add rule {head} {name} {rule}" for name in sorted(chains) for rule in chains[name]]
        out += [f"add element {head} {name} {{ {element.text()} }}" for name in order
                for element in sorted(elements.get(name, ()), key=_element_order)]
        return "\n".join(out) + "\n"


def _element_order(element: Element) -> list[tuple[int, tuple[int, ...] | str]]:
    """Elements by key, addresses and ports as numbers."""
    return [(0, tuple(int(x) for x in part.split("."))) if part.replace(".", "").isdigit() else (1, part)
            for part in element.key.split(" . ")]


@dataclass
class _Rendered:
    service: ServicePort
    endpoints: list[Endpoint]  # as the state gave them (compared by identity first)
    categorized: Categorized  # which of them this node sends which traffic to
    objects: ServiceObjects


@dataclass
class RenderCache:
    """What the last render with this cache made, and from what (see iptables' RenderCache).

    A service port is rendered again only when its ServicePort or its endpoints changed;
    when the state says which keys changed since the last render, only those are looked at."""

    node: NodeInfo | None = None
    layout: Layout | None = None
    entries: dict[str, _Rendered] = field(default_factory=dict)
    generation: int = -1
    ruleset: Ruleset | None = None
    by_key: dict[str, ServicePort] = field(default_factory=dict)
    services: Sequence[ServicePort] = ()


def render(state: ProxyState, node: NodeInfo, *, choice: str = "auto", counters: bool = False,
           cache: RenderCache | None = None) -> Ruleset:
    """The objects kube-proxy's nftables mode has on node for state.

    choice: how a service chain picks an endpoint: "vmap" (kube-proxy's numgen vmap),
    "cascade" (a rule per endpoint) or "auto" (vmap up to VMAP_LIMIT service ports).
    counters: a counter in every rule of a service's chains."""
    layout = layout_for(choice, len(state.services), counters)
    if cache is None:
        cache = RenderCache()
    if cache.node != node or cache.layout != layout:
        cache.node, cache.layout, cache.entries, cache.ruleset = node, layout, {}, None
    if cache.services is not state.services:
        cache.services, cache.by_key = state.services, {svc.key: svc for svc in state.services}
    previous = cache.ruleset
    if (previous is not None and state.changed is not None and state.generation == cache.generation + 1):
        ruleset = _patch(previous, state, node, cache, state.changed)
    else:
        ruleset = Ruleset(shared_objects(node), {}, layout)
        for svc in state.services:
            _add(ruleset, _render_one(svc, state.endpoints_of(svc), node, cache))
        cache.entries = {key: cache.entries[key] for key in ruleset.services}
    cache.generation, cache.ruleset = state.generation, ruleset
    return ruleset


def _patch(previous: Ruleset, state: ProxyState, node: NodeInfo, cache: RenderCache,
           changed: Iterable[str]) -> Ruleset:
    ruleset = Ruleset(previous.shared, dict(previous.services), previous.layout, Counter(previous.cluster_ips),
                      base=previous, touched=frozenset(changed))
    for key in ruleset.touched or ():
        old = ruleset.services.pop(key, None)
        if old is not None:
            _forget_ip(ruleset.cluster_ips, old.cluster_ip)
        svc = cache.by_key.get(key)
        if svc is None:
            cache.entries.pop(key, None)
        else:
            _add(ruleset, _render_one(svc, state.endpoints_of(svc), node, cache))
    return ruleset


def _forget_ip(ips: Counter[str], ip: str) -> None:
    ips[ip] -= 1
    if ips[ip] <= 0:
        del ips[ip]


def _add(ruleset: Ruleset, rendered: _Rendered) -> None:
    ruleset.services[rendered.service.key] = rendered.objects
    ruleset.cluster_ips[rendered.objects.cluster_ip] += 1


def _render_one(svc: ServicePort, endpoints: list[Endpoint], node: NodeInfo, cache: RenderCache) -> _Rendered:
    old = cache.entries.get(svc.key)
    if old is not None and (old.service is svc or old.service == svc) and (
            old.endpoints is endpoints or old.endpoints == endpoints):
        return old
    categorized = categorize(endpoints, svc, node.name)
    if old is not None and old.service == svc and old.categorized == categorized:
        objects = old.objects
    else:
        assert cache.layout is not None
        objects = service_objects(svc, categorized, node, cascade=cache.layout.cascade,
                                  counters=cache.layout.counters)
    rendered = _Rendered(svc, endpoints, categorized, objects)
    cache.entries[svc.key] = rendered
    return rendered
