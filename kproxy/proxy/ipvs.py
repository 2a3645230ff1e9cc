"""kube-proxy's IPVS mode, for real, in one node's network namespace.

What kube-proxy (pkg/proxy/ipvs/proxier.go) programs, and so what we program:

- A dummy link ``kube-ipvs0`` (left down, like kube-proxy's) holding every
  ClusterIP as a /32, so the node accepts packets for them locally, where IPVS
  (hooked at LOCAL_IN and LOCAL_OUT) takes them.
- One IPVS virtual server per ClusterIP:port and one per node IP:NodePort, with
  the service's scheduler (lab default ``rr``, or the Service's
  ``kproxy.io/ipvs-scheduler`` annotation), masquerade (NAT) forwarding to every
  ready endpoint, weight 1. ClientIP affinity is IPVS persistence with the
  affinity timeout (``-p SECONDS``, netmask /32).
- ipsets instead of per-service iptables rules: KUBE-CLUSTER-IP (ip,port of
  every ClusterIP service), KUBE-NODE-PORT-TCP / -UDP (bitmap of NodePorts),
  KUBE-LOOP-BACK (ip,port,ip of local endpoints, for hairpin), and the few
  iptables rules that use them: KUBE-SERVICES marks traffic to a ClusterIP from
  outside the cluster CIDR and NodePort traffic for masquerade (KUBE-MARK-MASQ),
  KUBE-POSTROUTING masquerades marked and hairpin traffic, KUBE-FORWARD accepts
  marked and established forwarded traffic.
- sysctls: net.ipv4.vs.conntrack=1 (netfilter NAT and masquerade see IPVS
  traffic), expire_nodest_conn=1, expire_quiescent_template=1.

Endpoint removal is graceful, as kube-proxy's graceful_termination.go: a TCP
real server that leaves gets weight 0 (no new connections, established ones
go on) and is deleted by a later sync once ActiveConn + InActConn is 0; UDP real
servers go at once (and their conntrack entries with them).

Applying: IPVS services, real servers, the link and its addresses over netlink
(pyroute2); each sync compares the desired state with what the kernel holds
(read in full at the first sync, then kept) and changes only what differs.
ipsets go in one ``ipset restore`` (each set rebuilt aside and swapped in, so
every set changes atomically), iptables in one ``iptables-nft-restore
--noflush``; both only when their text changed.

``render(state, node)`` is pure (no root): the desired IPVS table in
``ipvsadm -Sn`` spelling, the ``ipset restore`` input and the
``iptables-restore`` input.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from kproxy.proxy.conntrack import StaleUdpCleaner
from kproxy import kmod
from kproxy.proxy.kernel import restore, run, set_sysctl
from kproxy.proxy.mode import Mode, Option, Service
from kproxy.proxy.netfilter import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, Jump, OwnedChains,
                                    forward_rules, mark_masq_rules, postrouting_rules, restore_tables,
                                    usable_endpoints)
from kproxy.proxy.saved import has_jump, read_tables, remove_chains
from kproxy.proxy.types import NodeInfo, ProxyState, ServicePort, SyncResult

DUMMY = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"  # a Service's own scheduler
# The schedulers of Linux IPVS (ip_vs_<name> modules); Debian's kernel has them all.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")
PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}



def kernel_modules(scheduler: str = DEFAULT_SCHEDULER) -> tuple[kmod.Module, ...]:
    """What IPVS mode needs loaded; kube-proxy loads these itself, as the kernel does not on demand."""
    return (kmod.Module("ip_vs", "IPVS mode", "/proc/net/ip_vs"),
            kmod.Module(f"ip_vs_{scheduler}", f"the IPVS scheduler {scheduler}"),
            kmod.Module("dummy", f"the {DUMMY} link"))


KUBE_CLUSTER_IP = "KUBE-CLUSTER-IP"
KUBE_LOOP_BACK = "KUBE-LOOP-BACK"
KUBE_NODE_PORT_TCP = "KUBE-NODE-PORT-TCP"
KUBE_NODE_PORT_UDP = "KUBE-NODE-PORT-UDP"
# name -> (type, create options, kube-proxy's comment)
IPSETS = {
    KUBE_LOOP_BACK: ("hash:ip,port,ip", "family inet hashsize 1024 maxelem 65536",
                     "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose"),
    KUBE_CLUSTER_IP: ("hash:ip,port", "family inet hashsize 1024 maxelem 65536",
                      "Kubernetes service cluster ip + port for masquerade purpose"),
    KUBE_NODE_PORT_TCP: ("bitmap:port", "range 0-65535", "Kubernetes nodeport TCP port for masquerade purpose"),
    KUBE_NODE_PORT_UDP: ("bitmap:port", "range 0-65535", "Kubernetes nodeport UDP port for masquerade purpose"),
}

KUBE_SERVICES = "KUBE-SERVICES"
KUBE_NODE_PORT = "KUBE-NODE-PORT"
NAT_CHAINS = (KUBE_SERVICES, KUBE_POSTROUTING, KUBE_NODE_PORT, KUBE_MARK_MASQ)
FILTER_CHAINS = (KUBE_FORWARD,)
# The jumps kube-proxy inserts first in the built-in chains.
JUMPS = (
    Jump("nat", "OUTPUT", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "PREROUTING", KUBE_SERVICES, "kubernetes service portals"),
    Jump("nat", "POSTROUTING", KUBE_POSTROUTING, "kubernetes postrouting rules"),
    Jump("filter", "FORWARD", KUBE_FORWARD, "kubernetes forwarding rules"),
)

is_own_chain = OwnedChains({"nat": NAT_CHAINS, "filter": FILTER_CHAINS})


SYSCTLS = {
    "net/ipv4/vs/conntrack": "1",
    "net/ipv4/vs/expire_nodest_conn": "1",
    "net/ipv4/vs/expire_quiescent_template": "1",
    "net/ipv4/ip_forward": "1",
}


# --- the desired state (pure) -------------------------------------------------

@dataclass(frozen=True)
class VirtualServer:
    protocol: str  # "TCP" / "UDP"
    ip: str
    port: int
    scheduler: str
    persistence: int = 0  # seconds; 0: not persistent

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.protocol, self.ip, self.port)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class Desired:
    addresses: list[str]  # on kube-ipvs0, each a /32
    services: dict[tuple[str, str, int], VirtualServer]
    dests: dict[tuple[str, str, int], list[tuple[str, int]]]  # by VirtualServer.key: (ip, port), weight 1
    owners: dict[tuple[str, str, int], str]  # VirtualServer.key -> service port name
    ipsets: dict[str, list[str]]
    iptables: str

    def ipvsadm_save(self) -> str:
        """The IPVS table in ``ipvsadm -Sn`` spelling."""
        out = []
        for key in sorted(self.services, key=_vs_order):
            vs = self.services[key]
            flag = {"TCP": "-t", "UDP": "-u", "SCTP": "--sctp-service"}[vs.protocol]
            line = f"-A {flag} {vs.address} -s {vs.scheduler}"
            if vs.persistence:
                line += f" -p {vs.persistence}"
            out.append(line)
            out += [f"-a {flag} {vs.address} -r {ip}:{port} -m -w 1" for ip, port in self.dests[key]]
        return "\n".join(out) + ("\n" if out else "")

    def ipset_restore(self) -> str:
        """``ipset restore`` input: each set built under a temporary name and swapped in (atomic per set)."""
        return ipset_swap_text(self.ipsets)

    def text(self) -> str:
        addresses = "".join(f"ip address add {ip}/32 dev {DUMMY}\n" for ip in self.addresses)
        return (f"# {DUMMY} (dummy link, down)\n{addresses}"
                f"# IPVS (ipvsadm -Sn)\n{self.ipvsadm_save()}"
                f"# ipsets (ipset restore)\n{self.ipset_restore()}"
                f"# iptables (iptables-restore --noflush)\n{self.iptables}")


def ipset_swap_text(sets: dict[str, list[str]]) -> str:
    """Each set built under a temporary name and swapped in: one ``ipset restore``, atomic per set."""
    out = []
    for name, (kind, options, comment) in IPSETS.items():
        tmp = _tmp_set(name)
        out.append(f"create {name} {kind} {options} comment -exist")
        out.append(f"create {tmp} {kind} {options} comment -exist")
        out.append(f"flush {tmp}")
        out += [f"add {tmp} {entry}" for entry in sets.get(name, [])]
        out.append(f"swap {tmp} {name}")
        out.append(f"destroy {tmp}")
    return "\n".join(out) + "\n"


def _vs_order(key: tuple[str, str, int]) -> tuple[bytes, str, int]:
    protocol, ip, port = key
    return (socket.inet_aton(ip), protocol, port)


def _tmp_set(name: str) -> str:
    return f"{name}-TMP"[:31]


def service_scheduler(service: Service) -> str:
    """The Service's own scheduler annotation ("" without one): IPVS mode's ServicePort.mode_info."""
    return str((service["metadata"].get("annotations") or {}).get(SCHEDULER_ANNOTATION, ""))


def scheduler_of(svc: ServicePort, default: str) -> str:
    wanted = svc.mode_info if isinstance(svc.mode_info, str) else ""
    if wanted in SCHEDULERS:
        return wanted
    if wanted:
        print(f"kproxy ipvs: {svc.service_port_name}: unknown IPVS scheduler {wanted!r} "
              f"(known: {', '.join(SCHEDULERS)}); using {default}", file=sys.stderr)
    return default


@dataclass(frozen=True)
class Piece:
    """What one service port contributes: its virtual servers, their real servers, its ClusterIP
    on kube-ipvs0 and its ipset entries."""

    owner: str  # the service port name
    services: tuple[VirtualServer, ...]
    dests: tuple[tuple[str, int], ...]
    address: str
    entries: tuple[tuple[str, str], ...]  # (set, entry)


def render_service(svc: ServicePort, endpoints: Any, node: NodeInfo, scheduler: str) -> Piece:
    protocol = svc.protocol.upper()
    proto = protocol.lower()
    usable = usable_endpoints(endpoints)
    sched = scheduler_of(svc, scheduler)
    services = []
    entries = []
    if svc.cluster_ip:
        services.append(VirtualServer(protocol, svc.cluster_ip, svc.port, sched, svc.affinity_seconds))
        entries.append((KUBE_CLUSTER_IP, f"{svc.cluster_ip},{proto}:{svc.port}"))
    if svc.node_port:
        if node.ip:
            services.append(VirtualServer(protocol, node.ip, svc.node_port, sched, svc.affinity_seconds))
        entries.append((KUBE_NODE_PORT_TCP if protocol == "TCP" else KUBE_NODE_PORT_UDP, str(svc.node_port)))
    entries += [(KUBE_LOOP_BACK, f"{ep.ip},{proto}:{ep.port},{ep.ip}") for ep in usable if ep.node == node.name]
    return Piece(svc.service_port_name, tuple(services), tuple((ep.ip, ep.port) for ep in usable),
                 svc.cluster_ip, tuple(entries))


def render(state: ProxyState, node: NodeInfo, *, scheduler: str = DEFAULT_SCHEDULER) -> Desired:
    """What kube-proxy's IPVS mode programs on this node for this state."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    services: dict[tuple[str, str, int], VirtualServer] = {}
    dests: dict[tuple[str, str, int], list[tuple[str, int]]] = {}
    owners: dict[tuple[str, str, int], str] = {}
    addresses: set[str] = set()
    sets: dict[str, set[str]] = {name: set() for name in IPSETS}
    for svc in state.services:
        piece = render_service(svc, state.endpoints_of(svc), node, scheduler)
        for vs in piece.services:
            services[vs.key] = vs
            dests[vs.key] = list(piece.dests)
            owners[vs.key] = piece.owner
        if piece.address:
            addresses.add(piece.address)
        for name, entry in piece.entries:
            sets[name].add(entry)
    ordered_sets = {name: sorted(entries, key=_entry_order) for name, entries in sets.items()}
    return Desired(sorted(addresses, key=_ip_key), services, dests, owners, ordered_sets, iptables_rules(node))


def _ip_key(ip: str) -> bytes:
    return socket.inet_aton(ip)


def _entry_order(entry: str) -> tuple[Any, ...]:
    head = entry.split(",")[0]
    if head.isdigit():
        return (1, int(head), b"", entry)
    return (0, 0, socket.inet_aton(head), entry)


def iptables_rules(node: NodeInfo) -> str:
    """The iptables-restore input of IPVS mode (it does not depend on the services: the ipsets do)."""
    cidr = f"! -s {node.cluster_cidr} " if node.cluster_cidr else ""
    nat = [
        f'-A {KUBE_POSTROUTING} -m comment --comment "{IPSETS[KUBE_LOOP_BACK][2]}" '
        f"-m set --match-set {KUBE_LOOP_BACK} dst,dst,src -j MASQUERADE",
        *postrouting_rules(),
        *mark_masq_rules(),
        f'-A {KUBE_SERVICES} {cidr}-m comment --comment "{IPSETS[KUBE_CLUSTER_IP][2]}" '
        f"-m set --match-set {KUBE_CLUSTER_IP} dst,dst -j {KUBE_MARK_MASQ}",
        f"-A {KUBE_SERVICES} -m addrtype --dst-type LOCAL -j {KUBE_NODE_PORT}",
        f"-A {KUBE_SERVICES} -m set --match-set {KUBE_CLUSTER_IP} dst,dst -j ACCEPT",
        f'-A {KUBE_NODE_PORT} -p tcp -m comment --comment "{IPSETS[KUBE_NODE_PORT_TCP][2]}" '
        f"-m set --match-set {KUBE_NODE_PORT_TCP} dst -j {KUBE_MARK_MASQ}",
        f'-A {KUBE_NODE_PORT} -p udp -m comment --comment "{IPSETS[KUBE_NODE_PORT_UDP][2]}" '
        f"-m set --match-set {KUBE_NODE_PORT_UDP} dst -j {KUBE_MARK_MASQ}",
    ]
    return restore_tables({"nat": (NAT_CHAINS, nat), "filter": (FILTER_CHAINS, forward_rules())})


# --- applying -----------------------------------------------------------------

@dataclass
class _Dest:
    weight: int
    active: int = 0
    inactive: int = 0


@dataclass
class _Kernel:
    """What the kernel holds (as far as we know): read in full at a full sync, then kept up to date."""

    services: dict[tuple[str, str, int], VirtualServer] = field(default_factory=dict)
    dests: dict[tuple[str, str, int], dict[tuple[str, int], _Dest]] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)
    iptables: str = ""


class IpvsProxier:
    """kube-proxy's IPVS mode on the node whose network namespace the calling thread is in.

    Netlink sockets (IPRoute, IPVS) are opened in the calling thread's namespace
    at the first sync; ipset and iptables-nft-restore run as children of it.
    """

    mode = "ipvs"

    def __init__(self, node: NodeInfo, *, scheduler: str = DEFAULT_SCHEDULER, full_sync_period: float = 3600.0) -> None:
        self.node = node
        self.scheduler = scheduler
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown IPVS scheduler {self.scheduler!r} (known: {', '.join(SCHEDULERS)})")
        self.full_sync_period = full_sync_period
        self.desired: Desired | None = None
        self.kernel = _Kernel()
        self._need_full = True
        self._last_full = 0.0
        self._ipr: Any = None
        self._ipvs: Any = None
        self._ifindex = 0
        self.conntrack = StaleUdpCleaner(self.mode)
        self._pieces: dict[str, tuple[Any, Piece]] = {}  # by ServicePort.key: (its inputs, what it renders to)
        self._services: Any = None  # the last state's services, and them by key
        self._by_key: dict[str, ServicePort] = {}
        self._generation = -1
        self._entry_refs: Counter[tuple[str, str]] = Counter()
        self._address_refs: Counter[str] = Counter()
        # virtual servers with weight-0 real servers -> the real servers they want
        self._terminating: dict[tuple[str, str, int], tuple[tuple[str, int], ...]] = {}

    # sockets ---------------------------------------------------------------

    def _sockets(self) -> None:
        if self._ipr is None:
            from pyroute2 import IPVS, IPRoute

            kmod.ensure(kernel_modules(self.scheduler))  # an agent restarted on a fresh boot, too

            self._ipr = IPRoute()
            self._ipvs = IPVS()

    def close(self) -> None:
        for sock in (self._ipr, self._ipvs):
            if sock is not None:
                sock.close()
        self._ipr = self._ipvs = None

    # sync ------------------------------------------------------------------

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        full = self._need_full or started - self._last_full >= self.full_sync_period
        self._sockets()
        try:
            if full:
                self._prepare_node()
                self._read_kernel()
                self._pieces = {}
            changed = self._apply(state, full)
        except Exception:
            self._need_full = True
            raise
        self._need_full = False
        if full:
            self._last_full = started
        self.conntrack.sync(state, self._by_key, usable_endpoints)
        return SyncResult(full=full, changed_services=changed, seconds=time.monotonic() - started)

    def _apply(self, state: ProxyState, full: bool) -> int:
        """Render only the service ports whose Service or endpoints changed since the last sync,
        and change in the kernel only what they change (at a full sync: everything, against
        what the kernel was read to hold)."""
        old_pieces = self._pieces
        if self._services is not state.services:
            self._services, self._by_key = state.services, {svc.key: svc for svc in state.services}
        # The tracker says which service ports may have changed since the state we synced last;
        # without that (or at a full sync) every one is compared.
        hint = state.changed if not full and state.generation == self._generation + 1 else None
        self._generation = state.generation
        candidates = state.services if hint is None else [self._by_key[k] for k in sorted(hint) if k in self._by_key]
        pieces: dict[str, tuple[Any, Piece]] = {} if hint is None else dict(old_pieces)
        changed_keys: list[str] = []
        endpoints = state.endpoints
        for svc in candidates:
            signature = (svc, tuple(endpoints.get(svc.key, ())))
            old = old_pieces.get(svc.key)
            if old is not None and old[0] == signature:
                pieces[svc.key] = old
                continue
            pieces[svc.key] = (signature, render_service(svc, signature[1], self.node, self.scheduler))
            changed_keys.append(svc.key)
        if hint is not None:
            removed = [key for key in sorted(hint) if key in old_pieces and key not in self._by_key]
            for key in removed:
                del pieces[key]
        else:
            removed = [key for key in old_pieces if key not in pieces]
        if not changed_keys and not removed and not full and not self._terminating:
            return 0
        # Reference counts of ipset entries and addresses (two service ports may share them).
        added_entries: list[tuple[str, str]] = []
        deleted_entries: list[tuple[str, str]] = []
        added_addresses: list[str] = []
        deleted_addresses: list[str] = []
        for key in removed + changed_keys:
            old = old_pieces.get(key)
            if old is None:
                continue
            for item in old[1].entries:
                self._entry_refs[item] -= 1
                if self._entry_refs[item] == 0:
                    del self._entry_refs[item]
                    deleted_entries.append(item)
            if old[1].address:
                self._address_refs[old[1].address] -= 1
                if self._address_refs[old[1].address] == 0:
                    del self._address_refs[old[1].address]
                    deleted_addresses.append(old[1].address)
        for key in changed_keys:
            piece = pieces[key][1]
            for item in piece.entries:
                self._entry_refs[item] += 1
                if self._entry_refs[item] == 1:
                    added_entries.append(item)
            if piece.address:
                self._address_refs[piece.address] += 1
                if self._address_refs[piece.address] == 1:
                    added_addresses.append(piece.address)
        kernel = self.kernel
        changed = 0
        # 1. ipsets (one restore), then the iptables rules that use them (one restore, when changed).
        if full:
            sets: dict[str, list[str]] = {name: [] for name in IPSETS}
            for name, entry in self._entry_refs:
                sets[name].append(entry)
            run(["ipset", "restore"], ipset_swap_text(sets))
        else:
            back = {(n, e) for n, e in added_entries} & {(n, e) for n, e in deleted_entries}
            lines = [f"del {n} {e} -exist" for n, e in deleted_entries if (n, e) not in back]
            lines += [f"add {n} {e} -exist" for n, e in added_entries if (n, e) not in back]
            if lines:
                run(["ipset", "restore"], "\n".join(lines) + "\n")
        iptables = iptables_rules(self.node)
        if iptables != kernel.iptables:
            restore(iptables + self._missing_jumps())
            kernel.iptables = iptables
        # 2. ClusterIPs on kube-ipvs0.
        wanted_addresses = set(self._address_refs)
        for ip in (sorted(wanted_addresses - kernel.addresses) if full else added_addresses):
            if ip not in kernel.addresses:
                self._ipr.addr("add", index=self._ifindex, address=ip, prefixlen=32)
                kernel.addresses.add(ip)
        # 3. Virtual servers and their real servers, of the changed service ports.
        wanted_services = {vs.key for key in (pieces if full else changed_keys) for vs in pieces[key][1].services}
        for key in (pieces if full else changed_keys):
            piece = pieces[key][1]
            for vs in piece.services:
                current = kernel.services.get(vs.key)
                if current is None:
                    self._ipvs.service("add", service=_service_spec(vs))
                    kernel.services[vs.key] = vs
                    kernel.dests[vs.key] = {}
                    changed += 1
                elif current != vs:
                    self._ipvs.service("set", service=_service_spec(vs))
                    kernel.services[vs.key] = vs
                    changed += 1
                changed += self._sync_dests(vs, piece.dests)
        # Real servers still terminating gracefully in unchanged services: delete them once idle.
        for vs_key, wanted in list(self._terminating.items()):
            vs = kernel.services.get(vs_key)
            if vs is not None and vs_key not in wanted_services:
                changed += self._sync_dests(vs, wanted)
        # 4. What left: virtual servers (with their real servers), then addresses.
        if full:
            gone = [k for k in kernel.services if k not in wanted_services]
        else:
            gone = [vs.key for key in removed + changed_keys if key in old_pieces
                    for vs in old_pieces[key][1].services if vs.key not in wanted_services]
        for vs_key in gone:
            if vs_key in kernel.services:
                self._ipvs.service("del", service=_service_key(kernel.services[vs_key]))
                del kernel.services[vs_key]
                kernel.dests.pop(vs_key, None)
                self._terminating.pop(vs_key, None)
                changed += 1
        for ip in (sorted(kernel.addresses - wanted_addresses) if full else deleted_addresses):
            if ip in kernel.addresses and ip not in wanted_addresses:
                self._ipr.addr("del", index=self._ifindex, address=ip, prefixlen=32)
                kernel.addresses.discard(ip)
        self._pieces = pieces
        return changed

    @property
    def owners(self) -> dict[tuple[str, str, int], str]:
        if self.desired is not None:
            return self.desired.owners
        return {vs.key: piece.owner for _, piece in self._pieces.values() for vs in piece.services}

    def _prepare_node(self) -> None:
        links = self._ipr.link_lookup(ifname=DUMMY)
        if not links:
            self._ipr.link("add", ifname=DUMMY, kind="dummy")
            links = self._ipr.link_lookup(ifname=DUMMY)
        self._ifindex = links[0]
        for name, value in SYSCTLS.items():  # /proc/sys/net/ipv4/vs exists once ip_vs is loaded (IPVS() loads it)
            set_sysctl(name, value, "ipvs")

    def _read_kernel(self) -> None:
        kernel = _Kernel()
        for msg in self._ipvs.service("dump"):
            vs, _ = _parse_service(msg)
            if vs is not None:
                kernel.services[vs.key] = vs
        for key, vs in kernel.services.items():
            kernel.dests[key] = self._read_dests(vs)
        kernel.addresses = {msg.get("IFA_ADDRESS") for msg in self._ipr.get_addr(index=self._ifindex, family=socket.AF_INET)}
        self.kernel = kernel  # the iptables text is empty: rewritten at a full sync
        self._entry_refs = Counter()
        self._address_refs = Counter()
        self._terminating = {}  # the full sync that follows visits every virtual server

    def _read_dests(self, vs: VirtualServer) -> dict[tuple[str, int], _Dest]:
        out = {}
        for msg in self._ipvs.dest("dump", service=_service_key(vs)):
            dest = msg.get("IPVS_CMD_ATTR_DEST") or msg.get("dest")
            out[(dest.get("addr"), dest.get("port"))] = _Dest(dest.get("weight"), dest.get("active_conns") or 0,
                                                              dest.get("inact_conns") or 0)
        return out

    def _sync_dests(self, vs: VirtualServer, wanted: Any) -> int:
        have = self.kernel.dests.setdefault(vs.key, {})
        changed = 0
        for dest in wanted:
            current = have.get(dest)
            if current is None:
                self._ipvs.dest("add", service=_service_key(vs), dest=_dest_spec(dest, 1))
                have[dest] = _Dest(1)
                changed += 1
            elif current.weight != 1:  # back from graceful termination
                self._ipvs.dest("set", service=_service_key(vs), dest=_dest_spec(dest, 1))
                current.weight = 1
                changed += 1
        wanted_set = set(wanted)
        leaving = [d for d in have if d not in wanted_set]
        if not leaving:
            self._terminating.pop(vs.key, None)
            return changed
        graceful = vs.protocol == "TCP"  # kube-proxy: no graceful termination for UDP and SCTP
        counts = self._read_dests(vs) if graceful and any(have[d].weight == 0 for d in leaving) else {}
        for dest in leaving:
            if graceful and have[dest].weight != 0:
                self._ipvs.dest("set", service=_service_key(vs), dest=_dest_spec(dest, 0))
                have[dest].weight = 0
                changed += 1
                continue
            live = counts.get(dest)
            if graceful and live is not None and live.active + live.inactive > 0:
                continue  # still has connections: a later sync deletes it
            self._ipvs.dest("del", service=_service_key(vs), dest=_dest_spec(dest, 0))
            del have[dest]
            changed += 1
        if any(d.weight == 0 for d in have.values()):
            self._terminating[vs.key] = tuple(wanted)
        else:
            self._terminating.pop(vs.key, None)
        return changed

    def terminating(self) -> dict[str, list[str]]:
        """Real servers kept at weight 0 until their connections end, by virtual server ("TCP ip:port")."""
        return {f"{vs.protocol} {vs.address}": [f"{ip}:{port}" for (ip, port), d in self.kernel.dests.get(key, {}).items()
                                                 if d.weight == 0]
                for key, vs in self.kernel.services.items()
                if any(d.weight == 0 for d in self.kernel.dests.get(key, {}).values())}

    def _missing_jumps(self) -> str:
        saved = read_tables()
        missing = [j for j in JUMPS if not has_jump(saved.get(j.table, {}).get(j.chain, []), j.target, j.comment)]
        tables = {table: ((), ()) for table in ("nat", "filter") if any(j.table == table for j in missing)}
        return restore_tables(tables, missing) if tables else ""

    # cleanup ---------------------------------------------------------------

    def cleanup(self) -> None:
        """Remove every trace of IPVS mode: virtual servers, kube-ipvs0, our iptables rules and ipsets.
        The netlink sockets are closed afterwards (a later sync opens new ones)."""
        self._sockets()
        try:
            for msg in self._ipvs.service("dump"):
                vs, _ = _parse_service(msg)
                if vs is not None:
                    self._ipvs.service("del", service=_service_key(vs))
            for index in self._ipr.link_lookup(ifname=DUMMY):
                self._ipr.link("del", index=index)
        finally:
            self.close()
        remove_chains(is_own_chain)
        for name in IPSETS:
            for set_name in (name, _tmp_set(name)):
                subprocess.run(["ipset", "destroy", set_name], capture_output=True)
        self.kernel = _Kernel()
        self.desired = None
        self._need_full = True
        self.conntrack.reset()
        self._pieces = {}
        self._entry_refs = Counter()
        self._address_refs = Counter()
        self._terminating = {}

    # looking ---------------------------------------------------------------

    def rules_excerpt(self, service: str | None = None,
                      owners: dict[tuple[str, str, int], str] | None = None) -> str:
        """``ipvsadm -Ln``-like: the live virtual servers (of one service, or all) with their real
        servers' weights and connection counts, then our ipsets' sizes. owners: which service
        port each virtual server belongs to (default: what this proxier synced)."""
        self._sockets()
        owners = self.owners if owners is None else owners
        lines = ["IP Virtual Server (kube-proxy IPVS mode)",
                 "Prot LocalAddress:Port Scheduler Flags",
                 "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"]
        for msg in sorted(self._ipvs.service("dump"), key=lambda m: _vs_order(_parse_service(m)[0].key)):
            vs, _ = _parse_service(msg)
            if vs is None:
                continue
            owner = owners.get(vs.key, "")
            if service is not None and not (owner == service or owner.split(":")[0] == service):
                continue
            flags = f" persistent {vs.persistence}" if vs.persistence else ""
            comment = f"  # {owner}" if owner else ""
            lines.append(f"{vs.protocol:<4} {vs.address} {vs.scheduler}{flags}{comment}")
            for (ip, port), dest in sorted(self._read_dests(vs).items(),
                                           key=lambda d: (int(ipaddress.ip_address(d[0][0])), d[0][1])):
                lines.append(f"  -> {f'{ip}:{port}':<28} Masq    {dest.weight:<6} {dest.active:<10} {dest.inactive}")
        if service is None:
            for name in IPSETS:
                done = subprocess.run(["ipset", "list", name, "-t"], capture_output=True, text=True)
                entries = next((l.split(":")[1].strip() for l in done.stdout.splitlines()
                                if l.startswith("Number of entries")), "?")
                lines.append(f"ipset {name}: {entries} entries")
        return "\n".join(lines) + "\n"


def _parse_service(msg: Any) -> tuple[VirtualServer | None, Any]:
    svc = msg.get("IPVS_CMD_ATTR_SERVICE") or msg.get("service")
    if svc is None or svc.get("fwmark"):
        return None, svc
    flags = svc.get("flags") or {}
    persistent = bool((flags.get("flags") if isinstance(flags, dict) else 0) & PERSISTENT)
    protocol = PROTOCOL_NAMES.get(svc.get("protocol"), str(svc.get("protocol")))
    return VirtualServer(protocol, svc.get("addr"), svc.get("port"), svc.get("sched_name"),
                         svc.get("timeout") if persistent else 0), svc


def _service_key(vs: VirtualServer) -> Any:
    from pyroute2 import IPVSService

    return IPVSService(addr=vs.ip, port=vs.port, protocol=PROTOCOLS[vs.protocol])


def _service_spec(vs: VirtualServer) -> Any:
    from pyroute2 import IPVSService

    return IPVSService(addr=vs.ip, port=vs.port, protocol=PROTOCOLS[vs.protocol], sched_name=vs.scheduler,
                       flags={"flags": PERSISTENT if vs.persistence else 0, "mask": 0xFFFF},
                       timeout=vs.persistence, netmask="255.255.255.255")


def _dest_spec(dest: tuple[str, int], weight: int) -> Any:
    from pyroute2 import IPVSDest

    return IPVSDest(addr=dest[0], port=dest[1], weight=weight, fwd_method=FWD_MASQ)


def _live_rules(state: ProxyState, node: NodeInfo, service: str | None) -> str:
    proxier = IpvsProxier(node)
    try:
        return proxier.rules_excerpt(service, owners=render(state, node).owners)
    finally:
        proxier.close()


MODE = Mode(
    name="ipvs",
    summary="kube-proxy's IPVS mode: virtual servers, kube-ipvs0 and ipsets",
    options=(Option("scheduler", f"the lab's IPVS scheduler; a Service's {SCHEDULER_ANNOTATION} "
                    "annotation overrides it", DEFAULT_SCHEDULER, SCHEDULERS),),
    make_proxier=lambda node, options: IpvsProxier(node, scheduler=options["scheduler"]),
    render_text=lambda state, node, options: render(state, node, scheduler=options["scheduler"]).text(),
    rules_excerpt=_live_rules,
    kernel_modules=lambda options: kernel_modules(options["scheduler"]),
    service_info=service_scheduler,
)
