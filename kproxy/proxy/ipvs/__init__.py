"""kube-proxy's IPVS mode, for real, in one node's network namespace.

What kube-proxy (pkg/proxy/ipvs/proxier.go, release 1.32) programs, and so what we program:

- A dummy link ``kube-ipvs0`` (left down, like kube-proxy's) holding every
  ClusterIP, external IP and load-balancer IP as a /32 (but an address the node
  has already), so the node accepts packets for them locally, where IPVS (hooked
  at LOCAL_IN and LOCAL_OUT) takes them.
- One IPVS virtual server per ClusterIP:port, external IP:port, load-balancer
  IP:port and node IP:NodePort, with the service's scheduler (lab default ``rr``,
  or the Service's ``kproxy.io/ipvs-scheduler`` annotation), masquerade (NAT)
  forwarding, weight 1. Real servers: the ClusterIP's follow internalTrafficPolicy,
  the others externalTrafficPolicy (Local: this node's endpoints, else the
  cluster's); ready endpoints, else the serving terminating ones. ClientIP
  affinity is IPVS persistence with the affinity timeout (``-p SECONDS``).
- ipsets instead of per-service iptables rules (sets.py: kube-proxy's fifteen
  IPv4 ones, KUBE-CLUSTER-IP, KUBE-LOAD-BALANCER, KUBE-NODE-PORT-LOCAL-TCP, ...)
  and the fixed rules that match them (rules.py): masquerading what needs it but
  not Local-policy traffic (the client IP stays), the load-balancer source-range
  firewall, the health check node ports, KUBE-IPVS-FILTER.
- sysctls: net.ipv4.vs.conntrack=1 (netfilter NAT and masquerade see IPVS
  traffic), expire_nodest_conn=1, expire_quiescent_template=1.

The package, by job:

- render.py: the pure Ruleset (``render(state, node)``, no root): the
  addresses, the IPVS table in ``ipvsadm -Sn`` spelling, the ``ipset restore``
  and ``iptables-restore`` inputs; one service port's share (render_service).
- sets.py, rules.py: the ipsets and the iptables rules.
- proxier.py: IpvsProxier, the sync in named steps, graceful termination of
  real servers, cleanup and the live excerpt (`kproxy rules`, excerpt.py).
- backend.py: the Backend Protocol, everything the proxier asks of the kernel,
  and NetlinkBackend, the real one: IPVS and the link over netlink (pyroute2),
  ipsets in one ``ipset restore`` (each set rebuilt aside and swapped in at a
  full sync), iptables in one ``iptables-nft-restore --noflush``.
"""

from __future__ import annotations

from kproxy.proxy.ipvs.affinity import AFFINITY
from kproxy.proxy.ipvs.proxier import IpvsProxier
from kproxy.proxy.ipvs.render import (DEFAULT_SCHEDULER, SCHEDULER_ANNOTATION, SCHEDULERS, Ruleset, VirtualServer,
                                      kernel_modules, render, service_scheduler)
from kproxy.proxy.ipvs.sets import IPSETS
from kproxy.proxy.ipvs.trace import IpvsTracer
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
    affinity=AFFINITY,
    tracer=IpvsTracer,
)
