"""IpvsProxier's sync logic against a fake kernel (tests/fakes/ipvs.py): no root.

The shares of ipset entries and addresses, graceful termination, partial against
full syncs, the lab scheduler, cleanup and what changed_services counts; and that
partial syncs adding and removing load-balancer IPs, external IPs, source ranges and
traffic policies leave the kernel exactly as a fresh agent's first sync does.
tests/test_ipvs_kernel.py proves the same on a real kernel.
"""

from __future__ import annotations

import pytest

from kproxy.proxy.ipvs import IpvsProxier
from kproxy.proxy.ipvs.render import VirtualServer, render
from kproxy.proxy.saved import parse_save
from kproxy.proxy.tables import Tables, read_tables
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort, SyncResult
from tests.fakes.ipvs import FakeConntrack, FakeIpvs
from tests.fakes.iptables import FakeIptables

NODE = NodeInfo("node1", "192.168.99.11", "10.244.0.0/16")
A = Endpoint("10.244.1.2", 8080, "node1")  # on this node: a hairpin (KUBE-LOOP-BACK) entry
B = Endpoint("10.244.2.7", 8080, "node2")
C = Endpoint("10.244.3.3", 8080, "node3")
HTTP = ServicePort("default", "web", "http", "TCP", "10.96.0.10", 80)
HTTPS = ServicePort("default", "web", "https", "TCP", "10.96.0.10", 443, node_port=30443)
DNS = ServicePort("kube-system", "dns", "", "UDP", "10.96.0.12", 53)
API = ServicePort("default", "api", "", "TCP", "10.96.0.20", 8080)
WEB80 = ("TCP", "10.96.0.10", 80)
A_DEST, B_DEST = ("10.244.1.2", 8080), ("10.244.2.7", 8080)


class Node:
    """A proxier on a fake kernel, and states the way the agent's StateTracker hands them over."""

    def __init__(self, scheduler: str = "rr", fake: FakeIpvs | None = None) -> None:
        self.fake = fake if fake is not None else FakeIpvs()
        self.proxier = IpvsProxier(NODE, scheduler=scheduler, backend=self.fake, conntrack=FakeConntrack())
        self.generation = 0
        self.last: dict[ServicePort, list[Endpoint]] = {}

    def sync(self, *pairs: tuple[ServicePort, list[Endpoint]], hint: bool = True) -> SyncResult:
        """Sync to pairs; with hint, say which service ports changed since the last sync (as the
        tracker does), else let the proxier compare them all."""
        wanted = dict(pairs)
        old = {svc.key: (svc, eps) for svc, eps in self.last.items()}
        new = {svc.key: (svc, eps) for svc, eps in wanted.items()}
        changed = frozenset(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        self.generation += 1
        state = as_state(*pairs)
        state.generation, state.changed = self.generation, changed if hint else None
        self.last = wanted
        self.fake.calls.clear()
        return self.proxier.sync(state)


def as_state(*pairs: tuple[ServicePort, list[Endpoint]]) -> ProxyState:
    return ProxyState(sorted((svc for svc, _ in pairs), key=lambda s: s.key), {svc.key: eps for svc, eps in pairs})


def with_jumps(tables: Tables) -> Tables:
    """tables (as an IPVS-mode restore text parses) with the jumps IPVS mode puts in the
    built-in chains, in kube-proxy's order (each prepended in turn)."""
    tables["nat"].update({
        "PREROUTING": ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
        "INPUT": [],
        "OUTPUT": ['-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
        "POSTROUTING": ['-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING']})
    tables["filter"].update({
        "INPUT": ['-A INPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-FILTER',
                  '-A INPUT -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
                  '-A INPUT -m comment --comment "kubernetes health check rules" -j KUBE-NODE-PORT'],
        "OUTPUT": ['-A OUTPUT -m comment --comment "kubernetes ipvs access filter" -j KUBE-IPVS-OUT-FILTER'],
        "FORWARD": ['-A FORWARD -m comment --comment "kube-proxy firewall rules" -j KUBE-PROXY-FIREWALL',
                    '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD']})
    return tables


def test_a_first_sync_programs_everything_and_an_identical_one_nothing() -> None:
    node = Node()
    result = node.sync((HTTP, [A, B]), (HTTPS, [A]), (DNS, [B]))
    assert result.full and result.changed_services == 3
    assert node.fake.ipvsadm() == [
        "TCP 10.96.0.10:80 rr", "  -> 10.244.1.2:8080 1 0 0", "  -> 10.244.2.7:8080 1 0 0",
        "TCP 10.96.0.10:443 rr", "  -> 10.244.1.2:8080 1 0 0",
        "TCP 192.168.99.11:30443 rr", "  -> 10.244.1.2:8080 1 0 0",
        "UDP 10.96.0.12:53 rr", "  -> 10.244.2.7:8080 1 0 0",
    ]
    assert node.fake.link and node.fake.addresses == {"10.96.0.10", "10.96.0.12"}
    assert {name: entries for name, (_, entries) in node.fake.ipsets.items() if entries} == {
        "KUBE-LOOP-BACK": {"10.244.1.2,tcp:8080,10.244.1.2"},
        "KUBE-CLUSTER-IP": {"10.96.0.10,tcp:80", "10.96.0.10,tcp:443", "10.96.0.12,udp:53"},
        "KUBE-NODE-PORT-TCP": {"30443"},
        "KUBE-IPVS-IPS": {"10.96.0.10", "10.96.0.12"},
    }
    assert len(node.fake.ipsets) == 15  # every set kube-proxy keeps, the empty ones too
    # The rules that use the ipsets, and the jumps into them first in the built-in chains.
    expected = render(as_state((HTTP, [A, B]), (HTTPS, [A]), (DNS, [B])), NODE).iptables
    assert node.fake.tables == with_jumps(parse_save(expected))
    assert node.fake.sysctls == {"net/ipv4/vs/conntrack": "1", "net/ipv4/vs/expire_nodest_conn": "1",
                                 "net/ipv4/vs/expire_quiescent_template": "1", "net/ipv4/ip_forward": "1"}
    for hint in (True, False):
        result = node.sync((HTTP, [A, B]), (HTTPS, [A]), (DNS, [B]), hint=hint)
        assert not result.full and result.changed_services == 0 and node.fake.calls == []


def test_changed_services_counts_service_ports_not_kernel_changes() -> None:
    node = Node()
    node.sync((HTTP, [A]), (HTTPS, [A]), (DNS, [B]))
    # HTTPS has two virtual servers (ClusterIP and NodePort) and gets a real server on both.
    result = node.sync((HTTP, [A]), (HTTPS, [A, B]), (DNS, [B]))
    assert result.changed_services == 1
    assert node.fake.calls == ["add_real_server TCP 10.96.0.10:443 10.244.2.7:8080 1",
                               "add_real_server TCP 192.168.99.11:30443 10.244.2.7:8080 1"]
    # An endpoint that is not ready changes the state, not the programming.
    result = node.sync((HTTP, [A, Endpoint("10.244.9.9", 8080, "node9", ready=False)]), (HTTPS, [A, B]), (DNS, [B]))
    assert result.changed_services == 0 and node.fake.calls == []
    # Two service ports gone, one changed.
    result = node.sync((HTTP, [A, C]))
    assert result.changed_services == 3
    assert node.fake.calls == [
        "ipset_restore",
        "add_real_server TCP 10.96.0.10:80 10.244.3.3:8080 1",
        "delete_virtual_server TCP 10.96.0.10:443", "delete_virtual_server TCP 192.168.99.11:30443",
        "delete_virtual_server UDP 10.96.0.12:53", "delete_address 10.96.0.12"]


def test_an_address_shared_by_two_ports_stays_until_the_last_goes() -> None:
    node = Node()
    node.sync((HTTP, [A]), (HTTPS, [A]))
    node.sync((HTTP, [A]))
    assert node.fake.addresses == {"10.96.0.10"}
    # HTTPS's virtual servers and its NodePort's ipset entry go; the ClusterIP both held stays.
    assert node.fake.calls == ["ipset_restore", "delete_virtual_server TCP 10.96.0.10:443",
                               "delete_virtual_server TCP 192.168.99.11:30443"]
    assert node.fake.entries("KUBE-CLUSTER-IP") == {"10.96.0.10,tcp:80"}
    assert node.fake.entries("KUBE-NODE-PORT-TCP") == set()
    node.sync((API, [B]))
    assert node.fake.addresses == {"10.96.0.20"}
    assert node.fake.entries("KUBE-CLUSTER-IP") == {"10.96.0.20,tcp:8080"}


def test_a_hairpin_entry_shared_by_two_services_stays_until_the_last_goes() -> None:
    node = Node()
    node.sync((HTTP, [A]), (API, [A]))
    hairpin = {"10.244.1.2,tcp:8080,10.244.1.2"}
    node.sync((HTTP, [A]), (API, [B]))
    assert node.fake.entries("KUBE-LOOP-BACK") == hairpin
    # The entry moves from one service port to the other in one sync: it is neither deleted nor added.
    node.sync((HTTP, [B]), (API, [A]))
    assert node.fake.entries("KUBE-LOOP-BACK") == hairpin
    assert node.fake.calls == ["set_real_server TCP 10.96.0.20:8080 10.244.1.2:8080 1",  # no ipset_restore
                               "set_real_server TCP 10.96.0.20:8080 10.244.2.7:8080 0",
                               "add_real_server TCP 10.96.0.10:80 10.244.2.7:8080 1",
                               "set_real_server TCP 10.96.0.10:80 10.244.1.2:8080 0"]
    node.sync((HTTP, [B]), (API, [B]))
    assert node.fake.entries("KUBE-LOOP-BACK") == set()
    # A full sync (a new agent on the same kernel) counts the shares afresh.
    again = Node(fake=node.fake)
    again.sync((HTTP, [A]), (API, [A]))
    again.sync((HTTP, [A]))
    assert node.fake.entries("KUBE-LOOP-BACK") == hairpin


def test_a_tcp_real_server_that_leaves_drains_at_weight_0_then_goes() -> None:
    node = Node()
    node.sync((HTTP, [A, B]))
    node.fake.connect(WEB80, B_DEST, active=1)
    result = node.sync((HTTP, [A]))
    assert result.changed_services == 1
    assert node.fake.calls == ["set_real_server TCP 10.96.0.10:80 10.244.2.7:8080 0"]
    assert node.proxier.terminating() == {"TCP 10.96.0.10:80": ["10.244.2.7:8080"]}
    # Later syncs (here an unrelated change) look again; while it has connections it stays.
    assert node.sync((HTTP, [A]), (API, [C])).changed_services == 1
    node.fake.connect(WEB80, B_DEST, active=0, inactive=2)
    node.sync((HTTP, [A]), (API, [C]))  # nothing changed, but the terminating one is looked at
    assert node.fake.ipvsadm()[:3] == ["TCP 10.96.0.10:80 rr", "  -> 10.244.1.2:8080 1 0 0",
                                       "  -> 10.244.2.7:8080 0 0 2"]
    node.fake.connect(WEB80, B_DEST)
    result = node.sync((HTTP, [A]), (API, [C]))
    assert result.changed_services == 1
    assert node.fake.calls == ["delete_real_server TCP 10.96.0.10:80 10.244.2.7:8080"]
    assert node.proxier.terminating() == {}
    assert node.sync((HTTP, [A]), (API, [C])).changed_services == 0 and node.fake.calls == []


def test_a_draining_real_server_that_comes_back_gets_weight_1_again() -> None:
    node = Node()
    node.sync((HTTP, [A, B]))
    node.fake.connect(WEB80, B_DEST, active=3)
    node.sync((HTTP, [A]))
    node.sync((HTTP, [A, B]))
    assert node.fake.calls == ["set_real_server TCP 10.96.0.10:80 10.244.2.7:8080 1"]
    assert node.fake.ipvsadm()[2] == "  -> 10.244.2.7:8080 1 3 0"
    assert node.proxier.terminating() == {}


def test_an_idle_tcp_real_server_still_drains_first_and_udp_ones_go_at_once() -> None:
    node = Node()
    node.sync((HTTP, [A, B]), (DNS, [A, B]))
    node.fake.connect(("UDP", "10.96.0.12", 53), B_DEST, active=1)  # UDP ignores connections
    node.sync((HTTP, [A]), (DNS, [A]))
    assert node.fake.calls == ["set_real_server TCP 10.96.0.10:80 10.244.2.7:8080 0",
                               "delete_real_server UDP 10.96.0.12:53 10.244.2.7:8080"]
    node.sync((HTTP, [A]), (DNS, [A]))
    assert node.fake.calls == ["delete_real_server TCP 10.96.0.10:80 10.244.2.7:8080"]


def test_a_virtual_server_that_goes_takes_its_draining_real_servers() -> None:
    node = Node()
    node.sync((HTTP, [A, B]), (API, [A]))
    node.fake.connect(WEB80, B_DEST, active=1)
    node.sync((HTTP, [A]), (API, [A]))
    node.sync((API, [A]))
    assert node.fake.calls == ["ipset_restore", "delete_virtual_server TCP 10.96.0.10:80", "delete_address 10.96.0.10"]
    assert node.proxier.terminating() == {}
    assert node.sync((API, [A])).changed_services == 0


def test_a_partial_sync_leaves_drift_alone_and_a_full_sync_repairs_it() -> None:
    node = Node()
    node.proxier.full_syncs.period = 3600
    node.sync((HTTP, [A, B]), (API, [C]))
    before = (node.fake.ipvsadm(), set(node.fake.addresses), read_tables(node.fake.netfilter))
    # Someone else changes the kernel behind the proxier's back.
    node.fake.open()
    node.fake.delete_real_server(node.fake.virtual[WEB80], A_DEST)
    node.fake.delete_virtual_server(node.fake.virtual[("TCP", "10.96.0.20", 8080)])
    node.fake.add_virtual_server(VirtualServer("TCP", "10.96.0.99", 80, "rr"))
    node.fake.delete_address("10.96.0.20")
    node.fake.add_address("10.96.0.99")
    node.fake.ipset_restore("del KUBE-CLUSTER-IP 10.96.0.10,tcp:80\n")
    node.fake.netfilter.restore("*nat\n-D PREROUTING -m comment --comment \"kubernetes service portals\" "
                                "-j KUBE-SERVICES\nCOMMIT\n")
    drifted = (node.fake.ipvsadm(), set(node.fake.addresses), read_tables(node.fake.netfilter))
    result = node.sync((HTTP, [A, B]), (API, [C]))
    assert not result.full and result.changed_services == 0
    assert (node.fake.ipvsadm(), set(node.fake.addresses), read_tables(node.fake.netfilter)) == drifted
    node.proxier.full_syncs.period = 0  # the next sync is a full one
    result = node.sync((HTTP, [A, B]), (API, [C]))
    assert result.full
    assert (node.fake.ipvsadm(), set(node.fake.addresses), read_tables(node.fake.netfilter)) == before
    assert node.fake.entries("KUBE-CLUSTER-IP") == {"10.96.0.10,tcp:80", "10.96.0.20,tcp:8080"}
    # Both service ports repaired, and the stray virtual server and address no port owns.
    assert result.changed_services == 4


def test_a_failed_sync_makes_the_next_one_full() -> None:
    node = Node()
    node.sync((HTTP, [A]))
    fake = node.fake
    real_add = fake.add_real_server

    def refuse(*args: object) -> None:
        raise OSError("ENOMEM")

    fake.add_real_server = refuse  # type: ignore[method-assign]
    with pytest.raises(OSError):
        node.sync((HTTP, [A, B]))
    fake.add_real_server = real_add  # type: ignore[method-assign]
    result = node.sync((HTTP, [A, B]))
    assert result.full and fake.ipvsadm() == ["TCP 10.96.0.10:80 rr", "  -> 10.244.1.2:8080 1 0 0",
                                              "  -> 10.244.2.7:8080 1 0 0"]


def test_a_new_lab_scheduler_is_set_on_existing_virtual_servers_not_annotated_ones() -> None:
    own = ServicePort("default", "x", "", "TCP", "10.96.0.11", 80, mode_info="mh")
    node = Node(scheduler="wrr")
    node.sync((HTTP, [A]), (own, []))
    assert node.fake.ipvsadm() == ["TCP 10.96.0.10:80 wrr", "  -> 10.244.1.2:8080 1 0 0", "TCP 10.96.0.11:80 mh"]
    again = Node(scheduler="sh", fake=node.fake)  # `lab up --mode-opt scheduler=sh` restarts the agents
    restores = len(node.fake.netfilter.restores)
    result = again.sync((HTTP, [A]), (own, []))
    assert result.full and result.changed_services == 1
    # (a full sync also rewrites the ipsets and, in one restore, the iptables rules whole)
    assert node.fake.calls == ["ipset_restore", "set_virtual_server TCP 10.96.0.10:80 sh 0"]
    assert node.fake.netfilter.restores[restores:] == [render(as_state((HTTP, [A]), (own, [])), NODE).iptables]
    # A Service's annotation and affinity changing: the virtual server is updated in place.
    result = again.sync((HTTP, [A]), (ServicePort("default", "x", "", "TCP", "10.96.0.11", 80, mode_info="lc",
                                                  affinity_seconds=30), []))
    assert result.changed_services == 1 and node.fake.calls == ["set_virtual_server TCP 10.96.0.11:80 lc 30"]


def test_cleanup_leaves_nothing() -> None:
    node = Node()
    node.sync((HTTP, [A, B]), (HTTPS, [A]), (DNS, [B]))
    node.fake.connect(WEB80, B_DEST, active=1)
    node.sync((HTTP, [A]), (HTTPS, [A]), (DNS, [B]))
    node.fake.tables["nat"]["PREROUTING"].insert(0, "-A PREROUTING -j ACCEPT")  # not ours: it stays
    node.proxier.cleanup()
    fake = node.fake
    assert (fake.virtual, fake.link, fake.addresses, fake.ipsets, fake.opened) == ({}, False, set(), {}, False)
    assert fake.tables == FakeIptables("*filter\nCOMMIT\n*nat\n-A PREROUTING -j ACCEPT\nCOMMIT\n").tables
    assert node.proxier.terminating() == {}
    # The next sync starts over with a full one.
    result = node.sync((HTTP, [A]))
    assert result.full and fake.ipvsadm() == ["TCP 10.96.0.10:80 rr", "  -> 10.244.1.2:8080 1 0 0"]


def test_rules_excerpt_shows_owners_weights_and_ipset_sizes() -> None:
    node = Node()
    node.sync((HTTP, [A, B]), (HTTPS, [A]), (DNS, [B]))
    node.fake.connect(WEB80, B_DEST, active=1)
    node.sync((HTTP, [A]), (HTTPS, [A]), (DNS, [B]))
    assert node.proxier.rules_excerpt() == """\
IP Virtual Server (kube-proxy IPVS mode)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.10:80 rr  # default/web:http
  -> 10.244.1.2:8080              Masq    1      0          0
  -> 10.244.2.7:8080              Masq    0      1          0
TCP  10.96.0.10:443 rr  # default/web:https
  -> 10.244.1.2:8080              Masq    1      0          0
UDP  10.96.0.12:53 rr  # kube-system/dns
  -> 10.244.2.7:8080              Masq    1      0          0
TCP  192.168.99.11:30443 rr  # default/web:https
  -> 10.244.1.2:8080              Masq    1      0          0
kube-ipvs0: 2 addresses
ipset KUBE-LOOP-BACK: 1 entries
ipset KUBE-CLUSTER-IP: 3 entries
ipset KUBE-EXTERNAL-IP: 0 entries
ipset KUBE-EXTERNAL-IP-LOCAL: 0 entries
ipset KUBE-LOAD-BALANCER: 0 entries
ipset KUBE-LOAD-BALANCER-FW: 0 entries
ipset KUBE-LOAD-BALANCER-LOCAL: 0 entries
ipset KUBE-LOAD-BALANCER-SOURCE-IP: 0 entries
ipset KUBE-LOAD-BALANCER-SOURCE-CIDR: 0 entries
ipset KUBE-NODE-PORT-TCP: 1 entries
ipset KUBE-NODE-PORT-LOCAL-TCP: 0 entries
ipset KUBE-NODE-PORT-UDP: 0 entries
ipset KUBE-NODE-PORT-LOCAL-UDP: 0 entries
ipset KUBE-HEALTH-CHECK-NODE-PORT: 0 entries
ipset KUBE-IPVS-IPS: 2 entries
"""
    assert node.proxier.rules_excerpt("default/web:https") == """\
IP Virtual Server (kube-proxy IPVS mode)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.10:443 rr  # default/web:https
  -> 10.244.1.2:8080              Masq    1      0          0
TCP  192.168.99.11:30443 rr  # default/web:https
  -> 10.244.1.2:8080              Masq    1      0          0
"""


def test_conntrack_cleanup_gets_every_service_port_after_each_sync() -> None:
    node = Node()
    node.sync((HTTP, [A]), (DNS, [B]))
    node.sync((DNS, [B]))
    conntrack = node.proxier.conntrack
    assert isinstance(conntrack, FakeConntrack)
    assert conntrack.synced == [[HTTP.key, DNS.key], [DNS.key]]


# --- what partial syncs of external addresses and policies leave ------------------------------

L1 = Endpoint("10.244.1.3", 8080, "node1")  # this node's
R2 = Endpoint("10.244.2.3", 8080, "node2")
LB = ServicePort("default", "shop", "http", "TCP", "10.96.0.30", 80, node_port=30080)
LB_IP = ("203.0.113.10",)


def kernel(fake: FakeIpvs) -> tuple[object, ...]:
    """All of a node's IPVS-mode state: IPVS table with weights, kube-ipvs0, ipsets, iptables."""
    sets = {name: sorted(entries) for name, (_, entries) in fake.ipsets.items()}
    return fake.ipvsadm(), sorted(fake.addresses), sets, read_tables(fake.netfilter)


def assert_as_fresh(node: Node, *pairs: tuple[ServicePort, list[Endpoint]]) -> None:
    """The node's kernel is what a fresh agent's first (full) sync of pairs leaves."""
    fresh = Node()
    assert fresh.sync(*pairs).full
    assert kernel(node.fake) == kernel(fresh.fake)


def replace(svc: ServicePort, **changes: object) -> ServicePort:
    fields = {name: getattr(svc, name) for name in (
        "namespace", "name", "port_name", "protocol", "cluster_ip", "port", "node_port", "affinity_seconds",
        "external_ips", "load_balancer_ips", "source_ranges", "external_policy_local", "internal_policy_local",
        "health_check_node_port", "mode_info")}
    return ServicePort(**(fields | changes))  # type: ignore[arg-type]


def test_a_load_balancer_ip_added_then_removed() -> None:
    node = Node()
    node.sync((LB, [L1, R2]), (API, [B]))
    with_ip = replace(LB, load_balancer_ips=LB_IP)
    restores = len(node.fake.netfilter.restores)
    result = node.sync((with_ip, [L1, R2]), (API, [B]))
    assert not result.full and result.changed_services == 1
    assert node.fake.calls == ["ipset_restore", "add_address 203.0.113.10",
                               "add_virtual_server TCP 203.0.113.10:80 rr 0",
                               "add_real_server TCP 203.0.113.10:80 10.244.1.3:8080 1",
                               "add_real_server TCP 203.0.113.10:80 10.244.2.3:8080 1"]
    # KUBE-LOAD-BALANCER has entries now: its rules come in (one restore, of the whole text).
    assert node.fake.netfilter.restores[restores:] == [render(as_state((with_ip, [L1, R2]), (API, [B])), NODE).iptables]
    assert node.fake.entries("KUBE-LOAD-BALANCER") == {"203.0.113.10,tcp:80"}
    assert node.fake.entries("KUBE-IPVS-IPS") == {"10.96.0.30", "10.96.0.20", "203.0.113.10"}
    assert_as_fresh(node, (with_ip, [L1, R2]), (API, [B]))
    assert node.proxier.rules_excerpt("default/shop") == """\
IP Virtual Server (kube-proxy IPVS mode)
Prot LocalAddress:Port Scheduler Flags
  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn
TCP  10.96.0.30:80 rr  # default/shop:http
  -> 10.244.1.3:8080              Masq    1      0          0
  -> 10.244.2.3:8080              Masq    1      0          0
TCP  192.168.99.11:30080 rr  # default/shop:http
  -> 10.244.1.3:8080              Masq    1      0          0
  -> 10.244.2.3:8080              Masq    1      0          0
TCP  203.0.113.10:80 rr  # default/shop:http
  -> 10.244.1.3:8080              Masq    1      0          0
  -> 10.244.2.3:8080              Masq    1      0          0
"""
    node.sync((LB, [L1, R2]), (API, [B]))
    assert node.fake.calls == ["ipset_restore", "delete_virtual_server TCP 203.0.113.10:80",
                               "delete_address 203.0.113.10"]
    assert_as_fresh(node, (LB, [L1, R2]), (API, [B]))
    # Unchanged Services do not rewrite the rules.
    restores = len(node.fake.netfilter.restores)
    node.sync((LB, [L1]), (API, [B]))
    assert len(node.fake.netfilter.restores) == restores


def test_an_external_ip_added_then_removed_and_a_service_that_goes_with_one() -> None:
    node = Node()
    node.sync((LB, [L1]), (API, [B]))
    with_ip = replace(LB, external_ips=("198.51.100.7", "192.168.99.11"))  # the second: the node's own
    node.sync((with_ip, [L1]), (API, [B]))
    assert node.fake.addresses == {"10.96.0.30", "10.96.0.20", "198.51.100.7"}
    assert_as_fresh(node, (with_ip, [L1]), (API, [B]))
    node.sync((LB, [L1]), (API, [B]))
    assert_as_fresh(node, (LB, [L1]), (API, [B]))
    node.sync((with_ip, [L1]), (API, [B]))
    node.sync((API, [B]))
    assert_as_fresh(node, (API, [B]))


def test_two_services_on_one_load_balancer_ip_share_its_address() -> None:
    web = replace(LB, load_balancer_ips=LB_IP)
    mail = ServicePort("default", "mail", "", "TCP", "10.96.0.31", 25, load_balancer_ips=LB_IP)
    node = Node()
    node.sync((web, [L1]), (mail, [R2]))
    node.sync((mail, [R2]))
    assert node.fake.addresses == {"10.96.0.31", "203.0.113.10"}
    assert_as_fresh(node, (mail, [R2]))
    node.sync()
    assert_as_fresh(node)


def test_switching_external_traffic_policy_drains_then_leaves_what_a_fresh_sync_does() -> None:
    cluster = replace(LB, load_balancer_ips=LB_IP, external_ips=("198.51.100.7",))
    local = replace(cluster, external_policy_local=True, health_check_node_port=32000)
    node = Node()
    node.sync((cluster, [L1, R2]))
    node.sync((local, [L1, R2]))
    # The remote endpoint leaves the external virtual servers: TCP, so it drains at weight 0 first.
    assert node.proxier.terminating() == {
        "TCP 192.168.99.11:30080": ["10.244.2.3:8080"], "TCP 198.51.100.7:80": ["10.244.2.3:8080"],
        "TCP 203.0.113.10:80": ["10.244.2.3:8080"]}
    assert node.fake.entries("KUBE-LOAD-BALANCER-LOCAL") == {"203.0.113.10,tcp:80"}
    assert node.fake.entries("KUBE-EXTERNAL-IP") == set()
    assert node.fake.entries("KUBE-EXTERNAL-IP-LOCAL") == {"198.51.100.7,tcp:80"}
    assert node.fake.entries("KUBE-NODE-PORT-LOCAL-TCP") == {"30080"}
    assert node.fake.entries("KUBE-HEALTH-CHECK-NODE-PORT") == {"32000"}
    node.sync((local, [L1, R2]))  # idle: deleted
    assert_as_fresh(node, (local, [L1, R2]))
    node.sync((cluster, [L1, R2]))
    assert_as_fresh(node, (cluster, [L1, R2]))


def test_local_policies_without_local_endpoints() -> None:
    """internalTrafficPolicy Local alone: no real servers without a local endpoint (dropped);
    externalTrafficPolicy Local: the cluster's endpoints (kube-proxy's fallback)."""
    internal = ServicePort("default", "cache", "", "TCP", "10.96.0.40", 6379, internal_policy_local=True)
    external = replace(LB, load_balancer_ips=LB_IP, external_policy_local=True)
    node = Node()
    node.sync((internal, [R2]), (external, [R2]))
    assert node.fake.ipvsadm() == [
        "TCP 10.96.0.30:80 rr", "  -> 10.244.2.3:8080 1 0 0", "TCP 10.96.0.40:6379 rr",
        "TCP 192.168.99.11:30080 rr", "  -> 10.244.2.3:8080 1 0 0",
        "TCP 203.0.113.10:80 rr", "  -> 10.244.2.3:8080 1 0 0"]
    node.sync((internal, [R2, L1]), (external, [R2, L1]))
    node.sync((internal, [R2, L1]), (external, [R2, L1]))  # the remote ones drained (idle)
    assert node.fake.ipvsadm() == [
        "TCP 10.96.0.30:80 rr", "  -> 10.244.1.3:8080 1 0 0", "  -> 10.244.2.3:8080 1 0 0",
        "TCP 10.96.0.40:6379 rr", "  -> 10.244.1.3:8080 1 0 0",
        "TCP 192.168.99.11:30080 rr", "  -> 10.244.1.3:8080 1 0 0",
        "TCP 203.0.113.10:80 rr", "  -> 10.244.1.3:8080 1 0 0"]
    assert_as_fresh(node, (internal, [R2, L1]), (external, [R2, L1]))


def test_source_ranges_that_gain_and_lose_the_node() -> None:
    outside = replace(LB, load_balancer_ips=LB_IP, source_ranges=("198.51.100.0/24",))
    inside = replace(outside, source_ranges=("198.51.100.0/24", "192.168.99.0/24"))
    node = Node()
    node.sync((outside, [L1]))
    assert read_tables(node.fake.netfilter)["filter"]["KUBE-IPVS-OUT-FILTER"] == [
        "-A KUBE-IPVS-OUT-FILTER -s 203.0.113.10 -m ipvs --vaddr 203.0.113.10 --vproto tcp --vport 80 -j DROP"]
    node.sync((inside, [L1]))
    assert node.fake.entries("KUBE-LOAD-BALANCER-SOURCE-IP") == {"203.0.113.10,tcp:80,203.0.113.10"}
    assert_as_fresh(node, (inside, [L1]))
    node.sync((outside, [L1]))
    assert_as_fresh(node, (outside, [L1]))
    node.sync((LB, [L1]))
    assert_as_fresh(node, (LB, [L1]))


def test_terminating_endpoints_are_the_fallback_across_syncs() -> None:
    leaving = Endpoint("10.244.2.3", 8080, "node2", ready=False, terminating=True)  # still serving
    gone = Endpoint("10.244.2.3", 8080, "node2", ready=False, terminating=True, serving=False)
    svc = replace(LB, load_balancer_ips=LB_IP)
    node = Node()
    node.sync((svc, [L1, R2]))
    node.sync((svc, [leaving]))  # no ready endpoint left: the serving terminating one
    node.sync((svc, [leaving]))
    assert node.fake.ipvsadm()[:3] == ["TCP 10.96.0.30:80 rr", "  -> 10.244.2.3:8080 1 0 0",
                                       "TCP 192.168.99.11:30080 rr"]
    assert_as_fresh(node, (svc, [leaving]))
    node.sync((svc, [L1, leaving]))  # a ready one again: the terminating one drains
    node.sync((svc, [L1, gone]))
    assert_as_fresh(node, (svc, [L1, gone]))


def test_conntrack_cleanup_gets_the_endpoints_the_policies_reach() -> None:
    internal = ServicePort("default", "cache", "", "UDP", "10.96.0.40", 53, internal_policy_local=True)
    external = replace(LB, protocol="UDP", load_balancer_ips=LB_IP, external_policy_local=True)
    node = Node()
    node.sync((internal, [R2]), (external, [R2, L1]))
    conntrack = node.proxier.conntrack
    assert isinstance(conntrack, FakeConntrack)
    assert conntrack.reachable == {internal.key: [], external.key: ["10.244.1.3:8080", "10.244.2.3:8080"]}
