"""Running the IPAM plugin a network configuration names.

The spec has the main plugin exec the IPAM plugin from CNI_PATH with the same
environment and configuration. Our own host-local runs in-process (same code
as its executable), which saves an interpreter start per call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from typing import Any, Callable

from cni.errors import DELEGATE_FAILED, INVALID_CONFIG, CNIError
from cni.ipam import HostLocal
from cni.spec import Request, validate_id

IN_PROCESS: dict[str, Callable[[], Any]] = {"kproxy-host-local": HostLocal}
_METHODS = {"ADD": "add", "DEL": "delete", "CHECK": "check", "GC": "gc", "STATUS": "status"}


def ipam_type(req: Request) -> str:
    ipam = req.config.get("ipam")
    if not isinstance(ipam, dict) or not isinstance(ipam.get("type"), str):
        raise CNIError(INVALID_CONFIG, "network configuration has no ipam.type")
    return validate_id(ipam["type"], "ipam.type", INVALID_CONFIG)


def find_plugin(name: str, path: list[str]) -> str:
    for directory in path:
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise CNIError(DELEGATE_FAILED, f"failed to find plugin {name!r} in path {path}")


def run_ipam(req: Request, command: str) -> dict[str, Any] | None:
    """Run command on the IPAM plugin; the ADD result, or None."""
    name = ipam_type(req)
    if name in IN_PROCESS:
        plugin = IN_PROCESS[name]()
        return getattr(plugin, _METHODS[command])(dataclasses.replace(req, command=command))  # type: ignore[no-any-return]
    return exec_plugin(name, command, req)


def exec_plugin(name: str, command: str, req: Request) -> dict[str, Any] | None:
    binary = find_plugin(name, req.path)
    env = dict(os.environ)
    env.update(
        CNI_COMMAND=command,
        CNI_CONTAINERID=req.container_id,
        CNI_NETNS=req.netns,
        CNI_IFNAME=req.ifname,
        CNI_ARGS=";".join(f"{k}={v}" for k, v in req.args.items()),
        CNI_PATH=":".join(req.path),
    )
    stdin = req.stdin or json.dumps(req.config).encode()
    done = subprocess.run([binary], input=stdin, env=env, capture_output=True)
    out: dict[str, Any] = {}
    if done.stdout.strip():
        try:
            out = json.loads(done.stdout)
        except ValueError:
            raise CNIError(DELEGATE_FAILED, f"{name} {command} printed something that is not JSON",
                           done.stdout.decode(errors="replace")[:200]) from None
    if done.returncode != 0:
        raise CNIError(int(out.get("code", DELEGATE_FAILED)), f"{name}: {out.get('msg', 'failed')}",
                       str(out.get("details") or done.stderr.decode(errors="replace").strip()))
    return out if command == "ADD" else None
