"""`kproxy-host-local`: the host-local IPAM plugin as an executable."""

from cni import skel
from cni.ipam import HostLocal


def main() -> int:
    return skel.main(HostLocal(), "kproxy host-local IPAM plugin")
