"""scripts/bench-store as a user runs it, on a tiny size: both stores measured, nothing left behind.
No timing is asserted (the figures are in docs/store.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kproxy.lab.state import existing_labs

pytestmark = pytest.mark.kernel


def test_both_stores_are_measured_and_their_labs_go(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "kproxy.bench.store", "--services", "10", "--changes", "2",
                           "--json", str(tmp_path / "store.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads((tmp_path / "store.json").read_text())
    assert (doc["services"], doc["changes"], list(doc["stores"])) == (10, 2, ["file", "etcd"])
    for got in doc["stores"].values():
        assert got["load_s"] > 0 and got["programming"]["p50_ms"] > 0 and got["watch"]["p50_ms"] > 0
    assert done.stdout.splitlines()[0] == "10 Services stored, 2 changes each"
    assert not [lab for lab in existing_labs() if lab.startswith("bench-store-")]
