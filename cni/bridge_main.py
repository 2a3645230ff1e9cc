"""`kproxy-bridge`: the bridge plugin as an executable.

Normally a thin client of the machine's CNI server (cni/client.py), which it
starts when none runs, and then it never imports pyroute2; without a server
it does the work itself.
"""


def main() -> int:
    from cni import client

    status = client.run("bridge")
    if status is not None:
        client.exit_now(status)
    client.prepare_in_process()
    from cni import skel
    from cni.bridge import Bridge

    return skel.main(Bridge(), "kproxy bridge plugin", client.consumed_stdin())
