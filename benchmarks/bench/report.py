"""Writing a run out: the JSON document, two PNG plots, and the rich table of targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_json(doc: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")


def write_plots(doc: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """Latency CDF and throughput vs sessions against the floors (Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cdf = doc["latency_cdf"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, values in cdf["series"].items():
        if values:
            ax.plot([1e3 * v for v in values], cdf["quantiles"], label=label)
    ax.set_xscale("log")
    ax.set_xlabel("latency per request (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Step latency CDF")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out_dir / f"{stem}-latency-cdf.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, style in (("stream", "o-"), ("coalesced", "s-")):
        series = doc["rnnserve"]["throughput"][mode]
        xs = sorted(int(n) for n in series)
        ax.plot(xs, [series[str(x)]["steps_per_s"] for x in xs], style, label=f"rnnserve {mode}")
    echo = doc["transport_floor"]["stream"]
    xs = sorted(int(n) for n in echo)
    ax.plot(xs, [echo[str(x)]["messages_per_s"] for x in xs], "k--", label="echo floor (msgs/s)")
    co = doc["transport_floor"]["coalesced"]
    xs = sorted(int(n) for n in co)
    ax.plot(xs, [co[str(x)]["steps_per_s"] for x in xs], "k:", label="echo floor coalesced")
    for batch, v in doc["model_floor"].items():
        ax.axhline(v["steps_per_s"], color="grey", alpha=0.4, lw=1)
        ax.annotate(f"ORT batch {batch}", (1, v["steps_per_s"]), fontsize=7, color="grey")
    off = doc["rnnserve"]["batching"].get("off")
    if off:
        ax.plot([256], [off["steps_per_s"]], "rx", label="rnnserve batching off")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent sessions (streams)")
    ax.set_ylabel("steps/s (log)")
    ax.set_title("Throughput vs sessions, against the floors")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out_dir / f"{stem}-throughput.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def print_table(doc: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="rnnserve vs floors (ratios from this run)")
    for column in ("target", "ratio", "limit", "met", "measured"):
        table.add_column(column)
    for row in doc["targets"]:
        table.add_row(
            row["target"],
            f"{row['value']:.2f}",
            f"{row['direction']} {row['limit']:g}",
            "[green]pass[/]" if row["met"] else "[red]FAIL[/]",
            row["detail"],
        )
    console.print(table)
