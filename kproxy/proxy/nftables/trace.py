"""The nftables tracer: a table of its own sets nftrace on the probe's packets before anything else
sees them, and `nft monitor` prints every rule of table ip kube-proxy they meet:

    trace id 6c1b2a0f ip kube-proxy nat-prerouting rule jump services (verdict jump services)
    trace id 6c1b2a0f ip kube-proxy services rule ip daddr . meta l4proto . th dport vmap @service-ips (verdict goto ...)
"""

from __future__ import annotations

import re

from kproxy.proxy.mode import Probe
from kproxy.proxy.tracing import TRACE_NAME, Listener, in_node

TRACE = re.compile(r"^trace id [0-9a-f]+ (.*)$")
NOISE = re.compile(r"ether [sd]addr \S+ |ip dscp \S+ |ip ecn \S+ |tcp window \d+ ?")


def trace_table(probe: Probe) -> str:
    """The table that marks the probe's packets, both directions, arriving or sent here (priority raw:
    before conntrack and NAT)."""
    chains = []
    for chain, hook in (("prerouting", "prerouting"), ("output", "output")):
        rules = "".join(f"\t\tmeta l4proto {probe.protocol} th {side} {probe.port} meta nftrace set 1\n"
                        for side in ("sport", "dport"))
        chains.append(f"\tchain {chain} {{\n\t\ttype filter hook {hook} priority raw; policy accept;\n{rules}\t}}\n")
    return f"table ip {probe.name} {{\n{''.join(chains)}}}\n"


def ready_table(probe: Probe) -> str:
    """Added and deleted until the monitor prints it: then it listens."""
    return f"{probe.name}-ready"


def readable(lines: list[str]) -> list[str]:
    """The monitor's trace lines without their id: each packet once as the node saw it (without its
    Ethernet and ECN details), then the rules of table ip kube-proxy it met; the trace's own table
    left out."""
    out, last_packet = [], ""
    for line in lines:
        if not (m := TRACE.match(line)):
            continue
        text = m.group(1)
        if " packet: " in text:
            seen = NOISE.sub("", text.split(" packet: ", 1)[1]).strip()
            if seen != last_packet:
                out.append(f"packet {seen}")
                last_packet = seen
        elif not text.startswith(f"ip {TRACE_NAME}"):  # a trace's own table
            out.append(f"  {text.strip()}")
    return out


class NftablesTracer:
    def __init__(self, netns_path: str) -> None:
        self.netns_path = netns_path
        self._listener: Listener | None = None
        self._probe: Probe | None = None

    def arm(self, probe: Probe) -> None:
        self._probe = probe
        self._listener = Listener(self.netns_path, ["nft", "monitor"], "nft monitor")
        self._listener.start(lambda line: ready_table(probe) in line, self._poke)
        in_node(self.netns_path, "nft", "-f", "-", stdin=trace_table(probe))

    def _poke(self) -> None:
        assert self._probe is not None
        in_node(self.netns_path, "nft", "add", "table", "ip", ready_table(self._probe), check=False)
        in_node(self.netns_path, "nft", "delete", "table", "ip", ready_table(self._probe), check=False)

    def read(self) -> list[str]:
        return readable(self._listener.stop()) if self._listener else []

    def disarm(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        if self._probe is not None:
            for table in (self._probe.name, ready_table(self._probe)):
                in_node(self.netns_path, "nft", "delete", "table", "ip", table, check=False)
            self._probe = None
