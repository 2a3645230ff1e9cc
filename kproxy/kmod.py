"""Kernel modules a lab or a proxy mode needs: loaded, or a clear refusal.

kubeadm's preflight refuses a node without br_netfilter, and kube-proxy loads
its IPVS modules itself. We do both: `lab up` loads what is missing with
modprobe, and stops with one line naming the module and the command to run
when it cannot. Loading a module is the one machine-wide act a lab makes
(modules stay loaded after `lab down`), so callers say so when it happens.

Why each module:
- br_netfilter: bridged pod->pod frames pass iptables, so the reply of an
  endpoint on the client's own node is un-NATed. Without it, exactly the
  requests whose endpoint shares the client's node time out (9 of 32 on
  Debian's stock kernel, where it is a module that nothing loads).
- nf_conntrack: every Service's NAT and the stale-UDP cleanup need it.
- ip_vs and the scheduler's module (IPVS mode): the kernel does not load them
  on the first netlink request.

A module counts as present when the kernel shows what it provides (some
kernels build them in without a /sys/module entry and have no
/lib/modules), when it is loaded, or when modules.builtin lists it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kproxy.errors import KproxyError


@dataclass(frozen=True)
class Module:
    name: str
    needed_for: str
    provides: str = ""  # a path that exists once the module's feature is in the kernel


BR_NETFILTER = Module("br_netfilter", "same-node Service traffic", "/proc/sys/net/bridge/bridge-nf-call-iptables")
NF_CONNTRACK = Module("nf_conntrack", "Service NAT", "/proc/sys/net/netfilter/nf_conntrack_max")
LAB_MODULES = (BR_NETFILTER, NF_CONNTRACK)


def _builtin(name: str) -> bool:
    try:
        listed = Path(f"/lib/modules/{os.uname().release}/modules.builtin").read_text()
    except OSError:
        return False
    return any(Path(line).name.split(".")[0].replace("-", "_") == name for line in listed.split())


def present(module: Module) -> bool:
    return (bool(module.provides) and Path(module.provides).exists()) or \
        Path("/sys/module", module.name).exists() or _builtin(module.name)


def loadable(modules: tuple[Module, ...] | list[Module]) -> bool:
    """Whether this kernel has every module, loaded or to load (modprobe -n). Only looks."""
    modprobe = shutil.which("modprobe")
    return all(present(module) or (modprobe is not None and subprocess.run(
        [modprobe, "-n", "-q", module.name], capture_output=True).returncode == 0) for module in modules)


def ensure(modules: tuple[Module, ...] | list[Module]) -> list[str]:
    """Load every missing module; the names loaded now. KproxyError (one line) if one cannot be."""
    loaded = []
    for module in modules:
        if present(module):
            continue
        modprobe = shutil.which("modprobe") or next(
            (p for p in ("/usr/sbin/modprobe", "/sbin/modprobe") if os.access(p, os.X_OK)), None)
        if modprobe is None:
            raise KproxyError(f"kernel module {module.name} (for {module.needed_for}) is not loaded and modprobe is "
                              "missing: install kmod (apt-get install kmod), then run 'modprobe "
                              f"{module.name}' as root")
        done = subprocess.run([modprobe, module.name], capture_output=True, text=True)
        if done.returncode != 0 or not present(module):
            said = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
            raise KproxyError(f"kernel module {module.name} (for {module.needed_for}) is not loaded and could not "
                              f"be loaded ({said}): run 'modprobe {module.name}' as root, or install the modules "
                              f"of kernel {os.uname().release}")
        loaded.append(module.name)
    return loaded


def notice(loaded: list[str]) -> str:
    """What to tell a person when modules were loaded (a machine-wide act), or ""."""
    if not loaded:
        return ""
    several = len(loaded) > 1
    return (f"kproxy: loaded kernel module{'s' if several else ''} {', '.join(loaded)} "
            f"(machine-wide; {'they stay' if several else 'it stays'} loaded after 'kproxy lab down')")
