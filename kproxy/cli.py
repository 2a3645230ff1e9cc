"""The kproxy command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from kproxy import cliargs, packetcli
from kproxy.bench import options as bench_options
from kproxy.cliargs import one_line
from kproxy.errors import KproxyError
from kproxy.lab.topology import DEFAULT_LOAD_BALANCER_CIDR, OVERLAYS, SERVICE_CIDR as LAB_SERVICE_CIDR
from kproxy.proxy import DEFAULT_MODE, MODES, mode as proxy_mode
from kproxy.store import BACKENDS as STORE_BACKENDS

PROG = "kproxy"
DEBUG_ENV = "KPROXY_DEBUG"  # set: unexpected errors show their traceback


_need_root = cliargs.need_root


def cmd_lab_up(args: argparse.Namespace) -> int:
    from kproxy.cluster import FIRST_SYNC_TIMEOUT, Cluster
    from kproxy.lab import build, join
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.topology import load_topology

    topology = load_topology(Path(args.file) if args.file else None, args.name, args.overlay)
    _need_root()
    started = time.monotonic()
    with lab_lock(topology.name):
        if args.store in STORE_BACKENDS or args.store is None:
            state, report = build.up(topology, args.mode, dict(args.mode_opt), dns=args.dns, store=args.store,
                                      nic=args.nic)
        elif args.nic is None:
            raise KproxyError(f"--store {args.store} is reached over the lab's underlay: give its NIC with --nic MAC")
        else:
            state, report = join.make_on(topology, args.store, args.nic, args.mode, dict(args.mode_opt), args.dns)
        with Cluster(state.name) as cluster:
            lagging = cluster.wait_synced(cluster.store.version(), FIRST_SYNC_TIMEOUT)  # the lab's Services are programmed
    took = time.monotonic() - started
    _warn_unready(report.unready)
    print(f"lab {state.name} is up ({state.overlay}, {state.mode} mode): {len(state.nodes)} nodes, "
          f"{len(state.pods)} pods ({report.wired} wired now, {report.removed} removed) in {took:.2f}s")
    print(f"  kproxy lab status {state.name}    kproxy exec --lab {state.name} POD -- CMD    "
          f"kproxy lab down {state.name}")
    return _report_lagging(lagging)


def cmd_lab_join(args: argparse.Namespace) -> int:
    from kproxy.cluster import FIRST_SYNC_TIMEOUT, Cluster
    from kproxy.lab import join
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.topology import read_topology_file

    raw = read_topology_file(Path(args.file))
    name = join.name_of(raw, args.name)
    _need_root()
    started = time.monotonic()
    with lab_lock(name):
        state, report = join.join(raw, args.store, args.nic, name)
        with Cluster(state.name) as cluster:
            lagging = cluster.wait_synced(cluster.store.version(), FIRST_SYNC_TIMEOUT)  # every node of the lab, ours too
    _warn_unready(report.unready)
    print(f"joined lab {state.name} at {state.store_endpoint} ({state.overlay}, {state.mode} mode): {len(state.nodes)} "
          f"nodes, {len(state.pods)} pods here ({report.wired} wired now) in {time.monotonic() - started:.2f}s")
    print(f"  kproxy lab status {state.name}    kproxy lab down {state.name} (takes this machine's nodes out)")
    return _report_lagging(lagging)


def cmd_lab_down(args: argparse.Namespace) -> int:
    from kproxy.lab import build
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab, require_existing

    name = choose_lab(args.name)  # a lab with leftovers but no state too: down is the cleanup after a crash
    _need_root()
    with lab_lock(name):
        removed = build.teardown(require_existing(name))  # again: another down may have gone first
    print(f"lab {name} is down ({len(removed)} namespaces removed)")
    return 0


def cmd_lab_ls(args: argparse.Namespace) -> int:
    from kproxy.lab.state import existing_labs, lab_namespaces, load_state

    for name in existing_labs():
        state = load_state(name)
        if state is None:
            print(f"{name}\t(no state: leftovers, remove with 'kproxy lab down {name}')")
        else:
            print(f"{name}\t{state.overlay}\t{len(state.nodes)} nodes\t{len(state.pods)} pods\t"
                  f"{len(lab_namespaces(name))} namespaces")
    return 0


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def cmd_lab_status(args: argparse.Namespace) -> int:
    from kproxy.lab import build
    from kproxy.lab.state import choose_lab

    info = build.status(choose_lab(args.name))
    if args.output == "json":
        print(json.dumps(info, indent=2))
        return 0
    print(f"lab {info['name']}  overlay {info['overlay']}  mode {info['mode']}  podCIDR {info['podCIDR']}  nodeCIDR {info['nodeCIDR']}  "
          + ("joined" if info["joined"] else f"external {info['external']['ip']}")
          + f"  load balancers {info['loadBalancerCIDR'] or '<none>'}"
          + (f"  nic {info['nic']['mac']} ({info['nic']['name']})" if info["nic"] else ""))
    store = info["store"]
    print(f"store {store['backend']}{' at ' + store['endpoint'] if 'endpoint' in store else ''}  "
          + (f"version {store['version']}" if "version" in store else f"unreachable: {store['error']}"))
    supervisor = info["supervisorPid"]
    print(f"supervisor pid {supervisor}" if supervisor
          else "supervisor DEAD ('kproxy lab up' with this lab's topology starts a new one)")
    print()
    rows = [["NODE", "HOST", "IP", "POD CIDR", "LABELS", "AGENT", "RESTARTS", "WORKLOAD", "RESTARTS", "NETNS"]]
    for n in info["nodes"]:
        if n["namespace"] is None:  # on another machine: its processes are that machine's to show
            rows.append([n["name"], n["host"] or "-", n["ip"], n["podCIDR"], _fmt_labels(n["labels"]),
                         "-", "-", "-", "-", "elsewhere"])
            continue
        rows.append([n["name"], n["host"] or "-", n["ip"], n["podCIDR"], _fmt_labels(n["labels"]),
                     _daemon_state(n, "agent"), _restarts(n, "agent"),
                     _daemon_state(n, "workload"), _restarts(n, "workload"),
                     n["namespace"] if n["present"] else "MISSING"])
    print(_table(rows))
    print()
    rows = [["NAMESPACE", "POD", "NODE", "IP", "PORTS", "LABELS", "STATE"]]
    for p in info["pods"]:
        rows.append([p["namespace"], p["name"], p["node"], p["ip"], ",".join(map(str, p["ports"])),
                     _fmt_labels(p["labels"]),
                     "ok" if p["wired"] else ("MISSING" if not p["present"] else "NOT WIRED")])
    print(_table(rows))
    return 0


def _daemon_state(node: dict[str, Any], kind: str) -> str:
    if node[f"{kind}Pid"]:
        return f"pid {node[f'{kind}Pid']}"
    return node[f"{kind}Waiting"] or "DEAD"


def _restarts(node: dict[str, Any], kind: str) -> str:
    """kubectl's RESTARTS: the count, and how long ago the last one was."""
    from kproxy.getcmd import since

    count, last = node[f"{kind}Restarts"], node[f"{kind}LastRestart"]
    return f"{count} ({since(last)} ago)" if last else str(count)


def _fmt_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def cmd_lab_add_node(args: argparse.Namespace) -> int:
    from kproxy.lab import build
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab

    lab = choose_lab(args.lab)
    _need_root()
    with lab_lock(lab):
        state, _ = build.add_node(lab, args.node, dict(args.label))
    print(f"node {args.node} joined lab {state.name} ({state.nodes[args.node].ip}, {state.nodes[args.node].pod_cidr})")
    return 0


def cmd_lab_remove_node(args: argparse.Namespace) -> int:
    from kproxy.lab import build
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab

    lab = choose_lab(args.lab)
    _need_root()
    with lab_lock(lab):
        state, report = build.remove_node(lab, args.node)
    print(f"node {args.node} left lab {state.name} ({report.removed} pods removed or moved)")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from kproxy.lab.state import choose_lab, lab_namespaces, ns_name

    lab = choose_lab(args.lab)
    if ns_name(lab, args.target) not in lab_namespaces(lab):
        raise KproxyError(f"lab {lab} has no pod, node or namespace named {args.target!r} (see 'kproxy lab status')")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise KproxyError("no command given: kproxy exec TARGET -- CMD [ARGS...]")
    _need_root()
    # ip netns exec, not nsenter: it bind-mounts the pod's /etc/netns/NAME/resolv.conf (cluster DNS).
    os.execvp("ip", ["ip", "netns", "exec", ns_name(lab, args.target), *command])
    return 127  # not reached


def _objects(files: list[str]) -> list[dict[str, Any]]:
    from kproxy.textinput import read_manifest_files
    from kproxy.model import parse_manifests

    objects = []
    for text, source in read_manifest_files(files):
        objects += parse_manifests(text, source)  # validated and defaulted: what the store will hold
    if not objects:
        raise KproxyError("no objects found in " + ", ".join(files))
    return objects


def _report(outcome: Any) -> int:
    for line in outcome.changed:
        print(line)
    _warn_unready(outcome.unready)
    return _report_lagging(outcome.lagging)


def _warn_unready(pods: list[str]) -> None:
    from kproxy.lab.kubelet import READY_TIMEOUT

    if pods:
        print(f"{PROG}: warning: not ready (no answer within {READY_TIMEOUT:.0f} s, so not in any Service's "
              f"endpoints): {', '.join(pods)}", file=sys.stderr)


def _report_lagging(lagging: list[str]) -> int:
    if lagging:
        print(f"{PROG}: error: not synced on: {', '.join(lagging)} "
              "(agent logs: /run/kproxy/LAB/agent-NODE.log)", file=sys.stderr)
        return 1
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from kproxy.cluster import Cluster
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab

    objects = _objects(args.file)
    lab = choose_lab(args.lab)
    _need_root()
    with lab_lock(lab), Cluster(lab) as cluster:
        return _report(cluster.apply(objects))


def cmd_delete(args: argparse.Namespace) -> int:
    from kproxy.cluster import Cluster
    from kproxy.getcmd import resolve_kind
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab

    if args.file:
        targets = [(o["kind"], o["metadata"]["namespace"], o["metadata"]["name"])
                   for o in _objects(args.file)]
    elif args.kind and args.names:
        targets = [(resolve_kind(args.kind), args.namespace, name) for name in args.names]
    else:
        raise KproxyError("say what to delete: -f FILE, or KIND NAME...")
    lab = choose_lab(args.lab)
    _need_root()
    with lab_lock(lab), Cluster(lab) as cluster:
        return _report(cluster.delete(targets, None if args.grace_period < 0 else args.grace_period))


def cmd_get(args: argparse.Namespace) -> int:
    from kproxy import getcmd
    from kproxy.lab.build import require
    from kproxy.lab.state import choose_lab, lab_dir
    from kproxy.selectors import parse_selector
    from kproxy.store import open_store

    kind = getcmd.resolve_kind(args.kind)
    selector = parse_selector(args.selector) if args.selector else None
    lab = require(choose_lab(args.lab)).name  # a mistyped lab is an error, not an empty one
    view = open_store(lab_dir(lab)).read()
    namespace = None if args.all_namespaces else args.namespace
    items = getcmd.select(view, kind, namespace, selector, args.name)
    if args.output in ("json", "yaml"):
        print(getcmd.render(items, args.output, single=args.name is not None, version=view.version))
        return 0
    if not items:
        print(f"No resources found in {namespace or 'any'} namespace." if kind != "Node" else "No resources found.",
              file=sys.stderr)
        return 0
    print(_table(getcmd.rows(kind, items, args.output == "wide", args.all_namespaces)))
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from kproxy.cluster import Cluster
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab

    lab = choose_lab(args.lab)
    _need_root()
    with lab_lock(lab), Cluster(lab) as cluster:
        return _report(cluster.scale(args.namespace, args.ref, args.replicas))


def cmd_rollout(args: argparse.Namespace) -> int:
    from kproxy.cluster import Cluster
    from kproxy.lab.lock import lab_lock
    from kproxy.lab.state import choose_lab

    lab = choose_lab(args.lab)
    _need_root()
    with lab_lock(lab), Cluster(lab) as cluster:
        return _report(cluster.rollout_restart(args.namespace, args.ref, on_step=lambda step: print(f"  {step}")))


def cmd_rules(args: argparse.Namespace) -> int:
    from cni.netns import entered
    from kproxy.lab.build import require
    from kproxy.lab.state import choose_lab, lab_dir, ns_path
    from kproxy.proxy.source import node_info, proxy_state
    from kproxy.store import open_store

    lab = choose_lab(args.lab)
    lab_state = require(lab)
    _need_root()
    if args.node not in lab_state.nodes:
        raise KproxyError(f"lab {lab} has no node {args.node!r} (nodes: {', '.join(sorted(lab_state.nodes))})")
    view = open_store(lab_dir(lab)).read()
    service = args.service if args.service is None or "/" in args.service else f"{args.namespace}/{args.service}"
    if service and f"Service/{service.split(':')[0]}" not in view.objects:
        raise KproxyError(f"service {service} not found")
    mode = proxy_mode(lab_state.mode)
    desired = proxy_state(view.of_kind("Service"), view.of_kind("EndpointSlice"), mode.service_info)
    node = node_info(view.objects[f"Node/{args.node}"], lab_state.pod_cidr, LAB_SERVICE_CIDR)
    with entered(ns_path(lab, args.node)):
        print(mode.rules_excerpt(desired, node, mode.options_of(lab_state.mode_options), service))
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    import ipaddress

    from kproxy import controllers
    from kproxy.proxy.source import proxy_state
    from kproxy.proxy.types import NodeInfo
    from kproxy.renderinput import render_objects
    from kproxy.textinput import read_manifest_files

    mode = proxy_mode(args.mode)
    options = mode.options_of(dict(args.mode_opt))
    services, pods, slices = render_objects(read_manifest_files(args.file))
    # kube-proxy takes any ClusterIP it is given; only the ones to allocate come from the service CIDR.
    controllers.allocate_cluster_ips(services, [], ipaddress.IPv4Network(args.service_cidr), given_anywhere=True)
    controllers.allocate_node_ports(services, [])
    unassigned = [svc for svc in services if not controllers.load_balancer_ips(svc)]
    controllers.allocate_load_balancer_ips(unassigned, services, ipaddress.IPv4Network(args.load_balancer_cidr))
    mode.refuse_unsupported(services)
    for svc in services:
        slices += controllers.endpoint_slices(svc, pods, {}).values()
    desired = proxy_state(services, slices, mode.service_info)
    node = NodeInfo(args.node, args.node_ip, args.cluster_cidr, args.service_cidr, args.node_port_addresses,
                    args.masquerade_all)
    print(mode.render_text(desired, node, options), end="")
    return 0


def _mode_option_argument(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument("--mode-opt", action="append", default=[], type=cliargs.MODE_OPTION, metavar="NAME=VALUE",
                        help=f"an option of the proxy mode (repeatable); {more}'kproxy modes' lists them")


def cmd_bench(args: argparse.Namespace) -> int:
    _need_root()
    from kproxy.bench import run  # rich and matplotlib load only for a benchmark
    typed = args.argv[args.argv.index("bench") + 1:]
    return run.execute(args, typed)


def cmd_modes(args: argparse.Namespace) -> int:
    for name in MODES:
        mode = proxy_mode(name)
        print(f"{name}{' (default)' if name == DEFAULT_MODE else ''}: {mode.summary}")
        for option in mode.options:
            print(f"  --mode-opt {option.name}={'|'.join(option.choices)}  (default {option.default})")
            print(f"      {option.help}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cliargs.Parser(prog=PROG, description="The Kubernetes Service data plane, for real, in namespaces.",
                            epilog=f"Errors are one line on stderr; {DEBUG_ENV}=1 shows the traceback of an "
                                   "unexpected one.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    lab_help = "lab name (default: $KPROXY_LAB, else the only lab)"

    lab = sub.add_parser("lab", help="start, inspect and stop labs (nodes and pods as namespaces)")
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="LAB_COMMAND", required=True)
    p = lab_sub.add_parser("up", help="build or reconcile a lab from a topology file")
    p.add_argument("-f", "--file", help="topology YAML (default: examples/lab.yaml; - for stdin)")
    p.add_argument("--name", type=cliargs.LAB, help="lab name (default: the file's name field)")
    p.add_argument("--overlay", choices=OVERLAYS, help="overlay between nodes (default: the file's)")
    p.add_argument("--mode", choices=MODES, help=f"proxy mode of the node agents (default: {DEFAULT_MODE}, "
                                                 "or the running lab's); another mode than the running lab's "
                                                 "restarts its agents after removing the old mode's rules")
    _mode_option_argument(p, "kept for the running lab's mode; changing them restarts its agents. ")
    p.add_argument("--dns", action=argparse.BooleanOptionalAction, default=None,
                   help="cluster DNS: kube-dns at 10.96.0.10 with two coredns pods, pods resolving through it "
                        "(default: on for a new lab, as it was for a running one; --no-dns leaves it out)")
    p.add_argument("--store", type=cliargs.STORE, metavar="{file,etcd,etcd://IP:PORT}",
                   help="where the lab keeps its objects: file (embedded, nothing to install), etcd (etcd 3.4 in "
                        "a control-plane namespace on the underlay; the agents watch it from their nodes) or "
                        "etcd://IP:PORT (an etcd another machine runs on the underlay's network, reached over "
                        "--nic; down removes the lab's keys from it) (default: file for a new lab, the running "
                        "lab's store for a running one)")
    p.add_argument("--nic", metavar="MAC", type=cliargs.MAC,
                   help="stretch the underlay over the dedicated NIC with this MAC (no address, no default route, "
                        "MTU >= 1500): up moves it from the machine's root namespace into the lab's underlay as a "
                        "port of br0, down gives it back (default: none for a new lab, the running lab's NIC)")
    p.set_defaults(func=cmd_lab_up)
    p = lab_sub.add_parser("join", help="add this machine's nodes to a lab another machine runs with --store etcd",
                           description="Build the topology's nodes and pods on this machine as part of the lab "
                                       "whose etcd is at --store, over the NIC with --nic on the same Ethernet "
                                       "segment as that lab's. The lab's overlay, networks, proxy mode and DNS "
                                       "come from its store; node IPs and pod CIDRs are the first no machine has. "
                                       "Again on a machine that joined: reconciles. 'kproxy lab down' takes this "
                                       "machine's nodes out of the lab.")
    p.add_argument("-f", "--file", required=True,
                   help="topology YAML with name, nodes and pods (overlay and the CIDRs are the lab's; - for stdin)")
    p.add_argument("--name", type=cliargs.LAB, help="lab name (default: the file's name field)")
    p.add_argument("--store", required=True, metavar="etcd://IP:PORT", type=cliargs.ETCD_ENDPOINT,
                   help="the lab's etcd, on its underlay (its maker's 'kproxy lab status' shows it)")
    p.add_argument("--nic", required=True, metavar="MAC", type=cliargs.MAC,
                   help="this machine's dedicated NIC on the lab's segment (no address, no default route, MTU >= "
                        "1500), moved into the lab's underlay; down gives it back")
    p.set_defaults(func=cmd_lab_join)
    p = lab_sub.add_parser("down", help="remove everything of a lab (also after a crash); a joined machine's "
                                        "nodes leave the lab's store")
    p.add_argument("name", nargs="?", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_lab_down)
    p = lab_sub.add_parser("ls", help="list labs on this machine")
    p.set_defaults(func=cmd_lab_ls)
    p = lab_sub.add_parser("status", help="nodes, pods, IPs, overlay and workloads of a lab")
    p.add_argument("name", nargs="?", type=cliargs.LAB, help=lab_help)
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_lab_status)
    p = lab_sub.add_parser("add-node", help="add a node; every other node's overlay learns it")
    p.add_argument("node", type=cliargs.NODE)
    p.add_argument("--label", action="append", type=cliargs.LABEL, default=[], metavar="KEY=VALUE")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_lab_add_node)
    p = lab_sub.add_parser("remove-node", help="remove a node, its pinned pods, and its overlay entries everywhere")
    p.add_argument("node", type=cliargs.NODE)
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_lab_remove_node)

    p = sub.add_parser("apply", help="create or update Services, Pods and Deployments from Kubernetes YAML")
    p.add_argument("-f", "--file", action="append", required=True, help="YAML file (repeatable; - for stdin)")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_apply)
    p = sub.add_parser("delete", help="delete objects: -f FILE, or KIND NAME...")
    p.add_argument("-f", "--file", action="append", help="YAML file naming the objects (repeatable)")
    p.add_argument("kind", nargs="?", help="svc, pod, deploy, rs")
    p.add_argument("names", nargs="*", type=cliargs.OBJECT_NAME, help="object names")
    p.add_argument("-n", "--namespace", type=cliargs.NAMESPACE, default="default")
    p.add_argument("--grace-period", type=cliargs.GRACE_PERIOD, default=-1, metavar="SECONDS",
                   help="seconds a deleted pod keeps serving as a terminating endpoint before it stops, "
                        f"0-{cliargs.MAX_GRACE_SECONDS} (default -1: the pod's terminationGracePeriodSeconds, "
                        "else a short drain)")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("get", help="list nodes, pods, svc, endpoints, endpointslices, deployments or rs")
    p.add_argument("kind", help="nodes | pods | svc | endpoints | endpointslices | deployments | rs")
    p.add_argument("name", nargs="?", type=cliargs.OBJECT_NAME, help="one object by name")
    p.add_argument("-o", "--output", choices=("wide", "json", "yaml"), help="output format")
    p.add_argument("-l", "--selector", help="label selector, e.g. 'app=web,env in (a,b)'")
    p.add_argument("-n", "--namespace", type=cliargs.NAMESPACE, default="default")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_get)
    p = sub.add_parser("scale", help="set a Deployment's replicas: scale deploy/NAME --replicas N")
    p.add_argument("ref", metavar="deploy/NAME", type=cliargs.DEPLOYMENT)
    p.add_argument("--replicas", type=cliargs.REPLICAS, required=True, help="0 or more")
    p.add_argument("-n", "--namespace", type=cliargs.NAMESPACE, default="default")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_scale)
    p = sub.add_parser("rollout", help="rollout restart deploy/NAME: replace pods one at a time, no failed requests")
    p.add_argument("action", choices=("restart",))
    p.add_argument("ref", metavar="deploy/NAME", type=cliargs.DEPLOYMENT)
    p.add_argument("-n", "--namespace", type=cliargs.NAMESPACE, default="default")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_rollout)

    p = sub.add_parser("rules", help="a node's live proxy rules (with packet counters), for one Service or all")
    p.add_argument("node", type=cliargs.NODE)
    p.add_argument("--service", help="NAME, NAME:PORT, or NAMESPACE/NAME")
    p.add_argument("-n", "--namespace", type=cliargs.NAMESPACE, default="default")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.set_defaults(func=cmd_rules)
    p = sub.add_parser("bench", help="measure the proxy modes and overlays side by side: JSON, plots, a report",
                       description=bench_options.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench_options.add_arguments(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("modes", help="the proxy modes and their options (--mode, --mode-opt)")
    p.set_defaults(func=cmd_modes)
    p = sub.add_parser("render", help="print the rules a mode would program for Service/EndpointSlice/Pod YAML "
                                      "(no root, no lab)")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE)
    _mode_option_argument(p)
    p.add_argument("-f", "--file", action="append", required=True, help="YAML file (repeatable; - for stdin)")
    p.add_argument("--node", type=cliargs.OBJECT_NAME, default="node1", help="node name (default node1)")
    p.add_argument("--node-ip", type=cliargs.IPV4_ADDRESS, default="172.18.0.2",
                   help="the node's IP (default 172.18.0.2)")
    p.add_argument("--cluster-cidr", type=cliargs.IPV4_NETWORK, default="10.244.0.0/16",
                   help="the pod CIDR: traffic from outside it to a ClusterIP is masqueraded (default 10.244.0.0/16)")
    p.add_argument("--service-cidr", type=cliargs.IPV4_NETWORK, default=LAB_SERVICE_CIDR,
                   help=f"the service CIDR, whose unallocated addresses nftables mode drops (default {LAB_SERVICE_CIDR})")
    p.add_argument("--node-port-addresses", type=cliargs.NODE_PORT_ADDRESSES, default=(), metavar="CIDR[,CIDR...]",
                   help="kube-proxy's --nodeport-addresses: CIDRs, or 'primary' for the node IP, where NodePorts "
                        "answer (default: every local address)")
    p.add_argument("--masquerade-all", action="store_true",
                   help="kube-proxy's --masquerade-all: SNAT every packet to a ClusterIP, not only off-cluster ones")
    p.add_argument("--load-balancer-cidr", type=cliargs.IPV4_NETWORK, default=DEFAULT_LOAD_BALANCER_CIDR,
                   help="where a LoadBalancer Service without status.loadBalancer.ingress gets its address, as "
                        f"in a lab (default {DEFAULT_LOAD_BALANCER_CIDR})")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("exec", help="run a command in a pod, node, external or underlay namespace")
    p.add_argument("--lab", type=cliargs.LAB, help=lab_help)
    p.add_argument("target", help="pod or node name, 'external', 'underlay' or (with the etcd store) 'control-plane'")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    p.set_defaults(func=cmd_exec)
    packetcli.add_commands(sub, lab_help)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; every failure is one line on stderr and a non-zero status, never a traceback."""
    try:
        try:
            args = build_parser().parse_args(argv)
            args.argv = list(sys.argv[1:] if argv is None else argv)
        except SystemExit as done:  # --help, or a usage error already said in one line
            return done.code if isinstance(done.code, int) else 0
        status = _run(args)
        sys.stdout.flush()  # a reader gone (kproxy ... | head) shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        # As the Python docs advise (signal module, "Note on SIGPIPE"): stdout's reader is gone, so stop
        # quietly, with the status a shell shows for a command killed by SIGPIPE, like cat.
        _stdout_to_devnull()
        return 128 + signal.SIGPIPE


def _run(args: argparse.Namespace) -> int:
    try:
        return int(args.func(args))
    except KproxyError as err:
        print(f"{PROG}: error: {one_line(str(err))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as exc:  # a bug or an unforeseen state of the machine: still one line
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc()
        else:
            what = ": ".join(filter(None, (type(exc).__name__, one_line(str(exc)))))
            print(f"{PROG}: error: {what} (run again with {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1


def _stdout_to_devnull() -> None:
    """What is still buffered for stdout goes nowhere, not into an error at interpreter exit."""
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (a caller's StringIO): nothing to silence
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
