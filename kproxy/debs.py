"""Debian packages the project needs only now and then (a guest's kernel, etcd), downloaded with
`apt-get download` and unpacked into a cache: never installed, so nothing starts at boot, no
service runs in the machine's own namespace, and removing the cache removes them."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

from kproxy.errors import KproxyError

RETRY_PAUSES = (2.0, 10.0)  # seconds before the second and the third attempt


def unpacked(packages: list[str], cache: Path, log: Callable[[str], None]) -> Path:
    """The packages' files under cache/root (fresh: unpacked again each call); each .deb is
    downloaded into cache/debs once. Raises KproxyError naming the package apt-get could not get."""
    debs = cache / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    root = cache / "root"
    if root.exists():
        shutil.rmtree(root)
    for package in packages:
        if not list(debs.glob(f"{package}_*.deb")):
            log(f"downloading {package} (not installed: unpacked into {cache})")
            _download(package, debs)
        deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def _download(package: str, into: Path) -> None:
    """apt-get download, tried again after a pause or two: a mirror or resolver that fails for a
    moment (seen: "Temporary failure resolving") should not fail a lab."""
    for pause in (*RETRY_PAUSES, None):
        done = subprocess.run(["apt-get", "download", package], cwd=into, capture_output=True, text=True)
        if done.returncode == 0:
            return
        if pause is None:
            raise KproxyError(f"apt-get download {package} failed: {done.stderr.strip() or 'no reason given'}")
        time.sleep(pause)
