"""The lab NIC (`lab up --nic MAC`): a dedicated NIC made a port of the underlay's bridge, which
stretches the underlay over the wire it is plugged into (docs/multi-vm.md).

It is found by its MAC, never by its name or as "the interface with the default route": VMs
name their NICs in boot order, and every VM of a Vagrant box has the same NAT address on the
default route. Moving it is the lab's one change to the machine's root namespace; `down` gives
it back, with its name, before the namespaces go.

`choose` is the whole decision, pure (tests give it links); the functions below it read and
change the kernel.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cni.netns import iproute_in
from kproxy.errors import KproxyError

if TYPE_CHECKING:  # the command line imports parse_mac, and starts faster without pyroute2
    from pyroute2 import IPRoute

MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MIN_MTU = 1500  # the overlays' MTUs (vxlan 1450, udp 1472) are 1500 less their headers
ROOT_NS = "/proc/1/ns/net"  # init's: the machine's root namespace, wherever the caller is


@dataclass(frozen=True)
class Link:
    name: str
    mac: str
    mtu: int
    ipv4: tuple[str, ...] = ()
    default_route: bool = False  # a default route (IPv4 or IPv6) goes out of it


def parse_mac(text: str) -> str:
    """text as a MAC in lowercase, or a one-line error."""
    mac = text.strip().lower().replace("-", ":")
    if not MAC_RE.match(mac):
        raise KproxyError(f"{text!r} is not a MAC address (six hex pairs, like 52:54:00:6b:70:01)")
    return mac


def choose(mac: str, root: list[Link], underlay: list[Link]) -> tuple[Link, bool]:
    """The NIC with mac and whether it is already the underlay's (a previous `up` moved it);
    a refusal naming why it cannot be the lab's."""
    for link in underlay:
        if link.mac == mac:
            return link, True
    found = next((link for link in root if link.mac == mac), None)
    if found is None:
        raise KproxyError(f"no NIC has MAC {mac} in the machine's root namespace (see 'ip -br link')")
    where = f"NIC {found.name} ({mac})"
    if found.ipv4:
        raise KproxyError(f"{where} has address {found.ipv4[0]}; the lab's NIC must be dedicated to it")
    if found.default_route:
        raise KproxyError(f"{where} carries a default route; the lab's NIC must be dedicated to it")
    if found.mtu < MIN_MTU:
        raise KproxyError(f"{where} has MTU {found.mtu}; the lab's overlays need at least {MIN_MTU}")
    return found, False


def foreign(links: list[Link], ours: set[str]) -> list[Link]:
    """The underlay's links that the lab did not make: a NIC moved in (ours: lo, the bridge, the to-* ports)."""
    return [link for link in links if link.name not in ours and not link.name.startswith("to-")]


# Kernel work ---------------------------------------------------------------

def links(ipr: IPRoute) -> list[Link]:
    """Every link the socket's namespace has, with its IPv4 addresses and default routes."""
    defaults: set[int] = set()
    for family in (2, 10):  # every table's: a dump filters none
        for route in ipr.get_routes(family=family):
            if route["dst_len"] == 0:
                hops = route.get_attr("RTA_MULTIPATH") or []
                defaults.update([route.get_attr("RTA_OIF"), *(hop["oif"] for hop in hops)])
    found = []
    for msg in ipr.get_links():
        index = msg["index"]
        found.append(Link(name=msg.get_attr("IFLA_IFNAME"), mac=(msg.get_attr("IFLA_ADDRESS") or "").lower(),
                          mtu=msg.get_attr("IFLA_MTU"),
                          ipv4=tuple(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=index, family=2)),
                          default_route=index in defaults))
    return found


def find(mac: str, underlay_ns: str) -> tuple[Link, bool]:
    """choose() on the root namespace's links and the underlay's (if it exists yet)."""
    with iproute_in(ROOT_NS) as root:
        root_links = links(root)
    under: list[Link] = []
    if os.path.exists(underlay_ns):
        with iproute_in(underlay_ns) as ipr:
            under = links(ipr)
    return choose(mac, root_links, under)


def notice(name: str, mac: str, lab: str) -> str:
    """What a person is told when the NIC leaves the root namespace: a machine-wide act."""
    return (f"kproxy: moving NIC {name} ({mac}) from the machine's root namespace into lab {lab}'s underlay "
            "(machine-wide; 'kproxy lab down' gives it back)")


def attach(mac: str, underlay_ns: str, bridge: str) -> None:
    """The NIC with mac moved into underlay_ns (the kernel keeps its name), a port of bridge, up.
    Not promiscuous by hand: a bridge port is made promiscuous by the bridge (dev_set_promiscuity
    in br_add_if), so frames for the node namespaces' MACs reach the bridge."""
    with iproute_in(ROOT_NS) as root:
        index = next((m["index"] for m in root.get_links() if (m.get_attr("IFLA_ADDRESS") or "").lower() == mac),
                     None)
        if index is not None:
            fd = os.open(underlay_ns, os.O_RDONLY)
            try:
                root.link("set", index=index, net_ns_fd=fd)
            finally:
                os.close(fd)
    with iproute_in(underlay_ns) as under:
        index = next(m["index"] for m in under.get_links() if (m.get_attr("IFLA_ADDRESS") or "").lower() == mac)
        under.link("set", index=index, master=under.link_lookup(ifname=bridge)[0], state="up")


def give_back(underlay_ns: str, ours: set[str], names: dict[str, str]) -> list[str]:
    """Every link in underlay_ns that the lab did not make moved to the root namespace before the
    namespace goes (a physical NIC would return by itself, a virtual one would be destroyed),
    renamed to names[its MAC] where known (its name before `up`). Returns their names."""
    if not os.path.exists(underlay_ns):
        return []
    moved = []
    with iproute_in(underlay_ns) as under:
        for link in foreign(links(under), ours):
            name = names.get(link.mac, link.name)
            index = under.link_lookup(ifname=link.name)[0]
            under.link("set", index=index, state="down")
            fd = os.open(ROOT_NS, os.O_RDONLY)
            try:
                # The name in the same request: the kernel renames as it moves (and so never clashes midway).
                under.link("set", index=index, net_ns_fd=fd, ifname=name)
            finally:
                os.close(fd)
            moved.append(name)
    return moved
