"""The API server's part: apply, delete, scale and roll out objects in a lab.

Every operation validates first and writes its objects to the store in one
batch (an invalid apply stores nothing), then lets the kubelet wire pods and
update endpoints, and returns once every node agent has synced the result.
Operations on one lab are serialised by its lock (kproxy.lab.lock.lab_lock, taken by the CLI).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from kproxy import controllers
from kproxy.controllers import name_of, obj_key
from kproxy.errors import KproxyError
from kproxy.lab import announce, kubelet
from kproxy.lab.build import require
from kproxy.lab.state import LabState, lab_dir, save_state
from kproxy.proxy import mode as proxy_mode
from kproxy.scheduler import choose_node
from kproxy.store import IDENTITY, Obj, View, carry_identity, open_following, timestamp

SYNC_TIMEOUT = 15.0
# A new lab's agents start Python and program everything first: in a guest under load, with four labs
# coming up at once (kproxy bench), that took over 15 s.
FIRST_SYNC_TIMEOUT = 60.0
# Between a pod leaving every node's rules and its workload stopping, when neither the pod's
# terminationGracePeriodSeconds nor `delete --grace-period` says: kproxy's workload drains that long.
GRACE_SECONDS = 0.3
REVISION_HISTORY_LIMIT = 10  # old ReplicaSets a Deployment keeps (scaled to 0), Kubernetes' default


@dataclass
class Outcome:
    changed: list[str] = field(default_factory=list)  # "service/web configured", like kubectl
    lagging: list[str] = field(default_factory=list)  # agents that did not sync in time
    unready: list[str] = field(default_factory=list)  # pods whose workload did not answer in time


class Cluster:
    def __init__(self, lab: str) -> None:
        self.state: LabState = require(lab)
        # One full read per operation; the kubelet's, the announcer's and a rollout's reads follow the watch.
        self.store = open_following(lab_dir(lab))

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    # Reading ---------------------------------------------------------------
    def view(self) -> View:
        return self.store.read()

    # Writing ---------------------------------------------------------------
    def settle(self, outcome: Outcome, timeout: float = SYNC_TIMEOUT) -> Outcome:
        """Wire pods, wait for them to be ready, update endpoints, then wait (up to timeout) for every agent."""
        outcome.unready = kubelet.sync(self.state, self.store).unready
        save_state(self.state)
        outcome.lagging = self.wait_synced(self.store.version(), timeout)
        # Announced once every node programs the change: a node announced before its agent has
        # its new local endpoint would drop a Local-policy client meanwhile. The lab's router is
        # the machine's that made the lab.
        if not self.state.joined:
            announce.sync(self.state, self.view())
        return outcome

    def wait_synced(self, version: int, timeout: float = SYNC_TIMEOUT) -> list[str]:
        """Nodes whose agent did not sync version in time, or failed to (with its error): every
        node of the lab, on this machine and on the machines that joined it."""
        deadline = time.monotonic() + timeout
        pending = set(self.state.nodes) | {node["metadata"]["name"] for node in self.view().of_kind("Node")}
        failed = []
        while pending and time.monotonic() < deadline:
            reports = self.store.reports()
            for node in list(pending):
                status = reports.get(node, {})
                if status.get("version", 0) >= version:
                    pending.discard(node)
                    if not status.get("ok"):
                        failed.append(f"{node} ({status.get('error') or 'sync failed'})")
            if pending:
                time.sleep(0.005)
        return sorted(pending) + failed

    def apply(self, objects: list[Obj], timeout: float = SYNC_TIMEOUT) -> Outcome:
        return self.settle(self.admit(objects), timeout)

    def admit(self, objects: list[Obj]) -> Outcome:
        """Validate and store the objects, and run the Deployments' controllers; settle() does the rest."""
        view = self.view()
        outcome = Outcome()
        changes: dict[str, Obj | None] = {}
        services = [o for o in objects if o["kind"] == "Service"]
        for svc in services:
            self._keep_allocations(svc, view.objects.get(obj_key(svc)))
        applied = {obj_key(x) for x in services}  # once: per Service it made applying 10k Services quadratic
        others = [s for s in view.of_kind("Service") if obj_key(s) not in applied]
        controllers.allocate_cluster_ips(services, others)
        controllers.allocate_node_ports(services, others)
        controllers.allocate_load_balancer_ips(services, others, self.state.load_balancer_pool)
        proxy_mode(self.state.mode).refuse_unsupported(services)
        pods = [o for o in objects if o["kind"] == "Pod"]
        deployments = [o for o in objects if o["kind"] == "Deployment"]
        self._check_target_ports(services, pods, deployments, view)
        load = self._node_load(view)
        for pod in pods:
            self._schedule(pod, load)
        for obj in objects:
            key = obj_key(obj)
            old = view.objects.get(key)
            self._stamp(obj, old)
            if old is not None and _same(old, obj):
                outcome.changed.append(f"{obj['kind'].lower()}/{obj['metadata']['name']} unchanged")
                continue
            if obj["kind"] == "Pod" and old is not None:
                raise KproxyError(f"Pod {name_of(obj)}: pod updates are forbidden; delete it first")
            changes[key] = obj
            outcome.changed.append(f"{obj['kind'].lower()}/{obj['metadata']['name']} "
                                   f"{'configured' if old else 'created'}")
        if changes:
            self.store.write(changes)
        for deployment in deployments:
            if obj_key(deployment) in changes:
                self._reconcile_deployment(obj_key(deployment))
        return outcome

    @staticmethod
    def _keep_allocations(svc: Obj, old: Obj | None) -> None:
        """Re-applying keeps the ClusterIP and NodePorts given out before, as Kubernetes does."""
        if old is None:
            return
        ip = svc["spec"].get("clusterIP")
        if ip and ip != old["spec"]["clusterIP"]:
            raise KproxyError(f"Service {name_of(svc)}: spec.clusterIP: field is immutable "
                              f"(is {old['spec']['clusterIP']})")
        svc["spec"]["clusterIP"] = old["spec"]["clusterIP"]
        svc["spec"]["clusterIPs"] = [old["spec"]["clusterIP"]]
        spec = svc["spec"]
        before = {(p.get("name") or "", p["protocol"]): p.get("nodePort") for p in old["spec"].get("ports", [])}
        if controllers.wants_node_ports(spec):
            for port in spec.get("ports", []):
                if not port.get("nodePort") and (kept := before.get((port.get("name") or "", port["protocol"]))):
                    port["nodePort"] = kept
        if controllers.wants_health_check_node_port(spec) and not spec.get("healthCheckNodePort"):
            if kept := old["spec"].get("healthCheckNodePort"):
                spec["healthCheckNodePort"] = kept
        if spec["type"] == "LoadBalancer" and not spec.get("loadBalancerClass"):
            ips = controllers.load_balancer_ips(old)
            if ips and spec.get("loadBalancerIP", ips[0]) == ips[0]:
                svc["status"] = {**svc.get("status", {}), "loadBalancer": old["status"]["loadBalancer"]}

    def _check_target_ports(self, services: list[Obj], pods: list[Obj], deployments: list[Obj], view: View) -> None:
        """A named targetPort must be declared by some pod the Service selects (or will: a Deployment's template)."""
        candidates = [(p["metadata"]["namespace"], p["metadata"].get("labels") or {}, p["spec"])
                      for p in pods + view.of_kind("Pod")]
        candidates += [(d["metadata"]["namespace"], d["spec"]["template"]["metadata"].get("labels") or {},
                        d["spec"]["template"]["spec"]) for d in deployments + view.of_kind("Deployment")]
        for svc in services:
            selector = svc["spec"].get("selector") or {}
            selected = [spec for namespace, labels, spec in candidates
                        if namespace == svc["metadata"]["namespace"] and controllers.selects(selector, labels)]
            for i, port in enumerate(svc["spec"].get("ports", [])):
                target = port["targetPort"]
                if isinstance(target, str) and selected and \
                        all(controllers.resolve_target_port(port, spec) is None for spec in selected):
                    raise KproxyError(f"Service {name_of(svc)}: spec.ports[{i}].targetPort: no pod selected by the "
                                      f"Service declares a {port['protocol']} port named {target!r}")

    def _node_load(self, view: View) -> dict[str, int]:
        load = {node: 0 for node in self.state.nodes}
        for pod in view.of_kind("Pod"):
            if pod["spec"].get("nodeName") in load:
                load[pod["spec"]["nodeName"]] += 1
        return load

    def _schedule(self, pod: Obj, load: dict[str, int], siblings: Counter[str] | None = None) -> None:
        """nodeName, else the node kproxy.scheduler chooses (siblings: pods of the same ReplicaSet per node)."""
        node = pod["spec"].get("nodeName")
        if node:
            if node not in self.state.nodes:
                raise KproxyError(f"Pod {name_of(pod)}: spec.nodeName: node {node!r} is not in lab {self.state.name}")
        else:
            selector = pod["spec"].get("nodeSelector") or {}
            node = choose_node({n: s.labels for n, s in self.state.nodes.items()}, load, selector, siblings)
            if node is None:
                raise KproxyError(f"Pod {name_of(pod)}: no node matches spec.nodeSelector {selector}")
            pod["spec"]["nodeName"] = node
        load[node] += 1
        if siblings is not None:
            siblings[node] += 1

    @staticmethod
    def _stamp(obj: Obj, old: Obj | None) -> None:
        """What the API server adds to an update: the old object's identity and status
        (uid, timestamps and resourceVersion are the store's part; defaults are kproxy.model's)."""
        carry_identity(obj, old)
        if old is not None and "status" in old:
            obj["status"] = old["status"]

    # Deployments and ReplicaSets -------------------------------------------
    def _reconcile_deployment(self, key: str, on_step: Callable[[str], None] | None = None) -> None:
        """The deployment controller: the ReplicaSet of the current template scaled to the
        Deployment's replicas; older ones rolled down one pod at a time (maxSurge 1, maxUnavailable 0)."""
        view = self.view()
        deployment = view.objects[key]
        replicas = int(deployment["spec"].get("replicas", 1))
        wanted = controllers.replica_set_for(deployment, 0)
        new_key = obj_key(wanted)
        sets = sorted(controllers.owned(deployment, view.of_kind("ReplicaSet")),
                      key=lambda rs: (rs["metadata"]["creationTimestamp"], rs["metadata"]["name"]))
        old_keys = [obj_key(rs) for rs in sets if obj_key(rs) != new_key and rs["spec"]["replicas"] > 0]
        if new_key not in view.objects:
            self.store.write({new_key: wanted})
        if not old_keys:
            self._scale_replica_set(new_key, replicas)
            self._prune_history(deployment)
            return
        self._scale_replica_set(new_key, min(self._replicas(new_key), replicas))
        for old_key in old_keys:
            while self._replicas(old_key) > 0:
                if self._replicas(new_key) < replicas:
                    created, _ = self._scale_replica_set(new_key, self._replicas(new_key) + 1)
                    self.settle(Outcome())
                    if on_step and created:
                        on_step(f"pod/{created[0]['metadata']['name']} ready")
                _, removed = self._scale_replica_set(old_key, self._replicas(old_key) - 1)
                if on_step and removed:
                    on_step(f"pod/{removed[0]['metadata']['name']} removed")
        self._scale_replica_set(new_key, replicas)
        self._prune_history(deployment)

    def _replicas(self, key: str) -> int:
        return int(self.view().objects[key]["spec"]["replicas"])

    def _scale_replica_set(self, key: str, replicas: int) -> tuple[list[Obj], list[Obj]]:
        """The ReplicaSet controller: spec.replicas set, then pods created or removed to match."""
        view = self.view()
        replica_set = view.objects[key]
        if replica_set["spec"]["replicas"] != replicas:
            replica_set = json.loads(json.dumps(replica_set))
            replica_set["spec"]["replicas"] = replicas
            self.store.write({key: replica_set})
        pods = [p for p in controllers.owned(replica_set, view.of_kind("Pod")) if not controllers.pod_is_terminating(p)]
        created = self._create_pods(replica_set, replicas - len(pods)) if len(pods) < replicas else []
        removed = controllers.pods_to_remove(pods, len(pods) - replicas)
        for pod in removed:
            self._remove_pod(pod)
        return created, removed

    def _prune_history(self, deployment: Obj) -> None:
        """Old ReplicaSets past the history limit go, as Kubernetes' revisionHistoryLimit does."""
        view = self.view()
        spent = sorted((rs for rs in controllers.owned(deployment, view.of_kind("ReplicaSet"))
                        if rs["spec"]["replicas"] == 0 and not controllers.owned(rs, view.of_kind("Pod"))),
                       key=lambda rs: rs["metadata"]["creationTimestamp"])
        current = obj_key(controllers.replica_set_for(deployment, 0))
        spent = [rs for rs in spent if obj_key(rs) != current]
        if len(spent) > REVISION_HISTORY_LIMIT:
            self.store.write({obj_key(rs): None for rs in spent[:len(spent) - REVISION_HISTORY_LIMIT]})

    def _create_pods(self, replica_set: Obj, count: int) -> list[Obj]:
        view = self.view()
        names = {p["metadata"]["name"] for p in view.of_kind("Pod")}
        load = self._node_load(view)
        siblings = Counter(p["spec"]["nodeName"] for p in controllers.owned(replica_set, view.of_kind("Pod")))
        created = []
        for _ in range(count):
            pod = controllers.new_pod_for(replica_set, names)
            names.add(pod["metadata"]["name"])
            self._schedule(pod, load, siblings)
            created.append(pod)
        self.store.write({obj_key(p): p for p in created})
        return created

    def _remove_pod(self, pod: Obj, grace: float | None = None) -> None:
        """Graceful, as a kubelet deletes: the pod terminating (its endpoint ready: false, serving,
        terminating in every node's rules) while its workload keeps answering for the grace period
        (grace, else the pod's terminationGracePeriodSeconds, else GRACE_SECONDS), then stopped and unwired."""
        pod = json.loads(json.dumps(pod))
        if grace is None:
            grace = pod["spec"].get("terminationGracePeriodSeconds", GRACE_SECONDS)
        pod["metadata"]["deletionTimestamp"] = timestamp()
        pod["metadata"]["deletionGracePeriodSeconds"] = int(grace)
        self.store.write({obj_key(pod): pod})
        self.settle(Outcome())
        time.sleep(grace)
        self.store.write({obj_key(pod): None})
        kubelet.sync(self.state, self.store)
        save_state(self.state)

    def _remove_replica_set(self, replica_set: Obj) -> None:
        for pod in controllers.owned(replica_set, self.view().of_kind("Pod")):
            self._remove_pod(pod)
        self.store.write({obj_key(replica_set): None})

    def _owner(self, obj: Obj, kind: str) -> str | None:
        """The key of obj's controller of that kind, if it is still stored."""
        namespace = obj["metadata"]["namespace"]
        view = self.view()
        for ref in obj["metadata"].get("ownerReferences", []):
            key = f"{kind}/{namespace}/{ref['name']}"
            if ref.get("controller") and ref["kind"] == kind and \
                    view.objects.get(key, {}).get("metadata", {}).get("uid") == ref.get("uid"):
                return key
        return None

    def scale(self, namespace: str, name: str, replicas: int) -> Outcome:
        if replicas < 0:
            raise KproxyError("--replicas must be 0 or more")
        key = f"Deployment/{namespace}/{name}"
        deployment = self.view().objects.get(key)
        if deployment is None:
            raise KproxyError(f"deployment {namespace}/{name} not found")
        deployment = json.loads(json.dumps(deployment))
        deployment["spec"]["replicas"] = replicas
        self.store.write({key: deployment})
        self._reconcile_deployment(key)
        return self.settle(Outcome([f"deployment.apps/{name} scaled"]))

    def rollout_restart(self, namespace: str, name: str, on_step: Callable[[str], None] | None = None) -> Outcome:
        """As kubectl: a restartedAt annotation on the template, so a new ReplicaSet rolls out."""
        key = f"Deployment/{namespace}/{name}"
        deployment = self.view().objects.get(key)
        if deployment is None:
            raise KproxyError(f"deployment {namespace}/{name} not found")
        deployment = json.loads(json.dumps(deployment))
        template_meta = deployment["spec"]["template"].setdefault("metadata", {})
        template_meta.setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = controllers.now_iso()
        self.store.write({key: deployment})
        self._reconcile_deployment(key, on_step)
        return self.settle(Outcome([f"deployment.apps/{name} restarted"]))

    def delete(self, targets: list[tuple[str, str, str]], grace: float | None = None) -> Outcome:
        """targets: (kind, namespace, name); a missing one is an error naming it. What a deleted
        object owned goes with it; a controller replaces a pod or ReplicaSet it still wants.
        grace: seconds a deleted pod terminates (kubectl's --grace-period), None: its own."""
        view = self.view()
        outcome = Outcome()
        for kind, namespace, name in targets:
            key = f"{kind}/{namespace}/{name}"
            obj = view.objects.get(key)
            if obj is None:
                raise KproxyError(f"{kind.lower()} {namespace}/{name} not found")
        for kind, namespace, name in targets:
            key = f"{kind}/{namespace}/{name}"
            obj = self.view().objects.get(key)
            if obj is None:
                continue
            if kind == "Pod":
                self._remove_pod(obj, grace)
                owner = self._owner(obj, "ReplicaSet")
                if owner is not None:
                    self._scale_replica_set(owner, self._replicas(owner))
            elif kind == "ReplicaSet":
                self._remove_replica_set(obj)
                owner = self._owner(obj, "Deployment")
                if owner is not None:
                    self._reconcile_deployment(owner)
            elif kind == "Deployment":
                self.store.write({key: None})
                for replica_set in controllers.owned(obj, self.view().of_kind("ReplicaSet")):
                    self._remove_replica_set(replica_set)
            else:
                self.store.write({key: None})
            outcome.changed.append(f"{kind.lower()}/{name} deleted")
        return self.settle(outcome)


def _same(old: Obj, new: Obj) -> bool:
    def clean(obj: Obj) -> Obj:
        out = {k: v for k, v in obj.items() if k != "status"}
        out["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in IDENTITY}
        return out
    return clean(old) == clean(new)
