"""One lab over two machines: two QEMU guests (Debian's stock kernel, nothing preloaded) whose lab
NICs share one Ethernet segment (kproxy/guestpair.py). Guest 1 makes the lab (`lab up --store etcd
--nic`, two nodes); guest 2 joins it (`lab join --store etcd://... --nic`, one node). With host-gw,
guest 2 then runs an etcd of its own and guest 1 makes a second lab on it (`lab up --store
etcd://...`). What each guest does is tests/joinpair_guest.py; this judges what they saw.

Runs on the host (it boots its own pair), as root, like tests/test_lab_nic_pair.py.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from kproxy import guestpair
from kproxy.guest import REPO

# The first test of each pair also boots it, and waits for both guests (run_pair's own timeout: 1500 s).
pytestmark = [pytest.mark.kernel, pytest.mark.timeout(1600)]

GUEST = [sys.executable, "-m", "tests.joinpair_guest"]


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any],
                                                                                            dict[str, Any], str]:
    overlay = request.param
    run_dir = tmp_path_factory.mktemp(f"join-{overlay}")
    more = ["etcd-elsewhere"] if overlay == "host-gw" else []  # once: it does not depend on the overlay
    first, second = guestpair.run_pair([*GUEST, "maker", overlay, *more], [*GUEST, "joiner", overlay, *more],
                                       env={"PYTHONPATH": str(REPO)}, timeout=1500, run_dir=run_dir)
    share = run_dir / "shared"
    consoles = f"guest 1:\n{first.console}\nguest 2:\n{second.console}"

    def seen(role: str) -> dict[str, Any]:
        path = share / f"{role}.json"
        return json.loads(path.read_text()) if path.exists() else {"error": f"no {path.name}"}
    maker, joiner = seen("maker"), seen("joiner")
    assert first.status == 0 and second.status == 0, \
        f"maker: {maker.get('error')}\njoiner: {joiner.get('error')}\n{consoles}"
    return overlay, maker, joiner, consoles


def nodes_of(status: dict[str, Any]) -> dict[str, tuple[str, str, bool | None]]:
    return {n["name"]: (n["host"], n["ip"], n["present"]) for n in status["nodes"]}


def test_the_joining_machines_node_takes_the_next_address_and_both_machines_see_all_nodes(pair) -> None:
    overlay, maker, joiner, _ = pair
    assert joiner["join"][0] == 0 and "joined lab twovm at http://172.18.0.253:2379 (" + overlay in joiner["join"][1]
    assert "moving NIC" in joiner["join"][1] and guestpair.lab_mac(2) in joiner["join"][1]
    want = {"node1": ("kproxy-vm1", "172.18.0.2"), "node2": ("kproxy-vm1", "172.18.0.3"),
            "node3": ("kproxy-vm2", "172.18.0.4")}
    assert {k: v[:2] for k, v in nodes_of(maker["status"]).items()} == want
    assert {k: v[:2] for k, v in nodes_of(joiner["status"]).items()} == want
    assert nodes_of(joiner["status"])["node3"][2] is True and nodes_of(joiner["status"])["node1"][2] is None
    assert joiner["status"]["joined"] is True and joiner["status"]["external"] is None
    assert maker["status"]["joined"] is False and maker["status"]["external"]["ip"] == "172.18.0.254"
    assert joiner["status"]["store"]["endpoint"] == "http://172.18.0.253:2379"
    assert joiner["status"]["overlay"] == overlay and joiner["status"]["mode"] == maker["status"]["mode"]
    assert "  joined  " in joiner["statusText"] and "store etcd at http://172.18.0.253:2379  version " in \
        joiner["statusText"]


def test_pods_reach_each_other_across_the_machines_over_the_wire(pair) -> None:
    overlay, maker, joiner, _ = pair
    assert maker["aToB"] == ["b"] and joiner["bToA"] == ["a"]
    wire = maker["wire"]  # 3 packets
    if overlay == "vxlan":  # each: flannel's VXLAN (port 8472) between the node IPs, then the pods' packet inside
        outer, inner = wire[0::2], wire[1::2]
        assert len(outer) == len(inner) == 3, wire
        for line in outer:
            source, destination = line.split(" IP ", 1)[1].split(": ", 1)[0].split(" > ")
            assert {source.rsplit(".", 1)[0], destination.rsplit(".", 1)[0]} == {"172.18.0.2", "172.18.0.4"}, line
            assert destination.endswith(".8472"), line
        assert all(line.startswith("IP 10.244.") and " > 10.244." in line for line in inner), wire
    else:  # host-gw: the pods' own addresses on the wire, routed by the node IPs
        assert len(wire) == 3, wire
        for line in wire:
            source, destination = line.split(" IP ", 1)[1].split(": ", 1)[0].split(" > ")
            assert source.startswith("10.244.") and destination.startswith("10.244."), line


def test_a_service_with_endpoints_in_both_machines_is_reached_from_both_and_from_external(pair) -> None:
    _, maker, joiner, _ = pair
    assert maker["webFromA"] == ["a", "b"]
    assert maker["webFromClient1"] == ["a", "b"]
    assert joiner["webFromClient2"] == ["a", "b"]
    assert maker["nodePortFromExternal"] == ["a", "b"]


def test_a_change_applied_in_one_machine_is_programmed_in_the_other(pair) -> None:
    _, maker, joiner, _ = pair
    assert maker["web2Apply"][0] == 0, maker["web2Apply"]  # apply waits for every node's agent: node3's too
    assert joiner["web2FromClient2"] == ["a", "b"]


def test_agents_in_both_machines_resume_after_etcd_restarts_and_an_apply_while_it_is_down_stores_nothing(pair) -> None:
    _, maker, joiner, _ = pair
    assert maker["web3Apply"][0] == 0, maker["web3Apply"]
    assert joiner["web3FromClient2"] == ["a", "b"]
    code, out, err = maker["web4Apply"]
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and "unreachable" in err, maker["web4Apply"]
    assert maker["servicesAfter"] == ["web", "web2", "web3"]


def test_the_joining_machine_leaves_and_both_give_their_nics_back(pair) -> None:
    _, maker, joiner, _ = pair
    assert maker["nodesAfterLeave"] == ["node1", "node2"]
    assert maker["webAfterLeave"] == ["a"]
    assert joiner["nicAfter"] == joiner["nicBefore"] and joiner["namespacesAfter"] == []
    assert maker["nicAfter"] and maker["namespacesAfter"] == []


@pytest.mark.parametrize("pair", ["host-gw"], indirect=True)  # the pair that went on to etcd-elsewhere
def test_a_lab_made_on_an_etcd_another_machine_runs_serves_and_down_takes_it_out_of_there(pair) -> None:
    _, maker, joiner, _ = pair
    code, out, err = maker["onEtcdUp"]
    assert code == 0 and "lab onetcd is up (host-gw" in out, maker["onEtcdUp"]
    status = maker["onEtcdStatus"]
    assert status["store"]["backend"] == "etcd" and status["store"]["endpoint"] == "http://172.18.0.3:2379"
    assert status["store"]["version"] > 0 and "control-plane" not in status["store"]["namespace"]
    assert {n["name"]: n["ip"] for n in status["nodes"]} == {"node1": "172.18.0.2", "node2": "172.18.0.4"}
    assert "store etcd at http://172.18.0.3:2379  version " in maker["onEtcdStatusText"]
    assert maker["onEtcdWeb"] == ["a"]
    assert {"ConfigMap/kube-system/kproxy-lab", "Node/node1", "Node/node2", "Pod/default/a",
            "Service/default/web"} <= set(joiner["whileUp"])
    assert joiner["afterDown"] == {"objects": [], "version": 0, "reports": []}
    assert maker["onEtcdNicAfter"] and maker["onEtcdNamespacesAfter"] == []
