"""The two machines of tests/test_lab_join_pair.py, one in each QEMU guest of a pair (kproxy/guestpair.py):

    python -m tests.joinpair_guest maker OVERLAY    # guest 1: lab up --store etcd --nic, two nodes
    python -m tests.joinpair_guest joiner OVERLAY   # guest 2: lab join, one node

With a third argument, etcd-elsewhere, they go on: guest 2 runs an etcd of its own on its lab NIC,
and guest 1 makes a second lab on it (lab up --store etcd://172.18.0.3:2379), then takes it down.

They take turns through files in the pair's shared directory ("ready", "joined", ...), each
carrying what the other needs as JSON, and each writes what it saw to ROLE.json there for the
test to judge. A machine that fails writes "failed-ROLE" (with its error) so the other stops
waiting at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from kproxy import children
from kproxy.lab import processes
from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.lab.state import lab_dir, ns_name, ns_path
from kproxy.lab.supervisor import supervisor_pid
from kproxy.lab.wiring import CONTROL_PLANE, EXTERNAL, UNDERLAY

LAB = "twovm"
ETCD = "etcd://172.18.0.253:2379"
ON_ETCD = "onetcd"  # the lab made on guest 2's etcd
ELSEWHERE_IP = "172.18.0.3"  # that etcd's address: a node IP the lab's nodes must leave to it
ELSEWHERE = f"etcd://{ELSEWHERE_IP}:2379"
NODE_PORT = 30080
SHARE = Path(os.environ.get("KPROXY_PAIR_SHARE", "/nonexistent"))
KPROXY = [sys.executable, "-m", "kproxy.cli"]
ROLES = ("maker", "joiner")
HANDSHAKE_TIMEOUT = 600.0  # a lab up or join on one emulated vCPU takes a minute or two
CAPTURE = {"vxlan": "udp port 8472", "host-gw": "src net 10.244.0.0/16 and dst net 10.244.0.0/16"}

MAKER_TOPOLOGY = {"name": LAB, "nodes": ["node1", "node2"],
                  "pods": [{"name": "a", "nodeName": "node1", "labels": {"app": "web"}, "ports": [8080]},
                           {"name": "client1", "nodeName": "node2"}]}
ON_ETCD_TOPOLOGY = {"name": ON_ETCD, "nodes": ["node1", "node2"],
                    "pods": [{"name": "a", "nodeName": "node1", "labels": {"app": "web"}, "ports": [8080]},
                             {"name": "client", "nodeName": "node2"}]}
JOINER_TOPOLOGY = {"name": LAB, "nodes": ["node3"],
                   "pods": [{"name": "b", "nodeName": "node3", "labels": {"app": "web"}, "ports": [8080]},
                            {"name": "client2", "nodeName": "node3"}]}


def service(name: str, node_port: int | None = None) -> str:
    kind = f"type: NodePort\n  ports: [{{port: 80, targetPort: 8080, nodePort: {node_port}}}]" if node_port \
        else "ports: [{port: 80, targetPort: 8080}]"
    return f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: web}}\n  {kind}\n"


def kproxy(*args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([*KPROXY, *args], input=stdin, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"kproxy {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}")
    return done


def tell(name: str, payload: Any = None) -> None:
    tmp = SHARE / f".{name}.tmp"
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, SHARE / name)


def wait_for(name: str, timeout: float = HANDSHAKE_TIMEOUT) -> Any:
    deadline = time.monotonic() + timeout
    while not (SHARE / name).exists():
        for role in ROLES:
            if (SHARE / f"failed-{role}").exists():
                raise RuntimeError(f"the {role} failed while this machine waited for {name!r}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {name!r} from the other machine within {timeout:.0f} s")
        time.sleep(0.2)
    return json.loads((SHARE / name).read_text())


def answers(member: str, ip: str, port: int, want: set[str], tries: int = 60, lab: str = LAB) -> list[str]:
    """The pods that answered, connection after connection from member to ip:port, until every
    one of want has (or tries ran out); errors are kept as answers."""
    got: list[str] = []
    for _ in range(tries):
        try:
            got.append(parse_answer(probe_tcp(ns_path(lab, member), ip, port))["pod"])
        except OSError as exc:
            got.append(f"error: {exc}")
            time.sleep(0.2)
        if want <= set(got):
            break
    return sorted(set(got))


def etcd_itself() -> int:
    """etcd's pid: the child of the lab's etcd daemon (which exits when it does, to be started again)."""
    deadline = time.monotonic() + 60
    while True:
        daemon = processes.running_pid(processes.ETCD, lab_dir(LAB), CONTROL_PLANE)
        try:
            found = Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split() if daemon else []
        except FileNotFoundError:
            found = []
        if found:
            return int(found[0])
        if time.monotonic() > deadline:
            raise RuntimeError("no etcd runs")
        time.sleep(0.2)


def status(lab: str = LAB) -> dict[str, Any]:
    return json.loads(kproxy("lab", "status", lab, "-o", "json").stdout)


def cluster_ip(name: str, lab: str = LAB) -> str:
    return json.loads(kproxy("get", "svc", name, "--lab", lab, "-o", "json").stdout)["spec"]["clusterIP"]


def lab_nic_name() -> str:
    mac = os.environ["KPROXY_LAB_NIC_MAC"]
    return next((dev.name for dev in Path("/sys/class/net").iterdir()
                 if (dev / "address").read_text().strip() == mac), "")


def lab_namespaces_left() -> list[str]:
    return sorted(p.name for p in Path("/run/netns").glob("kp_*")) if Path("/run/netns").is_dir() else []


def capture_start(nic: str, overlay: str) -> subprocess.Popen[str]:
    """tcpdump on the lab NIC (in the underlay: the wire between the machines), the first 3 packets."""
    return subprocess.Popen(["ip", "netns", "exec", ns_name(LAB, UNDERLAY), "tcpdump", "-i", nic, "-n", "-l",
                             "--immediate-mode", "-c", "3", CAPTURE[overlay]],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def capture_lines(dump: subprocess.Popen[str]) -> list[str]:
    try:
        out, _ = dump.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        dump.kill()
        out, _ = dump.communicate()
    return out.splitlines()


def maker(overlay: str, seen: dict[str, Any]) -> None:
    nic = lab_nic_name()
    (SHARE / "maker.yaml").write_text(json.dumps(MAKER_TOPOLOGY))
    seen["up"] = kproxy("lab", "up", "-f", str(SHARE / "maker.yaml"), "--overlay", overlay, "--store", "etcd",
                        "--nic", os.environ["KPROXY_LAB_NIC_MAC"], "--no-dns").stdout
    kproxy("apply", "--lab", LAB, "-f", "-", stdin=service("web", NODE_PORT))
    tell("ready")
    joined = wait_for("joined")
    seen["status"] = status()
    seen["statusText"] = kproxy("lab", "status", LAB).stdout
    mine = {p["name"]: p["ip"] for p in seen["status"]["pods"]}

    dump = capture_start(nic, overlay)
    time.sleep(1)  # tcpdump attaches to the NIC before the first packet is sent
    seen["aToB"] = answers("a", joined["b"], 8080, {"b"}, tries=20)
    seen["wire"] = capture_lines(dump)
    web = cluster_ip("web")
    seen["webFromA"] = answers("a", web, 80, {"a", "b"})
    seen["webFromClient1"] = answers("client1", web, 80, {"a", "b"})
    node1 = next(n["ip"] for n in seen["status"]["nodes"] if n["name"] == "node1")
    seen["nodePortFromExternal"] = answers(EXTERNAL, node1, NODE_PORT, {"a", "b"})

    applied = kproxy("apply", "--lab", LAB, "-f", "-", stdin=service("web2"), check=False)
    seen["web2Apply"] = [applied.returncode, applied.stdout, applied.stderr]
    tell("applied", {"web": web, "web2": cluster_ip("web2"), "a": mine["a"]})
    wait_for("checked")

    # etcd dies under every agent, in both machines; the supervisor starts it again.
    os.kill(etcd_itself(), signal.SIGKILL)
    applied = kproxy("apply", "--lab", LAB, "-f", "-", stdin=service("web3"), check=False)
    seen["web3Apply"] = [applied.returncode, applied.stdout, applied.stderr]
    tell("restarted", {"web3": cluster_ip("web3")})
    wait_for("checked-again")

    # etcd away and nobody to start it: an apply is refused in one line and stores nothing.
    supervisor = supervisor_pid(lab_dir(LAB))
    os.kill(supervisor, signal.SIGSTOP)
    try:
        os.kill(etcd_itself(), signal.SIGKILL)
        refused = kproxy("apply", "--lab", LAB, "-f", "-", stdin=service("web4"), check=False)
        seen["web4Apply"] = [refused.returncode, refused.stdout, refused.stderr]
    finally:
        os.kill(supervisor, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while (got := kproxy("get", "svc", "--lab", LAB, "-o", "json", check=False)).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"etcd did not come back: {got.stderr}")
        time.sleep(0.5)
    seen["servicesAfter"] = sorted(s["metadata"]["name"] for s in json.loads(got.stdout)["items"])

    tell("maker-done")
    wait_for("left")
    seen["nodesAfterLeave"] = sorted(n["metadata"]["name"] for n in
                                     json.loads(kproxy("get", "nodes", "--lab", LAB, "-o", "json").stdout)["items"])
    seen["webAfterLeave"] = answers("client1", web, 80, {"a"}, tries=10)
    seen["down"] = kproxy("lab", "down", LAB).stdout
    seen["nicAfter"], seen["namespacesAfter"] = lab_nic_name(), lab_namespaces_left()


def maker_on_etcd_elsewhere(overlay: str, seen: dict[str, Any]) -> None:
    """A second lab, made here with its store in the etcd guest 2 runs; down takes it out of there."""
    wait_for("etcd-elsewhere")
    (SHARE / "on-etcd.yaml").write_text(json.dumps(ON_ETCD_TOPOLOGY))
    done = kproxy("lab", "up", "-f", str(SHARE / "on-etcd.yaml"), "--overlay", overlay, "--store", ELSEWHERE,
                  "--nic", os.environ["KPROXY_LAB_NIC_MAC"], "--no-dns", check=False)
    seen["onEtcdUp"] = [done.returncode, done.stdout, done.stderr]
    if done.returncode != 0:
        raise RuntimeError(f"lab up --store {ELSEWHERE} failed: {done.stdout}{done.stderr}")
    kproxy("apply", "--lab", ON_ETCD, "-f", "-", stdin=service("web"))
    seen["onEtcdStatus"] = status(ON_ETCD)
    seen["onEtcdStatusText"] = kproxy("lab", "status", ON_ETCD).stdout
    seen["onEtcdWeb"] = answers("client", cluster_ip("web", ON_ETCD), 80, {"a"}, lab=ON_ETCD)
    tell("on-etcd-up")
    wait_for("on-etcd-counted")
    seen["onEtcdDown"] = kproxy("lab", "down", ON_ETCD).stdout
    seen["onEtcdNicAfter"], seen["onEtcdNamespacesAfter"] = lab_nic_name(), lab_namespaces_left()
    tell("on-etcd-down")


def etcd_elsewhere(seen: dict[str, Any]) -> None:
    """An etcd of this machine's own on its lab NIC, as a standalone etcd machine has it; what the
    lab made on it keeps there while it runs, and after its down."""
    from kproxy.store import etcdserver
    from kproxy.store.etcd import EtcdStore

    nic = lab_nic_name()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # the guest's own init leaves it down
    subprocess.run(["ip", "addr", "add", f"{ELSEWHERE_IP}/24", "dev", nic], check=True)
    subprocess.run(["ip", "link", "set", nic, "up"], check=True)
    etcd = etcdserver.start("elsewhere", ELSEWHERE_IP, Path("/tmp/etcd-elsewhere"), Path("/tmp/etcd-elsewhere.log"))
    try:
        store = EtcdStore(f"http://{ELSEWHERE_IP}:2379", f"/kproxy/{ON_ETCD}/")
        tell("etcd-elsewhere")
        wait_for("on-etcd-up")
        seen["whileUp"] = sorted(store.read().objects)
        tell("on-etcd-counted")
        wait_for("on-etcd-down")
        seen["afterDown"] = {"objects": sorted(store.read().objects), "version": store.version(),
                             "reports": sorted(store.reports())}
    finally:
        children.end(etcd)
        subprocess.run(["ip", "addr", "del", f"{ELSEWHERE_IP}/24", "dev", nic], check=False)


def joiner(overlay: str, seen: dict[str, Any]) -> None:
    wait_for("ready")
    nic = lab_nic_name()
    (SHARE / "joiner.yaml").write_text(json.dumps(JOINER_TOPOLOGY))
    done = kproxy("lab", "join", "-f", str(SHARE / "joiner.yaml"), "--store", ETCD,
                  "--nic", os.environ["KPROXY_LAB_NIC_MAC"], check=False)
    seen["join"] = [done.returncode, done.stdout, done.stderr]
    if done.returncode != 0:
        raise RuntimeError(f"lab join failed: {done.stdout}{done.stderr}")
    seen["status"] = status()
    seen["statusText"] = kproxy("lab", "status", LAB).stdout
    mine = {p["name"]: p["ip"] for p in seen["status"]["pods"]}
    tell("joined", {"b": mine["b"]})

    applied = wait_for("applied")
    seen["bToA"] = answers("b", applied["a"], 8080, {"a"}, tries=20)
    seen["webFromClient2"] = answers("client2", applied["web"], 80, {"a", "b"})
    seen["web2FromClient2"] = answers("client2", applied["web2"], 80, {"a", "b"})
    tell("checked")
    restarted = wait_for("restarted")
    seen["web3FromClient2"] = answers("client2", restarted["web3"], 80, {"a", "b"})
    tell("checked-again")

    wait_for("maker-done")
    seen["down"] = kproxy("lab", "down", LAB).stdout
    seen["nicBefore"], seen["nicAfter"], seen["namespacesAfter"] = nic, lab_nic_name(), lab_namespaces_left()
    tell("left")


def main(role: str, overlay: str, *more: str) -> int:
    Path("/proc/sys/kernel/hostname").write_text(f"kproxy-vm{ROLES.index(role) + 1}")
    seen: dict[str, Any] = {}
    try:
        {"maker": maker, "joiner": joiner}[role](overlay, seen)
        if "etcd-elsewhere" in more:
            if role == "maker":
                maker_on_etcd_elsewhere(overlay, seen)
            else:
                etcd_elsewhere(seen)
        return 0
    except BaseException:
        seen["error"] = traceback.format_exc()
        tell(f"failed-{role}", seen["error"])
        return 1
    finally:
        (SHARE / f"{role}.json").write_text(json.dumps(seen, indent=2))


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
