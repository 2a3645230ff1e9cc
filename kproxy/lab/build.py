"""Bringing a lab up, reconciling it, and taking it down.

`up` is one reconcile: it records the plan in the state first, then makes
every piece exist (namespaces, underlay links, overlay entries), writes the
nodes and the topology's pods into the lab's store, and lets the kubelet
(kproxy.lab.kubelet) wire pods and the node agents program Services. It
creates what is missing and removes what the topology no longer has, so `up`
after a crash or a half-finished `up` completes the lab instead of failing.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
from typing import Any, Callable

from cni.netns import entered, write_sysctl
from kproxy import children, kmod
from kproxy.dns import addon
from kproxy.errors import KproxyError
from kproxy.k8sform import container, container_port, metadata, pod_object, pod_spec
from kproxy.lab import announce, flanneld, kubelet, nic as lab_nic, overlay, processes, supervisor
from kproxy.lab.state import NETNS_DIR, LabState, NodeState, lab_dir, lab_namespaces, load_state, ns_name, ns_path, \
    ns_prefix, save_state
from kproxy.lab.topology import Topology, node_subnet_count, parse_topology, place_pods, to_raw
from kproxy.lab.wiring import CONTROL_PLANE, ETC_NETNS, EXTERNAL, UNDERLAY, UNDERLAY_BRIDGE, cni_config, \
    delete_namespaces, ensure_default_route, ensure_namespaces, ensure_uplink, random_mac, remove_resolv_conf
from kproxy.proxy import DEFAULT_MODE, mode as proxy_mode
from kproxy.proxy.types import NodeInfo
from kproxy.scheduler import node_labels
from kproxy.store import Store, carry_identity, config_of, configure, open_store

TOPOLOGY_ANNOTATION = "kproxy.io/from-topology"
HOST_ANNOTATION = "kproxy.io/host"  # on a Node: the machine its namespace is on
OVERLAY_TIMEOUT = 30.0  # for every flanneld to program the Nodes written (Python starting in a loaded guest is slow)


def plan(topology: Topology, previous: LabState | None, mode: str | None = None,
         mode_options: dict[str, str] | None = None, dns: bool | None = None, store: str | None = None,
         nic: str | None = None) -> LabState:
    """The state this topology asks for, keeping every assignment previous made. mode_options
    are merged over the running lab's when the mode stays, and replace them when it changes;
    dns None keeps the running lab's cluster DNS (a new lab has it); store None keeps the running
    lab's store (a new lab has the file store); nic (a MAC) None keeps the running lab's lab NIC
    (a new lab has none)."""
    mode = mode or (previous.mode if previous else DEFAULT_MODE)
    kept_options = previous.mode_options if previous is not None and previous.mode == mode else {}
    options = {**kept_options, **(mode_options or {})}
    proxy_mode(mode).options_of(options)  # refused here, before anything is made
    store = store or (previous.store if previous else "file")
    nic = nic if nic is not None else previous.nic if previous else ""
    if previous is not None:
        for what, old, new in (("store", previous.store, store), ("NIC", previous.nic or "none", nic or "none"),
                               ("overlay", previous.overlay, topology.overlay),
                               ("podCIDR", previous.pod_cidr, str(topology.pod_cidr)),
                               ("nodeCIDR", previous.node_cidr, str(topology.node_cidr)),
                               ("loadBalancerCIDR", previous.load_balancer_cidr or str(topology.load_balancer_cidr),
                                str(topology.load_balancer_cidr))):
            if old != new:
                raise KproxyError(f"lab {topology.name} runs with {what} {old}, not {new}; "
                                  f"take it down first ('kproxy lab down {topology.name}')")
    hosts = list(topology.node_cidr.hosts())
    state = LabState(
        name=topology.name,
        overlay=topology.overlay,
        pod_cidr=str(topology.pod_cidr),
        node_cidr=str(topology.node_cidr),
        external_ip=str(hosts[-1]),
        load_balancer_cidr=str(topology.load_balancer_cidr),
        mode=mode,
        mode_options=options,
        generation=previous.generation if previous else 0,
        pods=dict(previous.pods) if previous else {},
        dns=dns if dns is not None else previous.dns if previous else True,
        store=store,
        control_plane_ip=str(hosts[-2]) if store == "etcd" else "",
        nic=nic,
        nic_name=previous.nic_name if previous else "",
    )
    wanted = {n.name for n in topology.nodes}
    kept = {name: n for name, n in (previous.nodes if previous else {}).items() if name in wanted}
    # .1 stays free; the last two are the external client's and the control plane's
    free_ips = (str(ip) for ip in hosts[1:-2] if str(ip) not in {n.ip for n in kept.values()})
    subnets = list(topology.pod_cidr.subnets(new_prefix=24))[1:1 + node_subnet_count(topology.pod_cidr)]
    free_cidrs = (str(net) for net in subnets if str(net) not in {n.pod_cidr for n in kept.values()})
    for node in topology.nodes:
        old = kept.get(node.name)
        if old is not None:
            state.nodes[node.name] = NodeState(old.ip, old.pod_cidr, old.vtep_mac, dict(node.labels),
                                               old.host or socket.gethostname())
        else:
            state.nodes[node.name] = NodeState(next(free_ips), next(free_cidrs), random_mac(), dict(node.labels),
                                               socket.gethostname())
    state.topology = to_raw(topology)
    return state


def node_object(state: LabState, name: str) -> dict[str, Any]:
    """The Node, with the lease flanneld keeps on it (kproxy.lab.flanneld)."""
    node = state.nodes[name]
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": node_labels(name, node.labels),
                         "annotations": {HOST_ANNOTATION: node.host,
                                         **overlay.lease_annotations(state.overlay, node.ip, node.vtep_mac)}},
            "spec": {"podCIDR": node.pod_cidr, "podCIDRs": [node.pod_cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": node.ip},
                                     {"type": "Hostname", "address": name}],
                       "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                       "message": "kubelet is posting ready status"}]}}


def topology_pod_objects(topology: Topology, placement: dict[str, str]) -> dict[str, dict[str, Any]]:
    out = {}
    for pod in topology.pods:
        spec = pod_spec([container("workload", ports=[container_port(p) for p in pod.ports])],
                        node_name=placement[pod.name])
        meta = metadata(pod.name, "default", pod.labels, {TOPOLOGY_ANNOTATION: "true"})
        out[f"Pod/default/{pod.name}"] = pod_object(meta, spec)
    return out


def _sync_store_topology(state: LabState, topology: Topology, store: Store) -> int:
    """Nodes (with their overlay leases) and the topology's pods into the store; pods of vanished
    nodes out. Returns the store's version with them."""
    view = store.read()
    changes: dict[str, Any] = {}
    topology_pods = {f"Pod/default/{p.name}" for p in topology.pods}
    for key, obj in view.objects.items():
        if key.startswith("Node/") and obj["metadata"]["name"] not in state.nodes:
            changes[key] = None
        if key.startswith("Pod/"):
            from_topology = (obj["metadata"].get("annotations") or {}).get(TOPOLOGY_ANNOTATION)
            if obj["spec"].get("nodeName") not in state.nodes or (from_topology and key not in topology_pods):
                changes[key] = None
    for name in state.nodes:
        old = view.objects.get(f"Node/{name}")
        obj = carry_identity(node_object(state, name), old)
        if old != obj:
            changes[f"Node/{name}"] = obj
    existing = {o["metadata"]["name"]: o["spec"]["nodeName"] for k, o in view.objects.items()
                if k.startswith("Pod/default/") and k not in changes}
    for key, obj in topology_pod_objects(topology, place_pods(topology, existing)).items():
        old = view.objects.get(key)
        carry_identity(obj, old)
        if old is None or {k: old[k] for k in ("metadata", "spec")} != {k: obj[k] for k in ("metadata", "spec")}:
            changes[key] = obj
    return store.write(changes) if changes else store.version()


def up(topology: Topology, mode: str | None = None, mode_options: dict[str, str] | None = None,
       say: Callable[[str], object] = print, dns: bool | None = None,
       store: str | None = None, nic: str | None = None) -> tuple[LabState, kubelet.Report]:
    """Build or reconcile the lab; say() tells of machine-wide acts (kernel modules loaded, the
    lab NIC moved); dns: with cluster DNS or without (None: as the running lab, a new one with);
    store: "file" or "etcd" (None: as the running lab, a new one the file store); nic: the MAC
    of a dedicated NIC to make the underlay's port (None: as the running lab, a new one none)."""
    previous = load_state(topology.name)
    if previous is None and lab_namespaces(topology.name):
        teardown(topology.name)  # leftovers of a crash before any state was written
    state = plan(topology, previous, mode, mode_options, dns, store, nic)
    in_underlay = True  # the lab NIC, if any, is the underlay's already
    if state.nic:  # found and judged before anything is made: a refusal changes nothing
        found, in_underlay = lab_nic.find(state.nic, ns_path(state.name, UNDERLAY))
        if not in_underlay:
            state.nic_name = found.name
    chosen = proxy_mode(state.mode)
    options = chosen.options_of(state.mode_options)
    if previous is not None and previous.mode != state.mode:  # the Services stored must suit the new mode
        chosen.refuse_unsupported(open_store(lab_dir(state.name)).read().of_kind("Service"))
    # Before anything is made: a kernel that lacks a module gets a refusal, not a half-built lab.
    loaded = kmod.ensure([*kmod.LAB_MODULES, *chosen.kernel_modules(options)])
    if loaded:
        say(kmod.notice(loaded))
    if state.store == "etcd":  # likewise etcd: fetched now (scripts/setup has it already), or refused now
        from kproxy.store import etcdserver

        etcdserver.binary(log=say)
    directory = lab_dir(state.name)
    directory.mkdir(parents=True, exist_ok=True)
    if previous is not None and (previous.mode != state.mode or chosen.options_of(previous.mode_options) != options):
        # Before the new state is saved: a crash midway leaves the old one, and the next up does this again.
        _stop_agents(previous, clean=previous.mode != state.mode)
    save_state(state)  # the intent first: a crash from here on is reconciled by the next up

    gone_nodes = [n for n in (previous.nodes if previous else {}) if n not in state.nodes]
    if gone_nodes:
        supervisor.ensure(directory, [w for w in supervisor.current(directory) if w.node not in gone_nodes],
                          wait_running=False)
    for node in gone_nodes:
        shutil.rmtree(directory / "ipam" / node, ignore_errors=True)
        (directory / "cni" / f"{node}.conf").unlink(missing_ok=True)
    present = lab_namespaces(state.name)
    delete_namespaces([ns_name(state.name, n) for n in gone_nodes if ns_name(state.name, n) in present])

    control_plane = [CONTROL_PLANE] if state.store == "etcd" else []
    ensure_namespaces(state.name, [UNDERLAY, EXTERNAL, *state.nodes, *control_plane])
    prefix = ipaddress.ip_network(state.node_cidr).prefixlen
    for node, spec in state.nodes.items():
        ensure_uplink(state.name, node, spec.ip, prefix)
        ensure_default_route(state.name, node)
        write_sysctl(ns_path(state.name, node), "net/ipv4/ip_forward", "1")
        # Set, not assumed: bridged same-node replies must pass iptables to be un-NATed (kmod.py).
        write_sysctl(ns_path(state.name, node), "net/bridge/bridge-nf-call-iptables", "1")
        cni_dir = directory / "cni"
        cni_dir.mkdir(parents=True, exist_ok=True)
        (cni_dir / f"{node}.conf").write_text(json.dumps(cni_config(state, node), indent=2) + "\n")
    ensure_uplink(state.name, EXTERNAL, state.external_ip, prefix)
    if state.nic:
        if not in_underlay:
            say(f"kproxy: moving NIC {state.nic_name} ({state.nic}) from the machine's root namespace into lab "
                f"{state.name}'s underlay (machine-wide; 'kproxy lab down' gives it back)")
        lab_nic.attach(state.nic, ns_path(state.name, UNDERLAY), UNDERLAY_BRIDGE)
    _ensure_store(state, prefix)
    # External clients reach NodePorts on node IPs; a route to the pod network is
    # not theirs to have, exactly like a client outside a cluster.
    store = open_store(directory)
    leases = _sync_store_topology(state, topology, store)
    _sync_store_dns(state, store)
    report = kubelet.sync(state, store)  # starts each new node's flanneld, which programs its overlay first
    lagging = flanneld.wait_programmed(directory, sorted(state.nodes), leases, OVERLAY_TIMEOUT)
    if lagging:
        raise KproxyError(f"flanneld did not program the overlay of {', '.join(lagging)} within "
                          f"{OVERLAY_TIMEOUT:.0f} s (see {directory}/flanneld-{lagging[0]}.log)")
    announce.pin_connections(state)
    announce.sync(state, store.read())
    if previous is not None and previous.dns != state.dns:
        for member in state.pods:
            kubelet.write_resolver(state, member)
    save_state(state)
    kubelet.ensure_daemons(state)  # agents last: their first sync finds every pod wired, not one sync per pod
    return state, report


def _ensure_store(state: LabState, prefix: int) -> None:
    """The lab's store recorded for everyone who opens it; with etcd, etcd answering in the
    control-plane member (before anything reads or writes the store)."""
    directory = lab_dir(state.name)
    if state.store != "etcd":
        configure(directory, {"backend": "file"})
        return
    from kproxy.store import etcdserver  # requests and etcd's flags: for labs that use etcd only

    ensure_uplink(state.name, CONTROL_PLANE, state.control_plane_ip, prefix)
    configure(directory, {"backend": "etcd", "endpoint": f"http://{state.control_plane_ip}:{etcdserver.CLIENT_PORT}",
                          "prefix": f"/kproxy/{state.name}/", "netns": ns_path(state.name, CONTROL_PLANE)})
    supervisor.ensure(directory, list(dict.fromkeys([*supervisor.current(directory), *kubelet.control_plane(state)])))


def _sync_store_dns(state: LabState, store: Store) -> None:
    """The cluster DNS addon's objects stored (its pods scheduled), or removed from a lab without DNS."""
    if state.dns:
        from kproxy.cluster import Cluster  # the API server's part needs the lab's state saved: it is

        with Cluster(state.name) as cluster:
            cluster.admit(addon.objects())
        return
    gone = {key: None for key, obj in store.read().objects.items() if addon.is_part_of_addon(obj)}
    if gone:
        store.write(gone)


def _stop_agents(previous: LabState, clean: bool) -> None:
    """Stop every node's agent (the ones up starts next run the new mode or options); with
    clean, also remove what the previous mode programmed in each node (kube-proxy --cleanup)."""
    directory = lab_dir(previous.name)
    present = set(lab_namespaces(previous.name))
    supervisor.ensure(directory, [w for w in supervisor.current(directory) if w.kind != processes.AGENT.kind],
                      wait_running=False)
    store = open_store(directory)
    for node, spec in previous.nodes.items():
        store.delete_report(node)  # waiting for the new agent, not the old one
        if clean and ns_name(previous.name, node) in present:
            old = proxy_mode(previous.mode)
            with entered(ns_path(previous.name, node)):
                proxier = old.make_proxier(NodeInfo(node, spec.ip, previous.pod_cidr),
                                           old.options_of(previous.mode_options))
                try:
                    proxier.cleanup()
                finally:
                    proxier.close()


def teardown(name: str) -> list[str]:
    """Remove every trace of the lab: processes, namespaces, state. Returns the namespaces removed."""
    directory = lab_dir(name)
    supervisor.stop(directory)  # first: nothing restarts what is stopped next
    for daemon in processes.DAEMONS:  # what a dead supervisor left behind
        for node in processes.nodes_with(daemon, directory):
            processes.stop(daemon, directory, node)
    names = lab_namespaces(name)
    _give_back_nic(name)
    # What is still in them (a command a crash left there) would keep each namespace, its links and
    # its routes alive after the delete, out of everyone's sight.
    children.end_all_in([NETNS_DIR / ns for ns in names])
    delete_namespaces(names)
    for leftover in ETC_NETNS.glob(f"{ns_prefix(name)}*"):  # of namespaces a crash removed before their files
        remove_resolv_conf(leftover.name)
    shutil.rmtree(directory, ignore_errors=True)
    return names


def _give_back_nic(name: str) -> None:
    """The lab NIC back in the machine's root namespace with its name, before its namespace goes;
    also after a crash that lost the state: whatever link is in the underlay and not ours."""
    try:
        state = load_state(name)
    except KproxyError:  # damaged: down still cleans up
        state = None
    names = {state.nic: state.nic_name} if state is not None and state.nic and state.nic_name else {}
    lab_nic.give_back(ns_path(name, UNDERLAY), {"lo", UNDERLAY_BRIDGE}, names)


def require(lab: str) -> LabState:
    state = load_state(lab)
    if state is None:
        raise KproxyError(f"lab {lab} is not running (no state in {lab_dir(lab)})")
    return state


def _topology_of(state: LabState) -> dict[str, Any]:
    return json.loads(json.dumps(state.topology))


def add_node(lab: str, node: str, labels: dict[str, str]) -> tuple[LabState, kubelet.Report]:
    state = require(lab)
    raw = _topology_of(state)
    raw["nodes"].append({"name": node, "labels": labels})
    return up(parse_topology(raw))


def remove_node(lab: str, node: str) -> tuple[LabState, kubelet.Report]:
    state = require(lab)
    if node not in state.nodes:
        raise KproxyError(f"lab {lab} has no node {node!r}")
    if len(state.nodes) == 1:
        raise KproxyError(f"{node} is the last node of lab {lab}; use 'kproxy lab down {lab}'")
    raw = _topology_of(state)
    raw["nodes"] = [n for n in raw["nodes"] if n["name"] != node]
    # Topology pods pinned to the node go with it; the others are placed again.
    raw["pods"] = [p for p in raw["pods"] if p.get("nodeName") != node]
    return up(parse_topology(raw))


def status(lab: str) -> dict[str, Any]:
    """What a person wants to see of a running lab, checked against the kernel."""
    state = require(lab)
    have = set(lab_namespaces(lab))
    directory = lab_dir(lab)
    supervised = supervisor.read_status(directory).get("daemons", {})
    nodes = []
    for name, spec in sorted(state.nodes.items()):
        node: dict[str, Any] = {"name": name, "host": spec.host, "ip": spec.ip, "podCIDR": spec.pod_cidr,
                                "labels": spec.labels, "namespace": ns_name(lab, name),
                                "present": ns_name(lab, name) in have}
        for daemon in (processes.WORKLOAD, processes.AGENT):
            record = supervised.get(f"{daemon.kind}-{name}") or {}
            node[f"{daemon.kind}Pid"] = processes.running_pid(daemon, directory, name)
            node[f"{daemon.kind}Restarts"] = record.get("restarts", 0)
            node[f"{daemon.kind}LastRestart"] = (record.get("lastExit") or {}).get("finishedAt") \
                if record.get("restarts") else None
            node[f"{daemon.kind}Waiting"] = record.get("waiting")
        nodes.append(node)
    store = _store_status(state)
    nodes += _nodes_elsewhere(state, store)
    pods = []
    for member, spec in sorted(state.pods.items()):
        pods.append({"name": spec.name, "namespace": spec.namespace, "node": spec.node, "ip": spec.ip,
                     "labels": spec.labels, "ports": spec.ports, "netns": ns_name(lab, member),
                     "present": ns_name(lab, member) in have, "wired": kubelet.pod_is_wired(state, member)})
    return {"name": lab, "overlay": state.overlay, "mode": state.mode, "modeOptions": state.mode_options, "podCIDR": state.pod_cidr,
            "supervisorPid": supervisor.supervisor_pid(directory),
            "nodeCIDR": state.node_cidr, "loadBalancerCIDR": state.load_balancer_cidr,
            "external": {"ip": state.external_ip, "namespace": ns_name(lab, EXTERNAL)},
            "nic": {"mac": state.nic, "name": state.nic_name} if state.nic else None,
            "store": store, "nodes": sorted(nodes, key=lambda n: n["name"]), "pods": pods}


def _nodes_elsewhere(state: LabState, store: dict[str, Any]) -> list[dict[str, Any]]:
    """The lab's nodes that are on other machines: Nodes in the store this machine did not build."""
    if "error" in store:
        return []
    elsewhere = []
    for obj in open_store(lab_dir(state.name)).read().of_kind("Node"):
        name = obj["metadata"]["name"]
        lease = overlay.lease_of(obj)
        if name in state.nodes or lease is None:
            continue
        elsewhere.append({"name": name, "host": (obj["metadata"].get("annotations") or {}).get(HOST_ANNOTATION, ""),
                          "ip": lease.node_ip, "podCIDR": lease.pod_cidr,
                          "labels": obj["metadata"].get("labels") or {}, "namespace": None, "present": None})
    return elsewhere


def _store_status(state: LabState) -> dict[str, Any]:
    """Which store, where, and its version (etcd's revision of the lab's last write), or why it did not answer."""
    config = config_of(lab_dir(state.name))
    shown: dict[str, Any] = {"backend": config["backend"]}
    if "endpoint" in config:
        shown["endpoint"] = config["endpoint"]
        shown["namespace"] = ns_name(state.name, CONTROL_PLANE)
    try:
        shown["version"] = open_store(lab_dir(state.name)).version()
    except KproxyError as exc:
        shown["error"] = str(exc)
    return shown
