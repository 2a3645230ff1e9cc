"""Proxy modes: one module per mode behind the Proxier interface (types.py)."""

from __future__ import annotations

from kproxy.errors import KproxyError
from kproxy.kmod import Module
from kproxy.proxy.types import NodeInfo, Proxier, ProxyState

MODES = ("iptables", "userspace", "ipvs")
DEFAULT_MODE = "iptables"


def make_proxier(mode: str, node: NodeInfo, *, ipvs_scheduler: str = "") -> Proxier:
    if mode == "iptables":
        from kproxy.proxy.iptables import IptablesProxier

        return IptablesProxier(node)
    if mode == "userspace":
        from kproxy.proxy.userspace import UserspaceProxier

        return UserspaceProxier(node)
    if mode == "ipvs":
        from kproxy.proxy.ipvs import IpvsProxier

        return IpvsProxier(node, scheduler=ipvs_scheduler)  # "": $KPROXY_IPVS_SCHEDULER, else rr
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")


def kernel_modules(mode: str, *, ipvs_scheduler: str = "") -> tuple[Module, ...]:
    """The kernel modules the mode needs beyond the lab's own (kproxy.kmod.LAB_MODULES)."""
    if mode == "ipvs":
        from kproxy.proxy.ipvs import kernel_modules as ipvs_modules

        return ipvs_modules(ipvs_scheduler)
    return ()


def render_text(mode: str, state: ProxyState, node: NodeInfo) -> str:
    """What the mode would program for state on node, as text (pure: no root, no kernel)."""
    if mode == "iptables":
        from kproxy.proxy.iptables import render

        return render(state, node).restore_text()
    if mode == "userspace":
        from kproxy.proxy import userspace

        return userspace.render_text(state, node)
    if mode == "ipvs":
        from kproxy.proxy.ipvs import render as render_ipvs

        return render_ipvs(state, node).text()
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")


def rules_text(mode: str, state: ProxyState, node: NodeInfo, service: str | None) -> str:
    """The node's live rules for one service (or all), with counters; call inside the node's namespace."""
    if mode == "iptables":
        from kproxy.proxy.iptables import IptablesProxier, render

        proxier = IptablesProxier(node)
        proxier.ruleset = render(state, node)  # which chains belong to which service
        return proxier.rules_excerpt(service)
    if mode == "userspace":
        from kproxy.proxy.userspace import live_rules

        return live_rules(service)
    if mode == "ipvs":
        from kproxy.proxy.ipvs import IpvsProxier, render as render_ipvs

        ipvs = IpvsProxier(node)
        ipvs.desired = render_ipvs(state, node)  # which virtual servers belong to which service
        return ipvs.rules_excerpt(service)
    raise KproxyError(f"unknown proxy mode {mode!r} (known: {', '.join(MODES)})")
