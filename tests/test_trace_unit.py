"""`kproxy trace`'s pure parts: SRC and DST against a lab, the tracers' reading of the kernel's
trace output, and the trace as text (no root)."""

from __future__ import annotations

import pytest

from kproxy.errors import KproxyError
from kproxy.proxy.ipvs.trace import connections
from kproxy.proxy.mode import Probe
from kproxy.proxy.nftables.trace import readable as nft_readable
from kproxy.proxy.xtables_trace import readable as xtables_readable
from kproxy.trace.hops import Hop, NodeReport, Trace, flow_keys, key, render_text
from kproxy.trace.plan import plan

INFO = {
    "name": "demo", "external": {"ip": "172.18.0.254", "namespace": "kp_demo_external"},
    "nodes": [{"name": "node1", "ip": "172.18.0.2", "namespace": "kp_demo_node1"},
              {"name": "node2", "ip": "172.18.0.3", "namespace": "kp_demo_node2"}],
    "pods": [{"name": "client", "ip": "10.244.1.2", "netns": "kp_demo_client"},
             {"name": "web-1", "ip": "10.244.2.3", "netns": "kp_demo_web-1"}],
}
WEB = {"metadata": {"namespace": "default", "name": "web"},
       "spec": {"type": "NodePort", "clusterIP": "10.96.0.11", "externalIPs": ["172.18.0.100"],
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080, "protocol": "TCP"}]}}
SLICE = {"metadata": {"namespace": "default", "name": "web-abcde", "labels": {"kubernetes.io/service-name": "web"}},
         "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
         "endpoints": [{"addresses": ["10.244.2.3"], "conditions": {"ready": True}},
                       {"addresses": ["10.244.1.9"], "conditions": {"ready": False}}]}


@pytest.mark.parametrize(("dst", "ip", "port", "target"), [
    ("web:80", "10.96.0.11", 80, "ClusterIP of default/web:80"),
    ("default/web:80", "10.96.0.11", 80, "ClusterIP of default/web:80"),
    ("10.96.0.11:80", "10.96.0.11", 80, "ClusterIP of default/web:80"),
    ("172.18.0.100:80", "172.18.0.100", 80, "external IP of default/web:80"),
    ("172.18.0.3:30080", "172.18.0.3", 30080, "NodePort 30080 on node2 of default/web:80"),
])
def test_a_service_destination_names_what_it_is_and_its_ready_endpoints(dst: str, ip: str, port: int,
                                                                         target: str) -> None:
    flow = plan(INFO, [WEB], [SLICE], "client", dst, None)
    assert (flow.dst_ip, flow.dst_port, flow.protocol, flow.target, flow.endpoints) == \
        (ip, port, "tcp", target, ("10.244.2.3:8080",))
    assert [m.name for m in flow.listeners] == ["client", "node1", "node2", "underlay", "web-1"]
    assert flow.listeners[3].netns == "kp_demo_underlay"


def test_a_pod_destination_is_the_pod_alone() -> None:
    flow = plan(INFO, [WEB], [SLICE], "external", "10.244.2.3:8080", "udp")
    assert (flow.source.ip, flow.protocol, flow.target, flow.endpoints) == \
        ("172.18.0.254", "udp", "pod web-1", ("10.244.2.3:8080",))


@pytest.mark.parametrize(("src", "dst", "protocol", "error"), [
    ("nobody", "web:80", None, "SRC 'nobody': lab demo has no such pod or node (it has: node1, node2, client, web-1, "
                               "external)"),
    ("underlay", "web:80", None, "SRC 'underlay': lab demo has no such pod or node (it has: node1, node2, client, "
                                 "web-1, external)"),
    ("client", "web", None, "DST 'web': expected IP:PORT or [NAMESPACE/]SERVICE:PORT"),
    ("client", "web:0", None, "DST 'web:0': expected IP:PORT or [NAMESPACE/]SERVICE:PORT"),
    ("client", "web:80", "udp", "DST 'web:80': Service default/web has no port 80/UDP (its ports: 80/TCP)"),
    ("client", "kube-system/web:80", None, "DST 'kube-system/web:80': no Service kube-system/web in lab demo "
                                           "(kproxy get svc --lab demo -A)"),
    ("client", "10.96.0.11:81", None, "DST 10.96.0.11:81: not a ClusterIP, external or load-balancer IP with that "
                                      "port, a node's NodePort or a pod of lab demo (kproxy get svc --lab demo -A)"),
])
def test_bad_sources_and_destinations_say_what_exists(src: str, dst: str, protocol: str | None, error: str) -> None:
    with pytest.raises(KproxyError) as raised:
        plan(INFO, [WEB], [SLICE], src, dst, protocol)
    assert str(raised.value) == error


def test_xtables_monitor_lines_become_each_packet_and_the_rules_it_met() -> None:
    lines = [
        "PACKET: 2 47e0b842 IN=cni0 MACSRC=5e:0:f5:8a:4f:df MACDST=aa:f6:6d:31:74:a9 MACPROTO=0800 SRC=10.244.1.2 "
        "DST=10.96.0.11 LEN=40 TTL=64 ID=1 SPORT=43210 DPORT=80 SYN ",
        ' TRACE: 2 47e0b842 raw:PREROUTING:rule:0x2:CONTINUE  -4 -t raw -A PREROUTING -p tcp -m tcp --sport 43210 '
        '-m comment --comment "kproxy trace" -j TRACE',
        " TRACE: 2 47e0b842 raw:PREROUTING:policy:ACCEPT ",
        "PACKET: 2 47e0b842 IN=cni0 MACSRC=5e:0:f5:8a:4f:df MACDST=aa:f6:6d:31:74:a9 MACPROTO=0800 SRC=10.244.1.2 "
        "DST=10.96.0.11 LEN=40 TTL=64 ID=1 SPORT=43210 DPORT=80 SYN ",
        " TRACE: 2 47e0b842 nat:KUBE-SERVICES:rule:0x37:JUMP:KUBE-SVC-X  -4 -t nat -A KUBE-SERVICES -d 10.96.0.11/32 "
        "-j KUBE-SVC-X",
        " TRACE: 2 47e0b842 nat:KUBE-SVC-X:return: ",
        " TRACE: 2 47e0b842 nat:KUBE-POSTROUTING:rule:0x27:0xfffffffb  -4 -t nat -A KUBE-POSTROUTING -j RETURN",
        " TRACE: 2 47e0b842 nat:POSTROUTING:policy:ACCEPT ",
    ]
    assert xtables_readable(lines) == [
        "packet IN=cni0 SRC=10.244.1.2 DST=10.96.0.11 LEN=40 TTL=64 ID=1 SPORT=43210 DPORT=80 SYN",
        "  nat:KUBE-SERVICES JUMP KUBE-SVC-X: -A KUBE-SERVICES -d 10.96.0.11/32 -j KUBE-SVC-X",
        "  nat:KUBE-POSTROUTING RETURN: -A KUBE-POSTROUTING -j RETURN",
        "  nat:POSTROUTING policy ACCEPT",
    ]


def test_nft_monitor_lines_become_each_packet_and_the_rules_it_met() -> None:
    packet = ('packet: iif "cni0" ether saddr e6:34:40:80:af:5f ether daddr 42:5c:49:1b:75:4d ip saddr 10.244.1.2 '
              'ip daddr 10.96.0.11 ip dscp cs0 ip ecn not-ect ip ttl 64 tcp sport 64786 tcp dport 80 tcp flags == syn '
              'tcp window 8192 ')
    lines = [
        "add table ip kproxy-trace",
        f"trace id 6c1b2a0f ip kproxy-trace prerouting {packet}",
        "trace id 6c1b2a0f ip kproxy-trace prerouting rule meta l4proto tcp th sport 64786 meta nftrace set 1 "
        "(verdict continue)",
        f"trace id 6c1b2a0f ip kube-proxy nat-prerouting {packet}",
        "trace id 6c1b2a0f ip kube-proxy nat-prerouting rule jump services (verdict jump services)",
        "trace id 6c1b2a0f ip kube-proxy endpoint-A rule meta l4proto tcp dnat to 10.244.2.3:8080 (verdict accept)",
    ]
    assert nft_readable(lines) == [
        'packet iif "cni0" ip saddr 10.244.1.2 ip daddr 10.96.0.11 ip ttl 64 tcp sport 64786 tcp dport 80 '
        'tcp flags == syn',
        "  ip kube-proxy nat-prerouting rule jump services (verdict jump services)",
        "  ip kube-proxy endpoint-A rule meta l4proto tcp dnat to 10.244.2.3:8080 (verdict accept)",
    ]


def test_the_ipvs_connection_of_the_probe_in_words() -> None:
    table = ("Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
             "TCP 0AF40102 F1EE 0A60000B 0050 0AF40203 1F90 SYN_RECV         59\n"
             "TCP 0AF40105 9C40 0A60000B 0050 0AF40203 1F90 ESTABLISHED     890\n")
    assert connections(table, Probe("tcp", 0xF1EE)) == [
        "  ipvs: TCP 10.244.1.2:61934 -> virtual 10.96.0.11:80 -> real server 10.244.2.3:8080 SYN_RECV "
        "(expires in 59 s)"]


def test_conntrack_entries_join_the_flow_through_each_nat() -> None:
    tables = {
        "node1": ["tcp 6 59 SYN_RECV src=172.18.0.254 dst=172.18.0.3 sport=62000 dport=30080 src=10.244.2.3 "
                  "dst=10.244.1.0 sport=8080 dport=3560 mark=0 use=1",
                  "tcp 6 59 SYN_RECV src=10.244.1.5 dst=10.96.0.11 sport=40000 dport=80 src=10.244.2.3 "
                  "dst=10.244.1.5 sport=8080 dport=40000 mark=0 use=1"],
        "node2": ["tcp 6 59 SYN_RECV src=10.244.1.0 dst=10.244.2.3 sport=3560 dport=8080 src=10.244.2.3 "
                  "dst=10.244.1.0 sport=8080 dport=3560 mark=0 use=1"],
    }
    probe = key("tcp", ("172.18.0.254", 62000), ("172.18.0.3", 30080))
    assert flow_keys({probe}, tables) == {probe, key("tcp", ("10.244.2.3", 8080), ("10.244.1.0", 3560))}


def test_the_trace_as_text() -> None:
    flow = plan(INFO, [WEB], [SLICE], "client", "web:80", None)
    trace = Trace(flow, "demo", "iptables", "vxlan", 61934, ["10.244.1.2:61934 > 10.96.0.11:80 TCP [S] len=40"], [
        Hop("client", "eth0", "out", 0.0, ["10.244.1.2:61934 > 10.96.0.11:80 TCP [S] len=40"], ""),
        Hop("node1", "flannel.1", "out", 0.1, ["10.244.1.2:61934 > 10.244.2.3:8080 TCP [S] len=40"],
            "NAT dst 10.96.0.11:80 -> 10.244.2.3:8080"),
    ], [NodeReport("node1", ["packet IN=cni0", "  nat:KUBE-SERVICES JUMP KUBE-SVC-X: -A KUBE-SERVICES -j KUBE-SVC-X"],
                   ["tcp 6 59 SYN_SENT src=10.244.1.2"]), NodeReport("node2")], True)
    assert render_text(trace) == """\
trace client (10.244.1.2) -> 10.96.0.11:80/tcp, the ClusterIP of default/web:80; lab demo, iptables mode, vxlan overlay
probe: 10.244.1.2:61934 > 10.96.0.11:80 TCP [S] len=40
endpoints 10.244.2.3:8080; answered

hops (ms since the first; where; direction; headers, outer | inner):
    1    0.000  client eth0      out  10.244.1.2:61934 > 10.96.0.11:80 TCP [S] len=40
    2    0.100  node1 flannel.1  out  10.244.1.2:61934 > 10.244.2.3:8080 TCP [S] len=40    <- NAT dst 10.96.0.11:80 -> 10.244.2.3:8080

node1: the rules the probe met
  packet IN=cni0
    nat:KUBE-SERVICES JUMP KUBE-SVC-X: -A KUBE-SERVICES -j KUBE-SVC-X
node1: conntrack
  tcp 6 59 SYN_SENT src=10.244.1.2
"""
