"""``render(state, node) -> Ruleset``: pure, no root.

The filter and nat chains kube-proxy (1.28+ layout) would write for this node, rule
for rule (rules.py). The order of the chains and of the services is the canonical
one of kube-proxy's proxier_test.go (KUBE-NODEPORTS, KUBE-SERVICES, then the rest
sorted; services sorted by name). With a RenderCache it re-renders only the service
ports that changed and patches the last ruleset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

from kproxy.proxy.iptables.names import JUMPS, chain_order, jumps_for
from kproxy.proxy.iptables.rules import Chains, ServiceRules, service_rules, top_chains
from kproxy.proxy.netfilter import Jump
from kproxy.proxy.topology import Categorized, categorize
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

# Above this many endpoints (all of them, whatever their conditions: kube-proxy counts its
# EndpointsMap) kube-proxy drops the per-endpoint comments.
LARGE_CLUSTER_ENDPOINTS = 1000


@dataclass
class Ruleset:
    """Per table ("filter", "nat"): the chains we own and their rule lines ("-A CHAIN ...").

    The rules are tuples: a proxier's render cache shares them between rulesets."""

    tables: dict[str, Chains]
    jumps: tuple[Jump, ...] = JUMPS
    owners: dict[str, str] = field(default_factory=dict)  # service chain -> servicePortName
    services: dict[str, ServiceRules] = field(default_factory=dict)  # ServicePort.key -> its rules
    # Set when rendered as a patch of `base`: the only nat chains and service ports that may differ from it.
    base: Ruleset | None = field(default=None, repr=False)
    touched: frozenset[str] = frozenset()
    touched_services: frozenset[str] = frozenset()

    def text(self) -> str:
        """What `kproxy render` prints: the iptables-restore input kube-proxy would write in a full
        sync (without the jumps from built-in chains), every chain declared, then its rules."""
        out: list[str] = []
        for table in ("filter", "nat"):
            chains = self.tables[table]
            order = chain_order(chains)
            out += [f"*{table}", *(f":{chain} - [0:0]" for chain in order)]
            out += [rule for chain in order for rule in chains[chain]]
            out.append("COMMIT")
        return "\n".join(out) + "\n"


@dataclass
class Rendered:
    """One service port as last rendered, and from what."""

    service: ServicePort
    endpoints: list[Endpoint]  # as the state gave them (compared by identity first)
    categorized: Categorized  # which of them this node sends which traffic to
    count: int  # how many distinct endpoints it has, toward LARGE_CLUSTER_ENDPOINTS
    large: bool
    rules: ServiceRules


@dataclass
class RenderCache:
    """What the last render with this cache made, and from what.

    A proxier keeps one. With it a sync re-renders only the service ports whose
    ServicePort or endpoints changed (the StateTracker keeps the others'
    objects); and when the state says which keys changed since the one
    rendered last (ProxyState.generation/changed), it patches the last
    ruleset instead of assembling all of it again. The result is the same
    as without a cache."""

    options: tuple[NodeInfo | None, bool, bool] = (None, True, False)  # render()'s node and flags
    entries: dict[str, Rendered] = field(default_factory=dict)
    services: Sequence[ServicePort] = ()  # the state's services last time ...
    ordered: list[ServicePort] = field(default_factory=list)  # ... in kube-proxy's order ...
    by_key: dict[str, ServicePort] = field(default_factory=dict)  # ... and by key
    generation: int = -1
    endpoint_total: int = 0
    ruleset: Ruleset | None = None


def _service_order(svc: ServicePort) -> tuple[str, str, str, int]:
    return svc.service_port_name, svc.protocol, svc.cluster_ip, svc.port


def render(state: ProxyState, node: NodeInfo, *, localhost_nodeports: bool = True,
           conntrack_tcp_liberal: bool = False, cache: RenderCache | None = None,
           each: Callable[[Rendered], None] | None = None) -> Ruleset:
    """The chains kube-proxy's iptables mode writes on this node for this state.

    node: its name (which endpoints are local), IP (a load-balancer source range holding it lets
    the node in), cluster CIDR (kube-proxy's local-traffic detector; "": none) and
    masquerade_all (kube-proxy's --masquerade-all).

    localhost_nodeports: kube-proxy's --iptables-localhost-nodeports (default
    true): NodePorts answer on 127.0.0.1 too (needs route_localnet=1, set by the
    proxier), and the KUBE-FIREWALL anti-martian rule is added. kube-proxy's
    extra nfacct-counted 127.0.0.0/8 NodePort rules are left out, as kube-proxy
    itself does when the kernel lacks nfacct.
    conntrack_tcp_liberal: nf_conntrack_tcp_be_liberal is set, so kube-proxy
    does not DROP ctstate INVALID in KUBE-FORWARD.
    cache: reuse what did not change since the last render with this cache.
    each: render every service port (no patching) and call each(its Rendered) in order.
    """
    options = (node, localhost_nodeports, conntrack_tcp_liberal)
    if cache is None:
        cache = RenderCache(options)
    elif cache.options != options:
        cache.options, cache.entries, cache.ruleset = options, {}, None
    reordered = cache.services is not state.services
    if reordered:
        cache.services, cache.ordered = state.services, sorted(state.services, key=_service_order)
        cache.by_key = {svc.key: svc for svc in state.services}
    ruleset = None
    if (each is None and cache.ruleset is not None and state.changed is not None
            and state.generation == cache.generation + 1):
        ruleset = _render_changes(state, node, cache, state.changed, reordered)
    if ruleset is None:
        ruleset = _render_all(state, node, cache, each)
    cache.generation, cache.ruleset = state.generation, ruleset
    return ruleset


class _Input(NamedTuple):
    """What a service port's rules are made of."""

    service: ServicePort
    endpoints: list[Endpoint]
    categorized: Categorized
    count: int


def _input(svc: ServicePort, endpoints: list[Endpoint], old: Rendered | None, node: NodeInfo) -> _Input:
    """svc's endpoints categorized and counted: the last ones when neither svc (its traffic
    policies decide the categories) nor the list of endpoints changed."""
    if old is not None and old.endpoints is endpoints and (old.service is svc or old.service == svc):
        return _Input(svc, endpoints, old.categorized, old.count)
    return _Input(svc, endpoints, categorize(endpoints, svc, node.name), len({ep.address for ep in endpoints}))


def _rendered(new: _Input, old: Rendered | None, node: NodeInfo, large: bool) -> Rendered:
    """svc's rules: the cached ones when nothing they depend on changed."""
    svc, endpoints, categorized, count = new
    if (old is not None and old.large == large and (old.service is svc or old.service == svc)
            and (old.categorized is categorized or old.categorized == categorized)):
        return old if old.endpoints is endpoints else Rendered(svc, endpoints, categorized, count, large, old.rules)
    return Rendered(svc, endpoints, categorized, count, large, service_rules(svc, categorized, node, large))


def _top_chains(cache: RenderCache) -> tuple[Chains, Chains]:
    node, localhost_nodeports, conntrack_tcp_liberal = cache.options
    rules = [cache.entries[svc.key].rules for svc in cache.ordered]
    return top_chains(rules, localhost_nodeports, conntrack_tcp_liberal, node.node_port_ips())


def _render_all(state: ProxyState, node: NodeInfo, cache: RenderCache,
                each: Callable[[Rendered], None] | None) -> Ruleset:
    before = cache.entries
    work = []
    for svc in cache.ordered:
        old = before.get(svc.key)
        work.append((_input(svc, state.endpoints_of(svc), old, node), old))
    cache.endpoint_total = sum(new.count for new, _ in work)
    large = cache.endpoint_total > LARGE_CLUSTER_ENDPOINTS
    cache.entries = {}
    for new, old in work:
        entry = cache.entries[new.service.key] = _rendered(new, old, node, large)
        if each is not None:
            each(entry)
    nat: Chains = {}
    owners: dict[str, str] = {}
    for entry in cache.entries.values():
        nat.update(entry.rules.chains)
        owners.update(dict.fromkeys(entry.rules.chains, entry.service.service_port_name))
    filter_top, nat_top = _top_chains(cache)
    return Ruleset(tables={"filter": filter_top, "nat": {**nat_top, **nat}}, jumps=jumps_for(cache.options[1]),
                   owners=owners, services={key: entry.rules for key, entry in cache.entries.items()})


_Update = tuple[str, Rendered | None, _Input | None]


def _render_changes(state: ProxyState, node: NodeInfo, cache: RenderCache, changed: frozenset[str],
                    reordered: bool) -> Ruleset | None:
    """The last ruleset with the changed service ports' chains swapped (None: render all instead)."""
    base = cache.ruleset
    assert base is not None
    updates, total = _updates(state, cache, changed, node)
    large = total > LARGE_CLUSTER_ENDPOINTS
    if large != (cache.endpoint_total > LARGE_CLUSTER_ENDPOINTS):
        return None  # every service's comments change
    cache.endpoint_total = total
    patch = Ruleset(tables={"filter": base.tables["filter"], "nat": dict(base.tables["nat"])}, jumps=base.jumps,
                    owners=dict(base.owners), services=dict(base.services), base=base)
    touched: set[str] = set()
    shared_changed = _apply_updates(patch, updates, cache, node, large, touched) or reordered
    if shared_changed:  # the top-level chains need rebuilding
        patch.tables["filter"], nat_top = _top_chains(cache)
        patch.tables["nat"].update(nat_top)
        touched.update(nat_top)
    patch.touched, patch.touched_services = frozenset(touched), changed
    base.base = None  # only the newest patch needs its base: no chain of old rulesets kept alive
    return patch


def _updates(state: ProxyState, cache: RenderCache, changed: frozenset[str],
             node: NodeInfo) -> tuple[list[_Update], int]:
    """Per changed key: its last Rendered and what it is now (None: gone); and the new number of
    endpoints in all."""
    updates: list[_Update] = []
    total = cache.endpoint_total
    for key in changed:
        old = cache.entries.get(key)
        total -= old.count if old is not None else 0
        svc = cache.by_key.get(key)
        if svc is None:
            updates.append((key, old, None))
            continue
        new = _input(svc, state.endpoints_of(svc), old, node)
        total += new.count
        updates.append((key, old, new))
    return updates, total


def _apply_updates(patch: Ruleset, updates: list[_Update], cache: RenderCache, node: NodeInfo, large: bool,
                   touched: set[str]) -> bool:
    """Swap each updated service port's chains in patch (and the cache); the nat chains swapped
    go to touched. Whether a line of theirs in the top-level chains changed."""
    nat, owners = patch.tables["nat"], patch.owners
    shared_changed = False
    for key, old, new in updates:
        if old is not None:
            touched.update(old.rules.chains)
            for chain in old.rules.chains:
                del nat[chain]
                del owners[chain]
        if new is None:
            cache.entries.pop(key, None)
            patch.services.pop(key, None)
            shared_changed = True
            continue
        entry = _rendered(new, old, node, large)
        cache.entries[key] = entry
        patch.services[key] = entry.rules
        nat.update(entry.rules.chains)
        owners.update(dict.fromkeys(entry.rules.chains, entry.service.service_port_name))
        touched.update(entry.rules.chains)
        if old is None or old.rules.shared_lines() != entry.rules.shared_lines():
            shared_changed = True
    return shared_changed
