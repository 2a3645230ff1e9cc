"""IPVS mode's rendering: pure, no root (kproxy/proxy/ipvs.py)."""

from __future__ import annotations

import pytest

from kproxy.proxy import mode
from kproxy.proxy.ipvs import IPSETS, render
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


def test_virtual_servers_one_per_cluster_ip_port_and_node_ip_node_port() -> None:
    desired = render(state(), NODE)
    assert desired.ipvsadm_save() == """\
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
    assert desired.addresses == ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"]


def test_ipsets_as_kube_proxy_fills_them() -> None:
    sets = render(state(), NODE).ipsets
    assert sets["KUBE-CLUSTER-IP"] == ["10.96.0.10,tcp:80", "10.96.0.11,tcp:81", "10.96.0.12,udp:53",
                                       "10.96.0.13,tcp:80"]
    assert sets["KUBE-NODE-PORT-TCP"] == ["30080"] and sets["KUBE-NODE-PORT-UDP"] == ["30053"]
    assert sets["KUBE-LOOP-BACK"] == ["10.244.1.5,tcp:8080,10.244.1.5"]  # local endpoints only


def test_ipset_restore_swaps_each_set_in_atomically() -> None:
    text = render(state(), NODE).ipset_restore()
    for name, (kind, _, _) in IPSETS.items():
        assert f"create {name} {kind} " in text
        assert f"swap {name}-TMP {name}\ndestroy {name}-TMP\n" in text
    assert "add KUBE-CLUSTER-IP-TMP 10.96.0.10,tcp:80\n" in text


def test_iptables_rules_use_the_ipsets() -> None:
    rules = render(state(), NODE).iptables
    assert "-A KUBE-SERVICES ! -s 10.244.0.0/16 -m comment --comment \"Kubernetes service cluster ip + port for " \
           "masquerade purpose\" -m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in rules
    assert "-A KUBE-NODE-PORT -p tcp -m comment --comment \"Kubernetes nodeport TCP port for masquerade purpose\" " \
           "-m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ" in rules
    assert "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in rules
    assert rules.count("COMMIT") == 2 and "10.96.0.10" not in rules  # no per-service rules


def test_lab_wide_scheduler_and_an_unknown_one() -> None:
    assert "-A -t 10.96.0.10:80 -s lc" in render(state(), NODE, scheduler="lc").ipvsadm_save()
    assert "-A -t 10.96.0.11:81 -s sh -p 2" in render(state(), NODE, scheduler="lc").ipvsadm_save()
    with pytest.raises(ValueError):
        render(state(), NODE, scheduler="nope")


def test_render_text_of_the_mode() -> None:
    ipvs = mode("ipvs")
    text = ipvs.render_text(state(), NODE, ipvs.options_of({}))
    assert text.startswith("# kube-ipvs0")
    assert "ip address add 10.96.0.10/32 dev kube-ipvs0" in text
    assert "# IPVS (ipvsadm -Sn)\n-A -t 10.96.0.10:80 -s rr" in text and "*nat" in text
