"""Where iptables mode keeps ClientIP affinity: one xt_recent list per KUBE-SEP chain, named after it."""

from __future__ import annotations

import re

from kproxy.proxy.kernel import SAVE
from kproxy.proxy.mode import Affinity, NodeCommand, Remembered

DNAT = re.compile(r"^-A (KUBE-SEP-\S+) .*-j DNAT --to-destination (\S+)$")
# grep -H over the lists: "KUBE-SEP-...:src=IP ttl: T last_seen: J oldest_pkt: N J1, J2, ..."
ENTRY = re.compile(r"^(KUBE-SEP-[^:]+):src=([\d.]+) ttl: \d+ last_seen: \d+ oldest_pkt: \d+ (.*)$")


def remembered(run: NodeCommand) -> list[Remembered]:
    """Each recent list's clients, under the endpoint its chain's DNAT names; one timestamp per SYN."""
    endpoint = {m.group(1): m.group(2) for line in run(SAVE, "-t", "nat").splitlines() if (m := DNAT.match(line))}
    # The directory exists only once a recent rule was loaded; no lists: no clients.
    listed = run("sh", "-c", "cd /proc/net/xt_recent 2>/dev/null && grep -H . KUBE-SEP-* 2>/dev/null || true")
    found = []
    for line in listed.splitlines():
        if (m := ENTRY.match(line)) and m.group(1) in endpoint:
            hits = len(m.group(3).split(","))
            found.append(Remembered(m.group(2), endpoint[m.group(1)], f"{m.group(1)}: {hits} hits", hits, None, None))
    return found


AFFINITY = Affinity(
    where="/proc/net/xt_recent/KUBE-SEP-* (one recent list per endpoint chain)",
    how="KUBE-SVC-* checks these lists before its statistic rules ('-m recent --rcheck --seconds <timeout> --reap "
        "--name KUBE-SEP-...'), and the KUBE-SEP-* chain's DNAT rule adds a hit ('-m recent --set'): one per "
        "SYN. The list names are the same on every node; their contents are each node's own.",
    read=remembered,
)
