"""The packet commands of the kproxy command line: capture and packet-lab."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from kproxy import cliargs
from kproxy.errors import KproxyError
from kproxy.lab.topology import OVERLAYS
from kproxy.proxy import MODES


def cmd_capture(args: argparse.Namespace) -> int:
    from kproxy.lab.state import choose_lab
    from kproxy.packets.capture import capture
    from kproxy.packets.points import resolve_point

    lab = choose_lab(args.lab)
    cliargs.need_root()
    point = resolve_point(lab, args.point)
    if args.write and args.write != "-" and os.path.isdir(args.write):
        raise KproxyError(f"{args.write} is a directory: -w takes a file name (or - for stdout)")
    if args.write == "-" and sys.stdout.isatty():
        raise KproxyError("-w - writes a binary pcap to stdout: pipe it (wireshark -k -i -) or give a file name")
    capture(point, args.write, args.count, args.filter, args.timeout)
    return 0


def cmd_trace(args: argparse.Namespace) -> int:
    from kproxy.lab import build
    from kproxy.lab.state import choose_lab, lab_dir
    from kproxy.proxy import mode
    from kproxy.store import open_store
    from kproxy.trace.hops import render_json, render_text
    from kproxy.trace.plan import plan
    from kproxy.trace.run import trace

    lab = build.require(choose_lab(args.lab)).name
    cliargs.need_root()
    info = build.status(lab)
    view = open_store(lab_dir(lab)).read()
    flow = plan(info, view.of_kind("Service"), view.of_kind("EndpointSlice"), args.source, args.destination,
                args.proto)
    done = trace(flow, lab, mode(info["mode"]), info["overlay"], args.timeout)
    print(render_json(done) if args.json else render_text(done), end="")
    return 0 if done.answered else 1


def cmd_packet_lab_list(args: argparse.Namespace) -> int:
    from kproxy.packetlab import all_labs

    for lab in all_labs():
        print(f"{lab.number:>3}  {lab.name:<22} {lab.title}  (overlays {', '.join(lab.overlays)}; "
              f"modes {', '.join(lab.modes)})")
    return 0


def cmd_packet_lab_run(args: argparse.Namespace) -> int:
    from kproxy.packetlab import find_lab
    from kproxy.packetlab.runner import run_lab

    lab = find_lab(args.name)
    cliargs.need_root()
    checking = args.packet_lab_command == "check"
    passed = run_lab(lab, existing=args.lab, mode=args.mode, overlay=args.overlay, task=not checking,
                     solve=not checking and args.solve, wait=not checking and not args.solve and sys.stdin.isatty())
    return 0 if passed else 1


def add_commands(sub: Any, lab_help: str) -> None:
    p = sub.add_parser("capture", help="capture packets at a pod, a node interface or the underlay: pcap or decoded",
                       description="Capture at POINT: a pod (its eth0), NODE or NODE:IFACE (cni0, flannel.1, "
                                   "flannel0, a veth), external, or underlay (br0). Without -w, one decoded line "
                                   "per packet, outer and inner headers. Examples: kproxy capture node1:flannel.1; "
                                   "kproxy capture underlay -w vxlan.pcap --count 20; "
                                   "wireshark -k -i <(kproxy capture web-1 -w -)")
    p.add_argument("point", help="POD, NODE[:IFACE], external or underlay")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.add_argument("-w", "--write", metavar="FILE", help="write a pcap file (- for stdout) instead of decoded lines")
    p.add_argument("--count", type=cliargs.COUNT, default=0, metavar="N", help="stop after N packets (default 0: no limit)")
    p.add_argument("--filter", metavar="BPF", help="a tcpdump filter expression, e.g. 'udp port 8472'")
    p.add_argument("--timeout", type=cliargs.SECONDS, metavar="SECONDS", help="stop after this long (default: Ctrl-C or --count)")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("trace", help="send one packet and follow it and its reply through every hop, rule and NAT",
                       description="Sends one crafted packet (a TCP SYN, or one UDP datagram) from SRC to DST and "
                                   "follows it and its reply through every namespace: each interface it crossed "
                                   "(outer | inner headers), where NAT rewrote it, the rules it met on each node "
                                   "(iptables TRACE, nftables nftrace, the IPVS connection) and the nodes' "
                                   "conntrack entries. It removes its trace rules when done, also on Ctrl-C. Exit "
                                   "1 when no answer came back. Examples: kproxy trace client web:80; kproxy trace "
                                   "external 172.18.0.3:30080; kproxy trace node1 kube-system/kube-dns:53 --json. "
                                   "docs/trace.md explains the output.")
    p.add_argument("source", metavar="SRC", help="a pod, a node, or external")
    p.add_argument("destination", metavar="DST", help="IP:PORT (a ClusterIP, external or load-balancer IP, a node's "
                                                      "NodePort, a pod) or [NAMESPACE/]SERVICE:PORT")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.add_argument("--proto", choices=("tcp", "udp"), help="the probe's protocol (default: the service port's, "
                                                           "else tcp)")
    p.add_argument("--json", action="store_true", help="the trace as JSON (docs/trace.md has its shape)")
    p.add_argument("--timeout", type=cliargs.SECONDS, default=2.0, metavar="SECONDS",
                   help="how long to wait for the answer (default 2)")
    p.set_defaults(func=cmd_trace)

    lab = sub.add_parser("packet-lab", help="packet-level exercises with scapy: list, run (--solve), check",
                         description="Each packet lab brings up the small lab it needs (or uses --lab), says what "
                                     "to do and where to look, runs its experiment and ends with PASS (exit 0) or "
                                     "FAIL (exit 1) from its own check of what the kernel did. docs/packet-labs/ "
                                     "has a page per lab.")
    lab_sub = lab.add_subparsers(dest="packet_lab_command", metavar="PACKET_LAB_COMMAND", required=True)
    p = lab_sub.add_parser("list", help="the packet labs, their overlays and modes")
    p.set_defaults(func=cmd_packet_lab_list)
    for command, text in (("run", "print the task, let you explore (Enter), then check; --solve shows the solution"),
                          ("check", "run the lab's experiment and report PASS or FAIL only")):
        p = lab_sub.add_parser(command, help=text)
        p.add_argument("name", help="a lab's name or number (kproxy packet-lab list)")
        p.add_argument("--lab", type=cliargs.LAB, help="run in this running lab instead of bringing one up")
        p.add_argument("--mode", choices=MODES, help="proxy mode of the lab brought up (default: the lab's first)")
        p.add_argument("--overlay", choices=OVERLAYS, help="overlay of the lab brought up (default: the lab's first)")
        if command == "run":
            p.add_argument("--solve", action="store_true", help="run the scripted solution, narrating every step")
        p.set_defaults(func=cmd_packet_lab_run)
