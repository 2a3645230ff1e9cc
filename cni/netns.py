"""Network namespaces by path, entered per thread, and netlink sockets in them.

setns(2) moves only the calling thread, and a socket stays in the namespace it
was created in: enter, create the socket, come back, and the socket keeps
living in the namespace. A netlink socket for any namespace thus costs one
setns there and one back, instead of the helper process pyroute2 forks for
IPRoute(netns=...). setns is called through ctypes so that long-running light
processes (the pod workload) need not import pyroute2 (~20 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from cni.errors import UNKNOWN_CONTAINER, CNIError

if TYPE_CHECKING:
    from pyroute2.iproute.linux import IPRoute

CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
_libc.setns.restype = ctypes.c_int


class NamespaceMissing(OSError):
    """The path does not name a network namespace (not created yet, or gone)."""


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at fd."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def unshare_net() -> None:
    """Move the calling thread into a new, empty network namespace of its own."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def ns_identity(path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the namespace at path: changes when it is recreated."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise NamespaceMissing(2, f"network namespace {path} does not exist") from None
    return st.st_dev, st.st_ino


@contextmanager
def entered(path: str | None) -> Iterator[None]:
    """Run the body with this thread in the namespace at path (None: stay).

    Raises NamespaceMissing if path is not a network namespace. The thread is
    always moved back, also when the body raises.
    """
    if path is None:
        yield
        return
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise NamespaceMissing(2, f"network namespace {path} does not exist") from None
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                setns(target)
            except OSError as exc:
                # EINVAL: a file that is not (or no longer) a mounted namespace,
                # e.g. what a failed `ip netns add` leaves behind.
                raise NamespaceMissing(exc.errno, f"{path} is not a network namespace: {exc.strerror}") from None
            try:
                yield
            finally:
                setns(home)
        finally:
            os.close(home)
    finally:
        os.close(target)


def open_ns(path: str) -> int:
    """An fd on the namespace at path; CNIError code 3 when it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise CNIError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except PermissionError as exc:
        raise CNIError(UNKNOWN_CONTAINER, f"cannot open network namespace {path}", str(exc)) from None


def iproute_in(path: str | None) -> IPRoute:
    """A netlink socket bound to the namespace at path (None: the current one)."""
    from pyroute2.iproute.linux import IPRoute

    try:
        with entered(path):
            return IPRoute()
    except NamespaceMissing as exc:
        raise CNIError(UNKNOWN_CONTAINER, str(exc.strerror)) from None


def write_sysctl(path: str | None, key: str, value: str) -> None:
    """Set a net.* sysctl inside the namespace at path, e.g. key 'net/ipv4/ip_forward'."""
    with entered(path):
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)


def nsenter_prefix(path: str | None) -> list[str]:
    """argv prefix that runs a command inside the namespace at path."""
    return [] if path is None else ["nsenter", f"--net={path}", "--"]
