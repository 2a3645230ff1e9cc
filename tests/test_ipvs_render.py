"""IPVS mode's rendering: pure, no root (kproxy/proxy/ipvs/render.py). Whole texts."""

from __future__ import annotations

import pytest

from kproxy.proxy import mode
from kproxy.proxy.ipvs import render
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo("node1", "192.168.99.11", "10.244.0.0/16")


def state() -> ProxyState:
    web = ServicePort("default", "web", "http", "TCP", "10.96.0.10", 80, node_port=30080)
    sticky = ServicePort("default", "sticky", "", "TCP", "10.96.0.11", 81, affinity_seconds=2, mode_info="sh")
    dns = ServicePort("kube-system", "dns", "dns", "UDP", "10.96.0.12", 53, node_port=30053)
    empty = ServicePort("default", "nobody", "", "TCP", "10.96.0.13", 80)
    eps = [Endpoint("10.244.1.5", 8080, "node1"), Endpoint("10.244.2.5", 8080, "node2"),
           Endpoint("10.244.3.5", 8080, "node3", ready=False)]
    return ProxyState([web, sticky, dns, empty], {web.key: eps, sticky.key: eps[:1], dns.key: eps[1:2]})


ADDRESSES = """\
ip address add 10.96.0.10/32 dev kube-ipvs0
ip address add 10.96.0.11/32 dev kube-ipvs0
ip address add 10.96.0.12/32 dev kube-ipvs0
ip address add 10.96.0.13/32 dev kube-ipvs0
"""

# One virtual server per ClusterIP:port and per node IP:NodePort; ready endpoints only; the
# sticky Service has its own scheduler (annotation) and persistence (ClientIP affinity).
IPVSADM_RR = """\
-A -t 10.96.0.10:80 -s rr
-a -t 10.96.0.10:80 -r 10.244.1.5:8080 -m -w 1
-a -t 10.96.0.10:80 -r 10.244.2.5:8080 -m -w 1
-A -t 10.96.0.11:81 -s sh -p 2
-a -t 10.96.0.11:81 -r 10.244.1.5:8080 -m -w 1
-A -u 10.96.0.12:53 -s rr
-a -u 10.96.0.12:53 -r 10.244.2.5:8080 -m -w 1
-A -t 10.96.0.13:80 -s rr
-A -t 192.168.99.11:30080 -s rr
-a -t 192.168.99.11:30080 -r 10.244.1.5:8080 -m -w 1
-a -t 192.168.99.11:30080 -r 10.244.2.5:8080 -m -w 1
-A -u 192.168.99.11:30053 -s rr
-a -u 192.168.99.11:30053 -r 10.244.2.5:8080 -m -w 1
"""

IPSET_RESTORE = """\
create KUBE-LOOP-BACK hash:ip,port,ip family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-LOOP-BACK-TMP hash:ip,port,ip family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-LOOP-BACK-TMP
add KUBE-LOOP-BACK-TMP 10.244.1.5,tcp:8080,10.244.1.5
swap KUBE-LOOP-BACK-TMP KUBE-LOOP-BACK
destroy KUBE-LOOP-BACK-TMP
create KUBE-CLUSTER-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-CLUSTER-IP-TMP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-CLUSTER-IP-TMP
add KUBE-CLUSTER-IP-TMP 10.96.0.10,tcp:80
add KUBE-CLUSTER-IP-TMP 10.96.0.11,tcp:81
add KUBE-CLUSTER-IP-TMP 10.96.0.12,udp:53
add KUBE-CLUSTER-IP-TMP 10.96.0.13,tcp:80
swap KUBE-CLUSTER-IP-TMP KUBE-CLUSTER-IP
destroy KUBE-CLUSTER-IP-TMP
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 comment -exist
create KUBE-NODE-PORT-TCP-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-NODE-PORT-TCP-TMP
add KUBE-NODE-PORT-TCP-TMP 30080
swap KUBE-NODE-PORT-TCP-TMP KUBE-NODE-PORT-TCP
destroy KUBE-NODE-PORT-TCP-TMP
create KUBE-NODE-PORT-UDP bitmap:port range 0-65535 comment -exist
create KUBE-NODE-PORT-UDP-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-NODE-PORT-UDP-TMP
add KUBE-NODE-PORT-UDP-TMP 30053
swap KUBE-NODE-PORT-UDP-TMP KUBE-NODE-PORT-UDP
destroy KUBE-NODE-PORT-UDP-TMP
"""

# No per-service rules: the ipsets carry the services.
IPTABLES = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT
-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ
-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for masquerade purpose" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
COMMIT
"""


def test_virtual_servers_one_per_cluster_ip_port_and_node_ip_node_port() -> None:
    ruleset = render(state(), NODE)
    assert ruleset.ipvsadm_save() == IPVSADM_RR
    assert ruleset.addresses == ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"]


def test_ipsets_as_kube_proxy_fills_them() -> None:
    assert render(state(), NODE).ipsets == {
        "KUBE-LOOP-BACK": ["10.244.1.5,tcp:8080,10.244.1.5"],  # local endpoints only
        "KUBE-CLUSTER-IP": ["10.96.0.10,tcp:80", "10.96.0.11,tcp:81", "10.96.0.12,udp:53", "10.96.0.13,tcp:80"],
        "KUBE-NODE-PORT-TCP": ["30080"],
        "KUBE-NODE-PORT-UDP": ["30053"],
    }


def test_ipset_restore_swaps_each_set_in_atomically() -> None:
    assert render(state(), NODE).ipset_restore() == IPSET_RESTORE


def test_iptables_rules_use_the_ipsets() -> None:
    assert render(state(), NODE).iptables == IPTABLES


def test_lab_wide_scheduler_and_an_unknown_one() -> None:
    # The annotated Service keeps its own scheduler.
    assert render(state(), NODE, scheduler="lc").ipvsadm_save() == IPVSADM_RR.replace(" -s rr", " -s lc")
    with pytest.raises(ValueError, match=r"^unknown IPVS scheduler 'nope' \(known: rr, wrr, lc, "):
        render(state(), NODE, scheduler="nope")


def test_an_unknown_annotated_scheduler_falls_back_to_the_lab_one(capsys: pytest.CaptureFixture[str]) -> None:
    odd = ServicePort("default", "odd", "", "TCP", "10.96.0.14", 80, mode_info="fastest")
    assert render(ProxyState([odd], {}), NODE, scheduler="wrr").ipvsadm_save() == "-A -t 10.96.0.14:80 -s wrr\n"
    assert capsys.readouterr().err == ("kproxy ipvs: default/odd: unknown IPVS scheduler 'fastest' (known: rr, wrr, "
                                       "lc, wlc, lblc, lblcr, dh, sh, sed, nq, fo, ovf, mh); using wrr\n")


def test_render_text_of_the_mode() -> None:
    ipvs = mode("ipvs")
    assert ipvs.render_text(state(), NODE, ipvs.options_of({})) == (
        f"# kube-ipvs0 (dummy link, down)\n{ADDRESSES}"
        f"# IPVS (ipvsadm -Sn)\n{IPVSADM_RR}"
        f"# ipsets (ipset restore)\n{IPSET_RESTORE}"
        f"# iptables (iptables-restore --noflush)\n{IPTABLES}")
