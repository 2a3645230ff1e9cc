"""The lab's parameters in its store, for the machines that join it: ConfigMap kube-system/kproxy-lab.

kubeadm keeps a cluster's own configuration the same way (ConfigMap kube-system/kubeadm-config),
and `kubeadm join` reads it from the API server instead of asking the person joining. A lab
with the etcd store publishes its overlay, its networks, its proxy mode and whether it runs
cluster DNS; `kproxy lab join` reads them, so every machine's nodes are built alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kproxy.errors import KproxyError
from kproxy.lab.state import LabState
from kproxy.store import Obj, View

KEY = "ConfigMap/kube-system/kproxy-lab"
# The topology fields a joining machine takes from here, never from its own file.
LAB_WIDE = ("overlay", "podCIDR", "nodeCIDR", "loadBalancerCIDR")


@dataclass(frozen=True)
class LabConfig:
    overlay: str
    pod_cidr: str
    node_cidr: str
    load_balancer_cidr: str
    external_ip: str
    control_plane_ip: str
    mode: str
    mode_options: dict[str, str]
    dns: bool

    def topology_fields(self) -> dict[str, str]:
        return dict(zip(LAB_WIDE, (self.overlay, self.pod_cidr, self.node_cidr, self.load_balancer_cidr)))


def config_map(state: LabState) -> Obj:
    """The ConfigMap of a lab this machine made (data: strings only, as the schema has it)."""
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "kproxy-lab", "namespace": "kube-system", "labels": {"app.kubernetes.io/name": "kproxy"}},
            "data": {"overlay": state.overlay, "podCIDR": state.pod_cidr, "nodeCIDR": state.node_cidr,
                     "loadBalancerCIDR": state.load_balancer_cidr, "externalIP": state.external_ip,
                     "controlPlaneIP": state.control_plane_ip, "mode": state.mode,
                     "modeOptions": json.dumps(state.mode_options, sort_keys=True),
                     "dns": "true" if state.dns else "false"}}


def lab_config(lab: str, view: View) -> LabConfig:
    """The parameters a lab published, or why they cannot be had."""
    obj = view.objects.get(KEY)
    if obj is None:
        raise KproxyError(f"the store has no lab {lab} (no {KEY}): is it up, with --store etcd, at that endpoint?")
    data: dict[str, Any] = obj.get("data") or {}
    try:
        return LabConfig(data["overlay"], data["podCIDR"], data["nodeCIDR"], data["loadBalancerCIDR"],
                         data["externalIP"], data["controlPlaneIP"], data["mode"], json.loads(data["modeOptions"]),
                         data["dns"] == "true")
    except (KeyError, ValueError) as exc:
        raise KproxyError(f"lab {lab}'s {KEY} is incomplete or damaged ({exc!r})") from None
