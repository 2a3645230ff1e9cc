"""The iptables mode's rendering, without root: names, rules and restore text as kube-proxy writes them.

Expected texts come from kube-proxy's own pkg/proxy/iptables/proxier_test.go, so the chain
hashes below are kube-proxy's, not ours recomputed, and its conventions hold: the node
test-node at 192.168.0.2, pods (and the cluster CIDR) in 10.0.0.0/8, ClusterIPs 172.30.x.x,
external IPs 192.168.99.x, load-balancer IPs 1.2.3.4 and 5.6.7.8. Its expected texts are
grouped per chain (KUBE-NODEPORTS, KUBE-SERVICES first, then sorted), which is our order too.

- TestOverallIPTablesRules as of 1.31/1.32 (with svc5's session affinity; klog ktesting,
  nfacct counters): EXPECTED.
- As of 1.28, when more tests still asserted whole texts (pointer.*, testHostname, no
  nfacct): TestLoadBalancer, TestExternalTrafficPolicyLocal, TestNonLocalExternalIPs,
  TestEnableLocalhostNodePortsIPv4 / TestDisableLocalhostNodePortsIPv4,
  TestInternalTrafficPolicyE2E, TestTerminatingEndpointsTrafficPolicyLocal / Cluster.
  (Later versions check these services with packet-flow traces only; the rules are the same.)

Two differences from kube-proxy's fake proxier, both as a real kube-proxy writes the rules
without nfacct and with an iptables that has --random-fully: KUBE-FORWARD drops INVALID
without "-m nfacct" and there are no nfacct-counted 127.0.0.0/8 NodePort rules, and
MASQUERADE has --random-fully (kube-proxy's fake iptables says it lacks it: ``real_node``).
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
    service_chain_names,
    write_full_restore,
)
from kproxy.proxy.saved import parse_save, removal_input
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo(name="test-node", ip="192.168.0.2", cluster_cidr="10.0.0.0/8")


def real_node(text: str) -> str:
    """A kube-proxy expectation as a real node has it: MASQUERADE --random-fully."""
    return textwrap.dedent(text).replace(" -j MASQUERADE\n", " -j MASQUERADE --random-fully\n")


@pytest.mark.parametrize(("name", "protocol", "kind", "expected"), [
    # From TestOverallIPTablesRules.
    ("ns1/svc1:p80", "tcp", "cluster", "KUBE-SVC-XPGD46QRK7WJZT7O"),
    ("ns2/svc2:p80", "tcp", "cluster", "KUBE-SVC-GNZBNJ2PO5MGZ6GT"),
    ("ns3/svc3:p80", "tcp", "cluster", "KUBE-SVC-X27LE4BHSL4DOUIK"),
    ("ns4/svc4:p80", "tcp", "cluster", "KUBE-SVC-4SW47YFZTEDKD3PK"),
    ("ns5/svc5:p80", "tcp", "cluster", "KUBE-SVC-NUKIZ6OKUXPJNT4C"),
    ("ns3/svc3:p80", "tcp", "external", "KUBE-EXT-X27LE4BHSL4DOUIK"),
    ("ns2/svc2:p80", "tcp", "external", "KUBE-EXT-GNZBNJ2PO5MGZ6GT"),
    ("ns5/svc5:p80", "tcp", "firewall", "KUBE-FW-NUKIZ6OKUXPJNT4C"),
    # From TestExternalTrafficPolicyLocal, TestLoadBalancer, TestInternalTrafficPolicyE2E.
    ("ns1/svc1:p80", "tcp", "local", "KUBE-SVL-XPGD46QRK7WJZT7O"),
    ("ns1/svc1:p80", "tcp", "firewall", "KUBE-FW-XPGD46QRK7WJZT7O"),
    ("ns1/svc1", "tcp", "local", "KUBE-SVL-AQI2S6QIMU7PVVRP"),
    ("ns1/svc1", "TCP", "external", "KUBE-EXT-AQI2S6QIMU7PVVRP"),  # the protocol is lowercased
])
def test_service_chain_names_are_kube_proxys(name, protocol, kind, expected) -> None:
    assert getattr(service_chain_names(name, protocol), kind) == expected


@pytest.mark.parametrize(("name", "endpoint", "expected"), [
    ("ns1/svc1:p80", "10.180.0.1:80", "KUBE-SEP-SXIVWICOYRO3J4NJ"),
    ("ns2/svc2:p80", "10.180.0.2:80", "KUBE-SEP-RS4RBKLTHTF2IUXJ"),
    ("ns3/svc3:p80", "10.180.0.3:80", "KUBE-SEP-OYPFS5VJICHGATKP"),
    ("ns4/svc4:p80", "10.180.0.4:80", "KUBE-SEP-UKSFD7AGPMPPLUHC"),
    ("ns4/svc4:p80", "10.180.0.5:80", "KUBE-SEP-C6EBXVWJJZMIWKLZ"),
    ("ns5/svc5:p80", "10.180.0.3:80", "KUBE-SEP-I77PXRDZVX7PMWMN"),
    ("ns1/svc1:p80", "10.180.2.1:80", "KUBE-SEP-ZX7GRIZKSNUQ3LAJ"),
    ("ns1/svc1", "10.0.1.1:80", "KUBE-SEP-3JOIVZTXZZRGORX4"),
])
def test_endpoint_chain_names_are_kube_proxys(name, endpoint, expected) -> None:
    assert endpoint_chain_name(name, "tcp", endpoint) == expected


def test_protocol_case_and_port_name_enter_the_hash() -> None:
    assert service_chain_names("ns1/svc1:p80", "udp").cluster != "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert service_chain_names("ns1/svc1", "tcp").cluster != "KUBE-SVC-XPGD46QRK7WJZT7O"
    assert ServicePort("ns1", "svc1", "", "TCP", "10.96.0.1", 80).service_port_name == "ns1/svc1"


def ep(ip: str, node: str = "", *, ready: bool = True, serving: bool = True, terminating: bool = False,
       port: int = 80) -> Endpoint:
    """An endpoint as kube-proxy's tests give them: on no node unless told (NodeName unset)."""
    return Endpoint(ip, port, node, ready=ready, terminating=terminating, serving=serving)


LOCAL = NODE.name


def small_state() -> ProxyState:
    """TestOverallIPTablesRules' services and endpoints."""
    services = [
        ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80),  # ClusterIP
        ServicePort("ns2", "svc2", "p80", "TCP", "172.30.0.42", 80, node_port=3001,  # LoadBalancer, Local
                    external_ips=("192.168.99.22",), load_balancer_ips=("1.2.3.4",), external_policy_local=True,
                    health_check_node_port=30000),
        ServicePort("ns3", "svc3", "p80", "TCP", "172.30.0.43", 80, node_port=3003),  # NodePort
        ServicePort("ns4", "svc4", "p80", "TCP", "172.30.0.44", 80, external_ips=("192.168.99.33",)),  # external IP
        ServicePort("ns5", "svc5", "p80", "TCP", "172.30.0.45", 80, node_port=3002,  # LoadBalancer, Cluster,
                    load_balancer_ips=("5.6.7.8",), source_ranges=("203.0.113.0/25",),  # (given " 203...")
                    affinity_seconds=10800),
        ServicePort("ns6", "svc6", "p80", "TCP", "172.30.0.46", 80),  # no (usable) endpoints
    ]
    endpoints = {
        services[0].key: [ep("10.180.0.1")],
        services[1].key: [ep("10.180.0.2")],  # on no node: not local, so svc2 has no local endpoint
        services[2].key: [ep("10.180.0.3")],
        # given out of order, and with a not-ready one: kube-proxy sorts and skips it
        services[3].key: [ep("10.180.0.5", LOCAL), ep("10.180.0.9", "node2", ready=False), ep("10.180.0.4")],
        services[4].key: [ep("10.180.0.3")],
        # terminating and no longer serving: not even a fallback
        services[5].key: [ep("10.180.0.6", LOCAL, ready=False, serving=False, terminating=True)],
    }
    return ProxyState(services=services, endpoints=endpoints)


EXPECTED = textwrap.dedent("""\
    *filter
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXTERNAL-SERVICES - [0:0]
    :KUBE-FIREWALL - [0:0]
    :KUBE-FORWARD - [0:0]
    :KUBE-PROXY-FIREWALL - [0:0]
    -A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
    COMMIT
    *nat
    :KUBE-NODEPORTS - [0:0]
    :KUBE-SERVICES - [0:0]
    :KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-EXT-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-MARK-MASQ - [0:0]
    :KUBE-POSTROUTING - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    :KUBE-SEP-OYPFS5VJICHGATKP - [0:0]
    :KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
    :KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-X27LE4BHSL4DOUIK - [0:0]
    :KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns3/svc3:p80 -m tcp -p tcp --dport 3003 -j KUBE-EXT-X27LE4BHSL4DOUIK
    -A KUBE-NODEPORTS -m comment --comment ns5/svc5:p80 -m tcp -p tcp --dport 3002 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
    -A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-EXT-X27LE4BHSL4DOUIK -m comment --comment "masquerade traffic for ns3/svc3:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-X27LE4BHSL4DOUIK -j KUBE-SVC-X27LE4BHSL4DOUIK
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
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
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
    -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
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


def test_masquerade_all_masquerades_every_cluster_ip_client_even_pods() -> None:
    # kube-proxy's --masquerade-all: the internal chain's first rule loses its "! -s <cluster CIDR>".
    assert EXPECTED.count(" ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ") == 5  # one per KUBE-SVC- chain
    expected = EXPECTED.replace(" ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ", " -j KUBE-MARK-MASQ")
    assert render(small_state(), dataclasses.replace(NODE, masquerade_all=True)).text() == expected
    # Also without a cluster CIDR (no local-traffic detector), and not the short-circuit rules.
    no_cidr = dataclasses.replace(NODE, cluster_cidr="", masquerade_all=True)
    assert render(small_state(), no_cidr).text() == expected.replace(
        '-A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" '
        "-s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT\n", "")


def svc1(**fields) -> ServicePort:
    """kube-proxy's usual ns1/svc1:p80 at 172.30.0.41:80."""
    return ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80, **fields)


def state_of(svc: ServicePort, *endpoints: Endpoint) -> ProxyState:
    return ProxyState([svc], {svc.key: list(endpoints)})


def test_jumps_from_builtin_chains_are_kube_proxys() -> None:
    specs = {(j.table, j.chain, j.spec) for j in render(small_state(), NODE).jumps}
    new = "-m conntrack --ctstate NEW -m comment --comment"
    assert specs == {
        ("filter", "INPUT", f'{new} "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES'),
        ("filter", "FORWARD", f'{new} "kubernetes externally-visible service portals" -j KUBE-EXTERNAL-SERVICES'),
        ("filter", "INPUT", '-m comment --comment "kubernetes health check service ports" -j KUBE-NODEPORTS'),
        ("filter", "FORWARD", f'{new} "kubernetes service portals" -j KUBE-SERVICES'),
        ("filter", "OUTPUT", f'{new} "kubernetes service portals" -j KUBE-SERVICES'),
        ("filter", "FORWARD", '-m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD'),
        ("filter", "INPUT", f'{new} "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL'),
        ("filter", "OUTPUT", f'{new} "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL'),
        ("filter", "FORWARD", f'{new} "kubernetes load balancer firewall" -j KUBE-PROXY-FIREWALL'),
        ("nat", "OUTPUT", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
        ("nat", "PREROUTING", '-m comment --comment "kubernetes service portals" -j KUBE-SERVICES'),
        ("nat", "POSTROUTING", '-m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING'),
        ("filter", "INPUT", "-j KUBE-FIREWALL"),  # kubelet's, with localhost NodePorts
        ("filter", "OUTPUT", "-j KUBE-FIREWALL"),
    }


def test_without_endpoints_a_service_port_is_rejected_at_every_address() -> None:
    # (TestNoEndpointsReject's service, a UDP NodePort here.)
    svc = ServicePort("ns7", "svc7", "", "UDP", "172.30.0.47", 53, node_port=30053, external_ips=("192.168.99.11",),
                      load_balancer_ips=("1.2.3.4",), source_ranges=("203.0.113.0/25",))
    ruleset = render(ProxyState([svc], {}), NODE)
    why = '-m comment --comment "ns7/svc7 has no endpoints"'
    assert ruleset.tables["filter"]["KUBE-SERVICES"] == (
        f"-A KUBE-SERVICES {why} -m udp -p udp -d 172.30.0.47 --dport 53 -j REJECT",)
    assert ruleset.tables["filter"]["KUBE-EXTERNAL-SERVICES"] == (
        f"-A KUBE-EXTERNAL-SERVICES {why} -m udp -p udp -d 192.168.99.11 --dport 53 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {why} -m udp -p udp -d 1.2.3.4 --dport 53 -j REJECT",
        f"-A KUBE-EXTERNAL-SERVICES {why} -m addrtype --dst-type LOCAL -m udp -p udp --dport 30053 -j REJECT")
    # No nat chain of its own, and no firewall: a REJECT needs none.
    assert set(ruleset.tables["nat"]) == {"KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"}
    assert ruleset.tables["filter"]["KUBE-PROXY-FIREWALL"] == ()


def test_three_endpoints_get_one_third_then_one_half_then_the_rest() -> None:
    svc = svc1()
    eps = [ep(f"10.180.0.{i}") for i in (1, 2, 3)]
    seps = [endpoint_chain_name("ns1/svc1:p80", "tcp", e.address) for e in eps]
    rules = render(state_of(svc, *eps), NODE).tables["nat"]["KUBE-SVC-XPGD46QRK7WJZT7O"]
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
    svc = svc1()
    eps = [ep("10.0.0.2"), ep("10.0.0.10"), ep("10.0.0.2"), ep("10.0.0.3", ready=False)]
    rules = render(state_of(svc, *eps), NODE).tables["nat"]["KUBE-SVC-XPGD46QRK7WJZT7O"]
    assert [rule.split('"')[1] for rule in rules[1:]] == ["ns1/svc1:p80 -> 10.0.0.10:80", "ns1/svc1:p80 -> 10.0.0.2:80"]


def test_large_clusters_drop_endpoint_comments() -> None:
    services = [ServicePort("ns", f"s{i}", "", "TCP", f"10.96.{i // 256}.{i % 256}", 80) for i in range(500)]
    eps = {s.key: [ep(f"10.244.{i // 128}.{2 * (i % 128)}"), ep(f"10.244.{i // 128}.{2 * (i % 128) + 1}")]
           for i, s in enumerate(services)}
    sep0, sep1 = (endpoint_chain_name("ns/s0", "tcp", f"10.244.0.{i}:80") for i in (0, 1))
    assert "-m comment" in render(ProxyState(services, eps), NODE).tables["nat"][sep0][0]  # 1000: not yet
    # kube-proxy counts every endpoint, usable or not: one more not-ready one makes 1001.
    eps[services[0].key].append(ep("10.245.0.1", ready=False))
    nat = render(ProxyState(services, eps), NODE).tables["nat"]
    assert nat[sep0] == (f"-A {sep0} -s 10.244.0.0 -j KUBE-MARK-MASQ",
                         f"-A {sep0} -m tcp -p tcp -j DNAT --to-destination 10.244.0.0:80")
    svc = service_chain_names("ns/s0", "tcp").cluster
    assert nat[svc] == (  # the cluster IP comment stays: it is not per endpoint
        f'-A {svc} -m comment --comment "ns/s0 cluster IP" -m tcp -p tcp -d 10.96.0.0 --dport 80 '
        "! -s 10.0.0.0/8 -j KUBE-MARK-MASQ",
        f"-A {svc} -m statistic --mode random --probability 0.5000000000 -j {sep0}",
        f"-A {svc} -j {sep1}")


def test_localhost_nodeports_off_excludes_loopback_and_kubelet_firewall() -> None:
    got = render(small_state(), NODE, localhost_nodeports=False, conntrack_tcp_liberal=True).text()
    # EXPECTED without kubelet's KUBE-FIREWALL and the INVALID drop, and with 127.0.0.0/8 kept out of NodePorts.
    expected = [line for line in EXPECTED.splitlines() if "KUBE-FIREWALL" not in line and "INVALID" not in line]
    nodeports = expected.index('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
                               'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    expected[nodeports] = expected[nodeports].replace("LOCAL -j", "LOCAL ! -d 127.0.0.0/8 -j")
    assert got.splitlines() == expected


@pytest.mark.parametrize(("addresses", "tails"), [
    (("192.168.0.0/24",), ["-d 192.168.0.2"]),  # kube-proxy's --nodeport-addresses: a rule per node address
    (("primary",), ["-d 192.168.0.2"]),
    (("10.99.0.0/16",), []),  # none of the node's: no NodePort answers
])
def test_node_port_addresses_send_only_those_addresses_to_the_node_ports(addresses, tails) -> None:
    node = dataclasses.replace(NODE, node_port_addresses=addresses)
    got = render(small_state(), node).text().splitlines()
    expected = EXPECTED.splitlines()
    tail = expected.index('-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must '
                          'be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS')
    expected[tail:tail + 1] = [expected[tail].replace("-m addrtype --dst-type LOCAL", destination)
                               for destination in tails]
    assert got == expected


def _changed(state: ProxyState) -> Ruleset:
    svc4 = state.services[3]
    state.endpoints[svc4.key] = [ep("10.180.0.4", "node2"), ep("10.180.0.7", LOCAL)]
    return render(state, NODE)


def test_partial_restore_only_touches_changed_chains() -> None:
    old = render(small_state(), NODE)
    new = _changed(small_state())
    # Only ns4's SVC chain, its new SEP and its gone SEP, all nat: no filter section at all. Untouched
    # services' chains (ns4's KUBE-EXT- too) are not even mentioned.
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
        -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
        -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
        -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
        -A KUBE-SERVICES -m comment --comment "ns3/svc3:p80 cluster IP" -m tcp -p tcp -d 172.30.0.43 --dport 80 -j KUBE-SVC-X27LE4BHSL4DOUIK
        -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
        -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
        -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
        -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
        -A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -s 10.180.0.1 -j KUBE-MARK-MASQ
        -A KUBE-SEP-SXIVWICOYRO3J4NJ -m comment --comment ns1/svc1:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.1:80
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j KUBE-SEP-SXIVWICOYRO3J4NJ
        COMMIT
        """)
    # Its lines in the shared chains changed, not those of the others sharing them.
    assert changed_service_ports(render(state, NODE), render(without, NODE), full=False) == {svc.key}


def test_a_local_endpoint_arriving_adds_the_local_chain_and_lifts_the_drops() -> None:
    # svc2 (Local policy) gets an endpoint on this node: its KUBE-SVL- chain appears, KUBE-EXT- ends
    # in it, and the "has no local endpoints" DROPs go (KUBE-EXTERNAL-SERVICES is flushed empty).
    state = small_state()
    svc2 = state.services[1]
    local = dataclasses.replace(state, endpoints={**state.endpoints, svc2.key: [ep("10.180.0.2"),
                                                                                ep("10.180.2.2", LOCAL)]})
    assert restore_input(render(local, NODE), render(state, NODE)) == textwrap.dedent("""\
        *filter
        :KUBE-EXTERNAL-SERVICES - [0:0]
        COMMIT
        *nat
        :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
        :KUBE-SEP-YVURCJ2PNPRIOEBP - [0:0]
        :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
        :KUBE-SVL-GNZBNJ2PO5MGZ6GT - [0:0]
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
        -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -j KUBE-SVL-GNZBNJ2PO5MGZ6GT
        -A KUBE-SEP-YVURCJ2PNPRIOEBP -m comment --comment ns2/svc2:p80 -s 10.180.2.2 -j KUBE-MARK-MASQ
        -A KUBE-SEP-YVURCJ2PNPRIOEBP -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.2.2:80
        -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
        -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-RS4RBKLTHTF2IUXJ
        -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.2.2:80" -j KUBE-SEP-YVURCJ2PNPRIOEBP
        -A KUBE-SVL-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.2.2:80" -j KUBE-SEP-YVURCJ2PNPRIOEBP
        COMMIT
        """)


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
    :KUBE-EXT-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-SVC-GNZBNJ2PO5MGZ6GT - [0:0]
    :KUBE-SEP-RS4RBKLTHTF2IUXJ - [0:0]
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "pod traffic for ns2/svc2:p80 external destinations" -s 10.0.0.0/8 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "masquerade LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ
    -A KUBE-EXT-GNZBNJ2PO5MGZ6GT -m comment --comment "route LOCAL traffic for ns2/svc2:p80 external destinations" -m addrtype --src-type LOCAL -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-GNZBNJ2PO5MGZ6GT -m comment --comment "ns2/svc2:p80 -> 10.180.0.2:80" -j KUBE-SEP-RS4RBKLTHTF2IUXJ
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -s 10.180.0.2 -j KUBE-MARK-MASQ
    -A KUBE-SEP-RS4RBKLTHTF2IUXJ -m comment --comment ns2/svc2:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.2:80
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 cluster IP" -m tcp -p tcp -d 172.30.0.42 --dport 80 -j KUBE-SVC-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 external IP" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-SERVICES -m comment --comment "ns2/svc2:p80 loadbalancer IP" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
    -A KUBE-NODEPORTS -m comment --comment ns2/svc2:p80 -m tcp -p tcp --dport 3001 -j KUBE-EXT-GNZBNJ2PO5MGZ6GT
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
    :KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]
    :KUBE-SEP-UKSFD7AGPMPPLUHC - [0:0]
    :KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]
    -A KUBE-EXT-4SW47YFZTEDKD3PK -m comment --comment "masquerade traffic for ns4/svc4:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-4SW47YFZTEDKD3PK -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.4:80" -m statistic --mode random --probability 0.5000000000 -j KUBE-SEP-UKSFD7AGPMPPLUHC
    -A KUBE-SVC-4SW47YFZTEDKD3PK -m comment --comment "ns4/svc4:p80 -> 10.180.0.5:80" -j KUBE-SEP-C6EBXVWJJZMIWKLZ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -s 10.180.0.4 -j KUBE-MARK-MASQ
    -A KUBE-SEP-UKSFD7AGPMPPLUHC -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.4:80
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -s 10.180.0.5 -j KUBE-MARK-MASQ
    -A KUBE-SEP-C6EBXVWJJZMIWKLZ -m comment --comment ns4/svc4:p80 -m tcp -p tcp -j DNAT --to-destination 10.180.0.5:80
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 cluster IP" -m tcp -p tcp -d 172.30.0.44 --dport 80 -j KUBE-SVC-4SW47YFZTEDKD3PK
    -A KUBE-SERVICES -m comment --comment "ns4/svc4:p80 external IP" -m tcp -p tcp -d 192.168.99.33 --dport 80 -j KUBE-EXT-4SW47YFZTEDKD3PK
    :KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]
    :KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -m comment --comment "masquerade traffic for ns5/svc5:p80 external destinations" -j KUBE-MARK-MASQ
    -A KUBE-EXT-NUKIZ6OKUXPJNT4C -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 loadbalancer IP" -s 203.0.113.0/25 -j KUBE-EXT-NUKIZ6OKUXPJNT4C
    -A KUBE-FW-NUKIZ6OKUXPJNT4C -m comment --comment "other traffic to ns5/svc5:p80 will be dropped by KUBE-PROXY-FIREWALL"
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 ! -s 10.0.0.0/8 -j KUBE-MARK-MASQ
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --rcheck --seconds 10800 --reap -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SVC-NUKIZ6OKUXPJNT4C -m comment --comment "ns5/svc5:p80 -> 10.180.0.3:80" -j KUBE-SEP-I77PXRDZVX7PMWMN
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -s 10.180.0.3 -j KUBE-MARK-MASQ
    -A KUBE-SEP-I77PXRDZVX7PMWMN -m comment --comment ns5/svc5:p80 -m recent --name KUBE-SEP-I77PXRDZVX7PMWMN --set -m tcp -p tcp -j DNAT --to-destination 10.180.0.3:80
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 cluster IP" -m tcp -p tcp -d 172.30.0.45 --dport 80 -j KUBE-SVC-NUKIZ6OKUXPJNT4C
    -A KUBE-SERVICES -m comment --comment "ns5/svc5:p80 loadbalancer IP" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j KUBE-FW-NUKIZ6OKUXPJNT4C
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
    -A KUBE-NODEPORTS -m comment --comment "ns2/svc2:p80 health check node port" -m tcp -p tcp --dport 30000 -j ACCEPT
    -A KUBE-SERVICES -m comment --comment "ns6/svc6:p80 has no endpoints" -m tcp -p tcp -d 172.30.0.46 --dport 80 -j REJECT
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 192.168.99.22 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m tcp -p tcp -d 1.2.3.4 --dport 80 -j DROP
    -A KUBE-EXTERNAL-SERVICES -m comment --comment "ns2/svc2:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp -p tcp --dport 3001 -j DROP
    -A KUBE-FIREWALL -m comment --comment "block incoming localnet connections" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP
    -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
    -A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
    -A KUBE-PROXY-FIREWALL -m comment --comment "ns5/svc5:p80 traffic not accepted by KUBE-FW-NUKIZ6OKUXPJNT4C" -m tcp -p tcp -d 5.6.7.8 --dport 80 -j DROP
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
    nat_end = "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\nCOMMIT\n"
    with_nat = FULL_EXPECTED.replace(nat_end, nat_end.replace("COMMIT\n", (
        "-D OUTPUT -j KUBE-SVC-AAAAAAAAAAAAAAAA\n"  # unlinked,
        ":KUBE-SVC-AAAAAAAAAAAAAAAA - [0:0]\n"  # flushed
        "-X KUBE-SVC-AAAAAAAAAAAAAAAA\n"  # and deleted
        "COMMIT\n")))
    assert with_nat.endswith("COMMIT\n")  # the filter table's end: the last jump of the list (kubelet's) goes there
    assert text == with_nat.removesuffix("COMMIT\n") + "-I OUTPUT 1 -j KUBE-FIREWALL\nCOMMIT\n"
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
    chain1, chain4 = "KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SVC-4SW47YFZTEDKD3PK"
    assert again.tables["nat"][chain1] is first.tables["nat"][chain1]
    assert again.tables["nat"][chain4] != first.tables["nat"][chain4]
    # Crossing the large-cluster line re-renders everything: the endpoint comments go.
    many = ProxyState([*state.services], {**state.endpoints, state.services[0].key: [
        ep(f"10.181.{i // 250}.{i % 250}") for i in range(LARGE_CLUSTER_ENDPOINTS)]})
    assert render(many, NODE, cache=cache).tables == render(many, NODE).tables
    assert "->" not in "".join(render(many, NODE, cache=cache).tables["nat"][chain4])
    # A node of another name sees other endpoints as local: nothing cached is reused for it.
    other = dataclasses.replace(NODE, name="node2")
    assert render(small_state(), other, cache=cache).tables == render(small_state(), other).tables


def test_rendering_a_trackers_changes_gives_what_rendering_everything_gives() -> None:
    import random

    from kproxy.proxy.source import StateTracker

    rng = random.Random(7)

    def service(i: int) -> dict:
        """Any type and policy, and now and then load-balancer source ranges, external IPs."""
        kind = rng.choice(["ClusterIP", "NodePort", "LoadBalancer"])
        port = {"name": "http", "port": 80, "protocol": "TCP", **({"nodePort": 30000 + i} if kind != "ClusterIP" else {})}
        spec = {"type": kind, "clusterIP": f"10.96.0.{i}", "ports": [port],
                "internalTrafficPolicy": rng.choice(["Cluster", "Local"]),
                "externalTrafficPolicy": rng.choice(["Cluster", "Local"])}
        if rng.random() < 0.3:
            spec["externalIPs"] = [f"192.168.99.{i}"]
        status: dict = {}
        if kind == "LoadBalancer":
            status = {"loadBalancer": {"ingress": [{"ip": f"1.2.3.{i}"}]}}
            spec["loadBalancerSourceRanges"] = rng.choice([[], ["203.0.113.0/25"], ["192.168.0.0/24"]])
            if spec["externalTrafficPolicy"] == "Local":
                spec["healthCheckNodePort"] = 32000 + i
        return {"kind": "Service", "metadata": {"name": f"s{i}", "namespace": "ns"}, "spec": spec, "status": status}

    def endpoints(i: int, count: int) -> dict:
        """Here or elsewhere, ready, serving-terminating or neither."""
        conditions = [{"ready": True}, {"ready": False, "serving": True, "terminating": True},
                      {"ready": False, "serving": False, "terminating": True}]
        return {"kind": "EndpointSlice", "metadata": {"name": f"s{i}", "namespace": "ns",
                                                       "labels": {"kubernetes.io/service-name": f"s{i}"}},
                "endpoints": [{"addresses": [f"10.244.{i}.{k}"], "nodeName": rng.choice([LOCAL, "node2"]),
                               "conditions": rng.choice(conditions)} for k in range(count)],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}

    objects = {}
    for i in range(40):
        objects[f"Service/ns/s{i}"] = service(i)
        objects[f"EndpointSlice/ns/s{i}"] = endpoints(i, i % 4)
    tracker, cache = StateTracker(), RenderCache()
    previous = render(tracker.update(objects), NODE, cache=cache)
    previous_whole = render(tracker.update(objects), NODE)
    assert previous.tables == previous_whole.tables
    written: list[str] = []
    for step in range(80):
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
                objects[f"Service/ns/s{i}"] = service(i)
                changed.add(f"Service/ns/s{i}")
        state = tracker.update(objects, changed)
        incremental = render(state, NODE, cache=cache)
        whole = render(state, NODE)
        assert incremental.tables == whole.tables, (step, what, i)
        assert incremental.owners == whole.owners
        # A patch keeps its base (for restore_input), but no longer chain of older rulesets.
        assert incremental.base is None or incremental.base.base is None
        # And the partial restore written from the patch is the one written from comparing everything.
        written.append(restore_input(incremental, previous))
        assert written[-1] == restore_input(whole, previous_whole)
        assert (changed_service_ports(incremental, previous, full=False)
                == changed_service_ports(whole, previous_whole, full=False))
        previous, previous_whole = incremental, whole
    # The walk went through what this is about: the new chains coming and going, and the refusals
    # of a Local policy without a local endpoint.
    writes = "".join(written)
    assert all(word in writes for word in (":KUBE-SVL-", "-X KUBE-SVL-", ":KUBE-FW-", "-X KUBE-FW-",
                                           "has no local endpoints", "health check node port"))
