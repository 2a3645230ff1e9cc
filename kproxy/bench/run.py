"""The run of `kproxy bench` (kproxy/bench/options.py has its options): measuring here, in the guest, and the report."""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kproxy import guest
from kproxy.bench import controlplane, dataplane, overlays, report
from kproxy.bench.options import Profile, profile_of
from kproxy.bench.labs import refuse_existing
from kproxy.bench.machine import HOST_CPU_ENV, cpu_model, describe
from kproxy.errors import KproxyError
from kproxy.proxy import mode as proxy_mode

TOOLS = ("ip", "nsenter", "ss", "iperf3", "ping")
GUEST_MAX_SERVICES = 1000  # beyond this the emulated guest takes most of an hour (IPVS syncs 10k in ~5 min there)
GUEST_TIMEOUT = 4 * 3600.0
SCHEMA = "kproxy-bench/1"


def refusal(modes: tuple[str, ...], need_guest: bool) -> str:
    """Why this run cannot start here, or "" (the CLI has refused a user who is not root)."""
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        return f"missing {', '.join(missing)} (scripts/setup installs them; the benchmark installs nothing)"
    if need_guest:
        if guest.in_guest():
            return f"this guest's kernel lacks what {', '.join(modes)} need"
        reason = guest.unavailable_reason()
        if reason:
            lacking = [m for m in modes if not proxy_mode(m).runs_here()]
            return f"this kernel lacks what {', '.join(lacking)} need and no guest can boot here: {reason}"
    return ""


def measure_here(modes: tuple[str, ...], sections: tuple[str, ...], overlay_names: tuple[str, ...],
                 profile: Profile, step: Callable[[str], None], notes: list[str]) -> dict[str, Any]:
    """One run of the document, measured on the machine this process runs on."""
    run: dict[str, Any] = {"where": "guest" if guest.in_guest() else "host", "machine": describe(),
                           "modes": list(modes), "control_plane": [], "programming": [], "latency": [],
                           "throughput": [], "overlays": [], "notes": notes}
    sections_measured = []
    if modes and "control" in sections:
        sections_measured.append(controlplane.measure(control_plan(modes, profile), step))
    if modes and "data" in sections:
        sections_measured.append(dataplane.measure(data_plan(modes, profile), step))
    for measured in sections_measured:
        run["notes"] += measured.pop("notes")
        run |= measured
    if overlay_names and "overlays" in sections:
        run["overlays"] = overlays.measure(overlay_plan(overlay_names, profile), step)
    return run


def control_plan(modes: tuple[str, ...], profile: Profile) -> controlplane.Plan:
    return controlplane.Plan(modes, profile.services, profile.repeats, profile.changes)


def data_plan(modes: tuple[str, ...], profile: Profile) -> dataplane.Plan:
    return dataplane.Plan(modes, profile.services, profile.repeats, profile.requests, profile.changes,
                          profile.iperf_seconds)


def overlay_plan(overlay_names: tuple[str, ...], profile: Profile) -> overlays.Plan:
    return overlays.Plan(overlay_names, profile.repeats, profile.iperf_seconds)


def lab_names(modes: tuple[str, ...], sections: tuple[str, ...], overlay_names: tuple[str, ...],
              profile: Profile) -> list[str]:
    names = []
    if modes and "data" in sections:
        plan = data_plan(modes, profile)
        names += [dataplane.lab_name(plan, mode) for mode in modes]
    if overlay_names and "overlays" in sections:
        names += list(overlays.lab_names(overlay_plan(overlay_names, profile)).values())
    return names


def steps(modes: tuple[str, ...], sections: tuple[str, ...], overlay_names: tuple[str, ...], profile: Profile) -> int:
    total = 0
    if modes and "control" in sections:
        total += controlplane.steps(control_plan(modes, profile))
    if modes and "data" in sections:
        total += dataplane.steps(data_plan(modes, profile))
    if overlay_names and "overlays" in sections:
        total += overlays.steps(overlay_plan(overlay_names, profile))
    return total


def guest_argv(modes: tuple[str, ...], sections: tuple[str, ...], profile: Profile, out: Path) -> list[str]:
    """This benchmark, run inside the guest on every mode, its sizes capped for the emulator."""
    capped = [n for n in profile.services if n <= GUEST_MAX_SERVICES] or [min(profile.services)]
    return [sys.executable, "-m", "kproxy.bench.run", "--modes", ",".join(modes), "--overlays", "none",
            "--only", ",".join(s for s in sections if s != "overlays") or "control",
            "--services", ",".join(map(str, capped)), "--repeats", str(profile.repeats),
            *(["--quick"] if profile.name == "quick" else []), "--out", str(out), "--json", str(out / "bench.json")]


def measure_in_guest(argv: list[str], out: Path, progress: Progress, task: Any) -> dict[str, Any]:
    """Boot the guest, run argv there, and return its one run; its console's last step is shown meanwhile.
    The guest runs in this thread, so that Ctrl-C reaches it (kproxy.guest kills QEMU then)."""
    done = threading.Event()

    def show() -> None:
        while not done.wait(1.0):
            lines = [line for line in guest_console(out).splitlines() if line.startswith("step: ")]
            progress.update(task, description=f"guest: {lines[-1][6:] if lines else 'booting'}")
    threading.Thread(target=show, daemon=True).start()
    try:
        finished = guest.run(argv, env={HOST_CPU_ENV: cpu_model()}, timeout=GUEST_TIMEOUT, run_dir=out,
                             log=lambda m: None)
    except guest.GuestError as exc:
        raise KproxyError(f"the guest failed: {str(exc).splitlines()[0]} (its logs: {out})")
    finally:
        done.set()
    if finished.status != 0:
        tail = "\n".join(finished.console.strip().splitlines()[-5:])
        raise KproxyError(f"the benchmark in the guest failed (exit {finished.status}): {tail}")
    return json.loads((out / "bench.json").read_text())["runs"][0]


def guest_console(out: Path) -> str:
    try:
        return (out / "console.log").read_text(errors="replace")
    except OSError:
        return ""


def execute(args: argparse.Namespace, typed: list[str]) -> int:
    """The whole run; typed: the arguments as given, for the document's command."""
    console = Console(stderr=True)
    profile = profile_of(args)
    here = tuple(m for m in args.modes if proxy_mode(m).runs_here())
    in_guest_too = here != args.modes and any(s in args.only for s in ("control", "data"))
    reason = refusal(args.modes, in_guest_too)
    if reason:
        raise KproxyError(reason)
    refuse_existing(lab_names(here, args.only, args.overlays, profile))  # before anything is measured
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path = (args.json or out / "bench.json").resolve()
    started = time.monotonic()
    doc: dict[str, Any] = {"schema": SCHEMA, "command": shlex.join(["kproxy", "bench", *typed]),
                           "profile": profile.name, "seconds": 0.0,
                           "started": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "runs": []}
    notes = [] if not in_guest_too else [
        f"{', '.join(m for m in args.modes if m not in here)}: not on this kernel; every mode is measured "
        "in the guest too, and reported there"]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("starting", total=steps(here, args.only, args.overlays, profile)
                                 + (1 if in_guest_too else 0))

        def step(description: str) -> None:
            if not console.is_terminal:  # a log (the guest's console.log: the host shows its last step)
                print(f"step: {description} (at {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
            progress.update(task, description=description)
            progress.advance(task)
        if steps(here, args.only, args.overlays, profile):  # anything to measure on this machine
            doc["runs"].append(measure_here(here, args.only, args.overlays, profile, step, notes))
        if in_guest_too:
            guest_dir = out / "guest"
            guest_run = measure_in_guest(guest_argv(args.modes, args.only, profile, guest_dir), guest_dir,
                                         progress, task)
            if max(profile.services) > GUEST_MAX_SERVICES:
                guest_run["notes"].append(f"sizes above {GUEST_MAX_SERVICES} Services are not run in the "
                                          "emulated guest: 10k alone would take most of an hour there")
            doc["runs"].append(guest_run)
            progress.advance(task)
    doc["seconds"] = round(time.monotonic() - started, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2) + "\n")
    images = report.plots(doc, out)
    written = report.markdown(doc, images, out)
    shown = Console()
    report.table(doc, shown if shown.is_terminal else Console(width=150))  # a log has room for every column
    console.print(f"results: {json_path}, {written}, {len(images)} plots in {out}", markup=False, highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m kproxy.bench.run`: what the guest runs, and the same as `kproxy bench`."""
    from kproxy.cli import main as cli_main
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
