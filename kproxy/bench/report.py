"""The report side of 'kproxy bench': plots, report.md and the terminal tables, from one result document.

The document is the "kproxy-bench/1" JSON that kproxy/bench/schema.json describes. Everything here reads
it and nothing else, so a report can be redrawn from a saved document. Mode and overlay names come from
the data: a new proxy mode shows up in every table and plot without a change here.

Each run (host, guest) gets its own figures and its own section: a guest under QEMU TCG is many times
slower than the host, so its absolute numbers only mean something next to each other.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from rich.console import Console, JustifyMethod  # noqa: E402
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

Doc = dict[str, Any]
Run = dict[str, Any]
Row = dict[str, Any]

GUEST_NOTE = "QEMU TCG emulation: compare figures within this section only"
BASELINE_LABEL = "direct (pod IP)"


# -- reading the document ---------------------------------------------------------------------------

def modes_of(run: Run, rows: list[Row]) -> list[str]:
    """The modes in these rows, in the run's order; any the run does not list come last, as they appear."""
    present = {row["mode"] for row in rows}
    extra = [m for m in dict.fromkeys(row["mode"] for row in rows) if m not in run["modes"]]
    return [m for m in run["modes"] if m in present] + extra


def by_services(rows: list[Row], mode: str) -> list[Row]:
    return sorted((row for row in rows if row["mode"] == mode), key=lambda row: row["services"])


def figure_latency(run: Run) -> list[Row]:
    """The latency rows the plot shows: ClusterIP from a pod on another node (what most traffic is)."""
    return [row for row in run["latency"]
            if row["path"] == "clusterip" and row["source"] == "pod" and row["locality"] == "cross-node"]


def pooled(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """Several measurements of one thing as one: each mode's throughput row carries its own direct-to-pod
    baseline, all from the same run, and the plot shows them as one bar spanning them all."""
    return {"min": min(s["min"] for s in stats), "median": statistics.median(s["median"] for s in stats),
            "max": max(s["max"] for s in stats), "samples": sum(s["samples"] for s in stats)}


def machine_title(run: Run) -> str:
    machine = run["machine"]
    return f"{run['where']}: {machine['cpu']}, {machine['cores']} cores, kernel {machine['kernel']}"


# -- plots --------------------------------------------------------------------------------------------

def error_bars(stats: list[dict[str, Any]]) -> tuple[list[float], list[list[float]]]:
    """Medians, and the distances down to each min and up to each max, as errorbar() and bar() take them."""
    medians = [s["median"] for s in stats]
    return medians, [[m - s["min"] for m, s in zip(medians, stats)], [s["max"] - m for m, s in zip(medians, stats)]]


def line_per_mode(ax: Axes, run: Run, rows: list[Row], value: Callable[[Row], dict[str, Any] | float]) -> None:
    for mode in modes_of(run, rows):
        points = by_services(rows, mode)
        xs = [row["services"] for row in points]
        values = [value(row) for row in points]
        stats = [v for v in values if isinstance(v, dict)]
        if len(stats) == len(values):  # repeated measurements: median with min..max bars
            medians, spread = error_bars(stats)
            ax.errorbar(xs, medians, yerr=spread, marker="o", capsize=3, label=mode)
        else:
            ax.plot(xs, values, marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_xlabel("Services")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def latency_plot(run: Run, path: Path) -> Path | None:
    rows = figure_latency(run)
    if len({row["services"] for row in rows}) < 2:
        return None  # one size is a point, not a trend: the table says it
    fig, ax = plt.subplots(figsize=(8, 5))
    line_per_mode(ax, run, rows, lambda row: row["p50_ms"])
    ax.set_ylabel("ClusterIP p50 ms, pod to pod cross node")
    ax.set_title(machine_title(run))
    return save(fig, path)


def sync_plot(run: Run, path: Path) -> Path | None:
    if not run["control_plane"] and not run["programming"]:
        return None
    fig, (sync_ax, change_ax) = plt.subplots(1, 2, figsize=(12, 5))
    for ax, rows, value, ylabel in (
            (sync_ax, run["control_plane"], lambda row: row["full_sync_s"], "full sync s"),
            (change_ax, run["programming"], lambda row: row["p50_s"], "one change, network programming p50 s")):
        if rows:
            line_per_mode(ax, run, rows, value)
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(ylabel)
    fig.suptitle(machine_title(run))
    return save(fig, path)


def bars(ax: Axes, labels: list[str], stats: list[dict[str, Any]], ylabel: str) -> Any:
    medians, spread = error_bars(stats)
    drawn = ax.bar(labels, medians, yerr=spread, capsize=4)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    return drawn


def throughput_plot(run: Run, path: Path) -> Path | None:
    rows = run["throughput"]
    if not rows:
        return None
    modes = modes_of(run, rows)
    stats = [next(row["gbit_per_s"] for row in rows if row["mode"] == mode) for mode in modes]
    fig, ax = plt.subplots(figsize=(8, 5))
    bars(ax, modes + [BASELINE_LABEL], stats + [pooled([row["baseline_gbit_per_s"] for row in rows])],
         "Gbit/s, ClusterIP cross node (iperf3, one stream)")
    ax.set_title(machine_title(run))
    return save(fig, path)


def overlays_plot(run: Run, path: Path) -> Path | None:
    rows = run["overlays"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    drawn = bars(ax, [row["overlay"] for row in rows], [row["gbit_per_s"] for row in rows],
                 "Gbit/s pod to pod cross node")
    ax.bar_label(drawn, labels=[f"{ratio(row['vs_host_gw'])} of host-gw" for row in rows], padding=3)
    ax.set_title(machine_title(run))
    return save(fig, path)


PLOTS: dict[str, Callable[[Run, Path], Path | None]] = {
    "latency-vs-services": latency_plot,
    "sync-vs-services": sync_plot,
    "throughput": throughput_plot,
    "overlays": overlays_plot,
}


def plots(doc: Doc, out: Path) -> list[Path]:
    """Writes <kind>-<where>.png into out for each run and each kind it has data for; returns them."""
    out.mkdir(parents=True, exist_ok=True)
    written = [draw(run, out / f"{kind}-{run['where']}.png") for run in doc["runs"] for kind, draw in PLOTS.items()]
    return [path for path in written if path is not None]


# -- tables, shared by report.md and the terminal ------------------------------------------------------

def number(value: float) -> str:
    """Three significant figures, and no exponent for the large counts and MiB."""
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"  # null: the baseline's median was 0


def full(value: Any) -> str:
    """A cell of report.md: stats as min / median / max."""
    if isinstance(value, dict):
        return " / ".join(number(value[key]) for key in ("min", "median", "max"))
    return short(value)


def short(value: Any) -> str:
    """A cell of the terminal table: stats as their median."""
    if isinstance(value, dict):
        return number(value["median"])
    if isinstance(value, float):
        return number(value)
    return str(value)


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Row], Any]
    justify: JustifyMethod = "right"  # figures line up on their last digit; names read from the left


def name(header: str, key: str) -> Column:
    return Column(header, lambda row: row[key], "left")


def field(header: str, key: str) -> Column:
    return Column(header, lambda row: row[key])


def ratio_field(header: str, key: str) -> Column:
    return Column(header, lambda row: ratio(row[key]))


@dataclass(frozen=True)
class Section:
    key: str  # the run's list of rows
    title: str
    caption: str
    columns: list[Column]


SECTIONS = [
    Section("control_plane", "Control plane", "Full sync of N Services into one node, through the agent:",
            [name("mode", "mode"), field("Services", "services"), field("endpoints each", "endpoints_per_service"),
             field("full sync s", "full_sync_s"), field("load alone s", "load_alone_s"),
             field("one change s", "one_change_sync_s"), field("agent CPU s", "agent_cpu_s"),
             field("agent peak RSS MiB", "agent_peak_rss_mib")]),
    Section("programming", "Network programming", "Apply to rules live on every node, 2-node lab:",
            [name("mode", "mode"), field("Services", "services"), field("changes", "changes"),
             field("p50 s", "p50_s"), field("p99 s", "p99_s"), field("max s", "max_s")]),
    Section("latency", "Data-plane latency", "Connect, request, answer, close; baseline: direct to the pod IP:",
            [name("mode", "mode"), field("Services", "services"), name("source", "source"),
             name("locality", "locality"), name("path", "path"), field("p50 ms", "p50_ms"),
             field("p99 ms", "p99_ms"), field("baseline p50 ms", "baseline_p50_ms"),
             field("baseline p99 ms", "baseline_p99_ms"), ratio_field("p50 / baseline", "ratio_p50"),
             field("failed", "failures"), field("baseline failed", "baseline_failures")]),
    Section("throughput", "Throughput", "iperf3, one TCP stream, cross node, from the client pod:",
            [name("mode", "mode"), field("Gbit/s", "gbit_per_s"), field("direct pod Gbit/s", "baseline_gbit_per_s"),
             ratio_field("ratio", "ratio")]),
    Section("overlays", "Overlays", "Pod to pod across nodes, per overlay:",
            [name("overlay", "overlay"), field("Gbit/s", "gbit_per_s"), field("RTT ms", "rtt_ms"),
             field("CPU s/GB", "cpu_s_per_gb"), ratio_field("vs host-gw", "vs_host_gw")]),
]

# report.md groups control plane and network programming under one heading, as the sync plot does.
MARKDOWN_HEADINGS = {"control_plane": "Control plane", "programming": "Control plane", "latency": "Data-plane latency",
                     "throughput": "Throughput", "overlays": "Overlays"}
FIGURES = {"Control plane": "sync-vs-services", "Data-plane latency": "latency-vs-services",
           "Throughput": "throughput", "Overlays": "overlays"}


def run_notes(run: Run) -> list[str]:
    return ([GUEST_NOTE] if run["where"] == "guest" else []) + list(run["notes"])


# -- report.md ------------------------------------------------------------------------------------------

def pipe_table(section: Section, rows: list[Row]) -> list[str]:
    lines = ["| " + " | ".join(c.header for c in section.columns) + " |",
             "|" + "|".join("---" for _ in section.columns) + "|"]
    return lines + ["| " + " | ".join(full(c.cell(row)) for c in section.columns) + " |" for row in rows]


def image_links(run: Run, heading: str, images: list[Path], out: Path) -> list[str]:
    name = f"{FIGURES[heading]}-{run['where']}.png"
    return [f"![{heading} on {run['where']}]({Path(os.path.relpath(image, out)).as_posix()})"
            for image in images if image.name == name]


def run_markdown(run: Run, images: list[Path], out: Path) -> list[str]:
    lines = [f"## On {run['machine']['label']}", ""]
    lines += [line for note in run_notes(run) for line in (note, "")]
    headings: dict[str, list[str]] = {}
    for section in SECTIONS:
        if run[section.key]:
            body = headings.setdefault(MARKDOWN_HEADINGS[section.key], [])
            body += [section.caption, ""] + pipe_table(section, run[section.key]) + [""]
    for heading, body in headings.items():
        figures = image_links(run, heading, images, out)
        lines += [f"### {heading}", ""] + body + [line for link in figures for line in (link, "")]
    return lines


def markdown(doc: Doc, images: list[Path], out: Path) -> Path:
    """Writes out/report.md: the run's header, then a section per run with its tables and figures."""
    lines = ["# kproxy bench", "",
             f"- Command: `{doc['command']}`",
             f"- Date: {doc['started']} (took {number(doc['seconds'])} s)",
             f"- Profile: {doc['profile']}",
             "- Figures: min / median / max over the repetitions; ratios are of the medians",
             ""]
    for run in doc["runs"]:
        lines += run_markdown(run, images, out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.md"
    path.write_text("\n".join(lines).rstrip("\n") + "\n")
    return path


# -- terminal -------------------------------------------------------------------------------------------

def section_table(run: Run, section: Section) -> Table:
    table = Table(title=f"{run['where']}: {section.title}", caption="medians; report.md has min and max")
    for column in section.columns:
        table.add_column(column.header, justify=column.justify)
    for row in run[section.key]:
        table.add_row(*(short(column.cell(row)) for column in section.columns))
    return table


def table(doc: Doc, console: Console) -> None:
    """Prints each run's sections as rich tables: the figures of report.md, medians only."""
    for run in doc["runs"]:
        # Text, not markup: a label or note may hold brackets that rich would take for tags.
        console.rule(Text(f"On {run['machine']['label']}"))
        for note in run_notes(run):
            console.print(Text(note))
        for section in SECTIONS:
            if run[section.key]:
                console.print(section_table(run, section))
