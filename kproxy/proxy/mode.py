"""What a proxy mode is to the rest of kproxy: one Mode object, exported by its package.

The registry (kproxy.proxy) maps names to the packages; everything else (cli,
lab, agent, demo, bench) asks a Mode, never compares a mode's name. A mode's
options travel as opaque ``name=value`` strings (``kproxy lab up --mode-opt
scheduler=sh``) until the mode itself reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Mapping, Protocol

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
