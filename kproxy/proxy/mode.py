"""What a proxy mode is to the rest of kproxy: one Mode object, exported by its package.

The registry (kproxy.proxy) maps names to the packages; everything else (cli,
lab, agent, demo, bench) asks a Mode, never compares a mode's name. A mode's
options travel as opaque ``name=value`` strings (``kproxy lab up --mode-opt
scheduler=sh``) until the mode itself reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping, NamedTuple, Protocol

from kproxy.errors import KproxyError
from kproxy import kmod
from kproxy.kmod import Module
from kproxy.proxy.source import service_ports
from kproxy.proxy.types import NodeInfo, ProxyState, ServicePort, SyncResult

Options = Mapping[str, str]  # a mode's options, checked and with its defaults filled (Mode.options_of)
Service = Mapping[str, Any]  # a Service as the store holds it


class Proxier(Protocol):
    """One mode on one node. Runs inside its node's network namespace (the agent's)."""

    def sync(self, state: ProxyState) -> SyncResult:
        """Make the kernel match state (atomically where the kernel allows)."""
        ...

    def cleanup(self) -> None:
        """Remove every trace of this mode from the node."""
        ...

    def close(self) -> None:
        """Let go of what the proxier holds open (sockets, threads); the kernel state stays."""
        ...

    def rules_excerpt(self, service: str | None = None) -> str:
        """The node's live rules of one service ("ns/name" or "ns/name:port") or all, with counters."""
        ...


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    default: str
    choices: tuple[str, ...]


class Remembered(NamedTuple):
    """One client a node remembers for ClientIP session affinity, as the kernel shows it."""

    client: str  # the client's IP
    endpoint: str  # "ip:port", the endpoint the client's new connections go to
    detail: str  # the record as its tool prints it, for the learner
    hits: int | None  # connections counted (a recent list's timestamps); None when the record counts time
    seconds_left: int | None  # until the record expires; None when it keeps hits instead
    timeout: int | None  # the record's own timeout, where the kernel stores one (an nftables set's)


# Runs argv inside one node's network namespace; its stdout.
NodeCommand = Callable[..., str]


@dataclass(frozen=True)
class Affinity:
    """Where a mode keeps ClientIP session affinity in the kernel (for packet lab 7)."""

    where: str  # where to look, one line
    how: str  # how the rules use it, a few sentences
    # Every client the node (run) remembers, for every service with affinity.
    read: Callable[[NodeCommand], list[Remembered]]


@dataclass(frozen=True)
class Probe:
    """The one flow `kproxy trace` sends: what a node's trace rules match."""

    protocol: str  # "tcp" or "udp"
    port: int  # the probe's own source port, unique to the trace: its packets carry it as sport or dport

    @property
    def name(self) -> str:
        """What the trace's tables and chains are called: two traces at once keep apart."""
        return f"kproxy-trace-{self.port}"

    @property
    def comment(self) -> str:
        """The comment on the trace's rules."""
        return f"kproxy trace {self.port}"


class Tracer(Protocol):
    """Which rules one node's packets of a probe met. Runs from outside the node: it enters the
    node's namespace (given when it is made) for each command."""

    def arm(self, probe: Probe) -> None:
        """Start listening, then match the probe's packets; returns once the listener is sure to see them."""
        ...

    def read(self) -> list[str]:
        """Stop listening; what the probe's packets met, one line each, in order."""
        ...

    def disarm(self) -> None:
        """Remove what arm added (and what an interrupted trace left); safe twice and after a failed arm."""
        ...


@dataclass(frozen=True)
class Mode:
    name: str
    summary: str  # one line, for `kproxy modes`
    make_proxier: Callable[[NodeInfo, Options], Proxier]
    # What the mode would program for state on node, as text (pure: no root, no kernel).
    render_text: Callable[[ProxyState, NodeInfo, Options], str]
    # The live rules of one service (None: all) of state on node, programmed with options; runs
    # inside the node's namespace.
    rules_excerpt: Callable[[ProxyState, NodeInfo, Options, str | None], str]
    options: tuple[Option, ...] = ()
    # The kernel modules the mode needs beyond the lab's own (kproxy.kmod.LAB_MODULES).
    kernel_modules: Callable[[Options], tuple[Module, ...]] = lambda options: ()
    # What the mode reads from a Service beyond the neutral fields (kube-proxy's per-mode
    # makeServiceInfo); it lands in ServicePort.mode_info.
    service_info: Callable[[Service], Hashable] | None = None
    # The benchmarks' baseline: the kernel's own tool loading, in the calling thread's namespace,
    # what the mode's first sync of state writes (None: the mode writes no such text).
    load_alone: Callable[[ProxyState, NodeInfo, Options], None] | None = None
    # What of a service port the mode cannot program ("" when nothing), e.g. a traffic
    # policy the old userspace proxier never had: such Services are refused, not half-served.
    unsupported: Callable[[ServicePort], str] = lambda svc: ""
    # The mode's own process accepts the client's connection and opens another to the endpoint (the
    # userspace proxy); otherwise the kernel rewrites and forwards the client's own packets.
    relays: bool = False
    # Where the kernel keeps ClientIP affinity; None when the kernel keeps none (the proxy process does).
    affinity: Affinity | None = None
    # The tracer of one node (its namespace's path) for `kproxy trace`.
    tracer: Callable[[str], Tracer] | None = None

    def runs_here(self) -> bool:
        """Whether this kernel has (loaded, or to load) every module the mode needs. Only looks."""
        return kmod.loadable(self.kernel_modules(self.options_of({})))

    def refuse_unsupported(self, services: Iterable[Service]) -> None:
        """Raise, naming the first Service with a feature this mode cannot program."""
        for service in services:
            for svc in service_ports(service):
                if what := self.unsupported(svc):
                    raise KproxyError(f"Service {svc.namespace}/{svc.name}: {what} is not supported in "
                                      f"{self.name} mode")

    def options_of(self, given: Mapping[str, str]) -> dict[str, str]:
        """given, checked against the mode's options, with the defaults of the others."""
        known = {option.name: option for option in self.options}
        for name, value in given.items():
            option = known.get(name)
            if option is None:
                have = f"its options: {', '.join(known)}" if known else "it has no options"
                raise KproxyError(f"mode {self.name} has no option {name!r} ({have})")
            if value not in option.choices:
                raise KproxyError(f"mode {self.name}: option {name}: {value!r} is not one of "
                                  f"{', '.join(option.choices)}")
        return {option.name: given.get(option.name, option.default) for option in self.options}


def parse_option(pair: str) -> tuple[str, str]:
    """"scheduler=sh" -> ("scheduler", "sh")."""
    name, sep, value = pair.partition("=")
    if not sep or not name:
        raise KproxyError(f"mode option {pair!r}: expected NAME=VALUE")
    return name, value


def parse_option_pairs(pairs: list[str]) -> dict[str, str]:
    """["scheduler=sh", ...] -> {"scheduler": "sh"}; a later pair wins."""
    return dict(parse_option(pair) for pair in pairs)
