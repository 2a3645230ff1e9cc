"""The API server's part: apply, delete, scale and roll out objects in a lab.

Every operation validates first and writes its objects to the store in one
batch (an invalid apply stores nothing), then lets the kubelet wire pods and
update endpoints, and returns once every node agent has synced the result.
Operations on one lab are serialised by its lock (kproxy.lab.state.lab_lock).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from kproxy import controllers
from kproxy.agent import status_path
from kproxy.controllers import Obj, name_of, now_iso, obj_key
from kproxy.errors import KproxyError
from kproxy.lab import kubelet
from kproxy.lab.build import require
from kproxy.lab.state import LabState, lab_dir, save_state
from kproxy.store import Store, View

SYNC_TIMEOUT = 15.0
GRACE_SECONDS = 0.3  # between a pod leaving every node's rules and its workload stopping


@dataclass
class Outcome:
    changed: list[str] = field(default_factory=list)  # "service/web configured", like kubectl
    lagging: list[str] = field(default_factory=list)  # agents that did not sync in time


class Cluster:
    def __init__(self, lab: str) -> None:
        self.state: LabState = require(lab)
        self.store = Store(lab_dir(lab) / "store")

    # Reading ---------------------------------------------------------------
    def view(self) -> View:
        return self.store.read()

    # Writing ---------------------------------------------------------------
    def settle(self, outcome: Outcome) -> Outcome:
        """Wire pods, update endpoints, then wait for every agent."""
        kubelet.sync(self.state, self.store)
        save_state(self.state)
        outcome.lagging = self.wait_synced(self.store.version())
        return outcome

    def wait_synced(self, version: int, timeout: float = SYNC_TIMEOUT) -> list[str]:
        """Nodes whose agent did not sync version in time, or failed to (with its error)."""
        deadline = time.monotonic() + timeout
        pending = set(self.state.nodes)
        failed = []
        while pending and time.monotonic() < deadline:
            for node in list(pending):
                try:
                    status = json.loads(status_path(lab_dir(self.state.name), node).read_text())
                except (FileNotFoundError, ValueError):
                    continue
                if status.get("version", 0) >= version:
                    pending.discard(node)
                    if not status.get("ok"):
                        failed.append(f"{node} ({status.get('error') or 'sync failed'})")
            if pending:
                time.sleep(0.005)
        return sorted(pending) + failed

    def apply(self, objects: list[Obj]) -> Outcome:
        view = self.view()
        outcome = Outcome()
        changes: dict[str, Obj | None] = {}
        services = [o for o in objects if o["kind"] == "Service"]
        for svc in services:
            self._keep_allocations(svc, view.objects.get(obj_key(svc)))
        others = [s for s in view.of_kind("Service") if obj_key(s) not in {obj_key(x) for x in services}]
        controllers.allocate_cluster_ips(services, others)
        controllers.allocate_node_ports(services, others)
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
        return self.settle(outcome)

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
        before = {(p.get("name") or "", p.get("protocol", "TCP")): p.get("nodePort") for p in old["spec"]["ports"]}
        for port in svc["spec"].get("ports", []):
            if svc["spec"].get("type") == "NodePort" and not port.get("nodePort"):
                port["nodePort"] = before.get((port.get("name") or "", port.get("protocol", "TCP"))) or None
                if port["nodePort"] is None:
                    del port["nodePort"]

    def _check_target_ports(self, services: list[Obj], pods: list[Obj], deployments: list[Obj], view: View) -> None:
        candidates = pods + view.of_kind("Pod") + [
            {"metadata": {"namespace": d["metadata"].get("namespace", "default"),
                          "labels": d["spec"]["template"].get("metadata", {}).get("labels") or {}},
             "spec": d["spec"]["template"].get("spec", {})} for d in deployments + view.of_kind("Deployment")]
        for svc in services:
            selector = svc["spec"].get("selector") or {}
            selected = [p for p in candidates if p["metadata"].get("namespace", "default") ==
                        svc["metadata"].get("namespace", "default")
                        and controllers.selects(selector, p["metadata"].get("labels") or {})]
            for i, port in enumerate(svc["spec"].get("ports", [])):
                target = port.get("targetPort")
                if isinstance(target, str) and not target.isdigit() and selected and \
                        all(controllers.resolve_target_port(port, p) is None for p in selected):
                    raise KproxyError(f"Service {name_of(svc)}: spec.ports[{i}].targetPort: no pod selected by the "
                                      f"Service declares a {port.get('protocol', 'TCP')} port named {target!r}")

    def _node_load(self, view: View) -> dict[str, int]:
        load = {node: 0 for node in self.state.nodes}
        for pod in view.of_kind("Pod"):
            if pod["spec"].get("nodeName") in load:
                load[pod["spec"]["nodeName"]] += 1
        return load

    def _schedule(self, pod: Obj, load: dict[str, int]) -> None:
        """nodeName, else nodeSelector, else the least loaded node: the scheduler, simply."""
        node = pod["spec"].get("nodeName")
        if node:
            if node not in self.state.nodes:
                raise KproxyError(f"Pod {name_of(pod)}: spec.nodeName: node {node!r} is not in lab {self.state.name}")
        else:
            selector = pod["spec"].get("nodeSelector") or {}
            fits = [n for n, s in self.state.nodes.items()
                    if all(({"kubernetes.io/hostname": n, **s.labels}).get(k) == v for k, v in selector.items())]
            if not fits:
                raise KproxyError(f"Pod {name_of(pod)}: no node matches spec.nodeSelector {selector}")
            node = min(fits, key=lambda n: (load[n], n))
            pod["spec"]["nodeName"] = node
        load[node] += 1

    @staticmethod
    def _stamp(obj: Obj, old: Obj | None) -> None:
        meta = obj["metadata"]
        meta.setdefault("namespace", "default") if obj["kind"] != "Node" else None
        meta["uid"] = old["metadata"]["uid"] if old else str(uuid.uuid4())
        meta["creationTimestamp"] = old["metadata"]["creationTimestamp"] if old else now_iso()
        if obj["kind"] == "Pod":
            obj.setdefault("status", old.get("status") if old else {"phase": "Pending"})

    # Deployments -----------------------------------------------------------
    def _reconcile_deployment(self, key: str, on_step: Callable[[str], None] | None = None) -> None:
        """Make the Deployment's pods match its replicas and template: scale, then roll."""
        view = self.view()
        deployment = view.objects[key]
        current_hash = controllers.template_hash(deployment)
        pods = controllers.owned_pods(deployment, view.of_kind("Pod"))
        live = [p for p in pods if not controllers.pod_is_terminating(p)]
        new = [p for p in live if p["metadata"]["labels"].get(controllers.POD_TEMPLATE_HASH) == current_hash]
        old = sorted((p for p in live if p not in new), key=lambda p: p["metadata"]["name"])
        replicas = int(deployment["spec"].get("replicas", 1))
        if not old:
            self._scale_pods(deployment, new, replicas)
            return
        # Rolling update, one pod at a time (maxSurge 1, maxUnavailable 0).
        self._scale_pods(deployment, new, min(len(new), replicas))
        for victim in old:
            if len(new) < replicas:
                created = self._create_pods(deployment, 1)
                new += created
                self.settle(Outcome())
                if on_step:
                    on_step(f"pod/{created[0]['metadata']['name']} ready")
            self._remove_pod(victim)
            if on_step:
                on_step(f"pod/{victim['metadata']['name']} removed")
        if len(new) < replicas:
            self._create_pods(deployment, replicas - len(new))

    def _scale_pods(self, deployment: Obj, pods: list[Obj], replicas: int) -> None:
        if len(pods) < replicas:
            self._create_pods(deployment, replicas - len(pods))
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"], reverse=True)[:max(0, len(pods) - replicas)]:
            self._remove_pod(pod)

    def _create_pods(self, deployment: Obj, count: int) -> list[Obj]:
        view = self.view()
        names = {p["metadata"]["name"] for p in view.of_kind("Pod")}
        load = self._node_load(view)
        created = []
        for _ in range(count):
            pod = controllers.new_pod_for(deployment, names)
            names.add(pod["metadata"]["name"])
            self._schedule(pod, load)
            self._stamp(pod, None)
            created.append(pod)
        self.store.write({obj_key(p): p for p in created})
        return created

    def _remove_pod(self, pod: Obj) -> None:
        """Graceful: out of every node's rules first, then stopped and unwired."""
        pod = json.loads(json.dumps(pod))
        pod["metadata"]["deletionTimestamp"] = now_iso()
        self.store.write({obj_key(pod): pod})
        self.settle(Outcome())
        time.sleep(GRACE_SECONDS)
        self.store.write({obj_key(pod): None})
        kubelet.sync(self.state, self.store)
        save_state(self.state)

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
        key = f"Deployment/{namespace}/{name}"
        deployment = self.view().objects.get(key)
        if deployment is None:
            raise KproxyError(f"deployment {namespace}/{name} not found")
        deployment = json.loads(json.dumps(deployment))
        template_meta = deployment["spec"]["template"].setdefault("metadata", {})
        template_meta.setdefault("annotations", {})["kubectl.kubernetes.io/restartedAt"] = now_iso()
        self.store.write({key: deployment})
        self._reconcile_deployment(key, on_step)
        return self.settle(Outcome([f"deployment.apps/{name} restarted"]))

    def delete(self, targets: list[tuple[str, str, str]]) -> Outcome:
        """targets: (kind, namespace, name); a missing one is an error naming it."""
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
                self._remove_pod(obj)
            elif kind == "Deployment":
                self.store.write({key: None})
                for pod in controllers.owned_pods(obj, self.view().of_kind("Pod")):
                    self._remove_pod(pod)
            else:
                self.store.write({key: None})
            outcome.changed.append(f"{kind.lower()}/{name} deleted")
        return self.settle(outcome)


def _same(old: Obj, new: Obj) -> bool:
    strip = ("uid", "creationTimestamp")
    def clean(obj: Obj) -> Obj:
        out = {k: v for k, v in obj.items() if k != "status"}
        out["metadata"] = {k: v for k, v in obj["metadata"].items() if k not in strip}
        return out
    return clean(old) == clean(new)
