"""flanneld for one node, with the lab's store as its subnet manager (flannel's kube subnet manager).

A node's lease is its Node object: spec.podCIDR and the annotations flannel keeps there
(kproxy.lab.overlay.lease_annotations), which the lab writes when it adds the node:

    flannel.alpha.coreos.com/backend-type: vxlan            (or host-gw, udp)
    flannel.alpha.coreos.com/backend-data: {"VNI":1,"VtepMAC":"0a:..."}   (null but for vxlan)
    flannel.alpha.coreos.com/public-ip: 172.18.0.2          (the node's underlay address)
    flannel.alpha.coreos.com/kube-subnet-manager: "true"

This process runs in its node's namespace and watches the Nodes of the lab's store over the
underlay, as flanneld reaches the API server. It keeps the node's overlay as the leases say:
vxlan and host-gw through kproxy.lab.overlay.apply (the VTEP, and per other node its FDB entry,
neighbour and route), udp with flannel0 and its copier (kproxy.lab.udpoverlay). A node added or
removed, on this machine or on another, is a peer at once, or no longer one.

It writes its pidfile once the overlay is programmed, and after that notes in
flanneld-NODE.json (in the lab's directory) each store version it has programmed; `kproxy lab
up` waits for the version of the Nodes it wrote.

    python -m kproxy.lab.flanneld --lab-dir /run/kproxy/LAB --node node1 --overlay vxlan \\
        --cluster-cidr 10.244.0.0/16 [--pidfile F]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute

from kproxy.errors import KproxyError
from kproxy.lab import overlay
from kproxy.lab.udpoverlay import Copier
from kproxy.lab.workload import remove_pidfile, write_pidfile
from kproxy.store import Obj, Watcher, open_store

POLL_SECONDS = 0.01
OVERLAYS = ("vxlan", "host-gw", "udp")


def log(node: str, message: str) -> None:
    print(f"kproxy-flanneld {node}: {message}", file=sys.stderr, flush=True)


def leases_only(key: str, obj: Obj) -> Obj | None:
    """What flanneld keeps of the store: the Nodes' names, pod CIDRs and annotations."""
    if not key.startswith("Node/"):
        return None
    return {"metadata": {"name": obj["metadata"]["name"], "annotations": obj["metadata"].get("annotations") or {}},
            "spec": {"podCIDR": (obj.get("spec") or {}).get("podCIDR")}}


def leases(watcher: Watcher) -> dict[str, overlay.Peer]:
    found = {}
    for node in watcher.view.objects.values():
        lease = overlay.lease_of(node)
        if lease is not None:
            found[lease.name] = lease
    return found


def programmed_path(lab_dir: Path, node: str) -> Path:
    return lab_dir / f"flanneld-{node}.json"


def programmed_version(lab_dir: Path, node: str) -> int:
    try:
        return int(json.loads(programmed_path(lab_dir, node).read_text())["version"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def wait_programmed(lab_dir: Path, nodes: list[str], version: int, timeout: float) -> list[str]:
    """The nodes whose flanneld has not programmed version within timeout."""
    deadline = time.monotonic() + timeout
    pending = [n for n in nodes if programmed_version(lab_dir, n) < version]
    while pending and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        pending = [n for n in pending if programmed_version(lab_dir, n) < version]
    return pending


class Flanneld:
    def __init__(self, lab_dir: Path, node: str, backend: str, cluster_cidr: str) -> None:
        self.lab_dir = lab_dir
        self.node = node
        self.backend = backend
        self.cluster_cidr = cluster_cidr
        self.watcher = open_store(lab_dir, on_underlay=True).watch(keep=leases_only)
        self.running = True
        own = leases(self.watcher).get(node)
        if own is None:
            raise KproxyError(f"node {node} has no lease in the store (a Node with flannel's annotations)")
        self.own = own
        self.copier = Copier(own, cluster_cidr) if backend == "udp" else None
        self.peers: list[overlay.Peer] | None = None

    def program(self) -> None:
        """The node's overlay as the leases say, if they changed for it."""
        peers = sorted((p for name, p in leases(self.watcher).items() if name != self.node), key=lambda p: p.name)
        if peers == self.peers:
            return
        if self.copier is not None:
            self.copier.set_peers(peers)
        with IPRoute() as ipr:
            overlay.apply(ipr, self.backend, self.cluster_cidr, self.own.node_ip, self.own.pod_cidr,
                          self.own.vtep_mac, peers)
        self.peers = peers

    def note(self) -> None:
        path = programmed_path(self.lab_dir, self.node)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"version": self.watcher.view.version, "peers": len(self.peers or [])}))
        os.replace(tmp, path)

    def run(self) -> None:
        noted = -1
        while self.running:
            if any(key.startswith("Node/") for key in self.watcher.poll()) or self.peers is None:
                try:
                    self.program()
                except Exception as exc:  # a netlink refusal: logged, tried again at the next change
                    log(self.node, f"overlay not programmed: {type(exc).__name__}: {exc}")
                    self.peers = None
                    time.sleep(0.5)
                    continue
            if self.watcher.view.version != noted:
                self.note()
                noted = self.watcher.view.version
            if self.copier is not None:
                self.copier.serve(POLL_SECONDS)
            else:
                time.sleep(POLL_SECONDS)

    def close(self) -> None:
        self.watcher.close()
        if self.copier is not None:
            self.copier.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.lab.flanneld", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lab-dir", required=True, type=Path)
    parser.add_argument("--node", required=True)
    parser.add_argument("--overlay", required=True, choices=OVERLAYS)
    parser.add_argument("--cluster-cidr", required=True)
    parser.add_argument("--pidfile", type=Path, help="write our PID here (atomically) once the overlay is programmed")
    args = parser.parse_args(argv)
    try:
        daemon = Flanneld(args.lab_dir, args.node, args.overlay, args.cluster_cidr)
        daemon.program()
    except (KproxyError, OSError, ValueError) as exc:
        log(args.node, f"cannot start: {exc}")
        return 1

    def stop(signum: int, frame: Any) -> None:
        daemon.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        daemon.note()
        if args.pidfile:
            write_pidfile(args.pidfile)
        log(args.node, f"{args.overlay}: {len(daemon.peers or [])} peers")
        daemon.run()
    finally:
        daemon.close()
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
