"""Lab 5: externalTrafficPolicy Cluster versus Local, from outside, on every node. Cluster: every node
answers and masquerades (the pod sees the node). Local: only the endpoint's node answers, and the pod
sees the client's own address; every other node drops, and its health check says so."""

from __future__ import annotations

import json

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: web-cluster}
spec:
  type: NodePort
  externalTrafficPolicy: Cluster
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30051}
---
apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  healthCheckNodePort: 30053
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30052}
"""
# Three nodes, the one endpoint in the middle: two nodes without it, one on each side.
TOPOLOGY = {
    "nodes": [{"name": "node1"}, {"name": "node2"}, {"name": "node3"}],
    "pods": [{"name": "web-1", "labels": {"app": "web"}, "nodeName": "node2"}],
}


def health(s: Session, member: str, ip: str, port: int) -> tuple[int, dict[str, object]]:
    """GET / on a healthCheckNodePort from member, as a load balancer asks: the status and the JSON body."""
    with s.socket_in(member) as sock:
        sock.settimeout(2.0)
        sock.connect((ip, port))
        sock.sendall(f"GET / HTTP/1.0\r\nHost: {ip}:{port}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def experiment(s: Session) -> None:
    from scapy.layers.l2 import Ether

    pod_ip, there, external = s.pod_ip("web-1"), s.node_of("web-1"), s.external_ip
    nodes = [str(n["name"]) for n in s.info["nodes"]]
    others = [n for n in nodes if n != there]
    s.show(f"web-1 ({pod_ip}) runs on {there}. The external client {external} connects to each node's "
           "NodePort of two Services that differ only in externalTrafficPolicy.")

    s.show()
    s.show(f"1. web-cluster (Cluster), NodePort {s.node_port('web-cluster')}:")
    seen: dict[str, tuple[str, str]] = {}  # node -> (the client web-1 saw, the address the node masquerades to)
    for node in nodes:
        answer = parse_answer(probe_tcp(s.ns("external"), s.node_ip(node), s.node_port("web-cluster")))
        seen[node] = (answer["client"].rsplit(":", 1)[0], s.source_toward(node, pod_ip))
        s.show(f"    via {node} {s.node_ip(node)}: {answer['pod']} saw {answer['client']}  "
               f"({node}'s address toward web-1: {seen[node][1]})")
    s.expect("Cluster: every node answers, and web-1 sees the node hit (masqueraded), never the client, "
             f"even via {there}, whose endpoint is local",
             all(client == masq != external for client, masq in seen.values()),
             ", ".join(f"{node}: {client}" for node, (client, _) in seen.items()))

    s.show()
    port = s.node_port("web-local")
    s.show(f"2. web-local (Local), NodePort {port}:")
    answer = parse_answer(probe_tcp(s.ns("external"), s.node_ip(there), port))
    s.show(f"    via {there} {s.node_ip(there)}: {answer['pod']} saw {answer['client']}")
    s.expect(f"Local via {there} (the endpoint's node): answered, and web-1 sees the client's own address",
             answer["client"].rsplit(":", 1)[0] == external, f"web-1 saw {answer['client']}")
    entries = s.run(there, "conntrack", "-L", "-p", "tcp", "--orig-port-dst", str(port), check=False).splitlines()
    s.show(f"    conntrack -L on {there}: {entries[0] if entries and entries[0].startswith('tcp') else '(none)'}")
    s.show("    (the reply tuple goes to the client itself: DNAT only, no SNAT)")
    node_macs = {n: s.run(n, "ip", "-o", "link", "show", "eth0").split("link/ether ")[1].split()[0] for n in nodes}
    dropped: dict[str, str] = {}
    for node in others:
        with s.sniff("underlay", "br0", bpf="ip") as wire:
            try:
                result = f"answered: {probe_tcp(s.ns('external'), s.node_ip(node), port)}"
            except OSError as error:
                result = f"no answer ({type(error).__name__})"
        sent = [p for p in wire.packets if Ether in p and p[Ether].src in node_macs.values()]
        dropped[node] = result + (f"; sent {'; '.join(describe(p) for p in sent[:2])}" if sent else "")
        s.show(f"    via {node} {s.node_ip(node)}: {result}; the client's SYNs on the underlay: "
               f"{len(wire.packets) - len(sent)}, frames any node sent meanwhile: {len(sent)}")
        s.expect(f"Local via {node} (no local endpoint): dropped; {node} sends nothing at all (no SYN-ACK, no "
                 "RST, no ICMP, nothing forwarded to web-1)",
                 result.startswith("no answer") and not sent and len(wire.packets) > 0, dropped[node])

    s.show()
    check = 30053
    s.show(f"3. web-local's healthCheckNodePort {check} on each node, as a load balancer polls it:")
    verdicts = {}
    for node in nodes:
        status, body = health(s, "external", s.node_ip(node), check)
        verdicts[node] = (status, body.get("localEndpoints"))
        s.show(f"    {node}: HTTP {status}, localEndpoints {body.get('localEndpoints')}")
    s.expect(f"the health check fails (503, localEndpoints 0) on exactly the nodes that drop ({', '.join(others)}); "
             f"200 with localEndpoints 1 on {there}",
             verdicts[there] == (200, 1) and all(verdicts[n] == (503, 0) for n in others),
             ", ".join(f"{n}: {status}/{count}" for n, (status, count) in verdicts.items()))
    s.show("Cluster spreads traffic over every node at the cost of the client's address (and a second hop);")
    s.show("Local keeps the address and the hop short, and relies on the load balancer's health checks to send")
    s.show("nothing to the nodes that would drop it.")


LAB = PacketLab(
    number=5,
    title="externalTrafficPolicy: Cluster versus Local",
    manifests=SERVICES,
    topology=TOPOLOGY,
    # ipvs: a Local policy without a local endpoint falls back to the cluster's endpoints, unmasqueraded
    # (kube-proxy PR 97081; kproxy.proxy.ipvs.render): no silent drop to show. userspace: its proxy
    # connects from the node, whatever the policy.
    modes=("iptables", "nftables"),
    task="""
Three nodes; web-1, the one endpoint, runs on node2. web-cluster (NodePort 30051) has
externalTrafficPolicy Cluster; web-local (a LoadBalancer, NodePort 30052, healthCheckNodePort 30053)
has Local. From the external client, connect to each node's NodePort of each:

  kproxy exec --lab LAB external -- curl -s --max-time 2 http://<nodeN's IP>:30051/   (which client?)
  kproxy exec --lab LAB external -- curl -s --max-time 2 http://<nodeN's IP>:30052/
  kproxy exec --lab LAB external -- curl -s http://<nodeN's IP>:30053/                 (the health check)
  kproxy capture --lab LAB underlay --filter ip                                       (who sends what)
  kproxy rules --lab LAB node1 --service web-local                                    (why it drops)

Which address does web-1 see under each policy, via each node? Which nodes answer web-local, and what
does a node without a local endpoint send back? How would a load balancer know to avoid it?
""",
    experiment=experiment,
)
