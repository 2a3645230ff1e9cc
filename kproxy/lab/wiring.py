"""Wiring primitives of a lab: namespaces, the underlay, pods through our CNI.

Each function checks before it acts, so calling it again completes or fixes
what an interrupted run left, instead of failing on leftovers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from cni.bridge import Bridge
from cni.errors import CNIError
from cni.netns import iproute_in
from cni.spec import parse_request
from kproxy.errors import KproxyError
from kproxy.lab import overlay
from kproxy.lab.state import LabState, lab_dir, lab_namespaces, ns_name, ns_path

UNDERLAY = "underlay"
EXTERNAL = "external"
CONTROL_PLANE = "control-plane"  # with the etcd store: etcd's member on the underlay, like a control-plane node
UNDERLAY_BRIDGE = "br0"
NODE_UPLINK = "eth0"
CNI_NETWORK = "kproxy"
POD_IFNAME = "eth0"
ETC_NETNS = Path("/etc/netns")  # iproute2's per-namespace /etc overrides


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


def random_mac() -> str:
    # Locally administered, unicast: like flannel's VTEP MAC.
    octets = [0x0A] + [random.randint(0, 255) for _ in range(5)]
    return ":".join(f"{o:02x}" for o in octets)


# Kernel work ---------------------------------------------------------------

def ip_batch(commands: list[str]) -> None:
    if not commands:
        return
    done = subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(commands) + "\n",
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise KproxyError(f"ip failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'unknown error'}")


def ensure_namespaces(lab: str, members: list[str]) -> None:
    have = set(lab_namespaces(lab))
    missing = [ns_name(lab, m) for m in members if ns_name(lab, m) not in have]
    ip_batch([f"netns add {name}" for name in missing])
    for member in members:
        if ns_name(lab, member) in missing:
            with iproute_in(ns_path(lab, member)) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def delete_namespaces(names: list[str]) -> None:
    ip_batch([f"netns delete {name}" for name in names])
    for name in names:
        remove_resolv_conf(name)


def write_resolv_conf(name: str, text: str) -> None:
    """The namespace's own /etc/resolv.conf: `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc."""
    directory = ETC_NETNS / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "resolv.conf"
    if not path.exists() or path.read_text() != text:
        tmp = directory / ".resolv.conf.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)


def remove_resolv_conf(name: str) -> None:
    shutil.rmtree(ETC_NETNS / name, ignore_errors=True)


def _index(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def ensure_bridge(lab: str) -> int:
    """The underlay's bridge, up; its index. With a MAC of its own: a bridge without one takes its
    first port's, and the lab NIC, found by its MAC, must be the only link that has it."""
    with iproute_in(ns_path(lab, UNDERLAY)) as under:
        bridge = _index(under, UNDERLAY_BRIDGE)
        if bridge is None:
            under.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge", address=random_mac())
            bridge = _index(under, UNDERLAY_BRIDGE)
        under.link("set", index=bridge, state="up")
        return bridge


def ensure_uplink(lab: str, member: str, address: str, prefixlen: int) -> None:
    """member's eth0 on the underlay bridge, with its address; fixed up if anything is off."""
    member_ns = ns_path(lab, member)
    port = underlay_port(member)
    bridge = ensure_bridge(lab)
    with iproute_in(ns_path(lab, UNDERLAY)) as under, iproute_in(member_ns) as inside:
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


def ensure_default_route(lab: str, member: str) -> None:
    """A default route out of eth0, as real nodes have one: without it a node's own
    connections to a ClusterIP fail with "Network is unreachable" before netfilter
    can DNAT them. Nothing routes beyond the underlay, so nothing leaves the lab."""
    with iproute_in(ns_path(lab, member)) as ipr:
        ipr.route("replace", dst="0.0.0.0/0", oif=_index(ipr, NODE_UPLINK))


def pod_address(lab: str, pod: str) -> str | None:
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


def run_cni(state: LabState, node: str, pod: str, command: str) -> dict[str, Any] | None:
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


def wire_pod(state: LabState, pod: str) -> bool:
    """Give the pod its interface and address unless it has them; True if it was wired now."""
    spec = state.pods[pod]
    node_cidr = ipaddress.ip_network(state.nodes[spec.node].pod_cidr)
    current = pod_address(state.name, pod)
    if current is not None and ipaddress.ip_address(current) in node_cidr:
        spec.ip = current
        return False
    run_cni(state, spec.node, pod, "DEL")  # clears a half-made attachment and its address
    result = run_cni(state, spec.node, pod, "ADD") or {}
    spec.ip = str(ipaddress.ip_interface(result["ips"][0]["address"]).ip)
    return True
