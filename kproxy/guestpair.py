"""Two guests at once, their lab NICs on one Ethernet segment: the two-VM lab's machines in QEMU.

Each guest is the guest lane's (kproxy/guest.py: Debian's stock kernel, TCG, the host's ``/``
read-only under a tmpfs overlay), booted on the same cache, with three things more:

- a lab NIC: virtio-net with a fixed locally administered MAC, ``52:54:00:6b:70:01`` for guest 1
  and ``:02`` for guest 2, the Vagrantfile's fixed-MAC lab NIC of docs/multi-vm.md. A command
  finds it by that MAC (``KPROXY_LAB_NIC_MAC``), never by its name or by a default route;
- the two lab NICs joined by ``-netdev dgram`` over two unix datagram sockets in the run
  directory, each guest sending its frames to the other's socket. Chosen over ``-netdev socket``
  (TCP, listen/connect): a datagram socket needs no start order (``connect=`` makes QEMU exit
  when nothing listens yet, so guest 2 would have to wait for guest 1's listener without
  connecting to it, which would take the one connection QEMU accepts), no free port to pick and
  race for, and nothing on the host's network stack at all. A frame sent before the other guest's
  socket exists is dropped, as on a cable not yet plugged in;
- one shared writable 9p directory, ``RUN_DIR/shared``, mounted at that same path in both guests
  (``KPROXY_PAIR_SHARE``) for handshakes: guest 1 writes a file that guest 2 waits for. It is
  emptied at the start of every run, so a handshake never sees the previous run's files.

Each guest has its own results share (``RUN_DIR/guest1``, ``RUN_DIR/guest2``: command.sh,
console.log, status, qemu.log as in kproxy/guest.py), 1 vCPU (two guests on a 2-core host),
2 GiB, and ``KPROXY_GUEST_INDEX=1`` or ``2``. The cached initramfs is the guest lane's, unchanged:
the pair's extra steps (mount the shared directory, load the NIC's driver) are the first lines
of each guest's command.sh.

    python -m kproxy.guestpair --run-dir D [--timeout S] -- CMD1 ARGS ::: CMD2 ARGS

boots both, prints each guest's console, and exits with guest 1's status if it failed, else
guest 2's; 125 when a guest could not be booted or did not finish, 130 on Ctrl-C (both QEMUs
are killed).
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import shutil
import sys
import time
from pathlib import Path

from kproxy import guest
from kproxy.children import terminated_as_interrupt
from kproxy.cliargs import Parser
from kproxy.guest import REPO, GuestError, GuestKernel, GuestRun

GUESTS = (1, 2)
# Each: on this 2-core host the pair boots, runs `true` and powers off in about 3 s with 1 vCPU
# each, and in 5 to 6.5 s with 2 each (TCG runs a thread per vCPU, four of them on two cores).
CPUS = 1
LAB_NIC_ENV = "KPROXY_LAB_NIC_MAC"
INDEX_ENV = "KPROXY_GUEST_INDEX"
SHARE_ENV = "KPROXY_PAIR_SHARE"
SEPARATOR = ":::"


def lab_mac(index: int) -> str:
    # 0x52 has the locally administered bit set: no vendor's NIC has this address.
    return f"52:54:00:6b:70:{index:02x}"


def devices(run_dir: Path, index: int) -> list[str]:
    """The QEMU options of guest index's shared directory and lab NIC."""
    peer = GUESTS[index % len(GUESTS)]  # the other one
    # Socket paths relative to QEMU's working directory, the run directory: a unix socket's path
    # has 108 bytes at most, and a run directory may be deep.
    netdev = (f"dgram,id=lab,local.type=unix,local.path=lab{index}.sock,"
              f"remote.type=unix,remote.path=lab{peer}.sock")
    return ["-fsdev", f"local,id=pair,path={run_dir / 'shared'},security_model=none",
            "-device", "virtio-9p-pci,fsdev=pair,mount_tag=pair",
            "-netdev", netdev,
            # romfile= : no iPXE option ROM to load, the kernel is booted directly.
            "-device", f"virtio-net-pci,netdev=lab,mac={lab_mac(index)},romfile="]


def qemu_argv(kernel: GuestKernel, run_dir: Path, index: int) -> list[str]:
    return guest.qemu_argv(kernel, run_dir / f"guest{index}", cpus=CPUS, devices=devices(run_dir, index))


def command_script(argv: list[str], cwd: Path, env: dict[str, str] | None, run_dir: Path, index: int) -> str:
    share = shlex.quote(str(run_dir / "shared"))
    prelude = [f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 pair {share}",
               # A VM's udev loads its NIC's driver at boot; the guest has no udev, and Debian's kernel
               # loads no driver for a device by itself (no CONFIG_UEVENT_HELPER).
               "modprobe virtio_net"]
    env = {**(env or {}), LAB_NIC_ENV: lab_mac(index), INDEX_ENV: str(index), SHARE_ENV: str(run_dir / "shared")}
    return guest.command_script(argv, cwd, env, prelude)


def run_pair(argv_1: list[str], argv_2: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None,
             timeout: float = 1800, run_dir: Path, log=print) -> tuple[GuestRun, GuestRun]:
    """Boot both guests, run argv_1 in guest 1 and argv_2 in guest 2 (in cwd, as root), wait for both.

    Raises GuestError (naming the guest) as soon as either guest fails to boot or report, or when
    one is still running timeout s after the start; the other is killed then, and on Ctrl-C both."""
    reason = guest.unavailable_reason()
    if reason:
        raise GuestError(reason)
    kernel = guest.ensure_kernel(log=log)
    run_dir = run_dir.resolve()
    shutil.rmtree(run_dir / "shared", ignore_errors=True)
    (run_dir / "shared").mkdir(parents=True)
    booting: list[guest.Booting] = []
    try:
        for index, argv in zip(GUESTS, (argv_1, argv_2)):
            own = run_dir / f"guest{index}"
            guest.prepare(own, command_script(argv, cwd, env, run_dir, index))
            booting.append(guest.start(qemu_argv(kernel, run_dir, index), own, cwd=run_dir))
        first, second = _finish_all(booting, timeout)
    except BaseException:
        for each in booting:
            guest.kill(each)
        raise
    return first, second


def _finish_all(booting: list[guest.Booting], timeout: float) -> list[GuestRun]:
    """Each guest's run, collected as its QEMU exits (a pidfd is readable once its process has),
    so that the first guest to fail fails the pair at once, not after the other's timeout."""
    runs: dict[int, GuestRun] = {}
    pidfds = {os.pidfd_open(each.proc.pid): at for at, each in enumerate(booting)}
    deadline = min(each.started for each in booting) + timeout
    try:
        while len(runs) < len(booting):
            waiting = [fd for fd, at in pidfds.items() if at not in runs]
            ended, _, _ = select.select(waiting, [], [], max(0.0, deadline - time.monotonic()))
            # None ended by the deadline: finish() raises the timeout of the first still running.
            for fd in ended or waiting:
                at = pidfds[fd]
                try:
                    runs[at] = guest.finish(booting[at], timeout)
                except GuestError as exc:
                    raise GuestError(f"guest {GUESTS[at]}: {exc}") from None
    finally:
        for fd in pidfds:
            os.close(fd)
    return [runs[at] for at in range(len(booting))]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m kproxy.guestpair", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("commands", nargs="*")
    args = parser.parse_args(argv)
    words = args.commands
    if words.count(SEPARATOR) != 1 or words[0] == SEPARATOR or words[-1] == SEPARATOR:
        parser.error(f"give two commands: -- CMD1 ARGS {SEPARATOR} CMD2 ARGS")
    at = words.index(SEPARATOR)
    try:
        with terminated_as_interrupt():
            runs = run_pair(words[:at], words[at + 1:], timeout=args.timeout, run_dir=args.run_dir,
                            log=lambda m: print(m, file=sys.stderr))
    except GuestError as exc:
        print(f"kproxy guestpair: {str(exc).splitlines()[0]} (logs in {args.run_dir})", file=sys.stderr)
        return 125
    except KeyboardInterrupt:
        print("kproxy guestpair: interrupted; both guests killed", file=sys.stderr)
        return 130
    for index, result in zip(GUESTS, runs):
        print(f"=== guest {index}: exit status {result.status} after {result.seconds:.1f} s ===")
        sys.stdout.write(result.console)
    return next((result.status for result in runs if result.status), 0)


if __name__ == "__main__":
    sys.exit(main())
