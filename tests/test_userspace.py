"""The userspace mode without root: rule rendering, endpoint choice, dial schedule.

(Its behaviour on the real kernel is tests/test_services.py with MODES "userspace".)
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections import Counter
from typing import Callable, Iterator

import pytest

from cni.netns import entered

from kproxy.proxy import MODES, mode
from kproxy.proxy.saved import parse_save, removal_input
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from kproxy.proxy.userspace.balancer import Balancer
from kproxy.proxy.userspace.listener import ServiceProxy
from kproxy.proxy.userspace.loop import ProxyLoop
from kproxy.proxy.userspace.rules import JUMPS, is_own_chain, placeholder_ports, render
from kproxy.proxy.userspace.status import format_table
from kproxy.proxy.userspace.tcp import DIAL_TIMEOUTS

NODE = NodeInfo("node1", "172.18.0.2", "10.244.0.0/16")


def svc(name: str = "web", port_name: str = "http", protocol: str = "TCP", ip: str = "10.96.0.10", port: int = 80,
        node_port: int = 0, affinity: int = 0) -> ServicePort:
    return ServicePort("default", name, port_name, protocol, ip, port, node_port, affinity)


def state(*pairs: tuple[ServicePort, list[Endpoint]]) -> ProxyState:
    return ProxyState(services=[s for s, _ in pairs], endpoints={s.key: eps for s, eps in pairs})


EPS = [Endpoint("10.244.1.2", 8080, "node1"), Endpoint("10.244.2.2", 8080, "node2")]


# --- rendering -------------------------------------------------------------------

def test_mode_is_registered() -> None:
    assert "userspace" in MODES


def test_cluster_ip_portals_redirect_for_containers_and_dnat_to_the_node_ip_for_the_host() -> None:
    web = svc()
    rules = render(state((web, EPS)), NODE, {web.key: 40000})
    assert rules.tables["nat"]["KUBE-PORTALS-CONTAINER"] == [
        '-A KUBE-PORTALS-CONTAINER -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp '
        '--dport 80 -j REDIRECT --to-ports 40000']
    assert rules.tables["nat"]["KUBE-PORTALS-HOST"] == [
        '-A KUBE-PORTALS-HOST -d 10.96.0.10/32 -p tcp -m comment --comment default/web:http -m tcp '
        '--dport 80 -j DNAT --to-destination 172.18.0.2:40000']
    assert rules.tables["nat"]["KUBE-NODEPORT-CONTAINER"] == []
    assert rules.tables["filter"]["KUBE-USERSPACE-REJECT"] == []


def test_node_ports_get_container_host_and_non_local_rules() -> None:
    web = svc(node_port=30080, protocol="UDP")
    rules = render(state((web, EPS)), NODE, {web.key: 40001})
    assert rules.tables["nat"]["KUBE-NODEPORT-CONTAINER"] == [
        "-A KUBE-NODEPORT-CONTAINER -p udp -m comment --comment default/web:http -m udp --dport 30080 "
        "-j REDIRECT --to-ports 40001"]
    assert rules.tables["nat"]["KUBE-NODEPORT-HOST"] == [
        "-A KUBE-NODEPORT-HOST -p udp -m comment --comment default/web:http -m udp --dport 30080 "
        "-j DNAT --to-destination 172.18.0.2:40001"]
    assert rules.tables["filter"]["KUBE-NODEPORT-NON-LOCAL"] == [
        "-A KUBE-NODEPORT-NON-LOCAL -p udp -m comment --comment default/web:http -m udp --dport 40001 "
        "-m state --state NEW -j ACCEPT"]


def test_a_service_without_ready_endpoints_is_rejected_not_redirected() -> None:
    web = svc(node_port=30080)
    rules = render(state((web, [Endpoint("10.244.1.2", 8080, "node1", ready=False, terminating=True)])), NODE,
                   {web.key: 40000})
    assert all(not r for r in rules.tables["nat"].values())
    assert rules.tables["filter"]["KUBE-USERSPACE-REJECT"] == [
        '-A KUBE-USERSPACE-REJECT -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http has no endpoints" '
        '-m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable',
        '-A KUBE-USERSPACE-REJECT -p tcp -m comment --comment "default/web:http has no endpoints" '
        '-m addrtype --dst-type LOCAL -m tcp --dport 30080 -j REJECT --reject-with icmp-port-unreachable']


def test_restore_text_declares_only_our_chains_and_adds_missing_jumps() -> None:
    web = svc()
    text = render(state((web, EPS)), NODE, {web.key: 40000}).text(JUMPS)
    declared = [line for line in text.splitlines() if line.startswith(":")]
    assert declared == [":KUBE-NODEPORT-NON-LOCAL - [0:0]", ":KUBE-USERSPACE-REJECT - [0:0]",
                        ":KUBE-PORTALS-CONTAINER - [0:0]", ":KUBE-PORTALS-HOST - [0:0]",
                        ":KUBE-NODEPORT-CONTAINER - [0:0]", ":KUBE-NODEPORT-HOST - [0:0]"]
    assert ('-I PREROUTING 1 -m comment --comment "handle ClusterIPs; NOTE: this must be before the NodePort rules" '
            '-j KUBE-PORTALS-CONTAINER') in text
    assert ('-A OUTPUT -m addrtype --dst-type LOCAL -m comment --comment "handle service NodePorts; NOTE: this must '
            'be the last rule in the chain" -j KUBE-NODEPORT-HOST') in text


def test_render_text_uses_numbered_placeholders_for_proxy_ports() -> None:
    a, b = svc("a", ip="10.96.0.10"), svc("b", ip="10.96.0.11")
    st = state((a, EPS), (b, EPS))
    assert placeholder_ports(st) == {a.key: "<proxy-port-1>", b.key: "<proxy-port-2>"}
    userspace = mode("userspace")
    text = userspace.render_text(st, NODE, userspace.options_of({}))
    assert "# kproxy userspace" in text.splitlines()[0]
    assert "-j REDIRECT --to-ports <proxy-port-2>" in text


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


def test_dial_schedule_is_the_old_proxiers() -> None:
    assert DIAL_TIMEOUTS == (0.25, 0.5, 1.0, 2.0)


# --- the loop, on loopback (in a throwaway namespace when root, never the machine's own) ------


@pytest.fixture
def inside(request: pytest.FixtureRequest) -> Iterator[None]:
    """The test body runs in a fresh network namespace (threads it starts inherit it) when root."""
    if os.geteuid() != 0:
        yield
        return
    netns: Callable[..., str] = request.getfixturevalue("netns")
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
        for _ in range(3):  # every other new connection first dials the dead endpoint
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
        assert table[0]["dialFailures"] >= 1 and table[0]["accepted"] == 3
        assert "default/web:http" in format_table(table)
        deadline = time.monotonic() + 2
        while loop.call(lambda: len(proxy.conns)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert loop.call(lambda: len(proxy.conns)) == 0
    finally:
        loop.call(lambda: proxy.close())
        loop.stop()
        server.close()
        dead.close()


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
