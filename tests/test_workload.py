"""The pod workload: one process serving TCP and UDP in many pod namespaces."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.runtime import in_ns
from cni.netns import entered
from kproxy.lab.probe import parse_answer, probe_tcp, probe_udp
from kproxy.lab.workload import answer_line, http_response, request_complete
from kproxy.lab.workloadspec import SpecError, parse_spec

REPO = Path(__file__).resolve().parent.parent
WAIT = 30.0  # generous upper bound for anything to happen; never asserted as a duration


# --------------------------------------------------------------------------- unit (no root)


def test_spec_defaults_and_validation() -> None:
    pods = parse_spec({"pods": [{"name": "a", "netns": "/x"}, {"name": "b", "netns": "/y", "tcp": [80, 80], "udp": []}]})
    assert (pods[0].tcp, pods[0].udp) == ((8080,), (8080,))
    assert (pods[1].tcp, pods[1].udp) == ((80,), ())
    for bad in (
        [],
        {"pods": {}},
        {"pods": [{"name": "a"}]},
        {"pods": [{"name": "a b", "netns": "/x"}]},
        {"pods": [{"name": "a", "netns": "/x", "tcp": [0]}]},
        {"pods": [{"name": "a", "netns": "/x", "udp": ["80"]}]},
        {"pods": [{"name": "a", "netns": "/x"}, {"name": "a", "netns": "/y"}]},
    ):
        with pytest.raises(SpecError):
            parse_spec(bad)


def test_request_complete() -> None:
    assert not request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert request_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request_complete(b"GET / HTTP/1.0\n\n")
    assert not request_complete(b"GET / HTTP/1.0")
    assert request_complete(b"hello\n")  # not HTTP: one line is enough
    assert not request_complete(b"hello")


def test_answer_format() -> None:
    body = answer_line("web-1", ("10.0.0.2", 4242))
    assert body == "pod=web-1 client=10.0.0.2:4242\n"
    response = http_response(body).decode()
    head, _, rest = response.partition("\r\n\r\n")
    lines = head.split("\r\n")
    assert lines[0] == "HTTP/1.0 200 OK"
    assert "Content-Type: text/plain" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert "Connection: close" in lines
    assert rest == body
    assert parse_answer(body.strip()) == {"pod": "web-1", "client": "10.0.0.2:4242"}


# --------------------------------------------------------------------------- helpers


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    """Poll check() until it returns something truthy without raising."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last error: {last!r})")


def listening(ns: str) -> set[str]:
    """Inodes of the TCP and UDP sockets listening inside the namespace at ns."""
    out = in_ns(ns, "ss", "-H", "-l", "-n", "-t", "-u", "-e").stdout
    return set(re.findall(r"ino:(\d+)", out))


class Workload:
    """The workload process for one test; always stopped by PID at the end."""

    def __init__(self, tmp: Path) -> None:
        self.spec = tmp / "pods.json"
        self.pidfile = tmp / "workload.pid"
        self.errfile = tmp / "workload.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, pods: list[dict[str, Any]]) -> None:
        tmp = self.spec.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pods": pods}))
        os.replace(tmp, self.spec)

    def start(self, pods: list[dict[str, Any]]) -> None:
        self.write(pods)
        with open(self.errfile, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kproxy.lab.workload", "--spec", str(self.spec), "--pidfile", str(self.pidfile)],
                cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )

        def started() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"workload exited {self.proc.returncode}: {self.stderr()}")
            return self.pidfile.exists()

        try:
            wait_for("the pidfile", started)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nstderr: {self.stderr()}") from None
        assert int(self.pidfile.read_text()) == self.proc.pid

    def signal(self, signum: int) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signum)

    def reload(self, pods: list[dict[str, Any]]) -> None:
        """Rewrite the spec and SIGHUP; returns once the workload has logged the reload."""
        before = self.stderr().count("serving ") + self.stderr().count("reload:")
        self.write(pods)
        self.signal(signal.SIGHUP)
        wait_for("the reload", lambda: self.stderr().count("serving ") + self.stderr().count("reload:") > before)

    def stderr(self) -> str:
        return self.errfile.read_text() if self.errfile.exists() else ""

    def sockets(self) -> set[str]:  # listening and accepted alike
        """Inodes of the sockets the process holds (socket:[N])."""
        assert self.proc is not None
        fds = Path(f"/proc/{self.proc.pid}/fd")
        found = set()
        for fd in fds.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:"):
                found.add(target)
        return found

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[Workload]:
    w = Workload(tmp_path)
    try:
        yield w
    finally:
        w.stop()


def pod(name: str, netns: str, tcp: list[int] | None = None, udp: list[int] | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "netns": netns}
    if tcp is not None:
        entry["tcp"] = tcp
    if udp is not None:
        entry["udp"] = udp
    return entry


def ns_name(path: str) -> str:
    return Path(path).name


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


def wire(a: str, b: str) -> tuple[str, str]:
    """A veth between namespaces a and b (never the root one): 10.250.0.1/30 in a, .2 in b."""
    ip("-n", ns_name(a), "link", "add", "wl-a", "type", "veth", "peer", "name", "wl-b", "netns", ns_name(b))
    ip("-n", ns_name(a), "addr", "add", "10.250.0.1/30", "dev", "wl-a")
    ip("-n", ns_name(b), "addr", "add", "10.250.0.2/30", "dev", "wl-b")
    ip("-n", ns_name(a), "link", "set", "wl-a", "up")
    ip("-n", ns_name(b), "link", "set", "wl-b", "up")
    return "10.250.0.1", "10.250.0.2"


def refused_tcp(netns: str, port: int) -> bool:
    try:
        probe_tcp(netns, "127.0.0.1", port, timeout=2.0)
    except ConnectionRefusedError:
        return True
    return False


def refused_udp(netns: str, port: int) -> bool:
    try:
        probe_udp(netns, "127.0.0.1", port, timeout=1.0, tries=1)
    except ConnectionRefusedError:
        return True
    return False


# --------------------------------------------------------------------------- kernel


@pytest.mark.kernel
def test_three_pods_answer_tcp_and_udp(netns: Callable[..., str], workload: Workload) -> None:
    spaces = [netns("pod") for _ in range(3)]
    workload.start([
        pod("web-1", spaces[0]),
        pod("web-2", spaces[1]),
        pod("dns-3", spaces[2], tcp=[8080, 9090], udp=[5353]),
    ])
    for name, path in zip(("web-1", "web-2", "dns-3"), spaces):
        answer = parse_answer(probe_tcp(path, "127.0.0.1", 8080))
        assert answer["pod"] == name
        assert answer["client"].startswith("127.0.0.1:")
    assert parse_answer(probe_udp(spaces[0], "127.0.0.1", 8080))["pod"] == "web-1"
    assert parse_answer(probe_udp(spaces[1], "127.0.0.1", 8080))["pod"] == "web-2"
    assert parse_answer(probe_tcp(spaces[2], "127.0.0.1", 9090))["pod"] == "dns-3"
    assert parse_answer(probe_udp(spaces[2], "127.0.0.1", 5353))["pod"] == "dns-3"
    # dns-3 has no UDP 8080: nothing listens there in its namespace.
    assert refused_udp(spaces[2], 8080)
    # Nothing was opened in the test's own (root) namespace.
    with pytest.raises(ConnectionRefusedError):
        probe_tcp(None, "127.0.0.1", 8080)


@pytest.mark.kernel
def test_client_address_is_the_other_namespace(netns: Callable[..., str], workload: Workload) -> None:
    a, b = netns("pod"), netns("client")
    addr_a, addr_b = wire(a, b)
    workload.start([pod("server-a", a), pod("server-b", b)])

    # From b to the pod in a: a saw b's address, and exactly our source port.
    with entered(b):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(WAIT)
        sock.bind((addr_b, 0))
        port = sock.getsockname()[1]
        sock.connect((addr_a, 8080))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: pod\r\n\r\n")
        raw = b""
        while chunk := sock.recv(4096):
            raw += chunk
    head, _, body = raw.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK")
    assert body == f"pod=server-a client={addr_b}:{port}\n"

    assert parse_answer(probe_udp(b, addr_a, 8080)) ["client"].startswith(f"{addr_b}:")
    # And the other way round.
    answer = parse_answer(probe_tcp(a, addr_b, 8080))
    assert answer["pod"] == "server-b" and answer["client"].startswith(f"{addr_a}:")
    answer = parse_answer(probe_udp(a, addr_b, 8080))
    assert answer["pod"] == "server-b" and answer["client"].startswith(f"{addr_a}:")


@pytest.mark.kernel
def test_slow_and_non_http_clients(netns: Callable[..., str], workload: Workload) -> None:
    a = netns("pod")
    workload.start([pod("web-1", a, udp=[])])

    with entered(a):
        idle = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        line = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with idle, line:
        # A client that connects and sends nothing does not hold up anyone else...
        idle.connect(("127.0.0.1", 8080))
        assert parse_answer(probe_tcp(a, "127.0.0.1", 8080))["pod"] == "web-1"
        # ...and gets its answer too after a short wait.
        idle.settimeout(WAIT)
        raw = b""
        while chunk := idle.recv(4096):
            raw += chunk
        assert raw.startswith(b"HTTP/1.0 200 OK") and b"pod=web-1 client=127.0.0.1:" in raw

        # A non-HTTP client that sends one line gets an answer.
        line.settimeout(WAIT)
        line.connect(("127.0.0.1", 8080))
        line.sendall(b"hello\n")
        raw = b""
        while chunk := line.recv(4096):
            raw += chunk
        assert raw.endswith(f"pod=web-1 client=127.0.0.1:{line.getsockname()[1]}\n".encode())


@pytest.mark.kernel
def test_many_concurrent_connections(netns: Callable[..., str], workload: Workload) -> None:
    a = netns("pod")
    workload.start([pod("web-1", a, udp=[])])
    answers: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        try:
            line = probe_tcp(a, "127.0.0.1", 8080, timeout=WAIT)
            with lock:
                answers.append(line)
        except BaseException as exc:  # noqa: BLE001
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert len(answers) == 200
    assert {parse_answer(x)["pod"] for x in answers} == {"web-1"}
    assert len({parse_answer(x)["client"] for x in answers}) == 200  # every client seen as itself


@pytest.mark.kernel
def test_sighup_adds_and_removes_pods(netns: Callable[..., str], workload: Workload) -> None:
    a, b = netns("pod"), netns("pod")
    missing = a + "-missing"
    workload.start([pod("web-a", a), pod("ghost", missing)])
    assert f"pod ghost: network namespace {missing} does not exist, skipped" in workload.stderr()
    assert parse_answer(probe_tcp(a, "127.0.0.1", 8080))["pod"] == "web-a"
    assert refused_tcp(b, 8080)
    sockets_a = listening(a)

    # Add a pod and a port: served after SIGHUP; web-a's sockets are the same ones.
    workload.reload([pod("web-a", a), pod("web-b", b, tcp=[8080, 8081])])
    assert parse_answer(probe_tcp(b, "127.0.0.1", 8080))["pod"] == "web-b"
    assert parse_answer(probe_tcp(b, "127.0.0.1", 8081))["pod"] == "web-b"
    assert parse_answer(probe_udp(b, "127.0.0.1", 8080))["pod"] == "web-b"
    assert listening(a) == sockets_a
    assert parse_answer(probe_tcp(a, "127.0.0.1", 8080))["pod"] == "web-a"

    # An unreadable spec keeps everything as it is.
    workload.spec.write_text("{not json")
    before = {ns: listening(ns) for ns in (a, b)}
    workload.signal(signal.SIGHUP)
    wait_for("the reload error", lambda: "keeping the current sockets" in workload.stderr())
    assert {ns: listening(ns) for ns in (a, b)} == before
    assert parse_answer(probe_tcp(b, "127.0.0.1", 8081))["pod"] == "web-b"

    # Remove web-a and one port of web-b: their ports close, the rest still answer.
    workload.reload([pod("web-b", b, tcp=[8080])])
    assert refused_tcp(a, 8080)
    assert refused_udp(a, 8080)
    assert refused_tcp(b, 8081)
    assert parse_answer(probe_tcp(b, "127.0.0.1", 8080))["pod"] == "web-b"
    assert parse_answer(probe_udp(b, "127.0.0.1", 8080))["pod"] == "web-b"
    assert workload.proc is not None and workload.proc.poll() is None


@pytest.mark.kernel
def test_namespace_gone_and_recreated(netns: Callable[..., str], workload: Workload) -> None:
    a, b = netns("pod"), netns("pod")
    workload.start([pod("web-a", a), pod("web-b", b)])
    held = len(workload.sockets())  # before any client connects: listening sockets only
    assert parse_answer(probe_tcp(b, "127.0.0.1", 8080))["pod"] == "web-b"

    # b disappears: on SIGHUP its sockets are closed (they were keeping it alive).
    subprocess.run(["ip", "netns", "del", ns_name(b)], check=True)
    workload.reload([pod("web-a", a), pod("web-b", b)])
    assert f"pod web-b: network namespace {b} does not exist, skipped" in workload.stderr()
    # Accepted connections may linger briefly while the workload drains them.
    wait_for("b's two sockets to close", lambda: len(workload.sockets()) == held - 2)
    assert parse_answer(probe_tcp(a, "127.0.0.1", 8080))["pod"] == "web-a"

    # b comes back under the same name: the next SIGHUP serves it there.
    subprocess.run(["ip", "netns", "add", ns_name(b)], check=True)
    ip("-n", ns_name(b), "link", "set", "lo", "up")
    workload.reload([pod("web-a", a), pod("web-b", b)])
    assert parse_answer(probe_tcp(b, "127.0.0.1", 8080))["pod"] == "web-b"
    assert parse_answer(probe_udp(b, "127.0.0.1", 8080))["pod"] == "web-b"


@pytest.mark.kernel
def test_sigterm_exits_zero(netns: Callable[..., str], workload: Workload) -> None:
    a = netns("pod")
    workload.start([pod("web-a", a)])
    assert parse_answer(probe_tcp(a, "127.0.0.1", 8080))["pod"] == "web-a"
    workload.signal(signal.SIGTERM)
    assert workload.proc is not None
    assert workload.proc.wait(timeout=WAIT) == 0
    assert not workload.pidfile.exists()
    assert refused_tcp(a, 8080)


@pytest.mark.kernel
def test_sigint_exits_zero(netns: Callable[..., str], workload: Workload) -> None:
    a = netns("pod")
    workload.start([pod("web-a", a)])
    workload.signal(signal.SIGINT)
    assert workload.proc is not None
    assert workload.proc.wait(timeout=WAIT) == 0


@pytest.mark.kernel
def test_fifty_pods_one_process(netns: Callable[..., str], workload: Workload) -> None:
    spaces = [netns("pod") for _ in range(50)]
    workload.start([pod(f"p{i}", path) for i, path in enumerate(spaces)])
    for i, path in enumerate(spaces):
        assert parse_answer(probe_tcp(path, "127.0.0.1", 8080))["pod"] == f"p{i}"
        assert parse_answer(probe_udp(path, "127.0.0.1", 8080))["pod"] == f"p{i}"
