"""Packets as a learner reads them: every header, outer and inner, on one line.

scapy decodes VXLAN on 8472 itself; flannel's udp backend (UDP 8285 carrying the
bare inner IP packet) is bound here.
"""

from __future__ import annotations

from typing import Any


def _bind_flannel_udp() -> None:
    from scapy.layers.inet import IP, UDP
    from scapy.packet import bind_layers

    bind_layers(UDP, IP, dport=8285)
    bind_layers(UDP, IP, sport=8285)


def load_layers() -> None:
    """Every protocol scapy knows, plus flannel's udp encapsulation."""
    import scapy.layers.all  # noqa: F401

    _bind_flannel_udp()


def headers(packet: Any) -> list[str]:
    """One entry per IP-level header pair, outermost first: '172.18.0.2:41000 > 172.18.0.4:8472 UDP VXLAN vni=1'."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.vxlan import VXLAN

    out = []
    layer = packet
    while layer is not None and IP in layer:
        ip = layer[IP]
        l4 = ip.payload
        if isinstance(l4, TCP):
            text = f"{ip.src}:{l4.sport} > {ip.dst}:{l4.dport} TCP [{l4.sprintf('%TCP.flags%')}]"
        elif isinstance(l4, UDP):
            text = f"{ip.src}:{l4.sport} > {ip.dst}:{l4.dport} UDP"
            if isinstance(l4.payload, VXLAN):
                text += f" VXLAN vni={l4.payload.vni}"
            elif isinstance(l4.payload, IP):
                text += " flannel-udp"
        elif isinstance(l4, ICMP):
            text = f"{ip.src} > {ip.dst} ICMP {l4.sprintf('%ICMP.type%')}"
            if l4.type == 3:
                text += f" code={l4.code}"
        else:
            text = f"{ip.src} > {ip.dst} proto={ip.proto}"
        flags = str(ip.flags)
        out.append(text + (f" len={ip.len}" + (f" {flags}" if flags else "")))
        encapsulated = isinstance(l4, UDP) and isinstance(l4.payload, (VXLAN, IP))
        layer = l4.payload if encapsulated else None
    return out


def describe(packet: Any) -> str:
    """The whole packet on one line: outer headers, then ' | ' and the inner ones."""
    found = headers(packet)
    return " | ".join(found) if found else packet.summary()
