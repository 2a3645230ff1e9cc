"""The CNI server (cni/server.py) behind the thin exec'd plugins (cni/client.py).

The first tests use a server started by hand (`python -m cni.server`); the
rest start none: the plugins' first exec does, as under a runtime, and the
test stops it by the pid in its lock file.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest

from cni import client, server
from tests.runtime import OUR_BRIDGE, OUR_HOST_LOCAL, Outcome, in_ns, run_plugin

NO_SERVER = {"KPROXY_CNI_SOCKET": ""}


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
        a.sendall(client.encode_request("bridge", "code-1", env, b'{"x": 1}'))
        plugin, identity, got, stdin = server.read_request(b)
    assert (plugin, identity, stdin) == ("bridge", "code-1", b'{"x": 1}')
    assert got == {k: v for k, v in env.items() if k.startswith("CNI_")}


def importtime_wrapper(plugin: str, directory: Path) -> str:
    """An executable that runs plugin as its own shebang says, plus -X importtime."""
    interpreter = Path(plugin).read_text().splitlines()[0].removeprefix("#!").split()
    wrapper = directory / Path(plugin).name
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(interpreter)} -X importtime {plugin}\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def imported_modules(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.kernel
def test_add_and_del_through_the_server(netns, tmp_path: Path, cni_server: Server) -> None:
    node, pod = netns("node"), netns("pod")
    data = tmp_path / "data"
    # -X importtime lists on stderr every module the exec'd plugin imported.
    plugin = importtime_wrapper(OUR_BRIDGE, tmp_path)
    done = run_plugin(plugin, "ADD", conf(data), container_id="s1", netns=pod, host_ns=node, extra_env=cni_server.env)
    assert done.status == 0, (done.out, done.stderr)
    assert "bridge ADD s1" in cni_server.served()
    imported = imported_modules(done.stderr)
    assert "cni.client" in imported
    # Not even site (the launcher's python -IS) or os: only what the thin client needs.
    assert not {m for m in imported if m.split(".")[0] in ("pyroute2", "json", "site", "os", "socket")
                or m in ("cni.bridge", "cni.ipam")}

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
    cold = run_plugin(OUR_BRIDGE, "ADD", net, **kw, extra_env=NO_SERVER)
    assert warm.status == cold.status == 1
    assert warm.out == cold.out
    assert warm.code == {"missing-netns": 3, "bad-config": 7}[case]
    assert not any(p.name[0].isdigit() for p in (tmp_path / "srvnet").glob("*")), "no address leaked"


@pytest.mark.kernel
def test_an_empty_socket_variable_keeps_the_plugin_in_process(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    plugin = importtime_wrapper(OUR_BRIDGE, tmp_path)
    done = run_plugin(plugin, "ADD", conf(tmp_path), container_id="f1", netns=pod, host_ns=node, extra_env=NO_SERVER)
    assert done.status == 0, done.out
    imported = imported_modules(done.stderr)
    assert {"site", "cni.bridge", "pyroute2.iproute.linux"} <= imported  # it did the work itself, site loaded
    assert run_plugin(OUR_BRIDGE, "DEL", conf(tmp_path), container_id="f1", netns=pod, host_ns=node,
                      extra_env=NO_SERVER).status == 0


# Nothing started by hand: the plugins start the server ----------------------------------------
class Started:
    """A socket nobody serves yet, as a runtime's first exec finds it; stops what came of it."""

    def __init__(self, directory: Path, **env: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.sock = str(directory / "cni.sock")
        self.env = {"KPROXY_CNI_SOCKET": self.sock, **env}

    def pid(self) -> int | None:
        return server.running(self.sock)

    def log(self) -> str:
        return Path(client.log_path(self.sock)).read_text()

    def stop(self) -> None:
        server.stop(self.sock)  # the server our exec started, by the pid it wrote


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    s = Started(tmp_path / "run")
    try:
        yield s
    finally:
        s.stop()


def bridge(command: str, data: Path, node: str, pod: str | None, cid: str, env: dict[str, str]) -> Outcome:
    return run_plugin(OUR_BRIDGE, command, conf(data), container_id=cid, netns=pod, host_ns=node, extra_env=env)


def ns_inode(path: str) -> int:
    return os.stat(path).st_ino


@pytest.mark.kernel
def test_the_first_exec_starts_the_server_and_the_next_ones_use_it(netns, tmp_path: Path, started: Started) -> None:
    node, pod = netns("node"), netns("pod")
    assert started.pid() is None
    first = bridge("ADD", tmp_path / "data", node, pod, "a1", started.env)
    assert first.status == 0, (first.out, first.stderr)
    assert first.out is not None and first.out["ips"][0]["address"] == "10.78.0.2/24"
    pid = started.pid()
    assert pid is not None
    assert f"listening on {started.sock} (pid {pid}" in started.log()
    assert "bridge ADD a1" in started.log()  # the first exec went through it too
    # It lives in a namespace of its own, not in the node's it was started from.
    assert ns_inode(f"/proc/{pid}/ns/net") not in (ns_inode(node), ns_inode("/proc/self/ns/net"))

    done = bridge("DEL", tmp_path / "data", node, pod, "a1", started.env)
    assert (done.status, done.out) == (0, None), done.stderr
    assert started.pid() == pid and started.log().count("listening on") == 1
    assert "bridge DEL a1" in started.log()
    assert in_ns(pod, "ip", "link", "show", "eth0", check=False).returncode != 0


@pytest.mark.kernel
def test_concurrent_first_execs_start_one_server(netns, tmp_path: Path, started: Started) -> None:
    node = netns("node")
    pods = [netns("pod") for _ in range(6)]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda i: bridge("ADD", tmp_path / "data", node, pods[i], f"r{i}", started.env),
                                range(6)))
    assert [r.status for r in results] == [0] * 6, [r.out for r in results]
    assert len({r.out["ips"][0]["address"] for r in results if r.out}) == 6
    log = started.log()
    assert log.count("listening on") == 1, log
    assert all(f"bridge ADD r{i} " in log for i in range(6)), log  # all six through the one server
    for i in range(6):
        assert bridge("DEL", tmp_path / "data", node, pods[i], f"r{i}", started.env).status == 0
    pid = started.pid()
    stopped = subprocess.run([sys.executable, "-m", "cni.server", "--socket", started.sock, "--stop"],
                             capture_output=True, text=True, timeout=60)
    assert (stopped.returncode, stopped.stdout) == (0, f"cni.server: stopped pid {pid}\n"), stopped.stderr
    assert started.pid() is None and "stopped after 12 calls" in started.log()


@pytest.mark.kernel
def test_a_stale_socket_of_a_dead_server_is_replaced(netns, tmp_path: Path, started: Started) -> None:
    node, pod = netns("node"), netns("pod")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(started.sock)  # a socket file nobody listens on, as a killed server leaves it
    done = bridge("ADD", tmp_path / "data", node, pod, "d1", started.env)
    assert done.status == 0, (done.out, done.stderr)
    assert started.pid() is not None and "bridge ADD d1" in started.log()
    assert bridge("DEL", tmp_path / "data", node, pod, "d1", started.env).status == 0


@pytest.mark.kernel
def test_a_server_running_other_code_is_not_used(netns, tmp_path: Path) -> None:
    node, pod = netns("node"), netns("pod")
    other = tmp_path / "other-checkout"
    shutil.copytree(client.PACKAGE_DIR, other / "cni", ignore=shutil.ignore_patterns("__pycache__"))
    sock = tmp_path / "run" / "cni.sock"
    log = tmp_path / "other.log"
    with open(log, "wb") as out:  # that checkout's server, on the socket our plugin is told to use
        proc = subprocess.Popen([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1));"
                                 "from cni.server import main; sys.exit(main())", str(other), "--socket", str(sock)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        done = bridge("ADD", tmp_path / "data", node, pod, "o1", {"KPROXY_CNI_SOCKET": str(sock)})
        assert done.status == 0, (done.out, done.stderr)
        assert done.out is not None and done.out["ips"][0]["address"] == "10.78.0.2/24"
        assert "bridge ADD o1" in log.read_text() and "not served, the client runs other code" in log.read_text()
        assert bridge("DEL", tmp_path / "data", node, pod, "o1", {"KPROXY_CNI_SOCKET": str(sock)}).status == 0
    finally:
        proc.terminate()  # the server this test started, by its pid
        proc.wait(timeout=30)


def default_socket_of(package_parent: Path) -> str:
    """The socket the plugins of the checkout at package_parent use by default."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from cni import client;"
            "print(client.socket_path(client.code_identity()))")
    env = {k: v for k, v in os.environ.items() if k != client.SOCKET_ENV}
    return subprocess.run([sys.executable, "-IS", "-c", code, str(package_parent)], env=env,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_each_checkout_and_each_change_of_the_code_has_its_own_default_socket(tmp_path: Path) -> None:
    ours = default_socket_of(Path(client.ROOT))
    assert ours.startswith(f"{client.RUN_DIR}/cni-") and ours.endswith(".sock")
    other = tmp_path / "checkout"
    shutil.copytree(client.PACKAGE_DIR, other / "cni", ignore=shutil.ignore_patterns("__pycache__"))
    before = default_socket_of(other)
    assert before != ours
    edited = other / "cni" / "bridge.py"
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 1))
    assert default_socket_of(other) not in (before, ours)


@pytest.mark.kernel
def test_the_server_exits_after_its_idle_time(tmp_path: Path) -> None:
    started = Started(tmp_path / "run", KPROXY_CNI_IDLE_SECONDS="1")
    try:
        version = run_plugin(OUR_BRIDGE, "VERSION", b'{"cniVersion":"1.1.0"}', ifname=None, extra_env=started.env)
        assert version.status == 0 and "bridge VERSION" in started.log()
        assert "idle exit after 1 s" in started.log()
        deadline = time.monotonic() + 60
        while started.pid() is not None:
            assert time.monotonic() < deadline, started.log()
            time.sleep(0.05)
        assert "stopped after 1 calls" in started.log()
        assert not Path(started.sock).exists()
    finally:
        started.stop()
