"""ipMasq: per-container NAT chain, named and laid out like the reference bridge's.

POSTROUTING -s <pod ip> -j CNI-<hash>; CNI-<hash> accepts traffic to the pod
subnet and masquerades the rest (multicast excepted).
"""

from __future__ import annotations

import hashlib
import ipaddress
import subprocess

from cni.errors import IO_FAILURE, CNIError
from cni.netns import nsenter_prefix

# One backend, called by name, never through the system's alternatives: nft, the
# one the proxy modes use too (never mix backends in one namespace), and the one
# Debian's and the reference plugins' `iptables` is. docs/iptables.md says why.
IPTABLES = "iptables-nft"
IPTABLES_RESTORE = "iptables-nft-restore"
IPTABLES_SAVE = "iptables-nft-save"


def chain_name(network: str, container_id: str) -> str:
    # The reference: "CNI-" + sha512(name + id) in hex, cut to 28 characters.
    return "CNI-" + hashlib.sha512(f"{network}{container_id}".encode()).hexdigest()[:24]


def _comment(network: str, container_id: str) -> str:
    return f'"name: \\"{network}\\" id: \\"{container_id}\\""'


def render(network: str, container_id: str, addresses: list[str]) -> str:
    """iptables-restore --noflush input that installs masquerade for addresses."""
    chain = chain_name(network, container_id)
    comment = _comment(network, container_id)
    lines = ["*nat", f":{chain} - [0:0]"]
    for address in addresses:
        iface = ipaddress.ip_interface(address)
        lines.append(f"-A {chain} -d {iface.network} -m comment --comment {comment} -j ACCEPT")
    lines.append(f"-A {chain} ! -d 224.0.0.0/4 -m comment --comment {comment} -j MASQUERADE")
    for address in addresses:
        ip = ipaddress.ip_interface(address).ip
        lines.append(f"-A POSTROUTING -s {ip}/32 -m comment --comment {comment} -j {chain}")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def _run(ns: str | None, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(nsenter_prefix(ns) + argv, input=stdin, capture_output=True, text=True)


def setup(ns: str | None, network: str, container_id: str, addresses: list[str]) -> None:
    done = _run(ns, [IPTABLES_RESTORE, "--noflush", "-w"], render(network, container_id, addresses))
    if done.returncode != 0:
        raise CNIError(IO_FAILURE, "ipMasq: iptables-restore failed", done.stderr.strip())


def teardown(ns: str | None, network: str, container_id: str) -> None:
    """Remove the container's chain and every jump to it; absent is fine."""
    chain = chain_name(network, container_id)
    listing = _run(ns, [IPTABLES, "-w", "-t", "nat", "-S", "POSTROUTING"])
    jumps = [line for line in listing.stdout.splitlines() if line.endswith(f"-j {chain}")]
    if not jumps and _run(ns, [IPTABLES, "-w", "-t", "nat", "-n", "-L", chain]).returncode != 0:
        return
    restore = ["*nat"] + ["-D" + line[2:] for line in jumps] + [f"-F {chain}", f"-X {chain}", "COMMIT"]
    done = _run(ns, [IPTABLES_RESTORE, "--noflush", "-w"], "\n".join(restore) + "\n")
    if done.returncode != 0:
        raise CNIError(IO_FAILURE, "ipMasq: removing the NAT chain failed", done.stderr.strip())
