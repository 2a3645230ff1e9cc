"""Every packet lab's solution, run as a user runs it (`kproxy packet-lab run NAME --solve`), ends in
PASS in every mode it runs with (IPVS in the guest) and on every overlay, and leaves no lab behind;
`kproxy capture` writes what crossed a point, decoded or as a pcap."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from kproxy.lab.state import lab_exists
from kproxy.packetlab import all_labs
from kproxy.packetlab.runner import own_lab_name
from tests.labtools import KPROXY, kproxy, running_lab, status

pytestmark = pytest.mark.kernel


def _cases() -> list[object]:
    """Each lab in each of its modes on its first overlay, and in its first mode on each other overlay."""
    cases = []
    for lab in all_labs():
        runs = [(mode, lab.overlays[0]) for mode in lab.modes]
        runs += [(lab.modes[0], overlay) for overlay in lab.overlays[1:]]
        for mode, overlay in runs:
            marks = [pytest.mark.ipvs] if mode == "ipvs" else []
            cases.append(pytest.param(lab.name, mode, overlay, marks=marks, id=f"{lab.name}-{mode}-{overlay}"))
    return cases


@pytest.mark.parametrize(("name", "mode", "overlay"), _cases())
def test_the_solution_passes_and_cleans_up(name: str, mode: str, overlay: str) -> None:
    lab = next(lab for lab in all_labs() if lab.name == name)
    done = subprocess.run([KPROXY, "packet-lab", "run", name, "--solve", "--mode", mode, "--overlay", overlay],
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == f"PASS  packet lab {name}", done.stdout
        assert "FAIL" not in done.stdout
    finally:
        if lab_exists(own_lab_name(lab)):
            kproxy("lab", "down", own_lab_name(lab), check=False)
            pytest.fail(f"packet lab {name} left its lab {own_lab_name(lab)} behind")


def test_a_lab_of_that_name_is_refused_and_kept() -> None:
    with running_lab(name=own_lab_name(all_labs()[0])) as taken:
        done = subprocess.run([KPROXY, "packet-lab", "check", all_labs()[0].name], capture_output=True, text=True)
        assert (done.returncode, done.stdout) == (1, "")
        assert done.stderr == (f"kproxy: error: a lab named {taken} exists; packet lab {all_labs()[0].name} makes "
                               f"its own (kproxy lab down {taken}, or run it there with --lab {taken})\n")
        assert status(taken)["pods"]


def test_a_lab_runs_in_a_running_lab_and_removes_only_what_it_applied() -> None:
    with running_lab() as name:
        done = subprocess.run([KPROXY, "packet-lab", "check", "clusterip-dnat", "--lab", name],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.splitlines()[-1] == "PASS  packet lab clusterip-dnat"
        assert "web" not in [s.split()[0] for s in kproxy("get", "svc", "--lab", name).stdout.splitlines()[1:]]
        assert lab_exists(name)


def test_capture_decodes_the_underlay_and_writes_a_pcap(tmp_path: Path) -> None:
    from scapy.layers.inet import ICMP, IP
    from scapy.utils import rdpcap

    with running_lab("--overlay", "vxlan") as name:
        info = status(name)
        web3 = next(p["ip"] for p in info["pods"] if p["name"] == "web-3")
        decoded = subprocess.Popen([KPROXY, "capture", "--lab", name, "underlay", "--filter", "udp port 8472",
                                    "--count", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pcap = tmp_path / "icmp.pcap"
        written = subprocess.Popen([KPROXY, "capture", "--lab", name, "web-3", "-w", str(pcap), "--filter", "icmp",
                                    "--count", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for proc in (decoded, written):  # both armed: each says so on stderr before it captures
                assert proc.stderr is not None and proc.stderr.readline().startswith("capturing on ")
            kproxy("exec", "--lab", name, "client", "--", "ping", "-c1", "-W5", web3)
            out, err = decoded.communicate(timeout=60)
            written.communicate(timeout=60)
        finally:
            for proc in (decoded, written):
                proc.kill()
        lines = out.splitlines()
        assert len(lines) == 2 and err == "2 packets captured\n"
        assert ":8472 UDP VXLAN vni=1 len=" in lines[0] and f"> {web3} ICMP echo-request len=84" in lines[0]
        packets = rdpcap(str(pcap))
        assert [(p[IP].dst, p[ICMP].type) for p in packets] == [(web3, 8), (next(
            p["ip"] for p in info["pods"] if p["name"] == "client"), 0)]


def test_capture_errors_name_what_exists() -> None:
    with running_lab() as name:
        done = kproxy("capture", "--lab", name, "node1:nope", check=False)
        assert done.returncode == 1 and done.stderr.startswith("kproxy: error: node1 has no interface 'nope' (it has: ")
        assert "cni0" in done.stderr and "flannel.1" in done.stderr
        done = kproxy("capture", "--lab", name, "node1:cni0", "--filter", "no such filter", check=False)
        assert done.returncode == 1 and done.stderr.startswith("kproxy: error: cannot capture on cni0: ")
        assert done.stderr.count("\n") == 1
        done = kproxy("capture", "--lab", name, "web-9", check=False)
        assert done.stderr == (f"kproxy: error: lab {name} has no pod, node or namespace named 'web-9': a point is "
                               "POD, NODE[:IFACE], external or underlay (see 'kproxy lab status')\n")
