"""The demo: a lab per overlay, a pod on node1 reaching a pod on node3, then down.

Run by `sudo scripts/demo`. Every step prints the command a person would type.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from kproxy.cli import main as kproxy_main
from kproxy.lab.probe import probe_tcp
from kproxy.lab.state import load_state, ns_path

OVERLAYS = ("vxlan", "host-gw")


def step(title: str) -> None:
    print(f"\n=== {title}")


def run(*argv: str) -> None:
    print(f"$ kproxy {' '.join(argv)}", flush=True)
    status = kproxy_main(list(argv))
    if status != 0:
        raise SystemExit(status)


def show(ns: str, *argv: str) -> None:
    print(f"$ {' '.join(argv)}", flush=True)
    subprocess.run(["nsenter", f"--net={ns}", "--", *argv], check=False)


def demo_overlay(overlay: str) -> None:
    lab = f"demo-{overlay}"
    step(f"A three-node lab over {overlay}")
    run("lab", "up", "--name", lab, "--overlay", overlay)
    try:
        run("lab", "status", lab)
        state = load_state(lab)
        assert state is not None
        target = state.pods["web-3"]
        step(f"client (on node1) reaches web-3 ({target.ip}, on node3)")
        started = time.monotonic()
        answer = probe_tcp(ns_path(lab, "client"), target.ip, 8080, timeout=3)
        print(f"GET http://{target.ip}:8080/ from the client pod's namespace answers:")
        print(f"  {answer}    ({(time.monotonic() - started) * 1000:.1f} ms; the pod saw the client's own IP: no NAT)")
        step(f"How node1 routes to node3's pods ({overlay})")
        show(ns_path(lab, "node1"), "ip", "route")
        if overlay == "vxlan":
            show(ns_path(lab, "node1"), "bridge", "fdb", "show", "dev", "flannel.1")
            show(ns_path(lab, "node1"), "ip", "neigh", "show", "dev", "flannel.1")
    finally:
        step("Tear down")
        run("lab", "down", lab)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kproxy-demo", description=__doc__)
    parser.add_argument("--overlay", choices=OVERLAYS, action="append", help="only this overlay (repeatable)")
    args = parser.parse_args(argv)
    for overlay in args.overlay or OVERLAYS:
        demo_overlay(overlay)
    print("\nDone: every namespace, link and process of the demo labs is gone.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
