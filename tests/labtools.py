"""Driving labs through the real `kproxy` command, and cleaning them up."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from kproxy.lab.probe import parse_answer, probe_tcp
from kproxy.lab.state import ns_path
from tests.runtime import VENV_BIN

KPROXY = str(VENV_BIN / "kproxy")
_labs = itertools.count()


def kproxy(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # Generous: a `lab up` with cluster DNS in the emulated (TCG) guest takes over 100 s on a loaded machine.
    done = subprocess.run([KPROXY, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})})
    if check and done.returncode != 0:
        raise AssertionError(f"kproxy {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def unique_lab_name() -> str:
    return f"t{os.getpid() % 100000}x{next(_labs)}"


def status(name: str) -> dict[str, Any]:
    return json.loads(kproxy("lab", "status", name, "-o", "json").stdout)


def write_topology(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@contextmanager
def running_lab(*up_args: str, name: str | None = None, dns: bool = False) -> Iterator[str]:
    """A lab brought up with `kproxy lab up`; always `down` afterwards. Without cluster DNS unless
    asked: the suites about DNS ask (tests/servicelab.py, tests/test_services_dns.py, the fresh-kernel tests
    bring up the default lab), the others need no two extra pods per lab in their counts and time."""
    name = name or unique_lab_name()
    try:
        kproxy("lab", "up", "--name", name, *up_args, *(() if dns else ("--no-dns",)))
        yield name
    finally:
        kproxy("lab", "down", name, check=False)


def pod_ip(info: dict[str, Any], pod: str) -> str:
    return next(p["ip"] for p in info["pods"] if p["name"] == pod)


def node_ip(info: dict[str, Any], node: str) -> str:
    return next(n["ip"] for n in info["nodes"] if n["name"] == node)


class Lab:
    """A running lab seen as a user sees it: its pods, Services and answers."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.refresh()

    def refresh(self) -> None:
        self.info = status(self.name)
        self.services = {s["metadata"]["name"]: s for s in
                         json.loads(kproxy("get", "svc", "--lab", self.name, "-o", "json").stdout)["items"]}

    def ip(self, service: str) -> str:
        return str(self.services[service]["spec"]["clusterIP"])

    def node_port(self, service: str) -> int:
        return int(self.services[service]["spec"]["ports"][0]["nodePort"])

    def ns(self, member: str) -> str:
        return ns_path(self.name, member)

    def ask(self, member: str, ip: str, port: int, timeout: float = 3) -> dict[str, str]:
        return parse_answer(probe_tcp(self.ns(member), ip, port, timeout=timeout))

    def pods(self, selector: str, namespace: str = "default") -> list[dict[str, Any]]:
        return json.loads(kproxy("get", "pods", "--lab", self.name, "-n", namespace, "-l", selector,
                                 "-o", "json").stdout)["items"]


@contextmanager
def asking_meanwhile(ask: Callable[[], dict[str, str]]) -> Iterator[tuple[list[dict[str, str]], list[str]]]:
    """ask() again and again from a thread while the block runs (a client loop during a rollout):
    yields the answers and the errors, both filled once the block is done."""
    stop = threading.Event()
    answers: list[dict[str, str]] = []
    errors: list[str] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                answers.append(ask())
            except OSError as exc:
                errors.append(repr(exc))

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield answers, errors
    finally:
        stop.set()
        thread.join()
