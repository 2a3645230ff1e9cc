"""Lab 2: one pod-to-pod packet on the underlay: VXLAN (UDP 8472, VNI 1), flannel's udp (8285), host-gw (bare)."""

from __future__ import annotations

import os

from kproxy.packetlab import PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe, load_layers

# What each overlay puts around the pod's packet on the underlay: UDP port, header bytes added.
ENCAPSULATION = {"vxlan": (8472, 50), "udp": (8285, 28), "host-gw": (None, 0)}


def experiment(s: Session) -> None:
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.vxlan import VXLAN

    load_layers()
    src, dst = s.pod_ip("client"), s.pod_ip("web-1")
    ident = os.getpid() & 0xFFFF
    port, overhead = ENCAPSULATION[s.overlay]
    s.show(f"Overlay {s.overlay}: an ICMP echo from client {src} ({s.node_of('client')}) to web-1 {dst} "
           f"({s.node_of('web-1')}), captured on the underlay bridge.")
    with s.sniff("underlay", "br0", bpf="udp port 8472 or udp port 8285 or icmp") as wire:
        replies = s.answers("client", [IP(dst=dst) / ICMP(id=ident, seq=1) / (b"kproxy packet lab" * 4)])
    s.show(f"web-1 answered: {describe(replies[0]) if replies else 'nothing'}")

    def inner(packet: object) -> object | None:
        if port is None:
            return packet[IP] if IP in packet else None
        if UDP in packet and packet[UDP].dport == port and IP in packet[UDP].payload:
            return packet[UDP].payload[IP]
        return None

    requests = [p for p in wire.packets if (i := inner(p)) is not None and ICMP in i
                and i[ICMP].id == ident and i[ICMP].type == 8]
    s.show("On the wire:")
    for packet in requests:
        s.show(f"    {describe(packet)}")
    if not requests:
        s.expect("the echo request crosses the underlay", False, f"{len(wire.packets)} other packets seen")
        return
    packet = requests[0]
    pod_packet = inner(packet)
    s.expect("the pod's own packet is inside, unchanged: client to web-1",
             (pod_packet[IP].src, pod_packet[IP].dst) == (src, dst), describe(pod_packet))
    if port is None:
        s.show("host-gw adds nothing: node1 routes the pod CIDR of node2 via node2's underlay address.")
        s.expect("no outer header: the frame carries the pod addresses themselves", UDP not in packet,
                 describe(packet))
        return
    outer = packet[IP]
    s.expect("the outer header runs node to node", (outer.src, outer.dst) == (s.node_ip(s.node_of("client")),
                                                                               s.node_ip(s.node_of("web-1"))),
             f"{outer.src} > {outer.dst}")
    s.expect(f"the outer UDP goes to port {port}", packet[UDP].dport == port, f"dport {packet[UDP].dport}")
    if s.overlay == "vxlan":
        s.expect("the VXLAN header carries VNI 1", VXLAN in packet and packet[VXLAN].vni == 1,
                 f"vni {packet[VXLAN].vni}" if VXLAN in packet else "no VXLAN header")
        s.show("Inside VXLAN is a whole Ethernet frame: flannel.1's MAC to the remote VTEP's MAC.")
    s.expect(f"the encapsulation adds {overhead} bytes", outer.len - pod_packet[IP].len == overhead,
             f"outer {outer.len} - inner {pod_packet[IP].len} = {outer.len - pod_packet[IP].len}")


LAB = PacketLab(
    number=2,
    title="Overlays decoded: VXLAN, udp, host-gw",
    task="""
Capture the underlay while the client pings web-1 on the other node:

  kproxy capture --lab LAB underlay --filter 'udp port 8472 or udp port 8285 or icmp'
  kproxy exec --lab LAB client -- ping -c1 <web-1's IP>        (kproxy lab status LAB)
  kproxy capture --lab LAB underlay --count 2 -w overlay.pcap   (open it in Wireshark)

Find the outer IP/UDP header, the VXLAN VNI, and the pod's packet inside. Then run this lab with
--overlay udp and --overlay host-gw: what does each overlay put on the wire, and what does it cost in bytes?
""",
    experiment=experiment,
)
