"""The userspace mode on one node: listeners in the proxy loop, portal rules in netfilter.

sync() opens/closes listeners and swaps endpoint lists in place (established
connections to endpoints that remain, or are only terminating, live on), then
writes the portal rules with one ``iptables-restore --noflush`` (our chains only,
skipped when the text is unchanged: an endpoint change alone touches no rule).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

from kproxy.fdlimit import raise_fd_limit
from kproxy.proxy.kernel import RestoreError
from kproxy.proxy.netfilter import Jump
from kproxy.proxy.tables import Backend, Commands, missing_jumps, remove_chains
from kproxy.proxy.types import NodeInfo, ProxyState, SyncResult
from kproxy.proxy.userspace.listener import ServiceProxy
from kproxy.proxy.userspace.loop import ProxyLoop
from kproxy.proxy.userspace.rules import JUMPS, Ruleset, is_own_chain, render
from kproxy.proxy.userspace.status import Row, StatusServer, live_rules
from kproxy.proxy.userspace.udp import UDP_IDLE_TIMEOUT

COPY_MODES = ("splice", "copy")
DEFAULT_COPY = "splice"


class RuleWriter:
    """Keeps our chains in the kernel equal to the last Ruleset, with as few restores as it can.

    The first write after start, cleanup or a failed restore is full: it also adds the jumps
    from the built-in chains that are missing (someone may have flushed them). Later writes
    restore only when the text differs from the one the kernel took last."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.applied = ""  # the text (without jumps) the kernel took last
        self.last_restore = ""  # the input of the last restore attempted (for tests and debugging)
        self.need_full = True

    def write(self, desired: Ruleset) -> bool:
        """Bring the kernel to desired; whether this was a full write."""
        full = self.need_full
        text = desired.text(self._missing_jumps() if full else ())
        if full or text != self.applied:
            self.last_restore = text
            try:
                self.backend.restore(text)
            except RestoreError:
                self.need_full = True
                raise
            self.applied = desired.text()
            self.need_full = False
        return full

    def remove(self) -> None:
        """Delete, in one restore, our chains and every jump into them."""
        remove_chains(self.backend, is_own_chain)
        self.applied = ""
        self.need_full = True

    def _missing_jumps(self) -> list[Jump]:
        return missing_jumps(self.backend, JUMPS)


class UserspaceProxier:
    """The userspace mode on the node whose network namespace the calling thread is in (the agent's)."""

    def __init__(self, node: NodeInfo, *, copy: str = DEFAULT_COPY, udp_timeout: float = UDP_IDLE_TIMEOUT,
                 backend: Backend | None = None) -> None:
        self.node = node
        self.copy = copy
        raise_fd_limit()  # a listener per service port
        if self.copy not in COPY_MODES:
            raise ValueError(f"copy must be one of {', '.join(COPY_MODES)}, not {self.copy!r}")
        if self.copy == "splice" and not hasattr(os, "splice"):
            self.copy = "copy"
        self.udp_timeout = udp_timeout
        self.backend = backend or Commands("userspace")
        self.rules = RuleWriter(self.backend)
        self.loop: ProxyLoop | None = None
        self.proxies: dict[str, ServiceProxy] = {}  # ServicePort.key -> its listener
        self.status: StatusServer | None = None

    def _ensure_loop(self) -> ProxyLoop:
        if self.loop is None or not self.loop.thread.is_alive():
            loop = self.loop = ProxyLoop()
            self.status = loop.call(lambda: StatusServer(loop, self.table))
        return self.loop

    # sync ----------------------------------------------------------------------------

    def sync(self, state: ProxyState) -> SyncResult:
        started = time.monotonic()
        loop = self._ensure_loop()
        changed: int = loop.call(lambda: self._sync_listeners(loop, state))
        full = self.rules.write(render(state, self.node, self.proxy_ports()))
        return SyncResult(full=full, changed_services=changed, seconds=time.monotonic() - started)

    def proxy_ports(self) -> dict[str, int | str]:
        """ServicePort.key -> the port its listener got from the kernel."""
        return {key: proxy.port for key, proxy in self.proxies.items()}

    def _sync_listeners(self, loop: ProxyLoop, state: ProxyState) -> int:
        """In the loop: open, close and update listeners; how many service ports that changed."""
        changed = 0
        wanted = {svc.key: svc for svc in state.services}
        refuse_past_capacity(len(wanted))
        for key in [k for k in self.proxies if k not in wanted]:
            self.proxies.pop(key).close()
            changed += 1
        for key, svc in wanted.items():
            proxy = self.proxies.get(key)
            opened = proxy is None
            if proxy is None:
                proxy = self.proxies[key] = ServiceProxy(loop, svc, self.copy, self.udp_timeout)
            updated = proxy.update(svc, state.endpoints_of(svc))
            proxy.balancer.expire()
            changed += int(opened or updated)
        return changed

    # cleanup ---------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Close every listener and connection, then remove our jumps and chains in one restore."""
        if self.loop is not None and self.loop.thread.is_alive():
            self.loop.call(self._close_listeners)
            self.loop.stop()
        self.proxies = {}
        self.loop = None
        self.status = None
        self.rules.remove()

    def _close_listeners(self) -> None:
        for proxy in self.proxies.values():
            proxy.close()
        if self.status is not None:
            self.status.close()

    def close(self) -> None:
        """Stop serving: every listener and connection closes with the loop (the rules stay)."""
        if self.loop is not None and self.loop.thread.is_alive():
            self.loop.stop()
        self.loop = None

    # looking ---------------------------------------------------------------------------

    def table(self) -> list[Row]:
        """The listener table, one row per service port in key order (call in the loop)."""
        return [self.proxies[k].snapshot() for k in sorted(self.proxies)]

    def rules_excerpt(self, service: str | None = None) -> str:
        table = self.loop.call(self.table) if self.loop is not None else None
        return live_rules(service, table, self.backend)


FD_RESERVE = 256  # for the proxied connections, the status socket, the agent's files


def listener_capacity() -> tuple[int, int, int]:
    """How many listeners this node can open (each binds a port of the ephemeral range and holds an
    open file), and the two limits: open files, ephemeral ports."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = high - low + 1
    return min(files - FD_RESERVE, ports), files, ports


def refuse_past_capacity(wanted: int) -> None:
    """A sync that would run out of files or ports half-way is refused whole, before it opens one."""
    capacity, files, ports = listener_capacity()
    if wanted > capacity:
        raise RuntimeError(f"{wanted} service ports need {wanted} listeners, more than this node can open "
                           f"({capacity}: open-file limit {files} less {FD_RESERVE} kept free, "
                           f"{ports} ephemeral ports)")
