"""Where nftables mode keeps ClientIP affinity: one dynamic set with a timeout per endpoint."""

from __future__ import annotations

import json
import re

from kproxy.proxy.mode import Affinity, NodeCommand, Remembered
from kproxy.proxy.nftables.names import TABLE, affinity_set

# affinity-<hash>-<namespace>/<name>/<protocol>/<port name>__<endpoint ip>/<port> (names.endpoint_base)
ENDPOINT = re.compile(rf"^{affinity_set('')}\w+-\S+__([\d.]+)/(\d+)$")


def remembered(run: NodeCommand) -> list[Remembered]:
    """Each affinity set's elements: a client, with the seconds until it is forgotten."""
    found = []
    for item in json.loads(run("nft", "-j", "list", "table", "ip", TABLE))["nftables"]:
        listed = item.get("set", {})
        if not (m := ENDPOINT.match(listed.get("name", ""))):
            continue
        for element in listed.get("elem", []):
            client, left = element["elem"]["val"], element["elem"]["expires"]
            found.append(Remembered(client, f"{m.group(1)}:{m.group(2)}",
                                    f"set timeout {listed['timeout']}s, expires in {left}s", None, left,
                                    listed["timeout"]))
    return found


AFFINITY = Affinity(
    where=f"the affinity-* sets of table ip {TABLE} (one per endpoint, flags dynamic,timeout)",
    how="service-* checks these sets before its endpoint choice ('ip saddr @affinity-... goto endpoint-...'), "
        "and the endpoint chain refreshes the element ('update @affinity-... { ip saddr }'), so the timeout "
        "counts from a client's last connection, not its first.",
    read=remembered,
)
