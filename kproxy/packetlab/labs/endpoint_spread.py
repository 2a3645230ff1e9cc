"""Lab 9: how the kernel picks an endpoint: iptables' cascade of `statistic` rules against nftables'
one `numgen` draw, 1,000 connections against the uniform distribution (a chi-square check)."""

from __future__ import annotations

import math
import re

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.packetlab import WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session, kproxy

ENDPOINTS = {"web-1": "node2", "web-2": "node1", "web-3": "node2", "web-4": "node1"}
TOPOLOGY = {
    "nodes": [{"name": "node1", "labels": {"zone": "a"}}, {"name": "node2", "labels": {"zone": "b"}}],
    "pods": [{"name": "client", "labels": {"app": "client"}, "nodeName": "node1"}]
    + [{"name": name, "labels": {"app": "web"}, "nodeName": node} for name, node in ENDPOINTS.items()],
}
CONNECTIONS = 1000
# The chance that the check fails although the kernel picks uniformly. The chi-square tail is only
# asymptotic: for 1,000 draws over 4 endpoints its 1e-4 quantile (21.108) has an exact multinomial
# tail of 1.0006e-4 (all count vectors within 100..400 enumerated), so the lab asks for 1e-5:
# critical value 25.902, exact tail 1.012e-5, well under 1e-4.
ALPHA = 1e-5
SVC_RULE = re.compile(r"^\[(\d+):\d+\] -A KUBE-SVC-\S+ .*--comment \"default/web:http -> ([\d.]+):\d+\"(.*)-j KUBE-SEP-")


def chi2_survival(x: float, df: int) -> float:
    """P(X > x) for X chi-square with df (a whole number) degrees of freedom, in closed form
    (Abramowitz & Stegun 26.4.4 and 26.4.5): no scipy needed."""
    half = x / 2
    if df % 2 == 0:
        return math.exp(-half) * sum(half**i / math.factorial(i) for i in range(df // 2))
    term, total = math.sqrt(2 * x / math.pi) * math.exp(-half), 0.0
    for i in range(1, (df + 1) // 2):
        total += term
        term *= x / (2 * i + 1)
    return math.erfc(math.sqrt(half)) + total


def chi2_critical(alpha: float, df: int) -> float:
    """The x with P(X > x) = alpha, by bisection (the survival function falls monotonically)."""
    low, high = 0.0, 1000.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if chi2_survival(middle, df) > alpha else (low, middle)
    return high


def cascade(s: Session, node: str) -> list[tuple[str, float | None, int]]:
    """node's KUBE-SVC-* endpoint rules in order: (endpoint IP, statistic probability or None, packets)."""
    rules = kproxy("rules", "--lab", s.lab, node, "--service", "web").splitlines()
    found = []
    for line in rules:
        if m := SVC_RULE.match(line):
            probability = re.search(r"--probability ([\d.]+)", m.group(3))
            found.append((m.group(2), float(probability.group(1)) if probability else None, int(m.group(1))))
    return found


def experiment(s: Session) -> None:
    vip, pods, node = s.cluster_ip("web"), s.pods_labelled("app", "web"), s.node_of("client")
    s.show(f"Service web ({vip}:80) over {len(pods)} endpoints: "
           + ", ".join(f"{pod} {s.pod_ip(pod)} ({s.node_of(pod)})" for pod in pods)
           + f"; the client on {node}, where the choice is made.")
    before = cascade(s, node)  # empty where the rules draw once (nftables' numgen)
    answered = [parse_answer(probe_tcp(s.ns("client"), vip, 80))["pod"] for _ in range(CONNECTIONS)]
    counts = {pod: answered.count(pod) for pod in pods}
    strangers = sorted(set(answered) - set(pods))
    s.expect(f"all {CONNECTIONS} connections were answered by the Service's endpoints",
             len(answered) == CONNECTIONS and not strangers,
             f"{len(answered)} answers" + (f", also from {', '.join(strangers)}" if strangers else ""))

    if before:
        # The cascade: rule i sees what the rules before it left and takes 1/(n-i) of it; the last takes the rest.
        after = cascade(s, node)
        moved = [(ip, probability, packets - old) for (ip, probability, packets), (_, _, old) in zip(after, before)]
        s.show(f"KUBE-SVC-* on {node}: how far each rule's packet counter moved in the {CONNECTIONS} connections:")
        s.show("    rule to             probability  reached  taken  taken/reached")
        reached = CONNECTIONS
        for ip, probability, taken in moved:
            s.show(f"    {s.pod_at(ip) or ip:6} {ip:11}  {'rest' if probability is None else f'{probability:.4f}':>10}"
                   f"    {reached:5}  {taken:5}  {taken / reached if reached else 0:.3f}")
            reached -= taken
        seen = [1.0 if probability is None else round(probability, 4) for _, probability, _ in moved]
        wanted = [round(1 / (len(pods) - i), 4) for i in range(len(pods))]
        s.expect(f"the cascade's probabilities are 1/{len(pods)}, 1/{len(pods) - 1}, ..., 1/2, then the last rule "
                 "takes the rest: each endpoint 1/n", len(moved) == len(pods) and seen == wanted,
                 ", ".join(str(p) for p in seen) or "no statistic rules")
        by_counter = {s.pod_at(ip) or ip: taken for ip, _, taken in moved}
        s.expect("each rule's counter moved by the connections its endpoint answered (the rules made the choice)",
                 by_counter == counts, ", ".join(f"{pod} {by_counter.get(pod)}/{counts[pod]}" for pod in pods))
    else:
        draw = [line.strip() for line in kproxy("rules", "--lab", s.lab, node, "--service", "web").splitlines()
                if "numgen" in line and not line.lstrip().startswith("#")]
        s.show(f"service-* on {node}: one draw per new connection, a random number mod {len(pods)} into a verdict map:")
        for line in draw:
            s.show(f"    {line}")
        s.expect(f"the service chain draws once: numgen random mod {len(pods)}, one map entry per endpoint",
                 len(draw) == 1 and f"numgen random mod {len(pods)} vmap" in draw[0]
                 and all(f"__{s.pod_ip(pod)}/8080" in draw[0] for pod in pods), "; ".join(draw) or "no numgen rule")

    expected = CONNECTIONS / len(pods)
    statistic = sum((count - expected) ** 2 / expected for count in counts.values())
    df = len(pods) - 1
    critical = chi2_critical(ALPHA, df)
    s.show(f"Connections per endpoint (uniform: {expected:.0f} each): "
           + ", ".join(f"{pod} {count}" for pod, count in counts.items()))
    s.show(f"chi-square = sum((observed - {expected:.0f})^2 / {expected:.0f}) = {statistic:.2f} on {df} degrees of "
           f"freedom; P(chi-square > {statistic:.2f}) = {chi2_survival(statistic, df):.3f}.")
    # What a classic bug would give: 1/n in every rule of the cascade instead of 1/(n-i).
    share = [(1 / len(pods)) * (1 - 1 / len(pods)) ** i for i in range(len(pods) - 1)]
    naive = [CONNECTIONS * p for p in [*share, 1 - sum(share)]]
    s.show(f"The check fails above {critical:.2f}, where a uniform choice lands with probability {ALPHA:g}. A cascade")
    s.show(f"with 1/{len(pods)} in every rule would give about {', '.join(f'{n:.0f}' for n in naive)}: chi-square "
           f"near {sum((n - expected) ** 2 / expected for n in naive):.0f}.")
    s.expect(f"the {CONNECTIONS} connections fit a uniform choice (chi-square below the {ALPHA:g} critical value)",
             statistic < critical, f"chi-square {statistic:.2f} < {critical:.2f}" if statistic < critical
             else f"chi-square {statistic:.2f} >= {critical:.2f}: " + ", ".join(f"{p} {c}" for p, c in counts.items()))


LAB = PacketLab(
    number=9,
    title="Endpoint selection: iptables statistic versus nftables numgen",
    manifests=WEB_SERVICE,
    topology=TOPOLOGY,
    modes=("iptables", "nftables"),  # ipvs and userspace pick round robin: nothing random to measure
    task="""
Service web has four endpoints (web-1..4, two per node); the client runs on node1. Read how node1
picks one, then make many connections and count who answers:

  kproxy rules --lab LAB node1 --service web     (iptables: statistic --probability; nftables: numgen)
  for i in $(seq 100); do kproxy exec --lab LAB client -- curl -s http://<web's ClusterIP>/; done | sort | uniq -c
  kproxy rules --lab LAB node1 --service web     (iptables: the counters of each statistic rule)

Why are the iptables probabilities 0.25, 0.333, 0.5 and not 0.25 each? How far from 250 per endpoint
may 1,000 connections stray before you should suspect the kernel?
""",
    experiment=experiment,
)
