"""Lab 8: a pod reaching itself through its own Service. The node DNATs the pod's packet back to the
pod; the bridge must send it out of the port it came in by (hairpin mode on that port), and the
node must masquerade it, or the pod receives a packet from itself."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe

SYN = "tcp[tcpflags] & tcp-syn != 0"
# The client beside web-1, on the same bridge: its packets take the same bridged DNAT path, from
# another port.
TOPOLOGY = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "pods": [
        {"name": "client", "labels": {"app": "client"}, "nodeName": "node2"},
        {"name": "web-1", "labels": {"app": "web"}, "nodeName": "node2"},
    ],
}


def bridge_port(s: Session, pod: str) -> str:
    """The node's end of the pod's veth: the link whose index the pod's eth0 names as its peer (eth0@ifN)."""
    peer = s.run(pod, "ip", "-o", "link", "show", "eth0").split()[1].rstrip(":").split("@if")[1]
    line = next(line for line in s.run(s.node_of(pod), "ip", "-o", "link", "show").splitlines()
                if line.split(":")[0] == peer)
    return line.split()[1].split("@")[0]


def hairpin_flag(s: Session, node: str, port: str) -> str:
    """`bridge -d link show dev PORT` in the node: its hairpin flag (on/off) and the line it is on."""
    lines = s.run(node, "bridge", "-d", "link", "show", "dev", port).splitlines()
    line = next((line.strip() for line in lines if "hairpin " in line), "")
    return line.split("hairpin ", 1)[1].split()[0] if line else ""


@contextmanager
def hairpin_off(s: Session, node: str, port: str) -> Iterator[None]:
    s.run(node, "bridge", "link", "set", "dev", port, "hairpin", "off")
    try:
        yield
    finally:
        s.run(node, "bridge", "link", "set", "dev", port, "hairpin", "on")


def attempt(s: Session, pod: str, vip: str) -> tuple[str, list[Any]]:
    """The pod connects to its Service; (the answer, or "" when none), and the SYNs and SYN-ACKs on its eth0."""
    with s.sniff(pod, bpf=SYN) as wire:
        try:
            answer = probe_tcp(s.ns(pod), vip, 80)
        except OSError:
            answer = ""
    return answer, wire.packets


def experiment(s: Session) -> None:
    from scapy.layers.inet import IP, TCP

    pod, pod_ip, vip = "web-1", s.pod_ip("web-1"), s.cluster_ip("web")
    node = s.node_of(pod)
    gateway = s.source_toward(node, pod_ip)
    port = bridge_port(s, pod)
    s.show(f"Service web ({vip}:80) has one endpoint, {pod} ({pod_ip}:8080) on {node}; {pod} connects to it. "
           f"{node} DNATs in prerouting, on the bridge (br_netfilter), and the bridge forwards the result.")

    s.show()
    s.show(f"1. As the lab is set up: {node}'s bridge port for {pod}, `bridge -d link show dev {port}`:")
    flag = hairpin_flag(s, node, port)
    for line in s.run(node, "bridge", "-d", "link", "show", "dev", port).splitlines():
        s.show(f"    {line.strip()}")
    answer, packets = attempt(s, pod, vip)
    s.show(f"    GET http://{vip}/ from {pod}: {answer or 'no answer'}")
    out = [p for p in packets if TCP in p and (p[IP].dst, p[TCP].dport) == (vip, 80)]
    back = [p for p in packets if TCP in p and (p[IP].dst, p[TCP].dport) == (pod_ip, 8080) and p[TCP].flags == "S"]
    s.show(f"    SYNs on {pod}'s eth0, out and back in:")
    for packet in out[:1] + back[:1]:
        s.show(f"        {describe(packet)}")
    s.expect(f"the CNI set hairpin mode on {pod}'s bridge port ({port})", flag == "on", f"hairpin {flag or '?'}")
    seen = parse_answer(answer)["client"].rsplit(":", 1)[0] if answer else ""
    s.expect(f"{pod} answers itself, and sees {node}'s bridge address ({gateway}), not its own: the hairpin "
             "masquerade", answer.startswith(f"pod={pod} ") and seen == gateway,
             answer or "no answer")
    s.expect(f"on {pod}'s eth0 the SYN leaves for {vip}:80 and comes back in, to {pod_ip}:8080 from {gateway}",
             len(out) >= 1 and len(back) >= 1 and back[0][IP].src == gateway, "; ".join(describe(p) for p in packets))
    entries = s.run(node, "conntrack", "-L", "-p", "tcp", "--orig-src", pod_ip, "--orig-dst", vip,
                    check=False).splitlines()
    s.show(f"    conntrack -L on {node} (DNAT and SNAT in one entry):")
    s.show(f"        {entries[0] if entries and entries[0].startswith('tcp') else '(none)'}")

    s.show()
    s.show(f"2. hairpin off on {port} (`bridge link set dev {port} hairpin off` in {node}):")
    with hairpin_off(s, node, port):
        flag = hairpin_flag(s, node, port)
        answer, packets = attempt(s, pod, vip)
        try:
            other = probe_tcp(s.ns("client"), vip, 80)
        except OSError:
            other = ""
    out = [p for p in packets if TCP in p and (p[IP].dst, p[TCP].dport) == (vip, 80)]
    back = [p for p in packets if TCP in p and p[IP].dst == pod_ip]
    s.show(f"    hairpin {flag}; GET from {pod}: {answer or 'no answer within 2 s'}; on its eth0: "
           f"{len(out)} SYNs out, {len(back)} back in")
    s.show(f"    meanwhile the client, on {s.node_of('client')}'s bridge too -> {vip}:80: {other or 'no answer'}")
    s.expect(f"hairpin off: the bridge will not send the DNATed SYN out of the port it came in by; {pod} "
             "never gets it back and the connection fails",
             flag == "off" and not answer and len(out) >= 1 and not back,
             f"hairpin {flag or '?'}; {answer or 'no answer'}; {len(out)} out, {len(back)} back")
    s.expect(f"only a pod reaching itself needs it: the client, beside {pod} on {node}'s bridge, still reaches it",
             other.startswith(f"pod={pod} "), other or "no answer")

    s.show()
    s.show(f"3. hairpin on again, kube-proxy's masquerade taken away on {node} (a table of the lab's clears "
           "the mark before the NAT chains read it):")
    with s.masquerade_off(node) as cleared:
        answer, packets = attempt(s, pod, vip)
        unmarked = cleared()
    back = [p for p in packets if TCP in p and (p[IP].dst, p[TCP].dport) == (pod_ip, 8080) and p[TCP].flags == "S"]
    answers = [p for p in packets if TCP in p and p[TCP].flags == "SA"]
    for packet in back[:1]:
        s.show(f"    the SYN back on {pod}'s eth0: {describe(packet)}")
    s.show(f"    GET: {answer or 'no answer within 2 s'}; SYN-ACKs on the eth0: {len(answers)}")
    s.expect(f"unmasqueraded, the SYN comes back from {pod}'s own address, and {pod} does not answer it (its kernel "
             "drops a packet from itself as a martian source): no SYN-ACK, the connection fails",
             unmarked >= 1 and bool(back) and all(p[IP].src == pod_ip for p in back) and not answers and not answer,
             f"mark cleared on {unmarked}; back: {'; '.join(describe(p) for p in back) or 'none'}; "
             f"{len(answers)} SYN-ACKs; {answer or 'no answer'}")
    s.show("Both are needed: hairpin mode lets the bridge return the frame to the port it came from, and the")
    s.show(f"masquerade makes {pod} answer {node} ({gateway}), whose conntrack entry turns the answer back into")
    s.show(f"{vip}:80, the address {pod}'s socket is connected to.")


LAB = PacketLab(
    number=8,
    title="Hairpin: a pod reaching itself through its Service",
    manifests=WEB_SERVICE,
    topology=TOPOLOGY,
    modes=("iptables", "nftables"),  # ipvs DNATs after routing (INPUT), so the bridge sees no hairpin turn
    task="""
Service web has one endpoint, web-1 (node2; the client runs there too). web-1 connects to its
own Service's ClusterIP:

  kproxy exec --lab LAB web-1 -- curl -s http://<web's ClusterIP>/         (which client does it see?)
  kproxy capture --lab LAB web-1 --filter 'tcp port 80 or tcp port 8080'   (out, and back in)
  kproxy exec --lab LAB node2 -- bridge -d link                            (hairpin on the veth port)
  kproxy exec --lab LAB node2 -- conntrack -L -p tcp

Turn hairpin off on web-1's port (kproxy exec --lab LAB node2 -- bridge link set dev <veth> hairpin off)
and try again; turn it back on. Why does the bridge need it? And why does node2 masquerade this
connection (the KUBE-SEP rule with -s <web-1's IP>)? What would web-1 receive without it?
""",
    experiment=experiment,
)
