"""Sampling the server's hot path with py-spy while a load runs, and summarising it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path


def py_spy() -> str | None:
    """The py-spy executable next to this Python, or on PATH; None when not installed."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


def start(pid: int, duration_s: float, raw_out: Path) -> subprocess.Popen | None:
    """Record ``pid`` for ``duration_s`` into collapsed-stack text; None without py-spy."""
    exe = py_spy()
    if exe is None:
        return None
    return subprocess.Popen(
        [
            exe,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, int(duration_s))),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(raw_out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def summarise(raw: Path, top: int = 25) -> dict[str, object]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            incl_counts[frame] += count
    share = lambda counter: [  # noqa: E731 (a local formatter, used twice)
        {"frame": frame, "share": n / total} for frame, n in counter.most_common(top)
    ]
    ours = Counter({f: n for f, n in incl_counts.items() if "rnnserve" in f or "server/" in f})
    return {
        "samples": total,
        "rnnserve_inclusive": share(ours) if total else [],
        "self": share(self_counts) if total else [],
        "inclusive": share(incl_counts) if total else [],
    }
