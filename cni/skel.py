"""Plugin skeleton: turns one exec (env + stdin) into one call on a plugin.

Like libcni's skel: the runtime sets CNI_* variables and writes the network
configuration on stdin; the plugin writes a result or an error as JSON on
stdout and exits non-zero on error.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Protocol

from cni.errors import INVALID_ENV, CNIError
from cni.spec import LATEST_VERSION, SUPPORTED_VERSIONS, Request, parse_request, version_result

# Go's libcni reports untyped errors with this code; we do the same for bugs.
INTERNAL_ERROR = 999


class Plugin(Protocol):
    def add(self, req: Request) -> dict[str, Any]: ...
    def delete(self, req: Request) -> None: ...
    def check(self, req: Request) -> None: ...
    def gc(self, req: Request) -> None: ...
    def status(self, req: Request) -> None: ...


def dispatch(plugin: Plugin, env: Mapping[str, str], stdin: bytes) -> tuple[dict[str, Any] | None, int]:
    """Run one command; returns (JSON to print or None, exit status)."""
    version = LATEST_VERSION
    try:
        req = parse_request(env, stdin)
        if req.command == "VERSION":
            return version_result(req.config), 0
        version = req.version
        if req.command == "ADD":
            return plugin.add(req), 0
        {"DEL": plugin.delete, "CHECK": plugin.check, "GC": plugin.gc, "STATUS": plugin.status}[req.command](req)
        return None, 0
    except CNIError as err:
        return err.to_dict(version), 1
    except Exception as exc:  # a bug or an unexpected OS error: still answer in JSON
        return CNIError(INTERNAL_ERROR, f"{type(exc).__name__}: {exc}").to_dict(version), 1


def render(out: dict[str, Any] | None) -> str:
    """What a plugin prints on stdout for dispatch's answer (the server sends the same)."""
    return "" if out is None else json.dumps(out) + "\n"


def main(plugin: Plugin, about: str, stdin: bytes | None = None) -> int:
    """Entry point for an exec'd plugin; stdin: the bytes if someone read them already."""
    if any(arg in ("-h", "--help", "--version") for arg in sys.argv[1:]):
        print(f"{about}\nCNI protocol versions supported: {', '.join(SUPPORTED_VERSIONS)}")
        print("Run by a container runtime: CNI_COMMAND and friends in the environment, config on stdin.")
        return 0
    if not os.environ.get("CNI_COMMAND"):
        print(f"{about}: CNI_COMMAND is not set (this is a CNI plugin; see --help)", file=sys.stderr)
        out = CNIError(INVALID_ENV, "required env variable CNI_COMMAND is missing").to_dict(LATEST_VERSION)
        print(json.dumps(out))
        return 1
    if stdin is None:
        stdin = b"" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.buffer.read()
    out, status = dispatch(plugin, os.environ, stdin)
    sys.stdout.write(render(out))
    return status
