"""Our CNI plugins on the real kernel, exec'd exactly as a runtime execs them.

Here they go the way a runtime gets by default: the first exec starts the
CNI server and every later one is its thin client (test_cni_reference.py
runs them in-process, with the server disabled).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from cni import client, server
from cni.masq import IPTABLES_SAVE
from tests import runtime
from tests.runtime import OUR_BRIDGE, OUR_HOST_LOCAL, Outcome, in_ns, run_plugin

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module", autouse=True)
def through_the_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Only the socket's place is the test's own: so it knows which server its execs started."""
    sock = str(tmp_path_factory.mktemp("srv") / "cni.sock")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(runtime.PLUGIN_ENV, client.SOCKET_ENV, sock)
        try:
            yield
            assert "-> 0 in" in Path(client.log_path(sock)).read_text(), "the calls went through the server"
        finally:
            server.stop(sock)


def bridge_conf(data_dir: Path, subnet: str = "10.77.0.0/24", version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "testnet",
        "type": "kproxy-bridge",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "ipam": {"type": "kproxy-host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(data_dir)},
    }
    conf.update(extra)
    return conf


def add(conf: dict[str, Any], node: str, pod: str, cid: str = "c1", **kw: Any) -> Outcome:
    return run_plugin(OUR_BRIDGE, "ADD", conf, container_id=cid, netns=pod, host_ns=node, **kw)


def delete(conf: dict[str, Any], node: str, pod: str | None, cid: str = "c1") -> Outcome:
    return run_plugin(OUR_BRIDGE, "DEL", conf, container_id=cid, netns=pod, host_ns=node)


def links(ns: str) -> dict[str, dict[str, Any]]:
    return {link["ifname"]: link for link in json.loads(in_ns(ns, "ip", "-d", "-j", "link", "show").stdout)}


def allocated(data_dir: Path, network: str = "testnet") -> list[str]:
    net = data_dir / network
    return sorted(p.name for p in net.iterdir() if p.name[0].isdigit()) if net.exists() else []


def test_add_wires_the_pod_and_reports_it(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    done = add(bridge_conf(tmp_path, mtu=1450, hairpinMode=True), node, pod)
    assert done.status == 0, done.out
    result = done.out
    assert result is not None
    assert result["cniVersion"] == "1.1.0"
    bridge, host_veth, pod_if = result["interfaces"]
    assert bridge["name"] == "cni0" and pod_if["name"] == "eth0" and pod_if["sandbox"] == pod
    assert result["ips"] == [{"address": "10.77.0.2/24", "gateway": "10.77.0.1", "interface": 2}]
    assert result["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.77.0.1"}]

    pod_links = links(pod)
    assert pod_links["eth0"]["mtu"] == 1450 and "UP" in pod_links["eth0"]["flags"]
    assert pod_links["eth0"]["address"] == pod_if["mac"]
    pod_addr = json.loads(in_ns(pod, "ip", "-j", "-4", "addr", "show", "eth0").stdout)[0]["addr_info"][0]
    assert (pod_addr["local"], pod_addr["prefixlen"]) == ("10.77.0.2", 24)
    routes = json.loads(in_ns(pod, "ip", "-j", "route").stdout)
    assert {"dst": "default", "gateway": "10.77.0.1", "dev": "eth0"}.items() <= routes[0].items()

    node_links = links(node)
    veth = node_links[host_veth["name"]]
    assert veth["master"] == "cni0" and veth["mtu"] == 1450
    assert veth["linkinfo"]["info_slave_data"]["hairpin"] is True
    node_addr = json.loads(in_ns(node, "ip", "-j", "-4", "addr", "show", "cni0").stdout)[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in node_addr] == [("10.77.0.1", 24)]
    assert in_ns(node, "cat", "/proc/sys/net/ipv4/ip_forward").stdout.strip() == "1"


def test_two_pods_on_one_bridge_ping_each_other_and_the_gateway(netns, tmp_path: Path) -> None:
    node, pod_a, pod_b = netns("node"), netns("pod"), netns("pod")
    conf = bridge_conf(tmp_path)
    assert add(conf, node, pod_a, "a").status == 0
    assert add(conf, node, pod_b, "b").status == 0
    assert in_ns(pod_a, "ping", "-c1", "-W2", "10.77.0.3", check=False).returncode == 0
    assert in_ns(pod_b, "ping", "-c1", "-W2", "10.77.0.1", check=False).returncode == 0


def test_without_gateway_flags_the_bridge_has_no_address_and_the_pod_no_default_route(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    conf = bridge_conf(tmp_path, isGateway=False, isDefaultGateway=False)
    done = add(conf, node, pod)
    assert done.status == 0, done.out
    assert done.out is not None and done.out.get("routes", []) == []  # no "routes" key, as the reference
    assert in_ns(node, "ip", "-4", "-o", "addr", "show", "cni0").stdout == ""
    assert "default" not in in_ns(pod, "ip", "route").stdout


def test_promisc_mode_sets_the_bridge_promiscuous_and_refuses_hairpin_with_it(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    assert add(bridge_conf(tmp_path, promiscMode=True), node, pod).status == 0
    assert "PROMISC" in links(node)["cni0"]["flags"]
    both = add(bridge_conf(tmp_path, promiscMode=True, hairpinMode=True), node, netns("pod"), "c2")
    assert (both.status, both.code) == (1, 7)
    assert "hairpin" in both.out["msg"]


def test_ip_masq_installs_the_reference_chain_and_del_removes_it(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    conf = bridge_conf(tmp_path, ipMasq=True)
    assert add(conf, node, pod).status == 0
    rules = in_ns(node, IPTABLES_SAVE, "-t", "nat").stdout
    assert '-A POSTROUTING -s 10.77.0.2/32 -m comment --comment "name: \\"testnet\\" id: \\"c1\\"" -j CNI-' in rules
    assert "-d 10.77.0.0/24" in rules and "! -d 224.0.0.0/4" in rules and "-j MASQUERADE" in rules
    assert delete(conf, node, pod).status == 0
    assert "CNI-" not in in_ns(node, IPTABLES_SAVE, "-t", "nat").stdout


def test_del_is_idempotent_and_frees_the_address(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    conf = bridge_conf(tmp_path)
    done = add(conf, node, pod)
    host_veth = done.out["interfaces"][1]["name"]
    assert allocated(tmp_path) == ["10.77.0.2"]
    for _ in range(2):
        gone = delete(conf, node, pod)
        assert (gone.status, gone.out) == (0, None), gone.out
    assert allocated(tmp_path) == []
    assert "eth0" not in links(pod) and host_veth not in links(node)
    # Without CNI_NETNS, and with the namespace already gone, DEL still succeeds.
    assert delete(conf, node, None).status == 0
    assert delete(conf, node, "/var/run/netns/kproxy-no-such-ns").status == 0


def test_add_into_a_missing_namespace_is_code_3_and_allocates_nothing(netns, tmp_path: Path) -> None:
    node = netns("node")
    done = add(bridge_conf(tmp_path), node, "/var/run/netns/kproxy-no-such-ns")
    assert (done.status, done.code) == (1, 3)
    assert allocated(tmp_path) == []


def test_a_failed_add_after_ipam_releases_the_address(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    # The pod already has an eth0: the plugin must fail after IPAM handed out an address.
    in_ns(pod, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
    done = add(bridge_conf(tmp_path), node, pod)
    assert (done.status, done.code) == (1, 102)
    assert "eth0 already exists" in done.out["msg"]
    assert allocated(tmp_path) == []
    assert not [name for name in links(node) if name.startswith("veth")]


def test_check_passes_on_a_healthy_pod_and_names_what_broke(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    conf = bridge_conf(tmp_path)
    result = add(conf, node, pod).out
    checked = {**conf, "prevResult": result}

    def check() -> Outcome:
        return run_plugin(OUR_BRIDGE, "CHECK", checked, container_id="c1", netns=pod, host_ns=node)

    assert check().status == 0
    in_ns(pod, "ip", "route", "del", "default")
    broken = check()
    assert (broken.status, broken.code) == (1, 103) and "route to 0.0.0.0/0" in broken.out["msg"]
    in_ns(pod, "ip", "addr", "flush", "dev", "eth0")
    assert "address 10.77.0.2/24 is missing" in check().out["msg"]
    in_ns(pod, "ip", "link", "del", "eth0")
    assert "eth0 does not exist" in check().out["msg"]
    no_prev = run_plugin(OUR_BRIDGE, "CHECK", conf, container_id="c1", netns=pod, host_ns=node)
    assert no_prev.code == 7


def test_gc_through_the_bridge_releases_leaked_addresses(netns, tmp_path: Path) -> None:
    node = netns("node")
    conf = bridge_conf(tmp_path)
    for cid in ("alive", "leaked"):
        assert add(conf, node, netns("pod"), cid).status == 0
    gc = {**conf, "cni.dev/valid-attachments": [{"containerID": "alive", "ifname": "eth0"}]}
    assert run_plugin(OUR_BRIDGE, "GC", gc, ifname=None, host_ns=node).status == 0
    assert allocated(tmp_path) == ["10.77.0.2"]


def test_status_reports_an_exhausted_range_as_code_50(netns, tmp_path: Path) -> None:
    node = netns("node")
    conf = bridge_conf(tmp_path, subnet="10.77.0.0/30")  # room for exactly one pod
    assert run_plugin(OUR_BRIDGE, "STATUS", conf, ifname=None, host_ns=node).status == 0
    assert add(conf, node, netns("pod")).status == 0
    full = run_plugin(OUR_BRIDGE, "STATUS", conf, ifname=None, host_ns=node)
    assert (full.status, full.code) == (1, 50)
    second = add(conf, node, netns("pod"), "c2")
    assert (second.status, second.code) == (1, 100)
    assert "no IP addresses available in range set: 10.77.0.1-10.77.0.2" in second.out["msg"]


def test_a_bridge_with_another_address_is_refused_unless_force_address(netns, tmp_path: Path) -> None:
    node = netns("node")
    in_ns(node, "ip", "link", "add", "cni0", "type", "bridge")
    in_ns(node, "ip", "addr", "add", "10.66.0.1/24", "dev", "cni0")
    refused = add(bridge_conf(tmp_path), node, netns("pod"))
    assert refused.status == 1
    assert "cni0 already has an IP address 10.66.0.1/24 different from 10.77.0.1/24" in refused.out["msg"]
    assert allocated(tmp_path) == []
    forced = add(bridge_conf(tmp_path, forceAddress=True), node, netns("pod"), "c2")
    assert forced.status == 0, forced.out
    node_addr = json.loads(in_ns(node, "ip", "-j", "-4", "addr", "show", "cni0").stdout)[0]["addr_info"]
    assert [a["local"] for a in node_addr] == ["10.77.0.1"]


def test_hostile_input_reaches_neither_the_filesystem_nor_a_shell(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    marker = tmp_path / "pwned"
    hostile = add(bridge_conf(tmp_path), node, pod, cid=f"x;touch {marker}")
    assert (hostile.status, hostile.code) == (1, 4)
    escape = add(bridge_conf(tmp_path, name="../../escape"), node, pod)
    assert (escape.status, escape.code) == (1, 7)
    assert not marker.exists() and not (tmp_path.parent / "escape").exists()
    assert list(tmp_path.iterdir()) == []


def test_host_local_runs_standalone_as_an_executable(tmp_path: Path) -> None:
    conf = bridge_conf(tmp_path)
    done = run_plugin(OUR_HOST_LOCAL, "ADD", conf, container_id="c1", netns="/x")
    assert done.status == 0
    assert done.out["ips"] == [{"address": "10.77.0.2/24", "gateway": "10.77.0.1"}]
    assert run_plugin(OUR_HOST_LOCAL, "DEL", conf, container_id="c1").status == 0
    version = run_plugin(OUR_HOST_LOCAL, "VERSION", b'{"cniVersion":"1.1.0"}', ifname=None)
    assert version.out == {"cniVersion": "1.1.0", "supportedVersions": ["1.0.0", "1.1.0"]}


def test_hundred_parallel_adds_get_distinct_addresses_and_leave_nothing(netns, tmp_path: Path) -> None:
    node = netns("node")
    pods = [netns("p") for _ in range(100)]
    conf = bridge_conf(tmp_path, subnet="10.78.0.0/24")
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(lambda i: add(conf, node, pods[i], f"c{i}"), range(100)))
    assert all(r.status == 0 for r in results), [r.out for r in results if r.status]
    got = [r.out["ips"][0]["address"] for r in results]
    assert len(set(got)) == 100
    assert len(allocated(tmp_path)) == 100
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda i: delete(conf, node, pods[i], f"c{i}"), range(100)))
    assert allocated(tmp_path) == []
    assert [name for name in links(node) if name.startswith("veth")] == []
