"""Lab 3: the overlay's MTU. A pod packet of exactly the pod MTU (1450 on vxlan) with DF set crosses
as a 1500-byte outer packet, the underlay's MTU; one byte more cannot leave the pod; and a 1500-byte
DF packet that a node must forward into the overlay is refused with ICMP fragmentation needed."""

from __future__ import annotations

import os
import re
from typing import Any

from kproxy.lab.overlay import UDP_PORT, UNDERLAY_MTU, VXLAN_PORT, pod_mtu
from kproxy.lab.probe import probe_tcp
from kproxy.packetlab import PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe, load_layers

SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web-udp}
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - {name: udp, port: 80, targetPort: 8080, protocol: UDP, nodePort: 30003}
"""
ENCAPSULATED = f"udp port {VXLAN_PORT} or udp port {UDP_PORT}"
ICMP_ECHO = 28  # IPv4 (20) + ICMP echo (8) headers: ping -s N sends N + 28 bytes
TCP_HEADERS = 40  # IPv4 (20) + TCP (20): MSS = MTU - 40


def inner(packet: Any) -> Any | None:
    """The pod's IP packet inside an encapsulated one on the underlay (VXLAN or flannel's udp)."""
    from scapy.layers.inet import IP, UDP

    if UDP in packet and packet[UDP].dport in (VXLAN_PORT, UDP_PORT) and IP in packet[UDP].payload:
        return packet[UDP].payload[IP]
    return None


def ping(s: Session, member: str, ip: str, total: int) -> str:
    """One ping with DF (-M do) of total bytes of IP packet; ping's own output, errors included."""
    return s.run(member, "ping", "-n", "-c1", "-W2", "-M", "do", "-s", str(total - ICMP_ECHO), ip, check=False)


def answered(output: str) -> bool:
    return re.search(r"\b1 received\b", output) is not None


def local_error(output: str) -> str:
    found = re.search(r"local error: .*mtu=\d+", output)
    return found.group(0) if found else ""


def mss(packet: Any) -> int | None:
    from scapy.layers.inet import TCP

    return next((value for name, value in packet[TCP].options if name == "MSS"), None)


def experiment(s: Session) -> None:
    from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror

    load_layers()
    mtu = pod_mtu(s.overlay)
    client, web = s.pod_ip("client"), s.pod_ip("web-1")
    here, there = s.node_of("client"), s.node_of("web-1")
    s.show(f"Overlay {s.overlay}: the underlay's MTU is {UNDERLAY_MTU}, the pods' {mtu} "
           f"({UNDERLAY_MTU - mtu} bytes for the encapsulation). client {client} ({here}) -> web-1 {web} ({there}).")

    # Steps 1 to 3 under one capture (each sniffer costs a scapy start): the client's eth0 and the underlay.
    syn = "tcp[tcpflags] & tcp-syn != 0"
    with s.sniff("client", bpf=f"icmp or ({syn})") as leaving, s.sniff("underlay", "br0", bpf=ENCAPSULATED) as wire:
        fits = ping(s, "client", web, mtu)
        too_big = ping(s, "client", web, mtu + 1)
        probe_tcp(s.ns("client"), web, 8080)
    requests = [p for p in leaving.packets if ICMP in p and p[ICMP].type == 8]
    outer = [p for p in wire.packets if (i := inner(p)) is not None and ICMP in i and i[ICMP].type == 8]

    s.show()
    s.show(f"1. ping -M do -s {mtu - ICMP_ECHO} {web} from the client: {mtu} bytes with DF, exactly the pod MTU.")
    s.show(f"    {fits.strip().splitlines()[1] if answered(fits) else 'no answer'}")
    s.show(f"    on the client's eth0: {describe(requests[0]) if requests else '(nothing)'}")
    s.show(f"    on the underlay:      {describe(outer[0]) if outer else '(nothing)'}")
    s.expect(f"a {mtu}-byte DF echo request leaves the client and web-1 answers it",
             answered(fits) and bool(requests) and requests[0][IP].len == mtu and requests[0][IP].flags.DF,
             f"{describe(requests[0]) if requests else 'no request on eth0'}; "
             f"{'answered' if answered(fits) else 'no answer'}")
    s.expect(f"on the underlay it is one outer packet of exactly {UNDERLAY_MTU} bytes, the pod's {mtu} inside",
             len(outer) == 1 and outer[0][IP].len == UNDERLAY_MTU and inner(outer[0])[IP].len == mtu,
             "; ".join(describe(p) for p in outer) or "nothing encapsulated seen")

    s.show()
    s.show(f"2. ping -M do -s {mtu + 1 - ICMP_ECHO} {web}: {mtu + 1} bytes, one more than the pod MTU.")
    error = local_error(too_big)
    s.show(f"    ping: {error or too_big.strip()}; "
           f"echo requests on the client's eth0 in steps 1 and 2: {len(requests)}")
    s.expect(f"the client's own kernel refuses it (ping: local error, mtu={mtu}); nothing of it leaves its eth0",
             error.endswith(f"mtu={mtu}") and not answered(too_big) and len(requests) == 1,
             f"{error or 'no local error'}; {len(requests)} echo requests on eth0 (step 1's included)")

    s.show()
    s.show(f"3. TCP from the client to web-1:8080: each side's SYN offers an MSS of its MTU less {TCP_HEADERS}.")
    offered = [(describe(p), str(p[TCP].flags), mss(p)) for p in leaving.packets if TCP in p]
    for text, _, size in offered:
        s.show(f"    {text}  MSS {size}")
    s.expect(f"SYN and SYN-ACK both offer MSS {mtu - TCP_HEADERS}: no TCP segment is ever bigger than {mtu} bytes",
             {flags for _, flags, _ in offered} == {"S", "SA"}
             and all(size == mtu - TCP_HEADERS for *_, size in offered),
             ", ".join(f"{flags} MSS {size}" for _, flags, size in offered) or "no handshake seen")

    s.show()
    s.show(f"4. {here} itself sends {UNDERLAY_MTU} bytes with DF: to {there}'s underlay address, and into the overlay.")
    direct = ping(s, here, s.node_ip(there), UNDERLAY_MTU)
    overlaid = ping(s, here, web, UNDERLAY_MTU)
    route = s.run(here, "ip", "-o", "route", "get", web).split("\\")[0].strip()
    s.show(f"    to {s.node_ip(there)}: {'answered' if answered(direct) else 'no answer'}")
    s.show(f"    to {web}: {local_error(overlaid) or overlaid.strip()}   ({route})")
    s.expect(f"{here}'s {UNDERLAY_MTU}-byte DF ping crosses the bare underlay, but into the overlay its kernel "
             f"refuses it (mtu={mtu})",
             answered(direct) and local_error(overlaid).endswith(f"mtu={mtu}") and not answered(overlaid),
             f"underlay: {'answered' if answered(direct) else 'no answer'}; "
             f"overlay: {local_error(overlaid) or 'no local error'}")

    s.show()
    node_ip, port = s.node_ip(here), s.node_port("web-udp")
    sport = 40000 + os.getpid() % 20000
    s.show(f"5. The external client (MTU {UNDERLAY_MTU}) sends UDP datagrams with DF to {here}'s NodePort "
           f"{node_ip}:{port}; {here} must forward them to web-1 through the overlay.")
    sizes = (UNDERLAY_MTU, mtu)
    datagrams = [IP(dst=node_ip, flags="DF") / UDP(sport=sport + i, dport=port) / (b"k" * (total - 28))
                 for i, total in enumerate(sizes)]
    with s.sniff("underlay", "br0", bpf=ENCAPSULATED) as wire:
        replies = s.answers("external", datagrams)
    # Each datagram's answer, by what it is; what crossed, by its length inside (masqueraded: its port changed).
    needed = next((r for r in replies if ICMP in r and IPerror in r and UDPerror in r
                   and r[UDPerror].sport == sport), None)
    echoed = next((r for r in replies if UDP in r and ICMP not in r and r[UDP].dport == sport + 1), None)
    crossed = {total: [p for p in wire.packets if (i := inner(p)) is not None and UDP in i and i[UDP].dport == 8080
                       and i[IP].len == total] for total in sizes}
    s.show(f"    {UNDERLAY_MTU} bytes: answer {describe(needed) if needed else '(none)'}; "
           f"{len(crossed[UNDERLAY_MTU])} crossed the overlay")
    s.show(f"    {mtu} bytes: answer {describe(echoed) if echoed else '(none)'}; "
           f"{len(crossed[mtu])} crossed the overlay")
    quoted = needed is not None and (needed[IPerror].dst, needed[UDPerror].dport) == (node_ip, port)
    s.expect(f"{UNDERLAY_MTU} bytes: {here} answers ICMP fragmentation needed, next-hop MTU {mtu}, quoting the "
             "datagram as the external sent it; none of it enters the overlay",
             needed is not None and (needed[ICMP].type, needed[ICMP].code) == (3, 4) and needed[IP].src == node_ip
             and needed[ICMP].nexthopmtu == mtu and quoted and not crossed[UNDERLAY_MTU],
             (f"{describe(needed)} nexthopmtu={needed[ICMP].nexthopmtu}" if needed is not None else "no ICMP error")
             + f"; {len(crossed[UNDERLAY_MTU])} crossed")
    s.expect(f"{mtu} bytes: the datagram crosses the overlay (outer {UNDERLAY_MTU}) and web-1 answers",
             echoed is not None and echoed[IP].src == node_ip and echoed[UDP].sport == port
             and len(crossed[mtu]) == 1 and crossed[mtu][0][IP].len == UNDERLAY_MTU,
             f"{describe(echoed) if echoed else 'no answer'}; {len(crossed[mtu])} crossed")
    s.show("A pod MTU of the underlay's less the encapsulation keeps every pod packet whole on the wire: the")
    s.show("pod's kernel knows the limit, so TCP offers a fitting MSS and a DF datagram fails at once, in the")
    s.show("pod. A sender that does not know it (a 1500-byte peer, a pod with the wrong MTU) depends on the")
    s.show("node's ICMP fragmentation needed getting back to it: PMTU discovery, which firewalls often break.")


LAB = PacketLab(
    number=3,
    title="MTU: a full-size packet and the overlay",
    manifests=SERVICE,
    overlays=("vxlan", "udp"),  # host-gw adds nothing: its pods have the underlay's MTU
    modes=("iptables", "nftables", "ipvs"),  # userspace: the proxy's own socket re-sends the datagram
    task="""
The pods' MTU is the underlay's (1500) less the overlay's header (vxlan: 50). The client (node1)
pings web-1 (node2) with DF set (-M do), first exactly the pod MTU, then one byte more:

  kproxy capture --lab LAB underlay --filter 'udp port 8472'               (the outer packet's length)
  kproxy exec --lab LAB client -- ping -c1 -M do -s 1422 <web-1's IP>       (1450 bytes)
  kproxy exec --lab LAB client -- ping -c1 -M do -s 1423 <web-1's IP>       (1451 bytes)
  kproxy exec --lab LAB client -- ip link show eth0                         (mtu)
  kproxy exec --lab LAB node1 -- ping -c1 -M do -s 1472 <web-1's IP>        (1500 bytes from the node)
  kproxy exec --lab LAB client -- tcpdump -ni eth0 -c2 'tcp[tcpflags] & tcp-syn != 0'   (then curl web-1:8080)

How long is the outer packet of the first ping? Where does the second one fail? What MSS does the
client's SYN offer? Then send 1500 bytes with DF from the external client to node1's UDP NodePort
30003 (scapy: IP(dst=..., flags="DF")/UDP(dport=30003)/(b"k"*1472)): what comes back, and from whom?
""",
    experiment=experiment,
)
