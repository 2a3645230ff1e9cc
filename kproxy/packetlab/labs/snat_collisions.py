"""Lab 13: the source ports SNAT picks for a pod's NodePort connections, with a plain MASQUERADE
(the pod's own port, kept) and kube-proxy's --random-fully (a random port), and the conntrack
counters (insert_failed) that a collision moves."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from cni.netns import entered
from kproxy.lab.probe import parse_answer
from kproxy.packetlab import PacketLab, web_node_port
from kproxy.packetlab.session import Session, kproxy
from kproxy.proxy.netfilter import MASQ_MARK

# Two pods on node1 (the second only races the first), the endpoint on node2: node1 DNATs the
# NodePort to web-1 and masquerades it onto the overlay.
TOPOLOGY = {
    "nodes": [{"name": "node1"}, {"name": "node2"}],
    "pods": [
        {"name": "client", "labels": {"app": "client"}, "nodeName": "node1"},
        {"name": "client2", "labels": {"app": "client"}, "nodeName": "node1"},
        {"name": "web-1", "labels": {"app": "web"}, "nodeName": "node2"},
    ],
}
CONNECTIONS = 64
RACES = 2000  # pairs of connections from client and client2 with the same source port, at once
RACE_PORTS = {"plain": 10000, "random-fully": 14000}  # disjoint from each other and the ephemeral range
# The lab's own plain masquerade, one priority before the srcnat chains of both modes (100): the
# first NAT chain that binds a connection wins, so kproxy's --random-fully never sees these.
PLAIN = f"""table ip packetlab-snat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat - 1; policy accept;
    meta mark & {MASQ_MARK} == {MASQ_MARK} counter masquerade
  }}
}}
"""
SLOW = 0.9  # seconds: a connect() this slow had its first SYN lost (TCP resends it after 1 s)


@dataclass(frozen=True)
class Connection:
    port: int  # the pod's own source port
    seen_ip: str  # the source web-1 saw
    seen_port: int
    seconds: float


def connect(netns: str, ip: str, port: int, source_port: int = 0) -> Connection:
    """One GET from inside netns; the workload's answer says which source it saw."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        if source_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
        sock.settimeout(5.0)
        start = time.monotonic()
        sock.connect((ip, port))
        seconds = time.monotonic() - start
        local = sock.getsockname()[1]
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    seen_ip, seen_port = parse_answer(data.partition(b"\r\n\r\n")[2].decode().strip())["client"].rsplit(":", 1)
    return Connection(local, seen_ip, int(seen_port), seconds)


def many(s: Session, ip: str, port: int) -> list[Connection | None]:
    """CONNECTIONS connections from the client, 8 at a time; None for one that failed."""
    def one(_: int) -> Connection | None:
        try:
            return connect(s.ns("client"), ip, port)
        except OSError:
            return None
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(CONNECTIONS)))


def race(s: Session, ip: str, port: int, first_port: int) -> tuple[int, int]:
    """client and client2 connect from the same source port at the same moment, RACES times, so that
    node1 masquerades two connections onto one tuple concurrently; (failed, slow) connections."""
    barrier = threading.Barrier(2)
    failed = slow = 0
    lock = threading.Lock()

    def pod(name: str) -> None:
        nonlocal failed, slow
        for i in range(RACES):
            barrier.wait(timeout=10)
            try:
                took = connect(s.ns(name), ip, port, first_port + i).seconds
            except (OSError, ValueError):  # ValueError: an answer that is not a workload's
                with lock:
                    failed += 1
                continue
            if took > SLOW:
                with lock:
                    slow += 1

    threads = [threading.Thread(target=pod, args=(name,)) for name in ("client", "client2")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return failed, slow


def masquerade_rule(s: Session, node: str) -> str:
    """kproxy's masquerade rule on node, as `kproxy rules` prints it."""
    lines = kproxy("rules", "--lab", s.lab, node).splitlines()
    return next((line.strip() for line in lines if {"masquerade", "MASQUERADE"} & set(line.split())), "")


def run_phase(s: Session, plain: bool, node: str, ip: str, port: int, client_ip: str, low: int, high: int) -> None:
    """CONNECTIONS from the client, then the race, under the masquerade in force (plain: the lab's)."""
    label = "plain MASQUERADE" if plain else "--random-fully"
    before = s.conntrack_stats(node)
    made = many(s, ip, port)
    after = s.conntrack_stats(node)
    done = [c for c in made if c is not None]
    s.show(f"  {len(done)}/{CONNECTIONS} connections answered; the first 8 (pod's port -> the source web-1 saw):")
    for c in done[:8]:
        s.show(f"      {client_ip}:{c.port} -> {c.seen_ip}:{c.seen_port}")
    kept = sum(c.port == c.seen_port for c in done)
    outside = sum(not low <= c.seen_port <= high for c in done)
    moved = {key: after.get(key, 0) - before.get(key, 0) for key in ("insert_failed", "drop", "clash_resolve")}
    s.show(f"  source port kept on {kept}/{len(done)}; outside the pod's port range {low}-{high}: {outside}; "
           f"conntrack -S on {node}: " + " ".join(f"{k} +{v}" for k, v in moved.items()))
    addresses = sorted({c.seen_ip for c in done})
    s.expect(f"{label}: all {CONNECTIONS} connections answered, each masqueraded (web-1 saw {node}'s address, "
             "not the pod's)", len(done) == CONNECTIONS and client_ip not in addresses and len(addresses) == 1,
             f"{len(done)} answered; sources web-1 saw: {', '.join(addresses) or 'none'}")
    if plain:
        s.expect(f"{label}: SNAT kept the pod's own source port on every connection", kept == len(done) > 0,
                 f"kept on {kept} of {len(done)}")
    else:
        # A random port equals the pod's with probability 1/64512; 2 of 64: ~5e-7. All 64 in the
        # pod's range by chance (28232 of 64512 ports): ~1e-23.
        s.expect(f"{label}: SNAT chose another port (kept on at most 1 of {len(done)}), some outside "
                 f"the pod's range {low}-{high}", kept <= 1 and outside > 0 and len(done) > 0,
                 f"kept on {kept}; {outside} outside the range")
    # One pod's connections have distinct tuples (its kernel hands out distinct ports), so SNAT never
    # has to pick between two at once: no clash, whatever the masquerade.
    s.expect(f"{label}: one pod's {CONNECTIONS} concurrent connections: insert_failed and drop on {node} "
             "did not move", moved["insert_failed"] == 0 and moved["drop"] == 0,
             " ".join(f"{k} +{v}" for k, v in moved.items()))

    before = s.conntrack_stats(node)
    failed, slow = race(s, ip, port, RACE_PORTS["plain" if plain else "random-fully"])
    after = s.conntrack_stats(node)
    moved = {key: after.get(key, 0) - before.get(key, 0) for key in ("insert_failed", "drop")}
    # Not a claim: whether two SYNs meet in the window between NAT and confirmation depends on the CPUs.
    s.show(f"  the race (not checked): {RACES} pairs, client and client2 from the same port at once: "
           f"insert_failed +{moved['insert_failed']} drop +{moved['drop']}; {slow} connect() calls took over "
           f"{SLOW} s (a lost SYN, resent after 1 s), {failed} failed")


def experiment(s: Session) -> None:
    node = s.node_of("client")
    ip, port, client_ip = s.node_ip(node), s.node_port("web"), s.pod_ip("client")
    low, high = map(int, s.run("client", "cat", "/proc/sys/net/ipv4/ip_local_port_range").split())
    rule = masquerade_rule(s, node)
    s.show(f"The client ({client_ip}) connects to {node}'s own NodePort {ip}:{port}; web-1 is on "
           f"{s.node_of('web-1')}, so {node} DNATs to it and, a NodePort being marked for masquerade, SNATs it.")
    s.show(f"kproxy's masquerade on {node} ({s.mode} mode; it has no option to leave --random-fully out):")
    s.show(f"    {rule or '(none found)'}")
    fully = bool({"--random-fully", "fully-random"} & set(rule.split()))
    s.expect("kproxy's masquerade rule is fully random (--random-fully / fully-random), as kube-proxy's",
             fully, rule or "no masquerade rule found")

    s.show()
    s.show(f"1. A plain masquerade, no --random-fully, put before kproxy's on {node} "
           "(nft table packetlab-snat, priority srcnat - 1):")
    s.run(node, "nft", "-f", "-", stdin=PLAIN)
    try:
        run_phase(s, True, node, ip, port, client_ip, low, high)
        counter = next((line.strip() for line in s.run(node, "nft", "list", "table", "ip", "packetlab-snat")
                        .splitlines() if "masquerade" in line), "")
        s.show(f"  the lab's rule (its counter: every masqueraded packet of both steps above): {counter}")
    finally:
        s.run(node, "nft", "delete", "table", "ip", "packetlab-snat", check=False)

    s.show()
    s.show("2. kproxy's own masquerade, fully random:")
    run_phase(s, False, node, ip, port, client_ip, low, high)
    s.show()
    s.show("A plain masquerade keeps the pod's port unless that tuple is taken; two pods using one port")
    s.show("at the same moment both find it free, and the second to confirm its entry loses: insert_failed,")
    s.show("its SYN dropped. A random port per connection makes that meeting unlikely.")


LAB = PacketLab(
    number=13,
    title="SNAT ports: a plain masquerade versus --random-fully",
    manifests=web_node_port(30013),
    topology=TOPOLOGY,
    modes=("iptables", "nftables"),  # userspace: the proxy's own socket, no SNAT
    task="""
The client pod (node1) connects to node1's own NodePort 30013; the endpoint web-1 is on node2, so
node1 DNATs and masquerades every connection. web-1 answers with the source it saw.

  kproxy exec --lab LAB node1 -- iptables-save -t nat | grep MASQUERADE      (kproxy's: --random-fully)
  kproxy exec --lab LAB client -- curl -s http://<node1's IP>:30013/          (repeat: which ports?)
  kproxy exec --lab LAB node1 -- conntrack -L -p tcp --dport 30013            (original and reply ports)
  kproxy exec --lab LAB node1 -- conntrack -S                                 (insert_failed, drop)

Put a plain masquerade in front (an nft table in node1, nat postrouting, priority srcnat - 1,
'meta mark & 0x4000 == 0x4000 masquerade') and compare the ports web-1 sees. When can two
connections need the same SNAT tuple? Which counter shows a lost race?
""",
    experiment=experiment,
)
