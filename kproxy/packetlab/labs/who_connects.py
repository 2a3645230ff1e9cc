"""Lab 11: the same request through userspace, iptables, nftables and IPVS: who opens the connection
to the pod, and which source address the pod sees."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path

from kproxy.lab.probe import parse_answer
from kproxy.packetlab import SMALL_TOPOLOGY, WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe

WAIT = 3.0  # seconds for the connection to reach the pod (a userspace proxy dials after it accepts)


def sockets_to(s: Session, node: str, ip: str, port: int) -> list[str]:
    """node's TCP sockets connected to ip:port, with their process (ss -tnp)."""
    listed = s.run(node, "ss", "-Htnp", "dst", f"{ip}:{port}")
    return [" ".join(line.split()) for line in listed.splitlines() if line.strip()]


def process_of(socket_line: str) -> str:
    """The command line of the process owning a socket in ss -p's output ("" if none shows)."""
    if "pid=" not in socket_line:
        return ""
    pid = socket_line.split("pid=", 1)[1].split(",", 1)[0]
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def experiment(s: Session) -> None:
    from scapy.layers.inet import IP, TCP

    vip, client_ip, node = s.cluster_ip("web"), s.pod_ip("client"), s.node_of("client")
    endpoints = s.pods_labelled("app", "web")
    s.show(f"{s.mode} mode. The client {client_ip} ({node}) connects to {vip}:80 and holds the connection open; "
           + ", ".join(f"{pod} {s.pod_ip(pod)}:8080 runs on {s.node_of(pod)}" for pod in endpoints) + ".")
    syn = "tcp dst port 8080 and tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0"
    with s.socket_in("client") as conn:
        conn.settimeout(WAIT)
        with ExitStack() as sniffing:
            sniffers = {pod: sniffing.enter_context(s.sniff(pod, bpf=syn)) for pod in endpoints}
            conn.connect((vip, 80))
            client_port = conn.getsockname()[1]
            deadline = time.monotonic() + WAIT  # until a pod's SYN shows (a sniffer reads in a thread)
            while not any(sniffer.packets for sniffer in sniffers.values()) and time.monotonic() < deadline:
                time.sleep(0.02)
            pod = next((pod for pod, sniffer in sniffers.items() if sniffer.packets), endpoints[0])
            pod_ip, arriving = s.pod_ip(pod), sniffers[pod]
            # Read the node at once: the pod's workload answers on its own after a second without a request.
            on_node = sockets_to(s, node, pod_ip, 8080)
            tracked = [line for line in s.run(node, "conntrack", "-L", "-p", "tcp").splitlines()
                       if f"dst={vip} " in line or f"dst={pod_ip} " in line]
        s.show(f"The client's socket: {client_ip}:{client_port} -> {vip}:80. The SYN arriving at {pod}'s eth0:")
        for packet in arriving.packets or ["(none)"]:
            s.show(f"    {packet if isinstance(packet, str) else describe(packet)}")
        s.show(f"Sockets on {node} connected to the pod (ss -tnp dst {pod_ip}:8080):")
        for line in on_node or ["(none: no process on the node takes part)"]:
            s.show(f"    {line}")
        s.show(f"conntrack -L on {node}, the entries to the ClusterIP or the pod:")
        for line in tracked or ["(none)"]:
            s.show(f"    {line}")
        # No request is sent: the workload answers whatever arrived once a second has passed without
        # a full request, so nothing changed the connection while the node was read.
        conn.settimeout(WAIT + 2)
        raw = b""
        while chunk := conn.recv(4096):
            raw += chunk
    body = raw.partition(b"\r\n\r\n")[2].decode(errors="replace").strip()
    answer = parse_answer(body) if body.startswith("pod=") else {}
    s.show(f"{pod}'s answer: {body or 'none'}")

    syns = [p for p in arriving.packets if IP in p and TCP in p]
    seen = f"{syns[0][IP].src}:{syns[0][TCP].sport}" if syns else ""
    if s.proxy.relays:
        route = s.route_to(node, pod_ip)
        own, device = str(route["prefsrc"]), route.get("dev", "?")
        s.show(f"The proxy on {node} dialled the pod from {own}, the source {node}'s route to {pod_ip} picks "
               f"(dev {device} on {s.overlay}):")
        s.show("the pod never learns the client's address, and every client of this node looks the same to it.")
        s.expect(f"the pod sees {node}'s own address ({own}), not the client's ({client_ip})",
                 bool(syns) and syns[0][IP].src == own and answer.get("client") == seen,
                 f"SYN from {seen or 'nowhere'}, answer says client={answer.get('client')}")
        dialler = [line for line in on_node if f"{own}:{syns[0][TCP].sport} " in line] if syns else []
        owner = process_of(dialler[0]) if dialler else ""
        s.expect(f"a socket on {node}, the kproxy agent's (its userspace proxy), opened that connection",
                 "kproxy.agent" in owner and f"--node {node}" in owner,
                 f"{dialler[0]}: {owner}" if dialler else "; ".join(on_node) or "no socket on the node")
        to_proxy = [line for line in tracked if f"src={client_ip} dst={vip} sport={client_port} dport=80 " in line]
        to_pod = [line for line in tracked if syns and f"dst={pod_ip} sport={syns[0][TCP].sport} dport=8080 " in line]
        redirected = bool(to_proxy) and f"src={pod_ip}" not in to_proxy[0] and f"dst={client_ip} " in to_proxy[0]
        s.expect(f"two connections, two entries on {node}: the client's ends at the proxy (REDIRECT, no pod in it), "
                 "the proxy's own goes to the pod (no NAT)",
                 len(to_proxy) == 1 and redirected and len(to_pod) == 1 and f"src={own} " in to_pod[0]
                 and f"src={pod_ip} dst={own} sport=8080 " in to_pod[0],
                 f"{len(to_proxy)} entry client->ClusterIP, {len(to_pod)} proxy->pod")
        return

    s.expect("the pod sees the client's own address and port",
             bool(syns) and seen == f"{client_ip}:{client_port}" and answer.get("client") == seen,
             f"SYN from {seen or 'nowhere'}, answer says client={answer.get('client')}")
    s.expect(f"no socket on {node} takes part: the kernel rewrites and forwards the client's own packets",
             not on_node, "; ".join(on_node) or "no socket to the pod on the node")
    mine = [line for line in tracked if f"sport={client_port} " in line]
    # A second connection would be an entry whose original direction goes to the pod itself.
    second = [line for line in tracked if f"dst={pod_ip} " in line.split(" src=")[1]]
    s.expect(f"one connection, one entry on {node}: original to the ClusterIP, reply from the pod; none to the pod",
             len(mine) == 1 and f"src={client_ip} dst={vip} sport={client_port} dport=80 " in mine[0]
             and f"src={pod_ip} dst={client_ip} sport=8080 dport={client_port} " in mine[0] and not second,
             f"{len(mine)} entries for the client's port" + (f"; to the pod: {'; '.join(second)}" if second else "")
             + (f": {mine[0]}" if len(mine) == 1 else ""))


LAB = PacketLab(
    number=11,
    title="Who connects to the pod: userspace against the kernel modes",
    manifests=WEB_SERVICE,
    topology=SMALL_TOPOLOGY,
    modes=("userspace", "iptables", "nftables", "ipvs"),
    task="""
Service web has one endpoint, web-1 on node2; the client runs on node1. Run this lab once per mode
(--mode userspace, iptables, nftables, ipvs). Hold one connection open and look on both ends:

  kproxy exec --lab LAB client -- python3 -c 'import socket,time; s=socket.create_connection(("<ClusterIP>",80)); time.sleep(60)'
  kproxy exec --lab LAB node1 -- ss -tnp                 (is a process on the node part of it?)
  kproxy exec --lab LAB node1 -- conntrack -L -p tcp     (one entry or two?)
  kproxy exec --lab LAB web-1 -- ss -tn                  (whom does the pod think it talks to?)
  kproxy exec --lab LAB client -- curl -s http://<ClusterIP>/   (the answer names the client the pod saw)

Which address does the pod see as its client in each mode, and why can a pod behind a userspace
proxy not tell its clients apart?
""",
    experiment=experiment,
)
