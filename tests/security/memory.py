"""A server process's resident memory, read from /proc: what the security tests bound."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path


def rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def tree_rss_mb(pid: int) -> float:
    """RSS of ``pid`` and its children (the engine and its frontend processes), in MiB."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return rss_mb(pid) + sum(rss_mb(int(child)) for child in children)


class PeakRss:
    """Samples a process's RSS every 10 ms on a thread; ``peak`` is the largest seen.

    ``measure`` reads it: :func:`rss_mb` (the process alone) unless told otherwise, e.g.
    :func:`tree_rss_mb` for a server with frontend processes."""

    def __init__(self, pid: int, measure: Callable[[int], float] = rss_mb) -> None:
        self.pid = pid
        self._measure = measure
        self.peak = measure(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._measure(self.pid))
            time.sleep(0.01)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._measure(self.pid))
