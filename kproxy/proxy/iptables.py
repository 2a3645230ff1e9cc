"""kube-proxy's iptables mode, for real, in one node's network namespace.

What a reader finds here, top to bottom:

1. Names. Chain names are computed exactly as kube-proxy computes them
   (pkg/proxy/iptables/proxier.go): ``KUBE-SVC-`` / ``KUBE-EXT-`` / ``KUBE-FW-`` +
   the first 16 characters of base32(sha256(servicePortName + protocol)), with
   servicePortName ``ns/name:port`` (``ns/name`` for an unnamed port) and the
   protocol lowercase ("tcp"); ``KUBE-SEP-`` hashes servicePortName + protocol
   + ``ip:port`` of the endpoint. So ``ns1/svc1:p80`` TCP is
   ``KUBE-SVC-XPGD46QRK7WJZT7O`` here as in every cluster.

2. ``render(state, node) -> Ruleset``: pure, no root. The filter and nat chains
   kube-proxy (1.28+ layout) would write for this node, rule for rule, in
   kube-proxy's own spelling (the ``iptables-restore`` input it generates), so
   ``iptables-save`` of our namespace reads like a real node's. The order of
   the chains and of the services is the canonical one of kube-proxy's
   proxier_test.go (KUBE-NODEPORTS, KUBE-SERVICES, then the rest sorted; services
   sorted by name). With a RenderCache it re-renders only the service ports
   that changed and patches the last ruleset.

3. ``restore_input(new, old)``: the text of a partial sync, only the chains
   that changed and the ones that vanished (or, without old, kube-proxy's
   layout of everything, for ``kproxy render``); ``write_full_restore``: the
   text of a full sync, written while it renders.

4. ``IptablesProxier``: the Proxier of this mode. One ``iptables-nft-restore
   --noflush`` per sync, run in the namespace of the calling thread (the agent
   runs inside its node's namespace). Also deletes stale UDP conntrack entries
   like kube-proxy (conntrack.py), removes everything in ``cleanup()``, and
   shows the live rules with packet counters in ``rules_excerpt()``.

Why the nft backend, and the chain-less ``-Z`` that starts every table of a
full sync: docs/iptables.md has the measurements. In short: legacy replaces
the whole table in the kernel on any change (0.40 s for one service at 10k
services), nft only what changed (0.02-0.09 s); nft's full restore was
quadratic in the chains named (14 s at 10k) until the ``-Z`` (1.9 s).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from kproxy.proxy.conntrack import StaleUdpCleaner
from kproxy.proxy.mode import Mode, Option, Options
from kproxy.proxy.kernel import IPTABLES, SAVE, RestoreError, restore, restore_stream, run, set_sysctl
from kproxy.proxy.netfilter import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, Jump, OwnedChains, comment,
                                    forward_rules, mark_masq_rules, postrouting_rules, usable_endpoints)
from kproxy.proxy.saved import excerpt, has_jump, jump_target, remove_chains
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult

# --- names and constants (kube-proxy's) --------------------------------------

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_PROXY_FIREWALL = "KUBE-PROXY-FIREWALL"
KUBELET_FIREWALL = "KUBE-FIREWALL"  # kubelet's; kube-proxy writes a copy when localhost NodePorts are on

SVC_PREFIX = "KUBE-SVC-"
SVL_PREFIX = "KUBE-SVL-"
FW_PREFIX = "KUBE-FW-"
EXT_PREFIX = "KUBE-EXT-"
SEP_PREFIX = "KUBE-SEP-"
SERVICE_CHAIN_PREFIXES = (SVC_PREFIX, SVL_PREFIX, SEP_PREFIX, FW_PREFIX, EXT_PREFIX)

FILTER_TOP_CHAINS = (KUBE_SERVICES, KUBE_EXTERNAL_SERVICES, KUBE_FORWARD, KUBE_NODEPORTS, KUBE_PROXY_FIREWALL)
NAT_TOP_CHAINS = (KUBE_SERVICES, KUBE_NODEPORTS, KUBE_POSTROUTING, KUBE_MARK_MASQ)

LARGE_CLUSTER_ENDPOINTS = 1000  # above this many endpoints kube-proxy drops per-endpoint comments
FULL_SYNC_PERIOD = 3600.0  # kube-proxy's proxyutil.FullSyncPeriod (1 h) between forced full syncs
STREAM_LINES = 1024  # a full sync's text goes to iptables-restore in blocks of about this many lines

_BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_BASE32_PAIRS = [a + b for a in _BASE32 for b in _BASE32]  # every 10-bit value as two digits


def _hash16(text: str) -> str:
    # base32(sha256(text))[:16] is the base32 of the digest's first 10 bytes (80 bits), done
    # here without base64.b32encode, which is pure Python and half of a 10k-service render.
    bits = int.from_bytes(hashlib.sha256(text.encode()).digest()[:10], "big")
    return "".join([_BASE32_PAIRS[(bits >> shift) & 1023] for shift in (70, 60, 50, 40, 30, 20, 10, 0)])


def service_port_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-SVC-<hash>: the service port's endpoint dispatch chain (kube-proxy's servicePortPolicyClusterChain)."""
    return SVC_PREFIX + _hash16(service_port_name + protocol.lower())


def service_external_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-EXT-<hash>: where NodePort (and external IP / LB) traffic enters the service."""
    return EXT_PREFIX + _hash16(service_port_name + protocol.lower())


def service_firewall_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-FW-<hash>: loadBalancerSourceRanges (never rendered here: no LoadBalancer services)."""
    return FW_PREFIX + _hash16(service_port_name + protocol.lower())


def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-<hash> of one endpoint ("ip:port") of one service port."""
    return SEP_PREFIX + _hash16(service_port_name + protocol.lower() + endpoint)


def probability(n: int) -> str:
    """kube-proxy's computeProbability: 1/n as %0.10f."""
    return f"{1.0 / n:0.10f}"


# --- the rendered rules -----------------------------------------------------

_NEW = "-m conntrack --ctstate NEW"
# In kube-proxy's order; each is prepended, so the last of a chain ends up first.
JUMPS = (
    Jump("filter", "INPUT", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    Jump("filter", "FORWARD", KUBE_EXTERNAL_SERVICES, "kubernetes externally-visible service portals", _NEW),
    Jump("filter", "INPUT", KUBE_NODEPORTS, "kubernetes health check service ports"),
    Jump("filter", "FORWARD", KUBE_SERVICES, "kubernetes service portals", _NEW),
    Jump("filter", "OUTPUT", KUBE_SERVICES, "kubernetes service portals", _NEW),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
    Jump("filter", "INPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("filter", "OUTPUT", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("filter", "FORWARD", KUBE_PROXY_FIREWALL, "kubernetes load balancer firewall", _NEW),
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
)
# kubelet's (iptablesKubeletJumpChains): only with localhost NodePorts.
KUBELET_JUMPS = (
    Jump("filter", "INPUT", KUBELET_FIREWALL),
    Jump("filter", "OUTPUT", KUBELET_FIREWALL),
)


def jumps_for(localhost_nodeports: bool) -> tuple[Jump, ...]:
    return JUMPS + (KUBELET_JUMPS if localhost_nodeports else ())


@dataclass
class Ruleset:
    """Per table ("filter", "nat"): the ordered chains we own and their rule lines ("-A CHAIN ...").

    The rules are tuples: a proxier's render cache shares them between rulesets."""

    tables: dict[str, dict[str, tuple[str, ...]]]
    jumps: tuple[Jump, ...] = JUMPS
    owners: dict[str, str] = field(default_factory=dict)  # service chain -> servicePortName
    # Set when rendered as a patch of `base`: the only nat chains that may differ from it.
    base: Ruleset | None = field(default=None, repr=False)
    touched: frozenset[str] = frozenset()

    def chains(self, table: str) -> list[str]:
        return _ordered(self.tables[table])

    def rules(self, table: str, chain: str) -> tuple[str, ...]:
        return self.tables[table][chain]

    def restore_text(self) -> str:
        """The iptables-restore input kube-proxy would write in a full sync (without the jumps
        from built-in chains)."""
        return restore_input(self)[0]


def _ordered(chains: Iterable[str]) -> list[str]:
    """kube-proxy's order of chains: KUBE-NODEPORTS, KUBE-SERVICES, then the rest sorted."""
    rest = sorted(chains)
    first = [c for c in (KUBE_NODEPORTS, KUBE_SERVICES) if c in rest]
    return first + [c for c in rest if c not in first]


@dataclass(frozen=True)
class _ServiceRules:
    """What one service port adds to the ruleset: lines in the shared chains and chains of its own."""

    nat_services: tuple[str, ...] = ()  # its KUBE-SERVICES rule
    nat_nodeports: tuple[str, ...] = ()  # its KUBE-NODEPORTS rule
    filter_services: tuple[str, ...] = ()  # REJECTs while it has no endpoints
    filter_external: tuple[str, ...] = ()
    chains: dict[str, tuple[str, ...]] = field(default_factory=dict)  # its KUBE-SVC/EXT/SEP chains


@dataclass
class _Rendered:
    service: ServicePort
    endpoints: list[Endpoint]  # as the state gave them (compared by identity first)
    usable: list[Endpoint]
    large: bool
    rules: _ServiceRules


@dataclass
class RenderCache:
    """What the last render with this cache made, and from what.

    A proxier keeps one. With it a sync re-renders only the service ports whose
    ServicePort or endpoints changed (the StateTracker keeps the others'
    objects); and when the state says which keys changed since the one
    rendered last (ProxyState.generation/changed), it patches the last
    ruleset instead of assembling all of it again. The result is the same
    as without a cache."""

    options: tuple[str, bool, bool] = ("", True, False)
    entries: dict[str, _Rendered] = field(default_factory=dict)
    services: Sequence[ServicePort] = ()  # the state's services last time ...
    ordered: list[ServicePort] = field(default_factory=list)  # ... in kube-proxy's order ...
    by_key: dict[str, ServicePort] = field(default_factory=dict)  # ... and by key
    generation: int = -1
    usable_total: int = 0
    ruleset: Ruleset | None = None


def _service_order(svc: ServicePort) -> tuple[str, str, str, int]:
    return svc.service_port_name, svc.protocol, svc.cluster_ip, svc.port


def render(state: ProxyState, node: NodeInfo, *, localhost_nodeports: bool = True,
           conntrack_tcp_liberal: bool = False, cache: RenderCache | None = None,
           each: Callable[[_Rendered], None] | None = None) -> Ruleset:
    """The chains kube-proxy's iptables mode writes on this node for this state.

    localhost_nodeports: kube-proxy's --iptables-localhost-nodeports (default
    true): NodePorts answer on 127.0.0.1 too (needs route_localnet=1, set by the
    proxier), and the KUBE-FIREWALL anti-martian rule is added. kube-proxy's
    extra nfacct-counted 127.0.0.0/8 NodePort rules are left out, as kube-proxy
    itself does when the kernel lacks nfacct.
    conntrack_tcp_liberal: nf_conntrack_tcp_be_liberal is set, so kube-proxy
    does not DROP ctstate INVALID in KUBE-FORWARD.
    cache: reuse what did not change since the last render with this cache.
    each: render every service port (no patching) and call each(its rules) in order.
    """
    options = (node.cluster_cidr, localhost_nodeports, conntrack_tcp_liberal)
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


def _rendered(svc: ServicePort, endpoints: list[Endpoint], usable: list[Endpoint], old: _Rendered | None,
              node: NodeInfo, large: bool) -> _Rendered:
    """svc's rules: the cached ones when nothing they depend on changed."""
    if (old is not None and old.large == large and (old.service is svc or old.service == svc)
            and (old.usable is usable or old.usable == usable)):
        return old if old.endpoints is endpoints else _Rendered(svc, endpoints, usable, large, old.rules)
    return _Rendered(svc, endpoints, usable, large, _render_service(svc, usable, node, large))


def _render_all(state: ProxyState, node: NodeInfo, cache: RenderCache,
                each: Callable[[_Rendered], None] | None) -> Ruleset:
    before = cache.entries
    work: list[tuple[ServicePort, list[Endpoint], list[Endpoint], _Rendered | None]] = []
    for svc in cache.ordered:
        endpoints = state.endpoints_of(svc)
        old = before.get(svc.key)
        usable = old.usable if old is not None and old.endpoints is endpoints else usable_endpoints(endpoints)
        work.append((svc, endpoints, usable, old))
    cache.usable_total = sum(len(usable) for _, _, usable, _ in work)
    large = cache.usable_total > LARGE_CLUSTER_ENDPOINTS
    cache.entries = {}
    for svc, endpoints, usable, old in work:
        entry = cache.entries[svc.key] = _rendered(svc, endpoints, usable, old, node, large)
        if each is not None:
            each(entry)
    nat: dict[str, tuple[str, ...]] = {}
    owners: dict[str, str] = {}
    for entry in cache.entries.values():
        nat.update(entry.rules.chains)
        owners.update(dict.fromkeys(entry.rules.chains, entry.service.service_port_name))
    filter_top, nat_top = _top_chains(cache)
    return Ruleset(tables={"filter": filter_top, "nat": {**nat_top, **nat}}, jumps=jumps_for(cache.options[1]), owners=owners)


def _render_changes(state: ProxyState, node: NodeInfo, cache: RenderCache, changed: frozenset[str],
                    reordered: bool) -> Ruleset | None:
    """The last ruleset with the changed service ports' chains swapped (None: render all instead)."""
    base = cache.ruleset
    assert base is not None
    updates = []
    total = cache.usable_total
    for key in changed:
        old = cache.entries.get(key)
        svc = cache.by_key.get(key)
        if svc is None:
            updates.append((key, old, None))
            total -= len(old.usable) if old is not None else 0
            continue
        endpoints = state.endpoints_of(svc)
        usable = old.usable if old is not None and old.endpoints is endpoints else usable_endpoints(endpoints)
        total += len(usable) - (len(old.usable) if old is not None else 0)
        updates.append((key, old, (svc, endpoints, usable)))
    large = total > LARGE_CLUSTER_ENDPOINTS
    if large != (cache.usable_total > LARGE_CLUSTER_ENDPOINTS):
        return None  # every service's comments change
    cache.usable_total = total
    nat = dict(base.tables["nat"])
    owners = dict(base.owners)
    touched: set[str] = set()
    shared_changed = reordered  # do the top-level chains need rebuilding?
    for key, old, new in updates:
        if old is not None:
            touched.update(old.rules.chains)
            for chain in old.rules.chains:
                del nat[chain]
                del owners[chain]
        if new is None:
            del cache.entries[key]
            shared_changed = True
            continue
        entry = _rendered(*new, old, node, large)
        cache.entries[key] = entry
        nat.update(entry.rules.chains)
        owners.update(dict.fromkeys(entry.rules.chains, entry.service.service_port_name))
        touched.update(entry.rules.chains)
        if old is None or _shared_lines(old.rules) != _shared_lines(entry.rules):
            shared_changed = True
    filter_ = base.tables["filter"]
    if shared_changed:
        filter_, nat_top = _top_chains(cache)
        nat.update(nat_top)
        touched.update(nat_top)
    base.base = None  # only the newest patch needs its base: no chain of old rulesets kept alive
    return Ruleset(tables={"filter": filter_, "nat": nat}, jumps=base.jumps, owners=owners,
                   base=base, touched=frozenset(touched))


def _shared_lines(rules: _ServiceRules) -> tuple[tuple[str, ...], ...]:
    return rules.nat_services, rules.nat_nodeports, rules.filter_services, rules.filter_external


def _top_chains(cache: RenderCache) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]]]:
    """The shared chains (filter's and nat's top-level ones) for the cached service ports, in order."""
    _, localhost_nodeports, conntrack_tcp_liberal = cache.options
    rules = [cache.entries[svc.key].rules for svc in cache.ordered]
    filter_: dict[str, tuple[str, ...]] = {
        KUBE_SERVICES: tuple(line for r in rules for line in r.filter_services),
        KUBE_EXTERNAL_SERVICES: tuple(line for r in rules for line in r.filter_external),
        KUBE_NODEPORTS: (),
        KUBE_PROXY_FIREWALL: (),
    }
    if localhost_nodeports:
        filter_[KUBELET_FIREWALL] = (
            f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",)
    filter_[KUBE_FORWARD] = (
        () if conntrack_tcp_liberal else (f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP",)
    ) + forward_rules()
    # The tail call to KUBE-NODEPORTS must stay the last rule of KUBE-SERVICES.
    local = "-m addrtype --dst-type LOCAL" + ("" if localhost_nodeports else " ! -d 127.0.0.0/8")
    nat = {
        KUBE_SERVICES: tuple(line for r in rules for line in r.nat_services) + (
            f'-A {KUBE_SERVICES} -m comment --comment "kubernetes service nodeports; NOTE: this must be the last '
            f'rule in this chain" {local} -j {KUBE_NODEPORTS}',),
        KUBE_NODEPORTS: tuple(line for r in rules for line in r.nat_nodeports),
        KUBE_POSTROUTING: postrouting_rules(),
        KUBE_MARK_MASQ: mark_masq_rules(),
    }
    return filter_, nat


def _render_service(svc: ServicePort, endpoints: list[Endpoint], node: NodeInfo, large: bool) -> _ServiceRules:
    """One service port's rules, as kube-proxy's syncProxyRules writes them for it."""
    name = svc.service_port_name
    proto = svc.protocol.lower()
    svc_chain = service_port_chain_name(name, proto)
    match = f"-m {proto} -p {proto} -d {svc.cluster_ip} --dport {svc.port}"

    if not endpoints:
        # No nat chains at all; the filter table rejects the service's traffic.
        reject = comment(f"{name} has no endpoints")
        external = ()
        if svc.node_port:
            external = (f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {reject} -m addrtype --dst-type LOCAL "
                        f"-m {proto} -p {proto} --dport {svc.node_port} -j REJECT",)
        return _ServiceRules(filter_services=(f"-A {KUBE_SERVICES} -m comment --comment {reject} {match} -j REJECT",),
                             filter_external=external)

    chains: dict[str, list[str]] = {}
    cluster_ip = comment(f"{name} cluster IP")
    nodeports: tuple[str, ...] = ()
    if svc.node_port:
        ext_chain = service_external_chain_name(name, proto)
        nodeports = (f"-A {KUBE_NODEPORTS} -m comment --comment {comment(name)} "
                     f"-m {proto} -p {proto} --dport {svc.node_port} -j {ext_chain}",)
        # External traffic (Cluster policy): masquerade, in case the endpoint is on another node.
        chains[ext_chain] = [
            f"-A {ext_chain} -m comment --comment "
            f"{comment(f'masquerade traffic for {name} external destinations')} -j {KUBE_MARK_MASQ}",
            f"-A {ext_chain} -j {svc_chain}",
        ]

    rules = []
    if node.cluster_cidr:
        # Off-cluster traffic to the ClusterIP (e.g. from the node itself) may bounce off-node: masquerade.
        rules.append(f"-A {svc_chain} -m comment --comment {cluster_ip} {match} "
                     f"! -s {node.cluster_cidr} -j {KUBE_MARK_MASQ}")
    sep_chains = [endpoint_chain_name(name, proto, ep.address) for ep in endpoints]
    if svc.affinity_seconds:
        for ep, sep in zip(endpoints, sep_chains):
            rules.append(f"-A {svc_chain}{_svc_comment(large, f'{name} -> {ep.address}')} -m recent --name {sep} "
                         f"--rcheck --seconds {svc.affinity_seconds} --reap -j {sep}")
    n = len(endpoints)
    for i, (ep, sep) in enumerate(zip(endpoints, sep_chains)):
        pick = f" -m statistic --mode random --probability {probability(n - i)}" if i < n - 1 else ""
        rules.append(f"-A {svc_chain}{_svc_comment(large, f'{name} -> {ep.address}')}{pick} -j {sep}")
    chains[svc_chain] = rules

    for ep, sep in zip(endpoints, sep_chains):
        head = f"-A {sep}{_svc_comment(large, name)}"
        recent = f" -m recent --name {sep} --set" if svc.affinity_seconds else ""
        chains[sep] = [
            f"{head} -s {ep.ip} -j {KUBE_MARK_MASQ}",  # hairpin: a pod reaching itself via its service
            f"{head}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep.address}",
        ]
    return _ServiceRules(
        nat_services=(f"-A {KUBE_SERVICES} -m comment --comment {cluster_ip} {match} -j {svc_chain}",),
        nat_nodeports=nodeports, chains={c: tuple(rules) for c, rules in chains.items()})


def _svc_comment(large: bool, text: str) -> str:
    # kube-proxy's appendServiceCommentLocked: no per-endpoint comments in large clusters.
    return "" if large else f" -m comment --comment {comment(text)}"


def restore_input(new: Ruleset, old: Ruleset | None = None) -> tuple[str, int]:
    """iptables-restore --noflush input and the number of chains it writes or deletes.

    old None: every chain of ours declared (flushed) and written, in kube-proxy's
    layout (what `kproxy render` prints; the agent's full syncs use write_full_restore).
    old given: a partial sync against the rules the kernel got last time:
    only the chains whose rules changed, and chains that vanished flushed
    and deleted. kube-proxy rewrites its top-level chains on every partial
    sync too; we leave unchanged ones alone (the periodic full sync repairs
    drift), so one endpoint change at 10k services is not a 10k-rule write.
    """
    out: list[str] = []
    touched = 0
    for table in ("filter", "nat"):
        chains = new.tables[table]
        before = old.tables.get(table, {}) if old is not None else {}
        # A patch of old says which nat chains may differ; otherwise compare them all (the render
        # cache shares unchanged chains' rules, so that is mostly an identity check).
        patch = old is not None and new.base is old and table == "nat"
        if old is None:
            write = _ordered(chains)
        else:
            write = _ordered(c for c in (new.touched if patch else chains) if c in chains
                             and (was := before.get(c)) is not (rules := chains[c]) and was != rules)
        gone = _ordered(c for c in (new.touched if patch else before) if c in before and c not in chains)
        if old is not None and not (write or gone):
            continue
        out += _head(table, write) + _tail(chains, write, gone)
        touched += len(write) + len(gone)
    return "\n".join(out) + "\n" if out else "", touched


def write_full_restore(state: ProxyState, node: NodeInfo, write: Callable[[str], object], *,
                       kernel: Callable[[Ruleset], KernelLeftovers] | None = None,
                       localhost_nodeports: bool = True, conntrack_tcp_liberal: bool = False,
                       cache: RenderCache | None = None) -> tuple[Ruleset, int]:
    """Render state and write the iptables-restore --noflush input of a full sync while rendering
    (the agent pipes it into iptables-restore, which parses as the services render).

    The nat table comes first: its top-level chains declared (flushed), then each service
    port's chains, declared and written as they render, then the top-level chains' rules;
    then the filter table. kernel(ruleset) says what else the kernel holds: chains of ours
    the state no longer has (flushed and deleted), jumps from built-in chains that are
    missing, and others' rules jumping into chains that go.

    Each table starts with a chain-less ``-Z``: it makes iptables-nft-restore fetch the
    table's chains in one dump instead of keeping a sorted list of every chain name the
    input mentions, which costs O(chains²) string compares in iptables 1.8.9's
    nft_cache_level_set (10k services: 14 s instead of 2 s). It also zeroes the table's
    counters (ours restart at zero in a full sync anyway; others' do too).
    Returns the ruleset and the number of chains written or deleted.
    """
    write("\n".join(_head("nat", NAT_TOP_CHAINS, zero=True)) + "\n")
    block: list[str] = []
    # Each service port's own chains, then its KUBE-SERVICES and KUBE-NODEPORTS rules (in the
    # rendering order, which is those chains' order), go out as they render: the restore parses
    # them meanwhile and can commit soon after the last one.
    streamed = {KUBE_SERVICES: 0, KUBE_NODEPORTS: 0}

    def each(entry: _Rendered) -> None:
        rules = entry.rules
        block.extend(f":{chain} - [0:0]" for chain in rules.chains)
        for lines in rules.chains.values():
            block.extend(lines)
        block.extend(rules.nat_services)
        block.extend(rules.nat_nodeports)
        streamed[KUBE_SERVICES] += len(rules.nat_services)
        streamed[KUBE_NODEPORTS] += len(rules.nat_nodeports)
        if len(block) >= STREAM_LINES:
            write("\n".join(block) + "\n")
            block.clear()

    ruleset = render(state, node, localhost_nodeports=localhost_nodeports,
                     conntrack_tcp_liberal=conntrack_tcp_liberal, cache=cache, each=each)
    leftovers = kernel(ruleset) if kernel is not None else KernelLeftovers()
    out = block
    touched = 0
    for table in ("nat", "filter"):
        chains = ruleset.tables[table]
        gone = [c for t, c in leftovers.stale if t == table and c not in chains]
        jumps = [j for j in leftovers.missing_jumps if j.table == table]
        unlink = [rule for t, rule in leftovers.unlink if t == table]
        if table == "nat":
            top = list(NAT_TOP_CHAINS)
            rest = {chain: chains[chain][streamed.get(chain, 0):] for chain in top}
        else:
            top = _ordered(chains)
            rest = chains
            out += _head(table, top, zero=True)
        out += _tail(rest, top, gone, jumps, unlink)
        touched += len(chains) + len(gone)
    write("\n".join(out) + "\n")
    return ruleset, touched


@dataclass
class KernelLeftovers:
    """What a full sync found in the kernel besides the desired rules."""

    stale: list[tuple[str, str]] = field(default_factory=list)  # (table, chain) of ours, no longer desired
    missing_jumps: list[Jump] = field(default_factory=list)  # from built-in chains
    unlink: list[tuple[str, str]] = field(default_factory=list)  # (table, "-A ...") jumps into stale chains


def _head(table: str, declare: Iterable[str], zero: bool = False) -> list[str]:
    return [f"*{table}", *(["-Z"] if zero else []), *(f":{chain} - [0:0]" for chain in declare)]


def _tail(chains: dict[str, tuple[str, ...]], write: Iterable[str], gone: list[str], jumps: Iterable[Jump] = (),
          unlink: Iterable[str] = ()) -> list[str]:
    out = [rule for chain in write for rule in chains[chain]]
    out += [jump.rule for jump in jumps]
    out += ["-D" + rule[2:] for rule in unlink]
    out += [f":{chain} - [0:0]" for chain in gone]  # flushed, so -X finds them empty
    out += [f"-X {chain}" for chain in gone]
    out.append("COMMIT")
    return out


# --- reading the kernel ------------------------------------------------------

is_own_chain = OwnedChains({"filter": (*FILTER_TOP_CHAINS, KUBELET_FIREWALL), "nat": NAT_TOP_CHAINS},
                           nat_prefixes=SERVICE_CHAIN_PREFIXES)


class _KernelChains:
    """What a full sync must know of the kernel, read by child processes while the rules render:
    the names of all chains of the filter and nat tables (``nft list chains``: one dump,
    no rules; iptables-nft-save would print every rule, 4.7 s at 10k services) and, in a
    table that has chains of ours, the rules of the built-in chains our jumps live in
    (``iptables -S CHAIN``). A table without any has no jump of ours to find (a jump needs
    its target chain), so a fresh node's first sync reads only the chain names."""

    def __init__(self, chains: subprocess.Popen[str], localhost_nodeports: bool) -> None:
        self._chains = chains
        self._jumps = jumps_for(localhost_nodeports)

    @classmethod
    def start(cls, localhost_nodeports: bool) -> _KernelChains:
        return cls(_spawn(["nft", "list", "chains", "ip"]), localhost_nodeports)

    def leftovers(self, desired: Ruleset) -> KernelLeftovers:
        chains, builtin = self.collect()
        stale = [(t, c) for t, names in chains.items() for c in names
                 if is_own_chain(t, c) and c not in desired.tables.get(t, {})]
        missing = [j for j in desired.jumps if not has_jump(builtin.get((j.table, j.chain), []), j.target, j.comment)]
        unlink = [(t, rule) for (t, _), rules in builtin.items() for rule in rules if (t, jump_target(rule)) in stale]
        return KernelLeftovers(stale, missing, unlink)

    def collect(self) -> tuple[dict[str, list[str]], dict[tuple[str, str], list[str]]]:
        """(table -> chain names, (table, built-in chain) -> its "-A" rules)."""
        chains: dict[str, list[str]] = {}
        table = ""
        for line in _output(self._chains).splitlines():
            words = line.split()
            if words[:2] == ["table", "ip"]:
                table = words[2]
            elif words[:1] == ["chain"] and table in ("filter", "nat"):
                chains.setdefault(table, []).append(words[1])
        ours = {t for t, names in chains.items() if any(is_own_chain(t, c) for c in names)}
        builtin = dict.fromkeys((j.table, j.chain) for j in self._jumps if j.table in ours)  # each chain once
        procs = {(t, c): _spawn([IPTABLES, "-w", "5", "-t", t, "-S", c]) for t, c in builtin}
        rules = {key: [l for l in _output(proc).splitlines() if l.startswith("-A ")] for key, proc in procs.items()}
        return chains, rules


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _output(proc: subprocess.Popen[str]) -> str:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, proc.args))} failed ({proc.returncode}): {err.strip()}")
    return out


# --- applying ----------------------------------------------------------------

class IptablesProxier:
    """kube-proxy's iptables mode on the node whose network namespace the calling thread is in.

    Every command (iptables-nft-restore and friends, conntrack) is a child of the
    calling thread, so it acts on that thread's namespace: the agent runs inside
    its node; tests wrap calls in cni.netns.entered(path).

    Syncs: the first one, the one after a failure or a cleanup, every
    `full_sync_every`-th one (0: never for that reason) and any once
    `full_sync_period` seconds have passed since the last full one (kube-proxy:
    1 h) are full: the kernel's chain names and built-in chains are read to
    find stale chains of ours and missing jumps, and every chain is written
    (write_full_restore). The others are partial (see restore_input). Either
    way: one iptables-nft-restore --noflush, so chains of others (CNI's) survive.
    """

    mode = "iptables"

    def __init__(self, node: NodeInfo, *, full_sync_every: int = 0, full_sync_period: float = FULL_SYNC_PERIOD,
                 localhost_nodeports: bool = True) -> None:
        self.node = node
        self.full_sync_every = full_sync_every
        self.full_sync_period = full_sync_period
        self.localhost_nodeports = localhost_nodeports
        self.ruleset: Ruleset | None = None  # what the kernel has from our last successful sync
        self.last_restore = ""  # the input of the last restore attempted (for tests and debugging)
        self.conntrack = StaleUdpCleaner(self.mode)
        self.syncs = 0
        self._need_full = True
        self._last_full = 0.0
        self._cache = RenderCache()

    # sync ------------------------------------------------------------------

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        self.syncs += 1
        full = (self._need_full or self.ruleset is None
                or (self.full_sync_every > 0 and self.syncs % self.full_sync_every == 0)
                or started - self._last_full >= self.full_sync_period)
        options = {"localhost_nodeports": self.localhost_nodeports, "conntrack_tcp_liberal": self._tcp_liberal()}
        try:
            if full:
                written: list[str] = []
                # The restore starts first (its start-up overlaps ours), then the kernel is read
                # while the rules render.
                with restore_stream(counters=True) as feed:  # --counters, as kube-proxy
                    self._prepare_node()
                    kernel = _KernelChains.start(self.localhost_nodeports)

                    def write(chunk: str) -> None:
                        written.append(chunk)
                        feed(chunk)

                    desired, touched = write_full_restore(state, self.node, write, kernel=kernel.leftovers,
                                                          cache=self._cache, **options)
                self.last_restore = "".join(written)
            else:
                desired = render(state, self.node, cache=self._cache, **options)
                self.last_restore, touched = restore_input(desired, self.ruleset)
                if self.last_restore:
                    restore(self.last_restore, counters=True)
        except RestoreError:
            # The changes since the last good sync are still ours to compute (we keep the
            # previous ruleset), but the kernel may now hold half of them: resync fully.
            self._need_full = True
            raise
        self.ruleset = desired
        self._need_full = False
        if full:
            self._last_full = started
        self.conntrack.sync(state, self._cache.by_key, usable_endpoints)  # by_key: filled by the render
        return SyncResult(full=full, changed_services=touched, seconds=time.monotonic() - started)

    def _prepare_node(self) -> None:
        if self.localhost_nodeports:
            # NodePorts on 127.0.0.1 need DNAT of loopback-destined packets to route out.
            set_sysctl("net/ipv4/conf/all/route_localnet", "1", "iptables")

    @staticmethod
    def _tcp_liberal() -> bool:
        try:
            with open("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal") as f:
                return f.read().strip() not in ("", "0")
        except OSError:
            return False

    # cleanup ---------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove every jump into our chains and all our chains (filter and nat), in one restore."""
        remove_chains(is_own_chain)
        self.ruleset = None
        self._need_full = True
        self.conntrack.reset()

    def close(self) -> None:
        """Nothing stays open between syncs (every command is a child that has exited)."""

    # looking ---------------------------------------------------------------

    def rules_excerpt(self, service: str | None = None) -> str:
        return live_rules(self.ruleset.owners if self.ruleset is not None else {}, service)


def live_rules(owners: dict[str, str], service: str | None) -> str:
    """iptables-save -c (with [packets:bytes]) of the filter and nat tables, cut down to our
    rules, or to those of one service ("ns/name" or "ns/name:port"): its chains (owners: service
    chain -> servicePortName), and the lines of the shared chains that jump to them or name the
    service in a comment. Runs in the calling thread's namespace."""
    mine = {c for c, owner in owners.items() if _names(owner, service)} if service is not None else set()
    named = re.compile(re.escape(service) + r'(?=[:\s"]|$)') if service is not None else None

    def keep_chain(table: str, chain: str) -> bool:
        return (named is None and is_own_chain(table, chain)) or chain in mine

    def keep_rule(table: str, chain: str, target: str, rule: str) -> bool:
        if named is None:
            return is_own_chain(table, chain) or is_own_chain(table, target)
        return chain in mine or target in mine or (is_own_chain(table, chain) and bool(named.search(rule)))

    return excerpt(run([SAVE, "-c"]).stdout, keep_chain, keep_rule)


def _names(service_port_name: str, service: str) -> bool:
    return service_port_name == service or service_port_name.split(":")[0] == service


# --- the mode -----------------------------------------------------------------

def _localhost_nodeports(options: Options) -> bool:
    return options["localhost-nodeports"] == "true"


MODE = Mode(
    name="iptables",
    summary="kube-proxy's iptables mode: KUBE-SVC/SEP chains, one iptables-nft-restore per sync",
    options=(Option("localhost-nodeports", "NodePorts answer on 127.0.0.1 too "
                    "(kube-proxy's --iptables-localhost-nodeports)", "true", ("true", "false")),),
    make_proxier=lambda node, options: IptablesProxier(node, localhost_nodeports=_localhost_nodeports(options)),
    render_text=lambda state, node, options: render(
        state, node, localhost_nodeports=_localhost_nodeports(options)).restore_text(),
    rules_excerpt=lambda state, node, service: live_rules(render(state, node).owners, service),
)
