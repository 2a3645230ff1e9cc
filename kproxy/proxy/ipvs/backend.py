"""What IPVS mode asks of the kernel, behind one small Protocol (Backend).

The proxier (proxier.py) decides what to change; a Backend only does it or reads it back:
IPVS virtual servers and real servers over netlink, the kube-ipvs0 link and its
addresses, ``ipset restore`` / list / destroy; iptables and sysctls through its
``netfilter`` (kproxy/proxy/tables.py, as every mode that writes iptables). NetlinkBackend is the real one (pyroute2 and the tools, in the calling
thread's network namespace); tests/fakes/ipvs.py holds the same in memory, so the
sync logic is tested without root, as kube-proxy tests its proxier against a fake ipvs.
"""

from __future__ import annotations

import socket
import subprocess
from dataclasses import dataclass
from typing import Any, Protocol

from kproxy import kmod
from kproxy.proxy.kernel import run
from kproxy.proxy.ipvs.render import DUMMY, Dest, VirtualServer
from kproxy.proxy import tables

PERSISTENT = 0x0001  # IP_VS_SVC_F_PERSISTENT
FWD_MASQ = 0  # IP_VS_CONN_F_MASQ
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP, "SCTP": 132}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}



@dataclass
class RealServer:
    """A real server as IPVS holds it: its weight and connection counts (ipvsadm's columns)."""

    weight: int
    active: int = 0  # ActiveConn
    inactive: int = 0  # InActConn


class Backend(Protocol):
    """Everything IPVS mode does to, or reads from, its node's kernel."""

    def open(self) -> None:
        """Be ready to talk to the kernel (load modules, open sockets); nothing if already so."""
        ...

    def close(self) -> None:
        """Let go of open sockets; the kernel keeps what it holds."""
        ...

    # IPVS (fwmark virtual servers are not ours and are not listed)
    def virtual_servers(self) -> list[VirtualServer]: ...
    def real_servers(self, vs: VirtualServer) -> dict[Dest, RealServer]: ...
    def add_virtual_server(self, vs: VirtualServer) -> None: ...
    def set_virtual_server(self, vs: VirtualServer) -> None: ...
    def delete_virtual_server(self, vs: VirtualServer) -> None: ...
    def add_real_server(self, vs: VirtualServer, dest: Dest, weight: int) -> None: ...
    def set_real_server(self, vs: VirtualServer, dest: Dest, weight: int) -> None: ...
    def delete_real_server(self, vs: VirtualServer, dest: Dest) -> None: ...

    # the kube-ipvs0 dummy link and its /32 addresses
    def ensure_link(self) -> None: ...
    def delete_link(self) -> None: ...
    def link_addresses(self) -> set[str]: ...
    def add_address(self, ip: str) -> None: ...
    def delete_address(self, ip: str) -> None: ...

    # ipsets
    def ipset_restore(self, text: str) -> None: ...
    def ipset_size(self, name: str) -> int | None:
        """Entries in the set; None if it cannot be listed."""
        ...

    def ipset_destroy(self, name: str) -> None:
        """Destroy the set; nothing if there is none."""
        ...

    # iptables rules and sysctls: the node's netfilter tables, as the other modes reach them
    netfilter: tables.Backend


class NetlinkBackend:
    """The kernel of the calling thread's network namespace: pyroute2's IPVS and IPRoute
    (opened at the first open(), in that thread's namespace), ipset and iptables-nft-restore
    run as its children."""

    def __init__(self, modules: tuple[kmod.Module, ...]) -> None:
        self.modules = modules
        self._ipr: Any = None
        self._ipvs: Any = None
        self._ifindex = 0  # kube-ipvs0's, known from ensure_link on
        self.netfilter: tables.Backend = tables.Commands("ipvs")

    def open(self) -> None:
        if self._ipr is None:
            from pyroute2 import IPVS, IPRoute

            kmod.ensure(self.modules)  # an agent restarted on a fresh boot, too
            self._ipr = IPRoute()
            self._ipvs = IPVS()

    def close(self) -> None:
        for sock in (self._ipr, self._ipvs):
            if sock is not None:
                sock.close()
        self._ipr = self._ipvs = None

    # IPVS

    def virtual_servers(self) -> list[VirtualServer]:
        found = (_parse_service(msg) for msg in self._ipvs.service("dump"))
        return [vs for vs in found if vs is not None]

    def real_servers(self, vs: VirtualServer) -> dict[Dest, RealServer]:
        out = {}
        for msg in self._ipvs.dest("dump", service=_service_key(vs)):
            dest = msg.get("IPVS_CMD_ATTR_DEST") or msg.get("dest")
            out[(dest.get("addr"), dest.get("port"))] = RealServer(
                dest.get("weight"), dest.get("active_conns") or 0, dest.get("inact_conns") or 0)
        return out

    def add_virtual_server(self, vs: VirtualServer) -> None:
        self._ipvs.service("add", service=_service_spec(vs))

    def set_virtual_server(self, vs: VirtualServer) -> None:
        self._ipvs.service("set", service=_service_spec(vs))

    def delete_virtual_server(self, vs: VirtualServer) -> None:
        self._ipvs.service("del", service=_service_key(vs))

    def add_real_server(self, vs: VirtualServer, dest: Dest, weight: int) -> None:
        self._ipvs.dest("add", service=_service_key(vs), dest=_dest_spec(dest, weight))

    def set_real_server(self, vs: VirtualServer, dest: Dest, weight: int) -> None:
        self._ipvs.dest("set", service=_service_key(vs), dest=_dest_spec(dest, weight))

    def delete_real_server(self, vs: VirtualServer, dest: Dest) -> None:
        self._ipvs.dest("del", service=_service_key(vs), dest=_dest_spec(dest, 0))

    # kube-ipvs0

    def ensure_link(self) -> None:
        links = self._ipr.link_lookup(ifname=DUMMY)
        if not links:
            self._ipr.link("add", ifname=DUMMY, kind="dummy")
            links = self._ipr.link_lookup(ifname=DUMMY)
        self._ifindex = links[0]

    def delete_link(self) -> None:
        for index in self._ipr.link_lookup(ifname=DUMMY):
            self._ipr.link("del", index=index)
        self._ifindex = 0

    def link_addresses(self) -> set[str]:
        links = self._ipr.link_lookup(ifname=DUMMY)  # by name: `kproxy rules` asks before any ensure_link
        if not links:
            return set()
        return {msg.get("IFA_ADDRESS") for msg in self._ipr.get_addr(index=links[0], family=socket.AF_INET)}

    def add_address(self, ip: str) -> None:
        self._ipr.addr("add", index=self._ifindex, address=ip, prefixlen=32)

    def delete_address(self, ip: str) -> None:
        self._ipr.addr("del", index=self._ifindex, address=ip, prefixlen=32)

    # ipsets, iptables, sysctls

    def ipset_restore(self, text: str) -> None:
        run(["ipset", "restore"], text)

    def ipset_size(self, name: str) -> int | None:
        done = subprocess.run(["ipset", "list", name, "-t"], capture_output=True, text=True)
        return next((int(line.split(":")[1]) for line in done.stdout.splitlines()
                     if line.startswith("Number of entries")), None)

    def ipset_destroy(self, name: str) -> None:
        subprocess.run(["ipset", "destroy", name], capture_output=True)



def _parse_service(msg: Any) -> VirtualServer | None:
    svc = msg.get("IPVS_CMD_ATTR_SERVICE") or msg.get("service")
    if svc is None or svc.get("fwmark"):
        return None
    flags = svc.get("flags") or {}
    persistent = bool((flags.get("flags") if isinstance(flags, dict) else 0) & PERSISTENT)
    protocol = PROTOCOL_NAMES.get(svc.get("protocol"), str(svc.get("protocol")))
    return VirtualServer(protocol, svc.get("addr"), svc.get("port"), svc.get("sched_name"),
                         svc.get("timeout") if persistent else 0)


def _service_key(vs: VirtualServer) -> Any:
    from pyroute2 import IPVSService

    return IPVSService(addr=vs.ip, port=vs.port, protocol=PROTOCOLS[vs.protocol])


def _service_spec(vs: VirtualServer) -> Any:
    from pyroute2 import IPVSService

    return IPVSService(addr=vs.ip, port=vs.port, protocol=PROTOCOLS[vs.protocol], sched_name=vs.scheduler,
                       flags={"flags": PERSISTENT if vs.persistence else 0, "mask": 0xFFFF},
                       timeout=vs.persistence, netmask="255.255.255.255")


def _dest_spec(dest: Dest, weight: int) -> Any:
    from pyroute2 import IPVSDest

    return IPVSDest(addr=dest[0], port=dest[1], weight=weight, fwd_method=FWD_MASQ)
