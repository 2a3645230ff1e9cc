"""Proxy modes: the registry. The only place that knows which modes exist.

Each mode is one package exporting ``MODE`` (a kproxy.proxy.mode.Mode). A package
is imported when its mode is first asked for, so `kproxy --help` loads none.
"""

from __future__ import annotations

import importlib

from kproxy.errors import KproxyError
from kproxy.proxy.mode import Mode

PACKAGES = {
    "iptables": "kproxy.proxy.iptables",
    "userspace": "kproxy.proxy.userspace",
    "ipvs": "kproxy.proxy.ipvs",
    "nftables": "kproxy.proxy.nftables",
}
MODES = tuple(PACKAGES)
DEFAULT_MODE = "iptables"


def mode(name: str) -> Mode:
    """The mode called name; a KproxyError naming the known ones otherwise."""
    package = PACKAGES.get(name)
    if package is None:
        raise KproxyError(f"unknown proxy mode {name!r} (known: {', '.join(MODES)})")
    found: Mode = importlib.import_module(package).MODE
    return found
