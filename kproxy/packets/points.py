"""Where in a lab one can capture: a pod, a node (or one of its interfaces), external, the underlay.

    web-1              the pod's eth0
    node1              the node's eth0 (its leg on the underlay)
    node1:cni0         any interface of the node: cni0, flannel.1, flannel0, a pod's veth
    external           the outside client's eth0
    underlay           br0, the "physical network" every node's eth0 is on
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from kproxy.errors import KproxyError
from kproxy.lab.state import lab_namespaces, ns_name, ns_path

DEFAULT_INTERFACE = {"underlay": "br0"}  # every other member's: eth0


@dataclass(frozen=True)
class Point:
    member: str  # the lab member (namespace) it is in
    iface: str
    netns_path: str

    def __str__(self) -> str:
        return f"{self.member}:{self.iface}"


def interfaces(lab: str, member: str) -> list[str]:
    """The interface names in a lab member's namespace, lo excluded."""
    done = subprocess.run(["ip", "-n", ns_name(lab, member), "-j", "link", "show"], capture_output=True, text=True)
    if done.returncode != 0:
        return []
    return [link["ifname"] for link in json.loads(done.stdout or "[]") if link["ifname"] != "lo"]


def resolve_point(lab: str, text: str) -> Point:
    """The namespace and interface of a capture point in lab; an error naming what exists otherwise."""
    member, _, iface = text.partition(":")
    if ns_name(lab, member) not in lab_namespaces(lab):
        raise KproxyError(f"lab {lab} has no pod, node or namespace named {member!r}: a point is POD, NODE[:IFACE], "
                          "external or underlay (see 'kproxy lab status')")
    iface = iface or DEFAULT_INTERFACE.get(member, "eth0")
    present = interfaces(lab, member)
    if iface not in present:
        raise KproxyError(f"{member} has no interface {iface!r} (it has: {', '.join(present) or 'none'})")
    return Point(member, iface, ns_path(lab, member))
