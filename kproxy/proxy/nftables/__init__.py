"""kube-proxy's nftables mode, for real, in one node's network namespace.

The table ``ip kube-proxy`` in kube-proxy's layout (pkg/proxy/nftables, the 1.31-1.32
layout with filter-output-post-dnat): base chains at kube-proxy's priorities; the
``services`` chain dispatching through the verdict map ``service-ips`` and, behind
``fib daddr type local`` (or the ``nodeport-ips`` set), ``service-nodeports``;
``no-endpoint-services`` / ``no-endpoint-nodeports`` and ``cluster-ips-check``;
``firewall-check`` and ``firewall-ips`` (loadBalancerSourceRanges); ``mark-for-masquerade``
and ``masquerading``; per service port its ``service-`` (Cluster policy), ``local-``
(Local policy), ``external-`` and ``firewall-`` chains, per endpoint its ``endpoint-``
chain and, with ClientIP affinity, its ``affinity-`` set. Which endpoints each chain
gets is kube-proxy's CategorizeEndpoints (kproxy.proxy.topology): ready ones, else the
serving terminating ones. The service health check node port gets no rule: kube-proxy's
nftables mode writes none, as its chains let through what they do not drop or reject.

One module per job:

- names.py: the names, hashed as kube-proxy hashes them.
- rules.py: the shared objects and one service port's, in kube-proxy's spelling.
- render.py: ``render(state, node) -> Ruleset`` (pure, no root, cached per service
  port); ``Ruleset.text()`` is knftables' dump, what `kproxy render` prints.
- transaction.py: the `nft -f` input of a full and of a partial sync.
- backend.py: what the proxier asks of the kernel (``Libnftables`` runs `nft`).
- proxier.py: ``NftablesProxier``; excerpt.py: `kproxy rules`.

The one difference from kube-proxy, and a visible one: above VMAP_LIMIT service
ports, endpoint choice ``auto`` writes a rule per endpoint instead of an anonymous
``numgen ... vmap`` per service, because the kernel's cost of naming anonymous sets
grows with the sets already in the table (docs/nftables.md).
"""

from __future__ import annotations

import subprocess

from kproxy.proxy.mode import Mode, Option, Options
from kproxy.proxy.nftables.affinity import AFFINITY
from kproxy.proxy.nftables.backend import Libnftables
from kproxy.proxy.nftables.excerpt import live_rules
from kproxy.proxy.nftables.proxier import NftablesProxier
from kproxy.proxy.nftables.render import CHOICES, VMAP_LIMIT, Ruleset, render
from kproxy.proxy.nftables.trace import NftablesTracer
from kproxy.proxy.nftables.transaction import full_transaction
from kproxy.proxy.types import NodeInfo, ProxyState

__all__ = ["MODE", "NftablesProxier", "Ruleset", "VMAP_LIMIT", "render"]


def _render(state: ProxyState, node: NodeInfo, options: Options) -> Ruleset:
    return render(state, node, choice=options["endpoint-choice"], counters=options["counters"] == "true")


def _proxier(node: NodeInfo, options: Options) -> NftablesProxier:
    return NftablesProxier(node, choice=options["endpoint-choice"], counters=options["counters"] == "true")


def _load_alone(state: ProxyState, node: NodeInfo, options: Options) -> None:
    """`nft -f` of the transaction of a first sync: the text the proxier hands the library."""
    text = full_transaction(_render(state, node, options), None)
    done = subprocess.run(["nft", "-f", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"nft -f failed: {done.stderr.strip()}")


def _live_rules(state: ProxyState, node: NodeInfo, options: Options, service: str | None) -> str:
    return live_rules(_render(state, node, options), service, Libnftables())


MODE = Mode(
    name="nftables",
    summary="kube-proxy's nftables mode: table ip kube-proxy, verdict maps, one nft -f transaction per sync",
    options=(
        Option("endpoint-choice", "how a service picks an endpoint: vmap (kube-proxy's numgen vmap), cascade "
               f"(a rule per endpoint; scales), auto (vmap up to {VMAP_LIMIT} service ports)", "auto", CHOICES),
        Option("counters", "a counter in every rule of a service's chains, for 'kproxy rules' "
               "(kube-proxy writes none)", "false", ("false", "true")),
    ),
    make_proxier=_proxier,
    render_text=lambda state, node, options: _render(state, node, options).text(),
    rules_excerpt=_live_rules,
    load_alone=_load_alone,
    affinity=AFFINITY,
    tracer=NftablesTracer,
)
