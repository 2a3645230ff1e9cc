"""Lab 4: a NodePort hit from outside, its endpoint on another node (externalTrafficPolicy Cluster):
the node hit DNATs and masquerades, the pod sees that node's address, and the answer goes back
through the node hit. With the masquerade taken away, the pod answers the client straight from its
own node, from an address the client never spoke to."""

from __future__ import annotations

from typing import Any

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import PacketLab, web_node_port
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe

SYN = "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0"


def mac(s: Session, member: str) -> str:
    words = s.run(member, "ip", "-o", "link", "show", "eth0").split()
    return words[words.index("link/ether") + 1]


def sender(packet: Any, macs: dict[str, str]) -> str:
    """Which lab member put a frame on the underlay, by its source MAC."""
    from scapy.layers.l2 import Ether

    return next((name for name, address in macs.items() if Ether in packet and packet[Ether].src == address), "?")


def experiment(s: Session) -> None:
    from scapy.layers.inet import IP, TCP

    pod, pod_ip = "web-1", s.pod_ip("web-1")
    there = s.node_of(pod)
    hit = next(str(n["name"]) for n in s.info["nodes"] if n["name"] != there)
    hit_ip, port, external = s.node_ip(hit), s.node_port("web"), s.external_ip
    masq = s.source_toward(hit, pod_ip)
    macs = {hit: mac(s, hit), there: mac(s, there), "external": mac(s, "external")}
    s.show(f"Service web: NodePort {port}, externalTrafficPolicy Cluster; its one endpoint {pod} {pod_ip} runs on "
           f"{there}. The external client {external} connects to {hit} {hit_ip}:{port}.")

    s.show()
    s.show(f"1. With kube-proxy's masquerade ({hit} routes to {pod_ip} from {masq}):")
    with s.sniff(pod, bpf=SYN) as arriving, s.sniff("underlay", "br0", bpf=f"host {external}") as wire:
        answer = parse_answer(probe_tcp(s.ns("external"), hit_ip, port))
    seen_ip, seen_port = answer["client"].rsplit(":", 1)
    s.show(f"    GET http://{hit_ip}:{port}/: {answer['pod']} saw the client as {answer['client']}")
    syns = [p for p in arriving.packets if TCP in p and p[TCP].dport == 8080]
    s.show(f"    the SYN arriving at {pod}: {describe(syns[0]) if syns else '(not seen)'}")
    s.expect(f"{pod} sees {hit}'s address ({masq}), not the external client's: the node hit masqueraded",
             seen_ip == masq and bool(syns) and all(p[IP].src == masq for p in syns),
             f"answer: client={answer['client']}; SYN: {describe(syns[0]) if syns else 'none'}")
    to_client = [p for p in wire.packets if IP in p and p[IP].dst == external]
    s.show(f"    on the underlay, what reached the external client ({len(to_client)} packets), e.g.:")
    for packet in to_client[:2]:
        s.show(f"        from {sender(packet, macs)}: {describe(packet)}")
    s.expect(f"every packet to the external client came from {hit}, from {hit_ip}:{port} (none from {there})",
             bool(to_client) and all(sender(p, macs) == hit and TCP in p and (p[IP].src, p[TCP].sport) == (hit_ip, port)
                                     for p in to_client),
             "; ".join(f"{sender(p, macs)}: {describe(p)}" for p in to_client[:3]) or "nothing reached the client")
    entries = s.run(hit, "conntrack", "-L", "-p", "tcp", "--orig-dst", hit_ip, "--orig-port-dst", str(port),
                    check=False).splitlines()
    entry = next((line for line in entries if line.startswith("tcp") and f"dport={seen_port} " in line), "")
    s.show(f"    conntrack -L on {hit}:")
    s.show(f"        {entry or '(none)'}")
    words = entry.split()
    tuples = [w for w in words if w.split("=")[0] in ("src", "dst", "sport", "dport")]
    s.expect(f"{hit}'s one conntrack entry holds both rewrites: original external -> {hit_ip}:{port}, "
             f"reply {pod_ip}:8080 -> {masq}:{seen_port}",
             tuples[:2] == [f"src={external}", f"dst={hit_ip}"] and f"dport={port}" in tuples[:4]
             and tuples[4:] == [f"src={pod_ip}", f"dst={masq}", "sport=8080", f"dport={seen_port}"],
             entry or "no entry")

    s.show()
    s.show(f"2. The same with the masquerade taken away on {hit} (a table of the lab's clears the mark "
           "before the NAT chains read it):")
    with s.masquerade_off(hit) as cleared:
        with s.sniff(pod, bpf=SYN) as arriving, s.sniff("underlay", "br0", bpf=f"host {external}") as wire:
            try:
                answered = f"answered: {probe_tcp(s.ns('external'), hit_ip, port)}"
            except OSError as error:
                answered = ""
                s.show(f"    GET http://{hit_ip}:{port}/: {type(error).__name__} ({error})")
        unmarked = cleared()
    syns = [p for p in arriving.packets if TCP in p and p[TCP].dport == 8080]
    s.show(f"    the SYN arriving at {pod}: {describe(syns[0]) if syns else '(not seen)'}")
    s.expect(f"unmasqueraded, {pod} sees the external client's own address",
             unmarked >= 1 and bool(syns) and all(p[IP].src == external for p in syns),
             f"mark cleared on {unmarked} packets; SYNs: {'; '.join(describe(p) for p in syns) or 'none'}")
    to_client = [p for p in wire.packets if IP in p and p[IP].dst == external]
    for packet in to_client[:2]:
        s.show(f"    on the underlay, from {sender(packet, macs)}: {describe(packet)}")
    s.expect(f"{pod}'s SYN-ACK goes from {there} straight to the client, from {pod_ip}:8080, which the client never "
             f"connected to; nothing comes from {hit}; the connection fails",
             not answered and bool(to_client)
             and all(sender(p, macs) == there and TCP in p and (p[IP].src, p[TCP].sport) == (pod_ip, 8080)
                     and p[TCP].flags == "SA" for p in to_client),
             (answered or "no connection") + "; "
             + ("; ".join(f"{sender(p, macs)}: {describe(p)}" for p in to_client[:3]) or "nothing reached the client"))
    s.show(f"The answer must pass back through {hit}: only its conntrack entry can turn {pod_ip}:8080 back into")
    s.show(f"{hit_ip}:{port}. Masquerading to {hit}'s own address makes {pod} answer {hit}; the price is that")
    s.show("the pod never learns the client's address (packet lab 5: externalTrafficPolicy Local).")


LAB = PacketLab(
    number=4,
    title="NodePort from outside: masquerade, and who answers",
    manifests=web_node_port(30004),
    modes=("iptables", "nftables", "ipvs"),  # userspace: the proxy's own connection, no NAT to see
    task="""
Service web is a NodePort (30004, externalTrafficPolicy Cluster); its one pod, web-1, runs on node2.
The external client connects to node1's NodePort, so node1 must send the connection to node2:

  kproxy capture --lab LAB web-1 --filter 'tcp port 8080'                  (the source web-1 sees)
  kproxy capture --lab LAB underlay --filter 'host 172.18.0.254'           (who answers the client)
  kproxy exec --lab LAB external -- curl -s http://<node1's IP>:30004/
  kproxy exec --lab LAB node1 -- conntrack -L -p tcp --orig-port-dst 30004
  kproxy rules --lab LAB node1 --service web                               (KUBE-MARK-MASQ)
  kproxy rules --lab LAB node1 | grep KUBE-POSTROUTING                    (MASQUERADE)

Which address does web-1 see, and why that one? Which node sends the answer to the client? What
would happen to web-1's SYN-ACK if node1 did not masquerade?
""",
    experiment=experiment,
)
