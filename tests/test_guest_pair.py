"""Two QEMU guests on one Ethernet segment (kproxy/guestpair.py): a frame guest 2 sends on its lab
NIC arrives on guest 1's, with guest 2's MAC, and guest 1's answer comes back.

Runs on the host (it boots its own pair, not in the guest lane's one guest), as root, like the other
tests that need root. Each guest finds its lab NIC by the MAC it was given and moves it into a network
namespace of its own, as the two-VM lab will move it into the underlay's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import Ether
from scapy.utils import rdpcap

from kproxy import guestpair

pytestmark = pytest.mark.kernel

# Both guests: the lab NIC, found by its MAC, into namespace "lab" with 192.168.77.<index>/24.
# wait_for FILE: until it exists, for at most 120 s (both guests boot at once, in seconds).
COMMON = r"""
set -eu
share=$KPROXY_PAIR_SHARE
wait_for() {
    end=$(( $(date +%s) + 120 ))
    until [ -e "$1" ]; do
        [ "$(date +%s)" -lt "$end" ] || { echo "guest $KPROXY_GUEST_INDEX: no $1 within 120 s"; exit 4; }
        sleep 0.1
    done
}
nic=
for dev in /sys/class/net/*; do
    if [ "$(cat "$dev/address")" = "$KPROXY_LAB_NIC_MAC" ]; then nic=${dev##*/}; fi
done
[ -n "$nic" ] || { echo "no link has MAC $KPROXY_LAB_NIC_MAC:"; ip -o link; exit 3; }
ip netns add lab
ip link set "$nic" netns lab
ip -n lab link set lo up
ip -n lab link set "$nic" up
ip -n lab addr add "192.168.77.$KPROXY_GUEST_INDEX/24" dev "$nic"
"""

# Guest 1 captures the first echo request on its lab NIC (-Z root: tcpdump writes into the share,
# which only root may write), says it is ready once tcpdump listens, and answers (its kernel does)
# until guest 2 is done.
ANSWER = COMMON + r"""
ip netns exec lab timeout 120 tcpdump -i "$nic" -Z root -n -U --immediate-mode -c 1 -w "$share/echo.pcap" 'icmp[icmptype] = icmp-echo' \
    2> "$share/tcpdump.err" &
capture=$!
touch "$share/tcpdump.err"
until grep -q "listening on" "$share/tcpdump.err"; do
    kill -0 "$capture" 2>/dev/null || { cat "$share/tcpdump.err"; exit 5; }
    sleep 0.1
done
touch "$share/ready"
wait_for "$share/done"
# tcpdump exits on its own once the echo request came (immediate mode: not held in a buffer block);
# if none came within 10 s, stop it: the capture shows what came.
end=$(( $(date +%s) + 10 ))
while kill -0 "$capture" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 0.1; done
kill "$capture" 2>/dev/null || true
"""

# Guest 2 pings guest 1 once it is ready, and says it is done however that went.
ASK = COMMON + r"""
trap 'touch "$share/done"' EXIT
wait_for "$share/ready"
ip netns exec lab ping -c 3 -i 0.2 -w 30 192.168.77.1
"""


@pytest.mark.timeout(400)
def test_a_frame_from_guest_2s_lab_nic_reaches_guest_1s_and_is_answered(tmp_path: Path) -> None:
    first, second = guestpair.run_pair(["sh", "-c", ANSWER], ["sh", "-c", ASK], timeout=300, run_dir=tmp_path)

    assert second.status == 0, f"guest 2's ping failed:\n{second.console}\nguest 1:\n{first.console}"
    assert "3 packets transmitted, 3 received" in second.console
    assert first.status == 0, f"guest 1 failed:\n{first.console}"
    frames = rdpcap(str(tmp_path / "shared" / "echo.pcap"))
    assert len(frames) == 1, f"guest 1 captured {len(frames)} echo requests on its lab NIC"
    echo = frames[0]
    assert (echo[Ether].src, echo[Ether].dst) == (guestpair.lab_mac(2), guestpair.lab_mac(1))
    assert (echo[IP].src, echo[IP].dst, echo[ICMP].type) == ("192.168.77.2", "192.168.77.1", 8)
