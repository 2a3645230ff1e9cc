"""Lab 10: a UDP client that keeps its source port across an endpoint change: the agent deletes the
conntrack entry that still points at the gone pod, so the next datagram is NATed to the new one."""

from __future__ import annotations

import os
import socket

from kproxy.errors import KproxyError
from kproxy.lab.probe import parse_answer
from kproxy.packetlab import SMALL_TOPOLOGY, PacketLab
from kproxy.packetlab.session import Session, kproxy
from kproxy.packets.decode import describe

LABEL = "stale-udp-lab"  # the endpoints' label: only this lab's own pods carry it
SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: echo}}
spec:
  selector: {{app: {LABEL}}}
  ports:
  - {{protocol: UDP, port: 53, targetPort: 8080}}
"""
OLD, NEW = "udp-echo-1", "udp-echo-2"  # the endpoint before and after; the experiment makes both
TOPOLOGY = {**SMALL_TOPOLOGY, "pods": [p for p in SMALL_TOPOLOGY["pods"] if p["name"] == "client"]}


def pod_yaml(name: str, node: str) -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {LABEL}}}}}
spec:
  nodeName: {node}
  containers:
  - {{name: c}}
"""


ANSWER_WAIT = 1.0  # seconds for one datagram's answer before it is sent again (the udp overlay copies in user space)


def ask(sock: socket.socket, vip: str, port: int, tries: int = 3) -> str | None:
    """A datagram to the Service from the client's socket, sent up to tries times; the first answer
    line, or None. The socket is not connected, so a rejection (ICMP port unreachable) is no answer."""
    sock.settimeout(ANSWER_WAIT)
    for _ in range(tries):
        sock.sendto(b"kproxy packet lab\n", (vip, port))
        try:
            data, _ = sock.recvfrom(2048)
        except TimeoutError:
            continue
        return data.decode(errors="replace").strip()
    return None


def entries(s: Session, node: str, sport: int) -> list[str]:
    """node's conntrack entries of the client's UDP source port."""
    listed = s.run(node, "conntrack", "-L", "-p", "udp", "--orig-port-src", str(sport), check=False)
    return [line for line in listed.splitlines() if line.startswith("udp ")]


def expect_entry(s: Session, node: str, sport: int, client: str, service: str, pod: str, pod_ip: str,
                 heading: str, claim: str) -> None:
    """Show node's conntrack entries of sport and claim there is one: client -> service, NATed to pod."""
    found = entries(s, node, sport)
    s.show(heading)
    for line in found or ["(none)"]:
        s.show(f"    {line}")
    (client_ip, client_port), (vip, port) = client.split(":"), service.split(":")
    s.expect(claim, len(found) == 1 and f"src={client_ip} dst={vip} sport={client_port} dport={port}" in found[0]
             and f"src={pod_ip} dst={client_ip} sport=8080 dport={client_port}" in found[0],
             found[0] if len(found) == 1 else f"{len(found)} entries")


def remove_own_pods(s: Session) -> None:
    """Delete the lab's endpoint pods that exist (leftovers of a learner following the task, or of this
    run); a pod of that name without the lab's label is someone else's, and the lab refuses to touch it."""
    s.reload()
    for pod in (OLD, NEW):
        found = next((p for p in s.info["pods"] if p["name"] == pod), None)
        if found is None:
            continue
        if found["labels"].get("app") != LABEL:
            raise KproxyError(f"lab {s.lab} has a pod {pod} of its own; packet lab stale-udp makes one of that "
                              "name (run it in its own lab: leave out --lab)")
        kproxy("delete", "--lab", s.lab, "pod", pod, "--grace-period", "0")


def experiment(s: Session) -> None:
    remove_own_pods(s)
    try:
        replace_endpoint(s)
    finally:
        remove_own_pods(s)


def replace_endpoint(s: Session) -> None:
    from scapy.layers.inet import ICMP, UDPerror

    vip, port, node = s.cluster_ip("echo"), 53, s.node_of("client")
    far = next(n["name"] for n in s.info["nodes"] if n["name"] != node)  # the endpoint runs across the overlay
    kproxy("apply", "--lab", s.lab, "-f", "-", stdin=pod_yaml(OLD, far))
    s.reload()
    old_ip, client_ip = s.pod_ip(OLD), s.pod_ip("client")
    sport = 40000 + os.getpid() % 20000
    s.show(f"Service echo: {vip}:{port}/udp -> {OLD} {old_ip}:8080 on {far}. The client ({node}) keeps one "
           f"socket, bound to port {sport}, and never changes it.")
    with s.socket_in("client", socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", sport))
        first = ask(sock, vip, port)
        s.show(f"datagram 1: {first or 'no answer'}")
        expect_entry(s, node, sport, f"{client_ip}:{sport}", f"{vip}:{port}", OLD, old_ip,
                     f"conntrack on {node}, where the DNAT happened:",
                     f"{node}'s entry for source port {sport}: to the ClusterIP, NATed to {OLD}")

        s.show(f"kproxy delete pod {OLD} --grace-period 0 (it returns once every agent has synced):")
        kproxy("delete", "--lab", s.lab, "pod", OLD, "--grace-period", "0")
        gone = entries(s, node, sport)
        s.show(f"conntrack on {node} now: {gone[0] if gone else '(no entry for the port)'}")
        s.show("The agent deleted it with what kube-proxy runs when a UDP endpoint goes away:")
        s.show(f"    conntrack -D --orig-dst {vip} --dst-nat {old_ip} -p udp")
        s.show("UDP has no teardown: left alone, the entry would keep NATing this port's datagrams to")
        s.show(f"{old_ip} for as long as the client kept sending (each datagram refreshes its timeout).")
        s.expect(f"the sync that removed {OLD} deleted {node}'s entry at once (its UDP timeout is 30-120 s)",
                 not gone, gone[0] if gone else "no entry for the port")
        with s.sniff("client", bpf="icmp") as back:
            meanwhile = ask(sock, vip, port, tries=1)  # the ICMP comes at once; the answer should not
        s.show(f"datagram 2, while echo has no endpoint: {meanwhile or 'no answer'}; what came back:")
        for packet in back.packets or ["(nothing)"]:
            s.show(f"    {packet if isinstance(packet, str) else describe(packet)}")
        refused = [p for p in back.packets if ICMP in p and (p[ICMP].type, p[ICMP].code) == (3, 3)
                   and UDPerror in p and p[UDPerror].sport == sport]
        s.expect("while echo has no endpoint, the node rejects the datagram (ICMP port unreachable)",
                 meanwhile is None and bool(refused),
                 describe(refused[0]) if refused else meanwhile or f"{len(back.packets)} ICMP packets, none for it")

        s.show(f"kproxy apply: a new pod {NEW} on {far} with the same label:")
        kproxy("apply", "--lab", s.lab, "-f", "-", stdin=pod_yaml(NEW, far))
        s.reload()
        new_ip = s.pod_ip(NEW)
        last = ask(sock, vip, port)
        s.show(f"datagram 3, from the same port {sport}: {last or 'no answer'}")
        answered = parse_answer(last) if last and last.startswith("pod=") else {}
        s.expect(f"the same source port {sport} is now answered by the new endpoint {NEW} ({new_ip})",
                 answered.get("pod") == NEW and answered.get("client") == f"{client_ip}:{sport}",
                 last or "no answer")
        expect_entry(s, node, sport, f"{client_ip}:{sport}", f"{vip}:{port}", NEW, new_ip, f"conntrack on {node}:",
                     f"{node}'s new entry for port {sport}: the same original tuple, NATed to {NEW}")


LAB = PacketLab(
    number=10,
    title="Stale UDP conntrack: an endpoint change under a client that keeps its port",
    manifests=SERVICE,
    topology=TOPOLOGY,
    # userspace NATs nothing in the kernel (its proxy keeps a UDP association per client): no
    # conntrack entry to go stale.
    modes=("iptables", "nftables", "ipvs"),
    task="""
Service echo is UDP (port 53 -> 8080) and selects app=stale-udp-lab; the client runs on node1. Give it
an endpoint, send from one fixed source port, replace the endpoint, and send again from that port:

  echo '{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "udp-echo-1", "labels": {"app": "stale-udp-lab"}},
        "spec": {"nodeName": "node2", "containers": [{"name": "c"}]}}' | kproxy apply --lab LAB -f -
  kproxy exec --lab LAB client -- python3 -c 'import socket; s = socket.socket(2, 2); s.bind(("", 40053));
        s.settimeout(2); s.sendto(b"hi", ("<echo ClusterIP>", 53)); print(s.recv(99))'
  kproxy exec --lab LAB node1 -- conntrack -L -p udp --orig-port-src 40053
  kproxy delete --lab LAB pod udp-echo-1 --grace-period 0
  kproxy exec --lab LAB node1 -- conntrack -L -p udp --orig-port-src 40053
  (the same pod as udp-echo-2, then the same datagram again, and conntrack -L again)

What did the entry say before the delete, who removed it, and what would the client's datagrams do
if it had stayed? (The check makes and removes udp-echo-1 and -2 itself; yours go first.)
""",
    experiment=experiment,
)
