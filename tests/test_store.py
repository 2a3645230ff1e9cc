"""The embedded store: versions, atomic batches, watchers, compaction."""

from __future__ import annotations

import os
import re
from multiprocessing import Pool
from pathlib import Path

import pytest

from kproxy.store import file as store_mod
from kproxy.store import Conflict, FollowingStore, View, carry_identity, key_of
from kproxy.store.file import FileStore


def svc(name: str, ip: str = "10.96.0.10") -> dict[str, object]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": {"clusterIP": ip}}


def test_writes_bump_the_version_and_reads_see_every_batch(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert store.read().version == 0
    v1 = store.write({key_of("Service", "default", "a"): svc("a"), key_of("Service", "default", "b"): svc("b")})
    v2 = store.write({key_of("Service", "default", "a"): None})
    assert (v1, v2) == (1, 2)
    view = store.read()
    assert view.version == 2 and list(view.objects) == ["Service/default/b"]
    assert [o["metadata"]["name"] for o in view.of_kind("Service")] == ["b"]


def test_a_watcher_sees_only_what_changed(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write({"Service/default/a": svc("a")})
    watcher = store.watch()
    assert watcher.view.version == 1 and watcher.poll() == set()
    store.write({"Service/default/b": svc("b"), "Service/default/a": None})
    assert watcher.poll() == {"Service/default/a", "Service/default/b"}
    assert set(watcher.view.objects) == {"Service/default/b"} and watcher.view.version == 2
    assert watcher.poll() == set()


def test_a_watcher_keeps_only_what_it_is_told_from_snapshot_and_journal(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "COMPACT_MIN_BYTES", 300)
    store = FileStore(tmp_path)

    def names_of_services(key: str, obj: dict) -> dict | None:
        return {"name": obj["metadata"]["name"]} if key.startswith("Service/") else None

    for i in range(6):  # folded into a snapshot on the way
        store.write({f"Service/default/s{i}": svc(f"s{i}", f"10.96.0.{i + 1}")})
    store.write({"Pod/default/p": {"metadata": {"name": "p", "namespace": "default"}}})
    assert (tmp_path / store_mod.SNAPSHOT).exists()
    watcher = store.watch(keep=names_of_services)
    assert watcher.view.objects == {f"Service/default/s{i}": {"name": f"s{i}"} for i in range(6)}
    store.write({"Pod/default/q": {"metadata": {"name": "q", "namespace": "default"}},
                 "Service/default/s0": None, "Service/default/t": svc("t")})
    assert watcher.poll() == {"Service/default/s0", "Service/default/t"}  # the pod is no change to it
    assert watcher.view.objects["Service/default/t"] == {"name": "t"} and "Service/default/s0" not in watcher.view.objects


def test_a_half_written_journal_line_is_not_read(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write({"Service/default/a": svc("a")})
    watcher = store.watch()
    with open(tmp_path / store_mod.JOURNAL, "ab") as journal:
        journal.write(b'{"v": 2, "changes": {"Service/default/b"')  # a writer mid-line
    assert watcher.poll() == set() and watcher.view.version == 1


def test_compaction_folds_the_journal_and_watchers_follow(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "COMPACT_MIN_BYTES", 500)
    store = FileStore(tmp_path)
    watcher = store.watch()
    for i in range(20):
        store.write({f"Service/default/s{i}": svc(f"s{i}", f"10.96.0.{i + 1}")})
    assert (tmp_path / store_mod.SNAPSHOT).exists()
    assert len((tmp_path / store_mod.JOURNAL).read_text().splitlines()) < 20  # folded into the snapshot
    watcher.poll()
    assert watcher.view.version == 20 and len(watcher.view.objects) == 20
    assert store.read().objects == watcher.view.objects


def _write_many(args: tuple[str, int]) -> list[int]:
    directory, worker = args
    store = FileStore(Path(directory))
    return [store.write({f"Service/default/w{worker}-{i}": svc(f"w{worker}-{i}")}) for i in range(25)]


def test_concurrent_writers_get_distinct_versions(tmp_path: Path) -> None:
    with Pool(4) as pool:
        versions = [v for batch in pool.map(_write_many, [(str(tmp_path), w) for w in range(4)]) for v in batch]
    assert sorted(versions) == list(range(1, 101))
    assert len(FileStore(tmp_path).read().objects) == 100
    assert os.path.exists(tmp_path / "lock")


def test_a_write_stamps_identity_once_and_the_resource_version_every_time(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write({"Service/default/a": svc("a")})
    first = store.read().objects["Service/default/a"]["metadata"]
    assert first["resourceVersion"] == "1" and len(first["uid"]) == 36
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", first["creationTimestamp"])
    store.write({"Service/default/b": svc("b")})
    update = carry_identity(svc("a", "10.96.0.99"), store.read().objects["Service/default/a"])
    store.write({"Service/default/a": update})
    view = store.read()
    again = view.objects["Service/default/a"]["metadata"]
    assert again["resourceVersion"] == "3" and view.objects["Service/default/b"]["metadata"]["resourceVersion"] == "2"
    assert (again["uid"], again["creationTimestamp"]) == (first["uid"], first["creationTimestamp"])
    assert view.objects["Service/default/b"]["metadata"]["uid"] != first["uid"]


def test_a_lab_store_is_opened_only_through_open_store() -> None:
    """The seam a second store backend plugs into: nothing else names the file store."""
    package = Path(__file__).parent.parent / "kproxy"
    naming = [str(path.relative_to(package)) for path in package.rglob("*.py")
              if path.parent.name != "store" and ("FileStore" in path.read_text() or "store.file" in path.read_text())]
    assert naming == []


def test_a_following_store_loads_everything_once_and_sees_every_later_write(tmp_path: Path, monkeypatch) -> None:
    loads = []
    real_load = FileStore._load
    monkeypatch.setattr(FileStore, "_load", lambda self, keep=None: loads.append(1) or real_load(self, keep))
    FileStore(tmp_path).write({"Service/default/a": svc("a")})
    following = FollowingStore(FileStore(tmp_path))
    assert list(following.read().objects) == ["Service/default/a"]
    following.write({"Service/default/b": svc("b")})
    FileStore(tmp_path).write({"Service/default/a": None})  # another writer, as the supervisor is
    view = following.read()
    assert (view.version, list(view.objects)) == (3, ["Service/default/b"])
    assert len(loads) == 1


class _StuckWatcher:
    view = View(1, {"Service/default/old": {}})

    def poll(self) -> set[str]:
        return set()

    def close(self) -> None:
        pass


def test_a_following_store_whose_watch_lags_reads_in_full(tmp_path: Path, monkeypatch) -> None:
    store = FileStore(tmp_path)
    store.write({"Service/default/a": svc("a")})
    store.write({"Service/default/b": svc("b")})
    watches = iter([_StuckWatcher(), store.watch()])
    monkeypatch.setattr(store, "watch", lambda keep=None: next(watches))
    monkeypatch.setattr(FollowingStore, "CATCH_UP_SECONDS", 0.05)
    view = FollowingStore(store).read()  # the stuck watch never reaches version 2: a full read does
    assert (view.version, list(view.objects)) == (2, ["Service/default/a", "Service/default/b"])


def test_an_agents_report_sits_beside_the_objects(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    store.write({"Service/default/a": svc("a")})
    watcher = store.watch()
    store.put_report("node1", {"version": 1, "ok": True})
    store.put_report("node2", {"version": 0, "ok": False})
    store.put_report("node2", {"version": 1, "ok": True})
    assert store.reports() == {"node1": {"version": 1, "ok": True}, "node2": {"version": 1, "ok": True}}
    assert store.version() == 1 and watcher.poll() == set()
    store.delete_report("node1")
    assert list(store.reports()) == ["node2"]


def test_a_conditional_write_lands_only_on_the_version_it_read(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    read = store.write({key_of("Service", "default", "a"): svc("a")})
    store.write({key_of("Service", "default", "b"): svc("b")})  # another writer, meanwhile
    with pytest.raises(Conflict, match=r"^the store is at version 2, not 1: it changed meanwhile$"):
        store.write({key_of("Service", "default", "c"): svc("c")}, expect=read)
    assert sorted(store.read().objects) == ["Service/default/a", "Service/default/b"] and store.version() == 2
    assert store.write({key_of("Service", "default", "c"): svc("c")}, expect=2) == 3
