"""A lab with its objects in etcd (`kproxy lab up --store etcd`), as a user meets it: etcd in the
control-plane member on the underlay, the agents watching it from their nodes, etcd restarted under
them, an apply while etcd is down, and down leaving nothing. (The Service behaviour suite also runs
once on such a lab: tests/servicelab.py.)"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from kproxy.lab import processes
from kproxy.lab.state import lab_dir, ns_path
from kproxy.lab.supervisor import supervisor_pid
from kproxy.store.etcd import EtcdStore
from tests.conditions import wait_for
from tests.labtools import kproxy, running_lab, status
from tests.test_lab import answer, lab_traces

pytestmark = pytest.mark.kernel
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: %(name)s}
spec:
  selector: {app: web}
  ports:
  - {port: 80, targetPort: 8080}
"""


def apply_service(lab: str, tmp_path: Path, name: str, check: bool = True) -> tuple[int, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SERVICE % {"name": name})
    done = kproxy("apply", "--lab", lab, "-f", str(path), check=check)
    return done.returncode, done.stderr.strip()


def cluster_ip(lab: str, name: str) -> str:
    return json.loads(kproxy("get", "svc", name, "--lab", lab, "-o", "json").stdout)["spec"]["clusterIP"]


def etcd_pid(lab: str) -> int | None:
    """etcd's own pid, the child of the lab's etcd daemon; None while there is none (etcd has exited
    and its daemon, about to exit too, has not yet been started again)."""
    daemon = processes.running_pid(processes.ETCD, lab_dir(lab), "control-plane")
    try:
        children = Path(f"/proc/{daemon}/task/{daemon}/children").read_text().split() if daemon else []
    except FileNotFoundError:
        return None
    return int(children[0]) if children else None


def running_etcd(lab: str) -> int:
    pid = etcd_pid(lab)
    assert pid is not None, "no etcd runs"
    return pid


def test_a_lab_on_etcd_serves_its_services_and_down_leaves_nothing(tmp_path: Path) -> None:
    with running_lab("--store", "etcd") as lab:
        info = status(lab)
        store = info["store"]
        assert store["backend"] == "etcd" and store["endpoint"].startswith("http://172.18.0.")
        apply_service(lab, tmp_path, "one")
        ip = cluster_ip(lab, "one")
        assert answer(lab, "client", ip, 80)["pod"].startswith("web-")
        # The object is in etcd under the lab's prefix, with etcd's revision as its resourceVersion.
        etcd = EtcdStore(store["endpoint"], f"/kproxy/{lab}/", ns_path(lab, "control-plane"))
        stored = etcd.read().objects["Service/default/one"]
        assert stored["spec"]["clusterIP"] == ip and int(stored["metadata"]["resourceVersion"]) <= etcd.version()
        assert status(lab)["store"]["version"] == etcd.version()
        daemon = processes.running_pid(processes.ETCD, lab_dir(lab), "control-plane")
        etcd_itself = running_etcd(lab)
    assert lab_traces(lab) == []
    for pid in (daemon, etcd_itself):
        assert not os.path.exists(f"/proc/{pid}")


def test_agents_follow_etcd_through_a_restart(tmp_path: Path) -> None:
    with running_lab("--store", "etcd") as lab:
        apply_service(lab, tmp_path, "before")
        before = running_etcd(lab)
        os.kill(before, signal.SIGKILL)  # the supervisor starts etcd again on the same data
        wait_for("etcd restarted", lambda: etcd_pid(lab) not in (None, before), timeout=60)
        apply_service(lab, tmp_path, "after")  # apply waits until every agent has it programmed
        for service in ("before", "after"):
            assert answer(lab, "client", cluster_ip(lab, service), 80)["pod"].startswith("web-")


def test_etcd_goes_with_its_daemon_and_the_next_one_serves(tmp_path: Path) -> None:
    with running_lab("--store", "etcd") as lab:
        daemon, etcd = processes.running_pid(processes.ETCD, lab_dir(lab), "control-plane"), running_etcd(lab)
        os.kill(daemon, signal.SIGKILL)  # etcd itself is not signalled: it must not outlive its daemon
        wait_for("etcd gone with its daemon", lambda: not os.path.exists(f"/proc/{etcd}"), timeout=30)
        wait_for("etcd started again", lambda: etcd_pid(lab) not in (None, etcd), timeout=60)
        apply_service(lab, tmp_path, "after")
        assert answer(lab, "client", cluster_ip(lab, "after"), 80)["pod"].startswith("web-")


def test_an_apply_while_etcd_is_down_is_one_line_and_stores_nothing(tmp_path: Path) -> None:
    with running_lab("--store", "etcd") as lab:
        supervisor = supervisor_pid(lab_dir(lab))
        assert supervisor is not None
        os.kill(supervisor, signal.SIGSTOP)  # nobody starts etcd again meanwhile
        try:
            os.kill(running_etcd(lab), signal.SIGKILL)
            status_code, error = apply_service(lab, tmp_path, "lost", check=False)
            assert status_code == 1
            assert error.startswith("kproxy: error: etcd at http://172.18.0.") and "is unreachable" in error
            assert len(error.splitlines()) == 1
        finally:
            os.kill(supervisor, signal.SIGCONT)
        wait_for("etcd back", lambda: processes.running_pid(processes.ETCD, lab_dir(lab), "control-plane"),
                 timeout=60)
        assert "lost" not in kproxy("get", "svc", "--lab", lab).stdout
