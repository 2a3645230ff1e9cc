"""`kproxy capture`: packets at one point of a lab, to a pcap for Wireshark or decoded on stdout."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from kproxy.packets.decode import describe, load_layers
from kproxy.packets.netns import Sniffer
from kproxy.packets.points import Point


def capture(point: Point, out_file: str | None, count: int, bpf: str | None, timeout: float | None,
            log: TextIO = sys.stderr) -> int:
    """Capture until count packets, timeout seconds or Ctrl-C; the number of packets captured.
    out_file "-" writes the pcap to stdout (wireshark -k -i -), None prints one line per packet."""
    from scapy.utils import PcapWriter

    load_layers()
    writer: Any = None
    if out_file is not None:
        writer = PcapWriter(sys.stdout.buffer if out_file == "-" else out_file, sync=True)
    started = time.monotonic()
    lock = threading.Lock()

    def show(packet: Any) -> None:
        with lock:
            if writer is not None:
                writer.write(packet)
            else:
                print(f"{time.monotonic() - started:9.6f}  {describe(packet)}", flush=True)

    sniffer = Sniffer(point.netns_path, point.iface, bpf=bpf, count=count, on_packet=show)
    with sniffer:
        print(f"capturing on {point} ({'filter ' + bpf if bpf else 'every packet'}); Ctrl-C stops",
              file=log, flush=True)
        try:
            sniffer.wait(timeout)
        except KeyboardInterrupt:
            pass
    if writer is not None:
        writer.close() if out_file != "-" else writer.flush()
    print(f"{len(sniffer.packets)} packets captured", file=log)
    return len(sniffer.packets)
