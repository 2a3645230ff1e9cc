"""Packet labs without root: every lab has its page and its place in the index, names and numbers
are unique, packets decode into the lines the labs print, and bad input changes nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kproxy.packetlab import all_labs, find_lab
from kproxy.packets.decode import describe, load_layers
from kproxy.errors import KproxyError
from kproxy.packetlab.runner import run_lab
from tests.test_cli import run

DOCS = Path(__file__).resolve().parents[1] / "docs" / "packet-labs"


def test_every_lab_has_a_page_and_every_page_a_lab() -> None:
    names = [lab.name for lab in all_labs()]
    pages = sorted(p.stem for p in DOCS.glob("*.md") if p.name != "README.md")
    assert sorted(names) == pages
    index = (DOCS / "README.md").read_text()
    for lab in all_labs():
        assert f"[{lab.title}]({lab.name}.md)" in index, lab.name
        page = (DOCS / f"{lab.name}.md").read_text()
        assert page.startswith(f"# Packet lab {lab.number}: {lab.title}\n"), lab.name
        assert f"kproxy packet-lab run {lab.name} --solve" in page, lab.name


def test_numbers_and_names_are_unique_and_labs_say_what_they_run_with() -> None:
    labs = all_labs()
    assert len({lab.number for lab in labs}) == len({lab.name for lab in labs}) == len(labs)
    for lab in labs:
        assert re.fullmatch(r"[a-z0-9-]+", lab.name) and lab.modes and lab.overlays and "LAB" in lab.task


def test_a_lab_is_found_by_name_or_number_and_an_unknown_one_names_them_all() -> None:
    assert find_lab("1").name == find_lab("clusterip-dnat").name == "clusterip-dnat"
    with pytest.raises(KproxyError, match=r"^no packet lab 'nope' \(labs: clusterip-dnat, overlay-decoded, "):
        find_lab("nope")


def test_a_mode_or_overlay_the_lab_does_not_run_with_is_refused_before_anything_is_built() -> None:
    with pytest.raises(KproxyError, match="^packet lab chain-walk runs with mode iptables, not nftables$"):
        run_lab(find_lab("chain-walk"), mode="nftables")
    with pytest.raises(KproxyError, match="^--mode and --overlay choose how the lab's own lab is brought up"):
        run_lab(find_lab("chain-walk"), existing="mine", overlay="udp")


def test_packet_lab_list_names_every_lab_with_its_modes() -> None:
    status, out, err = run("packet-lab", "list")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == len(all_labs())
    assert lines[0] == ("  1  clusterip-dnat         ClusterIP DNAT on the wire  "
                        "(overlays vxlan, host-gw, udp; modes iptables, nftables, ipvs)")


def test_an_unknown_lab_is_one_line_and_exit_1() -> None:
    status, out, err = run("packet-lab", "run", "nope")
    assert (status, out) == (1, "") and err.startswith("kproxy: error: no packet lab 'nope' (labs: ")
    assert err.count("\n") == 1


def test_vxlan_decodes_to_the_outer_and_the_inner_headers() -> None:
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    load_layers()
    inner = Ether() / IP(src="10.244.1.2", dst="10.244.2.2") / TCP(sport=41000, dport=8080, flags="S")
    frame = Ether(bytes(Ether() / IP(src="172.18.0.2", dst="172.18.0.3") / UDP(sport=40000, dport=8472)
                        / VXLAN(vni=1) / inner))
    assert describe(frame) == ("172.18.0.2:40000 > 172.18.0.3:8472 UDP VXLAN vni=1 len=90 | "
                               "10.244.1.2:41000 > 10.244.2.2:8080 TCP [S] len=40")
    flannel = Ether(bytes(Ether() / IP(src="172.18.0.2", dst="172.18.0.3", flags="DF") / UDP(sport=8285, dport=8285)
                          / IP(src="10.244.1.2", dst="10.244.2.2") / ICMP()))
    assert describe(flannel) == ("172.18.0.2:8285 > 172.18.0.3:8285 UDP flannel-udp len=56 DF | "
                                 "10.244.1.2 > 10.244.2.2 ICMP echo-request len=28")
    unreachable = IP(bytes(IP(src="10.244.1.1", dst="10.244.1.2") / ICMP(type=3, code=3)))
    assert describe(unreachable) == "10.244.1.1 > 10.244.1.2 ICMP dest-unreach code=3 len=28"
