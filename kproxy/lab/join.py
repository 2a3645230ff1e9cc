"""This machine's nodes joining a lab another machine runs: `kproxy lab join`.

The lab's maker ran `kproxy lab up --store etcd --nic MAC`: etcd in its control-plane
member, its underlay bridged onto a NIC that shares an Ethernet segment with ours. Joining
is what `kubeadm join` does with an API server's address, in four steps:

1. Our lab NIC (found by MAC, never by a default route: docs/multi-vm.md) becomes a port of
   our own underlay bridge, so our nodes sit on the same segment as the maker's.
2. First contact. We have no address on that network yet, and do not know its size. The
   underlay's bridge borrows one for a moment: the first address below etcd's that an ARP
   probe (RFC 5227, `arping -D`) finds unanswered, routed to etcd alone.
3. The lab's parameters come from the store (kproxy.lab.labconfig), and so do the Nodes of
   every machine: our nodes take names, IPs and pod CIDRs none of them has, claimed by a
   write that holds only if the store did not change since we read it (kproxy.lab.build).
4. Our nodes are built as `up` builds a lab's, with the lab's overlay, mode and DNS, and
   their agents and flanneld follow the maker's etcd over the underlay. The borrowed address
   is gone by then.
"""

from __future__ import annotations

import ipaddress
import subprocess
from contextlib import contextmanager
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit

from cni.netns import iproute_in
from kproxy.errors import KproxyError
from kproxy.lab import build, kubelet, labconfig, nic as lab_nic
from kproxy.lab.planning import others_in
from kproxy.lab.state import LabState, lab_dir, lab_namespaces, load_state, ns_name, ns_path
from kproxy.lab.topology import Topology, lab_name, parse_topology
from kproxy.lab.wiring import UNDERLAY, UNDERLAY_BRIDGE, ensure_bridge, ensure_namespaces
from kproxy.store import Conflict, View, etcd_url, open_store

PROBES = 2  # ARP probes per address, and as many seconds to wait for an answer (RFC 5227 asks 3 over 1-2 s)
CANDIDATES = 16  # addresses below etcd's tried for first contact


def answered(lab: str, address: str) -> bool:
    """Whether anything on the underlay's segment holds address (an ARP probe from 0.0.0.0)."""
    done = subprocess.run(["ip", "netns", "exec", ns_name(lab, UNDERLAY), "arping", "-D", "-q", "-I", UNDERLAY_BRIDGE,
                           "-c", str(PROBES), "-w", str(PROBES), address], capture_output=True, text=True)
    if done.returncode not in (0, 1):
        raise KproxyError(f"arping {address} in {ns_name(lab, UNDERLAY)} failed: "
                          f"{done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.returncode == 1


@contextmanager
def borrowed_address(lab: str, etcd_ip: str) -> Iterator[str]:
    """A free address on the underlay's bridge, routed to etcd_ip only, while the block runs."""
    below = ipaddress.IPv4Address(etcd_ip) - 1
    candidates = [str(below - i) for i in range(CANDIDATES) if int(below) - i > 0]
    address = next((a for a in candidates if not answered(lab, a)), None)
    if address is None:
        raise KproxyError(f"the {CANDIDATES} addresses below {etcd_ip} all answer ARP probes on the lab NIC's "
                          "network; none is free for first contact")
    with iproute_in(ns_path(lab, UNDERLAY)) as ipr:
        bridge = ipr.link_lookup(ifname=UNDERLAY_BRIDGE)[0]
        ipr.addr("add", index=bridge, address=address, prefixlen=32)
        ipr.route("replace", dst=f"{etcd_ip}/32", oif=bridge, prefsrc=address)
    try:
        yield address
    finally:
        with iproute_in(ns_path(lab, UNDERLAY)) as ipr:
            ipr.addr("del", index=bridge, address=address, prefixlen=32)  # its route goes with it


def topology_of(raw: Any, config: labconfig.LabConfig, name: str) -> Topology:
    """The joining machine's topology (name, nodes, pods) with the lab's own fields; a field the
    file sets otherwise is refused."""
    if not isinstance(raw, dict):
        raise KproxyError("a topology must be a YAML mapping with nodes and pods")
    wide = config.topology_fields()
    for field in labconfig.LAB_WIDE:
        if field in raw and str(raw[field]) != wide[field]:
            raise KproxyError(f"the topology sets {field} {raw[field]}, but the lab has {wide[field]} "
                              "(a joining machine takes the lab's; leave it out)")
    return parse_topology({**raw, **wide}, name)


def name_of(raw: Any, name: str | None = None) -> str:
    """The lab joined: name, else the topology's name field (a joining machine must say which)."""
    given = name or (raw.get("name") if isinstance(raw, dict) else None)
    if not given:
        raise KproxyError("name the lab to join: a name field in the topology, or --name")
    return lab_name(given)


def _contact(name: str, endpoint: str, mac: str, say: Callable[[str], object]) -> View:
    """Our lab NIC into our underlay's bridge, and the lab's store at endpoint read over it."""
    found, in_underlay = lab_nic.find(mac, ns_path(name, UNDERLAY))
    ensure_namespaces(name, [UNDERLAY])
    ensure_bridge(name)
    if not in_underlay:
        say(lab_nic.notice(found.name, mac, name))
    lab_nic.attach(mac, ns_path(name, UNDERLAY), UNDERLAY_BRIDGE)
    from kproxy.store.etcd import EtcdStore  # requests: for labs that use etcd only

    with borrowed_address(name, urlsplit(endpoint).hostname or ""):
        return EtcdStore(endpoint, f"/kproxy/{name}/", ns_path(name, UNDERLAY)).read()


@contextmanager
def _first_time(name: str, fresh: bool) -> Iterator[None]:
    """A first join or make that fails leaves nothing behind, here or in the lab's store."""
    if fresh and lab_namespaces(name):
        build.teardown(name)  # leftovers of a crash before any state was written
    try:
        yield
    except BaseException:
        if fresh:
            build.teardown(name)
        raise


def make_on(topology: Topology, url: str, mac: str, mode: str | None = None,
            mode_options: dict[str, str] | None = None, dns: bool | None = None,
            say: Callable[[str], object] = print) -> tuple[LabState, kubelet.Report]:
    """`lab up --store etcd://IP:PORT --nic MAC`: the lab made here, its store in an etcd that
    another machine runs on the underlay (reached over the NIC with mac), which must not hold a
    lab of that name already; again on a running lab reconciles it."""
    endpoint = etcd_url(url)
    mac = lab_nic.parse_mac(mac)
    if load_state(topology.name) is not None:  # up refuses another store or NIC
        return build.up(topology, mode, mode_options, say, dns, "etcd", mac, store_endpoint=endpoint)
    lab_nic.find(mac, ns_path(topology.name, UNDERLAY))  # refused here, before anything is made
    with _first_time(topology.name, fresh=True):
        view = _contact(topology.name, endpoint, mac, say)
        if labconfig.KEY in view.objects:
            raise KproxyError(f"the etcd at {url} holds a lab {topology.name} already, made by another machine: "
                              "join it ('kproxy lab join') or choose another name")
        return build.up(topology, mode, mode_options, say, dns, "etcd", mac, others=others_in(view, []),
                        store_endpoint=endpoint)


def join(raw: Any, url: str, mac: str, name: str, say: Callable[[str], object] = print) -> tuple[LabState, kubelet.Report]:
    """Build the topology's nodes and pods here, as part of lab name at url (etcd://IP:PORT), its
    underlay stretched over the NIC with mac; again on a machine that joined reconciles."""
    endpoint = etcd_url(url)
    mac = lab_nic.parse_mac(mac)
    previous = load_state(name)
    if previous is not None and (not previous.joined or previous.store_endpoint != endpoint):
        raise KproxyError(f"lab {name} runs on this machine already "
                          + (f"(joined at {previous.store_endpoint})" if previous.joined else "(made here)")
                          + f"; take it down first ('kproxy lab down {name}')")
    if previous is not None and previous.nic != mac:
        raise KproxyError(f"lab {name} runs with NIC {previous.nic}, not {mac}; take it down first "
                          f"('kproxy lab down {name}')")
    lab_nic.find(mac, ns_path(name, UNDERLAY))  # refused here, before anything is made
    had = list(previous.nodes) if previous else []
    with _first_time(name, fresh=previous is None):
        view = _contact(name, endpoint, mac, say)
        config = labconfig.lab_config(name, view)
        topology = topology_of(raw, config, name)
        others = others_in(view, had)
        attempt = 1
        while True:
            try:
                return build.up(topology, config.mode, config.mode_options, say, config.dns, "etcd", mac,
                                joined=True, others=others, store_endpoint=endpoint)
            except Conflict:  # another machine took what we planned to: plan again, from what it wrote
                if attempt == build.CLAIM_ATTEMPTS:
                    raise
                attempt += 1
                others = others_in(open_store(lab_dir(name)).read(), had)
