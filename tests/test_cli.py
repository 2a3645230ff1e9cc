"""The command line as a user meets it: every bad input is one line naming what is wrong and a
non-zero exit, a closed stdout is a quiet exit, a lab that does not exist is an error that
creates nothing, and lab operations wait for each other."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy import cli, demo, guest, kmod
from kproxy.lab.lock import lab_lock, lock_path
from kproxy.lab.state import NETNS_DIR, lab_dir
from tests.conditions import wait_for
from tests.labtools import KPROXY, kproxy, unique_lab_name, write_topology

REPO = Path(__file__).resolve().parents[1]
WEB = REPO / "examples" / "services" / "web.yaml"
MISSING = f"nosuch{os.getpid() % 100000}"


def run(*argv: str) -> tuple[int, str, str]:
    """main() in this process: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(list(argv))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A state root of this test's own; no default lab."""
    monkeypatch.setenv("KPROXY_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("KPROXY_LAB", raising=False)
    return tmp_path / "state"


# Arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "error"), [
    (["render", "--node-ip", "999.1.1.1", "-f", str(WEB)],
     "kproxy render: error: argument --node-ip: '999.1.1.1' is not an IPv4 address (see 'kproxy render --help')"),
    (["render", "--cluster-cidr", "10.244.0.1/16", "-f", str(WEB)],
     "kproxy render: error: argument --cluster-cidr: '10.244.0.1/16' is not an IPv4 CIDR "
     "(10.244.0.1/16 has host bits set) (see 'kproxy render --help')"),
    (["render", "--mode-opt", "scheduler", "-f", str(WEB)],
     "kproxy render: error: argument --mode-opt: mode option 'scheduler': expected NAME=VALUE "
     "(see 'kproxy render --help')"),
    (["scale", "deploy/web", "--replicas", "-1"],
     "kproxy scale: error: argument --replicas: '-1' is not a whole number, 0 or more (see 'kproxy scale --help')"),
    (["scale", "web", "--replicas", "1"],
     "kproxy scale: error: argument deploy/NAME: 'web' is not deploy/NAME (see 'kproxy scale --help')"),
    (["get", "pods", "--lab", "../etc"],
     "kproxy get: error: argument --lab: lab name '../etc' is not a valid name (lowercase letters, digits and "
     "'-', at most 20 characters) (see 'kproxy get --help')"),
    (["get", "pods", "-n", "Kube_System"],
     "kproxy get: error: argument -n/--namespace: namespace 'Kube_System' is not a DNS-1123 label: lowercase "
     "letters, digits and '-', starting and ending with a letter or digit, at most 63 characters "
     "(see 'kproxy get --help')"),
    (["lab", "add-node", "node4", "--label", "a b=c"],
     "kproxy lab add-node: error: argument --label: invalid label key 'a b': name part must consist of "
     "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character "
     "(see 'kproxy lab add-node --help')"),
    (["lab", "add-node", "Node_4"],
     "kproxy lab add-node: error: argument node: node name 'Node_4' is not a valid name (lowercase letters, "
     "digits and '-') (see 'kproxy lab add-node --help')"),
    (["rules", "averyveryverylongname"],
     "kproxy rules: error: argument node: node name 'averyveryverylongname' is longer than 12 characters "
     "(see 'kproxy rules --help')"),
    (["lab", "up", "--mode", "nft"],
     "kproxy lab up: error: argument --mode: invalid choice: 'nft' (choose from 'iptables', 'userspace', 'ipvs', 'nftables') "
     "(see 'kproxy lab up --help')"),
    (["lab", "up", "--store", "nfs"],
     "kproxy lab up: error: argument --store: 'nfs' is not file, etcd or etcd://IP:PORT (an etcd another machine "
     "runs) (see 'kproxy lab up --help')"),
    (["lab", "up", "--store", "etcd://172.18.0.253"],
     "kproxy lab up: error: argument --store: 'etcd://172.18.0.253' is not etcd://IP:PORT (an etcd on the lab's "
     "underlay, e.g. etcd://172.18.0.253:2379, as 'kproxy lab status' shows it on the machine that runs it) "
     "(see 'kproxy lab up --help')"),
    (["lab", "join", "-f", "x.yaml", "--nic", "52:54:00:6b:70:02", "--store", "http://172.18.0.253:2379"],
     "kproxy lab join: error: argument --store: 'http://172.18.0.253:2379' is not etcd://IP:PORT (an etcd on the "
     "lab's underlay, e.g. etcd://172.18.0.253:2379, as 'kproxy lab status' shows it on the machine that runs it) "
     "(see 'kproxy lab join --help')"),
    (["nonsense"],
     "kproxy: error: argument COMMAND: invalid choice: 'nonsense' (choose from 'lab', 'apply', 'delete', 'get', "
     "'scale', 'rollout', 'rules', 'bench', 'modes', 'render', 'exec', 'capture', 'trace', 'packet-lab') "
     "(see 'kproxy --help')"),
    (["capture", "node1", "--count", "-1"],
     "kproxy capture: error: argument --count: '-1' is not a whole number, 0 or more "
     "(see 'kproxy capture --help')"),
    (["capture", "node1", "--timeout", "0"],
     "kproxy capture: error: argument --timeout: '0' is not a number of seconds above 0 "
     "(see 'kproxy capture --help')"),
    (["packet-lab", "run", "clusterip-dnat", "--overlay", "geneve"],
     "kproxy packet-lab run: error: argument --overlay: invalid choice: 'geneve' (choose from 'vxlan', "
     "'host-gw', 'udp') (see 'kproxy packet-lab run --help')"),
])
def test_a_bad_argument_is_one_line_naming_it_and_exit_2(state_dir: Path, argv: list[str], error: str) -> None:
    assert run(*argv) == (2, "", error + "\n")
    assert not state_dir.exists()


def test_a_file_that_is_not_utf8_is_named_in_one_line(state_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(WEB.read_bytes() + "# café\n".encode("latin-1"))
    offset = len(WEB.read_bytes()) + len("# caf")
    said = f"{bad} is not UTF-8 text (byte 0xe9 at offset {offset})"
    assert run("render", "-f", str(bad)) == (1, "", f"kproxy: error: {said}\n")
    assert run("apply", "-f", str(bad), "--lab", MISSING) == (1, "", f"kproxy: error: {said}\n")
    assert run("lab", "up", "-f", str(bad)) == (1, "", f"kproxy: error: topology {said}\n")
    assert not state_dir.exists()


def test_an_unexpected_error_is_one_line_and_the_traceback_is_one_variable_away(
        state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(args: object) -> int:
        raise RuntimeError("the state went\nsideways")
    monkeypatch.setattr(cli, "cmd_lab_ls", broken)
    assert run("lab", "ls") == (1, "", "kproxy: error: RuntimeError: the state went; sideways "
                                       "(run again with KPROXY_DEBUG=1 for the traceback)\n")
    monkeypatch.setenv("KPROXY_DEBUG", "1")
    status, _, err = run("lab", "ls")
    assert status == 1 and err.startswith("Traceback") and err.endswith("RuntimeError: the state went\nsideways\n")


def closed_pipe_run(*argv: str) -> subprocess.CompletedProcess[str]:
    """The installed kproxy with stdout a pipe whose reader is already gone (as `| head` ends up)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([KPROXY, *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write)


@pytest.mark.parametrize("argv", [["render", "-f", str(WEB)], ["--help"], ["lab", "up", "--help"]])
def test_a_closed_stdout_ends_quietly_like_cat(argv: list[str]) -> None:
    done = closed_pipe_run(*argv)
    assert (done.returncode, done.stderr) == (141, "")  # 128 + SIGPIPE, as a shell shows for cat


# A lab that does not exist ----------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["get", "pods", "--lab", MISSING], ["get", "svc", "-A", "--lab", MISSING],
    ["scale", "deploy/web", "--replicas", "2", "--lab", MISSING],
    ["rollout", "restart", "deploy/web", "--lab", MISSING], ["apply", "-f", str(WEB), "--lab", MISSING],
    ["delete", "svc", "web", "--lab", MISSING], ["delete", "-f", str(WEB), "--lab", MISSING],
    ["rules", "node1", "--lab", MISSING], ["exec", "--lab", MISSING, "web-1", "--", "true"],
    ["lab", "status", MISSING], ["lab", "down", MISSING], ["lab", "add-node", "node4", "--lab", MISSING],
    ["lab", "remove-node", "node1", "--lab", MISSING], ["capture", "--lab", MISSING, "node1"],
    ["packet-lab", "check", "clusterip-dnat", "--lab", MISSING],
])
def test_a_lab_that_does_not_exist_is_an_error_and_nothing_is_created(state_dir: Path, argv: list[str]) -> None:
    status, out, err = run(*argv)
    assert (status, out) == (1, "")
    assert err.startswith(f"kproxy: error: lab {MISSING} does not exist (") and err.count("\n") == 1
    assert not state_dir.exists()


def test_without_a_lab_name_the_default_lab_must_exist_too(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPROXY_LAB", MISSING)
    status, _, err = run("get", "pods")
    assert status == 1 and err.startswith(f"kproxy: error: lab {MISSING} does not exist (")
    monkeypatch.setenv("KPROXY_LAB", "Bad/Name")
    status, _, err = run("get", "pods")
    assert status == 1 and err.startswith("kproxy: error: lab name 'Bad/Name' is not a valid name")
    assert not state_dir.exists()


@pytest.mark.kernel
def test_scale_on_a_missing_lab_creates_nothing_in_run_kproxy() -> None:
    done = kproxy("scale", "deploy/web", "--replicas", "2", "--lab", MISSING, check=False)
    assert done.returncode == 1 and f"lab {MISSING} does not exist" in done.stderr
    assert not Path("/run/kproxy", MISSING).exists() and not Path("/run/kproxy", f".{MISSING}.lock").exists()


@pytest.mark.kernel
def test_down_cleans_up_a_lab_directory_without_state(state_dir: Path) -> None:
    (state_dir / MISSING).mkdir(parents=True)  # as a crash right after creating it leaves it
    status, out, _ = run("lab", "ls")  # other tests' labs may be listed too
    assert status == 0 and f"{MISSING}\t(no state: leftovers, remove with 'kproxy lab down {MISSING}')" in out.splitlines()
    assert run("lab", "down", MISSING) == (0, f"lab {MISSING} is down (0 namespaces removed)\n", "")
    assert list(state_dir.iterdir()) == []
    status, _, err = run("lab", "down", MISSING)
    assert status == 1 and err.startswith(f"kproxy: error: lab {MISSING} does not exist (")


# The lab lock -----------------------------------------------------------------------------


def blocked_on_a_lock(pid: int) -> bool:
    """Whether pid waits for a flock, as the kernel tells in /proc/locks ("-> FLOCK ... pid ...")."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "->" in fields and "FLOCK" in fields and str(pid) in fields:
            return True
    return False


def taking_the_lock(lab: str, env: dict[str, str]) -> subprocess.Popen[str]:
    """Another process that takes the lab's lock, says whether the lock file exists, and lets go."""
    script = ("from kproxy.lab.lock import lab_lock, lock_path\n"
              f"with lab_lock({lab!r}): print(lock_path({lab!r}).exists(), flush=True)\n")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def test_the_lock_of_a_lab_that_is_not_there_goes_with_its_release(state_dir: Path) -> None:
    with lab_lock(MISSING):
        assert lock_path(MISSING).exists()
    assert list(state_dir.iterdir()) == []
    lab_dir(MISSING).mkdir()
    with lab_lock(MISSING):
        pass
    assert lock_path(MISSING).exists()  # the lab is there: its lock stays


def test_a_waiter_gets_the_lock_even_when_the_holder_removed_the_lab_and_its_lock(state_dir: Path) -> None:
    lab_dir(MISSING).mkdir(parents=True)
    child = None
    try:
        with lab_lock(MISSING):
            child = taking_the_lock(MISSING, {"KPROXY_STATE_DIR": str(state_dir)})
            wait_for("the other process waits for the lock", lambda: blocked_on_a_lock(child.pid))
            lab_dir(MISSING).rmdir()  # as down does, under the lock: releasing removes the lock file
        out, _ = child.communicate(timeout=60)
        assert (child.returncode, out) == (0, "True\n")  # it held the lock of the file now at the path
        assert list(state_dir.iterdir()) == []
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()


@pytest.mark.kernel
def test_lab_up_and_down_wait_for_the_labs_lock(tmp_path: Path) -> None:
    lab = unique_lab_name()
    topology = write_topology(tmp_path / "one.yaml", {"nodes": ["n1"], "pods": [{"name": "p1"}]})
    try:
        with lab_lock(lab):
            up = subprocess.Popen([KPROXY, "lab", "up", "--name", lab, "-f", str(topology)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for("lab up waits for the lock", lambda: blocked_on_a_lock(up.pid))
            assert not lab_dir(lab).exists() and not list(NETNS_DIR.glob(f"kp_{lab}_*"))
        out, err = up.communicate(timeout=120)
        assert up.returncode == 0, err
        assert out.startswith(f"lab {lab} is up (vxlan, iptables mode): 1 nodes, 3 pods")  # p1 and two coredns
        closed = closed_pipe_run("lab", "status", lab)
        assert (closed.returncode, closed.stderr) == (141, "")
        with lab_lock(lab):
            down = subprocess.Popen([KPROXY, "lab", "down", lab], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            wait_for("lab down waits for the lock", lambda: blocked_on_a_lock(down.pid))
            assert lab_dir(lab).exists()
        out, err = down.communicate(timeout=120)
        assert (down.returncode, out, err) == (0, f"lab {lab} is down (6 namespaces removed)\n", "")  # with the two coredns pods
        assert not lab_dir(lab).exists() and not lock_path(lab).exists()
    finally:
        kproxy("lab", "down", lab, check=False)


# The demo ---------------------------------------------------------------------------------


def test_the_demo_says_done_once_when_a_scene_runs_in_the_guest(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo, "scene", lambda mode: print(f"[{mode} scene]"))
    monkeypatch.setattr(guest, "in_guest", lambda: True)
    assert demo.main(["--mode", "ipvs"]) == 0  # what the guest runs
    console = capsys.readouterr().out

    class Finished:
        status, seconds = 0, 1.0
    Finished.console = console  # type: ignore[attr-defined]
    monkeypatch.setattr(guest, "in_guest", lambda: False)
    monkeypatch.setattr(kmod, "loadable", lambda modules: not modules)  # no IPVS here: iptables needs none
    monkeypatch.setattr(guest, "unavailable_reason", lambda: "")
    monkeypatch.setattr(guest, "run", lambda *args, **kwargs: Finished)
    assert demo.main(["--mode", "iptables", "--mode", "ipvs"]) == 0
    shown = capsys.readouterr().out
    assert "[iptables scene]" in shown and "[ipvs scene]" in shown
    assert shown.count("Done: every namespace") == 1
    assert shown.rstrip().endswith("Done: every namespace, link and process of the demo labs is gone.")
