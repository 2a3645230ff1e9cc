"""Network namespaces by path, entered per thread, and netlink sockets in them.

setns(2) moves only the calling thread, and a socket stays in the namespace it
was created in: so a netlink socket for any namespace costs one setns there
and one back, instead of the helper process pyroute2 forks for IPRoute(netns=).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from pyroute2 import IPRoute
from pyroute2 import netns as _pyroute2_netns

from cni.errors import UNKNOWN_CONTAINER, CNIError


def open_ns(path: str) -> int:
    """An fd on the namespace at path; CNIError code 3 when it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CNIError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except PermissionError as exc:
        raise CNIError(UNKNOWN_CONTAINER, f"cannot open network namespace {path}", str(exc)) from None
    return fd


@contextmanager
def entered(path: str | None) -> Iterator[None]:
    """Run the body with this thread in the namespace at path (None: stay)."""
    if path is None:
        yield
        return
    target = open_ns(path)
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _pyroute2_netns.setns(target)
        try:
            yield
        finally:
            _pyroute2_netns.setns(home)
    finally:
        os.close(target)
        os.close(home)


def iproute_in(path: str | None) -> IPRoute:
    """A netlink socket bound to the namespace at path (None: the current one)."""
    with entered(path):
        return IPRoute()


def write_sysctl(path: str | None, key: str, value: str) -> None:
    """Set a net.* sysctl inside the namespace at path, e.g. key 'net/ipv4/ip_forward'."""
    with entered(path):
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)


def nsenter_prefix(path: str | None) -> list[str]:
    """argv prefix that runs a command inside the namespace at path."""
    return [] if path is None else ["nsenter", f"--net={path}", "--"]
