"""The workload's spec: which pods it serves, in which namespaces, on which ports.

The kubelet writes it (kproxy.lab.processes.ensure_workload); the workload
(kproxy.lab.workload) reads it at start and on SIGHUP:

    {"pods": [{"name": "web-1", "netns": "/var/run/netns/lab-web-1",
               "tcp": [8080], "udp": [8080]}, ...]}

"tcp" / "udp" default to [DEFAULT_PORT] when absent; [] means none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# What a pod's workload listens on when nothing declares a port: the spec's
# default, the kubelet's for a pod without ports, a topology pod's.
DEFAULT_PORT = 8080


@dataclass(frozen=True)
class WorkloadPod:
    """One pod the workload serves: its name, namespace path, and the ports it listens on."""

    name: str
    netns: str
    tcp: tuple[int, ...]
    udp: tuple[int, ...]


class SpecError(ValueError):
    pass


def _ports(entry: dict[str, Any], key: str, where: str) -> tuple[int, ...]:
    value = entry.get(key, [DEFAULT_PORT])
    if not isinstance(value, list):
        raise SpecError(f"{where}: {key!r} must be a list of ports")
    ports = []
    for port in value:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise SpecError(f"{where}: {key!r} has an invalid port {port!r}")
        if port not in ports:
            ports.append(port)
    return tuple(ports)


def parse_spec(data: Any) -> list[WorkloadPod]:
    if not isinstance(data, dict) or not isinstance(data.get("pods"), list):
        raise SpecError('the spec must be an object {"pods": [...]}')
    pods: list[WorkloadPod] = []
    seen: set[str] = set()
    for i, entry in enumerate(data["pods"]):
        where = f"pods[{i}]"
        if not isinstance(entry, dict):
            raise SpecError(f"{where}: must be an object")
        name, netns = entry.get("name"), entry.get("netns")
        if not isinstance(name, str) or not name or any(c.isspace() for c in name):
            raise SpecError(f"{where}: 'name' must be a non-empty string without spaces")
        if not isinstance(netns, str) or not netns:
            raise SpecError(f"{where} ({name}): 'netns' must be a path")
        if name in seen:
            raise SpecError(f"{where}: duplicate pod name {name!r}")
        seen.add(name)
        pods.append(WorkloadPod(name, netns, _ports(entry, "tcp", where), _ports(entry, "udp", where)))
    return pods


def load_spec(path: str) -> list[WorkloadPod]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise SpecError(f"cannot read spec {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise SpecError(f"spec {path} is not valid JSON: {exc}") from None
    return parse_spec(data)
