"""The userspace mode without root: rule rendering, endpoint choice, the proxy loop on loopback, and
rule syncs against a fake iptables (tests/fakes/iptables.py).

(Its behaviour on the real kernel is tests/test_services.py with MODES "userspace".)
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections import Counter
from typing import Callable, Iterator

import pytest

from cni.netns import entered

from kproxy.errors import KproxyError
from kproxy.proxy import mode
from kproxy.proxy.kernel import RestoreError
from kproxy.proxy.saved import parse_save, removal_input
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from kproxy.proxy.userspace.balancer import Balancer
from kproxy.proxy.userspace import MODE
from kproxy.proxy.userspace.listener import ServiceProxy, ready_addresses
from kproxy.proxy.userspace.loop import ProxyLoop
from kproxy.proxy.userspace.proxier import UserspaceProxier
from kproxy.proxy.userspace.rules import JUMPS, is_own_chain, placeholder_ports, render
from kproxy.proxy.userspace.tcp import DIAL_TIMEOUTS
from tests.fakes.iptables import FakeIptables

NODE = NodeInfo("node1", "172.18.0.2", "10.244.0.0/16")


def svc(name: str = "web", port_name: str = "http", protocol: str = "TCP", ip: str = "10.96.0.10", port: int = 80,
        node_port: int = 0, affinity: int = 0) -> ServicePort:
    return ServicePort("default", name, port_name, protocol, ip, port, node_port, affinity)


def state(*pairs: tuple[ServicePort, list[Endpoint]]) -> ProxyState:
    return ProxyState(services=[s for s, _ in pairs], endpoints={s.key: eps for s, eps in pairs})


EPS = [Endpoint("10.244.1.2", 8080, "node1"), Endpoint("10.244.2.2", 8080, "node2")]


# --- the mode ------------------------------------------------------------------------

def test_the_mode_takes_one_option_copy_splice_by_default() -> None:
    userspace = mode("userspace")
    assert userspace.options_of({}) == {"copy": "splice"}
    assert userspace.options_of({"copy": "copy"}) == {"copy": "copy"}
    with pytest.raises(KproxyError, match="mode userspace: option copy: 'zero' is not one of splice, copy"):
        userspace.options_of({"copy": "zero"})
    with pytest.raises(ValueError, match="copy must be one of splice, copy, not 'zero'"):
        UserspaceProxier(NODE, copy="zero")


# --- rendering -------------------------------------------------------------------

def test_cluster_ip_portals_redirect_for_containers_and_dnat_to_the_node_ip_for_the_host() -> None:
    web = svc()
    rules = render(state((web, EPS)), NODE, {web.key: 40000})
    assert rules.tables == {
        "filter": {"KUBE-NODEPORT-NON-LOCAL": [], "KUBE-USERSPACE-REJECT": []},
        "nat": {
            "KUBE-PORTALS-CONTAINER": [
                "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp "
                "--dport 80 -j REDIRECT --to-ports 40000"],
            "KUBE-PORTALS-HOST": [
                "-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp "
                "--dport 80 -j DNAT --to-destination 172.18.0.2:40000"],
            "KUBE-NODEPORT-CONTAINER": [],
            "KUBE-NODEPORT-HOST": [],
        },
    }


def test_a_node_without_an_ip_redirects_its_own_traffic_too() -> None:
    web = svc()
    rules = render(state((web, EPS)), NodeInfo("node1", "", "10.244.0.0/16"), {web.key: 40000})
    assert rules.tables["nat"]["KUBE-PORTALS-HOST"] == [
        "-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp "
        "--dport 80 -j REDIRECT --to-ports 40000"]


def test_node_ports_get_container_host_and_non_local_rules() -> None:
    web = svc(node_port=30080, protocol="UDP")
    rules = render(state((web, EPS)), NODE, {web.key: 40001})
    assert rules.tables == {
        "filter": {
            "KUBE-NODEPORT-NON-LOCAL": [
                "-A KUBE-NODEPORT-NON-LOCAL -p udp -m comment --comment default/web:http -m udp --dport 40001 "
                "-m state --state NEW -j ACCEPT"],
            "KUBE-USERSPACE-REJECT": [],
        },
        "nat": {
            "KUBE-PORTALS-CONTAINER": [
                "-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p udp -m comment --comment default/web:http -m udp "
                "--dport 80 -j REDIRECT --to-ports 40001"],
            "KUBE-PORTALS-HOST": [
                "-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p udp -m comment --comment default/web:http -m udp "
                "--dport 80 -j DNAT --to-destination 172.18.0.2:40001"],
            "KUBE-NODEPORT-CONTAINER": [
                "-A KUBE-NODEPORT-CONTAINER -p udp -m comment --comment default/web:http -m udp --dport 30080 "
                "-j REDIRECT --to-ports 40001"],
            "KUBE-NODEPORT-HOST": [
                "-A KUBE-NODEPORT-HOST -p udp -m comment --comment default/web:http -m udp --dport 30080 "
                "-j DNAT --to-destination 172.18.0.2:40001"],
        },
    }


def test_external_and_load_balancer_ips_get_the_cluster_ips_portals() -> None:
    web = dataclasses.replace(svc(), external_ips=("192.168.77.10",), load_balancer_ips=("172.18.255.1",))
    rules = render(state((web, [Endpoint("10.244.1.2", 8080, "node1")])), NODE, {web.key: 40000})
    assert rules.tables["nat"]["KUBE-PORTALS-CONTAINER"] == [
        f"-A KUBE-PORTALS-CONTAINER -d {ip}/32 -p tcp -m comment --comment default/web:http -m tcp --dport 80 "
        "-j REDIRECT --to-ports 40000" for ip in ("10.96.0.10", "192.168.77.10", "172.18.255.1")]
    assert rules.tables["nat"]["KUBE-PORTALS-HOST"] == [
        f"-A KUBE-PORTALS-HOST -d {ip}/32 -p tcp -m comment --comment default/web:http -m tcp --dport 80 "
        "-j DNAT --to-destination 172.18.0.2:40000" for ip in ("10.96.0.10", "192.168.77.10", "172.18.255.1")]


def test_traffic_policies_and_source_ranges_are_what_userspace_mode_refuses() -> None:
    assert [MODE.unsupported(dataclasses.replace(svc(node_port=30080), **change)) for change in (
        {}, {"external_policy_local": True}, {"internal_policy_local": True},
        {"load_balancer_ips": ("172.18.255.1",), "source_ranges": ("10.0.0.0/8",)})] == [
        "", "externalTrafficPolicy Local", "internalTrafficPolicy Local", "loadBalancerSourceRanges"]


def test_a_terminating_endpoint_still_serving_is_used_only_while_none_is_ready() -> None:
    web = svc()
    draining = Endpoint("10.244.1.2", 8080, "node1", ready=False, terminating=True)
    ports = {web.key: 40000}
    assert render(state((web, [draining])), NODE, ports).tables["nat"]["KUBE-PORTALS-CONTAINER"]
    assert ready_addresses(web, [draining]) == ["10.244.1.2:8080"]
    assert ready_addresses(web, [draining, Endpoint("10.244.2.2", 8080, "node2")]) == ["10.244.2.2:8080"]


def test_a_service_without_serving_endpoints_is_rejected_not_redirected() -> None:
    web = svc(node_port=30080)
    rules = render(state((web, [Endpoint("10.244.1.2", 8080, "node1", ready=False, terminating=True,
                                         serving=False)])), NODE, {web.key: 40000})
    assert rules.tables == {
        "filter": {
            "KUBE-NODEPORT-NON-LOCAL": [],
            "KUBE-USERSPACE-REJECT": [
                '-A KUBE-USERSPACE-REJECT -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http has no '
                'endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable',
                '-A KUBE-USERSPACE-REJECT -p tcp -m comment --comment "default/web:http has no endpoints" '
                "-m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT --reject-with icmp-port-unreachable"],
        },
        "nat": {chain: [] for chain in ("KUBE-PORTALS-CONTAINER", "KUBE-PORTALS-HOST", "KUBE-NODEPORT-CONTAINER",
                                        "KUBE-NODEPORT-HOST")},
    }


# The restore input of one ClusterIP service port on a proxy port (and, with jumps, every jump).
WEB_TEXT = """\
*filter
:KUBE-NODEPORT-NON-LOCAL - [0:0]
:KUBE-USERSPACE-REJECT - [0:0]
{filter_jumps}COMMIT
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp --dport 80 \
-j REDIRECT --to-ports {port}
-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp --dport 80 \
-j DNAT --to-destination 172.18.0.2:{port}
{nat_jumps}COMMIT
"""
FILTER_JUMPS = """\
-I INPUT 1 -m comment --comment "Ensure that non-local NodePort traffic can flow" -j KUBE-NODEPORT-NON-LOCAL
-I INPUT 1 -m conntrack --ctstate NEW -m comment --comment "kproxy userspace: service ports without endpoints" \
-j KUBE-USERSPACE-REJECT
-I FORWARD 1 -m conntrack --ctstate NEW -m comment --comment "kproxy userspace: service ports without endpoints" \
-j KUBE-USERSPACE-REJECT
-I OUTPUT 1 -m conntrack --ctstate NEW -m comment --comment "kproxy userspace: service ports without endpoints" \
-j KUBE-USERSPACE-REJECT
"""
NAT_JUMPS = """\
-I PREROUTING 1 -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules" \
-j KUBE-PORTALS-CONTAINER
-I OUTPUT 1 -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules" \
-j KUBE-PORTALS-HOST
-A PREROUTING -m addrtype --dst-type LOCAL -m comment --comment "handle service NodePorts; NOTE: this must be \
the last rule in the chain" -j KUBE-NODEPORT-CONTAINER
-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "handle service NodePorts; NOTE: this must be \
the last rule in the chain" -j KUBE-NODEPORT-HOST
"""


def test_restore_text_declares_only_our_chains_and_adds_the_jumps_it_is_given() -> None:
    rules = render(state((svc(), EPS)), NODE, {svc().key: 40000})
    assert rules.text() == WEB_TEXT.format(port=40000, filter_jumps="", nat_jumps="")
    assert rules.text(JUMPS) == WEB_TEXT.format(port=40000, filter_jumps=FILTER_JUMPS, nat_jumps=NAT_JUMPS)


def test_render_text_uses_numbered_placeholders_for_proxy_ports() -> None:
    a, b = svc("a", ip="10.96.0.10"), svc("b", ip="10.96.0.11", node_port=30081)
    c = svc("c", ip="10.96.0.12", protocol="UDP", port=53, port_name="")
    st = state((a, EPS), (b, EPS), (c, []))
    assert placeholder_ports(st) == {a.key: "<proxy-port-1>", b.key: "<proxy-port-2>", c.key: "<proxy-port-3>"}
    userspace = mode("userspace")
    assert userspace.render_text(st, NODE, userspace.options_of({})) == """\
# kproxy userspace: proxy ports are chosen by the kernel when the listeners open;
# below they are placeholders:
#   <proxy-port-1> = default/a:http/TCP
#   <proxy-port-2> = default/b:http/TCP
#   <proxy-port-3> = default/c/UDP
*filter
:KUBE-NODEPORT-NON-LOCAL - [0:0]
:KUBE-USERSPACE-REJECT - [0:0]
-A KUBE-NODEPORT-NON-LOCAL -p tcp -m comment --comment default/b:http -m tcp --dport <proxy-port-2> \
-m state --state NEW -j ACCEPT
-A KUBE-USERSPACE-REJECT -d 10.96.0.12/32 -p udp -m comment --comment "default/c has no endpoints" -m udp \
--dport 53 -j REJECT --reject-with icmp-port-unreachable
COMMIT
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment default/a:http -m tcp --dport 80 \
-j REDIRECT --to-ports <proxy-port-1>
-A KUBE-PORTALS-CONTAINER -d 10.96.0.11/32 -p tcp -m comment --comment default/b:http -m tcp --dport 80 \
-j REDIRECT --to-ports <proxy-port-2>
-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment default/a:http -m tcp --dport 80 \
-j DNAT --to-destination 172.18.0.2:<proxy-port-1>
-A KUBE-PORTALS-HOST -d 10.96.0.11/32 -p tcp -m comment --comment default/b:http -m tcp --dport 80 \
-j DNAT --to-destination 172.18.0.2:<proxy-port-2>
-A KUBE-NODEPORT-CONTAINER -p tcp -m comment --comment default/b:http -m tcp --dport 30081 \
-j REDIRECT --to-ports <proxy-port-2>
-A KUBE-NODEPORT-HOST -p tcp -m comment --comment default/b:http -m tcp --dport 30081 \
-j DNAT --to-destination 172.18.0.2:<proxy-port-2>
COMMIT
"""


def test_cleanup_removes_our_jumps_and_chains_and_nothing_else() -> None:
    saved = """*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-PORTALS-CONTAINER - [0:0]
:CNI-abc - [0:0]
-A PREROUTING -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules" -j KUBE-PORTALS-CONTAINER
-A PREROUTING -j CNI-abc
-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 40000
COMMIT
"""
    text = removal_input(parse_save(saved), is_own_chain)
    assert text == ("*nat\n:KUBE-PORTALS-CONTAINER - [0:0]\n"
                    '-D PREROUTING -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort '
                    'rules" -j KUBE-PORTALS-CONTAINER\n-X KUBE-PORTALS-CONTAINER\nCOMMIT\n')
    assert removal_input(parse_save("*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n"), is_own_chain) == ""


# --- choosing endpoints ------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_round_robin_walks_the_endpoints_in_order() -> None:
    lb = Balancer()
    lb.update(["a:1", "b:1", "c:1"])
    assert [lb.next("10.0.0.1") for _ in range(7)] == ["a:1", "b:1", "c:1", "a:1", "b:1", "c:1", "a:1"]


def test_no_endpoints_means_no_choice() -> None:
    assert Balancer().next("10.0.0.1") is None


def test_a_new_endpoint_list_starts_over_and_an_unchanged_one_does_not() -> None:
    lb = Balancer()
    lb.update(["a:1", "b:1"])
    lb.next("x")
    lb.update(["a:1", "b:1"])
    assert lb.next("x") == "b:1"
    lb.update(["a:1", "b:1", "c:1"])
    assert lb.next("x") == "a:1"


def test_client_ip_affinity_sticks_until_the_timeout_refreshed_by_use() -> None:
    clock = Clock()
    lb = Balancer(affinity_seconds=10, clock=clock)
    lb.update(["a:1", "b:1", "c:1"])
    first = lb.next("10.0.0.1")
    assert lb.next("10.0.0.2") != first  # another client moves the round robin on
    for _ in range(5):
        clock.now += 9
        assert lb.next("10.0.0.1") == first  # each use refreshes the 10 s
    clock.now += 10.5
    assert lb.next("10.0.0.1") != first  # expired: chosen afresh


def test_affinity_reset_after_a_failed_dial_picks_another_endpoint_and_sticks_to_it() -> None:
    lb = Balancer(affinity_seconds=60, clock=Clock())
    lb.update(["a:1", "b:1"])
    first = lb.next("10.0.0.1")
    second = lb.next("10.0.0.1", reset=True)
    assert second != first
    assert lb.next("10.0.0.1") == second


def test_affinity_to_a_removed_endpoint_is_forgotten() -> None:
    lb = Balancer(affinity_seconds=60, clock=Clock())
    lb.update(["a:1", "b:1"])
    assert lb.next("10.0.0.1") == "a:1"
    lb.update(["b:1", "c:1"])
    assert lb.sticky == {}
    assert lb.next("10.0.0.1") == "b:1"


def test_spread_is_even_without_affinity() -> None:
    lb = Balancer()
    lb.update(["a:1", "b:1", "c:1"])
    assert set(Counter(lb.next(f"10.0.0.{i % 7}") for i in range(300)).values()) == {100}


# --- the loop, on loopback in a throwaway namespace (never the machine's own): kernel tests ------


@pytest.fixture
def inside(netns: Callable[..., str]) -> Iterator[None]:
    """The test body runs in a fresh network namespace (threads it starts inherit it)."""
    with entered(netns("us")):
        yield

def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


@pytest.mark.kernel
@pytest.mark.parametrize("copy", ["splice", "copy"])
def test_the_loop_proxies_tcp_and_retries_a_dead_endpoint(copy: str, inside: None) -> None:
    server, _ = _echo_server()
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    loop = ProxyLoop()
    try:
        svc_ = svc()
        endpoints = [Endpoint("127.0.0.1", dead.getsockname()[1], "n"),
                     Endpoint("127.0.0.1", server.getsockname()[1], "n")]
        proxy = loop.call(lambda: ServiceProxy(loop, svc_, copy, 0.25))
        loop.call(lambda: proxy.update(svc_, endpoints))
        payload = bytes(range(256)) * 4096  # 1 MiB
        # Round robin walks the endpoints in "ip:port" text order: with the dead one first, each
        # of the three connections dials it first; second, only the second connection does.
        dead_first = endpoints[0].address < endpoints[1].address
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                received = bytearray()

                def send() -> None:
                    client.sendall(payload)
                    client.shutdown(socket.SHUT_WR)

                sender = threading.Thread(target=send)
                sender.start()
                while data := client.recv(65536):
                    received += data
                sender.join()
            assert bytes(received) == payload
        table = loop.call(lambda: [proxy.snapshot()])
        assert (table[0]["dialFailures"], table[0]["accepted"]) == (3 if dead_first else 2, 3)
        deadline = time.monotonic() + 2
        while loop.call(lambda: len(proxy.conns)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.call(lambda: len(proxy.conns)) == 0
    finally:
        loop.call(lambda: proxy.close())
        loop.stop()
        server.close()
        dead.close()


@pytest.mark.kernel
def test_removing_an_endpoint_closes_its_connections_and_terminating_keeps_them(inside: None) -> None:
    server, _ = _echo_server()
    loop = ProxyLoop()
    try:
        svc_ = svc()
        ep = Endpoint("127.0.0.1", server.getsockname()[1], "n")
        proxy = loop.call(lambda: ServiceProxy(loop, svc_, "splice", 0.25))
        loop.call(lambda: proxy.update(svc_, [ep]))
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        client.sendall(b"ping")
        assert client.recv(10) == b"ping"
        gone = Endpoint(ep.ip, ep.port, "n", ready=False, terminating=True)
        loop.call(lambda: proxy.update(svc_, [gone]))  # terminating: kept
        client.sendall(b"again")
        assert client.recv(10) == b"again"
        loop.call(lambda: proxy.update(svc_, []))  # removed: closed
        assert client.recv(10) == b""
        client.close()
    finally:
        loop.call(lambda: proxy.close())
        loop.stop()
        server.close()


@pytest.mark.kernel
def test_a_dial_that_never_completes_is_tried_on_the_old_schedule_then_the_client_is_closed(inside: None) -> None:
    # A listener whose accept queue is full drops new SYNs: every dial to it waits out its timeout.
    full = socket.socket()
    full.bind(("127.0.0.1", 0))
    full.listen(0)
    fillers = [socket.socket() for _ in range(2)]
    for filler in fillers:
        filler.setblocking(False)
        filler.connect_ex(full.getsockname())
    loop = ProxyLoop()
    try:
        svc_ = svc()
        proxy = loop.call(lambda: ServiceProxy(loop, svc_, "splice", 0.25))
        loop.call(lambda: proxy.update(svc_, [Endpoint("127.0.0.1", full.getsockname()[1], "n")]))
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        started = time.monotonic()
        failed_at: list[float] = []
        while len(failed_at) < len(DIAL_TIMEOUTS) and time.monotonic() - started < 8:
            failures = loop.call(lambda: proxy.dial_failures)
            failed_at += [round(time.monotonic() - started, 2)] * (failures - len(failed_at))
            time.sleep(0.005)
        assert client.recv(10) == b""  # closed after the last try
        client.close()
        schedule = [sum(DIAL_TIMEOUTS[:i + 1]) for i in range(len(DIAL_TIMEOUTS))]
        assert schedule == [0.25, 0.75, 1.75, 3.75]  # upstream's EndpointDialTimeouts, one after the other
        assert len(failed_at) == 4 and all(due - 0.05 <= at <= due + 0.5 for at, due in zip(failed_at, schedule)), \
            failed_at
    finally:
        loop.call(lambda: proxy.close())
        loop.stop()
        for sock in (full, *fillers):
            sock.close()


# --- syncing the rules, against a fake iptables (tests/fakes/iptables.py) ------------

# What a node has before the proxier starts: the CNI's chain and, from an earlier run, one of our jumps.
NODE_BEFORE = """*filter
:INPUT ACCEPT [0:0]
:KUBE-NODEPORT-NON-LOCAL - [0:0]
-A INPUT -m comment --comment "Ensure that non-local NodePort traffic can flow" -j KUBE-NODEPORT-NON-LOCAL
COMMIT
*nat
:POSTROUTING ACCEPT [0:0]
:CNI-abc - [0:0]
-A POSTROUTING -s 10.244.1.0/24 -j CNI-abc
-A CNI-abc -j MASQUERADE
COMMIT
"""


@pytest.fixture
def synced(inside: None) -> Iterator[tuple[UserspaceProxier, FakeIptables]]:
    """A proxier on a fake backend holding NODE_BEFORE; closed after the test."""
    fake = FakeIptables(NODE_BEFORE)
    proxier = UserspaceProxier(NODE, backend=fake)
    try:
        yield proxier, fake
    finally:
        proxier.close()


def web_text(proxier: UserspaceProxier, filter_jumps: str = "", nat_jumps: str = "") -> str:
    return WEB_TEXT.format(port=proxier.proxy_ports()[svc().key], filter_jumps=filter_jumps, nat_jumps=nat_jumps)


@pytest.mark.kernel
def test_a_first_sync_is_full_and_adds_the_missing_jumps_only(synced: tuple[UserspaceProxier, FakeIptables]) \
        -> None:
    proxier, fake = synced
    result = proxier.sync(state((svc(), EPS)))
    assert result.full and result.changed_services == 1
    present = FILTER_JUMPS.splitlines(keepends=True)[0]  # the non-local jump NODE_BEFORE has
    assert fake.restores == [web_text(proxier, FILTER_JUMPS.replace(present, ""), NAT_JUMPS)]
    assert fake.tables["filter"]["INPUT"].count(
        '-A INPUT -m comment --comment "Ensure that non-local NodePort traffic can flow" -j KUBE-NODEPORT-NON-LOCAL'
    ) == 1
    assert not proxier.sync(state((svc(), EPS))).full  # and the next one is partial


@pytest.mark.kernel
def test_an_endpoint_change_alone_writes_no_rule(synced: tuple[UserspaceProxier, FakeIptables]) -> None:
    proxier, fake = synced
    proxier.sync(state((svc(), EPS)))
    other = [Endpoint("10.244.3.2", 8080, "node3")]
    result = proxier.sync(state((svc(), other)))
    assert not result.full and result.changed_services == 1  # the listener's endpoints changed ...
    assert len(fake.restores) == 1  # ... its portal did not
    assert proxier.table()[0]["endpoints"] == ["10.244.3.2:8080"]
    unchanged = proxier.sync(state((svc(), other)))
    assert (unchanged.full, unchanged.changed_services, len(fake.restores)) == (False, 0, 1)


@pytest.mark.kernel
def test_changed_services_counts_each_service_port_opened_closed_or_updated_once(
        synced: tuple[UserspaceProxier, FakeIptables]) -> None:
    proxier, fake = synced
    a, b, c = svc("a", ip="10.96.0.10"), svc("b", ip="10.96.0.11"), svc("c", ip="10.96.0.12")
    assert proxier.sync(state((a, EPS), (b, EPS), (c, []))).changed_services == 3
    assert proxier.sync(state((a, EPS), (b, EPS), (c, []))).changed_services == 0
    sticky = svc("b", ip="10.96.0.11", affinity=10800)
    assert proxier.sync(state((a, EPS[:1]), (sticky, EPS))).changed_services == 3  # a updated, b updated, c closed
    assert sorted(proxier.proxy_ports()) == [a.key, b.key]


@pytest.mark.kernel
def test_more_service_ports_than_listeners_the_node_can_open_are_refused_whole(
        synced: tuple[UserspaceProxier, FakeIptables], monkeypatch: pytest.MonkeyPatch) -> None:
    proxier, fake = synced
    a, b, c = svc("a", ip="10.96.0.10"), svc("b", ip="10.96.0.11"), svc("c", ip="10.96.0.12")
    proxier.sync(state((a, EPS)))
    monkeypatch.setattr("kproxy.proxy.userspace.proxier.listener_capacity", lambda: (2, 258, 28232))
    with pytest.raises(RuntimeError) as refused:
        proxier.sync(state((a, EPS), (b, EPS), (c, EPS)))
    assert str(refused.value) == ("3 service ports need 3 listeners, more than this node can open (2: open-file "
                                  "limit 258 less 256 kept free, 28232 ephemeral ports)")
    assert sorted(proxier.proxy_ports()) == [a.key] and len(fake.restores) == 1  # nothing of it opened or written


@pytest.mark.kernel
def test_a_refused_restore_makes_the_next_sync_full(synced: tuple[UserspaceProxier, FakeIptables]) -> None:
    proxier, fake = synced
    proxier.sync(state((svc(), EPS)))
    fake.refuse_next()
    with pytest.raises(RestoreError):
        proxier.sync(state((svc(), [])))  # the portal would become a reject
    # Meanwhile someone flushed nat PREROUTING: the full sync puts our jumps back.
    fake.tables["nat"]["PREROUTING"] = []
    result = proxier.sync(state((svc(), EPS)))  # the very text the kernel has, but written again
    assert result.full
    assert fake.restores[-1] == web_text(proxier, nat_jumps="".join(
        line for line in NAT_JUMPS.splitlines(keepends=True) if "PREROUTING" in line))
    assert not proxier.sync(state((svc(), EPS))).full


@pytest.mark.kernel
def test_cleanup_closes_the_listeners_and_removes_our_chains_and_jumps(
        synced: tuple[UserspaceProxier, FakeIptables]) -> None:
    proxier, fake = synced
    proxier.sync(state((svc(node_port=30080), EPS), (svc("gone", ip="10.96.0.11"), [])))
    port = proxier.proxy_ports()[svc().key]
    proxier.cleanup()
    assert fake.save() == """*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:CNI-abc - [0:0]
-A POSTROUTING -s 10.244.1.0/24 -j CNI-abc
-A CNI-abc -j MASQUERADE
COMMIT
"""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert proxier.proxies == {} and proxier.loop is None
    assert proxier.sync(state((svc(), EPS))).full  # a proxier cleaned up starts over


@pytest.mark.kernel
def test_the_rules_excerpt_of_one_service_shows_its_rules_with_counters_and_its_listener(
        synced: tuple[UserspaceProxier, FakeIptables]) -> None:
    proxier, fake = synced
    proxier.sync(state((svc(), EPS), (svc("other", ip="10.96.0.11"), [])))
    port = proxier.proxy_ports()[svc().key]
    table_head = "SERVICE           PROTO  PORTAL         PROXY PORT  ENDPOINTS                              LIVE  ACCEPTED"
    assert proxier.rules_excerpt("default/web") == f"""\
*filter
:KUBE-NODEPORT-NON-LOCAL - [0:0]
:KUBE-USERSPACE-REJECT - [0:0]
COMMIT
*nat
:KUBE-PORTALS-CONTAINER - [0:0]
:KUBE-PORTALS-HOST - [0:0]
:KUBE-NODEPORT-CONTAINER - [0:0]
:KUBE-NODEPORT-HOST - [0:0]
[0:0] -A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp --dport 80 \
-j REDIRECT --to-ports {port}
[0:0] -A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp --dport 80 \
-j DNAT --to-destination 172.18.0.2:{port}
COMMIT

# listeners
{table_head}  DIAL FAILURES
default/web:http  TCP    10.96.0.10:80  {port:<10}  10.244.1.2:8080(0) 10.244.2.2:8080(0)  0     0         0
(ENDPOINTS: ip:port(live connections or UDP associations); LIVE includes dials in progress)
"""
