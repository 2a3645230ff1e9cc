"""The iptables mode on the real kernel, in throwaway node namespaces (never the root one).

The proxier acts on the namespace of the calling thread, as the agent inside
its node does; here every call into it (and every probe) is wrapped in
cni.netns.entered(node), so its iptables-nft-* and conntrack children are
born in the node's namespace.
"""

from __future__ import annotations

import dataclasses
import socket
import subprocess

import pytest

from cni.masq import IPTABLES, IPTABLES_SAVE
from cni.netns import entered
from kproxy.proxy.iptables import IptablesProxier, RestoreError
from kproxy.proxy.tables import Commands
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort

pytestmark = pytest.mark.kernel

NODE = NodeInfo(name="node1", ip="192.168.0.2", cluster_cidr="10.0.0.0/8")
SVC1 = ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80)
SVC4 = ServicePort("ns4", "svc4", "p80", "TCP", "172.30.0.44", 80, node_port=30044)
DNS = ServicePort("ns7", "dns", "dns", "UDP", "172.30.0.53", 53)


def state(svc4_endpoints: tuple[str, ...] = ("10.180.0.4", "10.180.0.5"),
          dns_endpoints: tuple[str, ...] = ("10.180.0.1",)) -> ProxyState:
    return ProxyState(
        services=[SVC1, SVC4, DNS],
        endpoints={SVC1.key: [Endpoint("10.180.0.1", 80, "node1")],
                   SVC4.key: [Endpoint(ip, 80, "node1") for ip in svc4_endpoints],
                   DNS.key: [Endpoint(ip, 53, "node1") for ip in dns_endpoints]})


def sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def save(counters: bool = False) -> str:
    """iptables-save of the current thread's namespace, without the dated comment lines."""
    text = sh(IPTABLES_SAVE, *(["-c"] if counters else []))
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def counter(saved: str, needle: str) -> int:
    """Packets of the one rule of `iptables-save -c` output containing needle."""
    lines = [line for line in saved.splitlines() if needle in line]
    assert len(lines) == 1, lines
    return int(lines[0][1:].split(":")[0])


def chain_packets(saved: str, chain: str) -> int:
    """Packets counted by all the rules of one chain in `iptables-save -c` output."""
    return sum(int(line[1:].split(":")[0]) for line in saved.splitlines() if f"] -A {chain} " in line)


def prepare_node(path: str) -> None:
    # The endpoints live on lo, and the service range is routed there: a connect() from the
    # node then really goes through nat OUTPUT -> KUBE-SERVICES -> KUBE-SVC -> KUBE-SEP.
    for ip in ("10.180.0.1", "10.180.0.4", "10.180.0.5", "10.180.0.7"):
        subprocess.run(["ip", "-n", path.rsplit("/", 1)[1], "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "-n", path.rsplit("/", 1)[1], "route", "add", "172.30.0.0/16", "dev", "lo"], check=True)


def knock(ip: str, port: int) -> None:
    """One TCP connection attempt (refused: nobody listens): one new connection through nat."""
    with socket.socket() as s:
        s.settimeout(2)
        try:
            s.connect((ip, port))
        except OSError:
            pass


def test_sync_installs_kube_proxy_layout_and_keeps_other_chains(netns) -> None:
    node = netns("node")
    with entered(node):
        sh(IPTABLES, "-t", "nat", "-N", "CNI-TEST")
        sh(IPTABLES, "-t", "nat", "-A", "POSTROUTING", "-j", "CNI-TEST")
        sh(IPTABLES, "-t", "nat", "-A", "CNI-TEST", "-d", "10.244.0.0/16", "-j", "ACCEPT")
        proxier = IptablesProxier(NODE)
        result = proxier.sync(state())
        saved = save()
        again = proxier.sync(state())
        saved_again = save()
        excerpt = proxier.rules_excerpt()
    assert result.full and not again.full
    assert "CNI-TEST" not in excerpt and "*nat" in excerpt and "*filter" in excerpt
    assert any(line.startswith("[") and "-j KUBE-SVC-XPGD46QRK7WJZT7O" in line for line in excerpt.splitlines())
    for line in (
        '-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES',
        '-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING',
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        '-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE '
        "--random-fully",
        '-A KUBE-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp '
        "--dport 80 -j KUBE-SVC-XPGD46QRK7WJZT7O",
        '-A KUBE-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment '
        '"ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ',
        '-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m tcp -j DNAT '
        "--to-destination 10.180.0.1:80",
        '-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD',
        "-A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT",
        "-A CNI-TEST -d 10.244.0.0/16 -j ACCEPT",
        "-A POSTROUTING -j CNI-TEST",
    ):
        assert line in saved.splitlines(), line
    assert ":KUBE-EXT-4SW47YFZTEDKD3PK - [0:0]" in saved
    assert saved_again == saved  # a second sync (partial) adds nothing, duplicates no jump


def test_partial_sync_rewrites_only_the_changed_service(netns) -> None:
    node = netns("node")
    prepare_node(node)
    with entered(node):
        proxier = IptablesProxier(NODE)
        proxier.sync(state())
        knock("172.30.0.41", 80)
        knock("172.30.0.44", 80)
        before = save(counters=True)
        result = proxier.sync(state(svc4_endpoints=("10.180.0.4", "10.180.0.7")))
        after = save(counters=True)
        restore = proxier.last_restore
    assert counter(before, "-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp") == 1
    assert chain_packets(before, "KUBE-SVC-4SW47YFZTEDKD3PK") == 1
    assert not result.full and result.changed_services == 1
    # ns1's chains were not rewritten: their counters survived ...
    assert counter(after, "-A KUBE-SEP-SXIVWICOYRO3J4NJ -p tcp") == 1
    assert chain_packets(after, "KUBE-SVC-XPGD46QRK7WJZT7O") == 1
    # ... ns4's SVC chain was (counters back to 0), its gone endpoint's chain deleted.
    assert chain_packets(after, "KUBE-SVC-4SW47YFZTEDKD3PK") == 0
    assert "KUBE-SEP-C6EBXVWJJZMIWKLZ" in before and "KUBE-SEP-C6EBXVWJJZMIWKLZ" not in after
    assert "--to-destination 10.180.0.7:80" in after
    declared = {line[1:].split()[0] for line in restore.splitlines() if line.startswith(":")}
    assert "KUBE-SVC-4SW47YFZTEDKD3PK" in declared and "KUBE-SVC-XPGD46QRK7WJZT7O" not in declared
    assert not any(c.startswith("KUBE-SEP-") and "ns1" in c for c in declared)
    assert "KUBE-SEP-SXIVWICOYRO3J4NJ" not in restore


def test_cleanup_removes_every_kube_chain_and_jump(netns) -> None:
    node = netns("node")
    with entered(node):
        sh(IPTABLES, "-N", "CNI-FORWARD")
        sh(IPTABLES, "-A", "FORWARD", "-j", "CNI-FORWARD")
        proxier = IptablesProxier(NODE)
        proxier.sync(state())
        assert "KUBE-" in save()
        proxier.cleanup()
        saved = save()
        proxier.cleanup()  # idempotent
        result = proxier.sync(state())  # and usable again: fully
    assert "KUBE-" not in saved, saved
    assert "-A FORWARD -j CNI-FORWARD" in saved.splitlines()
    assert result.full


class BadRule(Commands):
    """The real backend, with a jump to a chain that does not exist slipped into the nat table of
    every restore: iptables-restore refuses that table."""

    def restore(self, text: str, *, counters: bool = False) -> None:
        bad = "-A KUBE-SVC-XPGD46QRK7WJZT7O -j KUBE-SEP-NOSUCHCHAIN00000\n"
        nat = text.index("*nat\n")
        super().restore(text[:nat] + text[nat:].replace("COMMIT\n", bad + "COMMIT\n", 1), counters=counters)


def test_failed_restore_keeps_previous_rules_and_next_sync_is_full(netns) -> None:
    node = netns("node")
    with entered(node):
        proxier = IptablesProxier(NODE)
        proxier.sync(state())
        before = save()
        proxier.backend = BadRule("iptables")
        with pytest.raises(RestoreError):
            proxier.sync(state(svc4_endpoints=("10.180.0.7",)))
        failed = save()
        proxier.backend = Commands("iptables")
        result = proxier.sync(state(svc4_endpoints=("10.180.0.7",)))
        repaired = save()
    # The nat table refused the input and kept its rules. (iptables-legacy-restore commits table
    # by table, filter first: a filter that had changed would have been committed; here it had not.)
    assert failed == before
    assert result.full
    assert "--to-destination 10.180.0.7:80" in repaired and "10.180.0.5" not in repaired


def test_full_sync_removes_stale_chains_of_an_earlier_run(netns) -> None:
    node = netns("node")
    with entered(node):
        IptablesProxier(NODE).sync(state())
        # A new agent (e.g. after a restart) with ns1 gone: its chains must go too.
        result = IptablesProxier(NODE).sync(dataclasses.replace(state(), services=[SVC4, DNS]))
        saved = save()
    assert result.full
    assert "KUBE-SVC-XPGD46QRK7WJZT7O" not in saved and "KUBE-SEP-SXIVWICOYRO3J4NJ" not in saved
    assert saved.count('--comment "kubernetes service portals" -j KUBE-SERVICES') == 4  # nat x2, filter x2


def test_removed_udp_endpoint_loses_its_conntrack_entries(netns) -> None:
    node = netns("node")
    prepare_node(node)
    with entered(node):
        proxier = IptablesProxier(NODE)
        proxier.sync(state(dns_endpoints=("10.180.0.1", "10.180.0.5")))
        for port in range(40000, 40020):  # several flows, so both endpoints get some
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flow:
                flow.bind(("0.0.0.0", port))
                flow.sendto(b"q", ("172.30.0.53", 53))
        flows = subprocess.run(["conntrack", "-L", "-p", "udp", "--orig-dst", "172.30.0.53"],
                               capture_output=True, text=True).stdout
        proxier.sync(state(dns_endpoints=("10.180.0.1",)))
        left = subprocess.run(["conntrack", "-L", "-p", "udp", "--orig-dst", "172.30.0.53"],
                              capture_output=True, text=True).stdout
        excerpt = proxier.rules_excerpt("ns7/dns")
    assert "src=10.180.0.5" in flows and "src=10.180.0.1" in flows
    assert ["-D", "--orig-dst", "172.30.0.53", "--dst-nat", "10.180.0.5", "-p", "udp"] in proxier.conntrack.last
    assert "src=10.180.0.5" not in left and "src=10.180.0.1" in left
    # The excerpt: this service's chains and KUBE-SERVICES line, with counters, nothing of ns1/ns4.
    assert "ns7/dns:dns cluster IP" in excerpt and "ns1/svc1" not in excerpt and "ns4/svc4" not in excerpt
    assert any(line.startswith("[") and "--to-destination 10.180.0.1:53" in line for line in excerpt.splitlines())
