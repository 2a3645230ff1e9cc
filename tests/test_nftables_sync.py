"""nftables mode's sync bookkeeping against an in-memory kernel (tests/fakes/nftables.py):
after every sync, full or partial, the fake holds exactly what a fresh load of the
rendered text holds; a partial sync writes only what changed; a refusal forces a full one."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from hypothesis import given, settings, strategies as st

from kproxy.proxy.nftables import NftablesProxier, render
from kproxy.proxy.nftables.backend import TransactionError
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from tests.fakes.nftables import FakeNft, loaded

NODE = NodeInfo("node1", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16")
WEB = ServicePort("ns1", "web", "http", "TCP", "172.30.0.41", 80, node_port=30080)
DNS = ServicePort("ns1", "dns", "dns", "UDP", "172.30.0.53", 53)
DNS_TCP = ServicePort("ns1", "dns", "dns-tcp", "TCP", "172.30.0.53", 53)


def ep(ip: str, port: int = 8080) -> Endpoint:
    return Endpoint(ip, port, "node1")


def state(services: list[ServicePort], endpoints: dict[str, list[Endpoint]]) -> ProxyState:
    return ProxyState(sorted(services, key=lambda svc: svc.key), endpoints)


def converged(fake: FakeNft, desired: ProxyState, **options: object) -> bool:
    return fake.state() == loaded(render(desired, NODE, **options).text())  # type: ignore[arg-type]


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


SERVICES = [ServicePort("ns", f"s{i}", "p", proto, f"172.30.0.{i + 1}", 80 + i, node_port=30000 + i if i % 2 else 0,
                        affinity_seconds=60 if i == 3 else 0)
            for i, proto in enumerate(["TCP", "UDP", "TCP", "TCP", "UDP"])]
STEP = st.fixed_dictionaries({svc.key: st.none() | st.lists(st.integers(1, 4), max_size=3) for svc in SERVICES})


@settings(max_examples=60, deadline=None)
@given(st.lists(STEP, min_size=1, max_size=6), st.sampled_from(["vmap", "cascade"]), st.booleans())
def test_any_sequence_of_syncs_leaves_exactly_the_rendered_table(steps: list[dict[str, list[int] | None]],
                                                                 choice: str, counters: bool) -> None:
    fake = FakeNft()
    proxier = NftablesProxier(NODE, choice=choice, counters=counters, backend=fake)
    for step in steps:
        services = [svc for svc in SERVICES if step[svc.key] is not None]
        desired = state(services, {svc.key: [ep(f"10.0.2.{i}") for i in step[svc.key] or []] for svc in services})
        proxier.sync(desired)
        assert converged(fake, desired, choice=choice, counters=counters)
