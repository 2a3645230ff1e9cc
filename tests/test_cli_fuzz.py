"""Random command lines and random files against the CLI: whatever comes in, the answer is
an exit status, at most one line on stderr, never a traceback, and nothing left on the machine.

Argument vectors are drawn from the real parser's commands and options plus junk; files are
random bytes, random YAML, or the shipped manifests and topology with random mutations.
Most examples call main() in the test process, with the lab state in a fresh directory
(KPROXY_STATE_DIR) that must stay empty and every lab named absent; a few run the installed
command for real, as root and as nobody, against /run/kproxy itself. Deterministic
(derandomize), so CI sees the same examples every run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import string
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kproxy import cli, packetcli
from kproxy.lab.state import existing_labs, lab_namespaces
from tests.labtools import KPROXY

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((REPO / "examples" / "services").glob("*.yaml"))
TOPOLOGY = REPO / "examples" / "lab.yaml"
MISSING_LABS = [f"fz{os.getpid() % 100000}-{i}" for i in range(3)]  # no lab of anyone's has these names
FILE = "\0file"  # stands for the example's file in a drawn argv
QUIET_SUCCESS = {cli.cmd_render, cli.cmd_lab_ls, cli.cmd_modes, packetcli.cmd_packet_lab_list}  # may succeed with no lab
# These bring up labs of their own (a valid topology, a lab's name, a benchmark): drawn, they run as a user, who
# is refused. As root a drawn `bench` would benchmark for real, far past any test's time.
BUILDS_LABS = {cli.cmd_lab_up, cli.cmd_bench, packetcli.cmd_packet_lab_run}
# What render takes beyond the shipped manifests: an EndpointSlice, and a Pod with its status.
RENDER_DOCS = [
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "db"},
     "spec": {"ports": [{"name": "sql", "port": 5432, "targetPort": "sql"}], "clusterIP": "10.96.0.20"}},
    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
     "metadata": {"name": "db-1", "namespace": "default", "labels": {"kubernetes.io/service-name": "db"}},
     "endpoints": [{"addresses": ["10.244.1.7"], "conditions": {"ready": True, "serving": True}, "nodeName": "node1"}],
     "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]},
    {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
     "spec": {"type": "NodePort", "selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}},
    {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "labels": {"app": "web"}},
     "spec": {"nodeName": "node2", "containers": [{"name": "web", "ports": [{"containerPort": 8080}]}]},
     "status": {"podIP": "10.244.2.5", "conditions": [{"type": "Ready", "status": "True"}]}},
]

FAST = settings(derandomize=True, database=None, deadline=None, max_examples=400,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Commands and options, from the parser itself ------------------------------------------


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from leaf_parsers(sub, (*path, name))


COMMANDS = list(leaf_parsers(cli.build_parser()))

junk = st.text(alphabet=string.printable + "äß\u00a0\u202e", max_size=12)
values = st.one_of(
    st.sampled_from([*MISSING_LABS, "web", "node1", "deploy/web", "deploy/", "svc", "pods", "deploy", "nodes",
                     "-1", "0", "3", "1e3", "999.1.1.1", "10.0.0.1", "10.0.0.0/8", "10.0.0.1/8", "::1",
                     "a=b", "=b", "a b=c", "web:80", "default/web", "", "-", "--", "--help", FILE, FILE,
                     "/nonexistent", "/", "..", "UPPER", "x" * 300]),
    junk,
)


# Plausible values by argument (dest), so that most command lines get past parsing.
PLAUSIBLE = {
    "lab": MISSING_LABS, "name": [*MISSING_LABS, "web"], "ref": ["deploy/web"], "names": ["web", "web-1"],
    "kind": ["svc", "pods", "nodes", "deploy", "endpoints"], "node": ["node1", "node4"],
    "target": ["web-1", "node1", "external"], "file": [FILE], "replicas": ["0", "2"],
    "namespace": ["default", "kube-system"], "selector": ["app=web", "app in (a,b)", "!app"],
    "node_ip": ["172.18.0.9"], "cluster_cidr": ["10.244.0.0/16"], "label": ["zone=a"],
    "service": ["web", "web:80", "default/web"], "command": ["true"],
}


def value_for(action: argparse.Action) -> st.SearchStrategy[str]:
    plausible = sorted(action.choices) if action.choices else PLAUSIBLE.get(action.dest, [])
    return st.one_of(st.sampled_from(plausible), values) if plausible else values


@st.composite
def command_lines(draw: st.DrawFn) -> list[str]:
    """A command, mostly with its positionals and required options, then a few extra or junk tokens."""
    path, parser = draw(st.sampled_from(COMMANDS + [((), cli.build_parser())]))
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    positionals = [a for a in actions if not a.option_strings]
    options = [a for a in actions if a.option_strings]
    argv = list(path)
    well_formed = draw(st.integers(0, 3)) > 0
    for action in positionals if well_formed else ():
        counts: dict[object, int] = {None: 1, "?": draw(st.integers(0, 1)), "*": draw(st.integers(0, 2))}
        count = counts.get(action.nargs, 2)
        if action.nargs == argparse.REMAINDER:
            argv.append("--")
        argv += [draw(value_for(action)) for _ in range(count)]

    def option(action: argparse.Action) -> list[str]:
        flag = draw(st.sampled_from(action.option_strings))
        return [flag] if action.nargs == 0 else [flag, draw(value_for(action))]
    for action in options:
        if (action.required and well_formed) or draw(st.integers(0, 3)) == 0:
            argv += option(action)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        kind = draw(st.integers(0, 2))
        argv += option(draw(st.sampled_from(options))) if kind == 0 and options else [
            draw(junk if kind == 1 else values)]
    return argv


# Files -----------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20),
                    st.sampled_from(["Service", "Pod", "Deployment", "List", "EndpointSlice", "v1", "apps/v1",
                                     "discovery.k8s.io/v1", "web", "TCP", "NodePort", "10.244.1.5", "8080"]))
trees = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                      st.dictionaries(st.one_of(st.text(max_size=10), scalars),
                                                                      inner, max_size=4)), max_leaves=25)


@st.composite
def mutated(draw: st.DrawFn, docs: list[Any]) -> Any:
    """docs with a few random edits somewhere inside: a value replaced, a key dropped, a list emptied..."""
    docs = copy.deepcopy(docs)
    for _ in range(draw(st.integers(1, 4))):
        places: list[tuple[Any, Any]] = []

        def walk(node: Any) -> None:
            for key, child in (node.items() if isinstance(node, dict) else enumerate(node)):
                places.append((node, key))
                if isinstance(child, (dict, list)):
                    walk(child)
        walk(docs)
        parent, key = draw(st.sampled_from(places))
        edit = draw(st.sampled_from(["replace", "drop", "wrap", "empty"]))
        if edit == "replace":
            parent[key] = draw(trees)
        elif edit == "drop":
            del parent[key]
        elif edit == "wrap":
            parent[key] = [parent[key]]
        else:
            parent[key] = type(parent[key])() if isinstance(parent[key], (dict, list, str)) else None
        if not docs:
            break
    return docs


def _docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _dump(docs: Any) -> bytes:
    if isinstance(docs, list):
        return yaml.safe_dump_all(docs, allow_unicode=True).encode()
    return yaml.safe_dump(docs, allow_unicode=True).encode()


file_contents = st.one_of(
    st.binary(max_size=200),
    trees.map(_dump),
    st.sampled_from(MANIFESTS).flatmap(lambda p: mutated(_docs(p))).map(_dump),
    mutated(RENDER_DOCS).map(_dump),
    st.just(_dump(RENDER_DOCS)),
    mutated([yaml.safe_load(TOPOLOGY.read_text())]).map(lambda d: _dump(d[0] if d else {})),
    st.sampled_from([*MANIFESTS, TOPOLOGY]).map(lambda p: p.read_bytes()),
    st.sampled_from(MANIFESTS).map(lambda p: p.read_bytes() + b"\n\xff\xfe"),
)


# Running ---------------------------------------------------------------------------------


def parsed_command(argv: list[str]) -> Any:
    """The function argv runs, or None when it does not parse."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            return cli.build_parser().parse_args(argv).func
        except SystemExit:
            return None


def run_in_process(argv: list[str], stdin: bytes, root: bool) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    fake_stdin = io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")
    euid = os.geteuid() if root else 65534
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            mock.patch.object(sys, "stdin", fake_stdin), mock.patch("os.geteuid", return_value=euid):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue()


def others_labs() -> set[str]:
    """Labs on this machine (other tests' too) in the real state directory: never named by an example."""
    with mock.patch.dict(os.environ, {"KPROXY_STATE_DIR": "/run/kproxy"}):
        return set(existing_labs())


def check_answer(argv: list[str], status: int, out: str, err: str) -> None:
    assert "Traceback" not in err and "Traceback" not in out, (argv, err)
    assert "KPROXY_DEBUG" not in err, f"an unexpected error for {argv}: {err}"
    if status == 0:
        assert err == "", (argv, err)
        assert out.startswith("usage:") or parsed_command(argv) in QUIET_SUCCESS, (argv, out)
    else:
        assert status in (1, 2), (argv, status, err)
        assert err.count("\n") == 1 and err.endswith("\n"), f"not one line for {argv}: {err!r}"
        assert err.startswith("kproxy") and " error: " in err, (argv, err)


def check_nothing_left(state_dir: Path) -> None:
    assert list(state_dir.iterdir()) == []
    for lab in MISSING_LABS:
        assert lab_namespaces(lab) == []


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A state root of our own and a missing default lab: no example can reach a real lab."""
    directory = tmp_path_factory.mktemp("state")
    with mock.patch.dict(os.environ, {"KPROXY_STATE_DIR": str(directory), "KPROXY_LAB": MISSING_LABS[0]}):
        yield directory


@FAST
@given(argv=command_lines(), content=file_contents, stdin=file_contents, root=st.booleans())
def test_any_command_line_is_answered_in_one_line_and_leaves_nothing(
        state_dir: Path, tmp_path_factory: pytest.TempPathFactory, argv: list[str], content: bytes,
        stdin: bytes, root: bool) -> None:
    assume(not set(argv) & others_labs())
    file = tmp_path_factory.mktemp("in") / "input.yaml"
    file.write_bytes(content)
    argv = [str(file) if token == FILE else token for token in argv]
    if parsed_command(argv) in BUILDS_LABS:
        root = False
    status, out, err = run_in_process(argv, stdin, root)
    check_answer(argv, status, out, err)
    check_nothing_left(state_dir)


@FAST
@given(content=file_contents, command=st.sampled_from([
    ["render", "-f", FILE], ["render", "--mode", "ipvs", "-f", FILE], ["render", "--mode", "userspace", "-f", FILE],
    ["apply", "-f", FILE], ["delete", "-f", FILE], ["lab", "up", "-f", FILE], ["render", "-f", "-"]]))
def test_any_file_is_answered_in_one_line_and_leaves_nothing(
        state_dir: Path, tmp_path_factory: pytest.TempPathFactory, content: bytes, command: list[str]) -> None:
    file = tmp_path_factory.mktemp("in") / "input.yaml"
    file.write_bytes(content)
    argv = [str(file) if token == FILE else token for token in command]
    status, out, err = run_in_process(argv, content, root=argv[:2] != ["lab", "up"])
    check_answer(argv, status, out, err)
    check_nothing_left(state_dir)


# The installed command, for real --------------------------------------------------------


def run_installed(argv: list[str], as_nobody: bool) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if as_nobody else []
    env = {k: v for k, v in os.environ.items() if k not in ("KPROXY_STATE_DIR", "KPROXY_LAB")}
    return subprocess.run([*prefix, KPROXY, *argv], capture_output=True, text=True, timeout=60,
                          env={**env, "KPROXY_LAB": MISSING_LABS[1]}, stdin=subprocess.DEVNULL)


def real_traces(labs: list[str]) -> list[str]:
    root = Path("/run/kproxy")
    found = [str(p) for lab in labs for p in (root / lab, root / f".{lab}.lock") if p.exists()]
    return found + [ns for lab in labs for ns in lab_namespaces(lab)]


@pytest.mark.kernel
@settings(derandomize=True, database=None, deadline=None, max_examples=12,
          suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines(), as_nobody=st.booleans())
def test_the_installed_command_answers_in_one_line_as_root_and_as_a_user(
        tmp_path_factory: pytest.TempPathFactory, argv: list[str], as_nobody: bool) -> None:
    assume(not set(argv) & others_labs())
    folder = tmp_path_factory.mktemp("in")
    folder.chmod(0o755)  # readable by nobody
    file = folder / "input.yaml"
    file.write_bytes(MANIFESTS[0].read_bytes())
    file.chmod(0o644)
    argv = [str(file) if token == FILE else token for token in argv]
    if parsed_command(argv) in BUILDS_LABS:
        as_nobody = True
    done = run_installed(argv, as_nobody)
    check_answer(argv, done.returncode, done.stdout, done.stderr)
    assert real_traces(MISSING_LABS) == []
