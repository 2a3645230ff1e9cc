"""The embedded file store: like etcd in miniature, a snapshot plus an append-only journal and one
version counter.

A write is one journal line ({"v": N, "changes": {key: obj | null}}) appended under flock, so a
batch is atomic for readers, who only consume complete lines. Watchers keep the objects in memory
and read only the journal lines past their version, so a change costs its own size, not the size
of the cluster. When the journal grows past the snapshot, a writer folds it into a new snapshot
(atomic rename) and starts a new journal file; watchers notice the new file and reload.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

from kproxy.store import Conflict, Keep, Obj, View, changed_keys, stamp

SNAPSHOT = "snapshot.json"
JOURNAL = "journal.jsonl"
VERSION = "version"  # the latest version, so a writer need not read the whole store
LOCK = "lock"
REPORTS = "reports"  # the agents' reports, one file per node
COMPACT_MIN_BYTES = 1 << 20


class FileStore:
    """The store in one directory."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> View:
        view, _, _ = self._load()
        return view

    def _load(self, keep: Keep | None = None) -> tuple[View, int, int]:
        """Snapshot + journal: (view, journal inode, bytes of journal consumed)."""
        while True:
            try:
                snap = json.loads((self.dir / SNAPSHOT).read_text())
                objects = snap["objects"]
                if keep is not None:
                    objects = {k: kept for k, o in objects.items() if (kept := keep(k, o)) is not None}
                view = View(snap["version"], objects)
            except FileNotFoundError:
                view = View()
            try:
                with open(self.dir / JOURNAL, "rb") as journal:
                    inode = os.fstat(journal.fileno()).st_ino
                    data = journal.read()
            except FileNotFoundError:
                return view, 0, 0
            consumed = _apply_lines(view, data, keep=keep)
            if consumed is not None:
                return view, inode, consumed
            # The journal belongs to a newer snapshot than the one read: read again.

    def version(self) -> int:
        try:
            return int((self.dir / VERSION).read_text())
        except FileNotFoundError:
            return 0

    def write(self, changes: Mapping[str, Obj | None], expect: int | None = None) -> int:
        """Apply a batch atomically, stamping its objects in place; returns the new version."""
        with self._locked():
            version = self.version() + 1
            if expect is not None and version - 1 != expect:
                raise Conflict(f"the store is at version {version - 1}, not {expect}: it changed meanwhile")
            stamp(changes, version)
            self._append(version, changes)
            return version

    def record(self, version: int, changes: Mapping[str, Obj | None]) -> None:
        """Keep a batch another store stamped, at that store's version (a mirror of it); a batch at
        or below the version kept already is old news and left out."""
        with self._locked():
            if version > self.version():
                self._append(version, changes)

    def replace(self, view: View) -> None:
        """Hold exactly view, at its version (a mirror's first copy)."""
        with self._locked():
            self._snapshot(view)

    def _append(self, version: int, changes: Mapping[str, Obj | None]) -> None:
        line = json.dumps({"v": version, "changes": dict(changes)}, separators=(",", ":")) + "\n"
        with open(self.dir / JOURNAL, "ab") as journal:
            journal.write(line.encode())
            journal_size = journal.tell()
        self._set_version(version)
        snapshot = self.dir / SNAPSHOT
        if journal_size > max(COMPACT_MIN_BYTES, snapshot.stat().st_size if snapshot.exists() else 0):
            self._snapshot(self._load()[0])

    def _set_version(self, version: int) -> None:
        tmp = self.dir / f".{VERSION}.tmp"
        tmp.write_text(str(version))
        os.replace(tmp, self.dir / VERSION)

    def _snapshot(self, view: View) -> None:
        """view as the snapshot, with an empty journal after it (a compaction, or a mirror's copy)."""
        tmp = self.dir / f".{SNAPSHOT}.tmp"
        tmp.write_text(json.dumps({"version": view.version, "objects": view.objects}, separators=(",", ":")))
        empty = self.dir / f".{JOURNAL}.tmp"
        empty.write_bytes(json.dumps({"base": view.version}).encode() + b"\n")
        os.replace(tmp, self.dir / SNAPSHOT)
        os.replace(empty, self.dir / JOURNAL)
        self._set_version(view.version)

    def watch(self, keep: Keep | None = None) -> FileWatcher:
        return FileWatcher(self, keep)

    def _report_path(self, node: str) -> Path:
        return self.dir / REPORTS / f"{node}.json"

    def put_report(self, node: str, report: Mapping[str, Any]) -> None:
        path = self._report_path(node)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(report))
        os.replace(tmp, path)

    def reports(self) -> dict[str, dict[str, Any]]:
        found = {}
        for path in (self.dir / REPORTS).glob("*.json"):
            try:
                found[path.stem] = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):  # removed meanwhile; a report is replaced whole
                continue
        return found

    def delete_report(self, node: str) -> None:
        self._report_path(node).unlink(missing_ok=True)


def _apply_lines(view: View, data: bytes, changed: set[str] | None = None, keep: Keep | None = None) -> int | None:
    """Apply complete journal lines newer than view, noting keys in changed;
    bytes consumed, None if the journal starts past the view (a compaction
    raced with our snapshot read)."""
    consumed = 0
    while True:
        end = data.find(b"\n", consumed)
        if end < 0:
            return consumed
        entry = json.loads(data[consumed:end])
        consumed = end + 1
        if "base" in entry:
            if entry["base"] > view.version:
                return None
            continue
        if entry["v"] <= view.version:
            continue
        for key, obj in entry["changes"].items():
            if keep is not None and obj is not None:
                obj = keep(key, obj)
                if obj is None and key not in view.objects:
                    continue
            if changed is not None:
                changed.add(key)
            if obj is None:
                view.objects.pop(key, None)
            else:
                view.objects[key] = obj
        view.version = entry["v"]


class FileWatcher:
    """Follows a FileStore: poll() returns the keys that changed since the last call."""

    def __init__(self, store: FileStore, keep: Keep | None = None) -> None:
        self.store = store
        self.keep = keep
        self.view, self._inode, self._offset = store._load(keep)

    def poll(self) -> set[str]:
        path = self.store.dir / JOURNAL
        try:
            with open(path, "rb") as journal:
                inode = os.fstat(journal.fileno()).st_ino
                if inode == self._inode:
                    journal.seek(self._offset)
                    data = journal.read()
                    if not data:
                        return set()
                    changed: set[str] = set()
                    consumed = _apply_lines(self.view, data, changed, self.keep)
                    if consumed is not None:
                        self._offset += consumed
                        return changed
        except FileNotFoundError:
            if self._inode == 0:
                return set()
        before = self.view.objects
        self.view, self._inode, self._offset = self.store._load(self.keep)
        return changed_keys(before, self.view.objects)

    def close(self) -> None:
        """Nothing to release: the journal is opened at each poll."""

