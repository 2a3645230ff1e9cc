"""The lab's supervisor keeps agents and workloads running, as the kubelet keeps kube-proxy;
and a full iptables sync reaches the kernel whole or not at all, however its writer dies.

Run as a module, this file is that writer: `python -m tests.test_supervision write GEN KILL`
(see write_and_die)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from cni.netns import entered
from kproxy.bench.controlplane import CLUSTER_CIDR, endpoint_slice, node_object, service
from kproxy.controllers import record_restart
from kproxy.lab import processes, supervisor
from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.lab.state import lab_dir, ns_path
from kproxy.proxy import iptables, kernel
from kproxy.proxy.source import StateTracker, node_info
from kproxy.proxy.types import ProxyState
from kproxy.store import open_store
from tests.conditions import wait_for
from tests.labtools import kproxy, running_lab, status
from tests.test_lab import lab_traces

REPO = Path(__file__).resolve().parent.parent
SERVICES = 10_000
BACK_WITHIN = 1.0  # the promise: a killed daemon runs again within 1 s


def replaced(daemon: processes.Daemon, lab: str, node: str, old: int) -> int:
    """The pid of node's daemon that replaced old: running within BACK_WITHIN of now (the
    supervisor's record names it as it starts), then initialised (its pidfile written)."""
    def started() -> int | None:
        record = supervisor.read_status(lab_dir(lab)).get("daemons", {}).get(f"{daemon.kind}-{node}") or {}
        pid = record.get("pid")
        if pid in (None, old):
            return None
        try:
            return pid if daemon.module.encode() in Path(f"/proc/{pid}/cmdline").read_bytes() else None
        except FileNotFoundError:
            return None

    pid = wait_for(f"a new {daemon.kind} on {node}", started, BACK_WITHIN)
    # Initialising is Python's imports: seconds in the emulated guest under a loaded lane, no promise.
    wait_for(f"the new {daemon.kind} initialised", lambda: processes.running_pid(daemon, lab_dir(lab), node) == pid, 90)
    return pid


def restart_count(pod: dict[str, Any]) -> int:
    return int((pod["status"].get("containerStatuses") or [{}])[0].get("restartCount", 0))


def agent_report(lab: str, node: str) -> dict[str, Any]:
    return open_store(lab_dir(lab)).reports().get(node, {})


def status_row(lab: str, node: str) -> str:
    return next(line for line in kproxy("lab", "status", lab).stdout.splitlines() if line.startswith(node + " "))


def answer(lab: str, src: str, ip: str, port: int = 8080) -> str:
    return parse_answer(probe_tcp(ns_path(lab, src), ip, port, timeout=3))["pod"]


# --- the back-off and the pod's restart record (no kernel) -------------------------

def test_crash_loop_backoff_is_kubelets() -> None:
    backoff = supervisor.Backoff()
    assert [backoff.after_exit(5) for _ in range(9)] == [0, 10, 20, 40, 80, 160, 300, 300, 300]
    assert backoff.after_exit(600) == 0  # ran 10 min: forgiven, started again at once
    assert backoff.after_exit(1) == 10


def test_a_restart_is_recorded_in_the_pods_container_status() -> None:
    running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    pod = {"metadata": {"name": "web-1"}, "spec": {"containers": [{"name": "workload"}]},
           "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}],
                      "containerStatuses": [{"name": "workload", "ready": True, "started": True, "image": "",
                                             "imageID": "", "restartCount": 0, "state": running,
                                             "lastState": {}}]}}
    exit_ = {"exitCode": 137, "signal": "SIGKILL", "startedAt": "2026-01-01T00:00:00Z",
             "finishedAt": "2026-01-01T00:01:00Z"}
    once = record_restart(pod, "2026-01-01T00:01:00.1Z", exit_)
    assert once["status"]["containerStatuses"] == [{
        "name": "workload", "ready": True, "started": True, "image": "", "imageID": "",
        "restartCount": 1, "state": {"running": {"startedAt": "2026-01-01T00:01:00.1Z"}},
        "lastState": {"terminated": {"exitCode": 137, "reason": "Error", "startedAt": "2026-01-01T00:00:00Z",
                                     "finishedAt": "2026-01-01T00:01:00Z"}}}]
    assert record_restart(once, "x", exit_)["status"]["containerStatuses"][0]["restartCount"] == 2
    unknown = record_restart(pod, "x", dict(exit_, exitCode=None))["status"]["containerStatuses"][0]
    assert unknown["lastState"]["terminated"]["reason"] == "ContainerStatusUnknown"  # adopted: exit not ours
    assert pod["status"]["containerStatuses"][0]["restartCount"] == 0  # the store's object is left alone


# --- labs ----------------------------------------------------------------------------

WEB_SERVICE = REPO / "examples" / "services" / "web.yaml"


@pytest.mark.kernel
def test_a_killed_agent_is_back_at_once_resyncs_fully_and_its_restart_shows() -> None:
    with running_lab() as lab:
        old = processes.running_pid(processes.AGENT, lab_dir(lab), "node1")
        assert re.fullmatch(rf"node1 .* pid {old}\s+0\s+pid \d+\s+0\s+kp_{lab}_node1", status_row(lab, "node1"))
        os.kill(old, signal.SIGKILL)
        new = replaced(processes.AGENT, lab, "node1", old)
        version = open_store(lab_dir(lab)).version()
        report = wait_for("the new agent's full resync", lambda: (r := agent_report(lab, "node1")).get("pid") == new
                          and r.get("version", 0) >= version and r, 15)
        assert report["ok"] and report["fullSyncs"] == 1
        assert status(lab)["nodes"][0]["agentRestarts"] == 1
        assert re.fullmatch(rf"node1 .* pid {new}\s+1 \(\d+s ago\)\s+pid \d+\s+0\s+kp_{lab}_node1",
                            status_row(lab, "node1"))


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["iptables", pytest.param("ipvs", marks=pytest.mark.ipvs)])  # ipvs: in the guest
def test_traffic_through_a_cluster_ip_flows_while_the_agent_is_down(mode: str) -> None:
    with running_lab("--mode", mode) as lab:
        kproxy("apply", "--lab", lab, "-f", str(WEB_SERVICE))
        web = json.loads(kproxy("get", "svc", "web", "--lab", lab, "-o", "json").stdout)["spec"]["clusterIP"]
        assert answer(lab, "client", web, 80).startswith("web-")
        held = status(lab)["supervisorPid"]
        agent = processes.running_pid(processes.AGENT, lab_dir(lab), "node1")  # client's node
        os.kill(held, signal.SIGSTOP)  # it cannot restart the agent until continued
        try:
            os.kill(agent, signal.SIGKILL)
            wait_for("the agent gone", lambda: processes.running_pid(processes.AGENT, lab_dir(lab), "node1") is None, 5)
            # The rules are the kernel's: every connection of a few goes through.
            assert {answer(lab, "client", web, 80) for _ in range(6)} <= {"web-1", "web-2", "web-3"}
        finally:
            os.kill(held, signal.SIGCONT)
        replaced(processes.AGENT, lab, "node1", agent)


@pytest.mark.kernel
def test_a_killed_workload_is_back_at_once_and_its_pods_count_a_restart() -> None:
    with running_lab() as lab:
        info = status(lab)
        ips = {p["name"]: p["ip"] for p in info["pods"]}
        old = processes.running_pid(processes.WORKLOAD, lab_dir(lab), "node2")  # web-2 and echo
        os.kill(old, signal.SIGKILL)
        replaced(processes.WORKLOAD, lab, "node2", old)
        assert answer(lab, "client", ips["web-2"]) == "web-2"
        assert answer(lab, "client", ips["echo"], 9090) == "echo"
        pods = {p["metadata"]["name"]: p for p in
                json.loads(kproxy("get", "pods", "--lab", lab, "-o", "json").stdout)["items"]}
        assert {name: restart_count(pod) for name, pod in pods.items()} == \
            {"web-2": 1, "echo": 1, "web-1": 0, "web-3": 0, "client": 0}
        assert pods["web-2"]["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"] == 137
        assert status(lab)["nodes"][1]["workloadRestarts"] == 1


@pytest.mark.kernel
def test_a_killed_supervisor_is_replaced_by_lab_up_which_adopts_the_daemons_and_down_leaves_nothing() -> None:
    with running_lab() as lab:
        before = status(lab)
        pids = {n["name"]: (n["agentPid"], n["workloadPid"]) for n in before["nodes"]}
        os.kill(before["supervisorPid"], signal.SIGKILL)
        wait_for("the supervisor gone", lambda: status(lab)["supervisorPid"] is None, 5)
        assert "\nsupervisor DEAD ('kproxy lab up' with this lab's topology starts a new one)\n" in \
            kproxy("lab", "status", lab).stdout
        kproxy("lab", "up", "--name", lab)
        after = status(lab)
        assert after["supervisorPid"] not in (None, before["supervisorPid"])
        assert {n["name"]: (n["agentPid"], n["workloadPid"]) for n in after["nodes"]} == pids  # adopted
        # The new supervisor watches what it adopted: a death is noticed and repaired as quickly.
        agent = pids["node3"][0]
        os.kill(agent, signal.SIGKILL)
        replaced(processes.AGENT, lab, "node3", agent)
        kproxy("lab", "down", lab)
        assert lab_traces(lab) == []


# --- a full sync at 10k services, its writer killed anywhere --------------------------

def services_state(generation: int) -> ProxyState:
    """10k services; generation 1 moves every endpoint (nat) and adds one without any (filter)."""
    objects: dict[str, Any] = {"Node/node1": node_object()}
    for i in range(SERVICES + generation):
        objects[f"Service/bench/svc-{i}"] = service(i)
        if i < SERVICES:
            objects[f"EndpointSlice/bench/svc-{i}"] = endpoint_slice(i, generation)
    return StateTracker().update(objects)


def pieces(chunk: str) -> list[str]:
    """A chunk of restore input cut after each COMMIT line: a writer may hand over any whole lines."""
    cuts = [0, *(m.end() for m in re.finditer(r"^COMMIT\n", chunk, re.M))]
    return [chunk[a:b] for a, b in zip(cuts, [*cuts[1:], len(chunk)]) if a < b]


def write_and_die(generation: int, kill: str) -> None:
    """The agent's full sync of a generation into this namespace, killed (SIGKILL) at kill:
    "piece:N" just after the N-th piece of text (pieces() of its chunks) was handed to the
    restore stream, "tail" just after the held-back end (every COMMIT) went into the pipe."""
    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    if kill == "tail":
        write_whole = kernel.write_whole

        def write_whole_then_die(proc: subprocess.Popen[str], data: bytes) -> None:
            write_whole(proc, data)
            die()
        kernel.write_whole = write_whole_then_die
    else:
        stream, at = kernel.restore_stream, int(kill.split(":")[1])

        @contextmanager
        def dying_stream(**options: Any) -> Iterator[Callable[[str], object]]:
            fed = 0
            with stream(**options) as feed:
                def feed_then_die(chunk: str) -> None:
                    nonlocal fed
                    for piece in pieces(chunk):
                        feed(piece)
                        fed += 1
                        if fed == at:
                            die()
                yield feed_then_die
        kernel.restore_stream = dying_stream  # what the iptables mode's real backend calls
    iptables.IptablesProxier(node_info(node_object(), CLUSTER_CIDR)).sync(services_state(generation))


def ruleset_now(netns: str) -> str:
    """The namespace's nat and filter tables, once no restore of ours is still running there."""
    with entered(netns):
        with kernel.restore_lock():  # a restore that outlived its writer finishes first
            pass
        saved = kernel.run([kernel.SAVE]).stdout
    return "\n".join(line for line in saved.splitlines() if not line.startswith("#"))


@pytest.mark.kernel
def test_a_full_sync_killed_anywhere_leaves_the_old_rules_or_the_new_never_a_mix() -> None:
    netns_name = f"kp-atomic-{os.getpid()}"
    netns = f"/var/run/netns/{netns_name}"
    subprocess.run(["ip", "netns", "add", netns_name], check=True)
    try:
        chunks: list[str] = []
        iptables.write_full_restore(services_state(0), node_info(node_object(), CLUSTER_CIDR), chunks.append)
        cut = [piece for chunk in chunks for piece in pieces(chunk)]
        nat_commit = next(i for i, piece in enumerate(cut, 1) if piece.endswith("COMMIT\n"))
        saved = {}
        for generation in (0, 1):
            with entered(netns):
                iptables.IptablesProxier(node_info(node_object(), CLUSTER_CIDR)).sync(services_state(generation))
            saved[generation] = ruleset_now(netns)
        assert saved[0] != saved[1]
        # The kernel holds generation 1; each writer writes generation 0 and is killed: at the first
        # piece, anywhere, right after nat's COMMIT (where a writer of one table after the other
        # leaves nat new and filter old), or once everything is in the pipe.
        kills = ["piece:1", f"piece:{random.randint(2, nat_commit - 1)}", f"piece:{nat_commit}", "tail"]
        for kill in kills:
            writer = subprocess.run(["nsenter", f"--net={netns}", "--", sys.executable, "-m", "tests.test_supervision",
                                     "write", "0", kill], cwd=REPO, capture_output=True, text=True)
            assert writer.returncode == -signal.SIGKILL, writer.stderr
            got = ruleset_now(netns)
            assert got in (saved[0], saved[1]), f"killed at {kill}: a mix of old and new rules"
            assert got == saved[0 if kill == "tail" else 1], f"killed at {kill}"
        # A restarted agent's first sync is full: it converges to the newest state.
        with entered(netns):
            iptables.IptablesProxier(node_info(node_object(), CLUSTER_CIDR)).sync(services_state(1))
        assert ruleset_now(netns) == saved[1]
    finally:
        subprocess.run(["ip", "netns", "del", netns_name], capture_output=True)


if __name__ == "__main__" and sys.argv[1:2] == ["write"]:
    write_and_die(int(sys.argv[2]), sys.argv[3])
