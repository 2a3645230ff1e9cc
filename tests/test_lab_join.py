"""A lab over several machines, without root: what `lab join` decides before it builds anything
(kproxy/lab/join.py, planning.py, labconfig.py) and what each machine writes to the lab's store.
The kernel side, two machines on one wire, runs in two QEMU guests: tests/test_lab_join_pair.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kproxy import controllers
from kproxy.errors import KproxyError
from kproxy.lab import build, kubelet, labconfig
from kproxy.lab.join import name_of, topology_of
from kproxy.lab.overlay import lease_annotations
from kproxy.lab.planning import Others, node_object, others_in, plan
from kproxy.lab.topology import parse_topology
from kproxy.store import Conflict, View, etcd_url
from kproxy.store.file import FileStore
from tests.k8s_schema import validate

LAB = {"name": "two", "nodes": ["node1", "node2"], "pods": [{"name": "a", "nodeName": "node1", "labels": {"app": "web"}}]}


def far_node(name: str, ip: str, pod_cidr: str, host: str = "vm2") -> dict[str, Any]:
    """A Node another machine wrote, as its join writes it."""
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "annotations": {"kproxy.io/host": host,
                                                       **lease_annotations("vxlan", ip, "0a:00:00:00:00:09")}},
            "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def far_pod(name: str, node: str, ip: str) -> dict[str, Any]:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
           "spec": {"nodeName": node, "containers": [{"name": "w", "ports": [{"containerPort": 8080}]}]}}
    pod["status"] = controllers.pod_status(pod, ip, "172.18.0.4", ready=True)
    return pod


@pytest.mark.parametrize("url, endpoint", [("etcd://172.18.0.253:2379", "http://172.18.0.253:2379"),
                                           ("etcd://10.0.0.1:12379/", "http://10.0.0.1:12379")])
def test_the_store_to_join_is_etcd_ip_port(url: str, endpoint: str) -> None:
    assert etcd_url(url) == endpoint


@pytest.mark.parametrize("url", ["172.18.0.253:2379", "http://172.18.0.253:2379", "etcd://172.18.0.253",
                                 "etcd://control-plane:2379", "etcd://172.18.0.253:99999", "etcd://172.18.0.253:2379/x"])
def test_another_store_to_join_is_refused_in_one_line(url: str) -> None:
    with pytest.raises(KproxyError) as caught:
        etcd_url(url)
    assert str(caught.value) == (f"{url!r} is not etcd://IP:PORT (an etcd on the lab's underlay, e.g. "
                                 "etcd://172.18.0.253:2379, as 'kproxy lab status' shows it on the machine that runs it)")


def test_a_joining_machine_names_the_lab() -> None:
    assert name_of({"name": "two"}) == "two" and name_of({"name": "two"}, "other") == "other"
    with pytest.raises(KproxyError, match=r"^name the lab to join: a name field in the topology, or --name$"):
        name_of({"nodes": ["node3"]})


def made_lab(**kwargs: Any) -> Any:
    return plan(parse_topology(LAB), None, store="etcd", **kwargs)


def test_the_labs_parameters_are_a_configmap_valid_against_kubernetes_schema() -> None:
    state = made_lab(mode="nftables", mode_options={"counters": "true"})
    obj = labconfig.config_map(state)
    assert obj == {"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "kproxy-lab", "namespace": "kube-system",
                                "labels": {"app.kubernetes.io/name": "kproxy"}},
                   "data": {"overlay": "vxlan", "podCIDR": "10.244.0.0/16", "nodeCIDR": "172.18.0.0/24",
                            "loadBalancerCIDR": "172.18.255.0/24", "externalIP": "172.18.0.254",
                            "controlPlaneIP": "172.18.0.253", "mode": "nftables",
                            "modeOptions": '{"counters": "true"}', "dns": "true"}}
    validate(obj)
    config = labconfig.lab_config("two", View(1, {labconfig.KEY: obj}))
    assert config == labconfig.LabConfig("vxlan", "10.244.0.0/16", "172.18.0.0/24", "172.18.255.0/24",
                                         "172.18.0.254", "172.18.0.253", "nftables", {"counters": "true"}, True)


def test_a_store_without_the_lab_is_said_in_one_line() -> None:
    with pytest.raises(KproxyError, match=r"^the store has no lab two \(no ConfigMap/kube-system/kproxy-lab\): is it "
                                          r"up, with --store etcd, at that endpoint\?$"):
        labconfig.lab_config("two", View())


def test_a_joining_topology_takes_the_labs_networks_and_overlay() -> None:
    config = labconfig.lab_config("two", View(1, {labconfig.KEY: labconfig.config_map(
        plan(parse_topology({**LAB, "overlay": "host-gw", "nodeCIDR": "192.168.50.0/24"}), None, store="etcd"))}))
    topology = topology_of({"nodes": ["node3"], "pods": [], "overlay": "host-gw"}, config, "two")
    assert (topology.name, topology.overlay, str(topology.node_cidr), [n.name for n in topology.nodes]) == \
        ("two", "host-gw", "192.168.50.0/24", ["node3"])
    with pytest.raises(KproxyError, match=r"^the topology sets overlay vxlan, but the lab has host-gw \(a joining "
                                          r"machine takes the lab's; leave it out\)$"):
        topology_of({"nodes": ["node3"], "overlay": "vxlan"}, config, "two")


def test_a_joining_machines_nodes_take_what_no_other_machine_has() -> None:
    made = made_lab()
    view = View(7, {f"Node/{n}": node_object(made, n) for n in made.nodes})
    others = others_in(view, [])
    assert others == Others(7, {"node1": made.nodes["node1"].host, "node2": made.nodes["node2"].host},
                            frozenset({"172.18.0.2", "172.18.0.3"}), frozenset({"10.244.1.0/24", "10.244.2.0/24"}))
    joined = plan(parse_topology({"name": "two", "nodes": ["node3", "node4"], "pods": []}), None, store="etcd",
                  others=others, joined=True, store_endpoint="http://172.18.0.253:2379")
    assert {n: (s.ip, s.pod_cidr) for n, s in joined.nodes.items()} == \
        {"node3": ("172.18.0.4", "10.244.3.0/24"), "node4": ("172.18.0.5", "10.244.4.0/24")}
    assert (joined.joined, joined.store_endpoint, joined.runs_etcd) == (True, "http://172.18.0.253:2379", False)
    with pytest.raises(KproxyError, match=r"^lab two has a node node2 already, on host .+; choose another name$"):
        plan(parse_topology({"name": "two", "nodes": ["node2"], "pods": []}), None, others=others)


def test_a_lab_made_on_an_etcd_elsewhere_leaves_etcds_address_to_it_and_runs_no_etcd() -> None:
    made = made_lab(store_endpoint="http://172.18.0.2:2379")
    assert {n: s.ip for n, s in made.nodes.items()} == {"node1": "172.18.0.3", "node2": "172.18.0.4"}
    assert (made.store_endpoint, made.control_plane_ip, made.runs_etcd, made.joined) == \
        ("http://172.18.0.2:2379", "", False, False)
    assert kubelet.control_plane(made) == []
    again = plan(parse_topology(LAB), made)  # lab up without --store keeps that etcd
    assert again.store_endpoint == "http://172.18.0.2:2379" and again.nodes == made.nodes
    with pytest.raises(KproxyError) as caught:
        plan(parse_topology(LAB), made, store="etcd")
    assert str(caught.value) == ("lab two runs with store etcd://172.18.0.2:2379, not etcd; take it down first "
                                 "('kproxy lab down two')")
    assert made_lab().runs_etcd and made_lab().control_plane_ip == "172.18.0.253"


@pytest.mark.parametrize("ip", ["10.0.0.1", "172.18.0.0", "172.18.0.254"])
def test_an_etcd_off_the_labs_underlay_is_refused(ip: str) -> None:
    with pytest.raises(KproxyError) as caught:
        made_lab(store_endpoint=f"http://{ip}:2379")
    assert str(caught.value) == (f"etcd at {ip} is not an address for another machine on lab two's underlay (a host "
                                 "of nodeCIDR 172.18.0.0/24 other than the external client's 172.18.0.254): its nodes "
                                 "reach etcd there")


def test_a_kept_assignment_another_machine_took_meanwhile_is_made_anew() -> None:
    joined = plan(parse_topology({"name": "two", "nodes": ["node3"], "pods": []}), None)
    assert (joined.nodes["node3"].ip, joined.nodes["node3"].pod_cidr) == ("172.18.0.2", "10.244.1.0/24")
    others = Others(3, {"node1": "vm1"}, frozenset({"172.18.0.2"}), frozenset({"10.244.1.0/24"}))
    again = plan(parse_topology({"name": "two", "nodes": ["node3"], "pods": []}), joined, others=others)
    assert (again.nodes["node3"].ip, again.nodes["node3"].pod_cidr) == ("172.18.0.3", "10.244.2.0/24")


def stored(state: Any, tmp_path: Path) -> FileStore:
    store = FileStore(tmp_path / "store")
    build._sync_store_topology(state, parse_topology(LAB), store, [])
    return store


def test_a_machine_reconciling_its_nodes_leaves_other_machines_nodes_and_pods(tmp_path: Path) -> None:
    made = made_lab()
    store = stored(made, tmp_path)
    store.write({"Node/node3": far_node("node3", "172.18.0.4", "10.244.3.0/24"),
                 "Pod/default/b": far_pod("b", "node3", "10.244.3.2")})
    fewer = plan(parse_topology({**LAB, "nodes": ["node1"]}), made, store="etcd")
    build._sync_store_topology(fewer, parse_topology({**LAB, "nodes": ["node1"]}), store, ["node2"])
    objects = store.read().objects
    assert sorted(k for k in objects if k.startswith(("Node/", "Pod/"))) == \
        ["Node/node1", "Node/node3", "Pod/default/a", "Pod/default/b"]
    assert objects[labconfig.KEY]["data"]["nodeCIDR"] == "172.18.0.0/24"
    store.write({"Node/node3": None})  # that machine went: its pods go with the next reconcile anywhere
    build._sync_store_topology(fewer, parse_topology({**LAB, "nodes": ["node1"]}), store, [])
    assert "Pod/default/b" not in store.read().objects


def test_a_claim_overtaken_by_a_harmless_write_is_made_again_and_one_that_took_our_ip_is_refused(
        tmp_path: Path) -> None:
    made = made_lab()
    store = stored(made, tmp_path)
    others = others_in(store.read(), [])
    joined = plan(parse_topology({"name": "two", "nodes": ["node3"], "pods": []}), None, store="etcd",
                  others=others, joined=True, store_endpoint="http://172.18.0.253:2379")
    store.write({"Service/default/web": {"kind": "Service", "metadata": {"name": "web", "namespace": "default"},
                                         "spec": {}}})  # meanwhile, on the lab's maker
    version = build._claim(joined, parse_topology({"name": "two", "nodes": ["node3"], "pods": []}), store, None, others)
    assert store.read().objects["Node/node3"]["status"]["addresses"][0]["address"] == "172.18.0.4"
    assert version == store.version()

    rival = plan(parse_topology({"name": "two", "nodes": ["node4"], "pods": []}), None, store="etcd",
                 others=others, joined=True, store_endpoint="http://172.18.0.253:2379")  # read before node3 was written: .4 too
    with pytest.raises(Conflict, match=r"^another machine took a node name, IP or pod CIDR of lab two meanwhile; "
                                       r"run the command again$"):
        build._claim(rival, parse_topology({"name": "two", "nodes": ["node4"], "pods": []}), store, None, others)
    assert "Node/node4" not in store.read().objects


def test_a_machine_leaving_takes_its_nodes_pods_and_endpoints_out_of_the_store(tmp_path: Path) -> None:
    made = made_lab()
    store = stored(made, tmp_path)
    joined = plan(parse_topology({"name": "two", "nodes": ["node3"], "pods": []}), None, store="etcd",
                  others=others_in(store.read(), []), joined=True, store_endpoint="http://172.18.0.253:2379")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "default"},
               "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    store.write({"Node/node3": node_object(joined, "node3"), "Pod/default/b": far_pod("b", "node3", "10.244.3.2"),
                 "Service/default/web": service})
    view = store.read()
    store.write(controllers.all_endpoint_slices(view.of_kind("Service"), view.of_kind("Pod"), {}))

    def addresses() -> list[str]:
        return [a for s in store.read().of_kind("EndpointSlice") for e in s["endpoints"] for a in e["addresses"]]
    assert addresses() == ["10.244.3.2"]
    kubelet.forget_nodes(joined, store)
    objects = store.read().objects
    assert "Node/node3" not in objects and "Pod/default/b" not in objects and "Node/node1" in objects
    assert addresses() == []
