"""What the mixed soak remembers of each lane, and its reference: onnxruntime run directly.

A *lane* is one logical session. Its history is a list of *segments*: a segment starts when
the lane is opened or reset (from zeros or a given state) and holds every step applied since,
each with the model version it ran on (a lane moves to a new version when it is reopened or
moved). Reopening from an exported state continues the segment: the exported state must be
the reference's state there, so later outputs prove it was.

Everything the server answered is kept with where in its segment it happened (step outputs,
exported states, the outputs of forks stepped from a point of the segment) and is checked at
the end against onnxruntime run on the segment's inputs, one call per version run; a number
from another session (cross-talk), a step applied twice or a state restored wrong shows as a
mismatch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .harness import HIDDEN_SIZE, INPUT_SIZE, MODEL

#: Tolerance of every comparison with the reference (as the original soak's).
RTOL, ATOL = 1e-5, 1e-6
STATE_NAMES = ("initial_h", "initial_c")


def lane_inputs(key: int, tick: int, timesteps: int) -> np.ndarray:
    """The inputs of a lane's ``tick``-th step call (``key`` tells lanes and forks apart)."""
    rng = np.random.default_rng([key, tick])
    return rng.standard_normal((timesteps, INPUT_SIZE)).astype(np.float32)


def some_state(key: int, tick: int) -> dict[str, np.ndarray]:
    """A state to reset a lane to: per-session shape (1, H) for each pair."""
    rng = np.random.default_rng([key, tick, 7])
    return {
        name: (rng.standard_normal((1, HIDDEN_SIZE)) * 0.5).astype(np.float32)
        for name in STATE_NAMES
    }


@dataclass
class Segment:
    """Steps applied since an open or a reset; ``initial`` None means zeros."""

    initial: dict[str, np.ndarray] | None
    steps: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (version, x (T, 4))


@dataclass
class Track:
    """Anything that steps: a lane or a fork."""

    session_id: str
    key: int  # inputs key: lanes and forks each step inputs of their own
    position: int = 0
    tick: int = 0  # step calls drawn (the inputs of the next one)
    hops: int = 0  # calls made: which replica the next one goes to, where they alternate
    trace: list[str] = field(default_factory=list)  # what was sent where, for a failure

    def note(self, what: str) -> None:
        self.trace.append(f"{time.monotonic():.4f} {self.session_id} {what}")

    def next_inputs(self, timesteps: int) -> np.ndarray:
        x = lane_inputs(self.key, self.tick, timesteps)
        self.tick += 1
        return x


@dataclass
class Fork(Track):
    """A fork of a lane taken after ``offset`` steps of the lane's segment ``segment``."""

    segment: int = 0
    offset: int = 0
    version: str = "1"
    steps: list[np.ndarray] = field(default_factory=list)
    got: list[np.ndarray] = field(default_factory=list)

    def applied(self, x: np.ndarray, y: np.ndarray) -> None:
        self.steps.append(x)
        self.got.append(y)
        self.position += len(x)


@dataclass
class Lane(Track):
    """One logical session; its session id changes when it is reopened."""

    index: int = 0
    version: str = "1"
    opened: int = 0  # reopenings (new session ids)
    segments: list[Segment] = field(default_factory=lambda: [Segment(None)])
    got: list[tuple[int, int, np.ndarray]] = field(default_factory=list)  # segment, step, y
    exports: list[tuple[int, int, dict[str, np.ndarray]]] = field(default_factory=list)
    forks: list[Fork] = field(default_factory=list)
    final: dict[str, np.ndarray] | None = None

    def applied(self, x: np.ndarray, y: np.ndarray) -> None:
        segment = self.segments[-1]
        self.got.append((len(self.segments) - 1, len(segment.steps), y))
        segment.steps.append((self.version, x))
        self.position += len(x)

    def reset(self, state: dict[str, np.ndarray] | None) -> None:
        self.segments.append(Segment(state))
        self.position = 0

    def here(self) -> tuple[int, int]:
        """(segment, steps into it): where the lane is now."""
        return len(self.segments) - 1, len(self.segments[-1].steps)


class Reference:
    """onnxruntime sessions of the served versions, run on whole paths of steps."""

    def __init__(self, repository: Path) -> None:
        self._repository = repository
        self._runners: dict[str, ort.InferenceSession] = {}

    def _runner(self, version: str) -> ort.InferenceSession:
        if version not in self._runners:
            path = self._repository / MODEL / version / "model.onnx"
            self._runners[version] = ort.InferenceSession(
                str(path), providers=["CPUExecutionProvider"]
            )
        return self._runners[version]

    def run(
        self, initial: dict[str, np.ndarray] | None, steps: list[tuple[str, np.ndarray]]
    ) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """Each step's outputs (T, H) and the final state (per session, (1, H) per pair);
        one onnxruntime call per run of steps on one version."""
        state = {
            name: np.zeros((1, HIDDEN_SIZE), np.float32)
            if initial is None
            else np.asarray(initial[name], np.float32)
            for name in STATE_NAMES
        }
        outputs: list[np.ndarray] = []
        start = 0
        while start < len(steps):
            version = steps[start][0]
            stop = start
            while stop < len(steps) and steps[stop][0] == version:
                stop += 1
            xs = [x for _, x in steps[start:stop]]
            feeds = {"X": np.concatenate(xs)[:, None, :]}
            feeds.update({name: value[:, None, :] for name, value in state.items()})
            y, y_h, y_c = self._runner(version).run(["Y", "Y_h", "Y_c"], feeds)
            state = {"initial_h": y_h[:, 0], "initial_c": y_c[:, 0]}
            at = 0
            for x in xs:
                outputs.append(y[at : at + len(x), 0, 0])
                at += len(x)
            start = stop
        return outputs, state


def check_lane(lane: Lane, reference: Reference) -> list[str]:
    """Every answer the lane and its forks got against the reference: the mismatches."""
    wrong: list[str] = []

    def differs(got: np.ndarray, want: np.ndarray) -> bool:
        return got.shape != want.shape or not np.allclose(got, want, rtol=RTOL, atol=ATOL)

    runs = [reference.run(s.initial, s.steps) for s in lane.segments]
    for segment, step, y in lane.got:
        if differs(y, runs[segment][0][step]):
            wrong.append(f"lane {lane.index} segment {segment} step {step}: output")
    for segment, step, state in lane.exports:
        seg = lane.segments[segment]
        _, want = reference.run(seg.initial, seg.steps[:step])
        for name in STATE_NAMES:
            if differs(state[name], want[name]):
                wrong.append(f"lane {lane.index} segment {segment} step {step}: export {name}")
    for fork in lane.forks:
        seg = lane.segments[fork.segment]
        path = seg.steps[: fork.offset] + [(fork.version, x) for x in fork.steps]
        want_ys, _ = reference.run(seg.initial, path)
        for n, y in enumerate(fork.got):
            if differs(y, want_ys[fork.offset + n]):
                wrong.append(f"lane {lane.index} fork {fork.session_id} step {n}: output")
    if lane.final is not None:
        _, want = runs[-1]
        for name in STATE_NAMES:
            if differs(lane.final[name], want[name]):
                wrong.append(f"lane {lane.index}: final {name}")
    return wrong
