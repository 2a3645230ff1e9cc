"""IPVS mode's rendered state, pure (no root): what kube-proxy's IPVS mode programs on a node.

``render(state, node)`` is the whole Ruleset: the addresses on kube-ipvs0, the IPVS table in
``ipvsadm -Sn`` spelling, the ``ipset restore`` input and the ``iptables-restore`` input.
``render_service`` is one service port's share of it (a Piece), which the proxier renders
alone at a partial sync.

One service port, as kube-proxy's syncProxyRules builds it: a virtual server on its ClusterIP,
on each external IP, on each load-balancer IP and on each node IP at its NodePort. Their real
servers are syncEndpoint's choice: the ClusterIP's follow internalTrafficPolicy, the others
externalTrafficPolicy; a Local policy takes this node's endpoints, or when it has none the
cluster's (kube-proxy PR 97081: in-cluster clients still get an answer; outside clients' replies
come back from the pod, unmasqueraded, and are dropped), and a Cluster policy the cluster's.
Either kind is the ready endpoints, or when none is ready the serving terminating ones
(kproxy.proxy.topology.categorize). kube-ipvs0 holds the ClusterIP and the external and
load-balancer IPs that are not the node's own address.
"""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from typing import Iterable

from kproxy import kmod
from kproxy.proxy.ipvs import sets as s
from kproxy.proxy.ipvs.rules import Blocked, iptables_rules
from kproxy.proxy.mode import Service
from kproxy.proxy.topology import categorize
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


VsKey = tuple[str, str, int]  # a virtual server's (protocol, ip, port): what IPVS tells them apart by
Dest = tuple[str, int]  # a real server's (ip, port)
Entry = tuple[str, str]  # (ipset, entry)


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
        return s.ipset_swap_text(self.ipsets)

    def text(self) -> str:
        addresses = "".join(f"ip address add {ip}/32 dev {DUMMY}\n" for ip in self.addresses)
        return (f"# {DUMMY} (dummy link, down)\n{addresses}"
                f"# IPVS (ipvsadm -Sn)\n{self.ipvsadm_save()}"
                f"# ipsets (ipset restore)\n{self.ipset_restore()}"
                f"# iptables (iptables-restore --noflush)\n{self.iptables}")


def vs_order(key: VsKey) -> tuple[bytes, str, int]:
    """ipvsadm's order: by address, then protocol and port."""
    protocol, ip, port = key
    return (socket.inet_aton(ip), protocol, port)


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


def node_port_ips(node: NodeInfo) -> tuple[str, ...]:
    """The node IPs NodePorts get virtual servers on (NodeInfo.node_port_ips); without
    --nodeport-addresses the node IP (kube-proxy takes every local address but kube-ipvs0's and
    loopback, and a lab node has only that one)."""
    ips = node.node_port_ips()
    if ips is None:
        return (node.ip,) if node.ip else ()
    return ips


@dataclass(frozen=True)
class Piece:
    """What one service port contributes: its virtual servers with their real servers, its
    addresses on kube-ipvs0, its ipset entries and the load-balancer IPs it keeps from the node."""

    owner: str  # the service port name
    services: tuple[tuple[VirtualServer, tuple[Dest, ...]], ...]
    addresses: tuple[str, ...]
    entries: tuple[Entry, ...]
    blocked: tuple[Blocked, ...] = ()


def render_service(svc: ServicePort, endpoints: Iterable[Endpoint], node: NodeInfo, scheduler: str) -> Piece:
    """One service port's Piece on node; scheduler: the lab's."""
    protocol = svc.protocol.upper()
    proto = protocol.lower()
    endpoints = list(endpoints)
    picked = categorize(endpoints, svc, node.name)
    cluster = tuple((ep.ip, ep.port) for ep in picked.cluster)
    local = tuple((ep.ip, ep.port) for ep in picked.local) or cluster  # none here: the cluster's
    internal = local if svc.internal_policy_local else cluster
    external = local if svc.external_policy_local else cluster
    sched = scheduler_of(svc, scheduler)
    servers: list[tuple[VirtualServer, tuple[Dest, ...]]] = []
    addresses: list[str] = []
    entries: list[Entry] = []
    blocked: list[Blocked] = []

    def serve(ip: str, port: int, dests: tuple[Dest, ...], bind: bool) -> None:
        servers.append((VirtualServer(protocol, ip, port, sched, svc.affinity_seconds), dests))
        if bind:
            addresses.append(ip)
            entries.append((s.KUBE_IPVS_IPS, ip))

    # Hairpin: every endpoint of this node, whatever its conditions (kube-proxy walks them all).
    entries += [(s.KUBE_LOOP_BACK, f"{address},{proto}:{port},{address}")
                for address, port in sorted({(ep.ip, ep.port) for ep in endpoints if ep.node == node.name})]
    entries.append((s.KUBE_CLUSTER_IP, f"{svc.cluster_ip},{proto}:{svc.port}"))
    serve(svc.cluster_ip, svc.port, internal, True)
    for ip in svc.external_ips:
        entries.append((s.KUBE_EXTERNAL_IP_LOCAL if svc.external_policy_local else s.KUBE_EXTERNAL_IP,
                        f"{ip},{proto}:{svc.port}"))
        serve(ip, svc.port, external, ip != node.ip)  # an address the node has stays off kube-ipvs0
    for ip in svc.load_balancer_ips:
        entry = f"{ip},{proto}:{svc.port}"
        entries.append((s.KUBE_LOAD_BALANCER, entry))
        if svc.external_policy_local:
            entries.append((s.KUBE_LOAD_BALANCER_LOCAL, entry))
        if svc.source_ranges:
            entries.append((s.KUBE_LOAD_BALANCER_FW, entry))
            entries += [(s.KUBE_LOAD_BALANCER_SOURCE_CIDR, f"{entry},{cidr}") for cidr in svc.source_ranges]
            if svc.source_ranges_hold(node.ip):
                # The node's own connections to the address leave from it (it is on kube-ipvs0).
                entries.append((s.KUBE_LOAD_BALANCER_SOURCE_IP, f"{entry},{ip}"))
            else:
                blocked.append((ip, proto, svc.port))
        serve(ip, svc.port, external, ip != node.ip)
    node_ips = node_port_ips(node) if svc.node_port else ()
    if node_ips:
        entry = str(svc.node_port)
        tcp = protocol == "TCP"
        entries.append((s.KUBE_NODE_PORT_TCP if tcp else s.KUBE_NODE_PORT_UDP, entry))
        if svc.external_policy_local:
            entries.append((s.KUBE_NODE_PORT_LOCAL_TCP if tcp else s.KUBE_NODE_PORT_LOCAL_UDP, entry))
        for ip in node_ips:
            serve(ip, svc.node_port, external, False)
    # kube-proxy reads the health check port of a Local policy only (a LoadBalancer's), and skips
    # the rest of a NodePort service port that has no node IPs, this port too.
    if svc.health_check_node_port and svc.external_policy_local and (node_ips or not svc.node_port):
        entries.append((s.KUBE_HEALTH_CHECK_NODE_PORT, str(svc.health_check_node_port)))
    return Piece(svc.service_port_name, tuple(servers), tuple(dict.fromkeys(addresses)),
                 tuple(dict.fromkeys(entries)), tuple(blocked))


def render(state: ProxyState, node: NodeInfo, *, scheduler: str = DEFAULT_SCHEDULER) -> Ruleset:
    """What kube-proxy's IPVS mode programs on this node for this state."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown IPVS scheduler {scheduler!r} (known: {', '.join(SCHEDULERS)})")
    services: dict[VsKey, VirtualServer] = {}
    dests: dict[VsKey, list[Dest]] = {}
    owners: dict[VsKey, str] = {}
    addresses: set[str] = set()
    sets: dict[str, set[str]] = {name: set() for name in s.IPSETS}
    blocked: set[Blocked] = set()
    for svc in state.services:
        piece = render_service(svc, state.endpoints_of(svc), node, scheduler)
        for vs, wanted in piece.services:
            services[vs.key] = vs
            dests[vs.key] = list(wanted)
            owners[vs.key] = piece.owner
        addresses.update(piece.addresses)
        for name, entry in piece.entries:
            sets[name].add(entry)
        blocked.update(piece.blocked)
    ordered_sets = {name: sorted(entries, key=s.entry_order) for name, entries in sets.items()}
    iptables = iptables_rules(node, {name for name, entries in sets.items() if entries}, blocked)
    return Ruleset(sorted(addresses, key=socket.inet_aton), services, dests, owners, ordered_sets, iptables)
