"""IPVS mode on a real kernel (natively, or in the QEMU guest where this kernel lacks IPVS)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time

import pytest
from pyroute2 import IPVS, IPVSService

from cni.masq import IPTABLES_SAVE
from cni.netns import entered, iproute_in
from kproxy import kmod
from kproxy.proxy.ipvs import IpvsProxier, kernel_modules
from kproxy.proxy.types import Endpoint, NodeInfo, ProxyState, ServicePort
from tests.runtime import in_ns

pytestmark = [pytest.mark.kernel, pytest.mark.ipvs]


def test_the_kernel_has_ipvs_and_dummy_links_once_kproxy_loaded_them(netns) -> None:
    # What the IPVS proxier does first (the guest boots with nothing loaded; the kernel does not
    # load ip_vs on the first netlink request).
    kmod.ensure(kernel_modules())
    node = netns("node")
    with iproute_in(node) as ipr:
        ipr.link("add", ifname="kube-ipvs0", kind="dummy")
        assert ipr.link_lookup(ifname="kube-ipvs0")
    with entered(node):
        ipvs = IPVS()
    try:
        ipvs.service("add", service=IPVSService(addr="10.96.0.10", port=80, protocol=socket.IPPROTO_TCP,
                                                sched_name="rr"))
    finally:
        ipvs.close()
    assert "TCP 10.96.0.10:80 rr" in _ipvsadm(node)



# --- the proxier on a node namespace ------------------------------------------

NODE = NodeInfo("node1", "192.168.99.11", "10.244.0.0/16")


def _svc(name: str, ip: str, port: int, protocol: str = "TCP", **kw) -> ServicePort:
    return ServicePort("default", name, "", protocol, ip, port, **kw)


def _state(*pairs: tuple[ServicePort, list[Endpoint]]) -> ProxyState:
    return ProxyState([svc for svc, _ in pairs], {svc.key: eps for svc, eps in pairs})


@pytest.fixture
def node_with_pod(netns):
    """A node namespace with a pod (10.244.1.2, an echo server on :8080) behind a veth."""
    node, pod = netns("node"), netns("pod")
    with iproute_in(node) as ipr:
        ipr.link("add", ifname="eth0", kind="dummy")  # the node IP lives here
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address=NODE.ip, prefixlen=24)
        ipr.link("set", index=eth0, state="up")
        pod_fd = os.open(pod, os.O_RDONLY)
        try:
            ipr.link("add", ifname="veth-pod", kind="veth", peer={"ifname": "eth0", "net_ns_fd": pod_fd})
        finally:
            os.close(pod_fd)
        veth = ipr.link_lookup(ifname="veth-pod")[0]
        ipr.addr("add", index=veth, address="10.244.1.1", prefixlen=24)
        ipr.link("set", index=veth, state="up")
    with iproute_in(pod) as ipr:
        eth0 = ipr.link_lookup(ifname="eth0")[0]
        ipr.addr("add", index=eth0, address="10.244.1.2", prefixlen=24)
        ipr.link("set", index=eth0, state="up")
        ipr.route("add", dst="0.0.0.0/0", gateway="10.244.1.1")
    with entered(pod):
        server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", 8080))
    server.listen(16)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(100):
                conn.sendall(data)

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            conn.settimeout(None)
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    proxier = None
    try:
        with entered(node):
            proxier = IpvsProxier(NODE)
        yield node, pod, proxier
    finally:
        stop.set()
        thread.join()
        server.close()
        if proxier is not None:
            proxier.close()


def _ipvsadm(node: str) -> str:
    """ipvsadm -Ln with runs of spaces squeezed."""
    return "\n".join(" ".join(line.split()) for line in in_ns(node, "ipvsadm", "-Ln").stdout.splitlines()) + "\n"


def _sync(node: str, proxier: IpvsProxier, state: ProxyState) -> None:
    with entered(node):
        proxier.sync(state)


POD = Endpoint("10.244.1.2", 8080, "node1")
OTHER = Endpoint("10.244.2.7", 8080, "node2")


def test_sync_programs_kube_ipvs0_virtual_servers_ipsets_iptables_and_sysctls(node_with_pod) -> None:
    node, _, proxier = node_with_pod
    web = _svc("web", "10.96.0.10", 80, node_port=30080)
    sticky = _svc("sticky", "10.96.0.11", 81, affinity_seconds=7, mode_info="sh")
    dns = _svc("dns", "10.96.0.12", 53, protocol="UDP")
    _sync(node, proxier, _state((web, [POD, OTHER]), (sticky, [POD]), (dns, [OTHER])))
    shown = _ipvsadm(node)
    for line in ("TCP 10.96.0.10:80 rr", "TCP 192.168.99.11:30080 rr", "TCP 10.96.0.11:81 sh persistent 7",
                 "UDP 10.96.0.12:53 rr", "-> 10.244.1.2:8080 Masq 1", "-> 10.244.2.7:8080"):
        assert line in shown, shown
    addrs = in_ns(node, "ip", "-o", "-4", "addr", "show", "dev", "kube-ipvs0").stdout
    assert {"10.96.0.10/32", "10.96.0.11/32", "10.96.0.12/32"} <= set(addrs.split()), addrs
    sets = in_ns(node, "ipset", "list").stdout
    for entry in ("10.96.0.10,tcp:80", "10.96.0.12,udp:53", "10.244.1.2,tcp:8080,10.244.1.2"):
        assert entry in sets
    assert "10.244.2.7,tcp:8080,10.244.2.7" not in sets  # hairpin set: local endpoints only
    node_ports = in_ns(node, "ipset", "list", "KUBE-NODE-PORT-TCP").stdout
    assert "\n30080\n" in node_ports
    nat = in_ns(node, IPTABLES_SAVE, "-t", "nat").stdout
    assert "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES" in nat
    assert "-m set --match-set KUBE-CLUSTER-IP dst,dst -j KUBE-MARK-MASQ" in nat
    assert "-m set --match-set KUBE-LOOP-BACK dst,dst,src -j MASQUERADE" in nat
    for name in ("conntrack", "expire_nodest_conn", "expire_quiescent_template"):
        assert in_ns(node, "cat", f"/proc/sys/net/ipv4/vs/{name}").stdout.strip() == "1"
    # Only what differs changes: an identical state changes nothing, one new service one thing.
    with entered(node):
        assert proxier.sync(_state((web, [POD, OTHER]), (sticky, [POD]), (dns, [OTHER]))).changed_services == 0
    # The per-service scheduler and persistence follow the Service; removed services go.
    _sync(node, proxier, _state((web, [POD]), (_svc("sticky", "10.96.0.11", 81, mode_info="lc"), [POD])))
    shown = _ipvsadm(node)
    assert "TCP 10.96.0.11:81 lc" in shown and "persistent" not in shown and "10.96.0.12" not in shown, shown
    assert "10.96.0.12" not in in_ns(node, "ip", "-o", "addr", "show", "dev", "kube-ipvs0").stdout
    with entered(node):
        proxier.cleanup()
    assert _ipvsadm(node).count("\n") == 3  # only the header
    assert "kube-ipvs0" not in in_ns(node, "ip", "link").stdout
    assert "KUBE-" not in in_ns(node, "ipset", "list", "-n").stdout
    assert "KUBE-" not in in_ns(node, IPTABLES_SAVE).stdout


def test_graceful_termination_and_established_connections_across_syncs(node_with_pod) -> None:
    node, _, proxier = node_with_pod
    web = _svc("web", "10.96.0.10", 80)
    _sync(node, proxier, _state((web, [POD])))
    with entered(node):
        conn = socket.create_connection(("10.96.0.10", 80), timeout=5)
    try:
        conn.sendall(b"one")
        assert conn.recv(10) == b"one"
        # An unrelated sync leaves the connection alone.
        _sync(node, proxier, _state((web, [POD]), (_svc("other", "10.96.0.20", 80), [OTHER])))
        conn.sendall(b"two")
        assert conn.recv(10) == b"two"
        # The endpoint leaves: weight 0, the established connection goes on.
        _sync(node, proxier, _state((web, [])))
        assert "-> 10.244.1.2:8080 Masq 0 1" in _ipvsadm(node)
        _sync(node, proxier, _state((web, [])))  # still connected: still there
        conn.sendall(b"three")
        assert conn.recv(10) == b"three"
        assert "10.244.1.2:8080" in _ipvsadm(node)
        # Back before it was deleted: weight 1 again.
        _sync(node, proxier, _state((web, [POD])))
        assert "-> 10.244.1.2:8080 Masq 1" in _ipvsadm(node)
        _sync(node, proxier, _state((web, [])))
    finally:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST: IPVS CLOSE state
        conn.close()
    # Once no connection is left (the reset one lingers ~10 s in IPVS), a sync deletes it.
    deadline = time.monotonic() + 60
    while "10.244.1.2:8080" in _ipvsadm(node) and time.monotonic() < deadline:
        time.sleep(1)
        _sync(node, proxier, _state((web, [])))
    assert "10.244.1.2:8080" not in _ipvsadm(node)


def test_lab_wide_scheduler(netns) -> None:
    node = netns("node")
    with entered(node):
        proxier = IpvsProxier(NODE, scheduler="wrr")
        try:
            proxier.sync(_state((_svc("web", "10.96.0.10", 80), [POD]), (_svc("x", "10.96.0.11", 80, mode_info="mh"), [])))
            shown = " ".join(proxier.rules_excerpt().split(" "))
        finally:
            proxier.close()
    assert "TCP  10.96.0.10:80 wrr  # default/web" in shown and "TCP  10.96.0.11:80 mh" in shown, shown
    assert "-> 10.244.1.2:8080" in shown
    # A new agent with another lab-wide scheduler (`lab up --mode-opt scheduler=sh` restarts them)
    # sets it on the virtual servers that are already there; the annotated one keeps its own.
    with entered(node):
        proxier = IpvsProxier(NODE, scheduler="sh")
        try:
            proxier.sync(_state((_svc("web", "10.96.0.10", 80), [POD]), (_svc("x", "10.96.0.11", 80, mode_info="mh"), [])))
        finally:
            proxier.close()
    shown = _ipvsadm(node)
    assert "TCP 10.96.0.10:80 sh" in shown and "TCP 10.96.0.11:80 mh" in shown, shown


def test_partial_syncs_touch_only_what_changed_and_share_addresses(netns) -> None:
    node = netns("node")
    http = ServicePort("default", "web", "http", "TCP", "10.96.0.10", 80)
    https = ServicePort("default", "web", "https", "TCP", "10.96.0.10", 443, node_port=30443)
    other = _svc("other", "10.96.0.20", 80)
    with entered(node):
        proxier = IpvsProxier(NODE)
        try:
            assert proxier.sync(_state((http, [POD]), (https, [POD]), (other, [OTHER]))).full
            # Only the service whose endpoints changed is touched (one real server added).
            result = proxier.sync(_state((http, [POD, OTHER]), (https, [POD]), (other, [OTHER])))
            assert not result.full and result.changed_services == 1
            # The https port goes: its virtual servers and ipset entries, not the shared ClusterIP.
            proxier.sync(_state((http, [POD, OTHER]), (other, [OTHER])))
        finally:
            proxier.close()
    shown = _ipvsadm(node)
    assert "10.96.0.10:80" in shown and "10.96.0.10:443" not in shown and ":30443" not in shown, shown
    assert "10.96.0.10/32" in in_ns(node, "ip", "-o", "addr", "show", "dev", "kube-ipvs0").stdout
    sets = in_ns(node, "ipset", "list").stdout
    assert "10.96.0.10,tcp:80" in sets and "10.96.0.10,tcp:443" not in sets and "30443" not in sets
