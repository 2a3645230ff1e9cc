"""The tracer of the modes that program iptables (iptables, userspace portals, IPVS's helper chains):
TRACE rules in the raw table, read back with xtables-monitor --trace.

The project's iptables is iptables-nft, so TRACE sets nftrace on the packet and the kernel reports
every rule it meets as a trace event; xtables-monitor prints them in iptables' own words:

    PACKET: 2 47e0b842 IN=cni0 ... SRC=10.244.1.2 DST=10.96.0.11 ... SPORT=43210 DPORT=80 SYN
     TRACE: 2 47e0b842 nat:KUBE-SERVICES:rule:0x37:JUMP:KUBE-SVC-...  -4 -t nat -A KUBE-SERVICES ...
"""

from __future__ import annotations

import re

from kproxy.proxy.kernel import IPTABLES, RESTORE, SAVE
from kproxy.proxy.mode import Probe
from kproxy.proxy.tracing import TRACE_COMMENT, Listener, in_node

TRACE = re.compile(r"^ *TRACE: \d+ [0-9a-f]+ (\w+):([^:]+):(rule|policy|return):(?:0x[0-9a-f]+:)?(\S*)\s*(.*)$")
PACKET = re.compile(r"^PACKET: \d+ [0-9a-f]+ (.*?)\s*$")
VERDICTS = {"0xfffffffb": "RETURN"}  # what the monitor prints as a number


def trace_rules(probe: Probe) -> list[str]:
    """The raw table's TRACE rules for the probe's packets, both directions, arriving or sent here."""
    return [f'-A {chain} -p {probe.protocol} -m {probe.protocol} --{side} {probe.port} -m comment '
            f'--comment "{probe.comment}" -j TRACE' for chain in ("PREROUTING", "OUTPUT") for side in ("sport", "dport")]


def ready_chain(probe: Probe) -> str:
    """Made and removed until the monitor prints it: then it listens."""
    return probe.name.upper()


def readable(lines: list[str]) -> list[str]:
    """The monitor's lines as the trace shows them: each packet once as the node saw it, then the
    rules it met (table:chain verdict, and the rule), without the trace's own TRACE rules."""
    out, last_packet = [], ""
    for line in lines:
        if m := PACKET.match(line):
            seen = re.sub(r" MAC(SRC|DST|PROTO)=\S+| LL=0x[0-9a-f]+ [0-9a-f]+", "", m.group(1))
            if seen != last_packet:
                out.append(f"packet {seen}")
                last_packet = seen
        elif (m := TRACE.match(line)) and TRACE_COMMENT not in line and m.group(3) != "return" \
                and m.group(1) != "raw":  # the raw table holds only the TRACE rules: not the path
            table, chain, kind, verdict, rule = m.groups()
            verdict = VERDICTS.get(verdict, verdict).replace(":", " ")
            if kind == "policy":
                out.append(f"  {table}:{chain} policy {verdict}")
            else:
                out.append(f"  {table}:{chain} {verdict}: {rule.removeprefix(f'-4 -t {table} ')}")
    return out


class XtablesTracer:
    def __init__(self, netns_path: str) -> None:
        self.netns_path = netns_path
        self._listener: Listener | None = None
        self._probe: Probe | None = None
        self._raw_existed = True

    def arm(self, probe: Probe) -> None:
        self._probe, self._raw_existed = probe, self._raw_table_exists()
        self._listener = Listener(self.netns_path, ["stdbuf", "-oL", "xtables-monitor", "--trace", "--event"],
                                  "xtables-monitor")
        self._listener.start(lambda line: ready_chain(probe) in line, self._poke)
        in_node(self.netns_path, RESTORE, "--noflush", stdin="*raw\n" + "\n".join(trace_rules(probe)) + "\nCOMMIT\n")

    def _poke(self) -> None:
        assert self._probe is not None
        in_node(self.netns_path, IPTABLES, "-t", "raw", "-N", ready_chain(self._probe), check=False)
        in_node(self.netns_path, IPTABLES, "-t", "raw", "-X", ready_chain(self._probe), check=False)

    def _raw_table_exists(self) -> bool:
        return bool(in_node(self.netns_path, "nft", "list", "table", "ip", "raw", check=False))

    def read(self) -> list[str]:
        return readable(self._listener.stop()) if self._listener else []

    def disarm(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        if self._probe is None:
            return
        saved = in_node(self.netns_path, SAVE, "-t", "raw", check=False).splitlines()
        ours = [line.replace("-A ", "-D ", 1) for line in saved
                if line.startswith("-A ") and f'--comment "{self._probe.comment}"' in line]
        if ours:
            in_node(self.netns_path, RESTORE, "--noflush", stdin="*raw\n" + "\n".join(ours) + "\nCOMMIT\n")
        in_node(self.netns_path, IPTABLES, "-t", "raw", "-X", ready_chain(self._probe), check=False)
        if not self._raw_existed and len(ours) == sum(line.startswith("-A ") for line in saved):
            # The raw table was made by the TRACE rules and nothing else is in it: it goes too.
            in_node(self.netns_path, "nft", "delete", "table", "ip", "raw", check=False)
        self._probe = None
