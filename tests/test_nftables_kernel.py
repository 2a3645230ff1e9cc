"""nftables mode on the real kernel, in throwaway node namespaces (never the root one).

Every call into the proxier is wrapped in cni.netns.entered(node): its libnftables
context is opened in the calling thread's namespace, as the agent's is in its node's."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
from typing import Any

import pytest

from cni.netns import entered
from kproxy.errors import KproxyError
from kproxy.proxy.nftables import NftablesProxier, render
from kproxy.proxy.nftables.backend import TransactionError
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from tests.runtime import in_ns

pytestmark = pytest.mark.kernel

NODE = NodeInfo("node1", "192.168.0.2", "10.0.0.0/8", "172.30.0.0/16")
SVC1 = ServicePort("ns1", "svc1", "p80", "TCP", "172.30.0.41", 80)
SVC4 = ServicePort("ns4", "svc4", "p80", "TCP", "172.30.0.44", 80, node_port=30044, affinity_seconds=60)
DNS = ServicePort("ns7", "dns", "dns", "UDP", "172.30.0.53", 53)
ENDPOINT_IPS = ("10.180.0.1", "10.180.0.4", "10.180.0.5", "10.180.0.7")


def state(svc4: tuple[str, ...] = ("10.180.0.4", "10.180.0.5"), dns: tuple[str, ...] = ("10.180.0.1",),
          sticky: int = 60) -> ProxyState:
    return ProxyState(
        services=[SVC1, dataclasses.replace(SVC4, affinity_seconds=sticky), DNS],
        endpoints={SVC1.key: [Endpoint("10.180.0.1", 80, "node1")],
                   SVC4.key: [Endpoint(ip, 80, "node1") for ip in svc4],
                   DNS.key: [Endpoint(ip, 53, "node1") for ip in dns]})


def prepare_node(path: str) -> None:
    # The endpoints live on lo, and the service range is routed there: a connect() from the
    # node goes through nat-output -> services -> service-... -> endpoint-... -> dnat.
    name = path.rsplit("/", 1)[1]
    for ip in ENDPOINT_IPS:
        subprocess.run(["ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
    subprocess.run(["ip", "-n", name, "route", "add", "172.30.0.0/16", "dev", "lo"], check=True)


def table(node: str) -> dict[str, Any]:
    """Our table as the kernel lists it, without handles: chains with their rules, sets with elements."""
    listed = json.loads(in_ns(node, "nft", "-j", "list", "table", "ip", "kube-proxy").stdout)["nftables"]
    found: dict[str, Any] = {"chains": {}, "rules": {}, "sets": {}, "maps": {}}
    for item in listed:
        for kind, where in (("chain", "chains"), ("set", "sets"), ("map", "maps")):
            if kind in item:
                obj = {k: v for k, v in item[kind].items() if k != "handle"}
                found[where][obj["name"]] = obj
        if "rule" in item:
            found["rules"].setdefault(item["rule"]["chain"], []).append(item["rule"]["expr"])
    return found


def test_sync_installs_kube_proxys_table_and_a_connection_reaches_the_endpoint(netns) -> None:
    node = netns("node")
    prepare_node(node)
    in_ns(node, "nft", "add", "table", "ip", "cni-test")  # someone else's table: it stays
    with entered(node):
        proxier = NftablesProxier(NODE)
        assert proxier.sync(state()).full
        listener = socket.socket()
        listener.bind(("10.180.0.1", 80))
        listener.listen()
        with listener, socket.create_connection(("172.30.0.41", 80), timeout=3) as client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockname() == ("10.180.0.1", 80)  # DNATed to the endpoint
                assert client.getpeername() == ("172.30.0.41", 80)  # ... and un-NATed on the way back
    listed = in_ns(node, "nft", "list", "table", "ip", "kube-proxy").stdout
    for line in ("chain nat-output {", "type nat hook output priority -100; policy accept;",
                 "chain nat-prerouting {", "type nat hook prerouting priority dstnat; policy accept;",
                 "chain filter-output-post-dnat {", "type filter hook output priority -90; policy accept;",
                 "ip daddr . meta l4proto . th dport vmap @service-ips",
                 "fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports",
                 "chain service-ULMVA6XW-ns1/svc1/tcp/p80 {",
                 "ip daddr 172.30.0.41 tcp dport 80 ip saddr != 10.0.0.0/8 jump mark-for-masquerade",
                 "meta l4proto tcp dnat to 10.180.0.1:80", "masquerade fully-random",
                 "flags dynamic,timeout", "timeout 1m"):
        assert line in listed, line
    with entered(node):
        proxier.cleanup()
    assert in_ns(node, "nft", "list", "tables").stdout == "table ip cni-test\n"


def test_partial_syncs_leave_what_a_fresh_load_of_the_render_leaves(netns) -> None:
    node, fresh = netns("node"), netns("fresh")
    steps = [state(), state(svc4=("10.180.0.4", "10.180.0.7")), state(svc4=(), dns=("10.180.0.5", "10.180.0.7")),
             state(sticky=30), ProxyState([SVC1], {SVC1.key: [Endpoint("10.180.0.7", 80, "node1")]})]
    with entered(node):
        proxier = NftablesProxier(NODE)
        results = [proxier.sync(step) for step in steps]
    assert [r.full for r in results] == [True, False, False, False, False]
    in_ns(fresh, "nft", "-f", "-", input=render(steps[-1], NODE).text())
    assert table(node) == table(fresh)


def test_a_rule_of_someone_else_in_our_table_fails_the_sync_and_the_next_full_one_removes_it(netns) -> None:
    node = netns("node")
    with entered(node):
        proxier = NftablesProxier(NODE)
        proxier.sync(state())
    endpoint = "endpoint-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80"
    in_ns(node, "nft", "-f", "-", input=f"add chain ip kube-proxy intruder\nadd rule ip kube-proxy intruder "
                                        f"goto {endpoint}\n")
    with entered(node):
        with pytest.raises(TransactionError, match="Device or resource busy"):
            proxier.sync(state(svc4=("10.180.0.5",)))  # deletes the endpoint chain the intruder uses
        assert proxier.sync(state(svc4=("10.180.0.5",))).full
    assert "intruder" not in table(node)["chains"] and endpoint not in table(node)["chains"]


def test_rules_of_a_service_show_its_chains_sets_and_elements_with_counters(netns) -> None:
    node = netns("node")
    prepare_node(node)
    with entered(node):
        proxier = NftablesProxier(NODE, counters=True)
        proxier.sync(state())
        for _ in range(3):
            with socket.socket() as s:
                s.settimeout(2)
                try:
                    s.connect(("172.30.0.44", 80))  # refused: nobody listens; three new connections
                except OSError:
                    pass
        shown = proxier.rules_excerpt("ns4/svc4")
    assert shown.splitlines()[0].startswith("# endpoint choice: numgen random mod N vmap (kube-proxy's)")
    assert "chain service-LAUZTJTB-ns4/svc4/tcp/p80 {" in shown and "chain external-LAUZTJTB-ns4/svc4/tcp/p80 {" in shown
    rules = [line.strip() for line in shown.splitlines()]
    # The node's own address (on lo, in the cluster CIDR) is not masqueraded; the first connection
    # picked an endpoint at random, the other two followed its affinity.
    assert "ip daddr 172.30.0.44 tcp dport 80 ip saddr != 10.0.0.0/8 counter packets 0 bytes 0 jump " \
        "mark-for-masquerade" in rules, shown
    assert any(rule.startswith("counter packets 1 bytes 60 numgen random mod 2 vmap") for rule in rules), shown
    assert sum(int(rule.split("counter packets ")[1].split()[0]) for rule in rules
               if rule.startswith("ip saddr @affinity-")) == 2, shown
    assert "set affinity-UNZV3OEC-ns4/svc4/tcp/p80__10.180.0.4/80 {" in shown
    assert "elements = { 172.30.0.44 . tcp . 80 : goto service-LAUZTJTB-ns4/svc4/tcp/p80 }" in shown
    assert "svc1" not in shown


def test_rules_of_a_node_without_a_table_say_so(netns) -> None:
    node = netns("node")
    with entered(node):
        with pytest.raises(KproxyError, match="^the node has no nftables rules of kproxy to show"):
            NftablesProxier(NODE).rules_excerpt()
