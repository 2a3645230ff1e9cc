"""The benchmark's own labs: refused where a lab of that name exists, brought up side by side,
and taken down again however the run ends."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from kproxy.errors import KproxyError
from kproxy.lab.state import lab_exists

KPROXY = str(Path(sys.executable).parent / "kproxy")


def refuse_existing(names: list[str]) -> None:
    for name in names:
        if lab_exists(name):
            raise KproxyError(f"a lab named {name} exists; the benchmark makes its own (kproxy lab down {name})")


def up_all(topology: dict[str, Any], labs: dict[str, list[str]], downs: ExitStack) -> None:
    """`kproxy lab up` of every lab (name -> its extra arguments) at once, each with `--no-dns`;
    downs takes each down when it closes. Setup only: nothing is measured meanwhile."""
    refuse_existing(list(labs))
    with tempfile.TemporaryDirectory(prefix="kproxy-bench-") as tmp:
        path = Path(tmp) / "lab.yaml"
        path.write_text(yaml.safe_dump(topology))
        starting = {}
        for name, extra in labs.items():
            downs.callback(subprocess.run, [KPROXY, "lab", "down", name], capture_output=True)
            starting[name] = subprocess.Popen([KPROXY, "lab", "up", "-f", str(path), "--name", name, "--no-dns",
                                               *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        failed = [f"{name}: {proc.communicate()[1].strip()}" for name, proc in starting.items() if proc.wait() != 0]
    if failed:
        raise KproxyError(f"kproxy lab up failed: {'; '.join(failed)}")
