"""The demo: a lab per proxy mode, traffic through a Service, the rules behind it.

Run by `scripts/demo`, as root. Each scene brings up the default lab (3 nodes,
5 pods), shows a pod on node1 reaching a pod on node3 over the overlay,
applies a ClusterIP + NodePort Service, sends traffic through it from a pod
and from outside, prints the node's rules for it, and takes the lab down.
Where this kernel lacks a module a mode needs (IPVS, on some hosts), that
scene runs inside a QEMU guest booting Debian's stock kernel (kproxy.guest),
exactly as the test suite does.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections import Counter
from pathlib import Path

from kproxy import guest
from kproxy.cli import main as kproxy_main
from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.lab.state import load_state, ns_path
from kproxy.lab.topology import OVERLAYS  # the scenes take turns
from kproxy.proxy import MODES, mode as proxy_mode

SERVICE = Path(__file__).resolve().parents[1] / "examples" / "services" / "web.yaml"
NODE_PORT = 30080


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*argv: str) -> None:
    print(f"$ kproxy {' '.join(argv)}", flush=True)
    status = kproxy_main(list(argv))
    sys.stdout.flush()
    if status != 0:
        raise SystemExit(status)


def run_child(*argv: str) -> None:
    """A kproxy command in a child process (exec replaces the process that runs it)."""
    print(f"$ kproxy {' '.join(argv)}", flush=True)
    status = subprocess.run([sys.executable, "-m", "kproxy.cli", *argv]).returncode
    if status != 0:
        raise SystemExit(status)


def scene(mode: str) -> None:
    overlay = OVERLAYS[MODES.index(mode) % len(OVERLAYS)]
    lab = f"demo-{mode}"
    step(f"{mode} mode: a three-node lab over {overlay}")
    run("lab", "up", "--name", lab, "--overlay", overlay, "--mode", mode)
    try:
        run("lab", "status", lab)
        state = load_state(lab)
        assert state is not None
        web3 = next(p for p in state.pods.values() if p.name == "web-3")
        step(f"client (node1) -> web-3 ({web3.ip}, node3), pod to pod over {overlay}")
        print("  " + probe_tcp(ns_path(lab, "client"), web3.ip, 8080, timeout=5))

        step("A Service over the web pods (examples/services/web.yaml)")
        run("apply", "--lab", lab, "-f", str(SERVICE))
        run("get", "svc", "--lab", lab, "-o", "wide")
        run("get", "endpoints", "--lab", lab)

        from kproxy.store import open_store
        from kproxy.lab.state import lab_dir

        svc = open_store(lab_dir(lab)).read().objects["Service/default/web"]
        cluster_ip = svc["spec"]["clusterIP"]
        step(f"12 requests from the client pod to the ClusterIP {cluster_ip}:80")
        answers = [parse_answer(probe_tcp(ns_path(lab, "client"), cluster_ip, 80, timeout=5)) for _ in range(12)]
        for pod, count in sorted(Counter(a["pod"] for a in answers).items()):
            print(f"  {pod}: {count}")
        print(f"  (the pods saw the client as {answers[0]['client'].split(':')[0]})")
        step("By name, as in a cluster: the client's resolv.conf points at kube-dns (10.96.0.10)")
        run_child("exec", "--lab", lab, "client", "--", "dig", "+noall", "+answer", "web.default.svc.cluster.local")
        run_child("exec", "--lab", lab, "client", "--", "curl", "-s", "-m", "5", "http://web/")
        node3 = state.nodes["node3"].ip
        step(f"From outside: the external namespace -> NodePort {node3}:{NODE_PORT}")
        print("  " + probe_tcp(ns_path(lab, "external"), node3, NODE_PORT, timeout=5))
        step(f"What node1 programmed for it ({mode} mode)")
        run("rules", "--lab", lab, "node1", "--service", "web")
    finally:
        step("Tear down")
        run("lab", "down", lab)


def needs_guest(mode: str) -> bool:
    """Whether this kernel lacks a module the mode needs (so the scene runs in a guest)."""
    return not guest.in_guest() and not proxy_mode(mode).runs_here()


def scene_in_guest(mode: str) -> int:
    reason = guest.unavailable_reason()
    if reason:
        print(f"{mode} mode: this kernel lacks a module it needs and no guest can be booted: {reason}",
              file=sys.stderr)
        return 1
    print(f"\n=== {mode} mode: this kernel lacks a module it needs, so this scene runs in a QEMU guest "
          "booting Debian's stock kernel (slow: emulated CPU) ...", flush=True)
    result = guest.run([sys.executable, "-m", "kproxy.demo", "--mode", mode], timeout=900,
                       log=lambda m: print(m, flush=True))
    sys.stdout.write(result.console)
    print(f"(guest finished with status {result.status} after {result.seconds:.0f} s)")
    return result.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kproxy-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, action="append", help="only this mode (repeatable)")
    args = parser.parse_args(argv)
    status = 0
    for mode in args.mode or MODES:
        if needs_guest(mode):
            status = status or scene_in_guest(mode)
        else:
            scene(mode)
    if not guest.in_guest():  # the host says it once, after the guest's console
        print("\nDone: every namespace, link and process of the demo labs is gone.")
    return status


if __name__ == "__main__":
    sys.exit(main())
