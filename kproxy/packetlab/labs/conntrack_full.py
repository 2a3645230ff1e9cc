"""Lab 14: a node's conntrack table full. nf_conntrack_max is the kernel's, read-only outside the
first namespace, but each namespace counts its own entries against it: the lab fills node1's table
to that limit with entries of its own (conntrack -R), first evictable ones, then ASSURED ones."""

from __future__ import annotations

import time

from kproxy.errors import KproxyError
from kproxy.lab.probe import probe_tcp
from kproxy.packetlab import WEB_SERVICE, PacketLab
from kproxy.packetlab.session import Session
from kproxy.packets.decode import describe

SYSCTLS = "/proc/sys/net/netfilter"
MOST = 1 << 20  # entries the lab will make: 256 B of kernel memory each (the nf_conntrack slab)
FREED = 256  # entries deleted to make room again
TRIES = 5  # new connections tried against a table of evictable entries (each one's own buckets)


def fill_lines(count: int, assured: bool) -> str:
    """conntrack -R input: count TCP entries of made-up flows (198.18.0.0/15, the benchmarking
    range: no lab address), ESTABLISHED and ASSURED, or SYN_SENT without ASSURED (evictable)."""
    state = "--state ESTABLISHED -u ASSURED" if assured else "--state SYN_SENT"
    return "".join(f"-I -p tcp -s 198.18.{(i >> 8) & 255}.{i & 255} -d 198.19.0.1 --sport {1024 + (i >> 16)} "
                   f"--dport 80 {state} -t 600\n" for i in range(count))


def sysctl(s: Session, member: str, name: str) -> int:
    return int(s.run(member, "cat", f"{SYSCTLS}/{name}").strip())


def fill(s: Session, node: str, limit: int, assured: bool) -> str:
    """Fill node's table past its limit; the kernel's refusal of the first entry too many."""
    missing = limit - sysctl(s, node, "nf_conntrack_count")
    # 64 more than fit: conntrack -R stops at the first entry the kernel refuses.
    return s.run(node, "conntrack", "-R", "-", stdin=fill_lines(max(missing, 0) + 64, assured), check=False).strip()


def try_connect(s: Session, vip: str, timeout: float = 2.5) -> str | None:
    try:
        return probe_tcp(s.ns("client"), vip, 80, timeout=timeout)
    except OSError:
        return None


def experiment(s: Session) -> None:
    node, vip = s.node_of("client"), s.cluster_ip("web")
    other = s.node_of("web-1")
    limit = sysctl(s, node, "nf_conntrack_max")
    modes = s.run(node, "stat", "-c", "%A %n", f"{SYSCTLS}/nf_conntrack_max", f"{SYSCTLS}/nf_conntrack_buckets",
                  f"{SYSCTLS}/nf_conntrack_count").strip()
    s.show(f"In {node}'s namespace (a node's own: kube-proxy would tune these on a real node):")
    for line in modes.splitlines():
        s.show(f"    {line}")
    writable = any("w" in line.split()[0] for line in modes.splitlines()[:2])
    s.show(f"nf_conntrack_max ({limit}) and nf_conntrack_buckets are the kernel's, "
           + ("writable from here on this kernel, but the lab leaves them alone." if writable else
              "read-only in every namespace but the first (which this lab never touches)."))
    s.show("nf_conntrack_count is this namespace's own, and the kernel compares it with the limit: a node's")
    s.show("table fills at nf_conntrack_max entries.")
    if limit > MOST:
        raise KproxyError(f"nf_conntrack_max is {limit} on this machine: filling {node}'s table would take "
                          f"{limit} entries (~{limit * 256 >> 20} MiB of kernel memory); the lab stops at {MOST}")

    s.show()
    s.show(f"1. {node}'s table filled with entries conntrack may evict (SYN_SENT, not ASSURED):")
    start = time.monotonic()
    refused = fill(s, node, limit, assured=False)
    count = sysctl(s, node, "nf_conntrack_count")
    s.show(f"    conntrack -R: {count} entries in {time.monotonic() - start:.1f} s; then: {refused or 'no refusal'}")
    s.expect(f"{node}'s table is full: nf_conntrack_count = nf_conntrack_max", count == limit,
             f"count {count}, max {limit}")
    # A new connection may evict an unassured entry from the 8 hash buckets after its own; with the
    # table full, one connection finds none there with probability ~e^-8, so try up to TRIES.
    before = s.conntrack_stats(node)
    answer, tries = None, 0
    while answer is None and tries < TRIES:
        answer, tries = try_connect(s, vip), tries + 1
    after = s.conntrack_stats(node)
    evicted = after.get("early_drop", 0) - before.get("early_drop", 0)
    s.show(f"    client -> {vip}:80: {answer or 'no answer'} (after {tries} tr{'y' if tries == 1 else 'ies'}); "
           f"conntrack -S on {node}: early_drop +{evicted}, count {sysctl(s, node, 'nf_conntrack_count')}")
    s.expect("full of evictable entries, a new connection still gets in: the kernel evicted some (early_drop)",
             answer is not None and evicted > 0, f"{answer or 'no answer'}; early_drop +{evicted}")

    s.show()
    s.show(f"2. {node}'s table flushed and filled with ASSURED entries (established flows, never evicted early):")
    s.run(node, "conntrack", "-F")
    refused = fill(s, node, limit, assured=True)
    count = sysctl(s, node, "nf_conntrack_count")
    s.show(f"    conntrack -R: {count} entries; then: {refused or 'no refusal'}")
    s.expect(f"{node}'s table is full of ASSURED entries, and the kernel refuses one more",
             count == limit and "not enough memory" in refused, f"count {count}, max {limit}; {refused or 'accepted'}")
    syn = "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0"
    before = s.conntrack_stats(node)
    with s.sniff("client", bpf=syn) as leaving, s.sniff("web-1", bpf=syn) as arriving:
        answer = try_connect(s, vip)
    after = s.conntrack_stats(node)
    moved = {key: after.get(key, 0) - before.get(key, 0) for key in ("drop", "early_drop")}
    s.show(f"    client -> {vip}:80: {answer or 'no answer within 2.5 s'}; SYNs leaving the client:")
    for packet in leaving.packets:
        s.show(f"        {describe(packet)}")
    s.show(f"    SYNs arriving at web-1: {len(arriving.packets)}; conntrack -S on {node}: "
           f"drop +{moved['drop']}, early_drop +{moved['early_drop']}")
    s.expect(f"full of ASSURED entries, {node} drops the new connection's SYNs (drop counts each; nothing "
             "evicted; none reaches web-1)",
             answer is None and leaving.packets != [] and not arriving.packets
             and moved["drop"] >= len(leaving.packets) and moved["early_drop"] == 0,
             f"{answer or 'no answer'}; {len(leaving.packets)} SYNs sent, {len(arriving.packets)} arrived; "
             f"drop +{moved['drop']}, early_drop +{moved['early_drop']}")
    theirs = sysctl(s, other, "nf_conntrack_count")
    try:
        direct: str | None = probe_tcp(s.ns(other), s.pod_ip("web-1"), 8080)
    except OSError:
        direct = None
    s.show(f"    meanwhile {other} (its own count: {theirs}) -> web-1: {direct or 'no answer'}")
    s.expect(f"the count is per namespace: {other}'s table is not full and {other} still connects to web-1",
             theirs < limit and direct is not None, f"{other}'s count {theirs}; {direct or 'no answer'}")

    s.run(node, "conntrack", "-D", "-s", "198.18.0.0", "--mask-src", "255.255.255.0")
    answer = try_connect(s, vip)
    s.show(f"    after conntrack -D of the {FREED} entries from 198.18.0.0/24: client -> {vip}:80: "
           f"{answer or 'no answer'}")
    s.expect(f"with {FREED} entries deleted, a new connection from the client is answered", answer is not None,
             answer or "no answer")
    s.run(node, "conntrack", "-F")  # the kernel memory back now, not at lab down


LAB = PacketLab(
    number=14,
    title="A node's conntrack table full",
    manifests=WEB_SERVICE,
    modes=("iptables", "nftables", "userspace"),
    task="""
The client (node1) reaches Service web, whose pod web-1 runs on node2. Every connection needs an
entry in node1's conntrack table. Read the limits from node1's namespace:

  kproxy exec --lab LAB node1 -- ls -l /proc/sys/net/netfilter/nf_conntrack_max
  kproxy exec --lab LAB node1 -- cat /proc/sys/net/netfilter/nf_conntrack_max /proc/sys/net/netfilter/nf_conntrack_count
  kproxy exec --lab LAB node1 -- conntrack -S            (drop, early_drop)

Can node1 get a smaller nf_conntrack_max? Fill node1's table instead: conntrack -R reads '-I ...'
lines (conntrack -I's arguments) from a file; make as many entries as nf_conntrack_max allows, once
with '--state SYN_SENT', once with '--state ESTABLISHED -u ASSURED', and try
  kproxy exec --lab LAB client -- curl -sS --max-time 3 http://<web's ClusterIP>/
each time. Which counter moves, and why does only one of the two fills break the Service?
Finish with: kproxy exec --lab LAB node1 -- conntrack -F
""",
    experiment=experiment,
)
