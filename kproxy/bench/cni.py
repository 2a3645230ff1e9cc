"""CNI ADD/DEL latency per pod: the reference plugins against ours, interleaved.

Contenders, each with its own node namespace, pod namespaces and dataDir:

  reference   /usr/lib/cni/bridge + host-local, exec'd like a runtime does
  exec        kproxy-bridge exec'd with nothing started by hand: its first
              exec starts the CNI server (cni/client.py), every later one is
              a thin client of it; the server is stopped at the end by the pid
              it recorded
  exec-cold   kproxy-bridge exec'd with the server disabled
              (KPROXY_CNI_SOCKET=""): it imports pyroute2 and does all itself
  in-process  cni.bridge.Bridge(host_ns=node).add(request) in this process

For pod i every contender does its ADD before any does ADD for pod i+1 (the
order rotates per pod), then all DELs likewise, so drift on the machine hits
every contender alike. Exec'd plugins run in the node namespace the way a
runtime runs them: this process enters the node namespace on the spawning
thread (setns), spawns the plugin (which inherits it) and returns.

Run as root: `sudo scripts/bench-cni --pods 30`. Everything lives in
namespaces named kpbench-<pid>-*, removed in a finally block (Ctrl-C too);
the root network namespace is never touched.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cni import client, server  # imports cni.bridge: the in-process contender runs with its imports done
from kproxy.bench import require_root

NETNS_DIR = Path("/var/run/netns")
REFERENCE_DIR = "/usr/lib/cni"
VENV_BIN = Path(sys.executable).parent
CLONE_NEWNET = 0x40000000
PREFIX = f"kpbench-{os.getpid()}-"
CONTENDERS = ("reference", "exec", "exec-cold", "in-process")

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@dataclass
class Contender:
    name: str
    node_ns: str  # path
    data_dir: str
    conf: bytes
    binary: str | None = None  # exec'd plugin; None: in-process
    env: dict[str, str] = field(default_factory=dict)
    pods: list[str] = field(default_factory=list)  # netns paths
    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)
    first_ms: float = 0.0  # the uncounted warm-up ADD (for "exec": the one that started the server)


def netconf(plugin: str, ipam: str, data_dir: str, masq: bool) -> bytes:
    return json.dumps({
        "cniVersion": "1.0.0",
        "name": "kpbench",
        "type": plugin,
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "hairpinMode": True,
        "ipMasq": masq,
        "ipam": {"type": ipam, "ranges": [[{"subnet": "10.244.0.0/16"}]], "dataDir": data_dir},
    }).encode()


# Namespaces ------------------------------------------------------------------
def add_netns(name: str) -> str:
    subprocess.run(["ip", "netns", "add", name], check=True)
    return str(NETNS_DIR / name)


def remove_our_netns() -> int:
    """Delete every namespace carrying this run's prefix (also half-made ones)."""
    removed = 0
    for entry in sorted(NETNS_DIR.glob(PREFIX + "*")) if NETNS_DIR.is_dir() else []:
        subprocess.run(["ip", "netns", "del", entry.name], capture_output=True)
        removed += 1
    return removed


# One call ----------------------------------------------------------------------
def exec_plugin(c: Contender, command: str, pod_ns: str, container_id: str) -> tuple[float, int, bytes]:
    """Spawn c.binary in c.node_ns as a runtime would; (ms, status, stdout)."""
    env = dict(c.env, CNI_COMMAND=command, CNI_CONTAINERID=container_id, CNI_NETNS=pod_ns, CNI_IFNAME="eth0")
    node = os.open(c.node_ns, os.O_RDONLY | os.O_CLOEXEC)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(node)
        try:
            start = time.perf_counter()
            done = subprocess.run([c.binary], input=c.conf, env=env, capture_output=True, timeout=60)  # type: ignore[list-item]
            elapsed = time.perf_counter() - start
        finally:
            _setns(home)
    finally:
        os.close(node)
        os.close(home)
    return elapsed * 1000, done.returncode, done.stdout + done.stderr


def in_process(c: Contender, command: str, pod_ns: str, container_id: str) -> tuple[float, int, bytes]:
    from cni.bridge import Bridge
    from cni.errors import CNIError
    from cni.spec import parse_request

    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": pod_ns,
           "CNI_IFNAME": "eth0", "CNI_PATH": c.env["CNI_PATH"]}
    start = time.perf_counter()
    try:
        req = parse_request(env, c.conf)
        plugin = Bridge(host_ns=c.node_ns)
        out = json.dumps(plugin.add(req)).encode() if command == "ADD" else b""
        if command == "DEL":
            plugin.delete(req)
        status = 0
    except CNIError as err:
        out, status = json.dumps(err.to_dict("1.0.0")).encode(), 1
    return (time.perf_counter() - start) * 1000, status, out


def call(c: Contender, command: str, pod_ns: str, container_id: str) -> float:
    run = exec_plugin if c.binary else in_process
    ms, status, out = run(c, command, pod_ns, container_id)
    if status != 0:
        raise RuntimeError(f"{c.name} {command} {container_id} failed ({status}): {out.decode(errors='replace')}")
    return ms


def served_by_server(sock: str) -> str:
    """The server's own time per call (its log), to tell it from the exec'd client's."""
    log = Path(client.log_path(sock)).read_text()
    times = {cmd: [float(ms) for ms in re.findall(rf"^cni.server: bridge {cmd} kpbench-\S+ pid=\d+ -> 0 in ([\d.]+) ms$",
                                                   log, re.MULTILINE)][1:] for cmd in ("ADD", "DEL")}
    return "exec: the server's own time per call (its log): " + ", ".join(
        f"{cmd} median {statistics.median(ms):.1f} ms" for cmd, ms in times.items() if ms)


# Report -------------------------------------------------------------------------
def p90(values: list[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def table(contenders: list[Contender]) -> str:
    ref = next((c for c in contenders if c.name == "reference"), None)
    lines = [f"{'contender':<12} {'ADD med':>8} {'ADD p90':>8} {'DEL med':>8} {'DEL p90':>8}"
             f" {'ADD/ref':>8} {'DEL/ref':>8}   (ms per pod, n={len(contenders[0].add_ms)})"]
    for c in contenders:
        add_med, del_med = statistics.median(c.add_ms), statistics.median(c.del_ms)
        if ref is not None and c is not ref:
            ratios = f" {add_med / statistics.median(ref.add_ms):>7.2f}x {del_med / statistics.median(ref.del_ms):>7.2f}x"
        else:
            ratios = f" {'':>8} {'':>8}"
        lines.append(f"{c.name:<12} {add_med:>8.1f} {p90(c.add_ms):>8.1f} {del_med:>8.1f} {p90(c.del_ms):>8.1f}{ratios}")
    return "\n".join(lines)


# Run ----------------------------------------------------------------------------
def build(names: list[str], pods: int, tmp: str, masq: bool, server_socket: str) -> list[Contender]:
    ours_path = f"{VENV_BIN}:{REFERENCE_DIR}"
    contenders = []
    for name in names:
        data_dir = os.path.join(tmp, f"data-{name}")
        if name == "reference":
            c = Contender(name, "", data_dir, netconf("bridge", "host-local", data_dir, masq),
                          binary=f"{REFERENCE_DIR}/bridge", env={"CNI_PATH": REFERENCE_DIR})
        else:
            c = Contender(name, "", data_dir, netconf("kproxy-bridge", "kproxy-host-local", data_dir, masq),
                          env={"CNI_PATH": ours_path})
            if name == "exec-cold":  # the server disabled: the plugin works in-process
                c.binary, c.env["KPROXY_CNI_SOCKET"] = str(VENV_BIN / "kproxy-bridge"), ""
            elif name == "exec":
                # Only the socket's place differs from a runtime's default (/run/kproxy/cni-<code>.sock):
                # a fresh one, so the first exec surely starts the server and we know which to stop.
                c.binary, c.env["KPROXY_CNI_SOCKET"] = str(VENV_BIN / "kproxy-bridge"), server_socket
        c.env["PATH"] = os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        short = name.replace("-", "")
        c.node_ns = add_netns(f"{PREFIX}{short}-node")
        subprocess.run(["ip", "netns", "exec", os.path.basename(c.node_ns), "ip", "link", "set", "lo", "up"], check=True)
        # Pod 0 is the warm-up (page cache, the server's first request); not counted.
        c.pods = [add_netns(f"{PREFIX}{short}-pod{i}") for i in range(pods + 1)]
        contenders.append(c)
    return contenders


def run(contenders: list[Contender], pods: int, progress: Callable[[str], None]) -> None:
    for command in ("ADD", "DEL"):
        for i in range(pods + 1):
            k = i % len(contenders)
            for c in contenders[k:] + contenders[:k]:  # rotate who goes first
                ms = call(c, command, c.pods[i], f"kpbench-{os.getpid()}-{i}")
                if i > 0:
                    (c.add_ms if command == "ADD" else c.del_ms).append(ms)
                elif command == "ADD":
                    c.first_ms = ms
            if i and i % 10 == 0:
                progress(f"{command} {i}/{pods}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-cni", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=30, help="pods per contender (default 30)")
    parser.add_argument("--only", default=",".join(CONTENDERS),
                        help=f"comma-separated contenders (default all: {','.join(CONTENDERS)})")
    parser.add_argument("--masq", action="store_true", help="ipMasq: true (adds iptables per pod)")
    parser.add_argument("--json", metavar="PATH", help="also write every sample to PATH")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONTENDERS)
    if unknown or not names or not 1 <= args.pods <= 60000:
        parser.error(f"unknown contenders {sorted(unknown)}" if unknown else "need 1..60000 pods and a contender")
    if not require_root("bench-cni"):
        return 1
    if "reference" in names and not os.access(f"{REFERENCE_DIR}/bridge", os.X_OK):
        print(f"bench-cni: no reference plugins in {REFERENCE_DIR} (apt-get install containernetworking-plugins)",
              file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _on_sigterm)
    tmp = tempfile.mkdtemp(prefix=PREFIX)
    server_socket = os.path.join(tmp, "cni.sock")
    try:
        print(f"bench-cni: {', '.join(names)}; {args.pods} pods each (+1 warm-up); cniVersion 1.0.0;"
              f" {os.cpu_count()} CPUs", flush=True)
        contenders = build(names, args.pods, tmp, args.masq, server_socket)
        run(contenders, args.pods, lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
        print(table(contenders))
        if "exec" in names:
            print(served_by_server(server_socket))
        print("first ADD (not counted): " + ", ".join(f"{c.name} {c.first_ms:.1f} ms" for c in contenders)
              + ("; exec's started the CNI server" if "exec" in names else ""))
        if args.json:
            Path(args.json).write_text(json.dumps(
                {c.name: {"add_ms": c.add_ms, "del_ms": c.del_ms} for c in contenders}, indent=1) + "\n")
        return 0
    except KeyboardInterrupt:
        print("bench-cni: interrupted, cleaning up", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
        try:
            stopped = server.stop(server_socket)  # the server our first exec started, by its recorded pid
            if stopped:
                print(f"bench-cni: stopped the CNI server the first exec started (pid {stopped})", file=sys.stderr)
        finally:
            removed = remove_our_netns()
            shutil.rmtree(tmp, ignore_errors=True)
            print(f"bench-cni: removed {removed} namespaces {PREFIX}*", file=sys.stderr)
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
