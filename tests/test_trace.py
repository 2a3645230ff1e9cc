"""`kproxy trace`, as a user runs it, in a real lab: the probe reaches an endpoint pod through NAT
and back, every node reports the rules it met and its conntrack entry, and nothing of the trace
stays behind (IPVS in the guest)."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from kproxy.packetlab import web_node_port
from tests.conditions import wait_for
from tests.labtools import KPROXY, kproxy, pod_ip, running_lab, status

pytestmark = pytest.mark.kernel
REPO = Path(__file__).resolve().parents[1]

WEB = web_node_port(30080)  # Service web, NodePort 30080
# What the probe's path meets on the client's node: the mode's chain for the Service.
SERVICE_RULE = {"iptables": "nat:KUBE-SVC-", "nftables": "ip kube-proxy service-", "ipvs": "ipvs: TCP ",
                "userspace": "KUBE-PORTALS-CONTAINER"}


def _apply_web(lab: str, tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(WEB)
    kproxy("apply", "--lab", lab, "-f", str(tmp_path / "web.yaml"))


def _nothing_left(lab: str, info: dict[str, object]) -> None:
    for member in [n["name"] for n in info["nodes"]] + ["client", "external"]:  # type: ignore[index, union-attr]
        ruleset = kproxy("exec", "--lab", lab, member, "--", "nft", "list", "ruleset").stdout
        assert "kproxy-trace" not in ruleset and "kproxy trace" not in ruleset and "TRACE" not in ruleset, member


@pytest.mark.parametrize(("mode", "overlay"), [
    ("iptables", "vxlan"), ("nftables", "udp"), ("userspace", "host-gw"),
    # Its body brings its own lab up and down (elsewhere fixtures do): in the emulated guest 130 s
    # on a quiet machine, and on a loaded one the trace alone once took over 120 s.
    pytest.param("ipvs", "vxlan", marks=[pytest.mark.ipvs, pytest.mark.timeout(600)])])
def test_a_trace_follows_the_probe_to_an_endpoint_and_back(mode: str, overlay: str, tmp_path: Path) -> None:
    with running_lab("--mode", mode, "--overlay", overlay) as lab:
        _apply_web(lab, tmp_path)
        info = status(lab)
        client, endpoints = pod_ip(info, "client"), {p["ip"] for p in info["pods"] if p["labels"].get("app") == "web"}
        done = subprocess.run([KPROXY, "trace", "--lab", lab, "client", "web:80", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        trace = json.loads(done.stdout)
        assert trace["answered"] and trace["mode"] == mode and trace["overlay"] == overlay
        hops = trace["hops"]
        assert hops[0]["member"] == "client" and hops[0]["direction"] == "out"
        assert hops[0]["headers"][0].startswith(f"{client}:{trace['source']['port']} > {trace['destination']['ip']}:80 TCP [S]")
        # The SYN arrives at one endpoint pod, addressed to it, and that pod answers.
        arrived = [h for h in hops if h["member"].startswith("web-") and h["direction"] == "in"]
        assert arrived and any(f"> {pod_ip(info, arrived[0]['member'])}:8080 TCP [S]" in h["headers"][-1]
                               for h in arrived)
        assert {pod_ip(info, h["member"]) for h in arrived} <= endpoints
        assert any(h["nat"] and "dst" in h["nat"] for h in hops)
        # The answer reaches the client from the address it asked.
        assert any(h["member"] == "client" and h["direction"] == "in" and
                   h["headers"][-1].startswith(f"{trace['destination']['ip']}:80 > {client}:") for h in hops)
        node1 = next(n for n in trace["nodes"] if n["name"] == "node1")
        assert any(SERVICE_RULE[mode] in line for line in node1["rules"]), node1["rules"]
        assert any(f"sport={trace['source']['port']} " in line for line in node1["conntrack"]), node1["conntrack"]
        _nothing_left(lab, info)


def test_two_traces_from_outside_at_once_show_the_masquerade_and_keep_apart(tmp_path: Path) -> None:
    with running_lab("--mode", "iptables", "--overlay", "vxlan") as lab:
        _apply_web(lab, tmp_path)
        kproxy("apply", "--lab", lab, "-f", str(REPO / "examples" / "services" / "load-balancer.yaml"))
        info = status(lab)
        node2 = next(n["ip"] for n in info["nodes"] if n["name"] == "node2")
        balancer = next(s for s in json.loads(kproxy("get", "svc", "--lab", lab, "-o", "json").stdout)["items"]
                        if s["metadata"]["name"] == "web-lb")["status"]["loadBalancer"]["ingress"][0]["ip"]
        # Both at once: each its own port, tables and rules, so neither removes the other's.
        traces = [subprocess.Popen([KPROXY, "trace", "--lab", lab, "external", target, *extra], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
                  for target, extra in ((f"{node2}:30080", []), (f"{balancer}:80", ["--json"]))]
        (node_port, err1), (by_balancer, err2) = (trace.communicate(timeout=300) for trace in traces)
        assert [trace.returncode for trace in traces] == [0, 0], err1 + err2
        lines = node_port.splitlines()
        assert lines[0] == (f"trace external ({info['external']['ip']}) -> {node2}:30080/tcp, the NodePort 30080 on "
                            f"node2 of default/web:80; lab {lab}, iptables mode, vxlan overlay")
        nat = [line for line in lines if "<- NAT dst" in line and "src" in line.split("<- NAT", 1)[1]]
        assert nat, node_port  # DNAT to the endpoint and SNAT to the node, in one hop
        assert "nat:KUBE-NODEPORTS" in node_port and "KUBE-MARK-MASQ" in node_port
        balanced = json.loads(by_balancer)
        assert balanced["answered"] and balanced["destination"]["target"] == "load-balancer IP of default/web-lb:80"
        assert any("KUBE-EXT-" in line for node in balanced["nodes"] for line in node["rules"])
        _nothing_left(lab, info)


def test_bad_input_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    with running_lab("--mode", "nftables", "--overlay", "host-gw") as lab:
        _apply_web(lab, tmp_path)
        info = status(lab)
        for args, error in [
            (["nobody", "web:80"], f"kproxy: error: SRC 'nobody': lab {lab} has no such pod or node (it has: "
                                   f"node1, node2, node3, {', '.join(p['name'] for p in info['pods'])}, external)"),
            (["client", "web:81"], "kproxy: error: DST 'web:81': Service default/web has no port 81 (its ports: 80/TCP)"),
            (["client", "web"], "kproxy: error: DST 'web': expected IP:PORT or [NAMESPACE/]SERVICE:PORT"),
        ]:
            done = subprocess.run([KPROXY, "trace", "--lab", lab, *args], capture_output=True, text=True)
            assert (done.returncode, done.stdout, done.stderr) == (1, "", error + "\n")
        _nothing_left(lab, info)


@pytest.mark.parametrize("source", ["client", "node1"])
def test_a_udp_trace_asks_cluster_dns_and_gets_the_answer(source: str) -> None:
    with running_lab("--mode", "iptables", "--overlay", "host-gw", dns=True) as lab:
        info = status(lab)
        dns_pods = {p["name"] for p in info["pods"] if p["labels"].get("k8s-app") == "kube-dns"}
        done = subprocess.run([KPROXY, "trace", "--lab", lab, source, "kube-system/kube-dns:53", "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        trace = json.loads(done.stdout)
        assert trace["destination"] == {"ip": "10.96.0.10", "port": 53, "protocol": "udp",
                                        "target": "ClusterIP of kube-system/kube-dns:53"}
        assert trace["sent"][0].startswith(f"{trace['source']['ip']}:{trace['source']['port']} > 10.96.0.10:53 UDP")
        assert trace["hops"][0]["member"] == source and trace["hops"][0]["direction"] == "out"
        assert any(h["member"] in dns_pods and h["direction"] == "in" for h in trace["hops"])
        # The answer reaches the source from the ClusterIP it asked (a node's: after NAT is undone, so
        # its interfaces show the pod's address; its conntrack entry shows the rewrite).
        node = source if source != "client" else "node1"
        entries = next(n["conntrack"] for n in trace["nodes"] if n["name"] == node)
        assert any("dst=10.96.0.10 " in line and f"sport={trace['source']['port']} " in line and
                   "UNREPLIED" not in line for line in entries), entries
        _nothing_left(lab, info)


LOCAL_ONLY = """
apiVersion: v1
kind: Service
metadata: {name: lonely}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: client}
  ports:
  - {port: 80, targetPort: 8080, nodePort: 30090}
"""


def test_an_interrupted_trace_removes_everything_it_added(tmp_path: Path) -> None:
    with running_lab("--mode", "iptables", "--overlay", "vxlan") as lab:
        (tmp_path / "lonely.yaml").write_text(LOCAL_ONLY)
        kproxy("apply", "--lab", lab, "-f", str(tmp_path / "lonely.yaml"))
        info = status(lab)
        node2 = next(n["ip"] for n in info["nodes"] if n["name"] == "node2")
        # node2 has no endpoint of a Local Service: it drops the probe, and the trace waits for an answer.
        tracing = subprocess.Popen([KPROXY, "trace", "--lab", lab, "external", f"{node2}:30090", "--timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for("the trace's rules on node3, the last node it arms", lambda: "kproxy trace" in kproxy(
                "exec", "--lab", lab, "node3", "--", "iptables-nft-save", "-t", "raw").stdout)
            tracing.send_signal(signal.SIGTERM)
            out, err = tracing.communicate(timeout=60)
        finally:
            if tracing.poll() is None:
                tracing.kill()
                tracing.wait()
        assert (tracing.returncode, out, err) == (130, "", "kproxy: interrupted\n")
        _nothing_left(lab, info)
