"""The etcd store: a lab's objects in etcd 3.4, as the API server keeps a cluster's.

Each object is one key, PREFIX/objects/Kind/namespace/name, its JSON without resourceVersion:
like the API server, the store reads that from the key's mod_revision. A write (one `apply`) is
one etcd transaction, all of it or nothing, and one revision; it also puts PREFIX/version, so the
lab's version is the revision of its latest write (etcd's revision counts every write to etcd,
other labs' too).

A watcher reads the prefix once, then (from its first poll) follows etcd's watch from the revision
after that read, in a thread of its own; poll() applies what arrived. Where the stream breaks
(etcd restarted, the network went away) the thread resumes from the revision after the last it
saw, so no change is lost or seen twice. Where etcd has compacted that revision away, the watcher reads the whole
prefix again and reports what differs (a full resync).
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any, Mapping

from kproxy.store import Conflict, Keep, Obj, View, changed_keys, stamp
from kproxy.store.gateway import Compacted, EtcdError, EtcdUnavailable, Entry, Gateway, delete, entries, prefix_end, \
    modified_at, put, range_of

READ_TIMEOUT = 30.0  # a silent watch is reopened: etcd's progress notices come less often by default
RETRY_SECONDS = (0.05, 0.1, 0.2, 0.5, 1.0)  # between attempts to reopen a broken watch
CREATE_WAIT = 2.0  # at most, for etcd to make a new watch (it answers in about 2 ms; etcd away: on we go)


def _without_revision(obj: Obj) -> str:
    meta = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
    return json.dumps({**obj, "metadata": meta}, separators=(",", ":"))


def _object(value: bytes, mod_revision: int) -> Obj:
    obj = json.loads(value)
    obj["metadata"]["resourceVersion"] = str(mod_revision)
    return obj


class EtcdStore:
    """The objects under one prefix (a lab's, "/kproxy/LAB/") of the etcd at endpoint, reached from
    the network namespace at netns (None: this process's)."""

    def __init__(self, endpoint: str, prefix: str, netns: str | None = None) -> None:
        self.gateway = Gateway(endpoint, netns)
        self.prefix = prefix
        self.objects_prefix = prefix + "objects/"
        self.version_key = prefix + "version"
        # Agents' reports sort before the objects, out of the range watchers follow
        # (objects/ to version): a report wakes no watcher, so no agent answers one with its own.
        self.reports_prefix = prefix + "agents/"
        self.watched = (self.objects_prefix, self.version_key + "\0")

    def _snapshot(self, keep: Keep | None = None) -> tuple[View, int]:
        """The view, and etcd's revision it was read at (one transaction: both ranges at once)."""
        answer = self.gateway.txn([range_of(self.objects_prefix, prefix_end(self.objects_prefix)),
                                   range_of(self.version_key)])
        objects_range, version_range = (r["response_range"] for r in answer["responses"])
        view = View()
        for entry in entries(objects_range.get("kvs", [])):
            key = entry.key[len(self.objects_prefix):]
            obj = _object(entry.value or b"", entry.mod_revision)
            kept = keep(key, obj) if keep is not None else obj
            if kept is not None:
                view.objects[key] = kept
        versions = entries(version_range.get("kvs", []))
        view.version = versions[0].mod_revision if versions else 0
        return view, int(answer["header"]["revision"])

    def read(self) -> View:
        return self._snapshot()[0]

    def version(self) -> int:
        versions = entries(self.gateway.call("kv/range", range_of(self.version_key)["request_range"]).get("kvs", []))
        return versions[0].mod_revision if versions else 0

    def write(self, changes: Mapping[str, Obj | None], expect: int | None = None) -> int:
        stamp(changes, 0)  # uid and creationTimestamp now; resourceVersion once etcd names the revision
        ops = [put(self.objects_prefix + key, _without_revision(obj)) if obj is not None
               else delete(self.objects_prefix + key) for key, obj in changes.items()]
        ops.append(put(self.version_key, str(len(changes))))
        try:
            answer = self.gateway.txn(ops, None if expect is None else [modified_at(self.version_key, expect)])
        except EtcdError as exc:
            if "too many operations" in str(exc) or "too large" in str(exc) or "larger than max" in str(exc):
                raise EtcdError(f"{exc} (a batch of {len(changes)} changes is one transaction: start etcd with "
                                f"--max-txn-ops and --max-request-bytes that hold it)") from None
            raise
        if expect is not None and not answer.get("succeeded"):
            raise Conflict(f"the lab's store is no longer at version {expect}: it changed meanwhile")
        revision = int(answer["header"]["revision"])
        for obj in changes.values():
            if obj is not None:
                obj["metadata"]["resourceVersion"] = str(revision)
        return revision

    def watch(self, keep: Keep | None = None) -> EtcdWatcher:
        return EtcdWatcher(self, keep)

    def delete_everything(self) -> None:
        """Every key of the lab (objects, version, agents' reports): what the lab made in this etcd."""
        self.gateway.txn([delete(self.prefix, prefix_end(self.prefix))])

    def put_report(self, node: str, report: Mapping[str, Any]) -> None:
        self.gateway.txn([put(self.reports_prefix + node, json.dumps(report))])

    def reports(self) -> dict[str, dict[str, Any]]:
        found = self.gateway.call("kv/range", range_of(self.reports_prefix, prefix_end(self.reports_prefix))
                                  ["request_range"]).get("kvs", [])
        return {e.key[len(self.reports_prefix):]: json.loads(e.value or b"{}") for e in entries(found)}

    def delete_report(self, node: str) -> None:
        self.gateway.txn([delete(self.reports_prefix + node)])

    def watch_since(self, view: View) -> EtcdWatcher:
        """A watcher that starts from view, a copy of this store's objects at view.version that the
        caller kept (kproxy.store.FollowingStore's mirror), and reads only what changed after it.

        A copy that is still current is followed from etcd's present revision on: etcd serves a
        watch that starts in the past from its history, catching it up every 100 ms (its
        syncWatchersLoop), which an apply would wait out at every command."""
        answer = self.gateway.call("kv/range", range_of(self.version_key)["request_range"])
        versions = entries(answer.get("kvs", []))
        current = (versions[0].mod_revision if versions else 0) == view.version
        return EtcdWatcher(self, since=view, read_at=int(answer["header"]["revision"]) if current else view.version)


class EtcdWatcher:
    """Follows an EtcdStore; poll() returns the keys that changed since the last call."""

    def __init__(self, store: EtcdStore, keep: Keep | None = None, since: View | None = None,
                 read_at: int = 0) -> None:
        """since: start from that view, as of etcd's revision read_at (nothing changed the objects
        between since.version and read_at: every write to them also puts the version key)."""
        self.store = store
        self.keep = keep
        self.view, self._read_at = (since, read_at) if since is not None else store._snapshot(keep)
        self._arrived: queue.SimpleQueue[tuple[int, list[Entry]] | Compacted] = queue.SimpleQueue()
        self._following = False  # the stream opens at the first poll
        self._closed = threading.Event()

    def _follow_from(self, revision: int) -> None:
        """Start the watch thread; returns once etcd has made the watch (or after CREATE_WAIT). A write
        made before that would leave the watch starting in etcd's past, which etcd serves only at its
        next catch-up, up to 100 ms later."""
        self._following = True
        created = threading.Event()
        threading.Thread(target=self._follow, args=(revision, created), daemon=True,
                         name=f"etcd-watch-{self.store.prefix}").start()
        created.wait(CREATE_WAIT)

    def _follow(self, revision: int, created: threading.Event) -> None:
        """The watch thread: each answer queued in order; a broken stream reopened at the revision after
        the last one queued."""
        failures = 0
        while not self._closed.is_set():
            try:
                for seen, changed in self.store.gateway.watch(*self.store.watched, revision, READ_TIMEOUT, created):
                    if self._closed.is_set():
                        return
                    self._arrived.put((seen, changed))
                    revision = seen + 1
                    failures = 0
            except Compacted as exc:
                self._arrived.put(exc)  # poll resyncs and starts a new thread
                return
            except EtcdUnavailable:
                self._closed.wait(RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)])
                failures += 1

    def close(self) -> None:
        """Stop following: the thread ends at its next answer or attempt."""
        self._closed.set()

    def poll(self) -> set[str]:
        if not self._following:
            self._follow_from(self._read_at + 1)
        changed: set[str] = set()
        while True:
            try:
                arrived = self._arrived.get_nowait()
            except queue.Empty:
                return changed
            if isinstance(arrived, Compacted):
                before = self.view.objects
                self.view, self._read_at = self.store._snapshot(self.keep)
                self._follow_from(self._read_at + 1)
                return changed | changed_keys(before, self.view.objects)
            revision, changes = arrived
            for entry in changes:
                if entry.key.startswith(self.store.objects_prefix):
                    self._apply(entry.key[len(self.store.objects_prefix):], entry.value, entry.mod_revision, changed)
            self.view.version = revision

    def _apply(self, key: str, value: bytes | None, mod_revision: int, changed: set[str]) -> None:
        """One event: the object stored (as the watcher's Keep cuts it), or gone (deleted, or no longer kept)."""
        kept = None
        if value is not None:
            obj = _object(value, mod_revision)
            kept = self.keep(key, obj) if self.keep is not None else obj
        if kept is not None:
            self.view.objects[key] = kept
            changed.add(key)
        elif self.view.objects.pop(key, None) is not None:
            changed.add(key)
