"""Where a lab keeps what it built: /run/kproxy/<lab>/state.json, written atomically.

The state records every assignment that must survive a re-run of `up`
(node IPs, pod CIDRs, VTEP MACs, pod placement), so reconciling never renumbers
a running lab. Namespace names are derived from the lab name, so `down` finds
everything even when the state file is lost.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kproxy.errors import KproxyError
from kproxy.lab.topology import LAB_NAME_RE, lab_name
from kproxy.proxy import DEFAULT_MODE

NETNS_DIR = Path("/var/run/netns")


def state_root() -> Path:
    return Path(os.environ.get("KPROXY_STATE_DIR", "/run/kproxy"))


def ns_prefix(lab: str) -> str:
    # "_" never appears in lab, node or pod names, so prefixes of two labs never clash.
    return f"kp_{lab}_"


def ns_name(lab: str, member: str) -> str:
    return f"{ns_prefix(lab)}{member}"


def ns_path(lab: str, member: str) -> str:
    return str(NETNS_DIR / ns_name(lab, member))


@dataclass
class NodeState:
    ip: str
    pod_cidr: str
    vtep_mac: str
    labels: dict[str, str] = field(default_factory=dict)
    host: str = ""  # the machine the node's namespace is on ("": a lab from before hosts were recorded)


@dataclass
class PodState:
    """A pod the kubelet wired: its namespace is kp_<lab>_<member_name(namespace, name)>."""

    name: str
    node: str
    namespace: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    ip: str = ""
    dns_server: bool = False  # a cluster DNS pod: kproxy.dns.server runs for it instead of the workload


def member_name(namespace: str, name: str) -> str:
    """A pod's member name in the lab: its name, plus ".<namespace>" outside "default"."""
    return name if namespace == "default" else f"{name}.{namespace}"


@dataclass
class LabState:
    name: str
    overlay: str
    pod_cidr: str
    node_cidr: str
    external_ip: str
    mode: str = DEFAULT_MODE
    nodes: dict[str, NodeState] = field(default_factory=dict)
    pods: dict[str, PodState] = field(default_factory=dict)
    topology: dict[str, Any] = field(default_factory=dict)  # topology.to_raw() of what was applied
    generation: int = 0
    mode_options: dict[str, str] = field(default_factory=dict)  # the mode's, as given (Mode.options_of fills the rest)
    dns: bool = False  # cluster DNS (kproxy.dns.addon) runs in the lab
    load_balancer_cidr: str = ""  # the pool LoadBalancer Services get addresses from; "": none (an older lab)
    store: str = "file"  # the lab's store: "file" (embedded) or "etcd" (etcd in the control-plane member)
    control_plane_ip: str = ""  # the control-plane member's underlay address ("": the lab has none)
    nic: str = ""  # the MAC of the NIC that is a port of the underlay's bridge (lab up --nic; "": none)
    nic_name: str = ""  # that NIC's name in the root namespace before up moved it, restored by down
    # etcd's http://IP:PORT on the underlay when another machine runs it (lab join, lab up --store
    # etcd://IP:PORT); "": the file store, or etcd in this lab's control-plane member
    store_endpoint: str = ""
    joined: bool = False  # this machine's nodes joined a lab another machine made (lab join)

    @property
    def runs_etcd(self) -> bool:
        """etcd runs in this lab's control-plane member (lab up --store etcd)."""
        return self.store == "etcd" and not self.store_endpoint

    @property
    def load_balancer_pool(self) -> ipaddress.IPv4Network | None:
        return ipaddress.IPv4Network(self.load_balancer_cidr) if self.load_balancer_cidr else None

    @property
    def dir(self) -> Path:
        return lab_dir(self.name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LabState:
        nodes = {k: NodeState(**v) for k, v in raw.pop("nodes", {}).items()}
        pods = {k: PodState(**v) for k, v in raw.pop("pods", {}).items()}
        scheduler = raw.pop("ipvs_scheduler", "")  # a lab brought up before mode options existed
        if scheduler and "mode_options" not in raw:
            raw["mode_options"] = {"scheduler": scheduler}
        return cls(**raw, nodes=nodes, pods=pods)


def lab_dir(name: str) -> Path:
    return state_root() / name


def state_file(name: str) -> Path:
    return lab_dir(name) / "state.json"


def load_state(name: str) -> LabState | None:
    try:
        return LabState.from_json(json.loads(state_file(name).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise KproxyError(f"the state of lab {name} is damaged ({exc}); run 'kproxy lab down {name}'") from None


def save_state(state: LabState) -> None:
    state.generation += 1
    path = state_file(state.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(state.to_json(), indent=2, sort_keys=True))
    os.replace(tmp, path)


def existing_labs() -> list[str]:
    """Labs with anything on this machine: a state directory (even without state) or namespaces."""
    names: set[str] = set()
    if state_root().is_dir():
        names.update(p.name for p in state_root().iterdir() if p.is_dir() and LAB_NAME_RE.match(p.name))
    if NETNS_DIR.is_dir():
        for entry in NETNS_DIR.iterdir():
            parts = entry.name.split("_")
            if len(parts) == 3 and parts[0] == "kp":
                names.add(parts[1])
    return sorted(names)


def lab_exists(name: str) -> bool:
    return lab_dir(name).is_dir() or bool(lab_namespaces(name))


def lab_namespaces(name: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(ns_prefix(name)))


def require_existing(name: str) -> str:
    """name, if anything of that lab is on this machine; else an error saying which labs are."""
    if not lab_exists(name):
        labs = existing_labs()
        hint = f"labs here: {', '.join(labs)}" if labs else "no lab is running; start one with 'kproxy lab up'"
        raise KproxyError(f"lab {name} does not exist ({hint})")
    return name


def choose_lab(explicit: str | None) -> str:
    """--lab, else $KPROXY_LAB, else the only lab there is; a lab that exists."""
    name = explicit or os.environ.get("KPROXY_LAB")
    if name:
        return require_existing(lab_name(name))
    labs = existing_labs()
    if len(labs) == 1:
        return labs[0]
    if not labs:
        raise KproxyError("no lab is running; start one with 'kproxy lab up'")
    raise KproxyError(f"several labs are running ({', '.join(labs)}); choose one with --lab NAME or KPROXY_LAB")
