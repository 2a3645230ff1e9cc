"""The warm CNI server (cni/server.py) behind the thin exec'd plugins (cni/client.py)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from cni import client, server
from tests.runtime import OUR_BRIDGE, OUR_HOST_LOCAL, in_ns, run_plugin


def conf(data_dir: Path, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "cniVersion": "1.0.0",
        "name": "srvnet",
        "type": "kproxy-bridge",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "ipam": {"type": "kproxy-host-local", "ranges": [[{"subnet": "10.78.0.0/24"}]], "dataDir": str(data_dir)},
    }
    out.update(extra)
    return out


class Server:
    def __init__(self, sock: Path, log: Path) -> None:
        self.sock, self.log = sock, log
        self.env = {"KPROXY_CNI_SOCKET": str(sock)}

    def served(self) -> str:
        return self.log.read_text()


@pytest.fixture
def cni_server(tmp_path: Path) -> Iterator[Server]:
    sock, log = tmp_path / "run" / "cni.sock", tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cni.server", "--socket", str(sock)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(str(sock))
                break
            except OSError:
                assert time.monotonic() < deadline, "cni.server did not listen: " + log.read_text()
                time.sleep(0.05)
        yield Server(sock, log)
    finally:
        proc.terminate()  # the server we started, by its pid
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert not sock.exists(), "the server leaves no socket behind"


def test_wire_format_round_trip() -> None:
    env = {"CNI_COMMAND": "ADD", "CNI_ARGS": "A=1;B=x=y", "PATH": "/bin", "CNI_NETNS": "/var/run/netns/p"}
    a, b = socket.socketpair()
    with a, b:
        a.sendall(client.encode_request("bridge", env, b'{"x": 1}'))
        plugin, got, stdin = server.read_request(b)
    assert (plugin, stdin) == ("bridge", b'{"x": 1}')
    assert got == {k: v for k, v in env.items() if k.startswith("CNI_")}


@pytest.mark.kernel
def test_add_and_del_through_the_server(netns, tmp_path: Path, cni_server: Server) -> None:
    node, pod = netns("node"), netns("pod")
    data = tmp_path / "data"
    # PYTHONPROFILEIMPORTTIME lists on stderr every module the exec'd plugin imported.
    env = {**cni_server.env, "PYTHONPROFILEIMPORTTIME": "1"}
    done = run_plugin(OUR_BRIDGE, "ADD", conf(data), container_id="s1", netns=pod, host_ns=node, extra_env=env)
    assert done.status == 0, (done.out, done.stderr)
    assert "bridge ADD s1" in cni_server.served()
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "cni.client" in imported
    assert not {m for m in imported if m.split(".")[0] in ("pyroute2", "json") or m in ("cni.bridge", "cni.ipam")}

    assert done.out is not None and done.out["ips"] == [{"address": "10.78.0.2/24", "gateway": "10.78.0.1", "interface": 2}]
    bridge, host_veth, pod_if = done.out["interfaces"]
    assert pod_if == {**pod_if, "name": "eth0", "sandbox": pod}
    addr = json.loads(in_ns(pod, "ip", "-j", "-4", "addr", "show", "eth0").stdout)[0]
    assert "UP" in addr["flags"]
    assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.78.0.2", 24)]
    # The server took the node from the caller's namespace: bridge and veth are there.
    node_links = {l["ifname"]: l for l in json.loads(in_ns(node, "ip", "-j", "link", "show").stdout)}
    assert node_links[host_veth["name"]]["master"] == "cni0" and "cni0" in node_links
    assert (data / "srvnet" / "10.78.0.2").exists()

    done = run_plugin(OUR_BRIDGE, "DEL", conf(data), container_id="s1", netns=pod, host_ns=node,
                      extra_env=cni_server.env)
    assert (done.status, done.out) == (0, None), done.stderr
    assert "bridge DEL s1" in cni_server.served()
    assert in_ns(pod, "ip", "link", "show", "eth0", check=False).returncode != 0
    assert not (data / "srvnet" / "10.78.0.2").exists()


@pytest.mark.kernel
def test_host_local_through_the_server(netns, tmp_path: Path, cni_server: Server) -> None:
    node = netns("node")
    kw: dict[str, Any] = {"container_id": "h1", "netns": "/proc/self/ns/net", "host_ns": node,
                          "extra_env": cni_server.env}
    done = run_plugin(OUR_HOST_LOCAL, "ADD", conf(tmp_path), **kw)
    assert done.status == 0 and done.out is not None, done.out
    assert done.out["ips"][0]["address"] == "10.78.0.2/24"
    assert run_plugin(OUR_HOST_LOCAL, "DEL", conf(tmp_path), **kw).status == 0
    assert "host-local ADD h1" in cni_server.served() and "host-local DEL h1" in cni_server.served()


@pytest.mark.kernel
@pytest.mark.parametrize("case", ["missing-netns", "bad-config"])
def test_server_errors_come_back_as_the_plugin_would_print_them(netns, tmp_path: Path, cni_server: Server,
                                                                case: str) -> None:
    node = netns("node")
    if case == "missing-netns":
        net, pod = conf(tmp_path), str(tmp_path / "no-such-netns")
    else:
        net, pod = conf(tmp_path, hairpinMode=True, promiscMode=True), netns("pod")
    kw: dict[str, Any] = {"container_id": "e1", "netns": pod, "host_ns": node}
    warm = run_plugin(OUR_BRIDGE, "ADD", net, **kw, extra_env=cni_server.env)
    assert "bridge ADD e1" in cni_server.served()  # the server answered, not a fallback
    cold = run_plugin(OUR_BRIDGE, "ADD", net, **kw, extra_env={"KPROXY_CNI_SOCKET": str(tmp_path / "absent.sock")})
    assert warm.status == cold.status == 1
    assert warm.out == cold.out
    assert warm.code == {"missing-netns": 3, "bad-config": 7}[case]
    assert not any(p.name[0].isdigit() for p in (tmp_path / "srvnet").glob("*")), "no address leaked"


@pytest.mark.kernel
def test_no_server_falls_back_to_in_process(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    env = {"KPROXY_CNI_SOCKET": str(tmp_path / "absent.sock")}
    done = run_plugin(OUR_BRIDGE, "ADD", conf(tmp_path), container_id="f1", netns=pod, host_ns=node, extra_env=env)
    assert done.status == 0, done.out
    assert run_plugin(OUR_BRIDGE, "DEL", conf(tmp_path), container_id="f1", netns=pod, host_ns=node,
                      extra_env=env).status == 0
