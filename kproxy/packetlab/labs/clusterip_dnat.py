"""Lab 1: a ClusterIP is rewritten (DNAT) on the client's node; the pod sees its own address."""

from __future__ import annotations

from contextlib import ExitStack

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe, load_layers


def experiment(s: Session) -> None:
    from scapy.layers.inet import IP, TCP

    load_layers()
    vip, client_ip = s.cluster_ip("web"), s.pod_ip("client")
    endpoints = s.pods_labelled("app", "web")
    s.show(f"Service web: ClusterIP {vip}:80 -> {', '.join(f'{p} {s.pod_ip(p)}:8080' for p in endpoints)}; "
           f"client {client_ip} on {s.node_of('client')}.")
    syn = "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0"
    with ExitStack() as sniffing:
        leaving = sniffing.enter_context(s.sniff("client", bpf=syn))
        arriving = {pod: sniffing.enter_context(s.sniff(pod, bpf=syn)) for pod in endpoints}
        answer = parse_answer(probe_tcp(s.ns("client"), vip, 80))
    pod = answer["pod"]
    pod_ip, client_port = s.pod_ip(pod), int(answer["client"].rsplit(":", 1)[1])
    s.show(f"GET http://{vip}/ from the client: answered by {pod}, which saw the client as {answer['client']}")
    out = [p for p in leaving.packets if TCP in p and p[TCP].sport == client_port]
    into = [p for p in arriving[pod].packets if TCP in p and p[TCP].sport == client_port]
    s.show("The SYN leaving the client's eth0:")
    s.show(f"    {describe(out[0]) if out else '(not seen)'}")
    s.show(f"The SYN arriving at {pod}'s eth0:")
    s.show(f"    {describe(into[0]) if into else '(not seen)'}")
    s.expect("the client sends to the ClusterIP", bool(out) and (out[0][IP].dst, out[0][TCP].dport) == (vip, 80),
             describe(out[0]) if out else "no SYN seen on the client's eth0")
    s.expect("the pod receives it addressed to itself, from the client's own address",
             bool(into) and (into[0][IP].dst, into[0][TCP].dport, into[0][IP].src) == (pod_ip, 8080, client_ip),
             describe(into[0]) if into else f"no SYN seen on {pod}'s eth0")
    node = s.node_of("client")
    entry = s.run(node, "conntrack", "-L", "-p", "tcp", "--orig-port-src", str(client_port), check=False).strip()
    entry = entry.splitlines()[0] if entry.startswith("tcp") else ""
    s.show(f"conntrack -L on {node} (the client's node, where the DNAT happened):")
    s.show(f"    {entry or '(none)'}")
    s.show("The original tuple keeps the ClusterIP; the reply tuple comes from the pod. Replies are")
    s.show("rewritten back to the ClusterIP by this entry, so the client never sees the pod's address.")
    original = f"src={client_ip} dst={vip} sport={client_port} dport=80"
    reply = f"src={pod_ip} dst={client_ip} sport=8080 dport={client_port}"
    s.expect(f"{node}'s conntrack entry: original to the ClusterIP, reply from the pod",
             original in entry and reply in entry, entry or "no entry")


LAB = PacketLab(
    number=1,
    title="ClusterIP DNAT on the wire",
    manifests=WEB_SERVICE,
    modes=("iptables", "nftables", "ipvs"),  # userspace proxies: a second connection, packet lab 11
    task="""
The Service web has a ClusterIP; its one endpoint, web-1, runs on node2. The client runs on node1.
Watch one connection leave the client and arrive at the pod:

  kproxy capture --lab LAB client --filter 'tcp port 80'       # leaving the client: dst is the ClusterIP
  kproxy capture --lab LAB web-1 --filter 'tcp port 8080'      # arriving: dst is the pod itself
  kproxy exec --lab LAB client -- curl -s http://<ClusterIP>/   (kproxy get svc --lab LAB)
  kproxy exec --lab LAB node1 -- conntrack -L -p tcp           # the original and the reply tuple

Which node rewrote the destination, and what turns the pod's answer back into the ClusterIP's?
""",
    experiment=experiment,
)
