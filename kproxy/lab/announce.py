"""The lab's load balancer on the wire: LoadBalancer addresses routed to the nodes, as MetalLB's BGP mode does.

kproxy.controllers gives each LoadBalancer Service an address from the lab's
pool (status.loadBalancer.ingress). Clients on the underlay (the `external`
namespace stands for the upstream router and a client behind it) learn a
route for that address with every node that announces it as a next hop,
like routes a BGP speaker on each node advertises:

- externalTrafficPolicy Cluster: every node announces it (ECMP over all of
  them); whichever node gets a flow forwards it, masqueraded, to an endpoint;
- externalTrafficPolicy Local: only nodes with a ready endpoint of the
  Service announce it (MetalLB's speakers do the same), so the client's
  address reaches the pod unchanged and no flow lands on a node that would
  drop it. With no such node the route is withdrawn.

The routes carry protocol `bgp` (`ip route` in the namespace shows
"proto bgp"); that marks them as ours, so a sync replaces exactly those.
externalIPs are not announced: in a cluster the administrator routes them,
and in a lab a person does the same (`ip route add IP via NODE-IP` in
`external`).
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, Mapping

from cni.netns import iproute_in
from kproxy.controllers import load_balancer_ips
from kproxy.lab.state import LabState, ns_path
from kproxy.lab.wiring import EXTERNAL, NODE_UPLINK
from kproxy.proxy.source import SERVICE_NAME_LABEL
from kproxy.store import Obj, View

RTPROT_BGP = 186  # /etc/iproute2/rt_protos: "bgp"
Routes = dict[str, tuple[str, ...]]  # load-balancer IP -> next hops (node IPs), sorted


def _nodes_with_ready_endpoints(slices: Iterable[Obj]) -> set[str]:
    return {ep.get("nodeName", "") for s in slices for ep in s.get("endpoints") or ()
            if (ep.get("conditions") or {}).get("ready", True)}


def routes(services: Iterable[Obj], slices: Iterable[Obj], node_ips: Mapping[str, str]) -> Routes:
    """The route each load-balancer address gets: the nodes that announce it (pure)."""
    by_owner: dict[tuple[str, str], list[Obj]] = {}
    for s in slices:
        owner = (s["metadata"].get("labels") or {}).get(SERVICE_NAME_LABEL)
        if owner:
            by_owner.setdefault((s["metadata"]["namespace"], owner), []).append(s)
    out: Routes = {}
    for svc in services:
        if svc["spec"].get("type") != "LoadBalancer":
            continue
        if svc["spec"].get("externalTrafficPolicy") == "Local":
            key = (svc["metadata"]["namespace"], svc["metadata"]["name"])
            announcing = _nodes_with_ready_endpoints(by_owner.get(key, ()))
            hops = tuple(sorted((ip for node, ip in node_ips.items() if node in announcing),
                                key=ipaddress.IPv4Address))
        else:
            hops = tuple(sorted(node_ips.values(), key=ipaddress.IPv4Address))
        for ip in load_balancer_ips(svc):
            if hops:
                out[ip] = hops
    return out


def wanted_routes(state: LabState, view: View) -> Routes:
    return routes(view.of_kind("Service"), view.of_kind("EndpointSlice"),
                  {name: node.ip for name, node in state.nodes.items()})


def sync(state: LabState, view: View) -> Routes:
    """Make the router's (the external namespace's) announced routes exactly the wanted ones."""
    wanted = wanted_routes(state, view)
    with iproute_in(ns_path(state.name, EXTERNAL)) as ipr:
        (uplink,) = ipr.link_lookup(ifname=NODE_UPLINK)
        have: Routes = {}
        for route in ipr.get_routes(family=2, proto=RTPROT_BGP):
            dst = f"{route.get_attr('RTA_DST')}"
            gateway = route.get_attr("RTA_GATEWAY")
            hops = [gateway] if gateway else [hop.get_attr("RTA_GATEWAY") for hop in route.get_attr("RTA_MULTIPATH")]
            have[dst] = tuple(sorted(hops, key=ipaddress.IPv4Address))
        for dst in sorted(set(have) - set(wanted)):
            ipr.route("del", dst=f"{dst}/32", proto=RTPROT_BGP)
        for dst, hops in sorted(wanted.items()):
            if have.get(dst) == hops:
                continue
            if len(hops) == 1:
                ipr.route("replace", dst=f"{dst}/32", gateway=hops[0], oif=uplink, proto=RTPROT_BGP)
            else:
                ipr.route("replace", dst=f"{dst}/32", proto=RTPROT_BGP,
                          multipath=[{"gateway": hop, "oif": uplink} for hop in hops])
    return wanted
