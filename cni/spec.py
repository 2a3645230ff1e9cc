"""The runtime-to-plugin protocol: environment, stdin config, validation.

Everything here is pure: a request is parsed from an environment mapping and
the stdin bytes, so the same code serves the exec path and in-process callers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from cni.errors import (
    DECODE_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENV,
    CNIError,
)

SUPPORTED_VERSIONS = ("1.0.0", "1.1.0")
LATEST_VERSION = SUPPORTED_VERSIONS[-1]
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")
# STATUS and GC arrived with spec 1.1.0.
COMMANDS_SINCE = {"STATUS": "1.1.0", "GC": "1.1.0"}

# Which variables each command needs (libcni's and the spec's table).
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_MAX = 15  # IFNAMSIZ - 1


def validate_id(value: str, what: str, code: int) -> str:
    """Container IDs and network names: letters, digits, '_', '.', '-' only.

    They become file names, chain comments and link names, so anything that
    could escape a directory or reach a shell is refused outright.
    """
    if not _ID_RE.match(value) or value in (".", ".."):
        raise CNIError(code, f"invalid characters in {what}", repr(value))
    return value


def validate_ifname(value: str) -> str:
    if not value:
        raise CNIError(INVALID_ENV, "interface name is empty")
    if len(value) > _IFNAME_MAX:
        raise CNIError(INVALID_ENV, f"interface name is longer than {_IFNAME_MAX} characters", repr(value))
    if value in (".", "..") or any(c in value for c in "/:\0") or any(c.isspace() for c in value):
        raise CNIError(INVALID_ENV, "invalid characters in interface name", repr(value))
    return value


def parse_cni_args(raw: str) -> dict[str, str]:
    """CNI_ARGS is 'K=V;K=V'."""
    out: dict[str, str] = {}
    for pair in filter(None, raw.split(";")):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENV, "CNI_ARGS must be K=V pairs separated by ';'", repr(pair))
        out[key] = value
    return out


@dataclass
class Request:
    """One plugin invocation as the runtime made it."""

    command: str
    config: dict[str, Any]
    stdin: bytes
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    path: list[str] = field(default_factory=list)

    @property
    def version(self) -> str:
        return str(self.config.get("cniVersion", LATEST_VERSION))

    @property
    def network(self) -> str:
        return str(self.config["name"])


def parse_config(stdin: bytes) -> dict[str, Any]:
    try:
        config = json.loads(stdin or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(DECODE_FAILURE, "network configuration is not valid JSON", str(exc)) from None
    if not isinstance(config, dict):
        raise CNIError(DECODE_FAILURE, "network configuration must be a JSON object")
    return config


def parse_request(env: Mapping[str, str], stdin: bytes) -> Request:
    """Validate the environment and the config for one command.

    Raises CNIError with the spec's code for the first problem found.
    """
    command = env.get("CNI_COMMAND", "")
    if not command:
        raise CNIError(INVALID_ENV, "required env variable CNI_COMMAND is missing")
    if command not in COMMANDS:
        raise CNIError(INVALID_ENV, f"unknown CNI_COMMAND {command!r}", "expected one of " + ", ".join(COMMANDS))
    missing = [name for name in _REQUIRED_ENV[command] if not env.get(name)]
    if missing:
        raise CNIError(INVALID_ENV, f"required env variables missing for {command}: " + ", ".join(missing))
    config = parse_config(stdin)
    request = Request(command=command, config=config, stdin=stdin)
    if command == "VERSION":
        return request

    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(INVALID_CONFIG, "network configuration has no cniVersion")
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"incompatible CNI versions: config is {version!r}, plugin supports {list(SUPPORTED_VERSIONS)}",
        )
    since = COMMANDS_SINCE.get(command)
    if since and _version_tuple(version) < _version_tuple(since):
        raise CNIError(INCOMPATIBLE_VERSION, f"{command} needs cniVersion {since} or later, config is {version}")
    name = config.get("name")
    if not isinstance(name, str):
        raise CNIError(INVALID_CONFIG, "network configuration has no name")
    validate_id(name, "network name", INVALID_CONFIG)
    if not isinstance(config.get("type"), str):
        raise CNIError(INVALID_CONFIG, "network configuration has no type")

    if env.get("CNI_CONTAINERID"):
        request.container_id = validate_id(env["CNI_CONTAINERID"], "CNI_CONTAINERID", INVALID_ENV)
    if env.get("CNI_IFNAME"):
        request.ifname = validate_ifname(env["CNI_IFNAME"])
    request.netns = env.get("CNI_NETNS", "")
    request.args = parse_cni_args(env.get("CNI_ARGS", ""))
    request.path = [p for p in env.get("CNI_PATH", "").split(":") if p]
    return request


def version_result(config: Mapping[str, Any]) -> dict[str, Any]:
    version = config.get("cniVersion")
    return {
        "cniVersion": version if isinstance(version, str) and version else LATEST_VERSION,
        "supportedVersions": list(SUPPORTED_VERSIONS),
    }


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
