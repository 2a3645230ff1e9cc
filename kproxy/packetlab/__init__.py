"""Packet labs: one exercise per file in kproxy/packetlab/labs/, one page per lab in docs/packet-labs/.

A lab module defines LAB = PacketLab(...): what to bring up, the task it
prints, and its experiment, which crafts and sniffs packets with scapy inside
the lab's namespaces. The experiment narrates what it sees (the solution, shown
with --solve) and states claims about what the kernel did; the lab passes when
every claim holds.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from kproxy.errors import KproxyError

if TYPE_CHECKING:
    from kproxy.packetlab.session import Session

# The lab every packet lab starts from unless it says otherwise: two nodes, the Service's pod on
# the other node than the client, so that every flow crosses the overlay.
SMALL_TOPOLOGY: dict[str, Any] = {
    "nodes": [{"name": "node1", "labels": {"zone": "a"}}, {"name": "node2", "labels": {"zone": "b"}}],
    "pods": [
        {"name": "client", "labels": {"app": "client"}, "nodeName": "node1"},
        {"name": "web-1", "labels": {"app": "web"}, "nodeName": "node2"},
    ],
}

# The Service most labs apply: web's pods behind a ClusterIP, port 80 to the workload's 8080.
WEB_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
"""


def web_node_port(node_port: int) -> str:
    """WEB_SERVICE as a NodePort Service on node_port (each lab its own, so none collide in a user's lab)."""
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, nodePort: {node_port}}}
"""


@dataclass(frozen=True)
class PacketLab:
    number: int
    title: str
    task: str  # what to do and where to look, printed by `packet-lab run`
    experiment: Callable[["Session"], None]
    manifests: str = ""  # Kubernetes YAML applied before the task
    topology: dict[str, Any] = field(default_factory=lambda: SMALL_TOPOLOGY)
    overlays: tuple[str, ...] = ("vxlan", "host-gw", "udp")  # the first is the default
    modes: tuple[str, ...] = ("iptables", "nftables", "ipvs", "userspace")  # the first is the default
    mode_options: tuple[str, ...] = ()  # KEY=VALUE given to `lab up --mode-opt` for the lab it brings up
    dns: bool = False  # the lab it brings up runs cluster DNS
    name: str = ""  # set by the registry: the module's name with "-" for "_"


def all_labs() -> list[PacketLab]:
    """Every lab in kproxy/packetlab/labs/, by number."""
    from kproxy.packetlab import labs

    found = []
    for module in pkgutil.iter_modules(labs.__path__):
        lab = importlib.import_module(f"{labs.__name__}.{module.name}").LAB
        found.append(PacketLab(**{**lab.__dict__, "name": module.name.replace("_", "-")}))
    return sorted(found, key=lambda lab: lab.number)


def find_lab(name: str) -> PacketLab:
    labs = all_labs()
    for lab in labs:
        if name in (lab.name, str(lab.number)):
            return lab
    raise KproxyError(f"no packet lab {name!r} (labs: {', '.join(lab.name for lab in labs)}; "
                      "see 'kproxy packet-lab list')")
