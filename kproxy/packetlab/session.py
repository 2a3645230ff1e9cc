"""What a packet lab's experiment works with: the lab's members and addresses, scapy in its
namespaces, commands there, narration and claims."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from cni.netns import entered
from kproxy.errors import KproxyError
from kproxy.lab.state import ns_name, ns_path
from kproxy.packets.netns import Sniffer, answers
from kproxy.proxy import mode
from kproxy.proxy.mode import Mode
from kproxy.proxy.netfilter import MASQ_MARK

KPROXY = str(Path(sys.executable).parent / "kproxy")


def kproxy(*args: str, stdin: str | None = None) -> str:
    """The kproxy command, as a user runs it; its stdout. A failure is a KproxyError with its message."""
    done = subprocess.run([KPROXY, *args], input=stdin, capture_output=True, text=True)
    if done.returncode != 0:
        raise KproxyError(done.stderr.strip().removeprefix("kproxy: error: ") or f"kproxy {args[0]} failed")
    return done.stdout


@dataclass(frozen=True)
class Claim:
    text: str  # what the kernel should have done
    holds: bool
    seen: str  # what the experiment saw


class Session:
    def __init__(self, lab: str, narrate: bool, out: TextIO) -> None:
        self.lab, self.narrate, self.out = lab, narrate, out
        self.claims: list[Claim] = []
        self.info: dict[str, Any] = {}
        self.services: dict[str, Any] = {}
        self.reload()
        self.mode: str = self.info["mode"]
        self.proxy: Mode = mode(self.mode)  # what a lab asks about the mode, never its name
        self.overlay: str = self.info["overlay"]

    def reload(self) -> None:
        """Read the lab's pods and Services again, after the experiment applied or deleted some."""
        self.info = json.loads(kproxy("lab", "status", self.lab, "-o", "json"))
        self.services = {s["metadata"]["name"]: s for s in
                         json.loads(kproxy("get", "svc", "--lab", self.lab, "-o", "json"))["items"]}

    # -- the lab
    def ns(self, member: str) -> str:
        return ns_path(self.lab, member)

    def pod_ip(self, pod: str) -> str:
        return str(next(p["ip"] for p in self.info["pods"] if p["name"] == pod))

    def node_ip(self, node: str) -> str:
        return str(next(n["ip"] for n in self.info["nodes"] if n["name"] == node))

    def node_of(self, pod: str) -> str:
        return str(next(p["node"] for p in self.info["pods"] if p["name"] == pod))

    def pods_labelled(self, key: str, value: str) -> list[str]:
        return sorted(str(p["name"]) for p in self.info["pods"] if p["labels"].get(key) == value)

    def pod_at(self, ip: str) -> str | None:
        """The pod with address ip, if one has it."""
        return next((str(p["name"]) for p in self.info["pods"] if p["ip"] == ip), None)

    def cluster_ip(self, service: str) -> str:
        return str(self.services[service]["spec"]["clusterIP"])

    def node_port(self, service: str) -> int:
        return int(self.services[service]["spec"]["ports"][0]["nodePort"])

    @property
    def external_ip(self) -> str:
        return str(self.info["external"]["ip"])

    # -- packets and commands in the lab's namespaces
    def sniff(self, member: str, iface: str = "eth0", bpf: str | None = None, count: int = 0) -> Sniffer:
        return Sniffer(self.ns(member), iface, bpf=bpf, count=count)

    def answers(self, member: str, packets: list[Any], timeout: float = 2.0) -> list[Any]:
        return answers(self.ns(member), packets, timeout)

    def socket_in(self, member: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """An IPv4 socket created inside a member's namespace (it stays there): a pod's own socket,
        for a connection held open or datagrams from one source port, in this process."""
        with entered(self.ns(member)):
            return socket.socket(socket.AF_INET, kind)

    def run(self, member: str, *argv: str, check: bool = True, stdin: str | None = None) -> str:
        """A command inside a member's namespace (stdin: its input); its stdout (and stderr, so a
        tool's message shows too)."""
        done = subprocess.run(["nsenter", f"--net={self.ns(member)}", "--", *argv], input=stdin,
                              capture_output=True, text=True)
        if check and done.returncode != 0:
            raise KproxyError(f"{' '.join(argv)} in {member} failed: {done.stderr.strip() or done.returncode}")
        return done.stdout + done.stderr

    def exec(self, member: str, *argv: str) -> subprocess.CompletedProcess[str]:
        """A command in a member's namespace as `kproxy exec` runs it (ip netns exec), so a pod
        resolves names through its own /etc/netns/<namespace>/resolv.conf; whatever its exit status."""
        return subprocess.run(["ip", "netns", "exec", ns_name(self.lab, member), *argv],
                              capture_output=True, text=True)

    def conntrack_stats(self, member: str) -> dict[str, int]:
        """`conntrack -S` in a member's namespace (its own counters), each summed over the CPUs:
        {"insert_failed": 0, "drop": 0, "early_drop": 0, ...}."""
        totals: dict[str, int] = {}
        for line in self.run(member, "conntrack", "-S").splitlines():
            for word in line.split():
                key, sep, value = word.partition("=")
                if sep and key != "cpu" and value.isdigit():
                    totals[key] = totals.get(key, 0) + int(value)
        return totals

    def route_to(self, member: str, ip: str) -> dict[str, Any]:
        """The route member's namespace picks for a packet to ip (`ip -j route get`): dev, prefsrc..."""
        route: dict[str, Any] = json.loads(self.run(member, "ip", "-j", "route", "get", ip))[0]
        return route

    def source_toward(self, member: str, ip: str) -> str:
        """The source address member's routes give a packet to ip: the address a masquerade there picks."""
        return str(self.route_to(member, ip)["prefsrc"])

    @contextmanager
    def masquerade_off(self, node: str) -> Iterator[Callable[[], int]]:
        """kube-proxy's masquerade taken away on node while the block runs: a table of the lab's own
        clears the masquerade mark (0x4000, every mode's) in postrouting just before the NAT chains
        read it, so a new connection leaves unmasqueraded. Yields a function that counts the packets
        it cleared the mark of."""
        table = "packetlab-nomasq"
        keep = ~int(MASQ_MARK, 16) & 0xFFFFFFFF
        self.run(node, "nft", "-f", "-", stdin=f"""table ip {table} {{
  chain postrouting {{
    type filter hook postrouting priority srcnat - 1; policy accept;
    meta mark & {MASQ_MARK} == {MASQ_MARK} counter meta mark set meta mark & {keep:#x}
  }}
}}
""")

        def cleared() -> int:
            listed = self.run(node, "nft", "list", "table", "ip", table)
            return int(listed.split(" counter packets ", 1)[1].split()[0]) if " counter packets " in listed else 0

        try:
            yield cleared
        finally:
            self.run(node, "nft", "delete", "table", "ip", table, check=False)

    # -- what the learner reads
    def show(self, text: str = "") -> None:
        """A step of the solution: printed with --solve only."""
        if self.narrate:
            print(text, file=self.out, flush=True)

    def expect(self, text: str, holds: bool, seen: str) -> bool:
        self.claims.append(Claim(text, bool(holds), seen))
        return bool(holds)

    @property
    def passed(self) -> bool:
        return bool(self.claims) and all(claim.holds for claim in self.claims)
