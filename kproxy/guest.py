"""The guest lane: run a command inside a QEMU guest that boots Debian's stock kernel.

It ships in the product, not under tests/, because users meet it too: `scripts/demo`
(kproxy.demo) runs a mode's scene in it where the host kernel lacks a module that mode
needs (IPVS, here), and the IPVS benchmark its IPVS part. The test suite's use of it is tests/guestlane.py.

Some kernels (this project's CI machine among them) have no IPVS and no
``dummy`` links. Debian's stock kernel has both as modules, so where the host
kernel lacks them the IPVS tests (and the IPVS benchmark) run in a throwaway
QEMU guest instead. Nothing is installed on the host: the kernel package is
downloaded and unpacked into a cache directory, never installed.

How one run works (one guest per test session, never one per test):

1. Cache (``.cache/guest/`` in the repo, built once, ~10 s): ``apt-get
   download`` of ``linux-image-<kver>`` (the version ``linux-image-amd64``
   depends on), ``dpkg -x`` into ``root/``, ``depmod -b`` (dpkg -x runs no
   depmod), the XZ payload of the bzImage unpacked to an ELF ``vmlinux``
   (QEMU boots an ELF kernel directly via PVH), and a busybox initramfs with
   the few modules needed to mount the host (virtio-pci, 9p, overlay).
2. Boot ``qemu-system-x86_64 -accel tcg`` (``/dev/kvm`` may not boot stock
   kernels; TCG always does), 2 vCPUs, 2 GiB. The initramfs mounts the host's
   ``/`` read-only over virtio-9p with a tmpfs overlay on top (the guest may
   write anywhere; the host sees none of it), bind-mounts the cache's modules
   over ``/lib/modules``, and mounts one writable 9p share, the run directory
   (same path as on the host), for results. Module auto-loading calls
   ``/sbin/modprobe`` in PID 1's root (the initramfs), so that one chroots
   into the real root.
3. The command runs as root in the guest's own root namespace (the guest is
   disposable: anything goes inside) from the same working directory, with
   ``KPROXY_IN_GUEST=1`` and no kernel module loaded beforehand (a fresh VM:
   kproxy loads what it needs itself, kproxy/kmod.py); its output goes to the run directory's
   ``console.log``, its exit status to ``status``; then the guest powers off.

    python -m kproxy.guest build             # make the cache (idempotent)
    python -m kproxy.guest run -- CMD ARGS   # boot, run CMD in the repo, exit with its status

Two guests at once, their lab NICs on one Ethernet segment, are kproxy/guestpair.py's (built from
this module's command_script, prepare, qemu_argv, start and finish).
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kproxy import debs
from kproxy.errors import KproxyError

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "guest"
META_PACKAGE = "linux-image-amd64"
INITRAMFS_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
QEMU = "qemu-system-x86_64"
BUSYBOX = "/bin/busybox"
CPUS = 2
MEMORY_MIB = 2048
XZ_MAGIC = b"\xfd7zXZ\x00"
IN_GUEST_ENV = "KPROXY_IN_GUEST"


class GuestError(RuntimeError):
    """The guest could not be built or booted (not: the command inside failed)."""


@dataclass
class GuestKernel:
    version: str  # "6.1.0-56-amd64"
    vmlinux: Path
    root: Path  # the unpacked package: root/lib/modules/<version>
    initramfs: Path


def in_guest() -> bool:
    return os.environ.get(IN_GUEST_ENV) == "1"


def unavailable_reason() -> str:
    """Why no guest can be booted here, or "" when it can."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "the guest lane needs an x86_64 Linux host"
    if os.geteuid() != 0:
        return "the guest lane needs root (sudo scripts/test)"
    for tool in (QEMU, "cpio", "depmod", "modprobe"):
        if not shutil.which(tool):
            return f"{tool} is missing (scripts/setup installs qemu-system-x86, cpio, kmod, busybox-static)"
    if not _is_static(BUSYBOX):
        return f"{BUSYBOX} is not the static busybox (scripts/setup installs busybox-static)"
    if not _cached_kernel() and not shutil.which("apt-get"):
        return "no kernel in the cache and no apt-get to download Debian's"
    return ""


def _is_static(path: str) -> bool:
    try:
        head = Path(path).read_bytes()[:4096]
    except OSError:
        return False
    # A static ELF has no PT_INTERP, i.e. no "/lib64/ld-linux" path near the start.
    return head.startswith(b"\x7fELF") and b"ld-linux" not in head


# --- the cache ---------------------------------------------------------------

def _cached_kernel(cache: Path = CACHE) -> GuestKernel | None:
    try:
        meta = json.loads((cache / "kernel.json").read_text())
    except (OSError, ValueError):
        return None
    kernel = GuestKernel(meta["version"], cache / meta["vmlinux"], cache / "root", cache / meta["initramfs"])
    if kernel.vmlinux.exists() and kernel.initramfs.exists() and \
            (kernel.root / "lib" / "modules" / kernel.version / "modules.dep").exists():
        return kernel
    return None


def _wanted_version() -> str:
    out = subprocess.run(["apt-cache", "depends", META_PACKAGE], capture_output=True, text=True).stdout
    found = re.search(r"Depends:\s*linux-image-(\S+-amd64)\b", out)
    if not found:
        raise GuestError(f"apt-cache depends {META_PACKAGE} names no kernel (apt-get update?): {out.strip()!r}")
    return found.group(1)


def ensure_kernel(cache: Path = CACHE, log=print) -> GuestKernel:
    """The cached kernel, downloading and unpacking Debian's when the cache has none."""
    kernel = _cached_kernel(cache)
    if kernel:
        return kernel
    started = time.monotonic()
    version = _wanted_version()
    package = f"linux-image-{version}"
    try:
        root = debs.unpacked([package], cache, log=lambda message: log(f"guest: {message}"))
    except KproxyError as exc:
        raise GuestError(str(exc)) from None
    subprocess.run(["depmod", "-b", str(root), version], check=True)
    vmlinux = cache / f"vmlinux-{version}"
    vmlinux.write_bytes(extract_vmlinux((root / "boot" / f"vmlinuz-{version}").read_bytes()))
    initramfs = cache / f"initramfs-{version}.cpio"
    build_initramfs(root, version, initramfs)
    (cache / "kernel.json").write_text(json.dumps(
        {"version": version, "vmlinux": vmlinux.name, "initramfs": initramfs.name, "package": package}))
    log(f"guest: kernel {version} cached in {time.monotonic() - started:.1f} s")
    kernel = _cached_kernel(cache)
    assert kernel
    return kernel


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside an XZ-compressed bzImage (what scripts/extract-vmlinux does)."""
    at = bzimage.find(XZ_MAGIC)
    while at >= 0:
        try:
            elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[at:])
        except lzma.LZMAError:
            elf = b""
        if elf.startswith(b"\x7fELF"):
            return elf
        at = bzimage.find(XZ_MAGIC, at + 1)
    raise GuestError("no XZ-compressed ELF kernel in the bzImage")


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do insmod "/modules/$m" || echo "init: insmod $m failed"; done
arg() { sed -n "s/.*\bkproxy\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
run=$(arg run); modules=$(arg modules)
mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro hostroot /lower || exec poweroff -f
mount -t tmpfs -o size=75% tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || exec poweroff -f
for d in proc sys dev run; do mkdir -p "/newroot/$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/run/lock
mkdir -p "/newroot$run" /newroot/lib/modules
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results "/newroot$run" || exec poweroff -f
mount --bind "/newroot$modules" /newroot/lib/modules
echo /sbin/modprobe > /proc/sys/kernel/modprobe
hostname kproxy-guest
chroot /newroot /bin/sh "$run/command.sh" > "/newroot$run/console.log" 2>&1
echo $? > "/newroot$run/status"
sync
poweroff -f
"""

MODPROBE = """#!/bin/sh
exec chroot /newroot /sbin/modprobe "$@"
"""


def build_initramfs(root: Path, version: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="kproxy-initramfs-") as tmp:
        top = Path(tmp)
        for d in ("bin", "sbin", "proc", "sys", "dev", "modules"):
            (top / d).mkdir()
        shutil.copy2(BUSYBOX, top / "bin" / "busybox")
        (top / "init").write_text(INIT)
        (top / "sbin" / "modprobe").write_text(MODPROBE)
        os.chmod(top / "init", 0o755)
        os.chmod(top / "sbin" / "modprobe", 0o755)
        (top / "bin" / "sh").symlink_to("busybox")
        order: list[str] = []
        for module in INITRAMFS_MODULES:
            shown = subprocess.run(["modprobe", "-d", str(root), "-S", version, "--show-depends", module],
                                   capture_output=True, text=True, check=True).stdout
            for line in shown.splitlines():
                parts = line.split()
                if parts[:1] == ["insmod"]:
                    name = Path(parts[1]).name
                    if name not in order:
                        shutil.copy2(parts[1], top / "modules" / name)
                        order.append(name)
        (top / "modules.list").write_text("\n".join(order) + "\n")
        files = subprocess.run(["find", ".", "-print0"], cwd=top, capture_output=True, check=True).stdout
        with open(out, "wb") as sink:
            subprocess.run(["cpio", "--null", "-o", "-H", "newc", "--quiet"], cwd=top, input=files, stdout=sink,
                           check=True)


# --- running -------------------------------------------------------------------

@dataclass
class GuestRun:
    status: int  # the command's exit status
    console: str  # what the command printed (stdout and stderr)
    seconds: float


def run(argv: list[str], *, cwd: Path = REPO, env: dict[str, str] | None = None, timeout: float = 1800,
        run_dir: Path | None = None, log=print) -> GuestRun:
    """Boot a guest, run argv in cwd as root, power off. Raises GuestError if the guest itself fails.

    run_dir: the results share (console.log, status, whatever the command writes there), kept for
    the caller; without one, a temporary directory that is removed afterwards."""
    reason = unavailable_reason()
    if reason:
        raise GuestError(reason)
    kernel = ensure_kernel(log=log)
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="kproxy-guest-") as tmp:
            return _boot(kernel, argv, cwd, env, timeout, Path(tmp))
    return _boot(kernel, argv, cwd, env, timeout, run_dir.resolve())


def _console(run_dir: Path) -> str:
    try:
        return (run_dir / "console.log").read_text(errors="replace")
    except OSError:
        return ""


def _boot(kernel: GuestKernel, argv: list[str], cwd: Path, env: dict[str, str] | None, timeout: float,
          run_dir: Path) -> GuestRun:
    prepare(run_dir, command_script(argv, cwd, env))
    return finish(start(qemu_argv(kernel, run_dir), run_dir), timeout)


def command_script(argv: list[str], cwd: Path, env: dict[str, str] | None, prelude: list[str] | None = None) -> str:
    """The guest's command.sh: exports, the prelude's shell lines (as root, before cd), then exec argv in cwd."""
    exports = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
               "LANG": "C.UTF-8", IN_GUEST_ENV: "1", "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    # Nothing is loaded before the command: the guest stands for a user's freshly booted VM, and
    # kproxy must load what it needs itself (a preloaded br_netfilter once hid a same-node bug).
    script = ["set -e"] + [f"export {k}={shlex.quote(v)}" for k, v in exports.items()] + (prelude or []) + [
        f"cd {shlex.quote(str(cwd))}", "exec " + shlex.join(argv)]
    return "\n".join(script) + "\n"


def prepare(run_dir: Path, script: str) -> None:
    """The results share, with command.sh and without a previous run's status and console."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("status", "console.log"):
        (run_dir / stale).unlink(missing_ok=True)
    (run_dir / "command.sh").write_text(script)


def qemu_argv(kernel: GuestKernel, run_dir: Path, *, cpus: int = CPUS, devices: list[str] | None = None) -> list[str]:
    """QEMU's argv for a guest whose results share is run_dir; devices: more -fsdev/-netdev/-device options."""
    # Resolved: the initramfs binds it before the chroot, where a symlinked cache would point elsewhere.
    modules = (kernel.root / "lib" / "modules").resolve()
    cmdline = (f"console=ttyS0 panic=-1 quiet loglevel=3 mitigations=off rdinit=/init "
               f"kproxy.run={run_dir} kproxy.modules={modules}")
    return [QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus), "-m", str(MEMORY_MIB),
            "-kernel", str(kernel.vmlinux), "-initrd", str(kernel.initramfs), "-append", cmdline,
            "-nographic", "-monitor", "none", "-no-reboot", "-nic", "none",
            "-fsdev", "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-fsdev", f"local,id=results,path={run_dir},security_model=none",
            "-device", "virtio-9p-pci,fsdev=results,mount_tag=results", *(devices or [])]


@dataclass
class Booting:
    """A QEMU process started on a prepared run directory."""
    proc: subprocess.Popen[bytes]
    run_dir: Path
    started: float


def start(qemu: list[str], run_dir: Path, cwd: Path | None = None) -> Booting:
    """Start QEMU, its own output (the guest's kernel console among it) to run_dir/qemu.log."""
    with open(run_dir / "qemu.log", "wb") as out:
        proc = subprocess.Popen(qemu, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)
    return Booting(proc, run_dir, time.monotonic())


def kill(guest: Booting) -> None:
    guest.proc.kill()
    guest.proc.wait()


def finish(guest: Booting, timeout: float) -> GuestRun:
    """Wait until timeout s after the start, then collect the command's status and console.

    The guest is killed on a timeout or an interruption (Ctrl-C: it goes with whoever booted it)."""
    try:
        guest.proc.wait(timeout=max(0.0, guest.started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill(guest)
        raise GuestError(f"the guest did not finish within {timeout:.0f} s\nconsole tail:\n"
                         f"{_console(guest.run_dir)[-3000:]}")
    except BaseException:
        kill(guest)
        raise
    took = time.monotonic() - guest.started
    try:
        status = int((guest.run_dir / "status").read_text().strip())
    except (OSError, ValueError):
        raise GuestError(f"the guest reported no exit status (qemu exited {guest.proc.returncode})\nqemu log:\n"
                         f"{(guest.run_dir / 'qemu.log').read_text(errors='replace')[-3000:]}")
    return GuestRun(status, _console(guest.run_dir), took)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kproxy.guest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="download and unpack the kernel, build the initramfs (cached)")
    runp = sub.add_parser("run", help="boot a guest and run a command in the repo")
    runp.add_argument("--timeout", type=float, default=1800)
    runp.add_argument("--run-dir", type=Path)
    runp.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    try:
        if args.cmd == "build":
            reason = unavailable_reason()
            if reason:
                raise GuestError(reason)
            kernel = ensure_kernel()
            print(f"{kernel.version}: {kernel.vmlinux} {kernel.initramfs}")
            return 0
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not command:
            parser.error("run needs a command")
        result = run(command, timeout=args.timeout, run_dir=args.run_dir,
                     log=lambda m: print(m, file=sys.stderr))
    except GuestError as exc:
        print(f"kproxy guest: {exc}", file=sys.stderr)
        return 125
    sys.stdout.write(result.console)
    print(f"kproxy guest: exit status {result.status} after {result.seconds:.1f} s", file=sys.stderr)
    return result.status


if __name__ == "__main__":
    sys.exit(main())
