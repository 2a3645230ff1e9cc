"""Fixtures: namespaces that always go away, and a guard on the root namespace."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.servicelab import lab  # noqa: F401 (one lab per proxy mode for every module that uses it)

NETNS_DIR = Path("/var/run/netns")
TEST_PREFIX = f"kpt{os.getpid() % 100000}"
_counter = itertools.count()


def _sh(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


def root_namespace_snapshot() -> dict[str, str]:
    """What a user of the machine would see of the root namespace's network."""
    snapshot = {
        "addr": _sh("ip", "-o", "addr", "show"),
        "route": _sh("ip", "route", "show", "table", "all"),
        "link": _sh("ip", "-o", "link", "show"),
    }
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        if shutil.which(tool):
            # Drop the "# Generated ... on <date>" lines, which change every call.
            snapshot[tool] = "\n".join(l for l in _sh(tool).splitlines() if not l.startswith("#"))
    if shutil.which("nft"):
        snapshot["nft"] = _sh("nft", "list", "ruleset")
    snapshot["netns"] = "\n".join(sorted(n for n in _sh("ip", "netns", "list").split("\n") if TEST_PREFIX not in n))
    return snapshot


def is_root() -> bool:
    return os.geteuid() == 0


def pytest_configure(config: pytest.Config) -> None:
    # The guest lane: ipvs tests run in a QEMU guest where this kernel has no IPVS (tests/guestlane.py).
    from tests import guestlane

    guestlane.configure(config)


def pytest_collection_finish(session: pytest.Session) -> None:
    # Kernel tests need root. Without it the run refuses to start instead of reporting them
    # as passed or skipped: a green run means every selected test ran.
    kernel = [item for item in session.items if "kernel" in item.keywords]
    if kernel and not is_root():
        pytest.exit(f"{len(kernel)} of the {len(session.items)} selected tests need root (they create network "
                    "namespaces): run 'sudo scripts/test', or select the others with -m 'not kernel'",
                    returncode=pytest.ExitCode.USAGE_ERROR)


@pytest.fixture(scope="session", autouse=True)
def root_namespace_unchanged(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails the session if anything of ours showed up in the root namespace."""
    if not is_root():
        yield
        return
    before = root_namespace_snapshot()
    yield
    after = root_namespace_snapshot()
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not changed, f"the root namespace changed during the tests: {changed}"


class Namespaces:
    """Creates uniquely named network namespaces; removes them all at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, role: str = "ns") -> str:
        name = f"{TEST_PREFIX}-{role}{next(_counter)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.names.append(name)
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        return str(NETNS_DIR / name)

    def remove_all(self) -> None:
        # Tests end the processes they start themselves; this only drops namespaces.
        for name in reversed(self.names):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        self.names.clear()


@pytest.fixture
def netns() -> Iterator[Callable[..., str]]:
    """netns("node") -> "/var/run/netns/kpt123-node0"; gone after the test."""
    spaces = Namespaces()
    try:
        yield spaces
    finally:
        spaces.remove_all()

