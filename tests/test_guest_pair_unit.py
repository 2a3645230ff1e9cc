"""The guest pair's QEMU command lines, command scripts and CLI, without booting (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kproxy import guestpair
from kproxy.guest import GuestKernel, GuestRun

KERNEL = GuestKernel("6.1.0-57-amd64", Path("/cache/vmlinux"), Path("/cache/root"), Path("/cache/initramfs.cpio"))
RUN = Path("/tmp/pair")


def guest_argv(index: int, peer: int) -> list[str]:
    return [
        "qemu-system-x86_64", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "1", "-m", "2048",
        "-kernel", "/cache/vmlinux", "-initrd", "/cache/initramfs.cpio",
        "-append", "console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off rdinit=/init "
                   f"kproxy.run=/tmp/pair/guest{index} kproxy.modules=/cache/root/lib/modules",
        "-nographic", "-monitor", "none", "-no-reboot", "-nic", "none",
        "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=results,path=/tmp/pair/guest{index},security_model=none",
        "-device", "virtio-9p-pci,fsdev=results,mount_tag=results",
        "-fsdev", "local,id=pair,path=/tmp/pair/shared,security_model=none",
        "-device", "virtio-9p-pci,fsdev=pair,mount_tag=pair",
        "-netdev", f"dgram,id=lab,local.type=unix,local.path=lab{index}.sock,"
                   f"remote.type=unix,remote.path=lab{peer}.sock",
        "-device", f"virtio-net-pci,netdev=lab,mac=52:54:00:6b:70:0{index},romfile=",
    ]


def test_each_guest_sends_to_the_others_socket_from_its_own_with_its_own_mac() -> None:
    assert guestpair.qemu_argv(KERNEL, RUN, 1) == guest_argv(1, peer=2)
    assert guestpair.qemu_argv(KERNEL, RUN, 2) == guest_argv(2, peer=1)


def test_a_guests_script_mounts_the_share_loads_the_nic_driver_and_exports_its_mac_and_index() -> None:
    script = guestpair.command_script(["sh", "-c", "echo $KPROXY_GUEST_INDEX"], Path("/repo"), {"A": "b c"}, RUN, 2)
    assert script == (
        "set -e\n"
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        "export HOME=/root\n"
        "export LANG=C.UTF-8\n"
        "export KPROXY_IN_GUEST=1\n"
        "export PYTHONDONTWRITEBYTECODE=1\n"
        "export A='b c'\n"
        "export KPROXY_LAB_NIC_MAC=52:54:00:6b:70:02\n"
        "export KPROXY_GUEST_INDEX=2\n"
        "export KPROXY_PAIR_SHARE=/tmp/pair/shared\n"
        "mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 pair /tmp/pair/shared\n"
        "modprobe virtio_net\n"
        "cd /repo\n"
        "exec sh -c 'echo $KPROXY_GUEST_INDEX'\n")


@pytest.mark.parametrize("words", [["true"], ["true", ":::"], [":::", "true"], ["a", ":::", "b", ":::", "c"], []])
def test_the_cli_wants_exactly_two_commands(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        guestpair.main(["--run-dir", str(RUN), "--", *words])
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("python -m kproxy.guestpair: error: give two commands: -- CMD1 ARGS ::: "
                                       "CMD2 ARGS (see 'python -m kproxy.guestpair --help')\n")


@pytest.mark.parametrize("statuses, exit_status", [((0, 0), 0), ((0, 3), 3), ((4, 3), 4)])
def test_the_cli_prints_both_consoles_and_exits_with_the_first_failure(
        statuses: tuple[int, int], exit_status: int, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def run_pair(argv_1: list[str], argv_2: list[str], **kwargs: object) -> tuple[GuestRun, GuestRun]:
        assert (argv_1, argv_2) == (["echo", "one"], ["sh", "-c", "echo two"])
        return GuestRun(statuses[0], "one\n", 6.31), GuestRun(statuses[1], "two\n", 6.5)

    monkeypatch.setattr(guestpair, "run_pair", run_pair)
    assert guestpair.main(["--run-dir", str(RUN), "--", "echo", "one", ":::", "sh", "-c", "echo two"]) == exit_status
    assert capsys.readouterr().out == (f"=== guest 1: exit status {statuses[0]} after 6.3 s ===\none\n"
                                       f"=== guest 2: exit status {statuses[1]} after 6.5 s ===\ntwo\n")
