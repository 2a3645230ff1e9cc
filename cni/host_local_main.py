"""`kproxy-host-local`: the host-local IPAM plugin as an executable.

Normally a thin client of the machine's CNI server (cni/client.py), which it
starts when none runs; without a server it does the work itself.
"""


def main() -> int:
    from cni import client

    status = client.run("host-local")
    if status is not None:
        client.exit_now(status)
    client.prepare_in_process()
    from cni import skel
    from cni.ipam import HostLocal

    return skel.main(HostLocal(), "kproxy host-local IPAM plugin", client.consumed_stdin())
