"""The scapy process inside one network namespace: sniff to a pcap stream, or send packets.

    nsenter --net=NS -- python -m kproxy.packets.worker sniff --iface cni0 [--filter BPF] [--count N]
        writes "ready" on stderr once the socket is bound (nothing that arrives later is lost),
        then a pcap stream on stdout until N packets, or SIGTERM / SIGINT (after what the socket holds).
    nsenter --net=NS -- python -m kproxy.packets.worker record
        every IPv4 packet on every interface of the namespace, as JSON lines (interface, direction,
        kernel timestamp, link type, bytes) after "ready", until SIGTERM / SIGINT: what `kproxy trace`
        orders across namespaces. No scapy: the parent decodes.
    nsenter --net=NS -- python -m kproxy.packets.worker send [--timeout S] [--raw-socket]
        reads a JSON list of scapy expressions (Packet.command()) on stdin, sends the IP packets
        through this namespace's routes, and writes each one's first answer (scapy's sr1) as pcap;
        timeout 0 sends without waiting. --raw-socket sends through a raw IP socket, so the packet
        passes this namespace's OUTPUT hooks (a node's own NAT) as an application's would.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from types import FrameType


_stopping = False
SO_TIMESTAMPNS = 35  # Linux's; Python's socket module does not export it


def _stop(signum: int, frame: FrameType | None) -> None:
    global _stopping
    _stopping = True


def sniff(iface: str, bpf: str | None, count: int) -> int:
    import select

    import scapy.layers.all  # noqa: F401 (registers the link types: frames decode as Ether, not Raw)
    from scapy.config import conf
    from scapy.utils import PcapWriter

    try:
        sock = conf.L2listen(iface=iface, filter=bpf)
    except Exception as exc:  # noqa: BLE001 (a bad filter or interface: one line for the caller)
        print(f"error: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}",
              file=sys.stderr, flush=True)
        return 1
    out = PcapWriter(sys.stdout.buffer, sync=True)
    print("ready", file=sys.stderr, flush=True)
    seen = 0
    try:
        # Told to stop, it still drains what the socket holds: a packet that arrived before the
        # caller's action ended is never lost to the stop.
        while not count or seen < count:
            readable, _, _ = select.select([sock], [], [], 0 if _stopping else 0.2)
            if not readable:
                if _stopping:
                    break
                continue
            packet = sock.recv()
            if packet is not None:
                out.write(packet)
                seen += 1
    except BrokenPipeError:
        pass  # the reader is gone: nothing left to write to
    finally:
        sock.close()
    return 0


def record() -> int:
    import select
    import socket
    import struct

    # Unbound, every protocol: every interface of this namespace, both directions (the kernel hands
    # sent packets and those a bridge takes only to such sockets). IPv4 kept: no ARP, no IPv6.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    print("ready", file=sys.stderr, flush=True)
    try:
        while True:
            readable, _, _ = select.select([sock], [], [], 0 if _stopping else 0.2)
            if not readable:
                if _stopping:
                    break
                continue
            data, ancillary, _, address = sock.recvmsg(65535, socket.CMSG_SPACE(16))
            stamp = next((struct.unpack("qq", item[2][:16]) for item in ancillary
                          if item[0] == socket.SOL_SOCKET and item[1] == SO_TIMESTAMPNS), None)
            iface, protocol, kind, link_type = address[:4]
            if protocol != 0x0800:
                continue
            print(json.dumps({"iface": iface, "outgoing": kind == socket.PACKET_OUTGOING,
                              "time": stamp[0] + stamp[1] / 1e9 if stamp else None, "link": link_type,
                              "data": data.hex()}), flush=True)
    except BrokenPipeError:
        pass  # the reader is gone
    finally:
        sock.close()
    return 0


def _raw_answer(packet: object, timeout: float) -> object | None:
    """Send packet through a raw IP socket and return its answer as this namespace's stack delivers
    it (after NAT is undone), from whichever interface it came: raw sockets of its protocol and ICMP."""
    import select
    import socket
    import time

    from scapy.layers.inet import IP
    from scapy.sendrecv import send as send_only

    listeners = [socket.socket(socket.AF_INET, socket.SOCK_RAW, number)
                 for number in {packet[IP].proto, socket.IPPROTO_ICMP}]  # type: ignore[index]
    try:
        send_only(packet, verbose=False)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(listeners, [], [], left)
            for sock in readable:
                reply = IP(sock.recv(65535))
                if reply.answers(packet):
                    return reply
    finally:
        for sock in listeners:
            sock.close()
    return None


def send(timeout: float, raw_socket: bool) -> int:
    import scapy.layers.all as layers
    from scapy.config import conf
    from scapy.sendrecv import send as send_only
    from scapy.sendrecv import sr1
    from scapy.supersocket import L3RawSocket
    from scapy.utils import PcapWriter

    if raw_socket:
        conf.L3socket = L3RawSocket

    out = PcapWriter(sys.stdout.buffer, sync=True)
    for command in json.load(sys.stdin):
        # Packet.command() of the caller's packet: only the fields it set, so this namespace's
        # routes fill in the source address and the checksums.
        packet = eval(command, vars(layers))  # noqa: S307 (our own caller's scapy expressions)
        if timeout <= 0:
            send_only(packet, verbose=False)
            continue
        reply = _raw_answer(packet, timeout) if raw_socket else sr1(packet, timeout=timeout, verbose=False)
        if reply is not None:
            out.write(reply)
    out.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kproxy.packets.worker")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("sniff")
    p.add_argument("--iface", required=True)
    p.add_argument("--filter")
    p.add_argument("--count", type=int, default=0)
    sub.add_parser("record")
    p = sub.add_parser("send")
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--raw-socket", action="store_true")
    args = parser.parse_args(argv)
    logging.getLogger("scapy").setLevel(logging.ERROR)  # stderr carries "ready" and errors only
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.what == "sniff":
        return sniff(args.iface, args.filter, args.count)
    if args.what == "record":
        return record()
    return send(args.timeout, args.raw_socket)


if __name__ == "__main__":
    sys.exit(main())
