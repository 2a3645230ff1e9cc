"""A kernel for IPVS mode in memory: kproxy.proxy.ipvs.backend.Backend without root.

It holds virtual servers, real servers with weights and connection counts, the
kube-ipvs0 link and its addresses, ipsets (it reads ``ipset restore`` input),
iptables tables (tests/fakes/iptables.py reads the restore input) and
sysctls, and refuses what the kernel refuses (adding what exists, deleting what
does not), so a proxier that loses track of the kernel fails here too. ``calls``
lists every change made, in order, for tests that check what a sync touched.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable, Iterable, Mapping

from kproxy.proxy.conntrack import StaleUdpCleaner
from kproxy.proxy.ipvs.backend import RealServer
from kproxy.proxy.tables import Tables
from kproxy.proxy.ipvs.render import Dest, VirtualServer, VsKey
from kproxy.proxy.types import Endpoint, ProxyState, ServicePort
from tests.fakes.iptables import FakeIptables



class FakeIpvs:
    """The Backend of one fake node."""

    def __init__(self) -> None:
        self.virtual: dict[VsKey, VirtualServer] = {}
        self.real: dict[VsKey, dict[Dest, RealServer]] = {}
        self.link = False
        self.addresses: set[str] = set()
        self.ipsets: dict[str, tuple[str, set[str]]] = {}  # name -> (type, entries)
        self.netfilter = FakeIptables()  # its iptables rules and sysctls
        self.opened = False
        self.calls: list[str] = []

    # what tests do to it

    def connect(self, vs: VsKey, dest: Dest, active: int = 0, inactive: int = 0) -> None:
        """Let a real server have connections (as clients would give it)."""
        server = self.real[vs][dest]
        server.active, server.inactive = active, inactive

    def ipvsadm(self) -> list[str]:
        """The IPVS table, one line per virtual server and real server, sorted."""
        out = []
        for key in sorted(self.virtual):
            vs = self.virtual[key]
            out.append(f"{vs.protocol} {vs.address} {vs.scheduler}" + (f" persistent {vs.persistence}"
                                                                       if vs.persistence else ""))
            out += [f"  -> {ip}:{port} {d.weight} {d.active} {d.inactive}"
                    for (ip, port), d in sorted(self.real[key].items())]
        return out

    @property
    def tables(self) -> Tables:
        return self.netfilter.tables

    @property
    def sysctls(self) -> dict[str, str]:
        return self.netfilter.sysctls

    def entries(self, name: str) -> set[str]:
        return self.ipsets[name][1]

    # Backend

    def open(self) -> None:
        self.opened = True

    def close(self) -> None:
        self.opened = False

    def _check_open(self) -> None:
        if not self.opened:
            raise OSError("netlink socket closed")

    def virtual_servers(self) -> list[VirtualServer]:
        self._check_open()
        return list(self.virtual.values())

    def real_servers(self, vs: VirtualServer) -> dict[Dest, RealServer]:
        self._check_open()
        return copy.deepcopy(self.real[vs.key])  # the kernel's answer, not the kernel

    def add_virtual_server(self, vs: VirtualServer) -> None:
        self._change(f"add_virtual_server {vs.protocol} {vs.address} {vs.scheduler} {vs.persistence}")
        if vs.key in self.virtual:
            raise FileExistsError(vs.key)
        self.virtual[vs.key], self.real[vs.key] = vs, {}

    def set_virtual_server(self, vs: VirtualServer) -> None:
        self._change(f"set_virtual_server {vs.protocol} {vs.address} {vs.scheduler} {vs.persistence}")
        self._virtual(vs)
        self.virtual[vs.key] = vs

    def delete_virtual_server(self, vs: VirtualServer) -> None:
        self._change(f"delete_virtual_server {vs.protocol} {vs.address}")
        self._virtual(vs)
        del self.virtual[vs.key], self.real[vs.key]

    def add_real_server(self, vs: VirtualServer, dest: Dest, weight: int) -> None:
        self._change(f"add_real_server {vs.protocol} {vs.address} {dest[0]}:{dest[1]} {weight}")
        servers = self._virtual(vs)
        if dest in servers:
            raise FileExistsError(dest)
        servers[dest] = RealServer(weight)

    def set_real_server(self, vs: VirtualServer, dest: Dest, weight: int) -> None:
        self._change(f"set_real_server {vs.protocol} {vs.address} {dest[0]}:{dest[1]} {weight}")
        self._virtual(vs)[dest].weight = weight

    def delete_real_server(self, vs: VirtualServer, dest: Dest) -> None:
        self._change(f"delete_real_server {vs.protocol} {vs.address} {dest[0]}:{dest[1]}")
        del self._virtual(vs)[dest]

    def ensure_link(self) -> None:
        self._check_open()
        if not self.link:
            self._change("add_link")
            self.link = True

    def delete_link(self) -> None:
        self._check_open()
        if self.link:
            self._change("delete_link")
            self.link, self.addresses = False, set()

    def link_addresses(self) -> set[str]:
        self._check_open()
        return set(self.addresses)

    def add_address(self, ip: str) -> None:
        self._change(f"add_address {ip}")
        if not self.link or ip in self.addresses:
            raise FileExistsError(ip)
        self.addresses.add(ip)

    def delete_address(self, ip: str) -> None:
        self._change(f"delete_address {ip}")
        self.addresses.remove(ip)

    def ipset_restore(self, text: str) -> None:
        self.calls.append("ipset_restore")
        sets = copy.deepcopy(self.ipsets)  # ipset applies the lines before a bad one; this fake: all or none
        for line in text.splitlines():
            word, name, *rest = line.split()
            exist = "-exist" in rest
            if word == "create":
                if name in sets and not exist:
                    raise RuntimeError(f"ipset: set {name} exists")
                sets.setdefault(name, (rest[0], set()))
            elif word == "flush":
                sets[name][1].clear()
            elif word in ("add", "del"):
                entries = sets[name][1]
                if (rest[0] in entries) == (word == "add") and not exist:
                    raise RuntimeError(f"ipset: {line}")
                (entries.add if word == "add" else entries.discard)(rest[0])
            elif word == "swap":
                sets[name], sets[rest[0]] = sets[rest[0]], sets[name]
            elif word == "destroy":
                del sets[name]
            else:
                raise ValueError(f"fake ipset: cannot read {line!r}")
        self.ipsets = sets

    def ipset_size(self, name: str) -> int | None:
        found = self.ipsets.get(name)
        return None if found is None else len(found[1])

    def ipset_destroy(self, name: str) -> None:
        if self.ipsets.pop(name, None) is not None:
            self.calls.append(f"ipset_destroy {name}")

    def _change(self, call: str) -> None:
        self._check_open()
        self.calls.append(call)

    def _virtual(self, vs: VirtualServer) -> dict[Dest, RealServer]:
        if vs.key not in self.virtual:
            raise FileNotFoundError(vs.key)
        return self.real[vs.key]


class FakeConntrack(StaleUdpCleaner):
    """Runs no conntrack: records which service ports each sync handed over, and the endpoints
    the mode said it sends each one's traffic to."""

    def __init__(self) -> None:
        super().__init__("ipvs")
        self.synced: list[list[str]] = []
        self.reachable: dict[str, list[str]] = {}  # of the last sync, by key: "ip:port"s

    def sync(self, state: ProxyState, by_key: Mapping[str, ServicePort],
             reachable: Callable[[ServicePort, list[Endpoint]], Iterable[Endpoint]]) -> None:
        self.synced.append(sorted(by_key))
        self.reachable = {key: [ep.address for ep in reachable(svc, state.endpoints_of(svc))]
                          for key, svc in by_key.items()}


if TYPE_CHECKING:  # FakeIpvs is a Backend, checked by a type checker
    from kproxy.proxy.ipvs.backend import Backend

    _backend: type[Backend] = FakeIpvs
