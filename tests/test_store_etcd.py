"""The etcd store against a real etcd 3.4 (Debian's etcd-server, unpacked into .cache/etcd when the
machine has no etcd), running in a network namespace of the test's own: batches, the revision as
the version, watches that resume after a restart, a full resync after compaction, and etcd down."""

from __future__ import annotations

import signal
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from kproxy.lab.state import ns_name, ns_path
from kproxy.store import Conflict, FollowingStore, Store, View, key_of
from kproxy.store import etcdserver
from kproxy.store.etcd import EtcdStore, EtcdWatcher
from kproxy.store.file import FileStore
from kproxy.store.gateway import EtcdUnavailable
from tests.conditions import wait_for
from tests.labtools import unique_lab_name

pytestmark = pytest.mark.kernel
IP = "127.0.0.1"  # the namespace's own loopback: nothing leaves it
ENDPOINT = f"http://{IP}:{etcdserver.CLIENT_PORT}"


@dataclass
class Etcd:
    netns: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = etcdserver.start("control-plane", IP, self.data_dir, self.log, self.netns)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def store(self, prefix: str = "/kproxy/lab/") -> EtcdStore:
        return EtcdStore(ENDPOINT, prefix, self.netns)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    lab = unique_lab_name()
    name = ns_name(lab, "control-plane")
    subprocess.run(["ip", "netns", "add", name], check=True)
    server = Etcd(ns_path(lab, "control-plane"), tmp_path / "etcd", tmp_path / "etcd.log")
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        server.start()
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        subprocess.run(["ip", "netns", "delete", name], check=True)


def svc(name: str, ip: str = "10.96.0.10") -> dict[str, object]:
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default"}, "spec": {"clusterIP": ip}}


def services_only(key: str, obj: dict[str, Any]) -> dict[str, Any] | None:
    return {"ip": obj["spec"]["clusterIP"]} if key.startswith("Service/") else None


def polled_until(watcher: EtcdWatcher, store: Store, what: str) -> set[str]:
    """Every key the watcher reported until its view caught up with the store's version."""
    seen: set[str] = set()
    want = store.version()

    def caught_up() -> bool:
        seen.update(watcher.poll())
        return watcher.view.version >= want
    wait_for(what, caught_up, timeout=30)
    return seen


def test_a_batch_is_one_revision_and_the_version_is_that_revision(etcd: Etcd) -> None:
    store = etcd.store()
    assert store.read().version == 0 and store.version() == 0
    a, b = svc("a"), svc("b", "10.96.0.11")
    revision = store.write({key_of("Service", "default", "a"): a, key_of("Service", "default", "b"): b})
    assert store.version() == revision and a["metadata"]["resourceVersion"] == str(revision)
    view = store.read()
    assert view.version == revision and list(view.objects) == ["Service/default/a", "Service/default/b"]
    assert view.objects["Service/default/b"] == b and b["metadata"]["uid"] and b["metadata"]["creationTimestamp"]
    again = store.write({key_of("Service", "default", "a"): None})
    assert again > revision and list(store.read().objects) == ["Service/default/b"]
    assert store.read().objects["Service/default/b"]["metadata"]["resourceVersion"] == str(revision)


def test_two_labs_in_one_etcd_keep_apart(etcd: Etcd) -> None:
    one, two = etcd.store("/kproxy/one/"), etcd.store("/kproxy/two/")
    one.write({key_of("Service", "default", "a"): svc("a")})
    assert two.read().objects == {} and two.version() == 0


def test_deleting_a_labs_everything_leaves_the_etcd_as_before_it_and_other_labs_alone(etcd: Etcd) -> None:
    """What `lab down` of a lab made on another machine's etcd does there."""
    one, other = etcd.store("/kproxy/one/"), etcd.store("/kproxy/one-b/")  # a prefix of one's name, not one's
    one.write({key_of("Service", "default", "a"): svc("a")})
    one.put_report("node1", {"version": one.version(), "ok": True})
    other.write({key_of("Service", "default", "b"): svc("b")})
    one.delete_everything()
    assert (one.read().objects, one.version(), one.reports()) == ({}, 0, {})
    assert list(other.read().objects) == [key_of("Service", "default", "b")] and other.version() > 0


def test_a_watcher_sees_each_change_once_and_keeps_what_it_asks_for(etcd: Etcd) -> None:
    store = etcd.store()
    store.write({key_of("Service", "default", "a"): svc("a")})
    with closing(store.watch(keep=services_only)) as watcher:
        assert watcher.view.objects == {"Service/default/a": {"ip": "10.96.0.10"}}
        store.write({key_of("Service", "default", "b"): svc("b", "10.96.0.11"),
                     key_of("Pod", "default", "p"): svc("p")})
        assert polled_until(watcher, store, "the new Service") == {"Service/default/b"}
        store.write({key_of("Service", "default", "a"): None})
        assert polled_until(watcher, store, "the delete") == {"Service/default/a"}
        assert watcher.view.objects == {"Service/default/b": {"ip": "10.96.0.11"}}
        assert watcher.poll() == set()


def test_a_watcher_resumes_after_an_etcd_restart_losing_and_repeating_nothing(etcd: Etcd) -> None:
    store = etcd.store()
    store.write({key_of("Service", "default", "a"): svc("a")})
    with closing(store.watch()) as watcher:
        store.write({key_of("Service", "default", "b"): svc("b")})
        assert polled_until(watcher, store, "b before the restart") == {"Service/default/b"}
        etcd.stop()
        assert watcher.poll() == set()
        etcd.start()
        store.write({key_of("Service", "default", "c"): svc("c")})
        assert polled_until(watcher, store, "c after the restart") == {"Service/default/c"}
        assert watcher.view.objects == store.read().objects


def test_a_watcher_whose_revision_was_compacted_resyncs_in_full(etcd: Etcd) -> None:
    store = etcd.store()
    store.write({key_of("Service", "default", "a"): svc("a"), key_of("Service", "default", "b"): svc("b")})
    # Its stream opens at the first poll, after the history it needs is gone.
    with closing(store.watch()) as watcher:
        store.write({key_of("Service", "default", "c"): svc("c")})
        store.write({key_of("Service", "default", "a"): None})
        store.gateway.compact(store.version())
        assert polled_until(watcher, store, "the resync") == {"Service/default/a", "Service/default/c"}
        assert watcher.view.objects == store.read().objects
        store.write({key_of("Service", "default", "d"): svc("d")})  # and it follows on from there
        assert polled_until(watcher, store, "d after the resync") == {"Service/default/d"}


def test_a_write_while_etcd_is_down_is_one_line_and_stores_nothing(etcd: Etcd) -> None:
    store = etcd.store()
    store.write({key_of("Service", "default", "a"): svc("a")})
    before = store.read()
    etcd.stop()
    with pytest.raises(EtcdUnavailable) as refused:
        store.write({key_of("Service", "default", "a"): None, key_of("Service", "default", "b"): svc("b")})
    assert str(refused.value) == f"etcd at {ENDPOINT} is unreachable: [Errno 111] Connection refused"
    etcd.start()
    assert store.read() == before


def test_a_following_store_reads_in_full_once_and_sees_a_write_at_once(etcd: Etcd, monkeypatch) -> None:
    snapshots = []
    real_snapshot = EtcdStore._snapshot
    monkeypatch.setattr(EtcdStore, "_snapshot", lambda self, keep=None: snapshots.append(1) or real_snapshot(self, keep))
    etcd.store().write({key_of("Service", "default", "a"): svc("a")})
    with closing(FollowingStore(etcd.store())) as following:
        assert list(following.read().objects) == ["Service/default/a"]
        for name in ("b", "c"):  # each read right after another writer's write: the watch is waited for
            revision = etcd.store().write({key_of("Service", "default", name): svc(name)})
            view = following.read()
            assert view.version >= revision and f"Service/default/{name}" in view.objects
    assert len(snapshots) == 1


def test_a_mirrored_following_store_reads_only_what_changed_since_its_mirror(etcd: Etcd, tmp_path: Path,
                                                                            monkeypatch) -> None:
    mirror = FileStore(tmp_path / "mirror")
    etcd.store().write({key_of("Service", "default", "a"): svc("a")})
    with closing(FollowingStore(etcd.store(), mirror)) as following:  # no mirror yet: one full read
        assert list(following.read().objects) == ["Service/default/a"]
    assert list(mirror.read().objects) == ["Service/default/a"]
    etcd.store().write({key_of("Service", "default", "b"): svc("b")})  # while no process followed
    monkeypatch.setattr(EtcdStore, "_snapshot", lambda self, keep=None: pytest.fail("read in full"))
    with closing(FollowingStore(etcd.store(), mirror)) as following:
        view = following.read()
        assert list(view.objects) == ["Service/default/a", "Service/default/b"]
        assert view.objects["Service/default/b"]["metadata"]["resourceVersion"] == str(etcd.store().version())
        following.write({key_of("Service", "default", "a"): None})
        assert list(following.read().objects) == ["Service/default/b"]
    assert (mirror.read().version, list(mirror.read().objects)) == (etcd.store().version(), ["Service/default/b"])


def test_a_mirror_of_another_etcd_history_is_not_followed(etcd: Etcd, tmp_path: Path) -> None:
    mirror = FileStore(tmp_path / "mirror")
    mirror.replace(View(10**6, {"Service/default/gone": svc("gone")}))  # an etcd since made anew
    etcd.store().write({key_of("Service", "default", "a"): svc("a")})
    with closing(FollowingStore(etcd.store(), mirror)) as following:
        assert list(following.read().objects) == ["Service/default/a"]
    assert list(mirror.read().objects) == ["Service/default/a"]


def test_an_agents_report_wakes_no_watcher_and_leaves_the_version(etcd: Etcd) -> None:
    store = etcd.store()
    version = store.write({key_of("Service", "default", "a"): svc("a")})
    with closing(store.watch()) as watcher:
        watcher.poll()
        store.put_report("node1", {"version": version, "ok": True})
        store.put_report("node2", {"version": version, "ok": False})
        assert store.reports() == {"node1": {"version": version, "ok": True},
                                   "node2": {"version": version, "ok": False}}
        store.delete_report("node2")
        later = store.write({key_of("Service", "default", "b"): svc("b")})
        assert polled_until(watcher, store, "the write after the reports") == {"Service/default/b"}
        assert store.version() == later and list(store.reports()) == ["node1"]
        assert etcd.store("/kproxy/other/").reports() == {}
    # Out of what watchers follow: else each agent's report would wake every other agent, whose
    # report of the new version would wake the first again.
    assert not store.watched[0] <= store.reports_prefix + "node1" < store.watched[1]


def test_a_conditional_write_is_one_transaction_that_holds_only_on_the_revision_read(etcd: Etcd) -> None:
    store = etcd.store()
    assert store.write({key_of("Service", "default", "a"): svc("a")}, expect=0) > 0  # a new lab: no version yet
    read = store.version()
    store.write({key_of("Service", "default", "b"): svc("b")})
    with pytest.raises(Conflict, match=rf"^the lab's store is no longer at version {read}: it changed meanwhile$"):
        store.write({key_of("Service", "default", "c"): svc("c"), key_of("Service", "default", "a"): None},
                    expect=read)
    assert sorted(store.read().objects) == ["Service/default/a", "Service/default/b"]
    now = store.version()
    assert store.write({key_of("Service", "default", "c"): svc("c")}, expect=now) > now
