"""Open-file limits for processes that hold a socket per pod or per service port."""

from __future__ import annotations

import resource


def raise_fd_limit() -> None:
    """The soft RLIMIT_NOFILE up to the hard one (a shell's default soft limit is often 1024): the
    workload serves hundreds of pods, and the userspace proxy opens a listener per service port, as
    kube-proxy's userspace mode raised its own limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))
        except (ValueError, OSError):
            pass
