"""Bringing a lab up, reconciling it, and taking it down.

`up` is one reconcile: it records the plan in the state first, then makes
every piece exist (namespaces, underlay links, pods wired by our CNI, overlay
entries, workloads), creating what is missing and removing what the topology
no longer has. Every step checks before it acts, so `up` after a crash or a
half-finished `up` completes the lab instead of failing on leftovers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from cni.bridge import Bridge
from cni.errors import CNIError
from cni.netns import iproute_in, write_sysctl
from cni.spec import parse_request
from kproxy.errors import KproxyError
from kproxy.lab import overlay, processes
from kproxy.lab.state import (
    LabState,
    NodeState,
    PodState,
    lab_dir,
    lab_namespaces,
    load_state,
    ns_name,
    ns_path,
    save_state,
)
from kproxy.lab.topology import Topology, node_subnet_count, parse_topology, place_pods, to_raw

UNDERLAY = "underlay"
EXTERNAL = "external"
UNDERLAY_BRIDGE = "br0"
NODE_UPLINK = "eth0"
CNI_NETWORK = "kproxy"
POD_IFNAME = "eth0"


def underlay_port(member: str) -> str:
    return f"to-{member}"[:15]


def cni_config(state: LabState, node: str) -> dict[str, Any]:
    """The node's CNI network configuration (also written to the lab dir for people to read)."""
    return {
        "cniVersion": "1.1.0",
        "name": CNI_NETWORK,
        "type": "kproxy-bridge",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "hairpinMode": True,  # a pod reaching itself through its Service
        "mtu": overlay.pod_mtu(state.overlay),
        "ipam": {
            "type": "kproxy-host-local",
            "ranges": [[{"subnet": state.nodes[node].pod_cidr}]],
            "dataDir": str(lab_dir(state.name) / "ipam" / node),
        },
    }


def container_id(lab: str, pod: str) -> str:
    return f"{lab}-{pod}"


def _random_mac() -> str:
    # Locally administered, unicast: like flannel's VTEP MAC.
    octets = [0x0A] + [random.randint(0, 255) for _ in range(5)]
    return ":".join(f"{o:02x}" for o in octets)


# Planning (pure) -----------------------------------------------------------

def plan(topology: Topology, previous: LabState | None) -> LabState:
    """The state this topology asks for, keeping every assignment previous made."""
    if previous is not None:
        for what, old, new in (("overlay", previous.overlay, topology.overlay),
                               ("podCIDR", previous.pod_cidr, str(topology.pod_cidr)),
                               ("nodeCIDR", previous.node_cidr, str(topology.node_cidr))):
            if old != new:
                raise KproxyError(f"lab {topology.name} runs with {what} {old}, not {new}; "
                                  f"take it down first ('kproxy lab down {topology.name}')")
    hosts = list(topology.node_cidr.hosts())
    state = LabState(
        name=topology.name,
        overlay=topology.overlay,
        pod_cidr=str(topology.pod_cidr),
        node_cidr=str(topology.node_cidr),
        external_ip=str(hosts[-1]),
        generation=previous.generation if previous else 0,
    )
    old_nodes = previous.nodes if previous else {}
    used_ips = {n.ip for name, n in old_nodes.items() if name in {x.name for x in topology.nodes}}
    used_cidrs = {n.pod_cidr for name, n in old_nodes.items() if name in {x.name for x in topology.nodes}}
    free_ips = (str(ip) for ip in hosts[1:-1] if str(ip) not in used_ips)  # .1 stays free, like a router's
    subnets = list(topology.pod_cidr.subnets(new_prefix=24))[1:1 + node_subnet_count(topology.pod_cidr)]
    free_cidrs = (str(net) for net in subnets if str(net) not in used_cidrs)
    for node in topology.nodes:
        old = old_nodes.get(node.name)
        if old is not None:
            state.nodes[node.name] = NodeState(old.ip, old.pod_cidr, old.vtep_mac, dict(node.labels))
        else:
            state.nodes[node.name] = NodeState(next(free_ips), next(free_cidrs), _random_mac(), dict(node.labels))
    old_pods = previous.pods if previous else {}
    placement = place_pods(topology, {name: p.node for name, p in old_pods.items()})
    for pod in topology.pods:
        old_pod = old_pods.get(pod.name)
        ip = old_pod.ip if old_pod and old_pod.node == placement[pod.name] else ""
        state.pods[pod.name] = PodState(placement[pod.name], dict(pod.labels), list(pod.ports), ip)
    state.topology = to_raw(topology)
    return state


# Kernel work ---------------------------------------------------------------

def _ip_batch(commands: list[str]) -> None:
    if not commands:
        return
    done = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise KproxyError(f"ip failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'unknown error'}")


def _ensure_namespaces(lab: str, members: list[str]) -> None:
    have = set(lab_namespaces(lab))
    missing = [ns_name(lab, m) for m in members if ns_name(lab, m) not in have]
    _ip_batch([f"netns add {name}" for name in missing])
    for member in members:
        if ns_name(lab, member) in missing:
            with iproute_in(ns_path(lab, member)) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _delete_namespaces(names: list[str]) -> None:
    _ip_batch([f"netns delete {name}" for name in names])


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def _ensure_uplink(lab: str, member: str, address: str, prefixlen: int) -> None:
    """member's eth0 on the underlay bridge, with its address; fixed up if anything is off."""
    member_ns = ns_path(lab, member)
    port = underlay_port(member)
    with iproute_in(ns_path(lab, UNDERLAY)) as under, iproute_in(member_ns) as inside:
        bridge = _index(under, UNDERLAY_BRIDGE)
        if bridge is None:
            under.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge")
            bridge = _index(under, UNDERLAY_BRIDGE)
        under.link("set", index=bridge, state="up")
        uplink, peer = _index(inside, NODE_UPLINK), _index(under, port)
        if uplink is None or peer is None:
            for ipr, index in ((inside, uplink), (under, peer)):
                if index is not None:
                    ipr.link("del", index=index)
            fd = os.open(member_ns, os.O_RDONLY)
            try:
                under.link("add", ifname=port, kind="veth", peer={"ifname": NODE_UPLINK, "net_ns_fd": fd})
            finally:
                os.close(fd)
            uplink, peer = _index(inside, NODE_UPLINK), _index(under, port)
        under.link("set", index=peer, master=bridge, state="up")
        have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in inside.get_addr(index=uplink, family=2)}
        for addr, plen in have - {(address, prefixlen)}:
            inside.addr("del", index=uplink, address=addr, prefixlen=plen)
        if (address, prefixlen) not in have:
            inside.addr("add", index=uplink, address=address, prefixlen=prefixlen)
        inside.link("set", index=uplink, state="up")


def _pod_address(lab: str, pod: str) -> str | None:
    """The IPv4 address on the pod's eth0, if it is wired."""
    try:
        with iproute_in(ns_path(lab, pod)) as ipr:
            index = _index(ipr, POD_IFNAME)
            if index is None:
                return None
            addrs = [a.get("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)]
            return addrs[0] if addrs else None
    except CNIError:
        return None


def _cni(state: LabState, node: str, pod: str, command: str) -> dict[str, Any] | None:
    """Run our bridge plugin in-process, as the runtime on that node would exec it."""
    conf = json.dumps(cni_config(state, node)).encode()
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id(state.name, pod),
           "CNI_NETNS": ns_path(state.name, pod), "CNI_IFNAME": POD_IFNAME, "CNI_PATH": "/nonexistent"}
    plugin = Bridge(host_ns=ns_path(state.name, node))
    req = parse_request(env, conf)
    try:
        if command == "ADD":
            return plugin.add(req)
        plugin.delete(req)
        return None
    except CNIError as err:
        raise KproxyError(f"CNI {command} for pod {pod} on {node}: {err}") from None


def _wire_pod(state: LabState, pod: str) -> bool:
    """Give the pod its interface and address unless it has them; True if it was wired now."""
    spec = state.pods[pod]
    node_cidr = ipaddress.ip_network(state.nodes[spec.node].pod_cidr)
    current = _pod_address(state.name, pod)
    if current is not None and ipaddress.ip_address(current) in node_cidr:
        spec.ip = current
        return False
    _cni(state, spec.node, pod, "DEL")  # clears a half-made attachment and its address
    result = _cni(state, spec.node, pod, "ADD") or {}
    spec.ip = str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)
    return True


def _node_setup(state: LabState, node: str) -> None:
    node_ns = ns_path(state.name, node)
    write_sysctl(node_ns, "net/ipv4/ip_forward", "1")
    cni_dir = lab_dir(state.name) / "cni"
    cni_dir.mkdir(parents=True, exist_ok=True)
    (cni_dir / f"{node}.conf").write_text(json.dumps(cni_config(state, node), indent=2) + "\n")


def _peers(state: LabState, node: str) -> list[overlay.Peer]:
    return [overlay.Peer(name, n.ip, n.pod_cidr, n.vtep_mac) for name, n in sorted(state.nodes.items()) if name != node]


def _workload_pods(state: LabState, node: str) -> list[dict[str, Any]]:
    return [{"name": name, "netns": ns_path(state.name, name), "tcp": p.ports, "udp": p.ports}
            for name, p in sorted(state.pods.items()) if p.node == node]


@dataclass
class UpReport:
    created_pods: int
    removed_pods: int
    removed_nodes: int


def up(topology: Topology) -> tuple[LabState, UpReport]:
    previous = load_state(topology.name)
    if previous is None and lab_namespaces(topology.name):
        teardown(topology.name)  # leftovers of a crash before any state was written
    state = plan(topology, previous)
    directory = lab_dir(state.name)
    directory.mkdir(parents=True, exist_ok=True)
    save_state(state)  # the intent first: a crash from here on is reconciled by the next up

    old_pods = previous.pods if previous else {}
    gone_pods = [p for p, spec in old_pods.items() if p not in state.pods or spec.node != state.pods[p].node]
    gone_nodes = [n for n in (previous.nodes if previous else {}) if n not in state.nodes]
    for pod in gone_pods:
        node = old_pods[pod].node
        if previous is not None and node in previous.nodes:
            try:
                _cni(previous, node, pod, "DEL")
            except KproxyError:
                pass  # the pod's namespace goes next anyway
    _delete_namespaces([ns_name(state.name, p) for p in gone_pods if ns_name(state.name, p) in lab_namespaces(state.name)])
    for node in gone_nodes:
        processes.stop_workload(directory, node)
        shutil.rmtree(directory / "ipam" / node, ignore_errors=True)
        (directory / "cni" / f"{node}.conf").unlink(missing_ok=True)
    _delete_namespaces([ns_name(state.name, n) for n in gone_nodes if ns_name(state.name, n) in lab_namespaces(state.name)])

    members = [UNDERLAY, EXTERNAL, *state.nodes, *state.pods]
    _ensure_namespaces(state.name, members)
    prefix = ipaddress.ip_network(state.node_cidr).prefixlen
    for node, spec in state.nodes.items():
        _ensure_uplink(state.name, node, spec.ip, prefix)
        _node_setup(state, node)
    _ensure_uplink(state.name, EXTERNAL, state.external_ip, prefix)
    rewired: set[str] = set()
    wired_now = 0
    for pod, spec in state.pods.items():
        if _wire_pod(state, pod):
            rewired.add(spec.node)
            wired_now += 1
    for node, spec in state.nodes.items():
        with iproute_in(ns_path(state.name, node)) as ipr:
            overlay.apply(ipr, state.overlay, state.pod_cidr, spec.ip, spec.pod_cidr, spec.vtep_mac, _peers(state, node))
    # External clients reach NodePorts on node IPs directly; a route to the pod
    # network is not theirs to have, exactly like a client outside a cluster.
    save_state(state)
    for node in state.nodes:
        processes.ensure_workload(directory, node, ns_path(state.name, node), _workload_pods(state, node),
                                  reload=node in rewired)
    return state, UpReport(wired_now, len(gone_pods), len(gone_nodes))


def teardown(name: str) -> list[str]:
    """Remove every trace of the lab: processes, namespaces, state. Returns the namespaces removed."""
    directory = lab_dir(name)
    for node in processes.workload_nodes(directory):
        processes.stop_workload(directory, node)
    names = lab_namespaces(name)
    _delete_namespaces(names)
    shutil.rmtree(directory, ignore_errors=True)
    return names


def reload_topology(state: LabState) -> dict[str, Any]:
    return json.loads(json.dumps(state.topology))


def add_node(lab: str, node: str, labels: dict[str, str]) -> tuple[LabState, UpReport]:
    state = _require(lab)
    raw = reload_topology(state)
    raw["nodes"].append({"name": node, "labels": labels})
    return up(parse_topology(raw))


def remove_node(lab: str, node: str) -> tuple[LabState, UpReport]:
    state = _require(lab)
    if node not in state.nodes:
        raise KproxyError(f"lab {lab} has no node {node!r}")
    if len(state.nodes) == 1:
        raise KproxyError(f"{node} is the last node of lab {lab}; use 'kproxy lab down {lab}'")
    raw = reload_topology(state)
    raw["nodes"] = [n for n in raw["nodes"] if n["name"] != node]
    # Pods pinned to the node go with it; the others are placed again.
    raw["pods"] = [p for p in raw["pods"] if p.get("nodeName") != node]
    return up(parse_topology(raw))


def _require(lab: str) -> LabState:
    state = load_state(lab)
    if state is None:
        raise KproxyError(f"lab {lab} is not running (no state in {lab_dir(lab)})")
    return state


def status(lab: str) -> dict[str, Any]:
    """What a person wants to see of a running lab, checked against the kernel."""
    state = _require(lab)
    have = set(lab_namespaces(lab))
    directory = lab_dir(lab)
    nodes = []
    for name, spec in sorted(state.nodes.items()):
        nodes.append({"name": name, "ip": spec.ip, "podCIDR": spec.pod_cidr, "labels": spec.labels,
                      "namespace": ns_name(lab, name), "present": ns_name(lab, name) in have,
                      "workloadPid": processes.running_pid(directory, name)})
    pods = []
    for name, spec in sorted(state.pods.items()):
        pods.append({"name": name, "node": spec.node, "ip": spec.ip, "labels": spec.labels, "ports": spec.ports,
                     "namespace": ns_name(lab, name), "present": ns_name(lab, name) in have,
                     "wired": _pod_address(lab, name) == spec.ip})
    return {"name": lab, "overlay": state.overlay, "podCIDR": state.pod_cidr, "nodeCIDR": state.node_cidr,
            "external": {"ip": state.external_ip, "namespace": ns_name(lab, EXTERNAL)},
            "nodes": nodes, "pods": pods}
