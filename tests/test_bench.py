"""`kproxy bench` as a user runs it: the quick profile end to end, and its refusals.

The smoke test asserts no timings (figures belong in docs/benchmarks.md): it checks that the
document is valid against its schema, that every registered mode was measured with a baseline
from the same run, and that the plots and the report exist. Where this kernel lacks IPVS the
benchmark boots its own QEMU guest for every mode's figures, as it does for a user.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import jsonschema
import pytest

from kproxy.lab.state import existing_labs
from kproxy.proxy import MODES
from tests.labtools import KPROXY

pytestmark = pytest.mark.kernel
SCHEMA = json.loads((Path(__file__).parent.parent / "kproxy" / "bench" / "schema.json").read_text())


def namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def as_foreground_job() -> None:
    """SIGINT at its default, as in a job started from a terminal. A job a shell puts in the background
    (as CI's runner may do) starts with SIGINT ignored, Python keeps it ignored, and Ctrl-C would not reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bench(*argv: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KPROXY, "bench", *argv], capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(1800)  # the quick profile takes minutes, a guest boot included
def test_quick_run_measures_every_mode_against_a_baseline(tmp_path: Path) -> None:
    before = namespaces()
    done = bench("--quick", "--out", str(tmp_path / "out"), "--json", str(tmp_path / "results.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["profile"] == "quick" and doc["command"].startswith("kproxy bench --quick")
    measured = {run["where"]: run for run in doc["runs"]}
    for mode in MODES:
        runs = [run for run in doc["runs"] if mode in run["modes"]]
        assert runs, f"{mode} measured nowhere"
        for run in runs:
            latency = [row for row in run["latency"] if row["mode"] == mode]
            assert {(row["source"], row["locality"], row["services"]) for row in latency} == {
                (source, locality, n) for source in ("pod", "external") for locality in ("same-node", "cross-node")
                for n in (10, 100)}
            assert all(row["baseline_p50_ms"]["samples"] == 2 and row["ratio_p50"] for row in latency)
            throughput = [row for row in run["throughput"] if row["mode"] == mode]
            assert len(throughput) == 1 and throughput[0]["baseline_gbit_per_s"]["median"] > 0
            assert {row["services"] for row in run["control_plane"] if row["mode"] == mode} == {10, 100}
    # One run per place; where some mode cannot run here, the guest measured every mode.
    if set(measured) == {"host", "guest"}:
        assert measured["guest"]["modes"] == list(MODES) and measured["guest"]["machine"]["emulated"]
    assert {row["overlay"] for row in measured["host"]["overlays"]} == {"udp", "vxlan", "host-gw"}
    out = tmp_path / "out"
    report = (out / "report.md").read_text()
    for run in doc["runs"]:
        for kind in ("latency-vs-services", "sync-vs-services", "throughput"):
            image = out / f"{kind}-{run['where']}.png"
            assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({image.name})" in report
    assert (out / "overlays-host.png").exists()
    assert not [lab for lab in existing_labs() if lab.startswith("bench-")]
    assert namespaces() <= before  # its labs' and agents' namespaces are gone (the session guards the root one)


@pytest.mark.parametrize(("argv", "error"), [
    (["--modes", "iptables,nope"], "argument --modes: unknown mode nope (known: iptables, userspace, ipvs, nftables)"),
    (["--overlays", "geneve"], "argument --overlays: unknown overlay geneve"),
    (["--services", "1,100"], "argument --services: each size must be at least 3"),
    (["--only", "dns"], "argument --only: unknown section dns (known: control, data, overlays)"),
])
def test_bad_options_are_one_line_and_run_nothing(tmp_path: Path, argv: list[str], error: str) -> None:
    done = bench(*argv, "--out", str(tmp_path / "out"), timeout=60)
    assert done.returncode == 2 and error in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_lab_in_the_way_is_refused_and_kept(tmp_path: Path) -> None:
    topology = tmp_path / "lab.yaml"
    topology.write_text("nodes: [{name: node1}]\n")
    subprocess.run([KPROXY, "lab", "up", "-f", str(topology), "--name", "bench-ov-vxlan", "--no-dns"], check=True,
                   capture_output=True)
    try:
        done = bench("--only", "overlays", "--overlays", "vxlan", "--out", str(tmp_path / "out"), timeout=120)
        assert done.returncode == 1
        assert done.stderr.strip() == ("kproxy: error: a lab named bench-ov-vxlan exists; the benchmark makes its "
                                       "own (kproxy lab down bench-ov-vxlan)")
        assert "bench-ov-vxlan" in existing_labs()
    finally:
        subprocess.run([KPROXY, "lab", "down", "bench-ov-vxlan"], capture_output=True)


def test_ctrl_c_takes_down_what_it_brought_up(tmp_path: Path) -> None:
    before = namespaces()
    running = subprocess.Popen([KPROXY, "bench", "--only", "overlays", "--overlays", "vxlan,host-gw", "--repeats", "50",
                                "--out", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, preexec_fn=as_foreground_job)
    try:
        step = running.stderr.readline() if running.stderr else ""
        while step and "vxlan, repetition 1/50" not in step:  # its labs are up and measuring
            step = running.stderr.readline() if running.stderr else ""
        assert "vxlan, repetition 1/50" in step, "the benchmark ended before it measured"
        running.send_signal(signal.SIGINT)
        _, err = running.communicate(timeout=120)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode == 130 and err.strip().endswith("kproxy: interrupted")
    assert not [lab for lab in existing_labs() if lab.startswith("bench-")]
    assert namespaces() <= before
    assert not (tmp_path / "out" / "bench.json").exists()
