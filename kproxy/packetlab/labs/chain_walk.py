"""Lab 12: one connection's first packet through KUBE-SERVICES -> KUBE-SVC-* -> KUBE-SEP-*, read from the
counters that moved."""

from __future__ import annotations

import re

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import SMALL_TOPOLOGY, WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session, kproxy

TOPOLOGY = {**SMALL_TOPOLOGY,
            "pods": [*SMALL_TOPOLOGY["pods"], {"name": "web-2", "labels": {"app": "web"}, "nodeName": "node1"}]}
COUNTED = re.compile(r"^\[(\d+):\d+\] (-A \S+ .*)$")


def counters(s: Session, node: str) -> dict[str, int]:
    """Each of the Service's nat rules on node ("-A CHAIN ...") with its packet count."""
    saved = kproxy("rules", "--lab", s.lab, node, "--service", "web")
    return {m.group(2): int(m.group(1)) for line in saved.splitlines() if (m := COUNTED.match(line))}


def experiment(s: Session) -> None:
    node = s.node_of("client")
    vip = s.cluster_ip("web")
    before = counters(s, node)
    answer = parse_answer(probe_tcp(s.ns("client"), vip, 80))
    after = counters(s, node)
    walk = ("-A KUBE-SERVICES ", "-A KUBE-SVC-", "-A KUBE-SEP-")  # the order a packet meets them
    moved = sorted((rule for rule, packets in after.items() if packets > before.get(rule, 0)),
                   key=lambda rule: next((i for i, head in enumerate(walk) if rule.startswith(head)), len(walk)))
    s.show(f"One connection from the client to {vip}:80 (answered by {answer['pod']}); "
           f"on {node}, the rules whose packet counter moved:")
    for rule in moved:
        s.show(f"    +{after[rule] - before.get(rule, 0)}  {rule}")
    s.show("Only a connection's first packet walks the nat chains; conntrack handles the rest.")
    entry = [r for r in moved if r.startswith("-A KUBE-SERVICES ")]
    service_chain = [r for r in moved if r.startswith("-A KUBE-SVC-")]
    endpoint = [r for r in moved if r.startswith("-A KUBE-SEP-") and "DNAT" in r]
    pod_ip = s.pod_ip(answer["pod"])
    s.expect("KUBE-SERVICES matched the ClusterIP and jumped to the Service's chain",
             len(entry) == 1 and f"-d {vip}/32" in entry[0] and "-j KUBE-SVC-" in entry[0], "; ".join(entry) or "none")
    s.expect("in KUBE-SVC-*, one endpoint rule chose a KUBE-SEP-* chain (no masquerade mark: the client is a pod)",
             len(service_chain) == 1 and "-j KUBE-SEP-" in service_chain[0], "; ".join(service_chain) or "none")
    s.expect(f"the KUBE-SEP-* chain DNATed to the pod that answered ({answer['pod']}, {pod_ip}:8080)",
             len(endpoint) == 1 and f"--to-destination {pod_ip}:8080" in endpoint[0], "; ".join(endpoint) or "none")


LAB = PacketLab(
    number=12,
    title="A chain walk with the counters that moved",
    manifests=WEB_SERVICE,
    topology=TOPOLOGY,
    modes=("iptables",),
    task="""
Service web has two endpoints, web-1 (node2) and web-2 (node1). Read node1's rules with their
[packets:bytes] counters, make one connection from the client, and read them again:

  kproxy rules --lab LAB node1 --service web
  kproxy exec --lab LAB client -- curl -s http://<web's ClusterIP>/
  kproxy rules --lab LAB node1 --service web

Follow the packet: KUBE-SERVICES -> KUBE-SVC-... (which statistic rule?) -> KUBE-SEP-... (which DNAT?).
Why did the KUBE-MARK-MASQ rule in KUBE-SVC-... not move? Make a second connection: do the counters move again?
""",
    experiment=experiment,
)
