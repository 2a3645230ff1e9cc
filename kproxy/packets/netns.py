"""Sniff and send from this process through a scapy worker inside a namespace (kproxy.packets.worker).

    with Sniffer(ns_path(lab, "node1"), "cni0", bpf="tcp port 8080") as sniffer:
        ...                                   # the socket is bound: everything from here on is seen
    sniffer.packets                           # scapy packets, in order

    answers(ns_path(lab, "client"), [IP(dst=...)/TCP(dport=80, flags="S")])  # the answers that came
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
from types import TracebackType
from typing import Any, Callable

from kproxy.children import end
from kproxy.errors import KproxyError
from kproxy.packets.decode import load_layers

READY_TIMEOUT = 30.0  # a worker imports scapy first: seconds on a loaded machine
WORKER = [sys.executable, "-m", "kproxy.packets.worker"]


def _in_namespace(netns_path: str, argv: list[str]) -> list[str]:
    return ["nsenter", f"--net={netns_path}", "--", *argv]


class Sniffer:
    """Packets seen on one interface of one namespace, from entering the block until count or leaving it."""

    def __init__(self, netns_path: str, iface: str, bpf: str | None = None, count: int = 0,
                 on_packet: Callable[[Any], None] | None = None) -> None:
        self.netns_path, self.iface, self.bpf, self.count = netns_path, iface, bpf, count
        self.on_packet = on_packet  # called in the reading thread with each packet as it arrives
        self.packets: list[Any] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._read_error: BaseException | None = None

    def start(self) -> "Sniffer":
        argv = [*WORKER, "sniff", "--iface", self.iface, "--count", str(self.count)]
        if self.bpf:
            argv += ["--filter", self.bpf]
        self._proc = subprocess.Popen(_in_namespace(self.netns_path, argv), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE)
        assert self._proc.stderr is not None
        ready = first_line(self._proc.stderr, READY_TIMEOUT)
        if ready != b"ready":
            self._proc.kill()
            self._proc.wait()
            detail = (ready + self._proc.stderr.read()).decode(errors="replace").strip().splitlines()
            reason = detail[-1].removeprefix("error: ") if detail else "the sniffer did not start"
            self._proc = None
            raise KproxyError(f"cannot capture on {self.iface}: {reason}")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        from scapy.utils import PcapReader

        load_layers()  # frames decode as Ether, VXLAN, flannel udp: not Raw

        assert self._proc is not None and self._proc.stdout is not None
        try:
            for packet in PcapReader(self._proc.stdout):
                self.packets.append(packet)
                if self.on_packet is not None:
                    self.on_packet(packet)
        except EOFError:
            pass  # stopped before its first packet: the stream has only a header or nothing
        except BaseException as exc:  # noqa: BLE001 (handed to the thread that waits)
            self._read_error = exc

    def wait(self, timeout: float | None) -> bool:
        """True once count packets arrived (the worker ended); False when timeout (None: none) passed first."""
        assert self._proc is not None
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self) -> list[Any]:
        if self._proc is None:
            return self.packets
        end(self._proc, 10)
        if self._reader is not None:
            self._reader.join(10)
        self._proc = None
        return self.packets

    def __enter__(self) -> "Sniffer":
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def first_line(stream: Any, timeout: float) -> bytes:
    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].strip() if line else b""


def answers(netns_path: str, packets: list[Any], timeout: float = 2.0, raw_socket: bool = False) -> list[Any]:
    """Send each IP packet from inside the namespace, through its routes; the first answer to each
    (scapy's sr1), in order. A packet that got none within timeout adds nothing; timeout 0 only sends.
    raw_socket: through the namespace's OUTPUT hooks, as an application's packet."""
    from scapy.error import Scapy_Exception
    from scapy.layers.inet import IP
    from scapy.utils import PcapReader

    load_layers()
    argv = [*WORKER, "send", "--timeout", str(timeout)] + (["--raw-socket"] if raw_socket else [])
    done = subprocess.run(_in_namespace(netns_path, argv),
                          input=json.dumps([p.command() for p in packets]).encode(),
                          capture_output=True, timeout=READY_TIMEOUT + len(packets) * timeout + 30)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        raise KproxyError(f"sending from {netns_path} failed: {lines[-1] if lines else done.returncode}")
    try:
        return [IP(bytes(p)) for p in PcapReader(io.BytesIO(done.stdout))]
    except (EOFError, Scapy_Exception):  # no answer at all: the stream has no header
        return []
