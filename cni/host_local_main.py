"""`kproxy-host-local`: the host-local IPAM plugin as an executable.

With a kproxy CNI server listening (cni/server.py) this process is a thin
client; without one it does the work itself.
"""


def main() -> int:
    from cni import client

    status = client.run("host-local")
    if status is not None:
        return status
    from cni import skel
    from cni.ipam import HostLocal

    return skel.main(HostLocal(), "kproxy host-local IPAM plugin")
