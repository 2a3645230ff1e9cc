"""Lab 6: a Service without endpoints refuses (REJECT, ICMP port unreachable); a Local-policy
NodePort on a node without a local endpoint drops (the client times out)."""

from __future__ import annotations

import os

from kproxy.packetlab import PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nothing-has-this-label}
  ports:
  - {port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports:
  - {port: 80, targetPort: 8080, nodePort: 30081}
"""


def experiment(s: Session) -> None:
    from scapy.layers.inet import ICMP, IP, TCP

    port = 40000 + os.getpid() % 20000
    vip = s.cluster_ip("nobody")
    s.show(f"A SYN from the client to Service nobody ({vip}:80), which selects no pod:")
    answer = s.answers("client", [IP(dst=vip) / TCP(sport=port, dport=80, flags="S")])
    s.show(f"    answer: {describe(answer[0]) if answer else 'none within 2 s'}")
    refused = bool(answer) and ICMP in answer[0] and (answer[0][ICMP].type, answer[0][ICMP].code) == (3, 3)
    s.expect("no endpoints: the node rejects with ICMP port unreachable (connection refused, at once)", refused,
             describe(answer[0]) if answer else "no answer")

    endpoint_node = s.node_of("web-1")
    other = next(n["name"] for n in s.info["nodes"] if n["name"] != endpoint_node)
    s.show(f"Service web-local is a NodePort with externalTrafficPolicy Local; its only pod runs on {endpoint_node}.")
    for node, port_offset in ((endpoint_node, 1), (other, 2)):
        syn = IP(dst=s.node_ip(node)) / TCP(sport=port + port_offset, dport=30081, flags="S")
        reply = s.answers("external", [syn])
        s.show(f"    external -> {node} {s.node_ip(node)}:30081: {describe(reply[0]) if reply else 'no answer (dropped)'}")
        if node == endpoint_node:
            s.expect(f"{node}, with a local endpoint, answers SYN-ACK",
                     bool(reply) and TCP in reply[0] and reply[0][TCP].flags == "SA",
                     describe(reply[0]) if reply else "no answer")
        else:
            s.expect(f"{node}, without a local endpoint, drops silently (the client times out)", not reply,
                     describe(reply[0]) if reply else "no answer within 2 s")
    s.show("A REJECT tells the client at once; a DROP keeps it waiting: with Local, the load balancer's health")
    s.show("check (healthCheckNodePort) is what keeps traffic away from the nodes that drop.")


LAB = PacketLab(
    number=6,
    title="No endpoints: REJECT versus a Local-policy DROP",
    manifests=SERVICES,
    modes=("iptables", "nftables"),
    task="""
Service nobody selects no pod. Service web-local is a NodePort (30081) with externalTrafficPolicy Local;
its only pod, web-1, runs on node2.

  kproxy exec --lab LAB client -- curl -sS --max-time 3 http://<nobody's ClusterIP>/   (connection refused)
  kproxy exec --lab LAB external -- curl -sS --max-time 3 http://<node1's IP>:30081/   (timeout)
  kproxy exec --lab LAB external -- curl -sS --max-time 3 http://<node2's IP>:30081/   (an answer)
  kproxy capture --lab LAB client                                                     (what comes back)
  kproxy rules --lab LAB node1                                                        (the rule that rejects)

Why does one fail at once and the other only after a timeout?
""",
    experiment=experiment,
)
