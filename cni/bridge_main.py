"""`kproxy-bridge`: the bridge plugin as an executable.

With a kproxy CNI server listening (cni/server.py) this process is a thin
client and never imports pyroute2; without one it does the work itself.
"""


def main() -> int:
    from cni import client

    status = client.run("bridge")
    if status is not None:
        return status
    from cni import skel
    from cni.bridge import Bridge

    return skel.main(Bridge(), "kproxy bridge plugin")
