"""Running a packet lab: its own small lab (or the one given), the task, the experiment, PASS or FAIL,
and the cleanup of what it brought up, however it ends."""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TextIO

import yaml

from kproxy.errors import KproxyError
from kproxy.lab.state import lab_exists, load_state
from kproxy.packetlab import PacketLab
from kproxy.packetlab.session import Session, kproxy


GET_KIND = {"Service": "svc", "Pod": "pods", "Deployment": "deployments"}  # kproxy get's word for a kind


def own_lab_name(lab: PacketLab) -> str:
    return f"pl{lab.number}"


def _choose(what: str, given: str | None, allowed: tuple[str, ...], lab: PacketLab) -> str:
    if given is None:
        return allowed[0]
    if given not in allowed:
        raise KproxyError(f"packet lab {lab.name} runs with {what} {', '.join(allowed)}, not {given}")
    return given


def _bring_up(lab: PacketLab, mode: str, overlay: str, cleanup: ExitStack) -> str:
    name = own_lab_name(lab)
    if lab_exists(name):
        raise KproxyError(f"a lab named {name} exists; packet lab {lab.name} makes its own "
                          f"(kproxy lab down {name}, or run it there with --lab {name})")
    cleanup.callback(kproxy, "lab", "down", name)
    with tempfile.TemporaryDirectory(prefix="kproxy-packet-lab-") as tmp:
        topology = Path(tmp) / "lab.yaml"
        topology.write_text(yaml.safe_dump({"name": name, **lab.topology}))
        options = [arg for option in lab.mode_options for arg in ("--mode-opt", option)]
        kproxy("lab", "up", "-f", str(topology), "--name", name, "--overlay", overlay, "--mode", mode,
               *options, "--dns" if lab.dns else "--no-dns")
    return name


def _use_existing(lab: PacketLab, name: str) -> None:
    state = load_state(name)
    if state is None:
        raise KproxyError(f"lab {name} does not exist (or has only leftovers); start it with 'kproxy lab up'")
    _choose("mode", state.mode, lab.modes, lab)
    _choose("overlay", state.overlay, lab.overlays, lab)
    missing = [p["name"] for p in lab.topology["pods"] if p["name"] not in {pod.name for pod in state.pods.values()}]
    if missing:
        raise KproxyError(f"lab {name} lacks the pods packet lab {lab.name} needs: {', '.join(missing)}")
    # What the lab applies, it deletes afterwards: it must not replace (and then delete) a user's object.
    for obj in yaml.safe_load_all(lab.manifests):
        kind, meta = obj["kind"], obj["metadata"]
        listed = json.loads(kproxy("get", GET_KIND[kind], "--lab", name, "-n", meta.get("namespace", "default"),
                                   "-o", "json"))
        if meta["name"] in {item["metadata"]["name"] for item in listed["items"]}:
            raise KproxyError(f"lab {name} has a {kind} {meta['name']} of its own; packet lab {lab.name} applies "
                              "one of that name (run it in its own lab: leave out --lab)")


def run_lab(lab: PacketLab, *, existing: str | None = None, mode: str | None = None, overlay: str | None = None,
            task: bool = True, solve: bool = False, wait: bool = False, out: TextIO = sys.stdout) -> bool:
    """Runs lab; True on PASS. task prints the task first; wait lets the learner explore until Enter;
    solve narrates the experiment. Everything it brought up or applied goes again before it returns."""
    if existing and (mode or overlay):
        raise KproxyError("--mode and --overlay choose how the lab's own lab is brought up; not with --lab")
    chosen_mode, chosen_overlay = _choose("mode", mode, lab.modes, lab), _choose("overlay", overlay, lab.overlays, lab)
    with ExitStack() as cleanup:
        if existing:
            _use_existing(lab, existing)
            name = existing
        else:
            name = _bring_up(lab, chosen_mode, chosen_overlay, cleanup)
        if lab.manifests:
            kproxy("apply", "--lab", name, "-f", "-", stdin=lab.manifests)
            if existing:
                cleanup.callback(kproxy, "delete", "--lab", name, "--grace-period", "0", "-f", "-", stdin=lab.manifests)
        session = Session(name, narrate=solve, out=out)
        print(f"packet lab {lab.number}: {lab.title}  (lab {name}, {session.overlay}, {session.mode} mode)", file=out)
        if task:
            print(file=out)
            print(lab.task.strip().replace("LAB", name), file=out)
            print(file=out)
        if wait:
            print("Explore in another terminal; press Enter to run the lab's experiment and check.", file=out, flush=True)
            sys.stdin.readline()
        lab.experiment(session)
        print(file=out)
        for claim in session.claims:
            print(f"  {'ok  ' if claim.holds else 'FAIL'}  {claim.text}: {claim.seen}", file=out)
        verdict = session.passed
        print(f"{'PASS' if verdict else 'FAIL'}  packet lab {lab.name}", file=out, flush=True)
    return verdict
