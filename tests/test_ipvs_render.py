"""IPVS mode's rendering: pure, no root (kproxy/proxy/ipvs/render.py). Whole texts.

The feature tests take their Services, endpoints and expectations from kube-proxy's own
pkg/proxy/ipvs/proxier_test.go (release 1.32), named after its tests: there a fake proxier has
no node addresses and a no-op local detector (KP_NODE here), and its expectations are the IPVS
table, the ipset entries and each chain's rules in order (jump and matched set); here they
are the whole ipvsadm table, every ipset and the whole iptables-restore text. kproxy is
IPv4-only, so kube-proxy's IPv6 external IPs (ignored by its IPv4 proxier) are left out.
"""

from __future__ import annotations

import pytest

from kproxy.proxy import mode
from kproxy.proxy.ipvs import render
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

NODE = NodeInfo("node1", "192.168.99.11", "10.244.0.0/16")
# kube-proxy's buildFakeProxier: node "test-node", no node addresses (so no NodePort virtual
# servers), no local-traffic detector.
KP_NODE = NodeInfo("test-node", "", "")
# kube-proxy's tests that give the fake node an address and --nodeport-addresses.
KP_NODE_IP = NodeInfo("test-node", "100.101.102.103", "", node_port_addresses=("100.101.102.0/24",))


def state() -> ProxyState:
    web = ServicePort("default", "web", "http", "TCP", "10.96.0.10", 80, node_port=30080)
    sticky = ServicePort("default", "sticky", "", "TCP", "10.96.0.11", 81, affinity_seconds=2, mode_info="sh")
    dns = ServicePort("kube-system", "dns", "dns", "UDP", "10.96.0.12", 53, node_port=30053)
    empty = ServicePort("default", "nobody", "", "TCP", "10.96.0.13", 80)
    eps = [Endpoint("10.244.1.5", 8080, "node1"), Endpoint("10.244.2.5", 8080, "node2"),
           Endpoint("10.244.3.5", 8080, "node3", ready=False)]
    return ProxyState([web, sticky, dns, empty], {web.key: eps, sticky.key: eps[:1], dns.key: eps[1:2]})


def states(*pairs: tuple[ServicePort, list[Endpoint]]) -> ProxyState:
    return ProxyState(sorted((svc for svc, _ in pairs), key=lambda svc: svc.key), {svc.key: eps for svc, eps in pairs})


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

# Every set kube-proxy's IPVS mode keeps (ipsetInfo, in its order; not its two SCTP sets).
EMPTY_SETS: dict[str, list[str]] = {
    "KUBE-LOOP-BACK": [], "KUBE-CLUSTER-IP": [], "KUBE-EXTERNAL-IP": [], "KUBE-EXTERNAL-IP-LOCAL": [],
    "KUBE-LOAD-BALANCER": [], "KUBE-LOAD-BALANCER-FW": [], "KUBE-LOAD-BALANCER-LOCAL": [],
    "KUBE-LOAD-BALANCER-SOURCE-IP": [], "KUBE-LOAD-BALANCER-SOURCE-CIDR": [], "KUBE-NODE-PORT-TCP": [],
    "KUBE-NODE-PORT-LOCAL-TCP": [], "KUBE-NODE-PORT-UDP": [], "KUBE-NODE-PORT-LOCAL-UDP": [],
    "KUBE-HEALTH-CHECK-NODE-PORT": [], "KUBE-IPVS-IPS": [],
}

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
create KUBE-EXTERNAL-IP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-EXTERNAL-IP-TMP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-EXTERNAL-IP-TMP
swap KUBE-EXTERNAL-IP-TMP KUBE-EXTERNAL-IP
destroy KUBE-EXTERNAL-IP-TMP
create KUBE-EXTERNAL-IP-LOCAL hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-EXTERNAL-IP-LOCAL-TMP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-EXTERNAL-IP-LOCAL-TMP
swap KUBE-EXTERNAL-IP-LOCAL-TMP KUBE-EXTERNAL-IP-LOCAL
destroy KUBE-EXTERNAL-IP-LOCAL-TMP
create KUBE-LOAD-BALANCER hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-LOAD-BALANCER-TMP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-LOAD-BALANCER-TMP
swap KUBE-LOAD-BALANCER-TMP KUBE-LOAD-BALANCER
destroy KUBE-LOAD-BALANCER-TMP
create KUBE-LOAD-BALANCER-FW hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-LOAD-BALANCER-FW-TMP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-LOAD-BALANCER-FW-TMP
swap KUBE-LOAD-BALANCER-FW-TMP KUBE-LOAD-BALANCER-FW
destroy KUBE-LOAD-BALANCER-FW-TMP
create KUBE-LOAD-BALANCER-LOCAL hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-LOAD-BALANCER-LOCAL-TMP hash:ip,port family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-LOAD-BALANCER-LOCAL-TMP
swap KUBE-LOAD-BALANCER-LOCAL-TMP KUBE-LOAD-BALANCER-LOCAL
destroy KUBE-LOAD-BALANCER-LOCAL-TMP
create KUBE-LOAD-BALANCER-SOURCE-IP hash:ip,port,ip family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-LOAD-BALANCER-SOURCE-IP-TM hash:ip,port,ip family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-LOAD-BALANCER-SOURCE-IP-TM
swap KUBE-LOAD-BALANCER-SOURCE-IP-TM KUBE-LOAD-BALANCER-SOURCE-IP
destroy KUBE-LOAD-BALANCER-SOURCE-IP-TM
create KUBE-LOAD-BALANCER-SOURCE-CIDR hash:ip,port,net family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-LOAD-BALANCER-SOURCE-CIDR- hash:ip,port,net family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-LOAD-BALANCER-SOURCE-CIDR-
swap KUBE-LOAD-BALANCER-SOURCE-CIDR- KUBE-LOAD-BALANCER-SOURCE-CIDR
destroy KUBE-LOAD-BALANCER-SOURCE-CIDR-
create KUBE-NODE-PORT-TCP bitmap:port range 0-65535 comment -exist
create KUBE-NODE-PORT-TCP-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-NODE-PORT-TCP-TMP
add KUBE-NODE-PORT-TCP-TMP 30080
swap KUBE-NODE-PORT-TCP-TMP KUBE-NODE-PORT-TCP
destroy KUBE-NODE-PORT-TCP-TMP
create KUBE-NODE-PORT-LOCAL-TCP bitmap:port range 0-65535 comment -exist
create KUBE-NODE-PORT-LOCAL-TCP-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-NODE-PORT-LOCAL-TCP-TMP
swap KUBE-NODE-PORT-LOCAL-TCP-TMP KUBE-NODE-PORT-LOCAL-TCP
destroy KUBE-NODE-PORT-LOCAL-TCP-TMP
create KUBE-NODE-PORT-UDP bitmap:port range 0-65535 comment -exist
create KUBE-NODE-PORT-UDP-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-NODE-PORT-UDP-TMP
add KUBE-NODE-PORT-UDP-TMP 30053
swap KUBE-NODE-PORT-UDP-TMP KUBE-NODE-PORT-UDP
destroy KUBE-NODE-PORT-UDP-TMP
create KUBE-NODE-PORT-LOCAL-UDP bitmap:port range 0-65535 comment -exist
create KUBE-NODE-PORT-LOCAL-UDP-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-NODE-PORT-LOCAL-UDP-TMP
swap KUBE-NODE-PORT-LOCAL-UDP-TMP KUBE-NODE-PORT-LOCAL-UDP
destroy KUBE-NODE-PORT-LOCAL-UDP-TMP
create KUBE-HEALTH-CHECK-NODE-PORT bitmap:port range 0-65535 comment -exist
create KUBE-HEALTH-CHECK-NODE-PORT-TMP bitmap:port range 0-65535 comment -exist
flush KUBE-HEALTH-CHECK-NODE-PORT-TMP
swap KUBE-HEALTH-CHECK-NODE-PORT-TMP KUBE-HEALTH-CHECK-NODE-PORT
destroy KUBE-HEALTH-CHECK-NODE-PORT-TMP
create KUBE-IPVS-IPS hash:ip family inet hashsize 1024 maxelem 65536 comment -exist
create KUBE-IPVS-IPS-TMP hash:ip family inet hashsize 1024 maxelem 65536 comment -exist
flush KUBE-IPVS-IPS-TMP
add KUBE-IPVS-IPS-TMP 10.96.0.10
add KUBE-IPVS-IPS-TMP 10.96.0.11
add KUBE-IPVS-IPS-TMP 10.96.0.12
add KUBE-IPVS-IPS-TMP 10.96.0.13
swap KUBE-IPVS-IPS-TMP KUBE-IPVS-IPS
destroy KUBE-IPVS-IPS-TMP
"""

# The iptables text, in kube-proxy's writeIptablesRules order: the rules of the sets that
# have entries (kube-proxy's ipsetWithIptablesChain), the ClusterIP and external IP rules, then
# the fixed ones.
NAT = """\
*nat
:KUBE-SERVICES - [0:0]
:KUBE-POSTROUTING - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-LOAD-BALANCER - [0:0]
:KUBE-MARK-MASQ - [0:0]
-A KUBE-SERVICES -s 127.0.0.0/8 -j RETURN
"""
NAT_FIXED = """\
-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODE-PORT
-A KUBE-LOAD-BALANCER -j KUBE-MARK-MASQ
"""
NAT_END = """\
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000
-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully
-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000
COMMIT
*filter
:KUBE-FORWARD - [0:0]
:KUBE-NODE-PORT - [0:0]
:KUBE-PROXY-FIREWALL - [0:0]
:KUBE-SOURCE-RANGES-FIREWALL - [0:0]
:KUBE-IPVS-FILTER - [0:0]
:KUBE-IPVS-OUT-FILTER - [0:0]
"""
FILTER_END = """\
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A KUBE-FORWARD -m comment --comment "kubernetes forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A KUBE-NODE-PORT -m comment --comment "Kubernetes health check node port" -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j ACCEPT
-A KUBE-IPVS-FILTER -m set --match-set KUBE-LOAD-BALANCER dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-CLUSTER-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst -j RETURN
-A KUBE-IPVS-FILTER -m set --match-set KUBE-HEALTH-CHECK-NODE-PORT dst -j RETURN
-A KUBE-IPVS-FILTER -m conntrack --ctstate NEW -m set --match-set KUBE-IPVS-IPS dst -j REJECT
COMMIT
"""
LOOP_BACK = ('-A KUBE-POSTROUTING -m comment --comment "Kubernetes endpoints dst ip:port, source ip for solving '
             'hairpin purpose" -m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE\n')
TO_LOAD_BALANCER = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service lb portal" '
                    "-m set --match-set KUBE-LOAD-BALANCER dst,dst -j KUBE-LOAD-BALANCER\n")
LOAD_BALANCER_LOCAL = ('-A KUBE-LOAD-BALANCER -m comment --comment "Kubernetes service load balancer ip + port with '
                       'externalTrafficPolicy=local" -m set --match-set KUBE-LOAD-BALANCER-LOCAL dst,dst -j RETURN\n')
NODE_PORT_LOCAL_TCP = ('-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port with '
                       'externalTrafficPolicy=local" -m set --match-set KUBE-NODE-PORT-LOCAL-TCP dst -j RETURN\n')
NODE_PORT_TCP = ('-A KUBE-NODE-PORT -p tcp -m comment --comment "Kubernetes nodeport TCP port for masquerade '
                 'purpose" -m set --match-set KUBE-NODE-PORT-TCP dst -j KUBE-MARK-MASQ\n')
NODE_PORT_UDP = ('-A KUBE-NODE-PORT -p udp -m comment --comment "Kubernetes nodeport UDP port for masquerade '
                 'purpose" -m set --match-set KUBE-NODE-PORT-UDP dst -j KUBE-MARK-MASQ\n')
CLUSTER_IP = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service cluster ip + port for masquerade purpose" '
              "-m set --match-set KUBE-CLUSTER-IP ")
MASQ_CLUSTER_IP_NO_DETECTOR = CLUSTER_IP + "src,dst -j KUBE-MARK-MASQ\n"  # no cluster CIDR: the node's own
MASQ_OFF_CLUSTER = CLUSTER_IP + "dst,dst ! -s 10.244.0.0/16 -j KUBE-MARK-MASQ\n"
EXTERNAL_IP = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port for masquerade and '
               'filter purpose" -m set --match-set KUBE-EXTERNAL-IP dst,dst')
EXTERNAL_IP_RULES = (f"{EXTERNAL_IP} -j KUBE-MARK-MASQ\n"
                     f"{EXTERNAL_IP} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL -j ACCEPT\n"
                     f"{EXTERNAL_IP} -m addrtype --dst-type LOCAL -j ACCEPT\n")
EXTERNAL_IP_LOCAL = ('-A KUBE-SERVICES -m comment --comment "Kubernetes service external ip + port with '
                     'externalTrafficPolicy=local" -m set --match-set KUBE-EXTERNAL-IP-LOCAL dst,dst')
EXTERNAL_IP_LOCAL_RULES = (f"{EXTERNAL_IP_LOCAL} -m physdev ! --physdev-is-in -m addrtype ! --src-type LOCAL "
                           f"-j ACCEPT\n{EXTERNAL_IP_LOCAL} -m addrtype --dst-type LOCAL -j ACCEPT\n")
ACCEPT_CLUSTER_IP = "-A KUBE-SERVICES -m set --match-set KUBE-CLUSTER-IP dst,dst -j ACCEPT\n"
ACCEPT_LOAD_BALANCER = "-A KUBE-SERVICES -m set --match-set KUBE-LOAD-BALANCER dst,dst -j ACCEPT\n"
DROP_THE_REST = "-A KUBE-SOURCE-RANGES-FIREWALL -j DROP\n"


def iptables(nat: str, accept: str, firewall: str = "", out_filter: str = "") -> str:
    """The whole text: nat's variable rules (before the fixed ones), its ACCEPTs (after them),
    filter's source-range rules (before the DROP) and KUBE-IPVS-OUT-FILTER's."""
    return NAT + nat + NAT_FIXED + accept + NAT_END + firewall + DROP_THE_REST + out_filter + FILTER_END


IPTABLES = iptables(LOOP_BACK + NODE_PORT_TCP + NODE_PORT_UDP + MASQ_OFF_CLUSTER, ACCEPT_CLUSTER_IP)


def test_virtual_servers_one_per_cluster_ip_port_and_node_ip_node_port() -> None:
    ruleset = render(state(), NODE)
    assert ruleset.ipvsadm_save() == IPVSADM_RR
    assert ruleset.addresses == ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"]


def test_ipsets_as_kube_proxy_fills_them() -> None:
    assert render(state(), NODE).ipsets == EMPTY_SETS | {
        "KUBE-LOOP-BACK": ["10.244.1.5,tcp:8080,10.244.1.5"],  # local endpoints only
        "KUBE-CLUSTER-IP": ["10.96.0.10,tcp:80", "10.96.0.11,tcp:81", "10.96.0.12,udp:53", "10.96.0.13,tcp:80"],
        "KUBE-NODE-PORT-TCP": ["30080"],
        "KUBE-NODE-PORT-UDP": ["30053"],
        "KUBE-IPVS-IPS": ["10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.13"],
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


# --- kube-proxy's tests ---------------------------------------------------------------------

SVC1 = dict(namespace="ns1", name="svc1", port_name="p80", protocol="TCP", cluster_ip="10.20.30.41", port=80)
EP = Endpoint("10.180.0.1", 80, "")  # no node name: not this node's
LOCAL_EP = Endpoint("10.180.0.1", 80, "test-node")
REMOTE_EP = Endpoint("10.180.1.1", 80, "other-node")


def test_load_balancer() -> None:
    """TestLoadBalancer: the load-balancer IP is a virtual server bound on kube-ipvs0, in
    KUBE-LOAD-BALANCER, whose chain masquerades (Cluster policy). No node address: no NodePort."""
    lb = ServicePort(**SVC1, node_port=3001, load_balancer_ips=("1.2.3.4",))
    ruleset = render(states((lb, [EP])), KP_NODE)
    assert ruleset.ipvsadm_save() == """\
-A -t 1.2.3.4:80 -s rr
-a -t 1.2.3.4:80 -r 10.180.0.1:80 -m -w 1
-A -t 10.20.30.41:80 -s rr
-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1
"""
    assert ruleset.addresses == ["1.2.3.4", "10.20.30.41"]
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-LOAD-BALANCER": ["1.2.3.4,tcp:80"],
                                           "KUBE-IPVS-IPS": ["1.2.3.4", "10.20.30.41"]}
    assert ruleset.iptables == iptables(TO_LOAD_BALANCER + MASQ_CLUSTER_IP_NO_DETECTOR,
                                        ACCEPT_CLUSTER_IP + ACCEPT_LOAD_BALANCER)


def test_only_local_load_balancing() -> None:
    """TestOnlyLocalLoadBalancing: with externalTrafficPolicy Local the load-balancer IP has only
    the local endpoint and KUBE-LOAD-BALANCER-LOCAL returns before the masquerade; the ClusterIP
    keeps both endpoints."""
    lb = ServicePort(**SVC1, node_port=3001, load_balancer_ips=("1.2.3.4",), external_policy_local=True)
    ruleset = render(states((lb, [LOCAL_EP, REMOTE_EP])), KP_NODE)
    assert ruleset.ipvsadm_save() == """\
-A -t 1.2.3.4:80 -s rr
-a -t 1.2.3.4:80 -r 10.180.0.1:80 -m -w 1
-A -t 10.20.30.41:80 -s rr
-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1
-a -t 10.20.30.41:80 -r 10.180.1.1:80 -m -w 1
"""
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-LOOP-BACK": ["10.180.0.1,tcp:80,10.180.0.1"],
                                           "KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-LOAD-BALANCER": ["1.2.3.4,tcp:80"],
                                           "KUBE-LOAD-BALANCER-LOCAL": ["1.2.3.4,tcp:80"],
                                           "KUBE-IPVS-IPS": ["1.2.3.4", "10.20.30.41"]}
    assert ruleset.iptables == iptables(
        LOOP_BACK + TO_LOAD_BALANCER + LOAD_BALANCER_LOCAL + MASQ_CLUSTER_IP_NO_DETECTOR,
        ACCEPT_CLUSTER_IP + ACCEPT_LOAD_BALANCER)


FIREWALL = ('-A KUBE-PROXY-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port for load '
            'balancer with sourceRange" -m set --match-set KUBE-LOAD-BALANCER-FW dst,dst '
            "-j KUBE-SOURCE-RANGES-FIREWALL\n"
            '-A KUBE-SOURCE-RANGES-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port + source '
            'cidr for packet filter purpose" -m set --match-set KUBE-LOAD-BALANCER-SOURCE-CIDR dst,dst,src -j RETURN\n')


def test_load_balancer_source_ranges() -> None:
    """TestLoadBalancerSourceRanges: the load-balancer IP:port in KUBE-LOAD-BALANCER-FW sends its
    traffic through KUBE-SOURCE-RANGES-FIREWALL, where KUBE-LOAD-BALANCER-SOURCE-CIDR's sources
    RETURN and the rest DROP. The node (no address here) is in no range: its own connections to
    the IP (from the IP, which is on kube-ipvs0) are dropped in KUBE-IPVS-OUT-FILTER."""
    lb = ServicePort(**SVC1, load_balancer_ips=("1.2.3.4",), source_ranges=("10.0.0.0/8",))
    ruleset = render(states((lb, [EP])), KP_NODE)
    assert ruleset.ipvsadm_save() == """\
-A -t 1.2.3.4:80 -s rr
-a -t 1.2.3.4:80 -r 10.180.0.1:80 -m -w 1
-A -t 10.20.30.41:80 -s rr
-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1
"""
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-LOAD-BALANCER": ["1.2.3.4,tcp:80"],
                                           "KUBE-LOAD-BALANCER-FW": ["1.2.3.4,tcp:80"],
                                           "KUBE-LOAD-BALANCER-SOURCE-CIDR": ["1.2.3.4,tcp:80,10.0.0.0/8"],
                                           "KUBE-IPVS-IPS": ["1.2.3.4", "10.20.30.41"]}
    assert ruleset.iptables == iptables(
        TO_LOAD_BALANCER + MASQ_CLUSTER_IP_NO_DETECTOR, ACCEPT_CLUSTER_IP + ACCEPT_LOAD_BALANCER, FIREWALL,
        "-A KUBE-IPVS-OUT-FILTER -s 1.2.3.4 -m ipvs --vaddr 1.2.3.4 --vproto tcp --vport 80 -j DROP\n")


def test_load_balancer_source_ranges_that_hold_the_node() -> None:
    """syncProxyRules: a range holding the node IP lets the node in, by KUBE-LOAD-BALANCER-SOURCE-IP
    (source: the load-balancer IP itself), and KUBE-IPVS-OUT-FILTER has nothing."""
    lb = ServicePort(**SVC1, load_balancer_ips=("1.2.3.4",), source_ranges=("100.101.102.0/24", "10.0.0.0/8"))
    ruleset = render(states((lb, [EP])), KP_NODE_IP)
    assert ruleset.ipsets == EMPTY_SETS | {
        "KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"], "KUBE-LOAD-BALANCER": ["1.2.3.4,tcp:80"],
        "KUBE-LOAD-BALANCER-FW": ["1.2.3.4,tcp:80"],
        "KUBE-LOAD-BALANCER-SOURCE-IP": ["1.2.3.4,tcp:80,1.2.3.4"],
        "KUBE-LOAD-BALANCER-SOURCE-CIDR": ["1.2.3.4,tcp:80,10.0.0.0/8", "1.2.3.4,tcp:80,100.101.102.0/24"],
        "KUBE-IPVS-IPS": ["1.2.3.4", "10.20.30.41"]}
    assert ruleset.iptables == iptables(
        TO_LOAD_BALANCER + MASQ_CLUSTER_IP_NO_DETECTOR, ACCEPT_CLUSTER_IP + ACCEPT_LOAD_BALANCER,
        FIREWALL + '-A KUBE-SOURCE-RANGES-FIREWALL -m comment --comment "Kubernetes service load balancer ip + port + '
        'source IP for packet filter purpose" -m set --match-set KUBE-LOAD-BALANCER-SOURCE-IP dst,dst,src -j RETURN\n')


def test_only_local_node_ports() -> None:
    """TestOnlyLocalNodePorts: the NodePort's virtual server (on the node IP, which
    --nodeport-addresses takes) has only the local endpoint; KUBE-NODE-PORT-LOCAL-TCP returns
    before KUBE-NODE-PORT-TCP masquerades."""
    np = ServicePort(**SVC1, node_port=3001, external_policy_local=True)
    ruleset = render(states((np, [LOCAL_EP, REMOTE_EP])), KP_NODE_IP)
    assert ruleset.ipvsadm_save() == """\
-A -t 10.20.30.41:80 -s rr
-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1
-a -t 10.20.30.41:80 -r 10.180.1.1:80 -m -w 1
-A -t 100.101.102.103:3001 -s rr
-a -t 100.101.102.103:3001 -r 10.180.0.1:80 -m -w 1
"""
    assert ruleset.addresses == ["10.20.30.41"]  # the node IP is not bound on kube-ipvs0
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-LOOP-BACK": ["10.180.0.1,tcp:80,10.180.0.1"],
                                           "KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-NODE-PORT-TCP": ["3001"], "KUBE-NODE-PORT-LOCAL-TCP": ["3001"],
                                           "KUBE-IPVS-IPS": ["10.20.30.41"]}
    assert ruleset.iptables == iptables(LOOP_BACK + NODE_PORT_LOCAL_TCP + NODE_PORT_TCP + MASQ_CLUSTER_IP_NO_DETECTOR,
                                        ACCEPT_CLUSTER_IP)


def test_health_check_node_port() -> None:
    """TestHealthCheckNodePort: the health check node ports of Local LoadBalancers go in
    KUBE-HEALTH-CHECK-NODE-PORT (filter KUBE-NODE-PORT accepts them); a Cluster-policy Service's
    is not read."""
    def lb(name: str, local: bool, health: int) -> ServicePort:
        return ServicePort("ns1", name, "p80", "TCP", "10.20.30.41", 80, node_port=3000,
                           external_policy_local=local, health_check_node_port=health)

    ruleset = render(states((lb("valid-svc1", True, 30000), []), (lb("valid-svc2", True, 30001), []),
                            (lb("invalid-svc3", False, 30002), [])), KP_NODE_IP)
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-NODE-PORT-TCP": ["3000"], "KUBE-NODE-PORT-LOCAL-TCP": ["3000"],
                                           "KUBE-HEALTH-CHECK-NODE-PORT": ["30000", "30001"],
                                           "KUBE-IPVS-IPS": ["10.20.30.41"]}
    assert ruleset.iptables == iptables(NODE_PORT_LOCAL_TCP + NODE_PORT_TCP + MASQ_CLUSTER_IP_NO_DETECTOR,
                                        ACCEPT_CLUSTER_IP)


def test_a_node_port_without_node_ips_has_nothing_of_its_own() -> None:
    """syncProxyRules: --nodeport-addresses matching no node IP leaves a NodePort without virtual
    servers and ipset entries, and its health check port out too."""
    lb = ServicePort(**SVC1, node_port=3001, external_policy_local=True, health_check_node_port=30000)
    node = NodeInfo("test-node", "100.101.102.103", "", node_port_addresses=("192.168.0.0/16",))
    ruleset = render(states((lb, [LOCAL_EP])), node)
    assert ruleset.ipvsadm_save() == "-A -t 10.20.30.41:80 -s rr\n-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1\n"
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-LOOP-BACK": ["10.180.0.1,tcp:80,10.180.0.1"],
                                           "KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"], "KUBE-IPVS-IPS": ["10.20.30.41"]}


def test_external_ips() -> None:
    """TestExternalIPs: an external IP is a virtual server bound on kube-ipvs0, in
    KUBE-EXTERNAL-IP: masqueraded (Cluster policy), accepted from off the machine or when local."""
    svc = ServicePort(**SVC1, external_ips=("50.60.70.81",))
    ruleset = render(states((svc, [EP])), KP_NODE)
    assert ruleset.ipvsadm_save() == """\
-A -t 10.20.30.41:80 -s rr
-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1
-A -t 50.60.70.81:80 -s rr
-a -t 50.60.70.81:80 -r 10.180.0.1:80 -m -w 1
"""
    assert ruleset.addresses == ["10.20.30.41", "50.60.70.81"]
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-EXTERNAL-IP": ["50.60.70.81,tcp:80"],
                                           "KUBE-IPVS-IPS": ["10.20.30.41", "50.60.70.81"]}
    assert ruleset.iptables == iptables(MASQ_CLUSTER_IP_NO_DETECTOR + EXTERNAL_IP_RULES, ACCEPT_CLUSTER_IP)


def test_external_ips_no_endpoint() -> None:
    """TestExternalIPsNoEndpoint: the external IP's virtual server is there, with no real server."""
    svc = ServicePort(**SVC1, external_ips=("50.60.70.81",))
    assert render(states((svc, [])), KP_NODE).ipvsadm_save() == (
        "-A -t 10.20.30.41:80 -s rr\n-A -t 50.60.70.81:80 -s rr\n")


def test_only_local_external_ips() -> None:
    """TestOnlyLocalExternalIPs: with externalTrafficPolicy Local the external IP has only the
    local endpoint, is in KUBE-EXTERNAL-IP-LOCAL and is not masqueraded (the client IP stays)."""
    svc = ServicePort(**SVC1, external_ips=("50.60.70.81",), external_policy_local=True)
    ruleset = render(states((svc, [LOCAL_EP, REMOTE_EP])), KP_NODE)
    assert ruleset.ipvsadm_save() == """\
-A -t 10.20.30.41:80 -s rr
-a -t 10.20.30.41:80 -r 10.180.0.1:80 -m -w 1
-a -t 10.20.30.41:80 -r 10.180.1.1:80 -m -w 1
-A -t 50.60.70.81:80 -s rr
-a -t 50.60.70.81:80 -r 10.180.0.1:80 -m -w 1
"""
    assert ruleset.ipsets == EMPTY_SETS | {"KUBE-LOOP-BACK": ["10.180.0.1,tcp:80,10.180.0.1"],
                                           "KUBE-CLUSTER-IP": ["10.20.30.41,tcp:80"],
                                           "KUBE-EXTERNAL-IP-LOCAL": ["50.60.70.81,tcp:80"],
                                           "KUBE-IPVS-IPS": ["10.20.30.41", "50.60.70.81"]}
    assert ruleset.iptables == iptables(LOOP_BACK + MASQ_CLUSTER_IP_NO_DETECTOR + EXTERNAL_IP_LOCAL_RULES,
                                        ACCEPT_CLUSTER_IP)


def test_an_external_ip_the_node_has_is_not_bound_on_kube_ipvs0() -> None:
    """syncProxyRules: an external IP that is a node address keeps its virtual server, not a bind."""
    svc = ServicePort(**SVC1, external_ips=("100.101.102.103",))
    ruleset = render(states((svc, [EP])), KP_NODE_IP)
    assert ruleset.addresses == ["10.20.30.41"]
    assert ruleset.ipsets["KUBE-IPVS-IPS"] == ["10.20.30.41"]
    assert "-A -t 100.101.102.103:80 -s rr\n" in ruleset.ipvsadm_save()


def test_accept_ipvs_traffic() -> None:
    """TestAcceptIPVSTraffic: a ClusterIP Service with an external IP, a LoadBalancer and a
    NodePort (no node address: no NodePort virtual servers) give KUBE-SERVICES its whole order."""
    svc1 = ServicePort("ns1", "svc1", "p80", "TCP", "10.20.30.40", 80, external_ips=("5.6.7.8",))
    svc2 = ServicePort("ns1", "svc2", "p80", "TCP", "10.20.30.41", 80, node_port=80, load_balancer_ips=("1.2.3.4",))
    svc3 = ServicePort("ns1", "svc3", "p80", "TCP", "10.20.30.42", 80, node_port=80)
    ruleset = render(states((svc1, []), (svc2, []), (svc3, [])), KP_NODE)
    assert ruleset.ipvsadm_save() == """\
-A -t 1.2.3.4:80 -s rr
-A -t 5.6.7.8:80 -s rr
-A -t 10.20.30.40:80 -s rr
-A -t 10.20.30.41:80 -s rr
-A -t 10.20.30.42:80 -s rr
"""
    assert ruleset.iptables == iptables(TO_LOAD_BALANCER + MASQ_CLUSTER_IP_NO_DETECTOR + EXTERNAL_IP_RULES,
                                        ACCEPT_CLUSTER_IP + ACCEPT_LOAD_BALANCER)


def test_masquerade_all_and_the_cluster_cidr() -> None:
    """writeIptablesRules: --masquerade-all marks all ClusterIP traffic, a cluster CIDR only what
    comes from outside it, no detector the node's own connections from a ClusterIP."""
    svc = ServicePort(**SVC1)
    for node, masquerade in (
            (NodeInfo("n", "", "10.244.0.0/16", masquerade_all=True), CLUSTER_IP + "dst,dst -j KUBE-MARK-MASQ\n"),
            (NodeInfo("n", "", "10.244.0.0/16"), MASQ_OFF_CLUSTER),
            (NodeInfo("n", "", ""), MASQ_CLUSTER_IP_NO_DETECTOR)):
        assert render(states((svc, [])), node).iptables == iptables(masquerade, ACCEPT_CLUSTER_IP)


@pytest.mark.parametrize("local, nodes, real_servers, hairpin", [
    (False, ("test-node", "node1", "node2"), ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"], True),
    (False, ("node0", "node1", "node2"), ["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"], False),
    (True, ("test-node", "node1", "node2"), ["10.0.1.1:80"], True),
    (True, ("node0", "node1", "node2"), [], False),  # none here: none at all, the traffic drops
], ids=["cluster with local endpoints", "cluster without", "local with local endpoints", "local without"])
def test_internal_traffic_policy(local: bool, nodes: tuple[str, ...], real_servers: list[str], hairpin: bool) -> None:
    """TestTestInternalTrafficPolicyE2E: internalTrafficPolicy Local gives the ClusterIP this
    node's endpoints only."""
    svc = ServicePort("ns1", "svc1", "", "TCP", "172.20.1.1", 80, internal_policy_local=local)
    eps = [Endpoint(f"10.0.1.{i}", 80, node) for i, node in enumerate(nodes, 1)]
    ruleset = render(states((svc, eps)), KP_NODE)
    assert ruleset.ipvsadm_save() == "-A -t 172.20.1.1:80 -s rr\n" + "".join(
        f"-a -t 172.20.1.1:80 -r {rs} -m -w 1\n" for rs in real_servers)
    assert ruleset.ipsets["KUBE-LOOP-BACK"] == (["10.0.1.1,tcp:80,10.0.1.1"] if hairpin else [])


def _conditions(ready: bool, serving: bool, terminating: bool, node: str, i: int) -> Endpoint:
    return Endpoint(f"10.0.1.{i}", 80, node, ready=ready, terminating=terminating, serving=serving)


READY, SERVING_TERMINATING, TERMINATING, NOT_READY = ((True, True, False), (False, True, True),
                                                      (False, False, True), (False, False, False))


@pytest.mark.parametrize("local, conditions, cluster, external, hairpin", [
    # Test_EndpointSliceReadyAndTerminatingCluster: ready ones only, anywhere.
    (False, [(READY, "test-node"), (READY, "test-node"), (SERVING_TERMINATING, "test-node"),
             (TERMINATING, "test-node"), (READY, "another-node")], "1 2 5", "1 2 5", "1 2 3 4"),
    # Test_EndpointSliceReadyAndTerminatingLocal: the external IP the local ready ones.
    (True, [(READY, "test-node"), (READY, "test-node"), (SERVING_TERMINATING, "test-node"),
            (TERMINATING, "test-node"), (READY, "another-node")], "1 2 5", "1 2", "1 2 3 4"),
    # Test_EndpointSliceOnlyReadyAndTerminatingCluster: none ready, so the serving terminating ones.
    (False, [(SERVING_TERMINATING, "test-node"), (SERVING_TERMINATING, "test-node"), (TERMINATING, "test-node"),
             (SERVING_TERMINATING, "another-node"), (NOT_READY, "another-node")], "1 2 4", "1 2 4", "1 2 3"),
    # Test_EndpointSliceOnlyReadyAndTerminatingLocal: none ready here, so this node's serving
    # terminating ones, while the ClusterIP has a ready one elsewhere.
    (True, [(SERVING_TERMINATING, "test-node"), (SERVING_TERMINATING, "test-node"), (TERMINATING, "test-node"),
            (SERVING_TERMINATING, "another-node"), (READY, "another-node")], "5", "1 2", "1 2 3"),
], ids=["ready and terminating, cluster", "ready and terminating, local", "only terminating, cluster",
        "only terminating, local"])
def test_terminating_endpoints(local: bool, conditions: list[tuple[tuple[bool, bool, bool], str]], cluster: str,
                               external: str, hairpin: str) -> None:
    """kube-proxy's Test_EndpointSlice*Terminating* tests: a NodePort Service (no NodePort number)
    with the external IP 1.2.3.4; the hairpin set has every local endpoint, whatever its state."""
    svc = ServicePort("ns1", "svc1", "", "TCP", "172.20.1.1", 80, external_ips=("1.2.3.4",),
                      external_policy_local=local)
    eps = [_conditions(*flags, node, i) for i, (flags, node) in enumerate(conditions, 1)]
    ruleset = render(states((svc, eps)), KP_NODE)

    def table(vip: str, which: str) -> str:
        return f"-A -t {vip}:80 -s rr\n" + "".join(f"-a -t {vip}:80 -r 10.0.1.{i}:80 -m -w 1\n" for i in which.split())

    assert ruleset.ipvsadm_save() == table("1.2.3.4", external) + table("172.20.1.1", cluster)
    assert ruleset.ipsets["KUBE-LOOP-BACK"] == [f"10.0.1.{i},tcp:80,10.0.1.{i}" for i in hairpin.split()]
