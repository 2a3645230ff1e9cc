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
   sorted by name), which is also the order iptables-legacy-save lists chains in.

3. ``restore_input(new, old)``: the text for one ``iptables-restore --noflush``:
   everything when ``old`` is None (a full sync), or only what changed (a
   partial sync, kube-proxy's MinimizeIPTablesRestore): all filter chains and
   the nat top-level chains every time, per-service nat chains only when their
   rules changed, vanished chains flushed and deleted (``-X``).

4. ``IptablesProxier``: the Proxier of this mode. One ``iptables-legacy-restore``
   per sync, runs in the namespace of the calling thread (the agent runs inside
   its node's namespace). Also deletes stale UDP conntrack entries like
   kube-proxy, removes everything in ``cleanup()``, and shows the live rules
   with packet counters in ``rules_excerpt()``.

Why the legacy backend: ``iptables-nft-restore --noflush`` costs time that grows
faster than the number of chains the input declares, and kube-proxy's input
declares every chain on a full sync. Measured here (Debian 12, iptables 1.8.9,
kernel 6.18, 2 endpoints per service, 1 in 4 a NodePort, median of 3, seconds;
legacy = our whole sync() including render and iptables-save, nft = only
iptables-nft-restore of the very same text; method in docs/iptables.md):

    services  first full sync      full resync          partial (1 service changed)
              legacy / nft         legacy / nft         legacy / nft
    1k        0.09 / 0.29          0.14 / 0.32          0.09 / 0.08
    10k       1.14 / 11.6          1.63 / 15.2          0.82 / 1.61

From 1k to 10k services legacy grows ~12x (linear: each table goes into the
kernel as one blob), nft ~40-47x. A full sync happens at start, after every
failure and periodically, and at 10k it takes nft 11-15 s against legacy's
1.1-1.6 s; partial syncs are no better with nft either, because kube-proxy
rewrites all of KUBE-SERVICES (10k rules) in every partial sync too.
"""

from __future__ import annotations

import base64
import hashlib
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kproxy.proxy.kernel import SAVE, RestoreError, restore, run, set_sysctl
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult

# --- names and constants (kube-proxy's) --------------------------------------

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
KUBE_NODEPORTS = "KUBE-NODEPORTS"
KUBE_POSTROUTING = "KUBE-POSTROUTING"
KUBE_MARK_MASQ = "KUBE-MARK-MASQ"
KUBE_FORWARD = "KUBE-FORWARD"
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

MASQ_MARK = "0x4000"  # 1 << --iptables-masquerade-bit (default 14)
LARGE_CLUSTER_ENDPOINTS = 1000  # above this many endpoints kube-proxy drops per-endpoint comments
FULL_SYNC_PERIOD = 3600.0  # kube-proxy's proxyutil.FullSyncPeriod (1 h) between forced full syncs



def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_port_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-SVC-<hash>: the service port's endpoint dispatch chain (kube-proxy's servicePortPolicyClusterChain)."""
    return SVC_PREFIX + _hash16(service_port_name + protocol.lower())


def service_external_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-EXT-<hash>: where NodePort (and external IP / LB) traffic enters the service."""
    return EXT_PREFIX + _hash16(service_port_name + protocol.lower())


def service_firewall_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-FW-<hash>: loadBalancerSourceRanges (never rendered here: no LoadBalancer services)."""
    return FW_PREFIX + _hash16(service_port_name + protocol.lower())


def service_local_chain_name(service_port_name: str, protocol: str) -> str:
    """KUBE-SVL-<hash>: Local traffic policy (never rendered here: Cluster policy only)."""
    return SVL_PREFIX + _hash16(service_port_name + protocol.lower())


def endpoint_chain_name(service_port_name: str, protocol: str, endpoint: str) -> str:
    """KUBE-SEP-<hash> of one endpoint ("ip:port") of one service port."""
    return SEP_PREFIX + _hash16(service_port_name + protocol.lower() + endpoint)


def is_service_chain(chain: str) -> bool:
    return chain.startswith(SERVICE_CHAIN_PREFIXES)


def probability(n: int) -> str:
    """kube-proxy's computeProbability: 1/n as %0.10f."""
    return f"{1.0 / n:0.10f}"


def _comment(text: str) -> str:
    # kube-proxy quotes comments that contain spaces and leaves single words bare.
    return f'"{text}"' if " " in text else text


# --- the rendered rules -----------------------------------------------------

@dataclass(frozen=True)
class Jump:
    """A rule kube-proxy prepends to a built-in chain (iptablesJumpChains)."""

    table: str
    chain: str  # built-in: PREROUTING, INPUT, ...
    target: str  # ours
    comment: str = ""
    extra: str = ""  # matches before the comment, e.g. "-m conntrack --ctstate NEW"

    @property
    def spec(self) -> str:
        parts = [self.extra] if self.extra else []
        if self.comment:
            parts.append(f"-m comment --comment {_comment(self.comment)}")
        parts.append(f"-j {self.target}")
        return " ".join(parts)


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


@dataclass
class Ruleset:
    """Per table ("filter", "nat"): the ordered chains we own and their rule lines ("-A CHAIN ...")."""

    tables: dict[str, dict[str, list[str]]]
    jumps: tuple[Jump, ...] = JUMPS
    owners: dict[str, str] = field(default_factory=dict)  # service chain -> servicePortName

    def chains(self, table: str) -> list[str]:
        return list(self.tables[table])

    def rules(self, table: str, chain: str) -> list[str]:
        return self.tables[table][chain]

    def restore_text(self) -> str:
        """The iptables-restore input of a full sync (without the jumps from built-in chains)."""
        return restore_input(self)[0]


def _order(chains: dict[str, list[str]]) -> dict[str, list[str]]:
    first = [c for c in (KUBE_NODEPORTS, KUBE_SERVICES) if c in chains]
    rest = sorted(c for c in chains if c not in first)
    return {c: chains[c] for c in first + rest}


def usable_endpoints(endpoints: Iterable[Endpoint]) -> list[Endpoint]:
    """Ready endpoints, deduplicated and sorted by "ip:port" string as kube-proxy's EndpointsMap."""
    by_address = {ep.address: ep for ep in endpoints if ep.ready}
    return [by_address[a] for a in sorted(by_address)]


def render(state: ProxyState, node: NodeInfo, *, localhost_nodeports: bool = True,
           conntrack_tcp_liberal: bool = False) -> Ruleset:
    """The chains kube-proxy's iptables mode writes on this node for this state.

    localhost_nodeports: kube-proxy's --iptables-localhost-nodeports (default
    true): NodePorts answer on 127.0.0.1 too (needs route_localnet=1, set by the
    proxier), and the KUBE-FIREWALL anti-martian rule is added. kube-proxy's
    extra nfacct-counted 127.0.0.0/8 NodePort rules are left out, as kube-proxy
    itself does when the kernel lacks nfacct.
    conntrack_tcp_liberal: nf_conntrack_tcp_be_liberal is set, so kube-proxy
    does not DROP ctstate INVALID in KUBE-FORWARD.
    """
    services = sorted(state.services, key=lambda s: (s.service_port_name, s.protocol, s.cluster_ip, s.port))
    usable = {svc.key: usable_endpoints(state.endpoints_of(svc)) for svc in services}
    large = sum(len(eps) for eps in usable.values()) > LARGE_CLUSTER_ENDPOINTS

    filter_: dict[str, list[str]] = {c: [] for c in FILTER_TOP_CHAINS}
    nat: dict[str, list[str]] = {c: [] for c in NAT_TOP_CHAINS}
    owners: dict[str, str] = {}

    nat[KUBE_POSTROUTING] += [
        f"-A {KUBE_POSTROUTING} -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
        f"-A {KUBE_POSTROUTING} -j MARK --xor-mark {MASQ_MARK}",
        f'-A {KUBE_POSTROUTING} -m comment --comment "kubernetes service traffic requiring SNAT" '
        "-j MASQUERADE --random-fully",
    ]
    nat[KUBE_MARK_MASQ].append(f"-A {KUBE_MARK_MASQ} -j MARK --or-mark {MASQ_MARK}")
    if localhost_nodeports:
        filter_[KUBELET_FIREWALL] = [
            f'-A {KUBELET_FIREWALL} -m comment --comment "block incoming localnet connections" '
            "-d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"]

    for svc in services:
        name = svc.service_port_name
        proto = svc.protocol.lower()
        endpoints = usable[svc.key]
        svc_chain = service_port_chain_name(name, proto)
        ext_chain = service_external_chain_name(name, proto)
        match = f"-m {proto} -p {proto} -d {svc.cluster_ip} --dport {svc.port}"

        if not endpoints:
            # No nat chains at all; the filter table rejects the service's traffic.
            reject = _comment(f"{name} has no endpoints")
            filter_[KUBE_SERVICES].append(f"-A {KUBE_SERVICES} -m comment --comment {reject} {match} -j REJECT")
            if svc.node_port:
                filter_[KUBE_EXTERNAL_SERVICES].append(
                    f"-A {KUBE_EXTERNAL_SERVICES} -m comment --comment {reject} -m addrtype --dst-type LOCAL "
                    f"-m {proto} -p {proto} --dport {svc.node_port} -j REJECT")
            continue

        cluster_ip = _comment(f"{name} cluster IP")
        nat[KUBE_SERVICES].append(f"-A {KUBE_SERVICES} -m comment --comment {cluster_ip} {match} -j {svc_chain}")
        if svc.node_port:
            nat[KUBE_NODEPORTS].append(f"-A {KUBE_NODEPORTS} -m comment --comment {_comment(name)} "
                                       f"-m {proto} -p {proto} --dport {svc.node_port} -j {ext_chain}")
            # External traffic (Cluster policy): masquerade, in case the endpoint is on another node.
            nat[ext_chain] = [
                f"-A {ext_chain} -m comment --comment "
                f"{_comment(f'masquerade traffic for {name} external destinations')} -j {KUBE_MARK_MASQ}",
                f"-A {ext_chain} -j {svc_chain}",
            ]
            owners[ext_chain] = name

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
        nat[svc_chain] = rules
        owners[svc_chain] = name

        for ep, sep in zip(endpoints, sep_chains):
            head = f"-A {sep}{_svc_comment(large, name)}"
            recent = f" -m recent --name {sep} --set" if svc.affinity_seconds else ""
            nat[sep] = [
                f"{head} -s {ep.ip} -j {KUBE_MARK_MASQ}",  # hairpin: a pod reaching itself via its service
                f"{head}{recent} -m {proto} -p {proto} -j DNAT --to-destination {ep.address}",
            ]
            owners[sep] = name

    # The tail call to KUBE-NODEPORTS must stay the last rule of KUBE-SERVICES.
    local = "-m addrtype --dst-type LOCAL" + ("" if localhost_nodeports else " ! -d 127.0.0.0/8")
    nat[KUBE_SERVICES].append(
        f'-A {KUBE_SERVICES} -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule '
        f'in this chain" {local} -j {KUBE_NODEPORTS}')

    if not conntrack_tcp_liberal:
        filter_[KUBE_FORWARD].append(f"-A {KUBE_FORWARD} -m conntrack --ctstate INVALID -j DROP")
    filter_[KUBE_FORWARD] += [
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding rules" '
        f"-m mark --mark {MASQ_MARK}/{MASQ_MARK} -j ACCEPT",
        f'-A {KUBE_FORWARD} -m comment --comment "kubernetes forwarding conntrack rule" '
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    ]
    jumps = JUMPS + (KUBELET_JUMPS if localhost_nodeports else ())
    return Ruleset(tables={"filter": _order(filter_), "nat": _order(nat)}, jumps=jumps, owners=owners)


def _svc_comment(large: bool, text: str) -> str:
    # kube-proxy's appendServiceCommentLocked: no per-endpoint comments in large clusters.
    return "" if large else f" -m comment --comment {_comment(text)}"


def restore_input(new: Ruleset, old: Ruleset | None = None, *, delete: Iterable[tuple[str, str]] = (),
                  jumps: Sequence[Jump] = (), unlink: Iterable[tuple[str, str]] = ()) -> tuple[str, int]:
    """iptables-restore --noflush input and the number of chains it writes or deletes.

    old None: a full sync, every chain of ours declared (flushed) and written.
    old given: a partial sync against the rules the kernel got last time: all
    filter chains and the nat top-level chains (as kube-proxy), the other nat
    chains only if new or changed, and chains that vanished flushed and deleted.
    delete: extra (table, chain) to flush and delete (stale chains found in the kernel).
    jumps: jump rules to prepend to built-in chains (the missing ones).
    unlink: (table, "-A CHAIN ..." as iptables-save shows it) rules of others to delete,
    the jumps into chains that are going away.
    """
    extra_deletes: dict[str, list[str]] = {}
    for table, chain in delete:
        if chain not in new.tables.get(table, {}):
            extra_deletes.setdefault(table, []).append(chain)
    out: list[str] = []
    touched = 0
    for table in ("filter", "nat"):
        chains = new.tables[table]
        before = old.tables.get(table, {}) if old is not None else {}
        if old is None or table == "filter":
            write = list(chains)
        else:
            write = [c for c in chains if c in NAT_TOP_CHAINS or before.get(c) != chains[c]]
        gone = [c for c in before if c not in chains]
        gone += [c for c in extra_deletes.get(table, []) if c not in gone]
        out.append(f"*{table}")
        out += [f":{c} - [0:0]" for c in write + gone]
        for chain in write:
            out += chains[chain]
        for jump in jumps:
            if jump.table == table:
                out.append(f"-I {jump.chain} 1 {jump.spec}")
        out += ["-D" + rule[2:] for t, rule in unlink if t == table]
        out += [f"-X {c}" for c in gone]
        out.append("COMMIT")
        touched += len(write) + len(gone)
    return "\n".join(out) + "\n", touched


# --- reading iptables-save ---------------------------------------------------

def parse_save(text: str, *, skip_own_rules: bool = False) -> dict[str, dict[str, list[str]]]:
    """iptables-save output -> table -> chain -> its "-A" lines (counters, if any, stripped).

    skip_own_rules: keep only the chain names of our chains, not their rules
    (a full sync needs just those; at 10k services it saves parsing ~10 MB).
    """
    tables: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
            current = tables.setdefault(table, {})
        elif line.startswith(":"):
            current.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith(("-A ", "[")):
            rule = re.sub(r"^\[\d+:\d+\] ", "", line) if line[0] == "[" else line
            chain = rule.split(" ", 2)[1]
            if skip_own_rules and is_own_chain(table, chain):
                continue
            current.setdefault(chain, []).append(rule)
    return tables


def _jumps_to(rule: str) -> str:
    m = re.search(r"(?:^| )-j (\S+)", rule)
    return m.group(1) if m else ""


def _has_jump(saved_rules: list[str], jump: Jump) -> bool:
    for rule in saved_rules:
        if _jumps_to(rule) == jump.target and (not jump.comment or jump.comment in rule):
            return True
    return False


OWN_CHAINS = {
    "filter": set(FILTER_TOP_CHAINS) | {KUBELET_FIREWALL},
    "nat": set(NAT_TOP_CHAINS),
}


def is_own_chain(table: str, chain: str) -> bool:
    return chain in OWN_CHAINS.get(table, set()) or (table == "nat" and is_service_chain(chain))


# --- applying ----------------------------------------------------------------



@dataclass
class _Applied:
    """What the kernel got from the last successful sync, per service key (for conntrack cleanup)."""

    service: ServicePort
    endpoints: tuple[Endpoint, ...]


class IptablesProxier:
    """kube-proxy's iptables mode on the node whose network namespace the calling thread is in.

    Every command (iptables-legacy-restore/-save, conntrack) is a child of the
    calling thread, so it acts on that thread's namespace: the agent runs inside
    its node; tests wrap calls in cni.netns.entered(path).

    Syncs: the first one, the one after a failure or a cleanup, every
    `full_sync_every`-th one (0: never for that reason) and any once
    `full_sync_period` seconds have passed since the last full one (kube-proxy:
    1 h) are full: iptables-legacy-save is read to find stale chains of ours
    and missing jumps from the built-in chains, and every chain is written.
    The others are partial (see restore_input). Either way: one
    iptables-legacy-restore --noflush, so chains of others (CNI's) survive.
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
        self.last_conntrack: list[list[str]] = []  # the conntrack commands of the last sync
        self.syncs = 0
        self._need_full = True
        self._last_full = 0.0
        self._applied: dict[str, _Applied] = {}

    # sync ------------------------------------------------------------------

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        self.syncs += 1
        full = (self._need_full or self.ruleset is None
                or (self.full_sync_every > 0 and self.syncs % self.full_sync_every == 0)
                or started - self._last_full >= self.full_sync_period)
        if full:
            self._prepare_node()
        desired = render(state, self.node, localhost_nodeports=self.localhost_nodeports,
                         conntrack_tcp_liberal=self._tcp_liberal())
        if full:
            saved = parse_save(run([SAVE, "-t", "filter"]).stdout + run([SAVE, "-t", "nat"]).stdout,
                               skip_own_rules=True)
            stale = [(t, c) for t, chains in saved.items() for c in chains
                     if t in ("filter", "nat") and is_own_chain(t, c) and c not in desired.tables.get(t, {})]
            missing = [j for j in desired.jumps if not _has_jump(saved.get(j.table, {}).get(j.chain, []), j)]
            unlink = [(t, rule) for t, chains in saved.items() for chain, rules in chains.items()
                      if not is_own_chain(t, chain) for rule in rules if (t, _jumps_to(rule)) in stale]
            text, touched = restore_input(desired, None, delete=stale, jumps=missing, unlink=unlink)
        else:
            text, touched = restore_input(desired, self.ruleset)
        self.last_restore = text
        try:
            restore(text, counters=True)  # --counters, as kube-proxy
        except RestoreError:
            # The changes since the last good sync are still ours to compute (we keep the
            # previous ruleset), but the kernel may now hold half of them: resync fully.
            self._need_full = True
            raise
        self.ruleset = desired
        self._need_full = False
        if full:
            self._last_full = started
        self._clear_stale_conntrack(state)
        return SyncResult(full=full, changed_chains=touched, seconds=time.monotonic() - started)

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

    # conntrack -------------------------------------------------------------

    def _clear_stale_conntrack(self, state: ProxyState) -> None:
        """kube-proxy's conntrack.CleanStaleEntries, with the conntrack CLI (1.28's exec flavour)."""
        now = {svc.key: _Applied(svc, tuple(usable_endpoints(state.endpoints_of(svc))))
               for svc in state.services if svc.protocol.upper() == "UDP"}  # TCP needs no cleanup
        before, self._applied = self._applied, now
        commands: list[list[str]] = []
        for key, old in before.items():
            new = now.get(key)
            if new is None:  # service port deleted: its ClusterIP may have stale entries
                commands.append(["-D", "--orig-dst", old.service.cluster_ip, "-p", "udp"])
                continue
            svc = new.service
            gone = {ep.address: ep.ip for ep in old.endpoints}
            for address in {ep.address for ep in new.endpoints}:
                gone.pop(address, None)
            for ip in sorted(set(gone.values())):
                if svc.node_port:
                    commands.append(["-D", "-p", "udp", "--dport", str(svc.node_port), "--dst-nat", ip])
                commands.append(["-D", "--orig-dst", svc.cluster_ip, "--dst-nat", ip, "-p", "udp"])
        for key, new in now.items():
            svc = new.service
            old = before.get(key)
            if new.endpoints and (old is None or not old.endpoints):
                # Newly active: packets sent while it had no endpoints left entries that REJECT/blackhole.
                commands.append(["-D", "--orig-dst", svc.cluster_ip, "-p", "udp"])
                if svc.node_port:
                    commands.append(["-D", "-p", "udp", "--dport", str(svc.node_port)])
        self.last_conntrack = commands
        for argv in commands:
            try:
                done = subprocess.run(["conntrack", *argv], capture_output=True, text=True)
            except FileNotFoundError:
                print("kproxy iptables: conntrack not installed; stale UDP entries stay", file=sys.stderr)
                return
            # Exit 1 with "0 flow entries have been deleted" just means there was nothing to delete.
            if done.returncode != 0 and "0 flow entries" not in done.stderr:
                print(f"kproxy iptables: conntrack {' '.join(argv)}: {done.stderr.strip()}", file=sys.stderr)

    # cleanup ---------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove every jump into our chains and all our chains (filter and nat), in one restore."""
        saved = parse_save(run([SAVE, "-t", "filter"]).stdout + run([SAVE, "-t", "nat"]).stdout)
        out: list[str] = []
        for table in ("filter", "nat"):
            chains = saved.get(table, {})
            ours = [c for c in chains if is_own_chain(table, c)]
            if not ours:
                continue
            out.append(f"*{table}")
            out += [f":{c} - [0:0]" for c in ours]
            for chain, rules in chains.items():
                if chain in ours:
                    continue
                out += ["-D" + rule[2:] for rule in rules if _jumps_to(rule) in ours]
            out += [f"-X {c}" for c in ours]
            out.append("COMMIT")
        if out:
            restore("\n".join(out) + "\n", counters=True)
        self.ruleset = None
        self._need_full = True
        self._applied = {}

    # looking ---------------------------------------------------------------

    def rules_excerpt(self, service: str | None = None) -> str:
        """iptables-legacy-save -c (with [packets:bytes]) of the filter and nat tables, cut down to
        our rules, or to those of one service ("ns/name" or "ns/name:port"): its chains, and the
        lines of the shared chains that jump to them or name the service in a comment."""
        text = run([SAVE, "-c"]).stdout
        mine: set[str] = set()
        if service is not None and self.ruleset is not None:
            mine = {c for c, owner in self.ruleset.owners.items() if _names(owner, service)}
        named = re.compile(re.escape(service) + r'(?=[:\s"]|$)') if service is not None else None
        out: list[str] = []
        table = ""
        for line in text.splitlines():
            if line.startswith("*"):
                table = line[1:]
                if table in ("filter", "nat"):
                    out.append(line)
                continue
            if table not in ("filter", "nat"):
                continue
            if line == "COMMIT":
                out.append(line)
            elif line.startswith(":"):
                chain = line[1:].split()[0]
                if (named is None and is_own_chain(table, chain)) or chain in mine:
                    out.append(line)
            elif line.startswith(("[", "-A")):
                rule = re.sub(r"^\[\d+:\d+\] ", "", line)
                chain, target = rule.split()[1], _jumps_to(rule)
                if named is None:
                    keep = is_own_chain(table, chain) or is_own_chain(table, target)
                else:
                    keep = chain in mine or target in mine or (is_own_chain(table, chain) and bool(named.search(rule)))
                if keep:
                    out.append(line)
        return "\n".join(out) + "\n"


def _names(service_port_name: str, service: str) -> bool:
    return service_port_name == service or service_port_name.split(":")[0] == service
