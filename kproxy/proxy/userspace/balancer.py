"""Choosing an endpoint for a new connection: the old proxier's LoadBalancerRR, in our words."""

from __future__ import annotations

import time
from typing import Callable


class Balancer:
    """Round robin with optional ClientIP affinity, for one service port.

    Affinity lasts affinity_seconds from its last use (every use refreshes it); a
    failed dial resets it, so the client's next try goes on round robin."""

    def __init__(self, affinity_seconds: int = 0, clock: Callable[[], float] = time.monotonic) -> None:
        self.affinity_seconds = affinity_seconds
        self.clock = clock
        self.endpoints: list[str] = []
        self.index = 0
        self.sticky: dict[str, tuple[str, float]] = {}  # client IP -> (its endpoint, last used)

    def update(self, endpoints: list[str]) -> None:
        if endpoints == self.endpoints:
            return
        self.endpoints = list(endpoints)
        self.index = 0  # as upstream: a new list starts over
        valid = set(endpoints)
        self.sticky = {ip: s for ip, s in self.sticky.items() if s[0] in valid}

    def set_affinity(self, seconds: int) -> None:
        if seconds != self.affinity_seconds:
            self.affinity_seconds = seconds
            self.sticky = {}

    def next(self, client_ip: str, reset: bool = False) -> str | None:
        """The endpoint for a new connection from client_ip; reset: the sticky one just failed."""
        if not self.endpoints:
            return None
        now = self.clock()
        if self.affinity_seconds and not reset:
            s = self.sticky.get(client_ip)
            if s is not None and now - s[1] < self.affinity_seconds:
                self.sticky[client_ip] = (s[0], now)
                return s[0]
        endpoint = self.endpoints[self.index % len(self.endpoints)]
        self.index = (self.index + 1) % len(self.endpoints)
        if self.affinity_seconds:
            self.sticky[client_ip] = (endpoint, now)
        return endpoint

    def expire(self) -> None:
        """Forget the affinities whose timeout has passed."""
        if self.affinity_seconds:
            now = self.clock()
            self.sticky = {ip: s for ip, s in self.sticky.items() if now - s[1] < self.affinity_seconds}


def split_address(address: str) -> tuple[str, int]:
    """An endpoint as the balancer hands it out, "ip:port", as a socket address."""
    ip, port = address.rsplit(":", 1)
    return ip, int(port)
