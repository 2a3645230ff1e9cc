"""Field checks of Kubernetes-shaped input: each returns the value or raises KproxyError("where: why").

Manifests (kproxy.model), `kproxy render`'s EndpointSlices and Pod status
(kproxy.renderinput) and command-line names (kproxy.cliargs) share them, so
every kind of input says its errors alike:

    port_number(70000, "spec.ports[0].port")
    -> KproxyError("spec.ports[0].port: 70000 is not a valid port number (1-65535)")

A missing (None) map, list or string reads as empty, as the API server's
decoding of an omitted field does.
"""

from __future__ import annotations

import re
from typing import Any

from kproxy.errors import KproxyError

PROTOCOLS = ("TCP", "UDP")
MAX_GRACE_SECONDS = 300  # a pod's termination grace period: kproxy's delete waits it out

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

LABEL_RULE = (
    "DNS-1123 label (lowercase alphanumeric characters or '-', "
    "starting and ending with an alphanumeric character, at most 63 characters)"
)
SUBDOMAIN_RULE = (
    "DNS-1123 subdomain (lowercase alphanumeric characters, '-' or '.', "
    "starting and ending with an alphanumeric character, at most 253 characters)"
)
SERVICE_NAME_RULE = (
    "Service name: a DNS-1035 label (lowercase alphanumeric characters or '-', "
    "starting with a letter and ending with an alphanumeric character, at most 63 characters)"
)


def show(v: Any) -> str:
    """A value as YAML would write it, for error messages."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return f'"{v}"' if isinstance(v, str) else str(v)


def as_map(v: Any, where: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise KproxyError(f"{where}: must be a map, got {show(v)}")
    return v


def as_list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise KproxyError(f"{where}: must be a list, got {show(v)}")
    return v


def as_str(v: Any, where: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise KproxyError(f"{where}: must be a string, got {show(v)}")
    return v


def as_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise KproxyError(f"{where}: must be an integer, got {show(v)}")
    return v


def is_zero(v: Any) -> bool:
    """An integer 0 (not False): what an unset int field decodes to."""
    return type(v) is int and v == 0


def known(d: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    """Unknown fields refused, as `kubectl apply --validate=strict`."""
    for k in d:
        if k not in allowed:
            raise KproxyError(f'{where}: unknown field "{k}"')


def port_number(v: Any, where: str) -> int:
    if v is None:
        raise KproxyError(f"{where}: required")
    n = as_int(v, where)
    if not 1 <= n <= 65535:
        raise KproxyError(f"{where}: {n} is not a valid port number (1-65535)")
    return n


def protocol(v: Any, where: str) -> str:
    """TCP or UDP; unset is TCP, as the API server defaults it."""
    p = as_str(v, where) or "TCP"
    if p == "SCTP":
        raise KproxyError(f'{where}: unsupported protocol "SCTP" (kproxy supports TCP and UDP)')
    if p not in PROTOCOLS:
        raise KproxyError(f"{where}: unsupported protocol {show(p)} (TCP or UDP)")
    return p


def _iana_svc_name_error(name: str) -> str | None:
    """Why `name` is not an IANA service name (container port names, named targetPorts)."""
    if len(name) > 15:
        return "must be no more than 15 characters"
    if not re.fullmatch(r"[-a-z0-9]+", name):
        return "must contain only lowercase alphanumeric characters (a-z, 0-9) and '-'"
    if "--" in name:
        return "must not contain consecutive hyphens"
    if name.startswith("-") or name.endswith("-"):
        return "must not begin or end with a hyphen"
    if not re.search(r"[a-z]", name):
        return "must contain at least one letter (a-z)"
    return None


def iana_port_name(v: Any, where: str) -> str:
    name = as_str(v, where)
    problem = _iana_svc_name_error(name)
    if problem:
        raise KproxyError(f"{where}: {show(name)} is not a valid port name: {problem}")
    return name


def dns_name(name: str, pattern: re.Pattern[str], limit: int, what: str, where: str) -> str:
    if len(name) > limit or not pattern.match(name):
        raise KproxyError(f"{where}: {show(name)} is not a valid {what}")
    return name


def annotations(v: Any, where: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, val in as_map(v, where).items():
        if not isinstance(k, str) or not isinstance(val, str):
            raise KproxyError(f"{where}: annotation {show(k)} must map a string to a string, got {show(val)}")
        out[k] = val
    return out
