"""The iptables proxier's sync bookkeeping, against an in-memory iptables (tests/fakes/iptables.py), no root.

Full or partial, what a partial sync writes, what a failed restore forces, the
periodic full syncs, the repairs only a full sync makes, cleanup; a traffic-policy
change that brings and removes a service port's KUBE-SVL-/KUBE-FW- chains in a
partial sync, and the stale UDP conntrack entries of what this node sent traffic
to (its reachable endpoints). After every sync
the fake's tables must hold exactly what was rendered (plus the jumps from the
built-in chains, and whatever others put there). tests/test_iptables_kernel.py is
the same on the real kernel.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kproxy.proxy.iptables import IptablesProxier, RestoreError, Ruleset, endpoint_chain_name, render
from kproxy.proxy.iptables import proxier as proxier_module
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


# A LoadBalancer with an endpoint here and one elsewhere; its policy and source ranges change below.
SVC5 = ServicePort("ns5", "svc5", "p80", "TCP", "172.30.0.45", 80, node_port=3002, load_balancer_ips=("5.6.7.8",))
HERE, THERE = Endpoint("10.180.0.3", 80, "node1"), Endpoint("10.180.1.3", 80, "node2")


def lb_state(svc5: ServicePort, *endpoints: Endpoint) -> ProxyState:
    return ProxyState(services=[SVC1, svc5], endpoints={SVC1.key: [Endpoint("10.180.0.1", 80, "node1")],
                                                        svc5.key: list(endpoints)})


def declared_and_deleted(restore: str) -> list[str]:
    return [line for line in restore.splitlines() if line.startswith(("*", ":", "-X"))]


def test_a_traffic_policy_change_rewrites_the_service_and_deletes_its_stale_chains_in_a_partial_sync(fake) -> None:
    proxier = IptablesProxier(NODE, backend=fake)
    # Cluster policy, with source ranges: KUBE-FW- in front of KUBE-EXT-.
    cluster = dataclasses.replace(SVC5, source_ranges=("203.0.113.0/25",))
    assert proxier.sync(lb_state(cluster, HERE, THERE)).full
    assert {"KUBE-FW-NUKIZ6OKUXPJNT4C", "KUBE-EXT-NUKIZ6OKUXPJNT4C"} <= set(fake.tables["nat"])
    # Local policy, no source ranges: KUBE-SVL- comes, KUBE-FW- goes, and the health check port opens.
    local = dataclasses.replace(SVC5, external_policy_local=True, health_check_node_port=30000)
    result = proxier.sync(lb_state(local, HERE, THERE))
    assert not result.full and result.changed_services == 1
    assert declared_and_deleted(proxier.last_restore) == [
        "*filter", ":KUBE-NODEPORTS - [0:0]", ":KUBE-PROXY-FIREWALL - [0:0]",
        "*nat", ":KUBE-SERVICES - [0:0]", ":KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]", ":KUBE-SVL-NUKIZ6OKUXPJNT4C - [0:0]",
        ":KUBE-FW-NUKIZ6OKUXPJNT4C - [0:0]", "-X KUBE-FW-NUKIZ6OKUXPJNT4C"]
    assert synced(fake, render(lb_state(local, HERE, THERE), NODE))
    # Its endpoint here gone: KUBE-SVL- goes too, and external traffic from outside is dropped.
    result = proxier.sync(lb_state(local, THERE))
    assert not result.full and result.changed_services == 1
    assert declared_and_deleted(proxier.last_restore) == [
        "*filter", ":KUBE-EXTERNAL-SERVICES - [0:0]",
        "*nat", ":KUBE-EXT-NUKIZ6OKUXPJNT4C - [0:0]", ":KUBE-SVC-NUKIZ6OKUXPJNT4C - [0:0]",
        ":KUBE-SEP-I77PXRDZVX7PMWMN - [0:0]", ":KUBE-SVL-NUKIZ6OKUXPJNT4C - [0:0]",
        "-X KUBE-SEP-I77PXRDZVX7PMWMN", "-X KUBE-SVL-NUKIZ6OKUXPJNT4C"]
    assert synced(fake, render(lb_state(local, THERE), NODE))
    assert fake.tables["filter"]["KUBE-EXTERNAL-SERVICES"][0].startswith(
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "ns5/svc5:p80 has no local endpoints"')
    # And back to Cluster: everything rewritten again, KUBE-SVL- not recreated.
    assert not proxier.sync(lb_state(cluster, HERE, THERE)).full
    assert synced(fake, render(lb_state(cluster, HERE, THERE), NODE))
    assert not any(chain.startswith("KUBE-SVL-") for chain in fake.tables["nat"])


def test_partial_syncs_leave_the_tables_a_full_sync_writes(fake) -> None:
    import random

    rng = random.Random(18)
    nodes = ("node1", "node2")

    def service(i: int) -> ServicePort:
        lb = rng.random() < 0.5
        return ServicePort(
            "ns", f"s{i}", "p", "TCP", f"172.30.1.{i}", 80, node_port=30000 + i if lb or rng.random() < 0.5 else 0,
            affinity_seconds=rng.choice([0, 10800]), external_ips=(f"192.168.99.{i}",) if rng.random() < 0.3 else (),
            load_balancer_ips=(f"1.2.3.{i}",) if lb else (),
            source_ranges=rng.choice([(), ("203.0.113.0/25",), ("192.168.0.0/24",)]) if lb else (),
            external_policy_local=lb and rng.random() < 0.5, internal_policy_local=rng.random() < 0.3,
            health_check_node_port=32000 + i if lb else 0)

    def endpoints(i: int) -> list[Endpoint]:
        return [Endpoint(f"10.180.{i}.{k}", 80, rng.choice(nodes), ready=(ready := rng.random() < 0.7),
                         terminating=not ready, serving=ready or rng.random() < 0.5) for k in range(rng.randrange(4))]

    services = {i: service(i) for i in range(12)}
    eps = {i: endpoints(i) for i in services}

    def current(generation: int, changed: set[str] | None) -> ProxyState:
        ordered = sorted(services.values(), key=lambda svc: svc.key)
        return ProxyState(ordered, {services[i].key: eps[i] for i in services}, generation,
                          frozenset(changed) if changed is not None else None)

    proxier = IptablesProxier(NODE, backend=fake)
    assert proxier.sync(current(0, None)).full
    for generation in range(1, 40):
        i = rng.randrange(14)
        old = services.get(i)
        if rng.random() < 0.15 and old is not None:  # deleted
            del services[i], eps[i]
        elif rng.random() < 0.5 or old is None:  # a new or changed service
            services[i], eps[i] = service(i), endpoints(i)
        else:  # its endpoints changed
            eps[i] = endpoints(i)
        keys = {svc.key for svc in (old, services.get(i)) if svc is not None}
        state = current(generation, keys)
        assert not proxier.sync(state).full
        assert synced(fake, render(dataclasses.replace(state, changed=None), NODE)), generation
    # A fresh node fully synced to the same state holds the same tables.
    fresh = FakeIptables()
    IptablesProxier(NODE, backend=fresh).sync(current(0, None))
    assert fresh.tables == fake.tables


def test_a_full_sync_deletes_stale_local_and_firewall_chains_of_an_earlier_agent(fake) -> None:
    local = dataclasses.replace(SVC5, external_policy_local=True, source_ranges=("203.0.113.0/25",))
    IptablesProxier(NODE, backend=fake).sync(lb_state(local, HERE))
    assert {"KUBE-SVL-NUKIZ6OKUXPJNT4C", "KUBE-FW-NUKIZ6OKUXPJNT4C"} <= set(fake.tables["nat"])
    assert is_own_chain("nat", "KUBE-SVL-NUKIZ6OKUXPJNT4C") and is_own_chain("nat", "KUBE-FW-NUKIZ6OKUXPJNT4C")
    restarted = IptablesProxier(NODE, backend=fake)
    assert restarted.sync(state(services=(SVC1,))).full
    assert "-X KUBE-FW-NUKIZ6OKUXPJNT4C" in restarted.last_restore.splitlines()
    assert "-X KUBE-SVL-NUKIZ6OKUXPJNT4C" in restarted.last_restore.splitlines()
    assert synced(fake, render(state(services=(SVC1,)), NODE))


def test_the_excerpt_of_a_load_balancer_has_its_firewall_and_local_chains_and_filter_rules(fake) -> None:
    local = dataclasses.replace(SVC5, external_policy_local=True, source_ranges=("203.0.113.0/25",),
                                health_check_node_port=30000)
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(lb_state(local, HERE, THERE))
    excerpt = proxier.rules_excerpt("ns5/svc5")
    there = endpoint_chain_name("ns5/svc5:p80", "tcp", THERE.address)
    chains = [line.split()[0][1:] for line in excerpt.splitlines() if line.startswith(":")]
    assert chains == ["KUBE-EXT-NUKIZ6OKUXPJNT4C", "KUBE-FW-NUKIZ6OKUXPJNT4C", "KUBE-SVC-NUKIZ6OKUXPJNT4C",
                      "KUBE-SVL-NUKIZ6OKUXPJNT4C", "KUBE-SEP-I77PXRDZVX7PMWMN", there]
    # Every rule of its chains, and its lines in the shared chains (nat's and filter's), no other.
    theirs = [rule for table in ("nat", "filter") for chain, rules in fake.tables[table].items() for rule in rules
              if "ns5/svc5:p80" in rule or chain in chains]
    shown = [line.removeprefix("[0:0] ") for line in excerpt.splitlines() if line.startswith("[")]
    assert sorted(shown) == sorted(theirs)
    assert any("KUBE-PROXY-FIREWALL" in rule and "traffic not accepted by" in rule for rule in theirs)
    assert any("KUBE-NODEPORTS" in rule and "health check node port" in rule for rule in theirs)


def test_stale_udp_entries_are_those_of_the_endpoints_this_node_sent_traffic_to(fake, monkeypatch) -> None:
    import types

    from kproxy.proxy import conntrack

    ran: list[list[str]] = []
    monkeypatch.setattr(conntrack, "subprocess", types.SimpleNamespace(
        run=lambda argv, **kwargs: ran.append(argv[1:]) or types.SimpleNamespace(returncode=0, stderr="")))
    dns = ServicePort("ns7", "dns", "", "UDP", "172.30.0.47", 53, internal_policy_local=True)
    here, there = Endpoint("10.180.0.7", 53, "node1"), Endpoint("10.180.1.7", 53, "node2")
    proxier = IptablesProxier(NODE, backend=fake)
    proxier.sync(ProxyState([dns], {dns.key: [here, there]}))
    assert ran == [["-D", "--orig-dst", "172.30.0.47", "-p", "udp"]]  # it got endpoints: entries of the REJECT go
    # internalTrafficPolicy Local: the one elsewhere never got this node's traffic, so none of its entries.
    proxier.sync(ProxyState([dns], {dns.key: [here]}))
    assert proxier.conntrack.last == []
    proxier.sync(ProxyState([dns], {dns.key: [there]}))
    assert proxier.conntrack.last == [["-D", "--orig-dst", "172.30.0.47", "--dst-nat", "10.180.0.7", "-p", "udp"]]
