"""IpvsProxier's sync logic against a fake kernel (tests/fakes/ipvs.py): no root.

The shares of ipset entries and addresses, graceful termination, partial against
full syncs, the lab scheduler, cleanup and what changed_services counts.
tests/test_ipvs_kernel.py proves the same on a real kernel.
"""

from __future__ import annotations

import pytest

from kproxy.proxy.ipvs import IpvsProxier
from kproxy.proxy.ipvs.render import VirtualServer, iptables_rules
from kproxy.proxy.saved import parse_save
from kproxy.proxy.tables import read_tables
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
        state = ProxyState(sorted(wanted, key=lambda s: s.key), {svc.key: eps for svc, eps in wanted.items()},
                           generation=self.generation, changed=changed if hint else None)
        self.last = wanted
        self.fake.calls.clear()
        return self.proxier.sync(state)


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
    assert {name: entries for name, (_, entries) in node.fake.ipsets.items()} == {
        "KUBE-LOOP-BACK": {"10.244.1.2,tcp:8080,10.244.1.2"},
        "KUBE-CLUSTER-IP": {"10.96.0.10,tcp:80", "10.96.0.10,tcp:443", "10.96.0.12,udp:53"},
        "KUBE-NODE-PORT-TCP": {"30443"},
        "KUBE-NODE-PORT-UDP": set(),
    }
    # The rules that use the ipsets, and the jumps into them first in the built-in chains.
    expected = parse_save(iptables_rules(NODE))
    expected["nat"].update({
        "PREROUTING": ['-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
        "INPUT": [],
        "OUTPUT": ['-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES'],
        "POSTROUTING": ['-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING']})
    expected["filter"].update({
        "INPUT": [], "OUTPUT": [],
        "FORWARD": ['-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD']})
    assert node.fake.tables == expected
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
    assert node.fake.netfilter.restores[restores:] == [iptables_rules(NODE)]
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
ipset KUBE-LOOP-BACK: 1 entries
ipset KUBE-CLUSTER-IP: 3 entries
ipset KUBE-NODE-PORT-TCP: 1 entries
ipset KUBE-NODE-PORT-UDP: 0 entries
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
