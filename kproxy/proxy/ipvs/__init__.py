"""kube-proxy's IPVS mode, for real, in one node's network namespace.

What kube-proxy (pkg/proxy/ipvs/proxier.go) programs, and so what we program:

- A dummy link ``kube-ipvs0`` (left down, like kube-proxy's) holding every
  ClusterIP as a /32, so the node accepts packets for them locally, where IPVS
  (hooked at LOCAL_IN and LOCAL_OUT) takes them.
- One IPVS virtual server per ClusterIP:port and one per node IP:NodePort, with
  the service's scheduler (lab default ``rr``, or the Service's
  ``kproxy.io/ipvs-scheduler`` annotation), masquerade (NAT) forwarding to every
  ready endpoint, weight 1. ClientIP affinity is IPVS persistence with the
  affinity timeout (``-p SECONDS``, netmask /32).
- ipsets instead of per-service iptables rules: KUBE-CLUSTER-IP (ip,port of
  every ClusterIP service), KUBE-NODE-PORT-TCP / -UDP (bitmap of NodePorts),
  KUBE-LOOP-BACK (ip,port,ip of local endpoints, for hairpin), and the few
  iptables rules that use them: KUBE-SERVICES marks traffic to a ClusterIP from
  outside the cluster CIDR and NodePort traffic for masquerade (KUBE-MARK-MASQ),
  KUBE-POSTROUTING masquerades marked and hairpin traffic, KUBE-FORWARD accepts
  marked and established forwarded traffic.
- sysctls: net.ipv4.vs.conntrack=1 (netfilter NAT and masquerade see IPVS
  traffic), expire_nodest_conn=1, expire_quiescent_template=1.

The package, by job:

- render.py: the pure Ruleset (``render(state, node)``, no root): the
  addresses, the IPVS table in ``ipvsadm -Sn`` spelling, the ``ipset restore``
  and ``iptables-restore`` inputs; one service port's share (render_service).
- proxier.py: IpvsProxier, the sync in named steps, graceful termination of
  real servers, cleanup and the live excerpt (`kproxy rules`).
- backend.py: the Backend Protocol, everything the proxier asks of the kernel,
  and NetlinkBackend, the real one: IPVS and the link over netlink (pyroute2),
  ipsets in one ``ipset restore`` (each set rebuilt aside and swapped in at a
  full sync), iptables in one ``iptables-nft-restore --noflush``.
"""

from __future__ import annotations

from kproxy.proxy.ipvs.proxier import IpvsProxier
from kproxy.proxy.ipvs.render import (DEFAULT_SCHEDULER, IPSETS, SCHEDULER_ANNOTATION, SCHEDULERS, Ruleset,
                                      VirtualServer, kernel_modules, render, service_scheduler)
from kproxy.proxy.mode import Mode, Option, Options
from kproxy.proxy.types import NodeInfo, ProxyState

__all__ = ["IPSETS", "MODE", "IpvsProxier", "Ruleset", "VirtualServer", "kernel_modules", "render"]


def _live_rules(state: ProxyState, node: NodeInfo, options: Options, service: str | None) -> str:
    # With the lab's scheduler: opening the backend loads the modules that one needs, no other.
    proxier = IpvsProxier(node, scheduler=options["scheduler"])
    try:
        return proxier.rules_excerpt(service, owners=render(state, node, scheduler=options["scheduler"]).owners)
    finally:
        proxier.close()


MODE = Mode(
    name="ipvs",
    summary="kube-proxy's IPVS mode: virtual servers, kube-ipvs0 and ipsets",
    options=(Option("scheduler", f"the lab's IPVS scheduler; a Service's {SCHEDULER_ANNOTATION} "
                    "annotation overrides it", DEFAULT_SCHEDULER, SCHEDULERS),),
    make_proxier=lambda node, options: IpvsProxier(node, scheduler=options["scheduler"]),
    render_text=lambda state, node, options: render(state, node, scheduler=options["scheduler"]).text(),
    rules_excerpt=_live_rules,
    kernel_modules=lambda options: kernel_modules(options["scheduler"]),
    service_info=service_scheduler,
)
