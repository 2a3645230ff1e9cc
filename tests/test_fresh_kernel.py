"""A freshly booted stock kernel (the guest: Debian's, like the Vagrant box's) gets what a lab needs
from `lab up` itself; a kernel that cannot is refused before anything is made.

The guest lane runs this file before its others (files go in name order), so the first test sees
the kernel exactly as booted: modules that this host builds in are modules nothing loaded yet.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from kproxy import kmod
from kproxy.errors import KproxyError
from kproxy.lab import build
from kproxy.lab.state import lab_dir, lab_namespaces, ns_path
from kproxy.lab.topology import parse_topology
from tests.labtools import kproxy, running_lab, unique_lab_name

pytestmark = pytest.mark.kernel

TOPOLOGY = {"name": "unused", "nodes": [{"name": "node1"}, {"name": "node2"}],
            "pods": [{"name": "web-1", "labels": {"app": "web"}, "nodeName": "node1"}]}


def bridge_nf_call_iptables(netns: str) -> str:
    done = subprocess.run(["nsenter", f"--net={netns}", "--", "cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.guest
def test_lab_up_loads_br_netfilter_says_so_once_and_sets_the_nodes_sysctl(tmp_path: Path) -> None:
    assert not kmod.present(kmod.BR_NETFILTER), (
        "br_netfilter was loaded before the first lab up: the guest must boot with nothing preloaded, "
        "and this test must be the guest session's first")
    topology = tmp_path / "lab.yaml"
    topology.write_text('{"nodes": [{"name": "node1"}, {"name": "node2"}], "pods": []}')
    name = unique_lab_name()
    try:
        first = kproxy("lab", "up", "--name", name, "-f", str(topology))
        notices = [line for line in first.stdout.splitlines() if "kernel module" in line]
        assert len(notices) == 1 and notices[0].startswith("kproxy: loaded kernel modules br_netfilter"), first.stdout
        assert notices[0].endswith(" (machine-wide; they stay loaded after 'kproxy lab down')")
        assert kmod.present(kmod.BR_NETFILTER)
        for node in ("node1", "node2"):
            assert bridge_nf_call_iptables(ns_path(name, node)) == "1"
        again = kproxy("lab", "up", "--name", name, "-f", str(topology))  # reconciling: nothing to load
        assert "kernel module" not in again.stdout
    finally:
        kproxy("lab", "down", name, check=False)


def test_a_module_that_cannot_be_loaded_is_refused_in_one_line_naming_it() -> None:
    missing = kmod.Module("kproxy_no_such_module", "this test")
    with pytest.raises(KproxyError) as refused:
        kmod.ensure([missing])
    said = str(refused.value)
    assert "\n" not in said
    assert said.startswith("kernel module kproxy_no_such_module (for this test) is not loaded and could not be "
                           "loaded (")
    assert said.endswith(f"): run 'modprobe kproxy_no_such_module' as root, or install the modules of kernel "
                         f"{os.uname().release}")
    assert kmod.notice(["ip_vs"]) == (
        "kproxy: loaded kernel module ip_vs (machine-wide; it stays loaded after 'kproxy lab down')")
    assert kmod.notice([]) == ""


def test_a_kernel_without_a_needed_module_gets_a_refusal_and_no_lab(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique_lab_name()
    monkeypatch.setattr(kmod, "LAB_MODULES", (*kmod.LAB_MODULES, kmod.Module("kproxy_no_such_module", "a test")))
    raw = dict(TOPOLOGY, name=name)
    try:
        with pytest.raises(KproxyError, match=r"^kernel module kproxy_no_such_module \(for a test\) is not loaded"):
            build.up(parse_topology(raw))
        assert lab_namespaces(name) == []
        assert not lab_dir(name).exists()
    finally:
        build.teardown(name)


def test_lab_up_resets_a_nodes_bridge_nf_call_iptables(tmp_path: Path) -> None:
    topology = tmp_path / "lab.yaml"
    topology.write_text('{"nodes": [{"name": "node1"}], "pods": []}')
    with running_lab("-f", str(topology)) as name:
        node = ns_path(name, "node1")
        subprocess.run(["nsenter", f"--net={node}", "--", "sh", "-c",
                        "echo 0 > /proc/sys/net/bridge/bridge-nf-call-iptables"], check=True)
        kproxy("lab", "up", "--name", name, "-f", str(topology))
        assert bridge_nf_call_iptables(node) == "1"
