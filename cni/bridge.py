"""The bridge plugin: a veth from the pod's namespace to a bridge on the host.

Behaves like the reference bridge plugin (containernetworking/plugins): the
bridge is created when missing, the pod end of the veth is named CNI_IFNAME,
the host end joins the bridge, IPAM is delegated, and isGateway /
isDefaultGateway / ipMasq / hairpinMode / promiscMode / mtu mean what they
mean there. `Bridge(host_ns=...)` does the host side in another namespace,
which is how the lab wires pods of many nodes from one process.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import secrets
from dataclasses import dataclass
from typing import Any

from pyroute2.iproute.linux import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni import masq
from cni.delegate import run_ipam
from cni.errors import (
    CHECK_FAILED,
    INTERFACE_EXISTS,
    INVALID_CONFIG,
    NETLINK_FAILURE,
    CNIError,
)
from cni.netns import iproute_in, open_ns, write_sysctl
from cni.spec import Request, validate_ifname

DEFAULT_BRIDGE = "cni0"
DEFAULT_MTU = 1500
IFF_UP = 0x1
IFF_PROMISC = 0x100
RTPROT_BOOT = 3  # what the reference's routes carry (pyroute2 would say "static")


@dataclass(frozen=True)
class BridgeConfig:
    bridge: str = DEFAULT_BRIDGE
    is_gateway: bool = False
    is_default_gateway: bool = False
    force_address: bool = False
    ip_masq: bool = False
    mtu: int = DEFAULT_MTU
    hairpin_mode: bool = False
    promisc_mode: bool = False


_BOOL_FIELDS = {
    "isGateway": "is_gateway",
    "isDefaultGateway": "is_default_gateway",
    "forceAddress": "force_address",
    "ipMasq": "ip_masq",
    "hairpinMode": "hairpin_mode",
    "promiscMode": "promisc_mode",
}


def parse_bridge_config(config: dict[str, Any]) -> BridgeConfig:
    values: dict[str, Any] = {}
    for key, attr in _BOOL_FIELDS.items():
        if key in config:
            if not isinstance(config[key], bool):
                raise CNIError(INVALID_CONFIG, f"{key} must be true or false")
            values[attr] = config[key]
    if "bridge" in config:
        if not isinstance(config["bridge"], str):
            raise CNIError(INVALID_CONFIG, "bridge must be an interface name")
        try:
            values["bridge"] = validate_ifname(config["bridge"])
        except CNIError as err:
            raise CNIError(INVALID_CONFIG, f"bridge: {err.msg}", err.details) from None
    if "mtu" in config and config["mtu"] not in (None, 0):
        mtu = config["mtu"]
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
            raise CNIError(INVALID_CONFIG, "mtu must be an integer between 68 and 65535")
        values["mtu"] = mtu
    cfg = BridgeConfig(**values)
    if cfg.hairpin_mode and cfg.promisc_mode:
        raise CNIError(INVALID_CONFIG, "cannot set hairpin mode and promiscuous mode at the same time")
    if cfg.is_default_gateway:  # as in the reference: a default gateway is a gateway
        cfg = BridgeConfig(**{**cfg.__dict__, "is_gateway": True})
    return cfg


def _first(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _get(ipr: IPRoute, ifname: str) -> Any:
    """The link message of ifname, or None when there is none (one round trip)."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def _describe(link: Any, version: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": link.get("IFLA_IFNAME"), "mac": link.get("IFLA_ADDRESS")}
    if version != "1.0.0":
        out["mtu"] = link.get("IFLA_MTU")
    return out


def _broadcast(iface: Any) -> dict[str, str]:
    """IPv4 addresses get a broadcast address, as the reference (Go netlink) sets."""
    if iface.version == 4 and iface.network.prefixlen < 31:
        return {"broadcast": str(iface.network.broadcast_address)}
    return {}


def _netlink(what: str, exc: NetlinkError) -> CNIError:
    return CNIError(NETLINK_FAILURE, f"{what}: {os.strerror(exc.code)}")


class Bridge:
    """The plugin's commands; host_ns is where the bridge lives (None: here)."""

    def __init__(self, host_ns: str | None = None) -> None:
        self.host_ns = host_ns

    # ADD ------------------------------------------------------------------
    def add(self, req: Request) -> dict[str, Any]:
        cfg = parse_bridge_config(req.config)
        os.close(open_ns(req.netns))  # a missing netns is code 3 before IPAM hands out anything
        ipam_result = run_ipam(req, "ADD") or {}
        try:
            if not ipam_result.get("ips"):
                raise CNIError(INVALID_CONFIG, "IPAM plugin returned no IP addresses")
            return self._wire(cfg, req, ipam_result)
        except BaseException:
            run_ipam(req, "DEL")
            raise

    def _wire(self, cfg: BridgeConfig, req: Request, ipam_result: dict[str, Any]) -> dict[str, Any]:
        ips = [dict(ip) for ip in ipam_result["ips"]]
        routes = [dict(r) for r in ipam_result.get("routes", [])]
        gateways = [ipaddress.ip_interface(f"{ip['gateway']}/{ipaddress.ip_interface(ip['address']).network.prefixlen}")
                    for ip in ips if ip.get("gateway")]
        if cfg.is_default_gateway:
            if not gateways:
                raise CNIError(INVALID_CONFIG, "isDefaultGateway needs a gateway from IPAM")
            routes = [r for r in routes if r.get("dst") != "0.0.0.0/0"]
            routes.append({"dst": "0.0.0.0/0", "gw": str(gateways[0].ip)})

        netns_fd = open_ns(req.netns)
        with iproute_in(self.host_ns) as host, iproute_in(req.netns) as pod:
            try:
                bridge = self._ensure_bridge(host, cfg)
                bridge_index = bridge["index"]
                # The bridge's own MAC before a port joins: it adopts the lowest port MAC otherwise.
                bridge_mac = bridge.get("IFLA_ADDRESS")
                host_veth = self._create_veth(host, pod, netns_fd, req, cfg, bridge_index)
            finally:
                os.close(netns_fd)
            try:
                host_link = _get(host, host_veth)
                if host_link is None:
                    raise CNIError(NETLINK_FAILURE, f"{host_veth} vanished right after it was created")
                if cfg.hairpin_mode:
                    host.brport("set", index=host_link["index"], mode=1)
                pod_link = _get(pod, req.ifname)
                if pod_link is None:
                    raise CNIError(NETLINK_FAILURE, f"{req.ifname} vanished from {req.netns} right after it was created")
                pod_index = pod_link["index"]
                for ip in ips:
                    iface = ipaddress.ip_interface(ip["address"])
                    pod.addr("add", index=pod_index, address=str(iface.ip), prefixlen=iface.network.prefixlen,
                             **_broadcast(iface))
                pod.link("set", index=pod_index, state="up")
                for route in routes:
                    self._add_route(pod, pod_index, route, gateways)
                pinned = None
                if cfg.is_gateway:
                    for gw in gateways:
                        self._ensure_address(host, bridge_index, cfg, gw)
                    if gateways:  # as the reference: pin the MAC so it does not change as pods churn
                        pinned = self._pin_mac(host, bridge_index, bridge_mac)
                    write_sysctl(self.host_ns, "net/ipv4/ip_forward", "1")
                if cfg.ip_masq:
                    masq.setup(self.host_ns, req.network, req.container_id, [ip["address"] for ip in ips])
                if pinned is None or req.version != "1.0.0":  # its MAC may have moved, or its MTU with the port
                    bridge_desc = _describe(host.get_links(bridge_index)[0], req.version)
                else:  # what a fresh look would show, without the round trip
                    bridge_desc = {**_describe(bridge, req.version), "mac": pinned}
                interfaces = [
                    bridge_desc,
                    _describe(host_link, req.version),
                    {**_describe(pod_link, req.version), "sandbox": req.netns},
                ]
            except NetlinkError as exc:
                self._remove_link(host, host_veth)
                raise _netlink(f"configuring {req.ifname} in {req.netns}", exc) from None
            except BaseException:
                self._remove_link(host, host_veth)
                raise
        for ip in ips:
            ip["interface"] = 2
        result: dict[str, Any] = {"cniVersion": req.version, "interfaces": interfaces, "ips": ips}
        if routes:  # like the reference (Go omitempty): no "routes" key when there are none
            result["routes"] = routes
        result["dns"] = req.config.get("dns") or ipam_result.get("dns") or {}
        return result

    @staticmethod
    def _ensure_bridge(host: IPRoute, cfg: BridgeConfig) -> Any:
        """The bridge's link message (made when missing), the bridge up."""
        link = _get(host, cfg.bridge)
        if link is None:
            try:
                host.link("add", ifname=cfg.bridge, kind="bridge", mtu=cfg.mtu)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:  # another ADD may have just made it
                    raise _netlink(f"creating bridge {cfg.bridge}", exc) from None
            link = _get(host, cfg.bridge)
            if link is None:
                raise CNIError(NETLINK_FAILURE, f"bridge {cfg.bridge} vanished right after it was created")
        info = link.get("IFLA_LINKINFO")
        if info is None or info.get("IFLA_INFO_KIND") != "bridge":
            raise CNIError(INVALID_CONFIG, f"{cfg.bridge} already exists but is not a bridge")
        if cfg.promisc_mode:
            host.link("set", index=link["index"], flags=IFF_PROMISC, change=IFF_PROMISC)
        if not link["flags"] & IFF_UP:
            host.link("set", index=link["index"], state="up")
        return link

    @staticmethod
    def _pin_mac(host: IPRoute, index: int, mac: str | None) -> str:
        """Set the bridge's MAC explicitly, so the kernel stops following the lowest port MAC.

        A bridge whose ports all left has 00:00:00:00:00:00 until one joins; then
        the MAC it has now (its new port's) is the one to keep.
        """
        if not mac or mac == "00:00:00:00:00:00":
            mac = host.get_links(index)[0].get("IFLA_ADDRESS")
        host.link("set", index=index, address=mac)
        return mac  # type: ignore[return-value]

    @staticmethod
    def _create_veth(host: IPRoute, pod: IPRoute, netns_fd: int, req: Request, cfg: BridgeConfig,
                     bridge_index: int) -> str:
        """The veth pair, its host end already up on the bridge (one round trip)."""
        for _ in range(5):  # random names may collide; the reference retries too
            name = "veth" + secrets.token_hex(4)
            try:
                host.link("add", ifname=name, kind="veth", mtu=cfg.mtu, master=bridge_index, state="up",
                          peer={"ifname": req.ifname, "net_ns_fd": netns_fd, "mtu": cfg.mtu})
                return name
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise _netlink(f"creating veth pair for {req.ifname}", exc) from None
                if _get(pod, req.ifname) is not None:
                    raise CNIError(INTERFACE_EXISTS, f"interface {req.ifname} already exists in {req.netns}") from None
        raise CNIError(INTERFACE_EXISTS, "could not find a free veth name")

    @staticmethod
    def _add_route(pod: IPRoute, index: int, route: dict[str, str], gateways: list[Any]) -> None:
        dst = ipaddress.ip_network(route["dst"], strict=False)
        gw = route.get("gw") or next((str(g.ip) for g in gateways if g.version == dst.version), None)
        kwargs: dict[str, Any] = {"dst": str(dst), "oif": index, "proto": RTPROT_BOOT}
        if gw:
            kwargs["gateway"] = gw
        try:
            pod.route("add", **kwargs)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise

    @staticmethod
    def _ensure_address(host: IPRoute, index: int, cfg: BridgeConfig, gw: Any) -> None:
        family = 2 if gw.version == 4 else 10
        for addr in host.get_addr(index=index, family=family):
            have = ipaddress.ip_interface(f"{addr.get('IFA_ADDRESS')}/{addr['prefixlen']}")
            if have == gw:
                return
            if gw.version == 4 or have.network.overlaps(gw.network):
                if not cfg.force_address:
                    raise CNIError(
                        INVALID_CONFIG,
                        f"{cfg.bridge} already has an IP address {have} different from {gw}",
                        "set forceAddress: true to replace it, or delete the bridge",
                    )
                host.addr("del", index=index, address=str(have.ip), prefixlen=have.network.prefixlen)
        try:
            host.addr("add", index=index, address=str(gw.ip), prefixlen=gw.network.prefixlen, **_broadcast(gw))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # a concurrent ADD set the same address
                raise

    @staticmethod
    def _remove_link(ipr: IPRoute, name: str) -> None:
        index = _first(ipr, name)
        if index is not None:
            try:
                ipr.link("del", index=index)
            except NetlinkError:
                pass

    # DEL ------------------------------------------------------------------
    def delete(self, req: Request) -> None:
        cfg = parse_bridge_config(req.config)
        run_ipam(req, "DEL")
        if cfg.ip_masq:
            masq.teardown(self.host_ns, req.network, req.container_id)
        if not req.netns or not os.path.exists(req.netns):
            return  # the namespace is gone, and the veth pair with it
        try:
            with iproute_in(req.netns) as pod:
                self._remove_link(pod, req.ifname)
        except CNIError:
            return  # vanished between the check and the open

    # CHECK ----------------------------------------------------------------
    def check(self, req: Request) -> None:
        cfg = parse_bridge_config(req.config)
        prev = req.config.get("prevResult")
        if not isinstance(prev, dict):
            raise CNIError(INVALID_CONFIG, "CHECK needs prevResult in the network configuration")
        run_ipam(req, "CHECK")
        with iproute_in(self.host_ns) as host, iproute_in(req.netns) as pod:
            bridge_index = _first(host, cfg.bridge)
            if bridge_index is None:
                raise CNIError(CHECK_FAILED, f"bridge {cfg.bridge} does not exist")
            pod_index = _first(pod, req.ifname)
            if pod_index is None:
                raise CNIError(CHECK_FAILED, f"interface {req.ifname} does not exist in {req.netns}")
            for iface in prev.get("interfaces", []):
                if iface.get("sandbox"):
                    continue
                if iface.get("name") != cfg.bridge:
                    index = _first(host, iface.get("name", ""))
                    if index is None or host.get_links(index)[0].get("IFLA_MASTER") != bridge_index:
                        raise CNIError(CHECK_FAILED, f"host interface {iface.get('name')} is not on bridge {cfg.bridge}")
            have = {
                ipaddress.ip_interface(f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}")
                for a in pod.get_addr(index=pod_index)
            }
            for ip in prev.get("ips", []):
                if ipaddress.ip_interface(ip["address"]) not in have:
                    raise CNIError(CHECK_FAILED, f"address {ip['address']} is missing on {req.ifname}")
            table = {}
            for r in pod.get_routes(family=2):
                table.setdefault((r.get("RTA_DST") or "0.0.0.0", r["dst_len"]), set()).add(r.get("RTA_GATEWAY"))
            for route in prev.get("routes", []):
                dst = ipaddress.ip_network(route["dst"], strict=False)
                gateways_seen = table.get((str(dst.network_address), dst.prefixlen))
                if gateways_seen is None or (route.get("gw") and route["gw"] not in gateways_seen):
                    raise CNIError(CHECK_FAILED, f"route to {route['dst']} is missing in {req.netns}")

    # GC, STATUS -----------------------------------------------------------
    def gc(self, req: Request) -> None:
        run_ipam(req, "GC")

    def status(self, req: Request) -> None:
        run_ipam(req, "STATUS")
