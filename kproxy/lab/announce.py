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

A plain router re-hashes flows whenever its next hops change, which breaks
a connection open at that moment (the new node has no conntrack entry for
it). The lab's router keeps established connections where they started, as
a stateful load balancer drains a node: nftables (table `ip kproxy-router`)
notes each new connection's next hop in its conntrack mark, and later
packets of it are routed by that mark through a per-node table (policy
routing: `fwmark N lookup 1000+N`). So a rollout behind a Local-policy
address fails no request: old connections finish on the node they began on
while it drains, new ones go where the announcements now point.
externalIPs are not announced: in a cluster the administrator routes them,
and in a lab a person does the same (`ip route add IP via NODE-IP` in
`external`).
"""

from __future__ import annotations

import ipaddress
import subprocess
from typing import Iterable, Mapping

from pyroute2 import IPRoute

from cni.netns import iproute_in
from kproxy.errors import KproxyError
from kproxy.controllers import load_balancer_ips
from kproxy.lab.state import LabState, ns_path
from kproxy.lab.wiring import EXTERNAL, NODE_UPLINK
from kproxy.proxy.source import SERVICE_NAME_LABEL
from kproxy.store import Obj, View

RTPROT_BGP = 186  # /etc/iproute2/rt_protos: "bgp"
ROUTER_TABLE = "kproxy-router"  # the nftables table that pins connections to their node
FIRST_ROUTE_TABLE = 1000  # per-node routing tables: 1000 + the node's mark
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


def node_marks(node_ips: Iterable[str], node_cidr: str) -> dict[str, int]:
    """Each node's connection mark: its host number in the node CIDR (stable as nodes come and go)."""
    network = ipaddress.IPv4Network(node_cidr)
    return {ip: int(ipaddress.IPv4Address(ip)) - int(network.network_address) for ip in node_ips}


def pinning_ruleset(pool: str, marks: Mapping[str, int]) -> str:
    """The `nft -f` text that (re)writes the router's table: a new connection to the pool records its
    next hop's mark, every later packet of it is routed by that mark (pure)."""
    elements = ", ".join(f"{ip} : {mark}" for ip, mark in sorted(marks.items(), key=lambda item: item[1]))
    hop_map = f"elements = {{ {elements} }} ; " if elements else ""
    return (f"table ip {ROUTER_TABLE} {{ }}\n"
            f"delete table ip {ROUTER_TABLE}\n"
            f"table ip {ROUTER_TABLE} {{\n"
            f"  map hop-mark {{ type ipv4_addr : mark ; {hop_map}}}\n"
            f"  chain remember {{ type filter hook postrouting priority mangle ; "
            f"ip daddr {pool} ct state new ct mark set rt ip nexthop map @hop-mark ; }}\n"
            f"  chain pin {{ type route hook output priority mangle ; "
            f"ip daddr {pool} ct mark != 0 meta mark set ct mark ; }}\n"
            f"}}\n")


def pin_connections(state: LabState) -> None:
    """The router's connection pinning for the lab's nodes (they change only through `lab up`, which
    calls this; the announced routes change with every Service, sync())."""
    if not state.load_balancer_cidr:
        return
    netns = ns_path(state.name, EXTERNAL)
    with iproute_in(netns) as ipr:
        (uplink,) = ipr.link_lookup(ifname=NODE_UPLINK)
        _pin(ipr, netns, uplink, state.load_balancer_cidr,
             node_marks((node.ip for node in state.nodes.values()), state.node_cidr))


def _pin(ipr: IPRoute, netns: str, uplink: int, pool: str, marks: Mapping[str, int]) -> None:
    """Per node: a routing table sending the pool to it and a rule choosing that table by mark;
    then the nftables table that marks connections."""
    wanted_tables = {FIRST_ROUTE_TABLE + mark: ip for ip, mark in marks.items()}
    for table, ip in wanted_tables.items():
        ipr.route("replace", dst=pool, gateway=ip, oif=uplink, table=table)
    rules = {(rule.get_attr("FRA_TABLE"), rule.get_attr("FRA_FWMARK")) for rule in ipr.get_rules(family=2)}
    for table in wanted_tables:
        if (table, table - FIRST_ROUTE_TABLE) not in rules:
            ipr.rule("add", table=table, fwmark=table - FIRST_ROUTE_TABLE, priority=FIRST_ROUTE_TABLE)
    for table, fwmark in rules:
        if table and table >= FIRST_ROUTE_TABLE and table not in wanted_tables:
            ipr.rule("del", table=table, fwmark=fwmark, priority=FIRST_ROUTE_TABLE)
            ipr.flush_routes(table=table)
    run_nft(netns, pinning_ruleset(pool, marks))


def run_nft(netns: str, text: str) -> None:
    done = subprocess.run(["nsenter", f"--net={netns}", "--", "nft", "-f", "-"], input=text, text=True,
                          capture_output=True)
    if done.returncode != 0:
        raise KproxyError(f"the lab's router: nft -f failed: {done.stderr.strip()}")


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
