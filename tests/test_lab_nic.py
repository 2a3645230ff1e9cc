"""The lab NIC's checks (kproxy/lab/nic.py), without root: choose() judges links the tests give it.
The kernel side (moving it in and back) runs in two QEMU guests: tests/test_lab_nic_pair.py."""

from __future__ import annotations

import pytest

from kproxy.errors import KproxyError
from kproxy.lab.planning import plan
from kproxy.lab.nic import Link, choose, foreign, parse_mac
from kproxy.lab.topology import parse_topology

MAC = "52:54:00:6b:70:01"
ROOT = [Link("lo", "00:00:00:00:00:00", 65536, ("127.0.0.1",)),
        Link("eth0", "52:54:00:12:34:56", 1500, ("10.0.2.15",), default_route=True),
        Link("eth1", MAC, 1500)]


@pytest.mark.parametrize("text, mac", [(MAC, MAC), ("52:54:00:6B:70:01", MAC), ("52-54-00-6b-70-01", MAC)])
def test_a_mac_is_read_in_lowercase(text: str, mac: str) -> None:
    assert parse_mac(text) == mac


@pytest.mark.parametrize("text", ["", "eth1", "52:54:00:6b:70", "52:54:00:6b:70:01:02", "52:54:00:6b:70:0g",
                                  "5254006b7001"])
def test_a_malformed_mac_is_refused_in_one_line(text: str) -> None:
    with pytest.raises(KproxyError, match=r"^'.*' is not a MAC address \(six hex pairs, like 52:54:00:6b:70:01\)$"):
        parse_mac(text)


def test_the_nic_is_found_by_its_mac_in_the_root_namespace() -> None:
    assert choose(MAC, ROOT, []) == (ROOT[2], False)


def test_a_nic_already_in_the_underlay_is_the_labs_from_a_previous_up() -> None:
    moved = Link("eth1", MAC, 1500)
    assert choose(MAC, ROOT[:2], [Link("br0", "0a:00:00:00:00:01", 1500), moved]) == (moved, True)


@pytest.mark.parametrize("links, message", [
    (ROOT[:2], f"no NIC has MAC {MAC} in the machine's root namespace (see 'ip -br link')"),
    ([Link("eth1", MAC, 1500, ("192.168.56.11", "192.168.56.12"))],
     f"NIC eth1 ({MAC}) has address 192.168.56.11; the lab's NIC must be dedicated to it"),
    ([Link("eth1", MAC, 1500, default_route=True)],
     f"NIC eth1 ({MAC}) carries a default route; the lab's NIC must be dedicated to it"),
    ([Link("eth1", MAC, 1400)], f"NIC eth1 ({MAC}) has MTU 1400; the lab's overlays need at least 1500"),
])
def test_a_nic_that_is_not_dedicated_to_the_lab_is_refused(links: list[Link], message: str) -> None:
    with pytest.raises(KproxyError) as caught:
        choose(MAC, links, [])
    assert str(caught.value) == message


def test_what_the_lab_did_not_make_in_the_underlay_is_foreign() -> None:
    under = [Link("lo", "00:00:00:00:00:00", 65536), Link("br0", "0a:00:00:00:00:01", 1500),
             Link("to-node1", "0a:00:00:00:00:02", 1500), Link("eth1", MAC, 1500)]
    assert foreign(under, {"lo", "br0"}) == [under[3]]


def test_a_running_labs_nic_is_kept_and_cannot_be_changed() -> None:
    raw = {"name": "t", "nodes": ["n1"]}
    first = plan(parse_topology(raw), None, nic=MAC)
    first.nic_name = "eth1"
    again = plan(parse_topology(raw), first)
    assert (again.nic, again.nic_name) == (MAC, "eth1")
    for other, shown in (("52:54:00:6b:70:02", "52:54:00:6b:70:02"), ("", "none")):
        with pytest.raises(KproxyError, match=f"runs with NIC {MAC}, not {shown}; take it down first"):
            plan(parse_topology(raw), first, nic=other)
    with pytest.raises(KproxyError, match=f"runs with NIC none, not {MAC}; take it down first"):
        plan(parse_topology(raw), plan(parse_topology(raw), None), nic=MAC)
