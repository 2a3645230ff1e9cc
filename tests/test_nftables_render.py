"""nftables mode's render: kube-proxy's text, whole, for the Services of kube-proxy's own
tests (pkg/proxy/nftables/proxier_test.go, the 1.31-1.32 layout) on its fake proxier's node
(test-node, 192.168.0.2, pod CIDR 10.0.0.0/8, service CIDR 172.30.0.0/16,
--nodeport-addresses 192.168.0.2/32), and what each option and setting changes.

TestOverallNFTablesRules is kube-proxy's whole expected text, line for line. Its other
tests of these features (TestExternalTrafficPolicyLocal, TestLoadBalancer,
TestNoEndpointsReject, TestInternalTrafficPolicy, TestTerminatingEndpointsTrafficPolicy*,
TestInternalExternalMasquerade) assert packet flows, not text: their Services and
endpoints are here (``SCENARIOS``), with the whole text kube-proxy's proxier.go writes for
them, compared as kube-proxy's assertNFTablesTransactionEqual compares (sorted, rules in
order); tests/test_nftables_sync.py traces kube-proxy's packet flows through them."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import textwrap
from pathlib import Path
from typing import NamedTuple

import pytest

from kproxy import cli
from kproxy.proxy.nftables import names, render
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo("test-node", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16", ("192.168.0.2/32",))
# EndpointSlice conditions as kube-proxy's tests set them: (ready, serving, terminating)
CONDITIONS = {"ready": (True, True, False), "serving-terminating": (False, True, True),
              "terminating": (False, False, True)}


def ep(ip: str, node: str = "", condition: str = "ready") -> Endpoint:
    """An endpoint on port 80; node "": kube-proxy's endpoints without a NodeName (not local)."""
    ready, serving, terminating = CONDITIONS[condition]
    return Endpoint(ip, 80, node, ready=ready, terminating=terminating, serving=serving)


def port80(namespace: str, name: str, ip: str, port_name: str = "p80", **more: object) -> ServicePort:
    return ServicePort(namespace, name, port_name, "TCP", ip, 80, **more)  # type: ignore[arg-type]


def at(*ips: str) -> list[Endpoint]:
    return [ep(ip) for ip in ips]


def state(*services: tuple[ServicePort, list[Endpoint]]) -> ProxyState:
    return ProxyState(sorted((svc for svc, _ in services), key=lambda svc: svc.key),
                      {svc.key: endpoints for svc, endpoints in services})


# TestOverallNFTablesRules
SVC1 = port80("ns1", "svc1", "172.30.0.41")
SVC2 = port80("ns2", "svc2", "172.30.0.42", node_port=3001, external_ips=("192.168.99.22",),
              load_balancer_ips=("1.2.3.4",), external_policy_local=True, health_check_node_port=30000)
SVC3 = port80("ns3", "svc3", "172.30.0.43", node_port=3003)
SVC4 = port80("ns4", "svc4", "172.30.0.44", external_ips=("192.168.99.33",))
SVC5 = port80("ns5", "svc5", "172.30.0.45", node_port=3002, affinity_seconds=10800, load_balancer_ips=("5.6.7.8",),
              source_ranges=("203.0.113.0/25",))
SVC6 = port80("ns6", "svc6", "172.30.0.46")

KUBE_PROXY_STATE = state((SVC1, at("10.180.0.1")), (SVC2, at("10.180.0.2")), (SVC3, at("10.180.0.3")),
                         (SVC4, [ep("10.180.0.4"), ep("10.180.0.5", "test-node")]), (SVC5, at("10.180.0.3")),
                         (SVC6, []))

KUBE_PROXY_TEXT = """\
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
add chain ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
add chain ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
add chain ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80
add chain ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80
add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80
add chain ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80
add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
add chain ip kube-proxy service-endpoints-check
add chain ip kube-proxy services
add set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { type ipv4_addr ; flags dynamic,timeout ; timeout 10800s ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 ip saddr 10.180.0.5 jump mark-for-masquerade
add rule ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 meta l4proto tcp dnat to 10.180.0.5:80
add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 update @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 { ip saddr }
add rule ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 goto service-HVFWP5L3-ns5/svc5/tcp/p80
add rule ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-LAUZTJTB-ns4/svc4/tcp/p80 goto service-LAUZTJTB-ns4/svc4/tcp/p80
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump firewall-check
add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
add rule ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr != { 203.0.113.0/25 } drop
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 ip daddr 172.30.0.45 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 ip saddr @affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
add rule ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80 }
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 ip daddr 172.30.0.44 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-LAUZTJTB-ns4/svc4/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 , 1 : goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80 }
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element ip kube-proxy cluster-ips { 172.30.0.41 }
add element ip kube-proxy cluster-ips { 172.30.0.42 }
add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy cluster-ips { 172.30.0.44 }
add element ip kube-proxy cluster-ips { 172.30.0.45 }
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 : goto firewall-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment "ns2/svc2:p80" : drop }
add element ip kube-proxy no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns2/svc2:p80" : drop }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
add element ip kube-proxy no-endpoint-services { 192.168.99.22 . tcp . 80 comment "ns2/svc2:p80" : drop }
add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.45 . tcp . 80 : goto service-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy service-ips { 192.168.99.22 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-ips { 192.168.99.33 . tcp . 80 : goto external-LAUZTJTB-ns4/svc4/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3002 : goto external-HVFWP5L3-ns5/svc5/tcp/p80 }
add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
"""


def test_names_are_hashed_as_kube_proxy_hashes_them() -> None:
    assert names.service_chain(names.service_base(SVC1)) == "service-ULMVA6XW-ns1/svc1/tcp/p80"
    assert names.endpoint_chain(names.endpoint_base(SVC1, at("10.180.0.1")[0])) == \
        "endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80"
    assert names.external_chain(names.service_base(SVC5)) == "external-HVFWP5L3-ns5/svc5/tcp/p80"
    assert names.affinity_set(names.endpoint_base(SVC5, at("10.180.0.3")[0])) == \
        "affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
    assert names.firewall_chain(names.service_base(SVC5)) == "firewall-HVFWP5L3-ns5/svc5/tcp/p80"
    assert names.local_chain(names.service_base(SVC2)) == "local-42NFTM6N-ns2/svc2/tcp/p80"


def test_the_whole_table_is_kube_proxys() -> None:
    assert render(KUBE_PROXY_STATE, NODE).text() == KUBE_PROXY_TEXT


def test_the_text_is_the_same_with_kube_proxys_vmap_asked_for_by_name() -> None:
    assert render(KUBE_PROXY_STATE, NODE, choice="vmap").text() == KUBE_PROXY_TEXT


def _lines(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"add rule ip kube-proxy {chain} ")]


def test_cascade_picks_an_endpoint_with_one_rule_each() -> None:
    text = render(KUBE_PROXY_STATE, NODE, choice="cascade").text()
    svc4 = "service-LAUZTJTB-ns4/svc4/tcp/p80"
    assert _lines(text, svc4) == [
        f"add rule ip kube-proxy {svc4} ip daddr 172.30.0.44 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"add rule ip kube-proxy {svc4} numgen random mod 2 0 goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80",
        f"add rule ip kube-proxy {svc4} goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80",
    ]


def test_auto_switches_to_the_cascade_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setattr(sys.modules["kproxy.proxy.nftables.render"], "VMAP_LIMIT", 4)
    assert render(KUBE_PROXY_STATE, NODE).text() == render(KUBE_PROXY_STATE, NODE, choice="cascade").text()


def test_counters_count_in_every_rule_of_a_services_chains() -> None:
    text = render(ProxyState([SVC5], {SVC5.key: at("10.180.0.3")}), NODE, counters=True).text()
    svc5, endpoint = "service-HVFWP5L3-ns5/svc5/tcp/p80", "endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
    affinity = "affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
    external, firewall = "external-HVFWP5L3-ns5/svc5/tcp/p80", "firewall-HVFWP5L3-ns5/svc5/tcp/p80"
    assert [line for chain in (svc5, endpoint, external, firewall) for line in _lines(text, chain)] == [
        f"add rule ip kube-proxy {svc5} ip daddr 172.30.0.45 tcp dport 80 ip saddr != 10.0.0.0/8 counter "
        "jump mark-for-masquerade",
        f"add rule ip kube-proxy {svc5} ip saddr @{affinity} counter goto {endpoint}",
        f"add rule ip kube-proxy {svc5} counter numgen random mod 1 vmap {{ 0 : goto {endpoint} }}",
        f"add rule ip kube-proxy {endpoint} ip saddr 10.180.0.3 counter jump mark-for-masquerade",
        f"add rule ip kube-proxy {endpoint} counter update @{affinity} {{ ip saddr }}",
        f"add rule ip kube-proxy {endpoint} meta l4proto tcp counter dnat to 10.180.0.3:80",
        f"add rule ip kube-proxy {external} counter jump mark-for-masquerade",
        f"add rule ip kube-proxy {external} counter goto {svc5}",
        f"add rule ip kube-proxy {firewall} ip saddr != {{ 203.0.113.0/25 }} counter drop",
    ]
    assert "counter" not in "".join(_lines(text, "services") + _lines(text, "masquerading"))


def test_counters_go_before_the_action_and_kube_proxys_comment_after_it() -> None:
    scenario = SCENARIOS["TestExternalTrafficPolicyLocal"]
    external = "external-ULMVA6XW-ns1/svc1/tcp/p80"
    assert _lines(render(scenario.state, scenario.node, counters=True).text(), external) == [
        f"add rule ip kube-proxy {external} ip saddr 10.0.0.0/8 counter goto service-ULMVA6XW-ns1/svc1/tcp/p80 "
        'comment "short-circuit pod traffic"',
        f'add rule ip kube-proxy {external} fib saddr type local counter jump mark-for-masquerade '
        'comment "masquerade local traffic"',
        f"add rule ip kube-proxy {external} fib saddr type local counter goto service-ULMVA6XW-ns1/svc1/tcp/p80 "
        'comment "short-circuit local traffic"',
        f"add rule ip kube-proxy {external} counter goto local-ULMVA6XW-ns1/svc1/tcp/p80",
    ]


def test_without_node_port_addresses_nodeports_answer_on_every_local_address() -> None:
    node = NodeInfo("test-node", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16")
    text = render(ProxyState([]), node).text()
    assert _lines(text, "services")[1] == ("add rule ip kube-proxy services fib daddr type local ip daddr != "
                                           "127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports")
    assert _lines(text, "nodeport-endpoints-check") == [
        "add rule ip kube-proxy nodeport-endpoints-check fib daddr type local ip daddr != 127.0.0.0/8 "
        "meta l4proto . th dport vmap @no-endpoint-nodeports"]
    assert "add element ip kube-proxy nodeport-ips" not in text


def test_node_port_addresses_that_miss_the_node_ip_leave_nodeport_ips_empty() -> None:
    node = NodeInfo("test-node", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16", ("10.1.0.0/16",))
    text = render(ProxyState([]), node).text()
    assert "vmap @service-nodeports" in _lines(text, "services")[1] and "@nodeport-ips" in _lines(text, "services")[1]
    assert "add element ip kube-proxy nodeport-ips" not in text
    primary = NodeInfo("test-node", "192.168.0.2", "10.0.0.0/8", "", ("primary",))
    text = render(ProxyState([]), primary).text()
    assert "add element ip kube-proxy nodeport-ips { 192.168.0.2 }" in text
    assert _lines(text, "cluster-ips-check") == [  # no service CIDR: no drop rule
        'add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment '
        '"Reject traffic to invalid ports of ClusterIPs"']


def _render_cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main(["render", "--mode", "nftables", *argv])
    return status, out.getvalue()


def test_render_takes_kube_proxys_settings(tmp_path: Path) -> None:
    manifest = tmp_path / "svc.yaml"
    manifest.write_text("""
apiVersion: v1
kind: Service
metadata: {name: svc6, namespace: ns6}
spec:
  clusterIP: 172.30.0.46
  selector: {app: none}
  ports: [{name: p80, port: 80}]
""")
    status, text = _render_cli("-f", str(manifest), "--node", "test-node", "--node-ip", "192.168.0.2",
                               "--cluster-cidr", "10.0.0.0/8", "--service-cidr", "172.30.0.0/16",
                               "--node-port-addresses", "192.168.0.2/32")
    assert status == 0
    assert text == render(ProxyState([SVC6]), NODE).text()


def test_bad_node_port_addresses_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["render", "--mode", "nftables", "-f", "-", "--node-port-addresses", "primary,192.168.0.2/40"]) == 2
    assert capsys.readouterr().err == (
        "kproxy render: error: argument --node-port-addresses: '192.168.0.2/40' is not an IPv4 CIDR "
        "('40' is not a valid netmask) (see 'kproxy render --help')\n")


# kube-proxy's tests of traffic policies, load balancers and terminating endpoints: their
# Services and endpoints, by test name ("/" and the subtest's name where it has several).
class Scenario(NamedTuple):
    state: ProxyState
    node: NodeInfo = NODE


LOCAL_LB = port80("ns1", "svc1", "172.30.0.41", node_port=3001, external_ips=("192.168.99.11",),
                  load_balancer_ips=("1.2.3.4",), external_policy_local=True, health_check_node_port=30000)
SOURCE_RANGES_LB = port80("ns1", "svc1", "172.30.0.41", node_port=3001, load_balancer_ips=("1.2.3.4", "5.6.7.8"),
                          source_ranges=("192.168.0.0/24", "203.0.113.0/25"))
ITP_LOCAL = port80("ns1", "svc1", "172.30.1.1", port_name="", internal_policy_local=True)
TERMINATING_LOCAL = port80("ns1", "svc1", "172.30.1.1", port_name="", load_balancer_ips=("1.2.3.4",),
                           external_policy_local=True, health_check_node_port=30000)
TERMINATING_CLUSTER = dataclasses.replace(TERMINATING_LOCAL, external_policy_local=False, health_check_node_port=0)
MASQUERADE = state(
    (port80("ns1", "svc1", "172.30.0.41", node_port=3001, load_balancer_ips=("1.2.3.4",)),
     [ep("10.180.0.1", "test-node"), ep("10.180.1.1", "remote")]),
    (port80("ns2", "svc2", "172.30.0.42", node_port=3002, load_balancer_ips=("5.6.7.8",), external_policy_local=True,
            health_check_node_port=30002), [ep("10.180.0.2", "test-node"), ep("10.180.1.2", "remote")]),
    (port80("ns3", "svc3", "172.30.0.43", node_port=3003, load_balancer_ips=("9.10.11.12",), internal_policy_local=True),
     [ep("10.180.0.3", "test-node"), ep("10.180.1.3", "remote")]))


def _terminating(svc: ServicePort, cluster: bool) -> dict[str, Scenario]:
    """TestTerminatingEndpointsTrafficPolicyLocal / ...Cluster: their four EndpointSlices."""
    remote = "another-node" if cluster else "node-1"
    cases = {
        "ready endpoints exist": [
            ep("10.0.1.1", "test-node"), ep("10.0.1.2", "test-node"),
            ep("10.0.1.3", remote if cluster else "test-node", "serving-terminating"),
            ep("10.0.1.4", remote if cluster else "test-node", "terminating"), ep("10.0.1.5", remote)],
        "only terminating endpoints exist": [
            ep("10.0.1.2", "test-node", "serving-terminating"), ep("10.0.1.3", "test-node", "serving-terminating"),
            ep("10.0.1.4", remote if cluster else "test-node", "terminating"),
            ep("10.0.1.5", remote, "serving-terminating" if cluster else "ready")],
        "terminating endpoints on remote node": [ep("10.0.1.5", "node-1", "serving-terminating")],
        "no usable endpoints on any node": [ep("10.0.1.5", "test-node", "terminating"),
                                            ep("10.0.1.5", "node-1", "terminating")],
    }
    test = "TestTerminatingEndpointsTrafficPolicy" + ("Cluster" if cluster else "Local")
    return {f"{test}/{name}": Scenario(state((svc, endpoints))) for name, endpoints in cases.items()}


def _internal_policy() -> dict[str, Scenario]:
    cases = {
        "internalTrafficPolicy is cluster": (False, ["test-node", "node1", "node2"]),
        "internalTrafficPolicy is local and there is one local endpoint": (True, ["test-node", "node1", "node2"]),
        "internalTrafficPolicy is local and there are multiple local endpoints": (True, ["test-node", "test-node",
                                                                                        "node2"]),
        "internalTrafficPolicy is local and there are no local endpoints": (True, ["node0", "node1", "node2"]),
    }
    return {f"TestInternalTrafficPolicy/{name}": Scenario(state((
        dataclasses.replace(ITP_LOCAL, internal_policy_local=local),
        [ep(f"10.0.1.{i}", node) for i, node in enumerate(nodes, start=1)])))
        for name, (local, nodes) in cases.items()}


SCENARIOS = {
    "TestOverallNFTablesRules": Scenario(KUBE_PROXY_STATE),
    "TestExternalTrafficPolicyLocal": Scenario(state((LOCAL_LB, [ep("10.180.0.1"), ep("10.180.2.1", "test-node")]))),
    "TestExternalTrafficPolicyCluster": Scenario(state((
        dataclasses.replace(LOCAL_LB, external_policy_local=False, health_check_node_port=0),
        [ep("10.180.0.1"), ep("10.180.2.1", "test-node")]))),
    "TestLoadBalancer": Scenario(state((SOURCE_RANGES_LB, at("10.180.0.1")))),
    "TestNoEndpointsReject": Scenario(state((dataclasses.replace(LOCAL_LB, external_policy_local=False,
                                                                 health_check_node_port=0), []))),
    **_internal_policy(),
    **_terminating(TERMINATING_LOCAL, cluster=False),
    **_terminating(TERMINATING_CLUSTER, cluster=True),
    # TestInternalExternalMasquerade: with and without the local-traffic detector and --masquerade-all
    "TestInternalExternalMasquerade/base": Scenario(MASQUERADE),
    "TestInternalExternalMasquerade/no LocalTrafficDetector": Scenario(MASQUERADE,
                                                                       dataclasses.replace(NODE, cluster_cidr="")),
    "TestInternalExternalMasquerade/masqueradeAll": Scenario(MASQUERADE, dataclasses.replace(NODE, masquerade_all=True)),
    "TestInternalExternalMasquerade/masqueradeAll, no LocalTrafficDetector": Scenario(
        MASQUERADE, dataclasses.replace(NODE, cluster_cidr="", masquerade_all=True)),
}


# kube-proxy's baseRules: what its fake proxier's node has whatever its Services.
BASE_RULES = """\
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add set ip kube-proxy cluster-ips { type ipv4_addr ; comment "Active ClusterIPs" ; }
add set ip kube-proxy nodeport-ips { type ipv4_addr ; comment "IPs that accept NodePort traffic" ; }
add map ip kube-proxy firewall-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "destinations that are subject to LoadBalancerSourceRanges" ; }
add map ip kube-proxy no-endpoint-nodeports { type inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to service nodeports with no endpoints" ; }
add map ip kube-proxy no-endpoint-services { type ipv4_addr . inet_proto . inet_service : verdict ; comment "vmap to drop or reject packets to services with no endpoints" ; }
add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict ; comment "ClusterIP, ExternalIP and LoadBalancer IP traffic" ; }
add map ip kube-proxy service-nodeports { type inet_proto . inet_service : verdict ; comment "NodePort traffic" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
add chain ip kube-proxy services
add chain ip kube-proxy service-endpoints-check
add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
add rule ip kube-proxy cluster-ips-check ip daddr { 172.30.0.0/16 } drop comment "Drop traffic to unallocated ClusterIPs"
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump firewall-check
add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
add rule ip kube-proxy firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips
add rule ip kube-proxy mark-for-masquerade mark set mark or 0x4000
add rule ip kube-proxy masquerading mark and 0x4000 == 0 return
add rule ip kube-proxy masquerading mark set mark xor 0x4000
add rule ip kube-proxy masquerading masquerade fully-random
add rule ip kube-proxy nat-output jump services
add rule ip kube-proxy nat-postrouting jump masquerading
add rule ip kube-proxy nat-prerouting jump services
add rule ip kube-proxy nodeport-endpoints-check ip daddr @nodeport-ips meta l4proto . th dport vmap @no-endpoint-nodeports
add rule ip kube-proxy reject-chain reject
add rule ip kube-proxy services ip daddr . meta l4proto . th dport vmap @service-ips
add rule ip kube-proxy services ip daddr @nodeport-ips meta l4proto . th dport vmap @service-nodeports
add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add rule ip kube-proxy service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services
"""

# What kube-proxy's syncProxyRules writes for these scenarios beyond BASE_RULES.
EXPECTED = {
    "TestExternalTrafficPolicyLocal": """\
        add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
        add chain ip kube-proxy endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80
        add rule ip kube-proxy endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80 ip saddr 10.180.2.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80 meta l4proto tcp dnat to 10.180.2.1:80
        add chain ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 ip saddr 10.0.0.0/8 goto service-ULMVA6XW-ns1/svc1/tcp/p80 comment "short-circuit pod traffic"
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 fib saddr type local goto service-ULMVA6XW-ns1/svc1/tcp/p80 comment "short-circuit local traffic"
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto local-ULMVA6XW-ns1/svc1/tcp/p80
        add chain ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80 }
        add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80 }
        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 192.168.99.11 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        """,
    "TestTerminatingEndpointsTrafficPolicyLocal/terminating endpoints on remote node": """\
        add chain ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80
        add rule ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 ip saddr 10.0.1.5 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 meta l4proto tcp dnat to 10.0.1.5:80
        add chain ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ ip saddr 10.0.0.0/8 goto service-6KJ5P52A-ns1/svc1/tcp/ comment "short-circuit pod traffic"
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ fib saddr type local goto service-6KJ5P52A-ns1/svc1/tcp/ comment "short-circuit local traffic"
        add chain ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/ ip daddr 172.30.1.1 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/ numgen random mod 1 vmap { 0 : goto endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 }
        add element ip kube-proxy cluster-ips { 172.30.1.1 }
        add element ip kube-proxy no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns1/svc1" : drop }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-6KJ5P52A-ns1/svc1/tcp/ }
        add element ip kube-proxy service-ips { 172.30.1.1 . tcp . 80 : goto service-6KJ5P52A-ns1/svc1/tcp/ }
        """,
    "TestLoadBalancer": """\
        add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
        add chain ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 jump mark-for-masquerade
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto service-ULMVA6XW-ns1/svc1/tcp/p80
        add chain ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy firewall-ULMVA6XW-ns1/svc1/tcp/p80 ip saddr != { 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 } drop
        add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 }
        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy firewall-ips { 1.2.3.4 . tcp . 80 : goto firewall-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 : goto firewall-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        """,
    "TestNoEndpointsReject": """\
        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy no-endpoint-nodeports { tcp . 3001 comment "ns1/svc1:p80" : goto reject-chain }
        add element ip kube-proxy no-endpoint-services { 1.2.3.4 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain }
        add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain }
        add element ip kube-proxy no-endpoint-services { 192.168.99.11 . tcp . 80 comment "ns1/svc1:p80" : goto reject-chain }
        """,
    "TestInternalTrafficPolicy/internalTrafficPolicy is local and there is one local endpoint": """\
        add chain ip kube-proxy endpoint-MS3KI5BZ-ns1/svc1/tcp/__10.0.1.1/80
        add rule ip kube-proxy endpoint-MS3KI5BZ-ns1/svc1/tcp/__10.0.1.1/80 ip saddr 10.0.1.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-MS3KI5BZ-ns1/svc1/tcp/__10.0.1.1/80 meta l4proto tcp dnat to 10.0.1.1:80
        add chain ip kube-proxy local-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy local-6KJ5P52A-ns1/svc1/tcp/ ip daddr 172.30.1.1 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy local-6KJ5P52A-ns1/svc1/tcp/ numgen random mod 1 vmap { 0 : goto endpoint-MS3KI5BZ-ns1/svc1/tcp/__10.0.1.1/80 }
        add element ip kube-proxy cluster-ips { 172.30.1.1 }
        add element ip kube-proxy service-ips { 172.30.1.1 . tcp . 80 : goto local-6KJ5P52A-ns1/svc1/tcp/ }
        """,
    "TestInternalTrafficPolicy/internalTrafficPolicy is local and there are no local endpoints": """\
        add element ip kube-proxy cluster-ips { 172.30.1.1 }
        add element ip kube-proxy no-endpoint-services { 172.30.1.1 . tcp . 80 comment "ns1/svc1" : drop }
        """,
    "TestTerminatingEndpointsTrafficPolicyLocal/only terminating endpoints exist": """\
        add chain ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80
        add rule ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 ip saddr 10.0.1.5 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 meta l4proto tcp dnat to 10.0.1.5:80
        add chain ip kube-proxy endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80
        add rule ip kube-proxy endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80 ip saddr 10.0.1.2 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80 meta l4proto tcp dnat to 10.0.1.2:80
        add chain ip kube-proxy endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80
        add rule ip kube-proxy endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80 ip saddr 10.0.1.3 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80 meta l4proto tcp dnat to 10.0.1.3:80
        add chain ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ ip saddr 10.0.0.0/8 goto service-6KJ5P52A-ns1/svc1/tcp/ comment "short-circuit pod traffic"
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ fib saddr type local goto service-6KJ5P52A-ns1/svc1/tcp/ comment "short-circuit local traffic"
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ goto local-6KJ5P52A-ns1/svc1/tcp/
        add chain ip kube-proxy local-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy local-6KJ5P52A-ns1/svc1/tcp/ numgen random mod 2 vmap { 0 : goto endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80 , 1 : goto endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80 }
        add chain ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/ ip daddr 172.30.1.1 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/ numgen random mod 1 vmap { 0 : goto endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 }
        add element ip kube-proxy cluster-ips { 172.30.1.1 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-6KJ5P52A-ns1/svc1/tcp/ }
        add element ip kube-proxy service-ips { 172.30.1.1 . tcp . 80 : goto service-6KJ5P52A-ns1/svc1/tcp/ }
        """,
    "TestTerminatingEndpointsTrafficPolicyCluster/only terminating endpoints exist": """\
        add chain ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80
        add rule ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 ip saddr 10.0.1.5 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 meta l4proto tcp dnat to 10.0.1.5:80
        add chain ip kube-proxy endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80
        add rule ip kube-proxy endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80 ip saddr 10.0.1.2 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80 meta l4proto tcp dnat to 10.0.1.2:80
        add chain ip kube-proxy endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80
        add rule ip kube-proxy endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80 ip saddr 10.0.1.3 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80 meta l4proto tcp dnat to 10.0.1.3:80
        add chain ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ jump mark-for-masquerade
        add rule ip kube-proxy external-6KJ5P52A-ns1/svc1/tcp/ goto service-6KJ5P52A-ns1/svc1/tcp/
        add chain ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/
        add rule ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/ ip daddr 172.30.1.1 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
        add rule ip kube-proxy service-6KJ5P52A-ns1/svc1/tcp/ numgen random mod 3 vmap { 0 : goto endpoint-NOHC5GMX-ns1/svc1/tcp/__10.0.1.2/80 , 1 : goto endpoint-YSKWIFLA-ns1/svc1/tcp/__10.0.1.3/80 , 2 : goto endpoint-EXTQ3I4Y-ns1/svc1/tcp/__10.0.1.5/80 }
        add element ip kube-proxy cluster-ips { 172.30.1.1 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-6KJ5P52A-ns1/svc1/tcp/ }
        add element ip kube-proxy service-ips { 172.30.1.1 . tcp . 80 : goto service-6KJ5P52A-ns1/svc1/tcp/ }
        """,
    "TestInternalExternalMasquerade/masqueradeAll": """\
        add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 ip saddr 10.180.0.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 meta l4proto tcp dnat to 10.180.0.1:80
        add chain ip kube-proxy endpoint-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80
        add rule ip kube-proxy endpoint-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 ip saddr 10.180.1.1 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 meta l4proto tcp dnat to 10.180.1.1:80
        add chain ip kube-proxy endpoint-CWKA3H5Q-ns2/svc2/tcp/p80__10.180.1.2/80
        add rule ip kube-proxy endpoint-CWKA3H5Q-ns2/svc2/tcp/p80__10.180.1.2/80 ip saddr 10.180.1.2 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-CWKA3H5Q-ns2/svc2/tcp/p80__10.180.1.2/80 meta l4proto tcp dnat to 10.180.1.2:80
        add chain ip kube-proxy endpoint-R4LU7R2F-ns3/svc3/tcp/p80__10.180.1.3/80
        add rule ip kube-proxy endpoint-R4LU7R2F-ns3/svc3/tcp/p80__10.180.1.3/80 ip saddr 10.180.1.3 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-R4LU7R2F-ns3/svc3/tcp/p80__10.180.1.3/80 meta l4proto tcp dnat to 10.180.1.3:80
        add chain ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80
        add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 ip saddr 10.180.0.2 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 meta l4proto tcp dnat to 10.180.0.2:80
        add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
        add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
        add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
        add chain ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80
        add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 ip saddr 10.0.0.0/8 goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit pod traffic"
        add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
        add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 fib saddr type local goto service-42NFTM6N-ns2/svc2/tcp/p80 comment "short-circuit local traffic"
        add rule ip kube-proxy external-42NFTM6N-ns2/svc2/tcp/p80 goto local-42NFTM6N-ns2/svc2/tcp/p80
        add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
        add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
        add chain ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 jump mark-for-masquerade
        add rule ip kube-proxy external-ULMVA6XW-ns1/svc1/tcp/p80 goto service-ULMVA6XW-ns1/svc1/tcp/p80
        add chain ip kube-proxy local-42NFTM6N-ns2/svc2/tcp/p80
        add rule ip kube-proxy local-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 }
        add chain ip kube-proxy local-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy local-4AT6LBPK-ns3/svc3/tcp/p80 ip daddr 172.30.0.43 tcp dport 80 jump mark-for-masquerade
        add rule ip kube-proxy local-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 1 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 }
        add chain ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80
        add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 ip daddr 172.30.0.42 tcp dport 80 jump mark-for-masquerade
        add rule ip kube-proxy service-42NFTM6N-ns2/svc2/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-SGOXE6O3-ns2/svc2/tcp/p80__10.180.0.2/80 , 1 : goto endpoint-CWKA3H5Q-ns2/svc2/tcp/p80__10.180.1.2/80 }
        add chain ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80
        add rule ip kube-proxy service-4AT6LBPK-ns3/svc3/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 , 1 : goto endpoint-R4LU7R2F-ns3/svc3/tcp/p80__10.180.1.3/80 }
        add chain ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 ip daddr 172.30.0.41 tcp dport 80 jump mark-for-masquerade
        add rule ip kube-proxy service-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 2 vmap { 0 : goto endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80 , 1 : goto endpoint-B7I4G2ZB-ns1/svc1/tcp/p80__10.180.1.1/80 }
        add element ip kube-proxy cluster-ips { 172.30.0.41 }
        add element ip kube-proxy cluster-ips { 172.30.0.42 }
        add element ip kube-proxy cluster-ips { 172.30.0.43 }
        add element ip kube-proxy service-ips { 1.2.3.4 . tcp . 80 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
        add element ip kube-proxy service-ips { 9.10.11.12 . tcp . 80 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
        add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-ips { 172.30.0.42 . tcp . 80 : goto service-42NFTM6N-ns2/svc2/tcp/p80 }
        add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto local-4AT6LBPK-ns3/svc3/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3001 : goto external-ULMVA6XW-ns1/svc1/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3002 : goto external-42NFTM6N-ns2/svc2/tcp/p80 }
        add element ip kube-proxy service-nodeports { tcp . 3003 : goto external-4AT6LBPK-ns3/svc3/tcp/p80 }
        """,
}

# kube-proxy's sortNFTablesTransaction: objects by kind (table, chains, rules, sets, maps,
# elements) and name; rules keep their order, the rest by line.
_KINDS = {"table": 0, "chain": 1, "rule": 2, "set": 3, "map": 4, "element": 5}


def kube_proxy_sorted(text: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return sorted(lines, key=lambda line: (_KINDS[line.split()[1]], line.split()[4],
                                           "" if line.split()[1] == "rule" else line))


def test_a_node_without_services_has_kube_proxys_base_rules() -> None:
    assert kube_proxy_sorted(render(ProxyState([]), NODE).text()) == kube_proxy_sorted(BASE_RULES)


@pytest.mark.parametrize("name", EXPECTED)
def test_kube_proxys_scenarios_get_kube_proxys_whole_text(name: str) -> None:
    scenario = SCENARIOS[name]
    assert kube_proxy_sorted(render(scenario.state, scenario.node).text()) == \
        kube_proxy_sorted(BASE_RULES + textwrap.dedent(EXPECTED[name]))


@pytest.mark.parametrize("name", SCENARIOS)
def test_the_cascade_changes_only_how_an_endpoint_is_picked(name: str) -> None:
    """Both layouts hold the same chains, sets and elements, the same rules before the choice."""
    scenario = SCENARIOS[name]

    def unchosen(choice: str) -> list[str]:
        text = render(scenario.state, scenario.node, choice=choice).text()
        return [line for line in text.splitlines() if "numgen" not in line and not _picks_an_endpoint(line)]

    assert unchosen("cascade") == unchosen("vmap")


def _picks_an_endpoint(line: str) -> bool:
    """The cascade's last rule, a plain goto to an endpoint chain (affinity rules match first)."""
    return " goto endpoint-" in line and " @affinity-" not in line
