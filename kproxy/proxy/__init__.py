"""Proxy modes: one module per mode behind the Proxier interface (types.py)."""

from __future__ import annotations

from kproxy.errors import KproxyError
from kproxy.proxy.types import NodeInfo, Proxier

MODES = ("iptables",)
DEFAULT_MODE = "iptables"


def make_proxier(mode: str, node: NodeInfo) -> Proxier:
    if mode == "iptables":
        from kproxy.proxy.iptables import IptablesProxier

        return IptablesProxier(node)
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")
