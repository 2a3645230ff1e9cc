"""`kproxy-bridge`: the bridge plugin as an executable."""

from cni import skel
from cni.bridge import Bridge


def main() -> int:
    return skel.main(Bridge(), "kproxy bridge plugin")
