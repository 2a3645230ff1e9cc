"""Drive CNI plugins exactly as a container runtime does: env + stdin, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
OUR_BRIDGE = str(VENV_BIN / "kproxy-bridge")
OUR_HOST_LOCAL = str(VENV_BIN / "kproxy-host-local")
REFERENCE_DIR = "/usr/lib/cni"
# Our plugins and the reference ones, found by name like a runtime finds them.
CNI_PATH = f"{VENV_BIN}:{REFERENCE_DIR}"
# Every exec gets these (extra_env overrides). By default our plugins work
# in-process: a server the first exec started would outlive the test. Tests
# that want the server point KPROXY_CNI_SOCKET at a socket of their own and
# stop what it started (tests/test_cni_server.py).
PLUGIN_ENV: dict[str, str] = {"KPROXY_CNI_SOCKET": ""}


@dataclass
class Outcome:
    status: int
    out: dict[str, Any] | None
    stderr: str

    @property
    def code(self) -> int | None:
        return None if self.out is None else self.out.get("code")


def run_plugin(
    binary: str,
    command: str,
    conf: dict[str, Any] | bytes,
    *,
    container_id: str | None = None,
    netns: str | None = None,
    ifname: str | None = "eth0",
    host_ns: str | None = None,
    cni_path: str = CNI_PATH,
    extra_env: dict[str, str] | None = None,
) -> Outcome:
    """Exec binary with CNI_COMMAND=command inside host_ns (a netns path)."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "CNI_COMMAND": command}
    for key, value in (("CNI_CONTAINERID", container_id), ("CNI_NETNS", netns), ("CNI_IFNAME", ifname)):
        if value is not None:
            env[key] = value
    if cni_path:
        env["CNI_PATH"] = cni_path
    env.update(PLUGIN_ENV)
    env.update(extra_env or {})
    stdin = conf if isinstance(conf, bytes) else json.dumps(conf).encode()
    argv = ([ "nsenter", f"--net={host_ns}", "--"] if host_ns else []) + [binary]
    done = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=60)
    text = done.stdout.decode().strip()
    return Outcome(done.returncode, json.loads(text) if text else None, done.stderr.decode())


def in_ns(path: str, *argv: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run argv inside the namespace at path (input: its stdin)."""
    return subprocess.run(["nsenter", f"--net={path}", "--", *argv], capture_output=True, text=True, check=check,
                          input=input)
