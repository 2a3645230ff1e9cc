"""nftables mode's sync bookkeeping against an in-memory kernel (tests/fakes/nftables.py):
after every sync, full or partial, the fake holds exactly what a fresh load of the
rendered text holds; a partial sync writes only what changed; a refusal forces a full one.
And packets traced through what the fake holds go where kube-proxy's packet-flow tests
(pkg/proxy/nftables/proxier_test.go) say, in both endpoint-choice layouts."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace
from typing import Iterator

import pytest
from hypothesis import given, settings, strategies as st

from kproxy.proxy import conntrack
from kproxy.proxy.nftables import NftablesProxier, render
from kproxy.proxy.nftables.backend import TransactionError
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from tests.fakes.nftables import FakeNft, loaded, trace
from tests.test_nftables_render import CONDITIONS, SCENARIOS
from tests.test_nftables_render import ep as endpoint

NODE = NodeInfo("node1", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16")
WEB = ServicePort("ns1", "web", "http", "TCP", "172.30.0.41", 80, node_port=30080)
DNS = ServicePort("ns1", "dns", "dns", "UDP", "172.30.0.53", 53)
DNS_TCP = ServicePort("ns1", "dns", "dns-tcp", "TCP", "172.30.0.53", 53)


@pytest.fixture(autouse=True, scope="module")
def _no_conntrack() -> Iterator[None]:
    """The root namespace's conntrack table stays as it is: the cleaner's commands are only
    recorded (proxier.conntrack.last)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(conntrack, "subprocess", SimpleNamespace(
            run=lambda argv, **_: subprocess.CompletedProcess(argv, 0, "", "")))
        yield


def ep(ip: str, port: int = 8080) -> Endpoint:
    return Endpoint(ip, port, "node1")


def state(services: list[ServicePort], endpoints: dict[str, list[Endpoint]]) -> ProxyState:
    return ProxyState(sorted(services, key=lambda svc: svc.key), endpoints)


def converged(fake: FakeNft, desired: ProxyState, node: NodeInfo = NODE, **options: object) -> bool:
    return fake.state() == loaded(render(desired, node, **options).text())  # type: ignore[arg-type]


def test_first_sync_is_full_and_the_kernel_holds_the_rendered_table() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    desired = state([WEB, DNS], {WEB.key: [ep("10.0.1.1"), ep("10.0.1.2")], DNS.key: [ep("10.0.1.3", 53)]})
    result = proxier.sync(desired)
    assert (result.full, result.changed_services) == (True, 2)
    assert converged(fake, desired)


def test_an_endpoint_leaving_rewrites_one_service_chain_and_deletes_its_endpoint_chain() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    proxier.sync(state([WEB, DNS], {WEB.key: [ep("10.0.1.1"), ep("10.0.1.2")], DNS.key: [ep("10.0.1.3", 53)]}))
    after = state([WEB, DNS], {WEB.key: [ep("10.0.1.1")], DNS.key: [ep("10.0.1.3", 53)]})
    result = proxier.sync(after)
    assert (result.full, result.changed_services) == (False, 1)
    assert fake.runs[-1] == """\
flush chain ip kube-proxy service-DK7ABAZC-ns1/web/tcp/http
flush chain ip kube-proxy endpoint-TSOBM2N7-ns1/web/tcp/http__10.0.1.2/8080
add rule ip kube-proxy service-DK7ABAZC-ns1/web/tcp/http ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade
add rule ip kube-proxy service-DK7ABAZC-ns1/web/tcp/http numgen random mod 1 vmap { 0 : goto endpoint-GHAFBRCB-ns1/web/tcp/http__10.0.1.1/8080 }
delete chain ip kube-proxy endpoint-TSOBM2N7-ns1/web/tcp/http__10.0.1.2/8080
"""
    assert converged(fake, after)


def test_nothing_changed_writes_nothing() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    desired = state([WEB], {WEB.key: [ep("10.0.1.1")]})
    proxier.sync(desired)
    assert proxier.sync(state([WEB], {WEB.key: [ep("10.0.1.1")]})).changed_services == 0
    assert len(fake.runs) == 1


def test_the_last_endpoint_leaving_turns_the_service_into_a_reject_and_back() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    proxier.sync(state([WEB], {WEB.key: [ep("10.0.1.1")]}))
    empty = state([WEB], {})
    proxier.sync(empty)
    assert fake.runs[-1] == """\
flush chain ip kube-proxy service-DK7ABAZC-ns1/web/tcp/http
flush chain ip kube-proxy external-DK7ABAZC-ns1/web/tcp/http
flush chain ip kube-proxy endpoint-GHAFBRCB-ns1/web/tcp/http__10.0.1.1/8080
delete element ip kube-proxy service-ips { 172.30.0.41 . tcp . 80 }
delete element ip kube-proxy service-nodeports { tcp . 30080 }
add element ip kube-proxy no-endpoint-nodeports { tcp . 30080 comment "ns1/web:http" : goto reject-chain }
add element ip kube-proxy no-endpoint-services { 172.30.0.41 . tcp . 80 comment "ns1/web:http" : goto reject-chain }
delete chain ip kube-proxy service-DK7ABAZC-ns1/web/tcp/http
delete chain ip kube-proxy external-DK7ABAZC-ns1/web/tcp/http
delete chain ip kube-proxy endpoint-GHAFBRCB-ns1/web/tcp/http__10.0.1.1/8080
"""
    assert converged(fake, empty)
    back = state([WEB], {WEB.key: [ep("10.0.1.9")]})
    proxier.sync(back)
    assert converged(fake, back)


def test_a_cluster_ip_stays_in_cluster_ips_while_one_of_its_ports_is_left() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    both = state([DNS, DNS_TCP], {DNS.key: [ep("10.0.1.3", 53)], DNS_TCP.key: [ep("10.0.1.3", 53)]})
    proxier.sync(both)
    one = state([DNS_TCP], {DNS_TCP.key: [ep("10.0.1.3", 53)]})
    proxier.sync(one)
    assert "cluster-ips" not in fake.runs[-1]
    assert fake.state().elements["cluster-ips"] == {"172.30.0.53": "172.30.0.53"}  # type: ignore[union-attr]
    proxier.sync(state([], {}))
    assert "delete element ip kube-proxy cluster-ips { 172.30.0.53 }" in fake.runs[-1].splitlines()
    assert converged(fake, state([], {}))


def test_a_new_affinity_timeout_replaces_the_sets_once_no_rule_names_them() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    sticky = dataclasses.replace(WEB, affinity_seconds=10800)
    proxier.sync(state([sticky], {WEB.key: [ep("10.0.1.1"), ep("10.0.1.2")]}))
    shorter = state([dataclasses.replace(WEB, affinity_seconds=30)], {WEB.key: [ep("10.0.1.1"), ep("10.0.1.2")]})
    assert proxier.sync(shorter).full is False
    assert converged(fake, shorter)


def test_a_refused_sync_changes_nothing_and_the_next_one_is_full() -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    first = state([WEB], {WEB.key: [ep("10.0.1.1")]})
    proxier.sync(first)
    fake.refuse_next()
    with pytest.raises(TransactionError):
        proxier.sync(state([WEB], {WEB.key: [ep("10.0.1.2")]}))
    assert converged(fake, first)
    again = state([WEB], {WEB.key: [ep("10.0.1.2")]})
    assert proxier.sync(again).full is True
    assert converged(fake, again)


def test_a_restarted_proxier_deletes_what_the_old_one_left() -> None:
    fake = FakeNft()
    NftablesProxier(NODE, backend=fake).sync(state([WEB, DNS], {WEB.key: [ep("10.0.1.1")],
                                                                DNS.key: [ep("10.0.1.3", 53)]}))
    fresh = state([DNS], {DNS.key: [ep("10.0.1.4", 53)]})
    assert NftablesProxier(NODE, backend=fake).sync(fresh).full is True
    assert converged(fake, fresh)


def test_a_refused_full_sync_is_retried_once_as_a_rebuild_of_the_table() -> None:
    fake = FakeNft()
    NftablesProxier(NODE, backend=fake).sync(state([WEB], {WEB.key: [ep("10.0.1.1")]}))
    fake.refuse_next()
    desired = state([DNS], {DNS.key: [ep("10.0.1.4", 53)]})
    assert NftablesProxier(NODE, backend=fake).sync(desired).full is True
    assert fake.runs[-1].startswith("add table ip kube-proxy\ndelete table ip kube-proxy\n")
    assert converged(fake, desired)


def test_crossing_the_vmap_limit_rewrites_everything_in_a_full_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules["kproxy.proxy.nftables.render"], "VMAP_LIMIT", 1)
    fake = FakeNft()
    proxier = NftablesProxier(NODE, backend=fake)
    proxier.sync(state([WEB], {WEB.key: [ep("10.0.1.1"), ep("10.0.1.2")]}))
    assert "numgen random mod 2 vmap" in fake.runs[-1]
    two = state([WEB, DNS], {WEB.key: [ep("10.0.1.1"), ep("10.0.1.2")], DNS.key: [ep("10.0.1.3", 53)]})
    assert proxier.sync(two).full is True
    assert "numgen random mod 2 0 goto endpoint-" in fake.runs[-1]
    assert converged(fake, two)


def test_a_load_balancer_switching_to_local_policy_adds_its_local_chain_and_rewrites_its_external_chain() -> None:
    cluster, local = SCENARIOS["TestExternalTrafficPolicyCluster"], SCENARIOS["TestExternalTrafficPolicyLocal"]
    fake = FakeNft()
    proxier = NftablesProxier(local.node, backend=fake)
    proxier.sync(cluster.state)
    assert proxier.sync(local.state).full is False
    external = "external-ULMVA6XW-ns1/svc1/tcp/p80"
    assert fake.runs[-1] == f"""\
add chain ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80
flush chain ip kube-proxy {external}
add rule ip kube-proxy {external} ip saddr 10.0.0.0/8 goto service-ULMVA6XW-ns1/svc1/tcp/p80 comment "short-circuit pod traffic"
add rule ip kube-proxy {external} fib saddr type local jump mark-for-masquerade comment "masquerade local traffic"
add rule ip kube-proxy {external} fib saddr type local goto service-ULMVA6XW-ns1/svc1/tcp/p80 comment "short-circuit local traffic"
add rule ip kube-proxy {external} goto local-ULMVA6XW-ns1/svc1/tcp/p80
add rule ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80 numgen random mod 1 vmap {{ 0 : goto endpoint-MLKSHPWN-ns1/svc1/tcp/p80__10.180.2.1/80 }}
"""
    proxier.sync(cluster.state)
    assert fake.runs[-1].splitlines()[-1] == "delete chain ip kube-proxy local-ULMVA6XW-ns1/svc1/tcp/p80"
    assert converged(fake, cluster.state, cluster.node)


def test_source_ranges_coming_changing_and_going_touch_the_firewall_chain_and_its_elements() -> None:
    lb = SCENARIOS["TestLoadBalancer"]
    svc = lb.state.services[0]
    fake = FakeNft()
    proxier = NftablesProxier(lb.node, backend=fake)
    anyone = ProxyState([dataclasses.replace(svc, source_ranges=())], lb.state.endpoints)
    proxier.sync(anyone)
    proxier.sync(lb.state)
    firewall = "firewall-ULMVA6XW-ns1/svc1/tcp/p80"
    assert fake.runs[-1] == f"""\
add chain ip kube-proxy {firewall}
add rule ip kube-proxy {firewall} ip saddr != {{ 192.168.0.0/24 , 203.0.113.0/25 , 1.2.3.4 , 5.6.7.8 }} drop
add element ip kube-proxy firewall-ips {{ 1.2.3.4 . tcp . 80 : goto {firewall}, 5.6.7.8 . tcp . 80 : goto {firewall} }}
"""
    narrower = ProxyState([dataclasses.replace(svc, source_ranges=("203.0.113.0/25",))], lb.state.endpoints)
    proxier.sync(narrower)  # the node is no longer in the ranges: nor are the LB IPs
    assert fake.runs[-1] == f"""\
flush chain ip kube-proxy {firewall}
add rule ip kube-proxy {firewall} ip saddr != {{ 203.0.113.0/25 }} drop
"""
    proxier.sync(anyone)
    assert fake.runs[-1] == f"""\
flush chain ip kube-proxy {firewall}
delete element ip kube-proxy firewall-ips {{ 1.2.3.4 . tcp . 80, 5.6.7.8 . tcp . 80 }}
delete chain ip kube-proxy {firewall}
"""
    assert converged(fake, anyone, lb.node)


def test_udp_conntrack_entries_go_with_the_endpoints_this_node_reached() -> None:
    """internalTrafficPolicy Local: only this node's endpoint had chains, so only its entries go."""
    dns = dataclasses.replace(DNS, internal_policy_local=True)
    proxier = NftablesProxier(NODE, backend=FakeNft())
    here, elsewhere = Endpoint("10.0.2.1", 53, NODE.name), Endpoint("10.0.2.2", 53, "node2")
    proxier.sync(state([dns], {dns.key: [here, elsewhere]}))
    assert proxier.conntrack.last == [["-D", "--orig-dst", "172.30.0.53", "-p", "udp"]]
    gone = dataclasses.replace(here, ready=False, terminating=True, serving=False)
    proxier.sync(state([dns], {dns.key: [gone, elsewhere]}))
    assert proxier.conntrack.last == [["-D", "--orig-dst", "172.30.0.53", "--dst-nat", "10.0.2.1", "-p", "udp"]]


def test_kproxy_rules_of_a_service_lists_its_policy_and_firewall_chains_and_its_elements() -> None:
    overall = SCENARIOS["TestOverallNFTablesRules"]
    proxier = NftablesProxier(overall.node, counters=True, backend=FakeNft())  # the fake lists what is asked
    proxier.sync(overall.state)
    asked = proxier.rules_excerpt("ns5/svc5").splitlines()[2:-1]
    assert asked == [
        "list chain ip kube-proxy endpoint-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
        "list chain ip kube-proxy external-HVFWP5L3-ns5/svc5/tcp/p80",
        "list chain ip kube-proxy firewall-HVFWP5L3-ns5/svc5/tcp/p80",
        "list chain ip kube-proxy service-HVFWP5L3-ns5/svc5/tcp/p80",
        "list set ip kube-proxy affinity-GTK6MW7G-ns5/svc5/tcp/p80__10.180.0.3/80",
        "get element ip kube-proxy service-ips { 172.30.0.45 . tcp . 80 }",
        "get element ip kube-proxy service-ips { 5.6.7.8 . tcp . 80 }",
        "get element ip kube-proxy firewall-ips { 5.6.7.8 . tcp . 80 }",
        "get element ip kube-proxy service-nodeports { tcp . 3002 }",
        "get element ip kube-proxy cluster-ips { 172.30.0.45 }",
    ]
    assert "get element ip kube-proxy no-endpoint-services { 1.2.3.4 . tcp . 80 }" in proxier.rules_excerpt("ns2/svc2")


# Each service port's shapes between syncs: Cluster ClusterIP; LoadBalancer (NodePort, an
# external IP, LB IPs, source ranges holding the node or not) with Cluster or Local
# policies; internalTrafficPolicy Local.
def _shapes(svc: ServicePort) -> list[ServicePort]:
    lb = dataclasses.replace(svc, node_port=30000 + svc.port, load_balancer_ips=("1.2.3.4", f"5.6.7.{svc.port % 250}"),
                             external_ips=(f"192.168.99.{svc.port % 250}",))
    return [svc, lb, dataclasses.replace(lb, source_ranges=("203.0.113.0/25",)),
            dataclasses.replace(lb, source_ranges=("192.168.0.0/24", "203.0.113.0/25"), external_policy_local=True,
                                health_check_node_port=32000),
            dataclasses.replace(lb, load_balancer_ips=lb.load_balancer_ips[1:], external_policy_local=True,
                                internal_policy_local=True),
            dataclasses.replace(svc, internal_policy_local=True)]


SERVICES = [ServicePort("ns", f"s{i}", "p", proto, f"172.30.0.{i + 1}", 80 + i, node_port=30000 + i if i % 2 else 0,
                        affinity_seconds=60 if i == 3 else 0)
            for i, proto in enumerate(["TCP", "UDP", "TCP", "TCP", "UDP"])]
# An endpoint: its address, whether it is on this node, its conditions.
ENDPOINT = st.tuples(st.integers(1, 4), st.booleans(), st.sampled_from(sorted(CONDITIONS)))
STEP = st.fixed_dictionaries({svc.key: st.none() | st.tuples(st.integers(0, len(_shapes(svc)) - 1),
                                                              st.lists(ENDPOINT, max_size=3))
                              for svc in SERVICES})


@settings(max_examples=80, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=6), st.sampled_from(["vmap", "cascade"]), st.booleans())
def test_any_sequence_of_syncs_leaves_exactly_the_rendered_table(
        steps: list[dict[str, tuple[int, list[tuple[int, bool, str]]] | None]], choice: str, counters: bool) -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, choice=choice, counters=counters, backend=fake)
    for step in steps:
        picked = {svc.key: (_shapes(svc)[found[0]], found[1]) for svc in SERVICES if (found := step[svc.key])}
        desired = state([svc for svc, _ in picked.values()], {
            key: [dataclasses.replace(endpoint(f"10.0.2.{i}", NODE.name if here else "node2", condition), port=8080)
                  for i, here, condition in endpoints] for key, (_, endpoints) in picked.items()})
        proxier.sync(desired)
        assert converged(fake, desired, choice=choice, counters=counters)


# kube-proxy's packet-flow tests of these scenarios (tests/test_nftables_render.py has
# their Services): (source, destination, port, where it goes, masqueraded), traced through
# what the fake kernel holds, as kube-proxy's runPacketFlowTests traces its fake's table.
POD, HOST, EXTERNAL, BLOCKED = "10.0.0.2", "192.168.0.2", "203.0.113.2", "203.0.113.130"
HOST_IPS = frozenset({"192.168.0.2", "192.168.1.2", "192.168.99.11"})  # kube-proxy's testNodeIPs (IPv4)
Flow = tuple[str, str, int, str, bool]


def _to(endpoints: str) -> str:
    """kube-proxy's expected output: "10.180.0.1, 10.180.2.1" -> "10.180.0.1:80, 10.180.2.1:80"."""
    return ", ".join(f"{ip}:80" for ip in endpoints.split(", "))


def _policy_flows(local: bool) -> list[Flow]:
    """TestExternalTrafficPolicyLocal / ...Cluster."""
    both, only_local = _to("10.180.0.1, 10.180.2.1"), _to("10.180.2.1")
    outside = only_local if local else both
    return [(POD, "172.30.0.41", 80, both, False), (POD, "192.168.99.11", 80, both, not local),
            (EXTERNAL, "192.168.99.11", 80, outside, not local), (POD, "1.2.3.4", 80, both, not local),
            (EXTERNAL, "1.2.3.4", 80, outside, not local), (POD, HOST, 3001, both, not local),
            (EXTERNAL, HOST, 3001, outside, not local)]


def _terminating_flows(cluster: bool) -> dict[str, list[Flow]]:
    test = "TestTerminatingEndpointsTrafficPolicy" + ("Cluster" if cluster else "Local")
    cases = {
        "ready endpoints exist": ("10.0.1.1, 10.0.1.2, 10.0.1.5", "10.0.1.1, 10.0.1.2, 10.0.1.5" if cluster
                                  else "10.0.1.1, 10.0.1.2"),
        "only terminating endpoints exist": ("10.0.1.2, 10.0.1.3, 10.0.1.5", "10.0.1.2, 10.0.1.3, 10.0.1.5")
        if cluster else ("10.0.1.5", "10.0.1.2, 10.0.1.3"),
        "terminating endpoints on remote node": ("10.0.1.5", "10.0.1.5" if cluster else "DROP"),
        "no usable endpoints on any node": ("REJECT", "REJECT"),
    }
    return {f"{test}/{name}": [
        (POD, "172.30.1.1", 80, _to(inside) if inside[0].isdigit() else inside, False),
        (EXTERNAL, "1.2.3.4", 80, _to(outside) if outside[0].isdigit() else outside,
         cluster and outside[0].isdigit())] for name, (inside, outside) in cases.items()}


def _masquerade_flows() -> dict[str, list[Flow]]:
    """TestInternalExternalMasquerade: its flows, and each case's overrides of them."""
    svc1, svc2, svc3 = (_to(f"10.180.0.{i}, 10.180.1.{i}") for i in (1, 2, 3))
    base = {  # name: (source, destination, port, output, masqueraded)
        "pod to ClusterIP": (POD, "172.30.0.41", 80, svc1, False), "pod to NodePort": (POD, HOST, 3001, svc1, True),
        "pod to LB": (POD, "1.2.3.4", 80, svc1, True), "node to ClusterIP": (HOST, "172.30.0.41", 80, svc1, True),
        "node to NodePort": (HOST, HOST, 3001, svc1, True), "node to LB": (HOST, "1.2.3.4", 80, svc1, True),
        "external to ClusterIP": (EXTERNAL, "172.30.0.41", 80, svc1, True),
        "external to NodePort": (EXTERNAL, HOST, 3001, svc1, True), "external to LB": (EXTERNAL, "1.2.3.4", 80, svc1, True),
        "pod to ClusterIP with eTP:Local": (POD, "172.30.0.42", 80, svc2, False),
        "pod to NodePort with eTP:Local": (POD, HOST, 3002, svc2, False),
        "pod to LB with eTP:Local": (POD, "5.6.7.8", 80, svc2, False),
        "node to ClusterIP with eTP:Local": (HOST, "172.30.0.42", 80, svc2, True),
        "node to NodePort with eTP:Local": (HOST, HOST, 3001, svc1, True),
        "node to LB with eTP:Local": (HOST, "5.6.7.8", 80, svc2, True),
        "external to ClusterIP with eTP:Local": (EXTERNAL, "172.30.0.42", 80, svc2, True),
        "external to NodePort with eTP:Local": (EXTERNAL, HOST, 3002, _to("10.180.0.2"), False),
        "external to LB with eTP:Local": (EXTERNAL, "5.6.7.8", 80, _to("10.180.0.2"), False),
        "pod to ClusterIP with iTP:Local": (POD, "172.30.0.43", 80, _to("10.180.0.3"), False),
        "pod to NodePort with iTP:Local": (POD, HOST, 3003, svc3, True),
        "pod to LB with iTP:Local": (POD, "9.10.11.12", 80, svc3, True),
        "node to ClusterIP with iTP:Local": (HOST, "172.30.0.43", 80, _to("10.180.0.3"), True),
        "node to NodePort with iTP:Local": (HOST, HOST, 3003, svc3, True),
        "node to LB with iTP:Local": (HOST, "9.10.11.12", 80, svc3, True),
        "external to ClusterIP with iTP:Local": (EXTERNAL, "172.30.0.43", 80, _to("10.180.0.3"), True),
        "external to NodePort with iTP:Local": (EXTERNAL, HOST, 3003, svc3, True),
        "external to LB with iTP:Local": (EXTERNAL, "9.10.11.12", 80, svc3, True),
    }
    no_detector = {name: False for name in ("node to ClusterIP", "node to ClusterIP with eTP:Local",
                                            "node to ClusterIP with iTP:Local", "external to ClusterIP",
                                            "external to ClusterIP with eTP:Local",
                                            "external to ClusterIP with iTP:Local")}
    only_local = {name: _to("10.180.0.2") for name in ("pod to NodePort with eTP:Local", "pod to LB with eTP:Local")}
    masquerade_all = {name: True for name in ("pod to ClusterIP", "pod to ClusterIP with eTP:Local",
                                              "pod to ClusterIP with iTP:Local")}
    cases = {"base": ({}, {}), "no LocalTrafficDetector": (no_detector, only_local),
             "masqueradeAll": (masquerade_all, {}), "masqueradeAll, no LocalTrafficDetector": (masquerade_all, only_local)}
    return {f"TestInternalExternalMasquerade/{case}": [
        (source, dest, port, outputs.get(name, output), masq.get(name, masqueraded))
        for name, (source, dest, port, output, masqueraded) in base.items()]
        for case, (masq, outputs) in cases.items()}


FLOWS: dict[str, list[Flow]] = {
    "TestExternalTrafficPolicyLocal": _policy_flows(local=True),
    "TestExternalTrafficPolicyCluster": _policy_flows(local=False),
    "TestLoadBalancer": [
        (POD, "172.30.0.41", 80, _to("10.180.0.1"), False), (EXTERNAL, HOST, 3001, _to("10.180.0.1"), True),
        (BLOCKED, HOST, 3001, _to("10.180.0.1"), True),  # NodePorts are not subject to source ranges
        *[flow for lb in ("1.2.3.4", "5.6.7.8") for flow in (
            (EXTERNAL, lb, 80, _to("10.180.0.1"), True), (BLOCKED, lb, 80, "DROP", False), (POD, lb, 80, "DROP", False),
            (HOST, lb, 80, _to("10.180.0.1"), True),
            (lb, lb, 80, _to("10.180.0.1"), True))]],  # the node to its own LB IP, SNATed to it: allowed
    "TestNoEndpointsReject": [(POD, "172.30.0.41", 80, "REJECT", False), (EXTERNAL, "192.168.99.11", 80, "REJECT", False),
                              (POD, HOST, 3001, "REJECT", False), (EXTERNAL, HOST, 3001, "REJECT", False),
                              (POD, "1.2.3.4", 80, "REJECT", False), (EXTERNAL, "1.2.3.4", 80, "REJECT", False)],
    **{f"TestInternalTrafficPolicy/internalTrafficPolicy is {name}": [(POD, "172.30.1.1", 80, output, False)]
       for name, output in (("cluster", _to("10.0.1.1, 10.0.1.2, 10.0.1.3")),
                            ("local and there is one local endpoint", _to("10.0.1.1")),
                            ("local and there are multiple local endpoints", _to("10.0.1.1, 10.0.1.2")),
                            ("local and there are no local endpoints", "DROP"))},
    **_terminating_flows(cluster=False),
    **_terminating_flows(cluster=True),
    **_masquerade_flows(),
}


def traced(fake: FakeNft, flows: list[Flow]) -> list[Flow]:
    return [(source, dest, port, *trace(fake.state(), source, dest, port, local_ips=HOST_IPS))
            for source, dest, port, _, _ in flows]


@pytest.mark.parametrize("choice", ["vmap", "cascade"])
@pytest.mark.parametrize("name", FLOWS)
def test_packets_go_where_kube_proxys_packet_flow_tests_expect(name: str, choice: str) -> None:
    scenario = SCENARIOS[name]
    fake = FakeNft()
    NftablesProxier(scenario.node, choice=choice, counters=choice == "cascade", backend=fake).sync(scenario.state)
    assert traced(fake, FLOWS[name]) == FLOWS[name]


@pytest.mark.parametrize("choice", ["vmap", "cascade"])
def test_partial_syncs_from_scenario_to_scenario_converge_and_route_as_kube_proxys_tests_expect(choice: str) -> None:
    """One service port changing shape: LoadBalancer and back, Cluster to Local policies and
    back, LB IPs and source ranges coming and going, endpoints terminating; then, as
    kube-proxy's tests do, its endpoints deleted."""
    names = [name for name in FLOWS if SCENARIOS[name].node == SCENARIOS["TestLoadBalancer"].node]
    node = SCENARIOS[names[0]].node
    fake = FakeNft()
    proxier = NftablesProxier(node, choice=choice, backend=fake)
    for number, name in enumerate(names + names[::-1]):
        desired = SCENARIOS[name].state
        assert proxier.sync(desired).full is (number == 0)
        assert converged(fake, desired, node, choice=choice), name
        assert traced(fake, FLOWS[name]) == FLOWS[name], name
        if name.startswith(("TestInternalTrafficPolicy/", "TestTerminatingEndpoints")):
            proxier.sync(ProxyState(desired.services))
            assert traced(fake, FLOWS[name]) == [(*flow[:3], "REJECT", False) for flow in FLOWS[name]], name
