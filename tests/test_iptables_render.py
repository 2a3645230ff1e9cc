"""The iptables mode's rendering, without root: names, rules and restore text as kube-proxy writes them.

Expected values come from kube-proxy's own pkg/proxy/iptables/proxier_test.go
(TestOverallIPTablesRules): its services ns1..ns6, cluster IPs 172.30.0.4x,
endpoints 10.180.0.x and cluster CIDR 10.0.0.0/8, so the chain hashes below are
kube-proxy's, not ours recomputed. Its expected text is grouped per chain
(KUBE-NODEPORTS, KUBE-SERVICES first, then sorted), which is our order too.
"""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from kproxy.proxy.iptables import (
    LARGE_CLUSTER_ENDPOINTS,
    Leftovers,
    RenderCache,
    Ruleset,
    changed_service_ports,
    endpoint_chain_name,
    is_own_chain,
    probability,
    render,
    restore_input,
    service_external_chain_name,
    service_port_chain_name,
    write_full_restore,
)
from kproxy.proxy.netfilter import usable_endpoints
from kproxy.proxy.saved import parse_save, removal_input
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo(name="node1", ip="192.168.0.2", cluster_cidr="10.0.0.0/8")


@pytest.mark.parametrize(("make", "args", "expected"), [
    # All from proxier_test.go's TestOverallIPTablesRules.
    (service_port_chain_name, ("ns1/svc1:p80", "tcp"), "KUBE-SVC-XPGD46QRK7WJZT7O"),
    (service_port_chain_name, ("ns2/svc2:p80", "tcp"), "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
    (service_port_chain_name, ("ns3/svc3:p80", "tcp"), "KUBE-SVC-X27LE4BHSL4DOUIK"),
    (service_port_chain_name, ("ns4/svc4:p80", "tcp"), "KUBE-SVC-4SW47YFZTEDKD3PK"),
    (service_port_chain_name, ("ns5/svc5:p80", "tcp"), "KUBE-SVC-NUKIZ6OKUXPJNT4C"),
    (service_external_chain_name, ("ns3/svc3:p80", "tcp"), "KUBE-EXT-X27LE4BHSL4DOUIK"),
    (endpoint_chain_name, ("ns1/svc1:p80", "tcp", "10.180.0.1:80"), "KUBE-SEP-SXIVWICOYRO3J4NJ"),
    (endpoint_chain_name, ("ns2/svc2:p80", "tcp", "10.180.0.2:80"), "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
    (endpoint_chain_name, ("ns3/svc3:p80", "tcp", "10.180.0.3:80"), "KUBE-SEP-OYPFS5VJICHGATKP"),
    (endpoint_chain_name, ("ns4/svc4:p80", "tcp", "10.180.0.4:80"), "KUBE-SEP-UKSFD7AGPMPPLUHC"),
    (endpoint_chain_name, ("ns4/svc4:p80", "tcp", "10.180.0.5:80"), "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
    (endpoint_chain_name, ("ns5/svc5:p80", "tcp", "10.180.0.3:80"), "KUBE-SEP-I77PXRDZVX7PMWMN"),
])
def test_chain_names_are_kube_proxys(make, args, expected) -> None:
    assert make(*args) == expected


def test_protocol_case_and_port_name_enter_the_hash() -> None:
    assert service_port_chain_name("ns1/svc1:p80", "TCP") == "KUBE-SVC-XPGD46QRK7WJZT7O"  # lowercased
    assert service_port_chain_name("ns1/svc1:p80", "udp") != "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert service_port_chain_name("ns1/svc1", "tcp") != "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert ServicePort("ns1", "svc1", "", "TCP", "10.96.0.1", 80).service_port_name == "ns1/svc1"


def small_state() -> ProxyState:
    services = [
        ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80),  # ClusterIP, 1 endpoint
        ServicePort("ns3", "svc3", "p80", "TCP", "172.30.0.43", 80, node_port=3003),  # NodePort
        ServicePort("ns4", "svc4", "p80", "TCP", "172.30.0.44", 80),  # ClusterIP, 2 endpoints
        ServicePort("ns5", "svc5", "p80", "TCP", "172.30.0.45", 80, node_port=3002, affinity_seconds=10800),
        ServicePort("ns6", "svc6", "p80", "TCP", "172.30.0.46", 80),  # no endpoints
    ]
    endpoints = {
        services[0].key: [Endpoint("10.180.0.1", 80, "node1")],
        services[1].key: [Endpoint("10.180.0.3", 80, "node1")],
        # given out of order, and with a not-ready one: kube-proxy sorts and skips it
        services[2].key: [Endpoint("10.180.0.5", 80, "node1"), Endpoint("10.180.0.9", 80, "node2", ready=False),
                          Endpoint("10.180.0.4", 80, "node2")],
        services[3].key: [Endpoint("10.180.0.3", 80, "node1")],
        services[4].key: [Endpoint("10.180.0.6", 80, "node1", ready=False, terminating=True)],
    }
    return ProxyState(services=services, endpoints=endpoints)


# kube-proxy's TestOverallIPTablesRules lines for these services, as it writes them (its
# svc5 is a LoadBalancer; here the same service port is a plain NodePort, so its KUBE-FW
# chain, loadbalancer IP and health check node port lines are not there). Differences
# from that test's fake proxier, both as a real kube-proxy without nfacct writes them:
# KUBE-FORWARD drops INVALID without "-m nfacct", and there are no 127.0.0.0/8 NodePort
# rules (kube-proxy writes those only when the nfacct counter exists).
EXPECTED = textwrap.dedent("""\
    *filter
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    COMMIT
    *nat
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
    :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
    COMMIT
    """)


def test_full_ruleset_line_by_line() -> None:
    got = render(small_state(), NODE).text()
    assert got.splitlines() == EXPECTED.splitlines()


def test_jumps_from_builtin_chains_are_kube_proxys() -> None:
    specs = {(j.table, j.chain, j.spec) for j in render(small_state(), NODE).jumps}
    assert ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES') in specs
    assert ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES') in specs
    assert ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING') in specs
    assert ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD') in specs
    assert ("filter", "FORWARD", '-m conntrack --ctstate NEW -m comment --comment "kubernetes service portals" '
            "-j KUBE-SERVICES") in specs
    assert ("filter", "INPUT", "-j KUBE-FIREWALL") in specs
    assert len(specs) == 14


def test_nodeport_without_endpoints_is_rejected_in_external_services() -> None:
    svc = ServicePort("ns7", "svc7", "", "UDP", "172.30.0.47", 53, node_port=30053)
    filter_ = render(ProxyState([svc], {}), NODE).tables["filter"]
    assert filter_["KUBE-SERVICES"] == (
        '-A KUBE-SERVICES -m comment --comment "ns7/svc7 has no endpoints" -m udp -p udp -d 172.30.0.47 '
        "--dport 53 -j REJECT",)
    assert filter_["KUBE-EXTERNAL-SERVICES"] == (
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns7/svc7 has no endpoints" -m addrtype --dst-type LOCAL '
        "-m udp -p udp --dport 30053 -j REJECT",)
    assert not any(c.startswith("KUBE-SVC-") for c in render(ProxyState([svc], {}), NODE).tables["nat"])


def test_three_endpoints_get_one_third_then_one_half_then_the_rest() -> None:
    svc = ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80)
    eps = [Endpoint(f"10.180.0.{i}", 80, "node1") for i in (1, 2, 3)]
    seps = [endpoint_chain_name("ns1/svc1:p80", "tcp", ep.address) for ep in eps]
    rules = render(ProxyState([svc], {svc.key: eps}), NODE).tables["nat"]["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert rules == (
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
        f"-m statistic --mode random --probability 0.3333333333 -j {seps[0]}",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" '
        f"-m statistic --mode random --probability 0.5000000000 -j {seps[1]}",
        f'-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -j {seps[2]}',
    )
    assert probability(3) == "0.3333333333" and probability(2) == "0.5000000000" and probability(7) == "0.1428571429"


def test_endpoints_sorted_as_strings_like_kube_proxy() -> None:
    eps = [Endpoint("10.0.0.2", 80, "n"), Endpoint("10.0.0.10", 80, "n"), Endpoint("10.0.0.2", 80, "n"),
           Endpoint("10.0.0.3", 80, "n", ready=False)]
    assert [e.address for e in usable_endpoints(eps)] == ["10.0.0.10:80", "10.0.0.2:80"]


def test_large_clusters_drop_endpoint_comments() -> None:
    services = [ServicePort("ns", f"s{i}", "", "TCP", f"10.96.{i // 256}.{i % 256}", 80) for i in range(501)]
    eps = {s.key: [Endpoint(f"10.244.{i // 128}.{2 * (i % 128)}", 80, "n"),
                   Endpoint(f"10.244.{i // 128}.{2 * (i % 128) + 1}", 80, "n")] for i, s in enumerate(services)}
    nat = render(ProxyState(services, eps), NODE).tables["nat"]
    sep0, sep1 = (endpoint_chain_name("ns/s0", "tcp", f"10.244.0.{i}:80") for i in (0, 1))
    assert nat[sep0] == (f"-A {sep0} -s 10.244.0.0 -j KUBE-MARK-MASQ",
                         f"-A {sep0} -m tcp -p tcp -j DNAT --to-destination 10.244.0.0:80")
    svc = service_port_chain_name("ns/s0", "tcp")
    assert nat[svc] == (  # the cluster IP comment stays: it is not per endpoint
        f'-A {svc} -m comment --comment "ns/s0 cluster IP" -m tcp -p tcp -d 10.96.0.0 --dport 80 '
        "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        f"-A {svc} -m statistic --mode random --probability 0.5000000000 -j {sep0}",
        f"-A {svc} -j {sep1}")


def test_no_cluster_cidr_means_no_cluster_ip_masquerade() -> None:
    svc = ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80)
    rules = render(ProxyState([svc], {svc.key: [Endpoint("10.180.0.1", 80, "n")]}),
                   NodeInfo("n", "192.168.0.2", "")).tables["nat"]["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert rules == ('-A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" '
                     "-j KUBE-SEP-SXIVWICOYRO3J4NJ",)


def test_localhost_nodeports_off_excludes_loopback_and_kubelet_firewall() -> None:
    got = render(small_state(), NODE, localhost_nodeports=False, conntrack_tcp_liberal=True).text()
    # EXPECTED without kubelet's KUBE-FIREWALL and the INVALID drop, and with 127.0.0.0/8 kept out of NodePorts.
    expected = [line for line in EXPECTED.splitlines() if "KUBE-FIREWALL" not in line and "INVALID" not in line]
    nodeports = expected.index('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
                               'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    expected[nodeports] = expected[nodeports].replace("LOCAL -j", "LOCAL ! -d 127.0.0.0/8 -j")
    assert got.splitlines() == expected


def _changed(state: ProxyState) -> Ruleset:
    svc4 = state.services[2]
    state.endpoints[svc4.key] = [Endpoint("10.180.0.4", 80, "node2"), Endpoint("10.180.0.7", 80, "node1")]
    return render(state, NODE)


def test_partial_restore_only_touches_changed_chains() -> None:
    old = render(small_state(), NODE)
    new = _changed(small_state())
    # Only ns4's SVC chain, its new SEP and its gone SEP, all nat: no filter section at all. Untouched
    # services' chains are not even mentioned.
    assert restore_input(new, old) == textwrap.dedent("""\
        *nat
        :KUBE-SEP-KV4FMR6WJFBQE3OH - [0:0]
        :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
        -A KUBE-SEP-KV4FMR6WJFBQE3OH -m comment --comment ns4/svc4:p80 -s 10.180.0.7 -j KUBE-MARK-MASQ
        -A KUBE-SEP-KV4FMR6WJFBQE3OH -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.7:80
        -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
        -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.7:80" -j KUBE-SEP-KV4FMR6WJFBQE3OH
        :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
        -X KUBE-SEP-C6EBXVWJJZMIWKLZ
        COMMIT
        """)
    assert endpoint_chain_name("ns4/svc4:p80", "tcp", "10.180.0.7:80") == "KUBE-SEP-KV4FMR6WJFBQE3OH"
    assert changed_service_ports(new, old, full=False) == {"ns4/svc4:p80/TCP"}


def test_nothing_changed_writes_nothing() -> None:
    old, new = render(small_state(), NODE), render(small_state(), NODE)
    assert restore_input(new, old) == ""
    assert changed_service_ports(new, old, full=False) == set()
    # A full sync rewrites every service port, and counts the ones it deletes too.
    fewer = dataclasses.replace(small_state(), services=small_state().services[1:])
    assert changed_service_ports(new, old, full=True) == {svc.key for svc in small_state().services}
    assert changed_service_ports(render(fewer, NODE), old, full=True) == {svc.key for svc in small_state().services}
    assert changed_service_ports(render(fewer, NODE), None, full=True) == {svc.key for svc in fewer.services}


def test_a_service_gaining_endpoints_rewrites_the_top_level_chains_it_changes() -> None:
    state = small_state()
    svc = state.services[0]
    without = dataclasses.replace(state, endpoints={**state.endpoints, svc.key: []})
    # filter: the REJECT goes; nat: the jump into the service comes back, with its chains.
    assert restore_input(render(state, NODE), render(without, NODE)) == textwrap.dedent("""\
        *filter
        :KUBE-SERVICES - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
        COMMIT
        *nat
        :KUBE-SERVICES - [0:0]
        :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
        -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
        -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
        -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        COMMIT
        """)
    # Its lines in the shared chains changed, not those of the others sharing them.
    assert changed_service_ports(render(state, NODE), render(without, NODE), full=False) == {svc.key}


def _full_text(state: ProxyState, **kwargs) -> str:
    chunks: list[str] = []
    write_full_restore(state, NODE, chunks.append, **kwargs)
    return "".join(chunks)


# The full sync of small_state(): nat first, as it renders, each service port's chains declared
# and written with its KUBE-SERVICES/KUBE-NODEPORTS lines; each table starts with the chain-less
# -Z that spares iptables-nft its quadratic chain list.
FULL_EXPECTED = textwrap.dedent("""\
    *nat
    -Z
    :KUBE-SERVICES - [0:0]
    :KUBE-NODEPORTS - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
    -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-X27LE4BHSL4DOUIK -m comment --comment "ns3/svc3:p80 -> 10.180.0.3:80" -j KUBE-SEP-OYPFS5VJICHGATKP
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-OYPFS5VJICHGATKP -m comment --comment ns3/svc3:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
    -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
    -A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
    -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
    COMMIT
    *filter
    -Z
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    COMMIT
    """)


def test_a_full_sync_writes_the_rendered_rules_declaring_each_chain_before_a_jump_to_it() -> None:
    text = _full_text(small_state())
    assert text == FULL_EXPECTED
    lines = text.splitlines()
    # The same rules as kproxy render's kube-proxy layout (which has no -Z).
    expected = render(small_state(), NODE).text().splitlines()
    assert "-Z" not in expected
    assert sorted(l for l in lines if l.startswith("-A")) == sorted(l for l in expected if l.startswith("-A"))
    declared: set[str] = set()
    for line in lines:
        if line.startswith("*"):
            declared = set()
        elif line.startswith(":"):
            declared.add(line[1:].split()[0])
        elif line.startswith("-A"):
            target = line.split(" -j ")[-1].split()[0]
            assert not target.startswith("KUBE-") or target in declared, line


def test_a_full_sync_deletes_stale_chains_and_adds_missing_jumps() -> None:
    ruleset = render(small_state(), NODE)
    leftovers = Leftovers(stale=[("nat", "KUBE-SVC-AAAAAAAAAAAAAAAA")], missing_jumps=[ruleset.jumps[-1]],
                          unlink=[("nat", "-A OUTPUT -j KUBE-SVC-AAAAAAAAAAAAAAAA")])
    text = _full_text(small_state(), find_leftovers=lambda desired: leftovers)
    nat_end, filter_end = "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\nCOMMIT\n", "RELATED,ESTABLISHED -j ACCEPT\nCOMMIT\n"
    assert text == FULL_EXPECTED.replace(nat_end, nat_end.replace("COMMIT\n", (
        "-D OUTPUT -j KUBE-SVC-AAAAAAAAAAAAAAAA\n"  # unlinked,
        ":KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n"  # flushed
        "-X KUBE-SVC-AAAAAAAAAAAAAAAA\n"  # and deleted
        "COMMIT\n"))).replace(filter_end, filter_end.replace(
            "COMMIT\n", "-I OUTPUT 1 -j KUBE-FIREWALL\nCOMMIT\n"))  # the last jump of the list: kubelet's
    # A chain still desired is never deleted, even if the scan calls it stale.
    keep = Leftovers(stale=[("nat", "KUBE-SERVICES")])
    assert _full_text(small_state(), find_leftovers=lambda desired: keep) == FULL_EXPECTED


def test_parse_save_reads_counters_and_chains() -> None:
    saved = parse_save(textwrap.dedent("""\
        # Generated by iptables-save
        *nat
        :PREROUTING ACCEPT [3:180]
        :KUBE-SERVICES - [0:0]
        :CNI-abc - [0:0]
        [7:420] -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
        [0:0] -A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-XPGD46QRK7WJZT7O
        COMMIT
        """))
    assert saved["nat"] == {"PREROUTING": ['-A PREROUTING -m comment --comment "kubernetes service portals" '
                                           "-j KUBE-SERVICES"],
                            "KUBE-SERVICES": ["-A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-XPGD46QRK7WJZT7O"],
                            "CNI-abc": []}


def test_cleanup_deletes_our_chains_and_the_jumps_into_them_and_nothing_else() -> None:
    saved = parse_save(textwrap.dedent("""\
        *nat
        :PREROUTING ACCEPT [0:0]
        :KUBE-SERVICES - [0:0]
        :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
        :CNI-abc - [0:0]
        -A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES
        -A PREROUTING -j CNI-abc
        -A CNI-abc -j KUBE-SVC-XPGD46QRK7WJZT7O
        -A KUBE-SERVICES -d 10.96.0.1/32 -j KUBE-SVC-XPGD46QRK7WJZT7O
        COMMIT
        *filter
        :FORWARD ACCEPT [0:0]
        -A FORWARD -j ACCEPT
        COMMIT
        """))
    assert removal_input(saved, is_own_chain).splitlines() == [
        "*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]",
        '-D PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        "-D CNI-abc -j KUBE-SVC-XPGD46QRK7WJZT7O",
        "-X KUBE-SERVICES", "-X KUBE-SVC-XPGD46QRK7WJZT7O", "COMMIT"]


def test_a_render_cache_gives_the_same_rules_and_rerenders_only_what_changed() -> None:
    cache = RenderCache()
    first = render(small_state(), NODE, cache=cache)
    assert first.tables == render(small_state(), NODE).tables
    state = small_state()
    changed = _changed(state)
    again = render(state, NODE, cache=cache)
    assert again.tables == changed.tables and again.owners == changed.owners
    # svc1 did not change: its chain is the very tuple rendered the first time; svc4's is new.
    svc1, svc4 = "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SVC-4SW47YFZTEDKD3PK"
    assert again.tables["nat"][svc1] is first.tables["nat"][svc1]
    assert again.tables["nat"][svc4] != first.tables["nat"][svc4]
    # Crossing the large-cluster line re-renders everything: the endpoint comments go.
    many = ProxyState([*state.services], {**state.endpoints, state.services[0].key: [
        Endpoint(f"10.181.{i // 250}.{i % 250}", 80, "n") for i in range(LARGE_CLUSTER_ENDPOINTS)]})
    assert render(many, NODE, cache=cache).tables == render(many, NODE).tables
    assert "->" not in "".join(render(many, NODE, cache=cache).tables["nat"][svc4])


def test_rendering_a_trackers_changes_gives_what_rendering_everything_gives() -> None:
    import random

    from kproxy.proxy.source import StateTracker

    rng = random.Random(7)

    def service(i: int, node_port: bool) -> dict:
        port = {"name": "http", "port": 80, "protocol": "TCP", **({"nodePort": 30000 + i} if node_port else {})}
        return {"kind": "Service", "metadata": {"name": f"s{i}", "namespace": "ns"},
                "spec": {"type": "NodePort" if node_port else "ClusterIP", "clusterIP": f"10.96.0.{i}",
                         "ports": [port]}}

    def endpoints(i: int, count: int) -> dict:
        return {"kind": "EndpointSlice", "metadata": {"name": f"s{i}", "namespace": "ns",
                                                       "labels": {"kubernetes.io/service-name": f"s{i}"}},
                "endpoints": [{"addresses": [f"10.244.{i}.{k}"], "conditions": {"ready": True}}
                              for k in range(count)],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}

    objects = {}
    for i in range(40):
        objects[f"Service/ns/s{i}"] = service(i, i % 3 == 0)
        objects[f"EndpointSlice/ns/s{i}"] = endpoints(i, i % 4)
    tracker, cache = StateTracker(), RenderCache()
    previous = render(tracker.update(objects), NODE, cache=cache)
    previous_whole = render(tracker.update(objects), NODE)
    assert previous.tables == previous_whole.tables
    for step in range(60):
        i = rng.randrange(45)
        what = rng.choice(["endpoints", "endpoints", "service", "delete", "many"])
        if what == "delete":
            changed = {f"Service/ns/s{i}", f"EndpointSlice/ns/s{i}"}
            for key in changed:
                objects.pop(key, None)
        else:
            changed = {f"EndpointSlice/ns/s{i}"}
            # "many" pushes the total past kube-proxy's large-cluster line (and back, later).
            objects[f"EndpointSlice/ns/s{i}"] = endpoints(i, 250 if what == "many" else rng.randrange(4))
            if what == "service" or f"Service/ns/s{i}" not in objects:
                objects[f"Service/ns/s{i}"] = service(i, rng.random() < 0.5)
                changed.add(f"Service/ns/s{i}")
        state = tracker.update(objects, changed)
        incremental = render(state, NODE, cache=cache)
        whole = render(state, NODE)
        assert incremental.tables == whole.tables, (step, what, i)
        assert incremental.owners == whole.owners
        # A patch keeps its base (for restore_input), but no longer chain of older rulesets.
        assert incremental.base is None or incremental.base.base is None
        # And the partial restore written from the patch is the one written from comparing everything.
        assert restore_input(incremental, previous) == restore_input(whole, previous_whole)
        assert (changed_service_ports(incremental, previous, full=False)
                == changed_service_ports(whole, previous_whole, full=False))
        previous, previous_whole = incremental, whole
