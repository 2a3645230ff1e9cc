"""Lab 15: what a pod's resolver puts on the wire. ClusterFirst's resolv.conf (search
default.svc.cluster.local svc.cluster.local cluster.local, ndots:5) expands a name with fewer than
five dots through the search list before trying it as written; a trailing dot skips the search. And
one SRV query for a named port."""

from __future__ import annotations

import os
import time
from typing import Any

from kproxy.errors import KproxyError
from kproxy.packetlab import WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session

SEARCH = ("default.svc.cluster.local", "svc.cluster.local", "cluster.local")  # the client is in default
FQDN = "web.default.svc.cluster.local."
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
READY_WITHIN = 20.0  # seconds for the coredns pods to be ready and serve the Service


def wire_line(packet: Any) -> str:
    """One DNS message: who to whom, the question, and for an answer its rcode and records."""
    from scapy.layers.dns import DNS
    from scapy.layers.inet import IP, UDP

    dns = packet[DNS]
    question = dns.qd[0]
    head = f"{packet[IP].src}:{packet[UDP].sport} > {packet[IP].dst}:{packet[UDP].dport}"
    asked = f"{question.sprintf('%qtype%')}? {question.qname.decode()}"
    if not dns.qr:
        return f"{head}  {asked}"
    records = [record(rr) for rr in (dns.an or [])] + [f"(additional) {record(rr)}" for rr in (dns.ar or [])]
    return f"{head}  {RCODES.get(dns.rcode, dns.rcode)} {asked}" + (f"  {', '.join(records)}" if records else "")


def record(rr: Any) -> str:
    if rr.type == 33:  # SRV: no rdata field in scapy, its own
        return f"SRV {rr.priority} {rr.weight} {rr.port} {rr.target.decode()}"
    return f"{rr.sprintf('%type%')} {rr.rdata}"


def asked(packets: list[Any], server: str) -> list[tuple[str, str]]:
    """The A questions sent to server, in order, each once (a resent question counts once), with the
    rcode its first answer had ("" if none came)."""
    from scapy.layers.dns import DNS
    from scapy.layers.inet import IP

    order: list[str] = []
    rcode: dict[str, str] = {}
    for packet in packets:
        if DNS not in packet or not packet[DNS].qd or packet[DNS].qd[0].qtype != 1:
            continue
        name = packet[DNS].qd[0].qname.decode()
        if not packet[DNS].qr and packet[IP].dst == server and name not in order:
            order.append(name)
        elif packet[DNS].qr and packet[IP].src == server:
            rcode.setdefault(name, RCODES.get(packet[DNS].rcode, str(packet[DNS].rcode)))
    return [(name, rcode.get(name, "")) for name in order]


def lookup(s: Session, name: str, server: str) -> tuple[str, int, list[tuple[str, str]]]:
    """getent ahostsv4 NAME in the client (glibc's resolver, A questions only), sniffing its eth0:
    the first address it printed, its exit status, and the questions on the wire."""
    with s.sniff("client", bpf="udp port 53") as wire:
        done = s.exec("client", "getent", "ahostsv4", name)
    s.show(f"getent ahostsv4 {name}  (exit {done.returncode}):")
    for packet in wire.packets:
        s.show(f"    {wire_line(packet)}")
    first = done.stdout.split()[0] if done.stdout.split() else ""
    return first, done.returncode, asked(wire.packets, server)


def wait_for_dns(s: Session) -> None:
    """Until the client resolves the Service by its full name (the DNS pods ready, the zone built)."""
    deadline = time.monotonic() + READY_WITHIN
    while s.exec("client", "getent", "ahostsv4", FQDN).returncode != 0:
        if time.monotonic() > deadline:
            raise KproxyError(f"the client did not resolve {FQDN} within {READY_WITHIN:.0f} s (cluster DNS not ready)")
        time.sleep(0.1)  # poll interval


def experiment(s: Session) -> None:
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import IP, UDP

    resolv = s.exec("client", "cat", "/etc/resolv.conf").stdout
    server = next(line.split()[1] for line in resolv.splitlines() if line.startswith("nameserver"))
    vip = s.cluster_ip("web")
    s.show("The client's /etc/resolv.conf (ip netns exec binds /etc/netns/<namespace>/resolv.conf over it):")
    for line in resolv.strip().splitlines():
        s.show(f"    {line}")
    wait_for_dns(s)

    address, _, questions = lookup(s, "web", server)
    s.expect("`web` (no dot, fewer than ndots:5): the first question is the pod's namespace's expansion, "
             f"A {FQDN}, answered with the ClusterIP; nothing else asked",
             questions == [(FQDN, "NOERROR")] and address == vip, f"{questions}; address {address or 'none'}")

    address, _, questions = lookup(s, FQDN, server)
    s.expect(f"`{FQDN}` (trailing dot): one question, the name as written", questions == [(FQDN, "NOERROR")]
             and address == vip, f"{questions}; address {address or 'none'}")

    written = FQDN.rstrip(".")
    address, _, questions = lookup(s, written, server)
    expected = [(f"{written}.{domain}.", "NXDOMAIN") for domain in SEARCH] + [(FQDN, "NOERROR")]
    s.expect(f"`{written}` (4 dots, fewer than 5): the three search expansions first, each NXDOMAIN, "
             "then the name as written", questions == expected and address == vip,
             f"{[name for name, _ in questions]}; rcodes {[rcode for _, rcode in questions]}")

    address, status, questions = lookup(s, "nope", server)
    expected = [(f"nope.{domain}.", "NXDOMAIN") for domain in SEARCH] + [("nope.", "REFUSED")]
    s.expect("`nope`: the three expansions (NXDOMAIN), then `nope.` as written (REFUSED: outside the "
             "cluster), and the lookup fails", questions == expected and status != 0,
             f"{questions}; exit {status}")

    srv = f"_http._tcp.{FQDN}"
    port = 40000 + os.getpid() % 20000
    query = IP(dst=server) / UDP(sport=port, dport=53) / DNS(rd=1, qd=DNSQR(qname=srv, qtype="SRV"))
    s.show(f"An SRV question crafted with scapy from the client to {server}:")
    with s.sniff("client", bpf=f"udp port 53 and udp port {port}") as wire:
        reply = s.answers("client", [query])[0]
    for packet in wire.packets:
        s.show(f"    {wire_line(packet)}")
    message = reply[DNS] if reply is not None and DNS in reply else None
    records = [(rr.priority, rr.weight, rr.port, rr.target.decode())
               for rr in (message.an or [] if message else []) if rr.type == 33]  # SRV
    glue = [rr.rdata for rr in (message.ar or [] if message else []) if rr.type == 1]  # A
    s.expect(f"SRV {srv}: 0 100 80 {FQDN} (the named port http), its A ({vip}) in the additional section",
             records == [(0, 100, 80, FQDN)] and glue == [vip], f"SRV {records}; additional A {glue}")


LAB = PacketLab(
    number=15,
    title="DNS: the ndots:5 search on the wire, and an SRV",
    manifests=WEB_SERVICE,
    dns=True,
    modes=("iptables", "nftables", "userspace"),
    task="""
The lab runs cluster DNS (kube-dns at 10.96.0.10). Service web has a named port http. Watch the
client's resolver on its eth0 while it resolves names:

  kproxy exec --lab LAB client -- cat /etc/resolv.conf
  kproxy capture --lab LAB client --filter 'udp port 53'
  kproxy exec --lab LAB client -- getent ahostsv4 web
  kproxy exec --lab LAB client -- getent ahostsv4 web.default.svc.cluster.local.
  kproxy exec --lab LAB client -- getent ahostsv4 web.default.svc.cluster.local
  kproxy exec --lab LAB client -- getent ahostsv4 nope
  kproxy exec --lab LAB client -- dig SRV _http._tcp.web.default.svc.cluster.local.

How many questions does each name cost, in which order, and what does the trailing dot change?
""",
    experiment=experiment,
)
