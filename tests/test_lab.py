"""Labs on the real kernel: reachability over each overlay, what crosses the
underlay, reconciling, several labs at once, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kproxy.lab import processes
from kproxy.lab.probe import parse_answer, probe_tcp, probe_udp
from kproxy.lab.overlay import lease_annotations
from kproxy.lab.state import NETNS_DIR, lab_dir, ns_name, ns_path
from kproxy.store import open_store
from kproxy.packets.netns import Sniffer
from tests.conditions import wait_for
from tests.labtools import kproxy, node_ip, pod_ip, running_lab, status, unique_lab_name, write_topology
from tests.runtime import in_ns

pytestmark = pytest.mark.kernel

OVERLAYS = ["vxlan", "host-gw", "udp"]


def lab_traces(name: str) -> list[str]:
    """Everything of a lab a person could find on the machine."""
    found = [p.name for p in NETNS_DIR.glob(f"kp_{name}_*")] if NETNS_DIR.exists() else []
    if lab_dir(name).exists():
        found.append(str(lab_dir(name)))
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [line for line in ps.splitlines()
              if any(program in line for program in ("kproxy.lab.supervisor", "etcd ",
                                                     *(daemon.module for daemon in processes.DAEMONS)))
              and f"/{name}" in line]
    return found


def answer(lab: str, src: str, ip: str, port: int = 8080) -> dict[str, str]:
    return parse_answer(probe_tcp(ns_path(lab, src), ip, port, timeout=3))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_full_reachability_matrix(overlay: str) -> None:
    with running_lab("--overlay", overlay) as lab:
        info = status(lab)
        assert info["overlay"] == overlay
        client_ip = pod_ip(info, "client")  # client and web-1 share node1
        # pod -> pod on the same node and across nodes, over TCP and UDP; the pod sees the real source.
        for target in ("web-1", "web-2", "web-3"):
            got = answer(lab, "client", pod_ip(info, target))
            assert got["pod"] == target and got["client"].split(":")[0] == client_ip
            assert parse_answer(probe_udp(ns_path(lab, "client"), pod_ip(info, target), 8080))["pod"] == target
        # a second port of a pod
        assert answer(lab, "web-3", pod_ip(info, "echo"), 9090)["pod"] == "echo"
        # node -> pod, on its own node and on others
        for node in ("node1", "node2", "node3"):
            assert answer(lab, node, pod_ip(info, "web-1"))["pod"] == "web-1"
        # external -> every node IP, and node -> node
        for node in ("node1", "node2", "node3"):
            assert in_ns(ns_path(lab, "external"), "ping", "-c1", "-W2", node_ip(info, node), check=False).returncode == 0
        assert in_ns(ns_path(lab, "node1"), "ping", "-c1", "-W2", node_ip(info, "node3"), check=False).returncode == 0
        # pod MTU follows the overlay
        mtu = json.loads(in_ns(ns_path(lab, "web-1"), "ip", "-j", "link", "show", "eth0").stdout)[0]["mtu"]
        assert mtu == {"vxlan": 1450, "udp": 1472, "host-gw": 1500}[overlay]


def capture(lab: str, action: Any, count: int = 2) -> list[Any]:
    """The first count packets seen on the underlay bridge while action runs."""
    with Sniffer(ns_path(lab, "underlay"), "br0", bpf="udp or icmp", count=count) as sniffer:
        action()  # the socket is bound before this: nothing it sends is missed
        sniffer.wait(10)
    return sniffer.packets[:count]


def test_vxlan_traffic_is_vxlan_on_udp_8472_with_vni_1() -> None:
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.vxlan import VXLAN

    with running_lab("--overlay", "vxlan") as lab:
        info = status(lab)
        src, dst = pod_ip(info, "client"), pod_ip(info, "web-3")
        packets = capture(lab, lambda: in_ns(ns_path(lab, "client"), "ping", "-c1", "-W2", dst))
        request = packets[0]
        assert request[IP].src == node_ip(info, "node1") and request[IP].dst == node_ip(info, "node3")
        assert request[UDP].dport == 8472
        assert request[VXLAN].vni == 1
        inner = request[VXLAN].payload
        assert inner[IP].src == src and inner[IP].dst == dst and inner[ICMP].type == 8


def test_host_gw_traffic_is_plain_ip_between_pods() -> None:
    from scapy.layers.inet import ICMP, IP, UDP

    with running_lab("--overlay", "host-gw") as lab:
        info = status(lab)
        src, dst = pod_ip(info, "client"), pod_ip(info, "web-3")
        packets = capture(lab, lambda: in_ns(ns_path(lab, "client"), "ping", "-c1", "-W2", dst))
        request = packets[0]
        assert request[IP].src == src and request[IP].dst == dst and request[ICMP].type == 8
        assert UDP not in request


def test_udp_traffic_is_the_inner_ip_packet_in_udp_8285_between_nodes() -> None:
    from scapy.layers.inet import ICMP, IP, UDP

    with running_lab("--overlay", "udp") as lab:
        info = status(lab)
        src, dst = pod_ip(info, "client"), pod_ip(info, "web-3")
        packets = capture(lab, lambda: in_ns(ns_path(lab, "client"), "ping", "-c1", "-W2", dst))
        request = packets[0]
        assert request[IP].src == node_ip(info, "node1") and request[IP].dst == node_ip(info, "node3")
        assert request[UDP].sport == 8285 and request[UDP].dport == 8285
        inner = IP(bytes(request[UDP].payload))  # flannel's udp backend: the bare IP packet, no header of its own
        assert inner.src == src and inner.dst == dst and inner[ICMP].type == 8
        routes = in_ns(ns_path(lab, "node1"), "ip", "route", "show", "dev", "flannel0").stdout
        assert "10.244.0.0/16 proto kernel scope link src 10.244.1.0" in routes, routes


def test_a_dead_udp_copier_is_restarted_and_down_leaves_nothing() -> None:
    with running_lab("--overlay", "udp") as lab:
        info = status(lab)
        pidfile = lab_dir(lab) / "flanneld-node1.pid"
        pid = int(pidfile.read_text())
        assert b"kproxy.lab.flanneld" in Path(f"/proc/{pid}/cmdline").read_bytes()
        os.kill(pid, signal.SIGKILL)
        wait_for("a new copier on node1", lambda: pidfile.exists() and int(pidfile.read_text()) != pid, timeout=60)
        wait_for("client reaching web-3 again",
                 lambda: _answers(lab, "client", pod_ip(info, "web-3")) == "web-3", timeout=30)
    assert lab_traces(lab) == []


def _answers(lab: str, src: str, ip: str) -> str | None:
    try:
        return answer(lab, src, ip)["pod"]
    except OSError:
        return None


def overlay_entries(lab: str, node: str, overlay: str = "vxlan") -> str:
    ns = ns_path(lab, node)
    vtep = (("bridge", "fdb", "show", "dev", "flannel.1"), ("ip", "neigh", "show", "dev", "flannel.1"))
    return "\n".join(in_ns(ns, *cmd).stdout for cmd in (("ip", "route"), *(vtep if overlay == "vxlan" else ())))


def test_adding_and_removing_a_node_updates_every_other_node() -> None:
    with running_lab() as lab:
        kproxy("lab", "add-node", "--lab", lab, "node4", "--label", "zone=c")
        info = status(lab)
        node4 = next(n for n in info["nodes"] if n["name"] == "node4")
        for node in ("node1", "node2", "node3"):
            entries = overlay_entries(lab, node)
            assert f"{node4['podCIDR']} via {node4['podCIDR'].split('/')[0]} dev flannel.1 onlink" in entries
            assert f"dst {node4['ip']} self permanent" in entries
        kproxy("lab", "remove-node", "--lab", lab, "node4")
        for node in ("node1", "node2", "node3"):
            entries = overlay_entries(lab, node)
            assert node4["podCIDR"] not in entries and node4["ip"] not in entries
        assert not (NETNS_DIR / ns_name(lab, "node4")).exists()


@pytest.mark.parametrize("overlay", ["vxlan", "host-gw"])
def test_a_node_leased_in_the_store_from_elsewhere_is_a_peer_of_every_node(overlay: str) -> None:
    """As a node another machine joins: only its Node object (with flannel's lease) reaches this one."""
    far = {"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": "far", "annotations": {"kproxy.io/host": "kproxy-2",
                                                       **lease_annotations(overlay, "172.18.0.200", "0a:00:00:00:00:c8")}},
           "spec": {"podCIDR": "10.244.200.0/24"}}
    wanted = {"vxlan": ["10.244.200.0/24 via 10.244.200.0 dev flannel.1 onlink",
                        "0a:00:00:00:00:c8 dst 172.18.0.200 self permanent",
                        "10.244.200.0 lladdr 0a:00:00:00:00:c8 PERMANENT"],
              "host-gw": ["10.244.200.0/24 via 172.18.0.200 dev eth0"]}[overlay]
    with running_lab("--overlay", overlay) as lab:
        store = open_store(lab_dir(lab))
        store.write({"Node/far": far})
        for node in ("node1", "node2", "node3"):
            wait_for(f"{node}'s flanneld routing far", lambda: all(w in overlay_entries(lab, node, overlay) for w in wanted))
        shown = {n["name"]: n for n in status(lab)["nodes"]}
        assert shown["node1"]["host"] == socket.gethostname() and shown["node1"]["present"]
        assert {k: shown["far"][k] for k in ("host", "ip", "podCIDR", "namespace")} == \
            {"host": "kproxy-2", "ip": "172.18.0.200", "podCIDR": "10.244.200.0/24", "namespace": None}
        row = next(line for line in kproxy("lab", "status", lab).stdout.splitlines() if line.startswith("far "))
        assert row.split() == ["far", "kproxy-2", "172.18.0.200", "10.244.200.0/24", "-", "-", "-", "-", "-",
                               "elsewhere"]
        store.write({"Node/far": None})
        for node in ("node1", "node2", "node3"):
            wait_for(f"{node}'s flanneld forgetting far", lambda: "10.244.200.0" not in overlay_entries(lab, node, overlay))


def test_reapplying_a_topology_adds_a_node_with_a_pod_reachable_from_everywhere(tmp_path: Path) -> None:
    raw = {"nodes": ["n1", "n2"], "pods": [{"name": "a", "nodeName": "n1"}]}
    with running_lab("-f", str(write_topology(tmp_path / "lab.yaml", raw))) as lab:
        raw["nodes"].append("n3")
        raw["pods"].append({"name": "c", "nodeName": "n3"})
        kproxy("lab", "up", "--name", lab, "-f", str(write_topology(tmp_path / "lab.yaml", raw)))
        info = status(lab)
        assert answer(lab, "a", pod_ip(info, "c"))["pod"] == "c"
        assert answer(lab, "c", pod_ip(info, "a"))["pod"] == "a"


def test_up_again_changes_nothing_and_reconciles_what_broke() -> None:
    with running_lab() as lab:
        before = status(lab)
        again = kproxy("lab", "up", "--name", lab)
        assert "(0 wired now, 0 removed)" in again.stdout
        assert status(lab) == before

        # The supervisor dies, then a workload (nobody restarts it), and a pod's namespace
        # disappears: up brings all three back.
        os.kill(before["supervisorPid"], signal.SIGKILL)
        workload = int((lab_dir(lab) / "workload-node3.pid").read_text())
        os.kill(workload, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", ns_name(lab, "web-2")], check=True)
        broken = status(lab)
        assert broken["supervisorPid"] is None
        assert next(n for n in broken["nodes"] if n["name"] == "node3")["workloadPid"] is None
        assert next(p for p in broken["pods"] if p["name"] == "web-2")["present"] is False
        kproxy("lab", "up", "--name", lab)
        info = status(lab)
        assert all(p["wired"] for p in info["pods"]) and all(n["workloadPid"] for n in info["nodes"])
        assert info["supervisorPid"] is not None
        assert answer(lab, "client", pod_ip(info, "web-3"))["pod"] == "web-3"
        assert answer(lab, "client", pod_ip(info, "web-2"))["pod"] == "web-2"


def test_up_after_a_crash_that_lost_the_state_does_not_trip_on_leftovers() -> None:
    with running_lab() as lab:
        (lab_dir(lab) / "state.json").unlink()  # as if up died before writing it
        again = kproxy("lab", "up", "--name", lab)
        assert "File exists" not in again.stderr
        info = status(lab)
        assert answer(lab, "client", pod_ip(info, "web-3"))["pod"] == "web-3"


def test_down_removes_a_half_built_lab_without_state() -> None:
    lab = unique_lab_name()
    try:
        for member in ("node1", "web-1"):
            subprocess.run(["ip", "netns", "add", ns_name(lab, member)], check=True)
        assert lab in kproxy("lab", "ls").stdout
        kproxy("lab", "down", lab)
        assert lab_traces(lab) == []
    finally:
        for member in ("node1", "web-1"):
            subprocess.run(["ip", "netns", "del", ns_name(lab, member)], capture_output=True)


def test_down_ends_what_a_crashed_command_left_running_in_the_lab() -> None:
    """A benchmark killed with SIGKILL leaves its iperf3 server in a pod; down ends it, so no namespace
    lives on (with its links) after the lab is gone."""
    with running_lab() as lab:
        left = subprocess.Popen(["nsenter", f"--net={ns_path(lab, 'web-1')}", "--", "sleep", "600"],
                                start_new_session=True)
        try:
            kproxy("lab", "down", lab)
            assert left.wait(timeout=30) == -signal.SIGTERM
            assert lab_traces(lab) == []
        finally:
            if left.poll() is None:
                left.kill()
                left.wait()


def test_two_labs_at_once_and_down_leaves_nothing() -> None:
    with running_lab() as one, running_lab("--overlay", "host-gw") as two:
        for lab in (one, two):
            info = status(lab)
            assert answer(lab, "client", pod_ip(info, "web-3"))["pod"] == "web-3"
        # Several labs and none chosen: commands say so.
        ambiguous = kproxy("exec", "web-1", "--", "true", check=False, env={"KPROXY_LAB": ""})
        assert ambiguous.returncode == 1 and "several labs are running" in ambiguous.stderr
        kproxy("lab", "down", one)
        assert lab_traces(one) == []
        info = status(two)
        assert answer(two, "client", pod_ip(info, "web-3"))["pod"] == "web-3"
    assert lab_traces(two) == []


def test_exec_runs_in_the_namespace_and_passes_the_exit_status() -> None:
    with running_lab() as lab:
        info = status(lab)
        shown = kproxy("exec", "--lab", lab, "web-1", "--", "ip", "-4", "-o", "addr", "show", "eth0")
        assert pod_ip(info, "web-1") in shown.stdout
        assert kproxy("exec", "--lab", lab, "node1", "--", "sh", "-c", "exit 7", check=False).returncode == 7
        missing = kproxy("exec", "--lab", lab, "nope", "--", "true", check=False)
        assert missing.returncode == 1 and "has no pod, node or namespace named 'nope'" in missing.stderr
        by_env = kproxy("exec", "web-2", "--", "true", env={"KPROXY_LAB": lab}, check=False)
        assert by_env.returncode == 0


def test_a_bad_topology_creates_nothing(tmp_path: Path) -> None:
    lab = unique_lab_name()
    bad = write_topology(tmp_path / "bad.yaml", {"nodes": ["n1"], "pods": [{"name": "a", "nodeName": "n2"}]})
    done = kproxy("lab", "up", "--name", lab, "-f", str(bad), check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == "kproxy: error: pod a: nodeName 'n2' is not a node of this lab"
    assert lab_traces(lab) == []
    missing = kproxy("lab", "up", "--name", lab, "-f", str(tmp_path / "nope.yaml"), check=False)
    assert missing.returncode == 1 and "cannot read topology" in missing.stderr
