"""Lab 7: sessionAffinity ClientIP: each client sticks to the endpoint its first connection got, and
the memory of it lives on the client's own node (iptables recent lists, nftables affinity sets with
timeouts, IPVS persistence templates, the userspace proxy's table)."""

from __future__ import annotations

import textwrap

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import PacketLab
from kproxy.packetlab.session import Session, kproxy
from kproxy.proxy.mode import Affinity, Remembered

TIMEOUT = 600  # sessionAffinityConfig.clientIP.timeoutSeconds (Kubernetes' default is 10800)
SERVICE = f"""
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {TIMEOUT}}}}}
  ports:
  - {{port: 80, targetPort: 8080}}
"""
# Three endpoints and twelve clients, six on each node. Each client's first connection picks an
# endpoint at random, so all twelve land on one endpoint with probability 3 * (1/3)**12 = 5.6e-6:
# the claim that the clients spread fails falsely that rarely (userspace and IPVS rr: never).
ENDPOINTS = {"web-1": "node2", "web-2": "node1", "web-3": "node2"}
CLIENTS = {f"client-{i}": "node1" if i <= 6 else "node2" for i in range(1, 13)}  # name: node
# Connections per client; at most 20 (xt_recent's ip_pkt_list_tot), so every SYN shows in the
# recent list as one timestamp.
CONNECTIONS = 8
TOPOLOGY = {
    "nodes": [{"name": "node1", "labels": {"zone": "a"}}, {"name": "node2", "labels": {"zone": "b"}}],
    "pods": [{"name": name, "labels": {"app": "web"}, "nodeName": node} for name, node in ENDPOINTS.items()]
    + [{"name": name, "labels": {"app": "client"}, "nodeName": node} for name, node in CLIENTS.items()],
}


def affinity_records(s: Session, node: str, affinity: Affinity, endpoints: list[str]) -> dict[str, list[Remembered]]:
    """What node remembers of the endpoints' clients: client IP -> one record per list, set or template."""
    ips = {s.pod_ip(pod) for pod in endpoints}
    records: dict[str, list[Remembered]] = {}
    for record in affinity.read(lambda *argv: s.run(node, *argv)):
        if record.endpoint.rsplit(":", 1)[0] in ips:
            records.setdefault(record.client, []).append(record)
    return records


def pod_of(s: Session, record: Remembered) -> str:
    ip = record.endpoint.rsplit(":", 1)[0]
    return s.pod_at(ip) or ip


def experiment(s: Session) -> None:
    vip, endpoints = s.cluster_ip("web"), s.pods_labelled("app", "web")
    s.show(f"Service web ({vip}:80), sessionAffinity ClientIP for {TIMEOUT} s, endpoints "
           + ", ".join(f"{pod} {s.pod_ip(pod)} ({s.node_of(pod)})" for pod in endpoints) + ".")
    s.show(f"{len(CLIENTS)} clients make {CONNECTIONS} connections each, one client after the other:")
    got = {client: [parse_answer(probe_tcp(s.ns(client), vip, 80))["pod"] for _ in range(CONNECTIONS)]
           for client in CLIENTS}
    for client, pods in got.items():
        s.show(f"    {client:9} {s.pod_ip(client):11} on {s.node_of(client)}: "
               + ", ".join(f"{pod} x{pods.count(pod)}" for pod in sorted(set(pods))))
    stuck = {client: pods[0] for client, pods in got.items() if len(set(pods)) == 1}
    loose = [f"{client}: {', '.join(pods)}" for client, pods in got.items() if client not in stuck]
    s.expect(f"each client's {CONNECTIONS} connections all went to one endpoint, the one its first got",
             not loose, "; ".join(loose) or f"all {len(CLIENTS)} clients stuck")
    served = {pod: sorted((c for c, p in stuck.items() if p == pod), key=lambda c: int(c.split("-")[1]))
              for pod in endpoints}
    mapping = "; ".join(f"{pod}: {', '.join(clients) or 'nobody'}" for pod, clients in served.items())
    s.expect("affinity is per client, not per Service: the clients are spread over more than one endpoint",
             sum(1 for clients in served.values() if clients) >= 2, mapping)

    affinity = s.proxy.affinity
    if affinity is None:
        node = s.node_of(next(iter(CLIENTS)))
        rules = kproxy("rules", "--lab", s.lab, node, "--service", "web")
        portal = [line for line in rules.splitlines() if "KUBE-PORTALS-CONTAINER" in line and "-A " in line]
        s.show(f"{node}'s portal for web:")
        for line in portal:
            s.show(f"    {line}")
        s.show("The kernel only redirects to the proxy on the client's node; the proxy remembers each client")
        s.show("address (here the client pod's own: the proxy accepted its connection) and dials the same endpoint.")
        s.expect("the kernel keeps no affinity: the portal is a plain REDIRECT (no recent match, no set)",
                 len(portal) == 1 and "REDIRECT" in portal[0] and "recent" not in rules and "affinity" not in rules,
                 "; ".join(portal) or "no portal rule")
        return

    records = {node: affinity_records(s, node, affinity, endpoints)
               for node in sorted({s.node_of(client) for client in CLIENTS})}
    for node, held in records.items():
        s.show(f"{node} remembers, in {affinity.where}:")
        for ip, entries in sorted(held.items(), key=lambda item: tuple(int(x) for x in item[0].split("."))):
            s.show(f"    {ip:11} ({s.pod_at(ip)}) -> " + "; ".join(f"{pod_of(s, r)} [{r.detail}]" for r in entries))
    wrong, leaked = [], []
    for client in CLIENTS:
        node, ip = s.node_of(client), s.pod_ip(client)
        mine = records[node].get(ip, [])
        if [pod_of(s, r) for r in mine] != [stuck.get(client)]:
            wrong.append(f"{client} on {node}: {', '.join(pod_of(s, r) for r in mine) or 'no record'} "
                         f"(answered by {stuck.get(client)})")
        elif mine[0].hits is not None and mine[0].hits != CONNECTIONS:
            wrong.append(f"{client}: {mine[0].detail}, not {CONNECTIONS} hits")
        elif mine[0].hits is None and not (0 < (mine[0].seconds_left or 0) <= TIMEOUT
                                          and mine[0].timeout in (None, TIMEOUT)):
            wrong.append(f"{client}: {mine[0].detail}, not within the {TIMEOUT} s timeout")
        leaked += [f"{client} ({node}) also on {other}" for other, held in records.items()
                   if other != node and ip in held]
    counted = any(r.hits is not None for held in records.values() for entries in held.values() for r in entries)
    detail = "one hit per SYN" if counted else f"at most {TIMEOUT} s left"
    s.expect(f"each client's node records it under exactly the endpoint that answered ({detail})", not wrong,
             "; ".join(wrong) or f"{len(CLIENTS)} clients recorded as answered")
    s.expect("affinity is per node: a node holds no record of another node's clients", not leaked,
             "; ".join(leaked) or "no client recorded on another node")
    for line in textwrap.wrap(affinity.how, 100):
        s.show(line)


LAB = PacketLab(
    number=7,
    title="Session affinity: each client sticks to its endpoint",
    manifests=SERVICE,
    topology=TOPOLOGY,
    modes=("iptables", "nftables", "userspace", "ipvs"),
    task="""
Service web has sessionAffinity ClientIP (timeoutSeconds 600) and three endpoints: web-1 and web-3 on
node2, web-2 on node1. Twelve clients, client-1..6 on node1 and client-7..12 on node2:

  kproxy exec --lab LAB client-1 -- curl -s http://<web's ClusterIP>/      (several times; then client-2, ...)
  kproxy rules --lab LAB node1 --service web              (the recent --rcheck rules, or the affinity sets)
  kproxy exec --lab LAB node1 -- sh -c 'head /proc/net/xt_recent/*'        (iptables mode)
  kproxy exec --lab LAB node1 -- nft list sets ip                          (nftables mode)
  kproxy exec --lab LAB node1 -- ipvsadm -Lnc                              (ipvs mode)

Which endpoint does each client keep getting? Where is the client remembered, with which timeout,
and does node2 know about node1's clients?
""",
    experiment=experiment,
)
