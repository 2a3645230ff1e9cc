"""The IPVS tracer: the iptables rules the probe met (IPVS mode's KUBE-* helper chains and ipsets),
then the connection IPVS made for it: which virtual service, which real server."""

from __future__ import annotations

import ipaddress

from kproxy.proxy.mode import Probe
from kproxy.proxy.tracing import in_node
from kproxy.proxy.xtables_trace import XtablesTracer


def _address(hex_ip: str, hex_port: str) -> str:
    return f"{ipaddress.IPv4Address(int(hex_ip, 16))}:{int(hex_port, 16)}"


def connections(table: str, probe: Probe) -> list[str]:
    """/proc/net/ip_vs_conn's entries of the probe's port, in words.

    Its lines: Pro FromIP FPrt ToIP TPrt DestIP DPrt State Expires ..., addresses and ports in hex."""
    out = []
    for line in table.splitlines()[1:]:
        words = line.split()
        if len(words) < 9 or words[0].lower() != probe.protocol or probe.port not in (int(words[2], 16),
                                                                                      int(words[6], 16)):
            continue
        out.append(f"  ipvs: {words[0]} {_address(words[1], words[2])} -> virtual {_address(words[3], words[4])} "
                   f"-> real server {_address(words[5], words[6])} {words[7]} (expires in {words[8]} s)")
    return out


class IpvsTracer:
    def __init__(self, netns_path: str) -> None:
        self.netns_path = netns_path
        self._rules = XtablesTracer(netns_path)
        self._probe: Probe | None = None

    def arm(self, probe: Probe) -> None:
        self._probe = probe
        self._rules.arm(probe)

    def read(self) -> list[str]:
        met = self._rules.read()
        if self._probe is None:
            return met
        return met + connections(in_node(self.netns_path, "cat", "/proc/net/ip_vs_conn", check=False), self._probe)

    def disarm(self) -> None:
        self._rules.disarm()
