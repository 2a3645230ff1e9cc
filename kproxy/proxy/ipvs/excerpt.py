"""`kproxy rules` in IPVS mode: the live IPVS table as ``ipvsadm -Ln`` shows it, with owners."""

from __future__ import annotations

import ipaddress

from kproxy.proxy.ipvs.backend import Backend
from kproxy.proxy.ipvs.render import DUMMY, VirtualServer, VsKey, vs_order
from kproxy.proxy.ipvs.sets import IPSETS
from kproxy.proxy.types import names_service_port


def live_excerpt(backend: Backend, owners: dict[VsKey, str], service: str | None = None) -> str:
    """The live virtual servers (of one service, "ns/name" or "ns/name:port", or all) with their
    real servers' weights and connection counts, then (for all) how many addresses kube-ipvs0
    holds and our ipsets' sizes. owners: which service port each virtual server belongs to."""
    lines = ["IP Virtual Server (kube-proxy IPVS mode)",
             "Prot LocalAddress:Port Scheduler Flags",
             "  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn"]
    for vs in sorted(backend.virtual_servers(), key=lambda vs: vs_order(vs.key)):
        owner = owners.get(vs.key, "")
        if service is not None and not names_service_port(service, owner):
            continue
        flags = f" persistent {vs.persistence}" if vs.persistence else ""
        comment = f"  # {owner}" if owner else ""
        lines.append(f"{vs.protocol:<4} {vs.address} {vs.scheduler}{flags}{comment}")
        for (ip, port), dest in sorted(backend.real_servers(vs).items(),
                                       key=lambda d: (int(ipaddress.ip_address(d[0][0])), d[0][1])):
            lines.append(f"  -> {f'{ip}:{port}':<28} Masq    {dest.weight:<6} {dest.active:<10} {dest.inactive}")
    if service is None:
        lines.append(f"{DUMMY}: {len(backend.link_addresses())} addresses")
        for name in IPSETS:
            size = backend.ipset_size(name)
            lines.append(f"ipset {name}: {'?' if size is None else size} entries")
    return "\n".join(lines) + "\n"


def vs_name(vs: VirtualServer) -> str:
    """A virtual server as ipvsadm names it: "TCP 10.96.0.10:80"."""
    return f"{vs.protocol} {vs.address}"
