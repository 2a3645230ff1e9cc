"""Where IPVS mode keeps ClientIP affinity: persistence templates in the connection table."""

from __future__ import annotations

from kproxy.proxy.mode import Affinity, NodeCommand, Remembered


def remembered(run: NodeCommand) -> list[Remembered]:
    """The persistence templates: entries with source port 0, pointing at the client's real server."""
    found = []
    for line in run("ipvsadm", "-Lnc").splitlines():
        words = line.split()  # pro expire state source virtual destination
        if len(words) == 6 and words[3].endswith(":0"):
            minutes, seconds = words[1].split(":")
            found.append(Remembered(words[3].rsplit(":", 1)[0], words[5], f"template, expires in {words[1]}",
                                    None, int(minutes) * 60 + int(seconds), None))
    return found


AFFINITY = Affinity(
    where="ipvsadm -Lnc (IPVS persistence templates: the entries with source port 0)",
    how="The virtual server is persistent (ipvsadm -Ln: 'persistent <timeout>'): a new connection from a client with a "
        "template goes to the template's real server, and the template lives while the client's connections "
        "do, then for the persistence timeout.",
    read=remembered,
)
