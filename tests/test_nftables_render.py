"""nftables mode's render: kube-proxy's text, whole, for the services of kube-proxy's own
TestOverallNFTablesRules that this mode covers (svc1, svc3 to svc6 as ClusterIP, NodePort
and affinity services; its fake proxier's node, CIDRs and --nodeport-addresses), and what
each option and setting changes. Every rule and element line below is one of kube-proxy's
expected lines (pkg/proxy/nftables, the 1.31-1.32 layout)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from kproxy import cli
from kproxy.proxy.nftables import names, render
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo("test-node", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16", ("192.168.0.2/32",))


def port80(namespace: str, name: str, ip: str, **more: int) -> ServicePort:
    return ServicePort(namespace, name, "p80", "TCP", ip, 80, **more)


SVC1 = port80("ns1", "svc1", "172.30.0.41")
SVC3 = port80("ns3", "svc3", "172.30.0.43", node_port=3003)
SVC4 = port80("ns4", "svc4", "172.30.0.44")
SVC5 = port80("ns5", "svc5", "172.30.0.45", node_port=3002, affinity_seconds=10800)
SVC6 = port80("ns6", "svc6", "172.30.0.46")


def at(*ips: str) -> list[Endpoint]:
    return [Endpoint(ip, 80, "other-node") for ip in ips]


KUBE_PROXY_STATE = ProxyState([SVC1, SVC3, SVC4, SVC5, SVC6], {
    SVC1.key: at("10.180.0.1"), SVC3.key: at("10.180.0.3"), SVC4.key: at("10.180.0.4", "10.180.0.5"),
    SVC5.key: at("10.180.0.3")})

KUBE_PROXY_TEXT = """\
add table ip kube-proxy { comment "rules for kube-proxy" ; }
add chain ip kube-proxy cluster-ips-check
add chain ip kube-proxy endpoint-5OJB2KTY-ns1/svc1/tcp/p80__10.180.0.1/80
add chain ip kube-proxy endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80
add chain ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80
add chain ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80
add chain ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80
add chain ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80
add chain ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80
add chain ip kube-proxy filter-forward { type filter hook forward priority -110 ; }
add chain ip kube-proxy filter-input { type filter hook input priority -110 ; }
add chain ip kube-proxy filter-output { type filter hook output priority -110 ; }
add chain ip kube-proxy filter-output-post-dnat { type filter hook output priority -90 ; }
add chain ip kube-proxy filter-prerouting { type filter hook prerouting priority -110 ; }
add chain ip kube-proxy firewall-check
add chain ip kube-proxy mark-for-masquerade
add chain ip kube-proxy masquerading
add chain ip kube-proxy nat-output { type nat hook output priority -100 ; }
add chain ip kube-proxy nat-postrouting { type nat hook postrouting priority 100 ; }
add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100 ; }
add chain ip kube-proxy nodeport-endpoints-check
add chain ip kube-proxy reject-chain { comment "helper for @no-endpoint-services / @no-endpoint-nodeports" ; }
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
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 ip saddr 10.180.0.3 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UEIP74TE-ns3/svc3/tcp/p80__10.180.0.3/80 meta l4proto tcp dnat to 10.180.0.3:80
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 ip saddr 10.180.0.4 jump mark-for-masquerade
add rule ip kube-proxy endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 meta l4proto tcp dnat to 10.180.0.4:80
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-4AT6LBPK-ns3/svc3/tcp/p80 goto service-4AT6LBPK-ns3/svc3/tcp/p80
add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 jump mark-for-masquerade
add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 goto service-HVFWP5L3-ns5/svc5/tcp/p80
add rule ip kube-proxy filter-forward ct state new jump service-endpoints-check
add rule ip kube-proxy filter-forward ct state new jump cluster-ips-check
add rule ip kube-proxy filter-input ct state new jump nodeport-endpoints-check
add rule ip kube-proxy filter-input ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump service-endpoints-check
add rule ip kube-proxy filter-output ct state new jump firewall-check
add rule ip kube-proxy filter-output-post-dnat ct state new jump cluster-ips-check
add rule ip kube-proxy filter-prerouting ct state new jump firewall-check
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
add element ip kube-proxy cluster-ips { 172.30.0.43 }
add element ip kube-proxy cluster-ips { 172.30.0.44 }
add element ip kube-proxy cluster-ips { 172.30.0.45 }
add element ip kube-proxy cluster-ips { 172.30.0.46 }
add element ip kube-proxy nodeport-ips { 192.168.0.2 }
add element ip kube-proxy no-endpoint-services { 172.30.0.46 . tcp . 80 comment "ns6/svc6:p80" : goto reject-chain }
add element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 : goto service-ULMVA6XW-ns1/svc1/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.43 . tcp . 80 : goto service-4AT6LBPK-ns3/svc3/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }
add element ip kube-proxy service-ips { 172.30.0.45 . tcp . 80 : goto service-HVFWP5L3-ns5/svc5/tcp/p80 }
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


def test_the_whole_table_is_kube_proxys() -> None:
    assert render(KUBE_PROXY_STATE, NODE).text() == KUBE_PROXY_TEXT


def test_the_text_is_the_same_with_kube_proxys_vmap_asked_for_by_name() -> None:
    assert render(KUBE_PROXY_STATE, NODE, choice="vmap").text() == KUBE_PROXY_TEXT


def _lines(text: str, chain: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"add rule ip kube-proxy {chain} ")]


def test_cascade_picks_an_endpoint_with_one_rule_each_and_changes_nothing_else() -> None:
    text = render(KUBE_PROXY_STATE, NODE, choice="cascade").text()
    svc4 = "service-LAUZTJTB-ns4/svc4/tcp/p80"
    assert _lines(text, svc4) == [
        f"add rule ip kube-proxy {svc4} ip daddr 172.30.0.44 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
        f"add rule ip kube-proxy {svc4} numgen random mod 2 0 goto endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80",
        f"add rule ip kube-proxy {svc4} goto endpoint-5RFCDDV7-ns4/svc4/tcp/p80__10.180.0.5/80",
    ]
    others = [line for line in text.splitlines() if "numgen" not in line and " goto endpoint-" not in line]
    assert others == [line for line in KUBE_PROXY_TEXT.splitlines()
                      if "numgen" not in line and " goto endpoint-" not in line]


def test_auto_switches_to_the_cascade_above_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    monkeypatch.setattr(sys.modules["kproxy.proxy.nftables.render"], "VMAP_LIMIT", 4)
    assert render(KUBE_PROXY_STATE, NODE).text() == render(KUBE_PROXY_STATE, NODE, choice="cascade").text()


def test_counters_count_in_every_rule_of_a_services_chains() -> None:
    text = render(ProxyState([SVC5], {SVC5.key: at("10.180.0.3")}), NODE, counters=True).text()
    svc5, ep = "service-HVFWP5L3-ns5/svc5/tcp/p80", "endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
    affinity = "affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80"
    assert _lines(text, svc5) + _lines(text, ep) + _lines(text, "external-HVFWP5L3-ns5/svc5/tcp/p80") == [
        f"add rule ip kube-proxy {svc5} ip daddr 172.30.0.45 tcp dport 80 ip saddr != 10.0.0.0/8 counter "
        "jump mark-for-masquerade",
        f"add rule ip kube-proxy {svc5} ip saddr @{affinity} counter goto {ep}",
        f"add rule ip kube-proxy {svc5} counter numgen random mod 1 vmap {{ 0 : goto {ep} }}",
        f"add rule ip kube-proxy {ep} ip saddr 10.180.0.3 counter jump mark-for-masquerade",
        f"add rule ip kube-proxy {ep} counter update @{affinity} {{ ip saddr }}",
        f"add rule ip kube-proxy {ep} meta l4proto tcp counter dnat to 10.180.0.3:80",
        "add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 counter jump mark-for-masquerade",
        f"add rule ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80 counter goto {svc5}",
    ]
    assert "counter" not in "".join(_lines(text, "services") + _lines(text, "masquerading"))


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
