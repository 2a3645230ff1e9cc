"""`kproxy lab up --nic MAC` in two QEMU guests on one Ethernet segment (kproxy/guestpair.py): guest 1's
lab underlay is stretched over its lab NIC, and guest 2, which has no lab, reaches the lab's nodes, a
NodePort on each of them, and etcd over that wire; `lab down` gives guest 1 its NIC back.

Runs on the host (it boots its own pair), as root, like tests/test_guest_pair.py: the NIC moved is a
guest's, never one of this machine's, whose root namespace the suite's guard keeps unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kproxy import guestpair
from kproxy.guest import REPO

pytestmark = pytest.mark.kernel

LAB = "nicpair"
NODE_PORT = 30080
CLIENT_IP = "172.18.0.100"  # guest 2's, on the lab's nodeCIDR, clear of the nodes' (from .2) and .253/.254
TOPOLOGY = f"name: {LAB}\noverlay: vxlan\nnodes: [node1, node2]\npods: []\n"
MANIFESTS = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: web
        ports: [{{containerPort: 8080}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
"""

# Both: the link with the lab NIC's MAC (in the current namespace), and waiting for a file.
COMMON = r"""
set -eu
share=$KPROXY_PAIR_SHARE
wait_for() {
    end=$(( $(date +%s) + $2 ))
    until [ -e "$1" ]; do
        [ "$(date +%s)" -lt "$end" ] || { echo "guest $KPROXY_GUEST_INDEX: no $1 within $2 s"; exit 4; }
        sleep 0.2
    done
}
nic_name() {
    for dev in /sys/class/net/*; do
        if [ "$(cat "$dev/address")" = "$KPROXY_LAB_NIC_MAC" ]; then echo "${dev##*/}"; fi
    done
}
"""

# Guest 1: the lab over its NIC, the Deployment and its NodePort, "ready"; after guest 2's "done",
# down, and what is left: the NIC's name in the root namespace and the lab's namespaces.
LAB_SIDE = COMMON + rf"""
kproxy="{sys.executable} -m kproxy.cli"
before=$(nic_name)
[ -n "$before" ] || {{ echo "no link has MAC $KPROXY_LAB_NIC_MAC"; ip -o link; exit 3; }}
trap '[ -e "$share/ready" ] || touch "$share/failed"' EXIT
$kproxy lab up -f "$share/topology.yaml" --nic "$KPROXY_LAB_NIC_MAC" --store etcd --no-dns > "$share/up.out" 2>&1 \
    || {{ cat "$share/up.out"; exit 5; }}
$kproxy apply --lab {LAB} -f "$share/manifests.yaml"
$kproxy lab status {LAB} -o json > "$share/status.json"
$kproxy lab status {LAB} > "$share/status.txt"
ip netns exec kp_{LAB}_underlay cat "/sys/class/net/$before/flags" > "$share/flags"
touch "$share/ready"
wait_for "$share/done" 300
$kproxy lab down {LAB}
printf '{{"before": "%s", "after": "%s", "namespaces": "%s"}}\n' "$before" "$(nic_name)" \
    "$(ip netns list | grep kp_ || true)" > "$share/after.json"
"""

CLIENT = rf"""
import json, os, subprocess, sys, time
from kproxy.lab.probe import http_get, parse_answer, probe_tcp

share, netns = os.environ["KPROXY_PAIR_SHARE"], "/var/run/netns/client"
status = json.load(open(f"{{share}}/status.json"))
ips = [n["ip"] for n in status["nodes"]]
results = {{"ping": {{}}, "nodePort": {{}}}}
for ip in ips:
    done = subprocess.run(["ip", "netns", "exec", "client", "ping", "-c", "2", "-i", "0.2", "-w", "20", ip],
                          capture_output=True, text=True)
    results["ping"][ip] = done.returncode == 0
for ip in ips:
    deadline, answer = time.monotonic() + 60, None
    while answer is None:
        try:
            answer = parse_answer(probe_tcp(netns, ip, {NODE_PORT}))["pod"]
        except OSError as exc:
            if time.monotonic() > deadline:
                answer = f"error: {{exc!r}}"
            time.sleep(0.5)
    results["nodePort"][ip] = answer
try:
    results["etcd"] = json.loads(http_get(netns, "172.18.0.253", 2379, "/version", timeout=10))
except OSError as exc:
    results["etcd"] = f"error: {{exc!r}}"
json.dump(results, open(f"{{share}}/results.json", "w"))
"""

# Guest 2: no lab; its NIC (found by MAC) in a namespace of its own with an address on the lab's
# nodeCIDR, then the checks, then "done" however they went.
CLIENT_SIDE = COMMON + rf"""
nic=$(nic_name)
[ -n "$nic" ] || {{ echo "no link has MAC $KPROXY_LAB_NIC_MAC"; ip -o link; exit 3; }}
trap 'touch "$share/done"' EXIT
ip netns add client
ip link set "$nic" netns client
ip -n client link set lo up
ip -n client link set "$nic" up
ip -n client addr add {CLIENT_IP}/24 dev "$nic"
# Guest 1's lab up (etcd, two nodes, emulated on one vCPU) takes minutes.
until [ -e "$share/ready" ]; do
    [ ! -e "$share/failed" ] || {{ echo "guest 1 failed"; exit 6; }}
    sleep 0.2
done
{sys.executable} "$share/client.py"
"""


@pytest.mark.timeout(1700)
def test_a_lab_over_its_nic_is_reached_from_another_guest_and_gives_the_nic_back(tmp_path: Path) -> None:
    run_dir = tmp_path / "pair"
    first, second = guestpair.run_pair(
        ["sh", "-c", _with_files(LAB_SIDE)], ["sh", "-c", CLIENT_SIDE],
        env={"PYTHONPATH": str(REPO)}, timeout=1500, run_dir=run_dir)
    share = run_dir / "shared"
    consoles = f"guest 1:\n{first.console}\nguest 2:\n{second.console}"
    assert first.status == 0 and second.status == 0, consoles

    up = (share / "up.out").read_text()
    status = json.loads((share / "status.json").read_text())
    assert f"moving NIC {status['nic']['name']} ({guestpair.lab_mac(1)}) from the machine's root namespace" in up
    assert status["nic"]["mac"] == guestpair.lab_mac(1)
    assert f"nic {guestpair.lab_mac(1)} ({status['nic']['name']})" in (share / "status.txt").read_text()
    # Not set by kproxy: the bridge makes its ports promiscuous (kproxy/lab/nic.py, attach).
    assert int((share / "flags").read_text(), 16) & 0x100, "the lab NIC is not promiscuous in the bridge"

    results = json.loads((share / "results.json").read_text())
    ips = sorted(n["ip"] for n in status["nodes"])
    assert ips == ["172.18.0.2", "172.18.0.3"]
    assert results["ping"] == {ip: True for ip in ips}, results
    pods = {p["name"] for p in status["pods"]}
    assert all(results["nodePort"][ip] in pods for ip in ips), results
    assert "etcdserver" in results["etcd"], results

    after = json.loads((share / "after.json").read_text())
    assert after == {"before": status["nic"]["name"], "after": status["nic"]["name"], "namespaces": ""}, after


def _with_files(script: str) -> str:
    """script, after writing the lab's topology, manifests and guest 2's checks into the share (run_pair
    empties it at boot)."""
    files = {"topology.yaml": TOPOLOGY, "manifests.yaml": MANIFESTS, "client.py": CLIENT}
    return "".join(f"cat > \"$KPROXY_PAIR_SHARE/{name}\" <<'EOF'\n{text}EOF\n" for name, text in files.items()) + script
