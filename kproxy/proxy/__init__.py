"""Proxy modes: one module per mode behind the Proxier interface (types.py)."""

from __future__ import annotations

from kproxy.errors import KproxyError
from kproxy.proxy.types import NodeInfo, Proxier, ProxyState

MODES = ("iptables",)
DEFAULT_MODE = "iptables"


def make_proxier(mode: str, node: NodeInfo) -> Proxier:
    if mode == "iptables":
        from kproxy.proxy.iptables import IptablesProxier

        return IptablesProxier(node)
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")


def render_text(mode: str, state: ProxyState, node: NodeInfo) -> str:
    """What the mode would program for state on node, as text (pure: no root, no kernel)."""
    if mode == "iptables":
        from kproxy.proxy.iptables import render

        return render(state, node).restore_text()
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")


def rules_text(mode: str, state: ProxyState, node: NodeInfo, service: str | None) -> str:
    """The node's live rules for one service (or all), with counters; call inside the node's namespace."""
    if mode == "iptables":
        from kproxy.proxy.iptables import IptablesProxier, render

        proxier = IptablesProxier(node)
        proxier.ruleset = render(state, node)  # which chains belong to which service
        return proxier.rules_excerpt(service)
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")
