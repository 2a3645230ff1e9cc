"""The bench report, without root: the document's schema, the plots' files, report.md's text, the terminal tables."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from rich.console import Console

from kproxy.bench import report

SCHEMA = json.loads((Path(report.__file__).parent / "schema.json").read_text())
SIZES = [1000, 10000]


def stats(median: float, spread: float = 0.1, samples: int = 3) -> dict[str, Any]:
    return {"min": median - spread, "median": median, "max": median + spread, "samples": samples}


def machine(where: str) -> dict[str, Any]:
    emulated = where == "guest"
    cpu = "QEMU TCG" if emulated else "Intel Xeon E-2288G"
    return {"label": f"{where}: {cpu}, 2 cores, kernel 6.1.0-28", "cpu": cpu, "cores": 2, "kernel": "6.1.0-28",
            "emulated": emulated}


def control_plane(mode: str, services: int) -> dict[str, Any]:
    return {"mode": mode, "services": services, "endpoints_per_service": 2, "full_sync_s": stats(0.5),
            "load_alone_s": stats(0.3), "one_change_sync_s": stats(0.2), "agent_cpu_s": stats(1.5),
            "agent_peak_rss_mib": stats(80, 2)}


def programming(mode: str, services: int) -> dict[str, Any]:
    return {"mode": mode, "services": services, "changes": 10, "p50_s": 0.12, "p99_s": 0.2, "max_s": 0.21}


def latency(mode: str, services: int) -> dict[str, Any]:
    return {"mode": mode, "services": services, "source": "pod", "locality": "cross-node", "path": "clusterip",
            "p50_ms": stats(0.7), "p99_ms": stats(1.2), "baseline_p50_ms": stats(0.5),
            "baseline_p99_ms": stats(0.9), "ratio_p50": 1.4,
            "failures": 0, "baseline_failures": 0}


def throughput(mode: str) -> dict[str, Any]:
    return {"mode": mode, "gbit_per_s": stats(9.5, 0.5), "baseline_gbit_per_s": stats(10, 0.5), "ratio": 0.95}


def overlay(name: str, vs_host_gw: float | None) -> dict[str, Any]:
    return {"overlay": name, "gbit_per_s": stats(8, 1), "rtt_ms": stats(0.3, 0.05), "cpu_s_per_gb": stats(2, 0.2),
            "vs_host_gw": vs_host_gw}


def run(where: str, modes: list[str], sizes: list[int], overlays: list[dict[str, Any]]) -> dict[str, Any]:
    return {"where": where, "machine": machine(where), "modes": modes,
            "control_plane": [control_plane(m, n) for m in modes for n in sizes],
            "programming": [programming(m, n) for m in modes for n in sizes],
            "latency": [latency(m, n) for m in modes for n in sizes],
            "throughput": [throughput(m) for m in modes],
            "overlays": overlays, "notes": []}


def document(*runs: dict[str, Any], command: str = "kproxy bench --full", profile: str = "full") -> dict[str, Any]:
    return {"schema": "kproxy-bench/1", "command": command, "profile": profile, "started": "2026-12-03T06:30:00Z",
            "seconds": 281.4, "runs": list(runs)}


def sample() -> dict[str, Any]:
    """Host with two modes and the overlays; the guest with all four modes; two sizes each."""
    host = run("host", ["iptables", "nftables"], SIZES,
               [overlay("udp", 0.4), overlay("vxlan", 0.84), overlay("host-gw", 1.0)])
    guest = run("guest", ["iptables", "userspace", "ipvs", "nftables"], SIZES, [])
    guest["notes"] = ["sizes above 10000 Services are not run in the guest (TCG)"]
    return document(host, guest)


def errors(doc: dict[str, Any]) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(doc)]


def test_the_schema_is_a_valid_draft_2020_12_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_sample_document_validates() -> None:
    assert errors(sample()) == []


def test_a_null_ratio_validates_it_means_the_baseline_median_was_zero() -> None:
    doc = sample()
    doc["runs"][0]["throughput"][0]["ratio"] = None
    assert errors(doc) == []


@pytest.mark.parametrize("path", [
    ("command",),
    ("runs", 0, "machine", "emulated"),
    ("runs", 0, "overlays"),
    ("runs", 1, "latency", 0, "ratio_p50"),
    ("runs", 0, "control_plane", 0, "full_sync_s", "samples"),
])
def test_a_document_missing_a_required_field_does_not_validate(path: tuple[Any, ...]) -> None:
    doc = sample()
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]
    assert errors(doc) != []


@pytest.mark.parametrize("path", [(), ("runs", 0), ("runs", 0, "machine"), ("runs", 1, "throughput", 0),
                                  ("runs", 0, "latency", 1, "p99_ms")])
def test_a_document_with_an_unknown_field_does_not_validate(path: tuple[Any, ...]) -> None:
    doc = sample()
    target = doc
    for key in path:
        target = target[key]
    target["surprise"] = 1
    assert errors(doc) != []


def test_values_outside_their_range_do_not_validate() -> None:
    for where, value in ((("schema",), "kproxy-bench/2"), (("runs", 0, "where"), "laptop"),
                         (("runs", 0, "latency", 0, "path"), "loadbalancer"),
                         (("runs", 0, "latency", 0, "p50_ms", "samples"), 0)):
        doc = sample()
        target = doc
        for key in where[:-1]:
            target = target[key]
        target[where[-1]] = value
        assert errors(doc) != [], where
    too_many = sample()
    too_many["runs"].append(copy.deepcopy(too_many["runs"][0]))
    assert errors(too_many) != []


def test_plots_writes_each_figure_per_run_and_never_mixes_host_and_guest(tmp_path: Path) -> None:
    images = report.plots(sample(), tmp_path)
    assert sorted(p.name for p in images) == [
        "latency-vs-services-guest.png", "latency-vs-services-host.png", "overlays-host.png",
        "sync-vs-services-guest.png", "sync-vs-services-host.png", "throughput-guest.png", "throughput-host.png"]
    assert all(p.parent == tmp_path and p.read_bytes().startswith(b"\x89PNG") for p in images)


def test_plots_skips_the_sections_a_run_did_not_measure(tmp_path: Path) -> None:
    only_overlays = run("host", [], SIZES, [overlay("vxlan", 0.84), overlay("host-gw", 1.0)])
    assert [p.name for p in report.plots(document(only_overlays), tmp_path)] == ["overlays-host.png"]


def test_latency_at_a_single_size_is_no_trend_and_gets_no_plot(tmp_path: Path) -> None:
    one_size = run("guest", ["ipvs"], [1000], [])
    assert [p.name for p in report.plots(document(one_size), tmp_path)] == ["sync-vs-services-guest.png",
                                                                            "throughput-guest.png"]


def tiny() -> dict[str, Any]:
    guest = run("guest", ["ipvs"], [1000], [])
    guest["throughput"][0]["ratio"] = None
    guest["notes"] = ["sizes above 10000 Services are not run in the guest (TCG)"]
    return document(guest, command="kproxy bench --quick --mode ipvs", profile="quick")


def test_report_md_for_one_run_one_mode_one_size(tmp_path: Path) -> None:
    doc = tiny()
    path = report.markdown(doc, report.plots(doc, tmp_path), tmp_path)
    assert path == tmp_path / "report.md"
    assert path.read_text() == """\
# kproxy bench

- Command: `kproxy bench --quick --mode ipvs`
- Date: 2026-12-03T06:30:00Z (took 281 s)
- Profile: quick
- Figures: min / median / max over the repetitions; ratios are of the medians

## On guest: QEMU TCG, 2 cores, kernel 6.1.0-28

QEMU TCG emulation: compare figures within this section only

sizes above 10000 Services are not run in the guest (TCG)

### Control plane

Full sync of N Services into one node, through the agent:

| mode | Services | endpoints each | full sync s | load alone s | one change s | agent CPU s | agent peak RSS MiB |
|---|---|---|---|---|---|---|---|
| ipvs | 1000 | 2 | 0.4 / 0.5 / 0.6 | 0.2 / 0.3 / 0.4 | 0.1 / 0.2 / 0.3 | 1.4 / 1.5 / 1.6 | 78 / 80 / 82 |

Apply to rules live on every node, 2-node lab:

| mode | Services | changes | p50 s | p99 s | max s |
|---|---|---|---|---|---|
| ipvs | 1000 | 10 | 0.12 | 0.2 | 0.21 |

![Control plane on guest](sync-vs-services-guest.png)

### Data-plane latency

Connect, request, answer, close; baseline: direct to the pod IP:

| mode | Services | source | locality | path | p50 ms | p99 ms | baseline p50 ms | baseline p99 ms | p50 / baseline | failed | baseline failed |
|---|---|---|---|---|---|---|---|---|---|---|---|
| ipvs | 1000 | pod | cross-node | clusterip | 0.6 / 0.7 / 0.8 | 1.1 / 1.2 / 1.3 | 0.4 / 0.5 / 0.6 | 0.8 / 0.9 / 1 | 1.40 | 0 | 0 |

### Throughput

iperf3, one TCP stream, cross node, from the client pod:

| mode | Gbit/s | direct pod Gbit/s | ratio |
|---|---|---|---|
| ipvs | 9 / 9.5 / 10 | 9.5 / 10 / 10.5 | n/a |

![Throughput on guest](throughput-guest.png)
"""


def test_report_md_links_images_relative_to_itself(tmp_path: Path) -> None:
    doc = sample()
    images = report.plots(doc, tmp_path / "figures")
    text = report.markdown(doc, images, tmp_path).read_text()
    assert "![Overlays on host](figures/overlays-host.png)" in text
    assert "overlays-guest" not in text
    # every host figure sits under the host's heading, before the guest's
    host, guest = text.split("## On guest")
    assert all("-host.png" in line for line in host.splitlines() if line.startswith("!["))
    assert all("-guest.png" in line for line in guest.splitlines() if line.startswith("!["))
    assert report.GUEST_NOTE not in host and report.GUEST_NOTE in guest


def test_table_prints_every_mode_and_where(tmp_path: Path) -> None:
    console = Console(record=True, width=120)
    report.table(sample(), console)
    text = console.export_text()
    for mode in ("iptables", "userspace", "ipvs", "nftables", "vxlan", "host-gw"):
        assert mode in text
    for title in ("host: Control plane", "guest: Control plane", "host: Overlays", "guest: Throughput",
                  "On guest: QEMU TCG, 2 cores", report.GUEST_NOTE):
        assert title in text
    assert "guest: Overlays" not in text


def test_the_results_in_the_docs_are_a_valid_document() -> None:
    """docs/benchmarks.md quotes docs/benchmarks/bench.json: it must stay what `kproxy bench` writes."""
    published = json.loads((Path(__file__).parent.parent / "docs" / "benchmarks" / "bench.json").read_text())
    jsonschema.validate(published, SCHEMA)
    assert {run["where"] for run in published["runs"]} == {"host", "guest"} and published["profile"] == "full"
