"""A trace in the kernel: recorders in the flow's namespaces, the mode's tracer on each node, the
probe from the source, then everything taken down again, also on Ctrl-C and SIGTERM."""

from __future__ import annotations

import json
import random
import subprocess
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable

from kproxy.children import end, terminated_as_interrupt
from kproxy.errors import KproxyError
from kproxy.packets.decode import headers
from kproxy.packets.netns import READY_TIMEOUT, WORKER, first_line, answers
from kproxy.proxy.mode import Mode, Probe
from kproxy.proxy.tracing import in_node
from kproxy.trace.hops import (Caught, NodeReport, Trace, conntrack_keys, decode, ends, flow_keys, hops, innermost,
                               key, relayed_seeds)
from kproxy.trace.plan import Flow, Member

Seen = tuple[Caught, Any]  # a recorded packet and its scapy decoding
PORTS = (61000, 65535)  # the probe's source port: above Linux's ephemeral range, so no socket's collides
QUIET = 0.3  # seconds without a new packet anywhere: the flow is over
SETTLE_LIMIT = 3.0  # at most this long for the flow to go quiet


class Recorder:
    """Every IPv4 packet of one namespace (kproxy.packets.worker record), kept as it arrives."""

    def __init__(self, member: Member, caught: list[Seen], changed: threading.Condition) -> None:
        self.member, self.caught, self.changed = member, caught, changed
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    def launch(self) -> None:
        self._proc = subprocess.Popen(["nsenter", f"--net={self.member.netns_path}", "--", *WORKER, "record"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_ready(self) -> None:
        """Once the worker records (its socket is bound); from then on its packets are kept."""
        assert self._proc is not None and self._proc.stderr is not None
        if first_line(self._proc.stderr, READY_TIMEOUT) != b"ready":
            self.stop()
            raise KproxyError(f"cannot record packets in {self.member.name}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            record = json.loads(line)
            caught = Caught(self.member.name, record["iface"], record["outgoing"], record["time"] or time.time(),
                            record["link"], bytes.fromhex(record["data"]))
            packet = decode(caught)  # once, here: the waits below and the hops read it again and again
            with self.changed:
                self.caught.append((caught, packet))
                self.changed.notify_all()

    def terminate(self) -> None:
        """Tell the worker to stop (it drains its socket first); stop() waits for it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()

    def stop(self) -> None:
        if self._proc is None:
            return
        end(self._proc)
        if self._reader is not None:
            self._reader.join(5)
        self._proc = None


def guard_name(probe: Probe) -> str:
    """The source's table: its kernel must not answer the probe's reply."""
    return f"{probe.name}-source"


def guard_table(probe: Probe, ip_id: int) -> str:
    """The source's kernel has no socket for the probe: it would reset the reply (TCP) or report the
    port unreachable (UDP) and end the flow early. Only the probe's own packets (its IP ID) pass."""
    if probe.protocol == "tcp":
        rule = f"tcp sport {probe.port} tcp flags rst ip id != {ip_id} drop"
    else:
        rule = "icmp type destination-unreachable drop"
    return (f"table ip {guard_name(probe)} {{\n\tchain output {{\n\t\ttype filter hook output priority filter; policy accept;\n"
            f"\t\t{rule}\n\t}}\n}}\n")


def _wait(changed: threading.Condition, done: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    with changed:
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed.wait(left)
    return True


def _settle(changed: threading.Condition, caught: list[Seen], ours: Callable[[Seen], bool]) -> None:
    """Until no packet of the flow (ours) was caught for QUIET seconds (at most SETTLE_LIMIT): the
    late hops too. Other traffic in the lab does not keep it waiting."""
    deadline = time.monotonic() + SETTLE_LIMIT
    with changed:
        while time.monotonic() < deadline:
            seen = sum(1 for c in caught if ours(c))
            changed.wait(QUIET)
            if sum(1 for c in caught if ours(c)) == seen:
                return


def probe_packet(flow: Flow, probe: Probe, ip: Any, seq: int) -> Any:
    """The one packet the trace sends: a SYN, or a DNS question (what cluster DNS answers, and an
    echo server returns as it would any datagram)."""
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import TCP, UDP

    if probe.protocol == "udp":
        return ip / UDP(sport=probe.port, dport=flow.dst_port) / DNS(rd=1, qd=DNSQR(
            qname="kubernetes.default.svc.cluster.local"))
    return ip / TCP(sport=probe.port, dport=flow.dst_port, flags="S", seq=seq)


def _send(flow: Flow, sent: Any, mode: Mode, timeout: float, changed: threading.Condition,
          caught: list[Seen]) -> bool:
    """The probe, and for a relaying mode the rest of the handshake; whether an answer came back."""
    from scapy.layers.inet import IP, TCP

    path = flow.source.netns_path
    got = answers(path, [sent], timeout, raw_socket=True)
    if not got or not mode.relays or TCP not in got[0] or got[0][TCP].flags != "SA":
        return bool(got)
    # The proxy accepts only an established connection: finish the handshake and let it dial its endpoint.
    answers(path, [IP(src=sent.src, dst=sent.dst, id=sent.id) / TCP(
        sport=sent[TCP].sport, dport=sent[TCP].dport, flags="A", seq=sent[TCP].seq + 1, ack=got[0][TCP].seq + 1)],
        0, raw_socket=True)
    endpoints = {(e.split(":")[0], int(e.split(":")[1])) for e in flow.endpoints}
    _wait(changed, lambda: any(seen[1] in endpoints for c in caught if (seen := _ends(c))), timeout)
    return True


def _ends(caught: Seen) -> tuple[str, tuple[str, int], tuple[str, int]] | None:
    return ends(innermost(caught[1]))


def trace(flow: Flow, lab: str, mode: Mode, overlay: str, timeout: float) -> Trace:
    from scapy.layers.inet import IP, TCP

    probe = Probe(flow.protocol, random.randint(*PORTS))
    ip_id, seq = random.randint(1, 65535), random.randint(0, 2**32 - 1)
    caught: list[Seen] = []
    changed = threading.Condition()
    tables: dict[str, list[str]] = {}
    reports = [NodeReport(node.name) for node in flow.nodes]
    # The source address the kernel would pick: scapy's own route table can miss it in a node's
    # namespace (0.0.0.0), and the TCP or UDP checksum covers it.
    route = json.loads(in_node(flow.source.netns_path, "ip", "-j", "route", "get", flow.dst_ip))
    ip = IP(src=route[0].get("prefsrc", flow.source.ip), dst=flow.dst_ip, id=ip_id)
    sent = IP(bytes(probe_packet(flow, probe, ip, seq)))  # built whole: its length and checksums as sent
    with terminated_as_interrupt(), ExitStack() as cleanup:
        cleanup.callback(in_node, flow.source.netns_path, "nft", "delete", "table", "ip", guard_name(probe),
                         check=False)
        if probe.protocol == "tcp":
            # Once the recorders stopped: reset the probe's connection, so that its endpoint (or the
            # proxy) does not keep resending its SYN-ACK.
            cleanup.callback(answers, flow.source.netns_path, [ip / TCP(sport=probe.port, dport=flow.dst_port,
                                                                       flags="R", seq=seq + 1)], 0, raw_socket=True)
        in_node(flow.source.netns_path, "nft", "-f", "-", stdin=guard_table(probe, ip_id))
        recorders = [Recorder(member, caught, changed) for member in flow.listeners]
        for recorder in recorders:  # all at once: each worker takes a while to import scapy
            cleanup.callback(recorder.stop)
            recorder.launch()
        for recorder in recorders:
            recorder.wait_ready()
        tracers = [mode.tracer(node.netns_path) for node in flow.nodes] if mode.tracer else []
        for tracer in tracers:
            cleanup.callback(tracer.disarm)
            tracer.arm(probe)
        answered = _send(flow, sent, mode, timeout, changed, caught)
        endpoints = {(e.split(":")[0], int(e.split(":")[1])) for e in flow.endpoints}
        _settle(changed, caught, lambda c: bool((seen := _ends(c)) and (
            probe.port in (seen[1][1], seen[2][1]) or (mode.relays and endpoints & {seen[1], seen[2]}))))
        for recorder in recorders:
            recorder.terminate()  # all at once: each takes a moment to drain
        for recorder in recorders:
            recorder.stop()  # the flow is over: what comes later (an endpoint's resent SYN-ACK) is not
        for report, tracer in zip(reports, tracers):
            report.rules = tracer.read()
        for node in flow.nodes:
            tables[node.name] = in_node(node.netns_path, "conntrack", "-L", "-p", flow.protocol,
                                        check=False).splitlines()
    seeds = {key(flow.protocol, (sent.src, probe.port), (flow.dst_ip, flow.dst_port))}
    if mode.relays:
        seeds |= relayed_seeds(flow, caught)
    keys = flow_keys(seeds, tables)
    for report in reports:
        report.conntrack = [line for line in tables[report.name] if keys & set(conntrack_keys(line))]
    return Trace(flow, lab, mode.name, overlay, probe.port, headers(sent), hops(caught, keys, sent), reports,
                 answered)


