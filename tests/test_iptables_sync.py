"""The iptables proxier's sync bookkeeping, against an in-memory iptables (tests/fakes/iptables.py), no root.

Full or partial, what a partial sync writes, what a failed restore forces, the
periodic full syncs, the repairs only a full sync makes, cleanup. After every sync
the fake's tables must hold exactly what was rendered (plus the jumps from the
built-in chains, and whatever others put there). tests/test_iptables_kernel.py is
the same on the real kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kproxy.proxy.iptables import IptablesProxier, RestoreError, Ruleset, proxier as proxier_module, render
from kproxy.proxy.iptables.names import is_own_chain
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from tests.fakes.iptables import BUILTIN, FakeIptables

NODE = NodeInfo(name="node1", ip="192.168.0.2", cluster_cidr="10.0.0.0/8")
SVC1 = ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80)
SVC4 = ServicePort("ns4", "svc4", "p80", "TCP", "172.30.0.44", 80, node_port=30044)
SVC6 = ServicePort("ns6", "svc6", "p80", "TCP", "172.30.0.46", 80)


def state(svc4: tuple[str, ...] = ("10.180.0.4", "10.180.0.5"), services: tuple[ServicePort, ...] = (SVC1, SVC4),
          ) -> ProxyState:
    endpoints = {SVC1.key: [Endpoint("10.180.0.1", 80, "node1")], SVC4.key: [Endpoint(ip, 80, "node1") for ip in svc4]}
    return ProxyState(services=list(services), endpoints={svc.key: endpoints.get(svc.key, []) for svc in services})


def expected_tables(ruleset: Ruleset, others: dict[str, dict[str, list[str]]] | None = None) -> dict:
    """What the tables hold after syncing ruleset: its chains, and each jump inserted at the top of
    its built-in chain (so the last one first), after others' chains and rules."""
    tables: dict[str, dict[str, list[str]]] = {}
    for table in ("filter", "nat"):
        chains: dict[str, list[str]] = {chain: [] for chain in BUILTIN[table]}
        for chain, rules in (others or {}).get(table, {}).items():
            chains[chain] = list(rules)
        for jump in ruleset.jumps:
            if jump.table == table:
                chains[jump.chain].insert(0, f"-A {jump.chain} {jump.spec}")
        chains.update({chain: list(rules) for chain, rules in ruleset.tables[table].items()})
        tables[table] = chains
    return tables


def synced(fake: FakeIptables, ruleset: Ruleset, others: dict | None = None) -> bool:
    return fake.tables == expected_tables(ruleset, others)


@pytest.fixture
def fake() -> FakeIptables:
    return FakeIptables()


def test_the_first_sync_is_full_and_writes_everything(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    result = proxier.sync(state())
    assert result.full and result.changed_services == 2
    assert synced(fake, render(state(), NODE))
    assert fake.restores == [proxier.last_restore] and proxier.last_restore.startswith("*nat\n-Z\n")
    assert fake.sysctls == {"net/ipv4/conf/all/route_localnet": "1"}  # for NodePorts on 127.0.0.1


def test_later_syncs_are_partial_and_write_only_what_changed(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(state())
    # Nothing changed: no restore at all.
    same = proxier.sync(state())
    assert not same.full and same.changed_services == 0 and len(fake.restores) == 1
    # One endpoint of svc4 replaced: svc4's SVC chain and the two SEP chains, nothing else.
    changed = proxier.sync(state(svc4=("10.180.0.4", "10.180.0.7")))
    assert not changed.full and changed.changed_services == 1
    written = [line for line in fake.restores[-1].splitlines() if line.startswith((":", "-X"))]
    assert written == [":KUBE-SEP-KV4FMR6WJFBQE3OH - [0:0]", ":KUBE-SVC-4SW47YFZTEDKD3PK - [0:0]",
                       ":KUBE-SEP-C6EBXVWJJZMIWKLZ - [0:0]", "-X KUBE-SEP-C6EBXVWJJZMIWKLZ"]
    assert synced(fake, render(state(svc4=("10.180.0.4", "10.180.0.7")), NODE))


def test_services_coming_and_going_count_once_each(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(state())
    # A service without endpoints has no chain of its own, only a REJECT in filter's KUBE-SERVICES.
    added = proxier.sync(state(services=(SVC1, SVC4, SVC6)))
    assert not added.full and added.changed_services == 1
    assert fake.restores[-1].startswith("*filter\n:KUBE-SERVICES - [0:0]\n")
    gone = proxier.sync(state(services=(SVC4, SVC6)))  # svc1's chains deleted, its KUBE-SERVICES line too
    assert not gone.full and gone.changed_services == 1
    assert synced(fake, render(state(services=(SVC4, SVC6)), NODE))
    assert not any("KUBE-SVC-XPGD46QRK7WJZT7O" in rule for rules in fake.tables["nat"].values() for rule in rules)


def test_a_failed_restore_keeps_the_tables_and_forces_the_next_sync_full(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(state())
    before = fake.save()
    fake.refuse = lambda text: True
    with pytest.raises(RestoreError):
        proxier.sync(state(svc4=("10.180.0.7",)))
    assert fake.save() == before
    fake.refuse = lambda text: False
    # The same state again: full (the kernel may hold half of a failed sync), and converged.
    result = proxier.sync(state(svc4=("10.180.0.7",)))
    assert result.full and synced(fake, render(state(svc4=("10.180.0.7",)), NODE))
    assert not proxier.sync(state(svc4=("10.180.0.7",))).full


def test_a_failed_full_sync_is_retried_full(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    fake.refuse = lambda text: True
    with pytest.raises(RestoreError):
        proxier.sync(state())
    assert fake.tables == {}
    fake.refuse = lambda text: False
    assert proxier.sync(state()).full and synced(fake, render(state(), NODE))


def test_every_nth_sync_is_full(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake, full_sync_every=3)
    assert [proxier.sync(state()).full for _ in range(7)] == [True, False, True, False, False, True, False]


def test_a_sync_after_the_full_sync_period_is_full(fake, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(proxier_module, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    proxier = IptablesProxier(NODE, backend=fake, full_sync_period=60)
    fulls = []
    for seconds in (0, 30, 59, 61, 100, 122):
        now[0] = 1000.0 + seconds
        fulls.append(proxier.sync(state()).full)
    assert fulls == [True, False, False, True, False, True]


def test_a_full_sync_deletes_stale_chains_and_restores_missing_jumps(fake) -> None:
    IptablesProxier(NODE, backend=fake).sync(state())
    # Someone else's rule in a built-in chain jumps into svc1's chain (a full sync unlinks those; a
    # jump from another non-built-in chain would make the restore fail, in the kernel as here); and
    # someone deleted our PREROUTING jump.
    fake.add("nat", "OUTPUT", "-A OUTPUT -j KUBE-SVC-XPGD46QRK7WJZT7O")
    fake.tables["nat"]["PREROUTING"] = []
    # A restarted agent (its first sync is full) whose state has no svc1 any more.
    restarted = IptablesProxier(NODE, backend=fake)
    result = restarted.sync(state(services=(SVC4,)))
    assert result.full and result.changed_services == 1  # what it knows of: svc4 (svc1's owner is a hash)
    assert "-D OUTPUT -j KUBE-SVC-XPGD46QRK7WJZT7O" in restarted.last_restore.splitlines()
    assert synced(fake, render(state(services=(SVC4,)), NODE))


def test_a_full_sync_leaves_present_jumps_alone(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake, full_sync_every=2)
    proxier.sync(state())
    proxier.sync(state())  # full again: every jump is there, none added twice
    assert not any(line.startswith(("-I ", "-D ", "-X ")) for line in proxier.last_restore.splitlines())
    assert synced(fake, render(state(), NODE))


def test_cleanup_removes_our_chains_and_jumps_only_and_the_next_sync_is_full(fake) -> None:
    fake.add("filter", "CNI-FORWARD")
    fake.add("filter", "FORWARD", "-A FORWARD -j CNI-FORWARD")
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(state())
    proxier.cleanup()
    assert fake.tables == {"filter": {"INPUT": [], "FORWARD": ["-A FORWARD -j CNI-FORWARD"], "OUTPUT": [],
                                      "CNI-FORWARD": []},
                           "nat": {chain: [] for chain in BUILTIN["nat"]}}
    restores = len(fake.restores)
    proxier.cleanup()  # idempotent: nothing left to remove, no restore
    assert len(fake.restores) == restores
    assert proxier.sync(state()).full
    assert synced(fake, render(state(), NODE), others={"filter": {"FORWARD": ["-A FORWARD -j CNI-FORWARD"],
                                                                  "CNI-FORWARD": []}})


def test_the_excerpt_of_one_service_has_its_rules_only(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(state())
    excerpt = proxier.rules_excerpt("ns1/svc1")
    assert excerpt == (
        "*nat\n:KUBE-SVC-XPGD46QRK7WJZT7O - [0:0]\n:KUBE-SEP-SXIVWICOYRO3J4NJ - [0:0]\n"
        '[0:0] -A KUBE-SERVICES -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp -p tcp -d 172.30.0.41 '
        "--dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O\n"
        + "".join(f"[0:0] {rule}\n" for chain in ("KUBE-SVC-XPGD46QRK7WJZT7O", "KUBE-SEP-SXIVWICOYRO3J4NJ")
                  for rule in fake.tables["nat"][chain])
        + "COMMIT\n*filter\nCOMMIT\n")  # the fake saves nat first: the first sync wrote it first


def test_conntrack_tcp_liberal_drops_the_invalid_rule(fake) -> None:
    fake.sysctls["net/netfilter/nf_conntrack_tcp_be_liberal"] = "1"
    IptablesProxier(NODE, backend=fake, localhost_nodeports=False).sync(state())
    assert synced(fake, render(state(), NODE, localhost_nodeports=False, conntrack_tcp_liberal=True))
    assert fake.sysctls == {"net/netfilter/nf_conntrack_tcp_be_liberal": "1"}  # no route_localnet without them


def test_the_fake_refuses_what_iptables_restore_refuses(fake) -> None:
    for text in ("*nat\n-A KUBE-NOPE -j ACCEPT\nCOMMIT\n",  # no such chain
                 "*nat\n:KUBE-A - [0:0]\n-A KUBE-A -j KUBE-B\nCOMMIT\n",  # jump to an undeclared chain
                 "*nat\n:KUBE-A - [0:0]\n:KUBE-B - [0:0]\n-A KUBE-A -j KUBE-B\n-X KUBE-B\nCOMMIT\n",  # still used
                 "*nat\n-D PREROUTING -j ACCEPT\nCOMMIT\n",  # no such rule
                 "*nat\n:KUBE-A - [0:0]\n"):  # no COMMIT
        with pytest.raises(RestoreError):
            fake.restore(text)
        assert fake.tables == {}, text
    # Tables commit one after the other: a refused nat leaves the filter committed before it.
    with pytest.raises(RestoreError):
        fake.restore("*filter\n:KUBE-A - [0:0]\nCOMMIT\n*nat\n-A KUBE-NOPE -j ACCEPT\nCOMMIT\n")
    assert "KUBE-A" in fake.tables["filter"] and "nat" not in fake.tables


def test_state_changes_through_a_tracker_keep_the_tables_equal_to_the_render(fake) -> None:
    from kproxy.proxy.source import StateTracker

    def objects(generation: int) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for i in range(6):
            out[f"Service/ns/s{i}"] = {"kind": "Service", "metadata": {"name": f"s{i}", "namespace": "ns"},
                                       "spec": {"type": "ClusterIP", "clusterIP": f"10.96.0.{i}",
                                                "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}
            count = (i + generation) % 3
            out[f"EndpointSlice/ns/s{i}"] = {
                "kind": "EndpointSlice", "metadata": {"name": f"s{i}", "namespace": "ns",
                                                      "labels": {"kubernetes.io/service-name": f"s{i}"}},
                "endpoints": [{"addresses": [f"10.244.{i}.{k}"], "conditions": {"ready": True}} for k in range(count)],
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
        return out

    tracker, proxier = StateTracker(), IptablesProxier(NODE, backend=fake)
    previous: dict[str, dict[str, Any]] = {}
    for generation in range(5):
        now = objects(generation)
        changed = [key for key in now if previous.get(key) != now[key]] if previous else None
        current = tracker.update(now, changed)
        result = proxier.sync(current)
        assert result.full == (generation == 0)
        # Every service whose endpoint count moved between 0, 1 and 2 changed; all do, every time.
        assert result.changed_services == 6
        assert synced(fake, render(dataclasses.replace(current, changed=None), NODE))
        previous = now
