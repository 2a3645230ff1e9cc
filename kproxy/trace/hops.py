"""From what the recorders caught and the nodes' conntrack tables to the flow's hops, and the
trace as text and JSON (pure: no root; scapy decodes)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from kproxy.packets.decode import headers, load_layers
from kproxy.trace.plan import Flow

ETHERNET_LINKS = {1, 772}  # ARPHRD_ETHER, ARPHRD_LOOPBACK (lo carries a zeroed Ethernet header)
TUPLE = re.compile(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)")
Key = tuple[str, frozenset[tuple[str, int]]]  # a connection, either direction: protocol, both ends


@dataclass(frozen=True)
class Caught:
    """One packet one recorder saw (kproxy.packets.worker record)."""

    member: str
    iface: str
    outgoing: bool
    time: float
    link: int
    data: bytes


@dataclass(frozen=True)
class Hop:
    member: str
    iface: str
    direction: str  # "in" or "out", as the interface saw it
    ms: float  # since the trace's first packet
    headers: list[str]  # outermost first (kproxy.packets.decode)
    nat: str  # how the inner addresses differ from the same packet's previous hop ("" when they do not)


@dataclass
class NodeReport:
    name: str
    rules: list[str] = field(default_factory=list)  # what the mode's tracer saw the probe meet
    conntrack: list[str] = field(default_factory=list)  # the node's entries of the flow


@dataclass(frozen=True)
class Trace:
    flow: Flow
    lab: str
    mode: str
    overlay: str
    port: int  # the probe's source port
    sent: list[str]  # the probe's headers as it was sent
    hops: list[Hop]
    nodes: list[NodeReport]
    answered: bool


def decode(caught: Caught) -> Any:
    from scapy.layers.inet import IP
    from scapy.layers.l2 import Ether

    load_layers()
    return Ether(caught.data) if caught.link in ETHERNET_LINKS else IP(caught.data)


def innermost(packet: Any) -> Any:
    """The innermost IP header: past VXLAN and flannel's UDP encapsulation."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.vxlan import VXLAN

    layer = packet[IP] if IP in packet else None
    while layer is not None:
        l4 = layer.payload
        if isinstance(l4, UDP) and isinstance(l4.payload, VXLAN) and IP in l4.payload:
            layer = l4.payload[IP]
        elif isinstance(l4, UDP) and isinstance(l4.payload, IP):
            layer = l4.payload
        else:
            return layer
    return None


def ends(ip: Any) -> tuple[str, tuple[str, int], tuple[str, int]] | None:
    """(protocol, source, destination) of an IP header's TCP or UDP packet, or of the packet an ICMP
    error quotes (it belongs to the connection it reports on)."""
    from scapy.layers.inet import ICMP, IPerror, TCP, TCPerror, UDP, UDPerror

    if ip is None:
        return None
    for l4, quoted in ((TCP, False), (UDP, False), (TCPerror, True), (UDPerror, True)):
        if l4 in ip and (not quoted or ICMP in ip):
            inner = ip[IPerror] if quoted else ip
            name = "tcp" if l4 in (TCP, TCPerror) else "udp"
            return name, (inner.src, int(ip[l4].sport)), (inner.dst, int(ip[l4].dport))
    return None


def key(protocol: str, a: tuple[str, int], b: tuple[str, int]) -> Key:
    return protocol, frozenset((a, b))


def conntrack_keys(line: str) -> list[Key]:
    """The connection keys of a `conntrack -L` line: its original and its reply tuple."""
    tuples = TUPLE.findall(line)
    protocol = line.split()[0] if line.split() else ""
    return [key(protocol, (src, int(sport)), (dst, int(dport))) for src, dst, sport, dport in tuples[:2]]


def flow_keys(seeds: set[Key], tables: dict[str, list[str]]) -> set[Key]:
    """Every connection the flow became on its way: from seeds, each conntrack entry that shares a
    tuple with a known one adds its other (NAT's rewrite), until nothing more joins."""
    known = set(seeds)
    while True:
        more = {k for lines in tables.values() for line in lines if known & set(keys := conntrack_keys(line))
                for k in keys} - known
        if not more:
            return known
        known |= more


def relayed_seeds(flow: Flow, caught: list[tuple[Caught, Any]]) -> set[Key]:
    """A relaying proxy's own connections: a SYN a node sent to one of the flow's endpoints."""
    endpoints = {(e.split(":")[0], int(e.split(":")[1])) for e in flow.endpoints}
    nodes = {node.name for node in flow.nodes}
    found = set()
    for c, packet in caught:
        ip = innermost(packet)
        seen = ends(ip)
        if c.member in nodes and seen and seen[0] == "tcp" and seen[2] in endpoints and seen[1][0] != flow.source.ip \
                and ip.payload.sprintf("%TCP.flags%") == "S":
            found.add(key(*seen))
    return found


def _identity(ip: Any) -> tuple[int, int, str]:
    """One packet keeps its IP ID, length and flags along the path, whatever NAT does to its addresses."""
    return ip.id, ip.len, ip.payload.sprintf("%TCP.flags%") if ip.proto == 6 else ""


def hops(caught: list[tuple[Caught, Any]], keys: set[Key], sent: Any) -> list[Hop]:
    """The flow's packets in kernel-timestamp order, each with what NAT changed since its last hop
    (the first: since it was sent, the probe as built)."""
    mine = [(c, p) for c, p in sorted(caught, key=lambda item: item[0].time)
            if (seen := ends(innermost(p))) and key(*seen) in keys]
    out = []
    probe = ends(sent)
    last_seen = {_identity(sent): (probe[1], probe[2])} if probe else {}
    start = mine[0][0].time if mine else 0.0
    for c, p in mine:
        ip = innermost(p)
        protocol, src, dst = ends(ip)  # type: ignore[misc]
        identity = _identity(ip)
        note = ""
        if identity in last_seen and last_seen[identity] != (src, dst):
            was_src, was_dst = last_seen[identity]
            note = "; ".join(f"{side} {a[0]}:{a[1]} -> {b[0]}:{b[1]}" for side, a, b in
                             (("dst", was_dst, dst), ("src", was_src, src)) if a != b)
        last_seen[identity] = (src, dst)
        out.append(Hop(c.member, c.iface, "out" if c.outgoing else "in", (c.time - start) * 1000, headers(p),
                       f"NAT {note}" if note else ""))
    return out


def render_text(trace: Trace) -> str:
    flow = trace.flow
    lines = [f"trace {flow.source.name} ({flow.source.ip}) -> {flow.dst_ip}:{flow.dst_port}/{flow.protocol}, "
             f"the {flow.target}; lab {trace.lab}, {trace.mode} mode, {trace.overlay} overlay",
             f"probe: {' | '.join(trace.sent)}" + ("" if flow.protocol == "tcp" else " (a DNS question)"),
             f"endpoints {', '.join(flow.endpoints) or 'none'}; "
             + ("answered" if trace.answered else "NO ANSWER reached the source"), "",
             "hops (ms since the first; where; direction; headers, outer | inner):"]
    width = max((len(f"{h.member} {h.iface}") for h in trace.hops), default=0)
    for number, hop in enumerate(trace.hops, 1):
        lines.append(f"  {number:3} {hop.ms:8.3f}  {f'{hop.member} {hop.iface}':{width}}  {hop.direction:3}  "
                     f"{' | '.join(hop.headers)}" + (f"    <- {hop.nat}" if hop.nat else ""))
    if not trace.hops:
        lines.append("  (no packet of the flow was caught)")
    for node in trace.nodes:
        if not node.rules and not node.conntrack:
            continue
        lines += ["", f"{node.name}: the rules the probe met"]
        lines += [f"  {line}" for line in node.rules] or ["  (none)"]
        lines.append(f"{node.name}: conntrack")
        lines += [f"  {line}" for line in node.conntrack] or ["  (no entry)"]
    return "\n".join(lines) + "\n"


def render_json(trace: Trace) -> str:
    flow = trace.flow
    return json.dumps({
        "lab": trace.lab, "mode": trace.mode, "overlay": trace.overlay,
        "source": {"name": flow.source.name, "ip": flow.source.ip, "port": trace.port}, "sent": trace.sent,
        "destination": {"ip": flow.dst_ip, "port": flow.dst_port, "protocol": flow.protocol, "target": flow.target},
        "endpoints": list(flow.endpoints), "answered": trace.answered,
        "hops": [{"member": h.member, "interface": h.iface, "direction": h.direction, "ms": round(h.ms, 3),
                  "headers": h.headers, "nat": h.nat or None} for h in trace.hops],
        "nodes": [{"name": n.name, "rules": n.rules, "conntrack": n.conntrack} for n in trace.nodes],
    }, indent=2) + "\n"
