"""kube-proxy's iptables mode, for real, in one node's network namespace.

What a reader finds here, one module per job:

- names.py: kube-proxy's chain names (hashed from the service port as kube-proxy
  hashes them), its top-level chains and its jumps from built-in chains.
- rules.py: the rule lines of one service port and of the shared chains, in
  kube-proxy's spelling.
- render.py: ``render(state, node) -> Ruleset``, pure, no root; with a
  RenderCache it re-renders only what changed. ``Ruleset.text()`` is what
  `kproxy render` prints.
- restore.py: the two iptables-restore inputs: a partial sync's
  (``restore_input``) and a full sync's, written while it renders
  (``write_full_restore``).
- chainscan.py: what a full sync reads of the tables (stale chains, missing jumps).
- kproxy/proxy/tables.py (shared with the other modes that write iptables):
  everything the proxier asks of the node, behind one Protocol
  (tests/fakes/iptables.py is its in-memory fake).
- proxier.py: ``IptablesProxier``. One ``iptables-nft-restore --noflush`` per
  sync, run in the namespace of the calling thread (the agent runs inside its
  node's namespace); stale UDP conntrack entries deleted like kube-proxy
  (conntrack.py); ``cleanup()`` removes everything.
- excerpt.py: the live rules with packet counters (`kproxy rules`).

Why the nft backend, and the chain-less ``-Z`` that starts every table of a
full sync: docs/iptables.md has the measurements. In short: legacy replaces
the whole table in the kernel on any change (0.40 s for one service at 10k
services), nft only what changed (0.02-0.09 s); nft's full restore was
quadratic in the chains named (14 s at 10k) until the ``-Z`` (1.9 s).
"""

from __future__ import annotations

from kproxy.proxy.iptables.affinity import AFFINITY
from kproxy.proxy.iptables.excerpt import live_rules
from kproxy.proxy.iptables.names import ServiceChains, endpoint_chain_name, is_own_chain, service_chain_names
from kproxy.proxy.iptables.proxier import IptablesProxier
from kproxy.proxy.iptables.render import LARGE_CLUSTER_ENDPOINTS, RenderCache, Ruleset, render
from kproxy.proxy.iptables.restore import Leftovers, changed_service_ports, restore_input, write_full_restore
from kproxy.proxy.iptables.rules import probability
from kproxy.proxy.kernel import RestoreError, restore
from kproxy.proxy.mode import Mode, Option, Options
from kproxy.proxy.types import NodeInfo, ProxyState
from kproxy.proxy.xtables_trace import XtablesTracer

__all__ = ["IptablesProxier", "LARGE_CLUSTER_ENDPOINTS", "Leftovers", "MODE", "RenderCache",
           "RestoreError", "Ruleset", "ServiceChains", "changed_service_ports", "endpoint_chain_name", "is_own_chain",
           "live_rules", "probability", "render", "restore_input", "service_chain_names", "write_full_restore"]


def _localhost_nodeports(options: Options) -> bool:
    return options["localhost-nodeports"] == "true"


def _load_alone(state: ProxyState, node: NodeInfo, options: Options) -> None:
    """iptables-nft-restore of what a first sync writes, nothing else."""
    chunks: list[str] = []
    write_full_restore(state, node, chunks.append, localhost_nodeports=_localhost_nodeports(options))
    restore("".join(chunks), counters=True)


MODE = Mode(
    name="iptables",
    summary="kube-proxy's iptables mode: KUBE-SVC/SEP chains, one iptables-nft-restore per sync",
    options=(Option("localhost-nodeports", "NodePorts answer on 127.0.0.1 too "
                    "(kube-proxy's --iptables-localhost-nodeports)", "true", ("true", "false")),),
    make_proxier=lambda node, options: IptablesProxier(node, localhost_nodeports=_localhost_nodeports(options)),
    render_text=lambda state, node, options: render(
        state, node, localhost_nodeports=_localhost_nodeports(options)).text(),
    rules_excerpt=lambda state, node, options, service: live_rules(render(state, node).owners, service),
    load_alone=_load_alone,
    affinity=AFFINITY,
    tracer=XtablesTracer,
)
