"""Where each kernel mode keeps ClientIP affinity: the readers packet lab 7 asks, against the tools'
own output (a node command that answers as iptables-save, grep, nft -j and ipvsadm do)."""

from __future__ import annotations

import json

from kproxy.proxy import mode
from kproxy.proxy.mode import Remembered

SAVED = """*nat
:KUBE-SEP-MIOVKI3LOUD2HNMP - [0:0]
:KUBE-SEP-Z4ZH5U6FGNIZRSBY - [0:0]
-A KUBE-SEP-MIOVKI3LOUD2HNMP -p tcp -m comment --comment "default/web" -m recent --set --name KUBE-SEP-MIOVKI3LOUD2HNMP --mask 255.255.255.255 --rsource -m tcp -j DNAT --to-destination 10.244.1.9:8080
-A KUBE-SEP-Z4ZH5U6FGNIZRSBY -p tcp -m comment --comment "default/web" -m tcp -j DNAT --to-destination 10.244.2.3:8080
COMMIT
"""
RECENT = (
    "KUBE-SEP-MIOVKI3LOUD2HNMP:src=10.244.1.2 ttl: 64 last_seen: 4295000300 oldest_pkt: 3 "
    "4295000100, 4295000200, 4295000300\n"
    "KUBE-SEP-STALEOLDCHAIN000:src=10.244.1.5 ttl: 64 last_seen: 4295000300 oldest_pkt: 1 4295000300\n"
)


def answering(outputs: dict[str, str]):
    def run(*argv: str) -> str:
        return outputs[argv[0]]
    return run


def test_iptables_reads_each_recent_list_under_its_chains_endpoint() -> None:
    affinity = mode("iptables").affinity
    assert affinity is not None
    got = affinity.read(answering({"iptables-nft-save": SAVED, "sh": RECENT}))
    # A list whose chain is gone (a removed endpoint's) names no endpoint: left out.
    assert got == [Remembered("10.244.1.2", "10.244.1.9:8080", "KUBE-SEP-MIOVKI3LOUD2HNMP: 3 hits", 3, None, None)]


def test_nftables_reads_the_affinity_sets_with_their_timeouts() -> None:
    affinity = mode("nftables").affinity
    assert affinity is not None
    listed = {"nftables": [
        {"metainfo": {"version": "1.0.6"}},
        {"table": {"family": "ip", "name": "kube-proxy", "handle": 1}},
        {"set": {"family": "ip", "name": "affinity-ABCD2345-default/web/tcp/http__10.244.2.3/8080",
                 "table": "kube-proxy", "type": "ipv4_addr", "handle": 9, "flags": ["timeout", "dynamic"],
                 "timeout": 600, "elem": [{"elem": {"val": "10.244.1.7", "timeout": 600, "expires": 598}}]}},
        {"set": {"family": "ip", "name": "cluster-ips", "table": "kube-proxy", "type": "ipv4_addr",
                 "handle": 3, "elem": ["10.96.0.11"]}},
    ]}
    got = affinity.read(answering({"nft": json.dumps(listed)}))
    assert got == [Remembered("10.244.1.7", "10.244.2.3:8080", "set timeout 600s, expires in 598s", None, 598, 600)]


def test_ipvs_reads_the_persistence_templates_only() -> None:
    affinity = mode("ipvs").affinity
    assert affinity is not None
    listed = """IPVS connection entries
pro expire state       source             virtual            destination
TCP 09:56  NONE        10.244.1.2:0       10.96.0.11:80      10.244.2.3:8080
TCP 01:57  TIME_WAIT   10.244.1.2:40122   10.96.0.11:80      10.244.2.3:8080
"""
    got = affinity.read(answering({"ipvsadm": listed}))
    assert got == [Remembered("10.244.1.2", "10.244.2.3:8080", "template, expires in 09:56", None, 596, None)]


def test_only_the_relaying_mode_keeps_affinity_out_of_the_kernel() -> None:
    assert {(m, mode(m).relays, mode(m).affinity is None) for m in ("iptables", "nftables", "ipvs", "userspace")} \
        == {("iptables", False, False), ("nftables", False, False), ("ipvs", False, False), ("userspace", True, True)}
