"""kube-proxy's first mode, the userspace proxy, for real, in one node's network namespace.

A Service here is what it always was underneath: a process that accepts a
connection and copies bytes to a chosen backend. Split along its jobs, as
kube-proxy split its old userspace proxier (proxier, proxysocket, roundrobin,
loadbalancer):

- ``rules``: pure, no root. The portal rules (REDIRECT/DNAT of ClusterIPs and
  NodePorts to the proxy ports, REJECT for service ports without endpoints):
  ``render(state, node, ports) -> Ruleset``, ``Ruleset.text()``.
- ``balancer``: round robin over the ready endpoints, ClientIP affinity.
- ``loop``: one epoll loop in one background thread serves the whole node.
- ``listener`` (one service port's socket), ``tcp`` (dial with retries, then
  splice or copy both ways), ``udp`` (one association per client address).
- ``status``: the listener table on an abstract unix socket, and the live
  rules with counters (`kproxy rules`).
- the iptables-restore / iptables-save commands: kproxy/proxy/tables.py, shared with the other modes.
- ``proxier``: ``UserspaceProxier``, the Proxier the agent runs.
"""

from __future__ import annotations

from kproxy.proxy.mode import Mode, Option
from kproxy.proxy.userspace.proxier import COPY_MODES, DEFAULT_COPY, UserspaceProxier
from kproxy.proxy.userspace.rules import JUMPS, Ruleset, is_own_chain, render, render_text, unsupported
from kproxy.proxy.userspace.status import live_rules
from kproxy.proxy.xtables_trace import XtablesTracer

__all__ = ["JUMPS", "MODE", "Ruleset", "UserspaceProxier", "is_own_chain", "live_rules", "render"]

MODE = Mode(
    name="userspace",
    summary="kube-proxy's first mode: iptables portals REDIRECT to a proxy process that copies bytes",
    options=(Option("copy", "how the proxy moves bytes: splice(2) through a pipe, or recv/send "
                    "(docs/userspace.md)", DEFAULT_COPY, COPY_MODES),),
    make_proxier=lambda node, options: UserspaceProxier(node, copy=options["copy"]),
    render_text=lambda state, node, options: render_text(state, node),
    rules_excerpt=lambda state, node, options, service: live_rules(service),
    unsupported=unsupported,
    relays=True,
    tracer=XtablesTracer,
)
