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
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from cni.netns import entered, write_sysctl
from kproxy import children, kmod
from kproxy.dns import addon
from kproxy.errors import KproxyError
from kproxy.lab import announce, flanneld, kubelet, labconfig, nic as lab_nic, overlay, processes, supervisor
from kproxy.lab.planning import HOST_ANNOTATION, TOPOLOGY_ANNOTATION, Others, node_object, others_in, plan, \
    topology_pod_objects
from kproxy.lab.state import NETNS_DIR, LabState, lab_dir, lab_namespaces, load_state, ns_name, ns_path, \
    ns_prefix, save_state
from kproxy.lab.topology import Topology, parse_topology, place_pods
from kproxy.lab.wiring import CONTROL_PLANE, ETC_NETNS, EXTERNAL, UNDERLAY, UNDERLAY_BRIDGE, cni_config, \
    delete_namespaces, ensure_default_route, ensure_namespaces, ensure_uplink, remove_resolv_conf
from kproxy.proxy import mode as proxy_mode
from kproxy.proxy.types import NodeInfo
from kproxy.store import Conflict, Store, carry_identity, config_of, configure, open_store

CLAIM_ATTEMPTS = 5  # writes of this machine's Nodes that other machines' writes may overtake
OVERLAY_TIMEOUT = 30.0  # for every flanneld to program the Nodes written (Python starting in a loaded guest is slow)


def _sync_store_topology(state: LabState, topology: Topology, store: Store, gone_nodes: Iterable[str],
                         expect: int | None = None) -> int:
    """This machine's Nodes (with their overlay leases) and its topology's pods into the store, the
    Nodes it no longer has and the pods of vanished nodes out; the lab's parameters (labconfig)
    where other machines may join it. Other machines' Nodes and pods stay as they are. expect: the
    version the plan's view of other machines was read at (a claim that fails if they changed).
    Returns the store's version with them."""
    view = store.read()
    changes: dict[str, Any] = {}
    gone = set(gone_nodes)
    nodes_after = ({o["metadata"]["name"] for o in view.of_kind("Node")} - gone) | set(state.nodes)
    topology_pods = {f"Pod/default/{p.name}" for p in topology.pods}
    for key, obj in view.objects.items():
        if key.startswith("Node/") and obj["metadata"]["name"] in gone:
            changes[key] = None
        if key.startswith("Pod/"):
            node = obj["spec"].get("nodeName")
            from_topology = (obj["metadata"].get("annotations") or {}).get(TOPOLOGY_ANNOTATION)
            if node not in nodes_after or (from_topology and node in state.nodes and key not in topology_pods):
                changes[key] = None
    for name in state.nodes:
        old = view.objects.get(f"Node/{name}")
        obj = carry_identity(node_object(state, name), old)
        if old != obj:
            changes[f"Node/{name}"] = obj
    if state.store == "etcd" and not state.joined:
        old = view.objects.get(labconfig.KEY)
        obj = carry_identity(labconfig.config_map(state), old)
        if old != obj:
            changes[labconfig.KEY] = obj
    existing = {o["metadata"]["name"]: o["spec"]["nodeName"] for k, o in view.objects.items()
                if k.startswith("Pod/default/") and k not in changes}
    for key, obj in topology_pod_objects(topology, place_pods(topology, existing)).items():
        old = view.objects.get(key)
        if old is not None and old["spec"].get("nodeName") not in state.nodes:
            raise KproxyError(f"lab {state.name} has a pod {obj['metadata']['name']} on node "
                              f"{old['spec'].get('nodeName')} of another machine; choose another name")
        carry_identity(obj, old)
        if old is None or {k: old[k] for k in ("metadata", "spec")} != {k: obj[k] for k in ("metadata", "spec")}:
            changes[key] = obj
    return store.write(changes, expect) if changes else store.version()


def _claim(state: LabState, topology: Topology, store: Store, previous: LabState | None, others: Others) -> int:
    """_sync_store_topology, on a networked store only if no other machine wrote meanwhile (it
    might have taken a name, IP or pod CIDR of ours); when one did but took none of ours, again.
    Returns the store's version with our Nodes."""
    had = list(previous.nodes) if previous is not None else []
    gone = [n for n in had if n not in state.nodes]
    if state.store != "etcd":
        return _sync_store_topology(state, topology, store, gone)
    for _ in range(CLAIM_ATTEMPTS):
        try:
            return _sync_store_topology(state, topology, store, gone, others.version)
        except Conflict:
            others = others_in(store.read(), had)
            if set(state.nodes) & set(others.hosts) or {n.ip for n in state.nodes.values()} & others.ips or \
                    {n.pod_cidr for n in state.nodes.values()} & others.pod_cidrs:
                raise Conflict(f"another machine took a node name, IP or pod CIDR of lab {state.name} meanwhile; "
                               "run the command again") from None
    raise Conflict(f"lab {state.name}'s store changed {CLAIM_ATTEMPTS} times while this machine wrote its nodes; "
                   "run the command again")


def up(topology: Topology, mode: str | None = None, mode_options: dict[str, str] | None = None,
       say: Callable[[str], object] = print, dns: bool | None = None,
       store: str | None = None, nic: str | None = None, joined: bool = False,
       others: Others | None = None, store_endpoint: str | None = None) -> tuple[LabState, kubelet.Report]:
    """Build or reconcile the lab; say() tells of machine-wide acts (kernel modules loaded, the
    lab NIC moved); dns: with cluster DNS or without (None: as the running lab, a new one with);
    store: "file" or "etcd" (None: as the running lab, a new one the file store); nic: the MAC
    of a dedicated NIC to make the underlay's port (None: as the running lab, a new one none).
    store_endpoint: the http://IP:PORT of an etcd that another machine runs on the underlay
    (None: as the running lab, a new one runs its own); kproxy.lab.join makes the first contact.
    joined: this topology's nodes join another machine's lab at store_endpoint, with others,
    what that lab's other machines hold; such a machine builds its nodes and pods only: no
    external client, no cluster DNS of its own."""
    previous = load_state(topology.name)
    if previous is None and lab_namespaces(topology.name) and not store_endpoint:  # (join made its underlay)
        teardown(topology.name)  # leftovers of a crash before any state was written
    if previous is not None and previous.joined != joined:
        raise KproxyError(f"lab {topology.name} on this machine "
                          + ("joined another machine's lab: change it with 'kproxy lab join'" if previous.joined
                             else "was made here: change it with 'kproxy lab up'"))
    if others is None:  # a lab made here: with etcd, other machines may have joined it
        others = others_in(open_store(lab_dir(topology.name)).read(), previous.nodes) \
            if previous is not None and previous.store == "etcd" else Others()
    state = plan(topology, previous, mode, mode_options, dns, store, nic, others, joined, store_endpoint)
    in_underlay = True  # the lab NIC, if any, is the underlay's already
    if state.nic:  # found and judged before anything is made: a refusal changes nothing
        found, in_underlay = lab_nic.find(state.nic, ns_path(state.name, UNDERLAY))
        if not in_underlay or not state.nic_name:  # lab join moved it already
            state.nic_name = found.name
    chosen = proxy_mode(state.mode)
    options = chosen.options_of(state.mode_options)
    if previous is not None and previous.mode != state.mode:  # the Services stored must suit the new mode
        chosen.refuse_unsupported(open_store(lab_dir(state.name)).read().of_kind("Service"))
    # Before anything is made: a kernel that lacks a module gets a refusal, not a half-built lab.
    loaded = kmod.ensure([*kmod.LAB_MODULES, *chosen.kernel_modules(options)])
    if loaded:
        say(kmod.notice(loaded))
    if state.runs_etcd:  # likewise etcd: fetched now (scripts/setup has it), or refused now
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

    made_here = [] if joined else [EXTERNAL, *([CONTROL_PLANE] if state.runs_etcd else [])]
    ensure_namespaces(state.name, [UNDERLAY, *made_here, *state.nodes])
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
    if not joined:
        ensure_uplink(state.name, EXTERNAL, state.external_ip, prefix)
    if state.nic:
        if not in_underlay:
            say(lab_nic.notice(state.nic_name, state.nic, state.name))
        lab_nic.attach(state.nic, ns_path(state.name, UNDERLAY), UNDERLAY_BRIDGE)
    _ensure_store(state, prefix)
    # External clients reach NodePorts on node IPs; a route to the pod network is
    # not theirs to have, exactly like a client outside a cluster.
    store = open_store(directory)
    leases = _claim(state, topology, store, previous, others)
    if not joined:  # the lab's maker stores its DNS addon, and routes its load balancer (announce)
        _sync_store_dns(state, store)
    report = kubelet.sync(state, store)  # starts each new node's flanneld, which programs its overlay first
    lagging = flanneld.wait_programmed(directory, sorted(state.nodes), leases, OVERLAY_TIMEOUT)
    if lagging:
        raise KproxyError(f"flanneld did not program the overlay of {', '.join(lagging)} within "
                          f"{OVERLAY_TIMEOUT:.0f} s (see {directory}/flanneld-{lagging[0]}.log)")
    if not joined:
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
    if state.store_endpoint:  # another machine's etcd, reached over the underlay from our first node
        configure(directory, {"backend": "etcd", "endpoint": state.store_endpoint, "prefix": f"/kproxy/{state.name}/",
                              "netns": ns_path(state.name, sorted(state.nodes)[0])})
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
    _leave_store(name)  # from our first node, still there; no agent of ours reprograms meanwhile
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


def _leave_store(name: str) -> None:
    """What this machine put into an etcd another machine runs comes out of it: a machine that
    joined takes its Nodes out (their pods, their endpoints); a lab made on such an etcd removes
    every key of the lab. A store that cannot be reached is said in one line and down goes on:
    what is there stays, as a crashed machine's would."""
    try:
        state = load_state(name)
    except KproxyError:
        return
    if state is None or not state.store_endpoint or config_of(lab_dir(name))["backend"] != "etcd":
        return
    from kproxy.store.etcd import EtcdStore  # requests: for labs that use etcd only

    store = open_store(lab_dir(name))
    try:
        if state.joined:
            kubelet.forget_nodes(state, store)
        elif isinstance(store, EtcdStore):
            store.delete_everything()
    except KproxyError as exc:
        print(f"kproxy: lab {name} stays in the etcd at {state.store_endpoint}: {exc}", file=sys.stderr)


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
            "external": None if state.joined else {"ip": state.external_ip, "namespace": ns_name(lab, EXTERNAL)},
            "joined": state.joined,
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
        shown["namespace"] = Path(config["netns"]).name
    try:
        shown["version"] = open_store(lab_dir(state.name)).version()
    except KproxyError as exc:
        shown["error"] = str(exc)
    return shown
