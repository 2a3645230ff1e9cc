"""IPVS mode's rendered state, pure (no root): what kube-proxy's IPVS mode programs on a node.

``render(state, node)`` is the whole Ruleset: the ClusterIPs on kube-ipvs0, the
IPVS table in ``ipvsadm -Sn`` spelling, the ``ipset restore`` input and the
``iptables-restore`` input. ``render_service`` is one service port's share of
it (a Piece), which the proxier renders alone at a partial sync.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Any, Iterable

from kproxy import kmod
from kproxy.proxy.mode import Service
from kproxy.proxy.netfilter import (KUBE_FORWARD, KUBE_MARK_MASQ, KUBE_POSTROUTING, Jump, OwnedChains,
                                    forward_rules, mark_masq_rules, postrouting_rules, restore_tables,
                                    usable_endpoints)
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

DUMMY = "kube-ipvs0"
DEFAULT_SCHEDULER = "rr"
SCHEDULER_ANNOTATION = "kproxy.io/ipvs-scheduler"  # a Service's own scheduler
# The schedulers of Linux IPVS (ip_vs_<name> modules); Debian's kernel has them all.
SCHEDULERS = ("rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh")


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

VsKey = tuple[str, str, int]  # a virtual server's (protocol, ip, port): what IPVS tells them apart by
Dest = tuple[str, int]  # a real server's (ip, port)


@dataclass(frozen=True)
class VirtualServer:
    protocol: str  # "TCP" / "UDP"
    ip: str
    port: int
    scheduler: str
    persistence: int = 0  # seconds; 0: not persistent

    @property
    def key(self) -> VsKey:
        return (self.protocol, self.ip, self.port)

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass
class Ruleset:
    """What IPVS mode programs on one node, whole."""

    addresses: list[str]  # on kube-ipvs0, each a /32
    services: dict[VsKey, VirtualServer]
    dests: dict[VsKey, list[Dest]]  # by VirtualServer.key, each with weight 1
    owners: dict[VsKey, str]  # VirtualServer.key -> service port name
    ipsets: dict[str, list[str]]
    iptables: str

    def ipvsadm_save(self) -> str:
        """The IPVS table in ``ipvsadm -Sn`` spelling."""
        out = []
        for key in sorted(self.services, key=vs_order):
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
        tmp = tmp_set(name)
        out.append(f"create {name} {kind} {options} comment -exist")
        out.append(f"create {tmp} {kind} {options} comment -exist")
        out.append(f"flush {tmp}")
        out += [f"add {tmp} {entry}" for entry in sets.get(name, [])]
        out.append(f"swap {tmp} {name}")
        out.append(f"destroy {tmp}")
    return "\n".join(out) + "\n"


def vs_order(key: VsKey) -> tuple[bytes, str, int]:
    """ipvsadm's order: by address, then protocol and port."""
    protocol, ip, port = key
    return (socket.inet_aton(ip), protocol, port)


def tmp_set(name: str) -> str:
    """The set a full sync builds aside before swapping it in (ipset names have at most 31 bytes)."""
    return f"{name}-TMP"[:31]


def service_scheduler(service: Service) -> str:
    """The Service's own scheduler annotation ("" without one): IPVS mode's ServicePort.mode_info."""
    return str((service["metadata"].get("annotations") or {}).get(SCHEDULER_ANNOTATION, ""))


def scheduler_of(svc: ServicePort, default: str) -> str:
    """The Service's annotated scheduler if IPVS has it, else (said on stderr if one was asked
    for) the lab's."""
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
    dests: tuple[Dest, ...]
    address: str
    entries: tuple[tuple[str, str], ...]  # (set, entry)


def render_service(svc: ServicePort, endpoints: Iterable[Endpoint], node: NodeInfo, scheduler: str) -> Piece:
    """One service port's Piece on node; scheduler: the lab's."""
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


def render(state: ProxyState, node: NodeInfo, *, scheduler: str = DEFAULT_SCHEDULER) -> Ruleset:
    """What kube-proxy's IPVS mode programs on this node for this state."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    services: dict[VsKey, VirtualServer] = {}
    dests: dict[VsKey, list[Dest]] = {}
    owners: dict[VsKey, str] = {}
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
    return Ruleset(sorted(addresses, key=_ip_key), services, dests, owners, ordered_sets, iptables_rules(node))


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
