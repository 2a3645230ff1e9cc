"""The lab's store: desired state as Kubernetes-shaped objects, behind one small interface.

A store holds objects under keys "Kind/namespace/name" ("Node/name" for cluster-scoped objects)
and one version counter, like etcd's revision. A write is a batch (one `apply`), atomic for every
reader. Watchers (the node agents, cluster DNS) keep the objects in memory and learn only what
changed since their version.

Like the API server, a write stamps every object it stores: metadata.uid and creationTimestamp
when the object has none yet (a writer updating an object carries them over from the old one, see
carry_identity), and metadata.resourceVersion, the version of this write.

``open_store(lab_dir)`` is the lab's store, as ``configure`` recorded it: the embedded file store
(kproxy.store.file), the default, which needs nothing installed, or etcd (kproxy.store.etcd).
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, cast
from urllib.parse import urlsplit

from kproxy.errors import KproxyError

Obj = dict[str, Any]  # a stored object in its Kubernetes form (kproxy.k8sform), as JSON loads it
# What a watcher keeps of an object (key, obj): a part of it, or None to drop it. A follower that
# needs a few fields of a few kinds (cluster DNS) holds only those, not the whole cluster.
Keep = Callable[[str, Obj], "Obj | None"]
IDENTITY = ("uid", "creationTimestamp", "resourceVersion")


class Conflict(KproxyError):
    """A conditional write found the store at another version than the writer read."""


def timestamp() -> str:
    """Now as Kubernetes prints a metav1.Time: RFC 3339 in UTC, whole seconds."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def carry_identity(obj: Obj, old: Obj | None) -> Obj:
    """An update of old keeps its uid, creationTimestamp and (until written) resourceVersion; returns obj."""
    if old is not None:
        for name in IDENTITY:
            if name in old["metadata"]:
                obj["metadata"][name] = old["metadata"][name]
    return obj


def stamp(changes: Mapping[str, Obj | None], version: int) -> None:
    """What the API server sets on each object a write stores (version: the write's)."""
    now = timestamp()
    for obj in changes.values():
        if obj is not None:
            meta = obj["metadata"]
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", now)
            meta["resourceVersion"] = str(version)


def key_of(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


@dataclass
class View:
    """The store as of one version."""

    version: int = 0
    objects: dict[str, Obj] = field(default_factory=dict)

    def of_kind(self, kind: str) -> list[Obj]:
        prefix = kind + "/"
        return [obj for key, obj in sorted(self.objects.items()) if key.startswith(prefix)]


class Watcher(Protocol):
    """Follows a store from the version it was made at."""

    view: View  # the objects as of view.version, each cut down by the watcher's Keep

    def poll(self) -> set[str]:
        """The keys that changed since the last call (view is current after it)."""
        ...

    def close(self) -> None:
        """Stop following (a networked store's stream); the view stays as it was."""
        ...


class Store(Protocol):
    def read(self) -> View:
        ...

    def version(self) -> int:
        """The latest version, without reading the objects."""
        ...

    def write(self, changes: Mapping[str, Obj | None], expect: int | None = None) -> int:
        """Apply a batch (None deletes) all at once or not at all, stamping its objects in place;
        returns the new version. expect: only if the store is still at that version, else
        Conflict and nothing written (the API server's optimistic concurrency, for a whole batch)."""
        ...

    def watch(self, keep: Keep | None = None) -> Watcher:
        ...

    def put_report(self, node: str, report: Mapping[str, Any]) -> None:
        """The node agent's report of its last sync (the version it reached, whether it succeeded):
        beside the objects, not one of them, so it neither bumps the version nor wakes a watcher."""
        ...

    def reports(self) -> dict[str, dict[str, Any]]:
        """Every agent's latest report, by node."""
        ...

    def delete_report(self, node: str) -> None:
        ...


class Mirror(Protocol):
    """A local copy of a networked store (a FileStore), at that store's version."""

    def read(self) -> View:
        ...

    def record(self, version: int, changes: Mapping[str, Obj | None]) -> None:
        ...

    def replace(self, view: View) -> None:
        ...


class Resumable(Store, Protocol):
    def watch_since(self, view: View) -> Watcher:
        """A watcher starting from view (a copy of the store at view.version): reads only what came after."""
        ...


class FollowingStore:
    """A store that one process reads many times (an apply: admit, the kubelet, the announcer, a
    rollout's every step): the first read loads every object, and later reads follow the store's
    watch up to its latest version, so each costs what changed since, not the whole cluster again.

    Reads are as current as Store.read's: each first asks the store for its version (one small
    request) and waits until the watch has delivered it, so a write of this process or of another
    (the supervisor's restart counts) is seen. A read hands out the watcher's objects themselves;
    what a reader changes in one it must write back.

    With a mirror (a networked store's local copy, kept in the lab's directory), even the first
    read is local: the mirror, then the store's watch from the mirror's version on; what this
    process saw is kept in the mirror when it closes. That is what an API server's watch cache
    spares its clients, for a CLI that is a new process at every command."""

    CATCH_UP_SECONDS = 10.0  # a watch that lags this long is replaced by a full read

    def __init__(self, store: Store, mirror: Mirror | None = None) -> None:
        self.store = store
        self.mirror = mirror
        self._watcher: Watcher | None = None
        self._mirrored = 0  # the version the mirror holds of what the watcher followed (0: none of it)
        self._changed: set[str] = set()  # keys changed since that version

    def read(self) -> View:
        if self._watcher is None:
            self._watcher = self._start()
        self._catch_up(self.store.version())
        return View(self._watcher.view.version, dict(self._watcher.view.objects))

    def _start(self) -> Watcher:
        if self.mirror is not None:
            kept = self.mirror.read()
            # A mirror past the store's version is of another history (an etcd made anew): not followed.
            if kept.version and kept.version <= self.store.version():
                self._mirrored = kept.version
                return cast(Resumable, self.store).watch_since(kept)
        self._mirrored = 0
        return self.store.watch()

    def _catch_up(self, version: int) -> None:
        assert self._watcher is not None
        deadline = time.monotonic() + self.CATCH_UP_SECONDS
        self._changed |= self._watcher.poll()
        while self._watcher.view.version < version:
            if time.monotonic() > deadline:
                self._watcher.close()
                self._mirrored = 0
                self._watcher = self.store.watch()
                return
            time.sleep(0.001)
            self._changed |= self._watcher.poll()

    def version(self) -> int:
        return self.store.version()

    def write(self, changes: Mapping[str, Obj | None], expect: int | None = None) -> int:
        return self.store.write(changes, expect)

    def watch(self, keep: Keep | None = None) -> Watcher:
        return self.store.watch(keep)

    def put_report(self, node: str, report: Mapping[str, Any]) -> None:
        self.store.put_report(node, report)

    def reports(self) -> dict[str, dict[str, Any]]:
        return self.store.reports()

    def delete_report(self, node: str) -> None:
        self.store.delete_report(node)

    def close(self) -> None:
        if self._watcher is None:
            return
        self._watcher.close()
        view = self._watcher.view
        if self.mirror is None:
            return
        if not self._mirrored:
            self.mirror.replace(view)
        elif self._changed and view.version > self._mirrored:
            self.mirror.record(view.version, {key: view.objects.get(key) for key in self._changed})


def changed_keys(before: Mapping[str, Obj], after: Mapping[str, Obj]) -> set[str]:
    """The keys whose objects differ between two views' objects (a watcher's resync)."""
    keys = set(before) | set(after)
    return {k for k in keys if before.get(k) is not after.get(k) and before.get(k) != after.get(k)}


CONFIG = "store.json"  # in a lab's directory: which store it uses; none: the file store
BACKENDS = ("file", "etcd")


def etcd_url(url: str) -> str:
    """etcd://IP:PORT (an etcd on the lab's underlay) as the gateway's http://IP:PORT."""
    parts = urlsplit(url)
    try:
        port = parts.port
        ip = ipaddress.IPv4Address(parts.hostname or "")
    except ValueError:
        port, ip = None, None
    if parts.scheme != "etcd" or ip is None or port is None or parts.path not in ("", "/"):
        raise KproxyError(f"{url!r} is not etcd://IP:PORT (an etcd on the lab's underlay, e.g. "
                          "etcd://172.18.0.253:2379, as 'kproxy lab status' shows it on the machine that runs it)")
    return f"http://{ip}:{port}"


def configure(lab_dir: Path, config: dict[str, str]) -> None:
    """Record which store the lab uses: {"backend": "file"}, or {"backend": "etcd", "endpoint":
    "http://IP:PORT", "prefix": "/kproxy/LAB/", "netns": the namespace to reach it from off the underlay}."""
    lab_dir.mkdir(parents=True, exist_ok=True)
    tmp = lab_dir / f".{CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, lab_dir / CONFIG)


def config_of(lab_dir: Path) -> dict[str, str]:
    try:
        return json.loads((lab_dir / CONFIG).read_text())
    except FileNotFoundError:
        return {"backend": "file"}


def open_store(lab_dir: Path, on_underlay: bool = False) -> Store:
    """The store of the lab whose state is in lab_dir. on_underlay: this process runs in one of
    the lab's nodes and reaches a networked store over the underlay, as kube-proxy reaches the
    API server; everyone else (the CLI, the supervisor, DNS pods) enters the store's namespace."""
    config = config_of(lab_dir)
    if config["backend"] == "etcd":
        from kproxy.store.etcd import EtcdStore  # requests is imported only by labs that use etcd

        return EtcdStore(config["endpoint"], config["prefix"], None if on_underlay else config.get("netns"))
    from kproxy.store.file import FileStore  # the store package's own backends import it

    return FileStore(lab_dir / "store")


MIRROR = "store-mirror"  # in a lab's directory: FollowingStore's copy of a networked store


def open_following(lab_dir: Path) -> FollowingStore:
    """The lab's store for one operation of many reads (kproxy.cluster.Cluster); a networked store's
    with its mirror in the lab's directory."""
    store = open_store(lab_dir)
    if config_of(lab_dir)["backend"] == "file":
        return FollowingStore(store)
    from kproxy.store.file import FileStore

    return FollowingStore(store, FileStore(lab_dir / MIRROR))
