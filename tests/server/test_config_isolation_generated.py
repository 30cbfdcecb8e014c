"""No output of one session reaches another, under any config the server accepts.

Generated: each graph of ``isolation_models`` (native RNN/GRU/LSTM nodes time-major and batch
first, one and two layers, with and without Y; cells written by hand with the state's batch
on axis 0, 1 or 2; token ids through an embedding; graphs that mix the sessions of a batch),
with its dimensions named and anonymous, under its right config and under every plausible
mistake of it: a batch axis moved to each other axis of an input, an output or a state (with
the time axis when they meet: swapped), a time axis moved or dropped, an extent off by one,
two state pairs crossed.

Each config is either refused when the repository loads, with a message naming the config
file and the field, or it is served, and then:

- 4 sessions stepped together (one batch per step, timesteps 2, 1, 3, the state carried)
  get, output by output and in their exported state, exactly what each gets stepped alone,
  and what onnxruntime gives run directly on that one session's sequence;
- one step of one session holds a NaN (or a token past the input's range): it alone is
  refused, its session's state stays as it was, the others' steps run as one batch;
- with host slabs and with device slabs (OrtValues, the path a GPU takes; here on the CPU);
- a config that is not the right one, if it is served, only says less (an output without
  its time axis): every session still gets the graph's true answers.

A graph that mixes the sessions of a batch (a mean over it, a sum that keeps a batch axis of
1, rows moved by an amount taken from the batch's size, an output of fixed extent) is never
served, under any config.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from rnnserve.server.config import DTYPES, ModelConfig
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.errors import ConfigError
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository

from .helpers import Collector
from .isolation_models import BUILDERS, Built, Config, V, unnamed

OWNER = "tester"
SESSIONS = 4
STEPS = (2, 1, 3)  # timesteps of each step; all sessions step together
POISONED = (SESSIONS - 1, 1)  # (session, step) with a NaN or a token out of range: refused
TOL = 1e-5
LIMITS = {"max_queue_delay_us": 5_000, "max_sessions": 16}


# --- the mistakes ------------------------------------------------------------------------------


def _moved_batch(spec: Config, axis: int, static_state: bool) -> Config:
    """``spec`` with its batch axis moved to ``axis``; meeting the time axis swaps them."""
    new = copy.deepcopy(spec)
    old = spec["batch_axis"]
    new["batch_axis"] = axis
    new["shape"][axis] = -1
    if static_state:  # state extents are static: the old batch axis takes the moved extent
        new["shape"][old] = spec["shape"][axis]
    if spec.get("time_axis", -1) == axis:
        new["time_axis"] = old
    return new


def mistakes(config: Config) -> dict[str, Config]:
    """Plausible wrong configs of a graph whose right config is ``config``, by what is wrong."""
    found: dict[str, Config] = {}

    def variant(label: str, section: str, n: int, spec: Config) -> None:
        wrong = copy.deepcopy(config)
        wrong[section][n] = spec
        found[label] = wrong

    for section in ("inputs", "outputs"):
        for n, spec in enumerate(config[section]):
            rank, batch, time = len(spec["shape"]), spec["batch_axis"], spec.get("time_axis", -1)
            for axis in range(rank):
                if axis == batch:
                    continue
                what = "swapped with time" if axis == time else f"to axis {axis}"
                variant(
                    f"{section}[{n}] batch axis {what}",
                    section,
                    n,
                    _moved_batch(spec, axis, False),
                )
            if time != -1:
                for axis in range(rank):
                    if axis in (batch, time):
                        continue
                    moved = copy.deepcopy(spec)
                    moved["time_axis"] = axis
                    moved["shape"][axis] = -1
                    variant(f"{section}[{n}] time axis to axis {axis}", section, n, moved)
                if section == "outputs":
                    dropped = copy.deepcopy(spec)
                    del dropped["time_axis"]
                    variant(f"{section}[{n}] time axis omitted", section, n, dropped)
            fixed = [a for a, e in enumerate(spec["shape"]) if e != -1]
            if fixed:
                wrong_extent = copy.deepcopy(spec)
                wrong_extent["shape"][fixed[-1]] += 1
                variant(f"{section}[{n}] extent off by one", section, n, wrong_extent)
    for n, spec in enumerate(config["states"]):
        for axis in range(len(spec["shape"])):
            if axis != spec["batch_axis"]:
                variant(
                    f"states[{n}] batch axis to axis {axis}",
                    "states",
                    n,
                    _moved_batch(spec, axis, True),
                )
        wrong_extent = copy.deepcopy(spec)
        last = max(a for a in range(len(spec["shape"])) if a != spec["batch_axis"])
        wrong_extent["shape"][last] += 1
        variant(f"states[{n}] extent off by one", "states", n, wrong_extent)
    if len(config["states"]) >= 2:
        crossed = copy.deepcopy(config)
        first, second = crossed["states"][0], crossed["states"][1]
        first["output"], second["output"] = second["output"], first["output"]
        found["states[0] and states[1] outputs crossed"] = crossed
    return found


#: Served mistakes that still give every session the graph's true answers, by label: they
#: say less (no time axis for an output) and nothing else.
HARMLESS = ("time axis omitted",)
#: What the refusal of a mistake says, where the mistake alone decides it (by label).
REFUSALS = {
    # Recurrent nodes, Scan and Loop all say which output continues which input.
    "outputs crossed": "field states[0].output: 'h0' feeds",
}


def _toml(config: Config) -> str:
    lines = [f"cell_kind = {json.dumps(config['cell_kind'])}"]
    for section in ("inputs", "outputs", "states"):
        for spec in config[section]:
            lines += ["", f"[[{section}]]"]
            lines += [f"{key} = {json.dumps(value)}" for key, value in spec.items()]
    lines += ["", "[limits]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in LIMITS.items()]
    return "\n".join(lines) + "\n"


# --- the cases ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    graph: str
    dims: str  # "named" | "anonymous"
    mistake: str  # "" for the right config

    @property
    def id(self) -> str:
        return f"{self.graph}-{self.dims}-{self.mistake or 'right config'}"


_BUILT: dict[str, Built] = {}


def _built(graph: str) -> Built:
    if graph not in _BUILT:
        _BUILT[graph] = BUILDERS[graph]()
    return _BUILT[graph]


def _cases() -> list[Case]:
    cases = []
    for graph in BUILDERS:
        built = _built(graph)
        for dims in ("named", "anonymous"):
            cases.append(Case(graph, dims, ""))
            if not built.mixes:
                cases += [Case(graph, dims, label) for label in mistakes(built.config)]
    return cases


CASES = _cases()


def _write(case: Case, root: Path) -> tuple[Path, Path, Config]:
    """The case's repository (one model, version 1): its config file, model file, config."""
    built = _built(case.graph)
    config = mistakes(built.config)[case.mistake] if case.mistake else built.config
    proto = built.proto if case.dims == "named" else unnamed(built.proto)
    model_dir = root / case.graph
    (model_dir / "1").mkdir(parents=True)
    onnx.save(proto, str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.toml").write_text(_toml(config), encoding="utf-8")
    return model_dir / "config.toml", model_dir / "1" / "model.onnx", config


# --- running -----------------------------------------------------------------------------------


def _sequences(config: ModelConfig, seed: int) -> list[list[dict[str, np.ndarray]]]:
    """Per session, per step: its inputs (per-session shapes: batch axis removed; time axis
    of each step's length; other dynamic extents 2, the same for every session of a step).
    The step :data:`POISONED` holds a NaN (or a token past the input's range), which the
    server refuses for that session alone."""
    rng = np.random.default_rng(seed)
    sessions = []
    for _ in range(SESSIONS):
        steps = []
        for timesteps in STEPS:
            arrays = {}
            for spec in config.inputs:
                shape = [
                    timesteps if axis == spec.session_time_axis else (2 if e == -1 else e)
                    for axis, e in enumerate(spec.session_shape)
                ]
                if DTYPES[spec.dtype].kind == "i":
                    low, high = spec.range or (0, V - 1)
                    arrays[spec.name] = rng.integers(low, high + 1, shape).astype(
                        DTYPES[spec.dtype]
                    )
                else:
                    arrays[spec.name] = rng.standard_normal(shape).astype(DTYPES[spec.dtype])
            steps.append(arrays)
        sessions.append(steps)
    session, step = POISONED
    spec = config.inputs[0]
    poisoned = sessions[session][step][spec.name].copy()
    if DTYPES[spec.dtype].kind == "i":
        poisoned.flat[0] = (spec.range or (0, V - 1))[1] + 1
    else:
        poisoned.flat[0] = np.nan
    sessions[session][step][spec.name] = poisoned
    return sessions


@dataclass
class Served:
    """One session's answers: per step its outputs (or the error), then its exported state."""

    outputs: list[dict[str, np.ndarray] | str]
    state: dict[str, np.ndarray]


async def _step(engine: Engine, steps: list[tuple[str, dict[str, np.ndarray]]]) -> list:
    """Submit ``steps`` (session id, inputs) in one call; their outcomes in that order."""
    sink = Collector()
    engine.submit(
        [(ticket, sid, arrays, None, None) for ticket, (sid, arrays) in enumerate(steps)],
        OWNER,
        sink,
    )
    outcomes = await sink.wait_for(len(steps))
    return sorted(outcomes, key=lambda outcome: outcome.ticket)


def _answer(outcome) -> dict[str, np.ndarray] | str:  # noqa: ANN001
    if outcome.error is not None:
        return f"{outcome.error.code.name}: {outcome.error}"
    return {name: value[outcome.row].copy() for name, value in outcome.outputs.items()}


async def _serve(repo: Path, model: str, slabs: str, sequences: list) -> tuple:
    """Every session of ``sequences`` stepped together, then each again alone, in one engine;
    (together, alone, (runs, steps run) while together)."""
    engine = Engine(load_repository(repo, device="cpu"), Metrics(), EngineConfig(slabs=slabs))
    await engine.start()
    try:

        async def open_one() -> str:
            return (await engine.open_session(model, "", "", {}, 0, OWNER)).session_id

        async def exported(sid: str) -> dict[str, np.ndarray]:
            info, state = await engine.export_state(sid, OWNER)
            return state

        together_ids = [await open_one() for _ in sequences]
        together = [Served([], {}) for _ in sequences]
        for k in range(len(STEPS)):
            before = [await exported(sid) for sid in together_ids]
            outcomes = await _step(
                engine, [(sid, seq[k]) for sid, seq in zip(together_ids, sequences, strict=True)]
            )
            for n, outcome in enumerate(outcomes):
                together[n].outputs.append(_answer(outcome))
                if outcome.error is not None:  # refused or failed: nothing changed
                    _assert_same_state(await exported(together_ids[n]), before[n])
        for n, sid in enumerate(together_ids):
            together[n].state = await exported(sid)
        batched = _runs(engine, model)
        alone = []
        for seq in sequences:
            sid = await open_one()
            served = Served([], {})
            for arrays in seq:
                before_alone = await exported(sid)
                (outcome,) = await _step(engine, [(sid, arrays)])
                served.outputs.append(_answer(outcome))
                if outcome.error is not None:
                    _assert_same_state(await exported(sid), before_alone)
            served.state = await exported(sid)
            alone.append(served)
        return together, alone, batched
    finally:
        await engine.stop()
        engine.repository.close()


def _runs(engine: Engine, model: str) -> tuple[int, int]:
    """(runs, steps run) of ``model`` so far, from the engine's batch-size histogram."""
    runs = steps = 0.0
    for metric in engine.metrics.batch_size.collect():
        for sample in metric.samples:
            if sample.labels.get("model") != model:
                continue
            if sample.name.endswith("_count"):
                runs += sample.value
            elif sample.name.endswith("_sum"):
                steps += sample.value
    return int(runs), int(steps)


def _direct(model_path: Path, config: ModelConfig, sequence: list) -> Served:
    """onnxruntime run directly on one session's steps (a batch of one, state carried), read
    as ``config`` says: each tensor's batch axis added, then taken away. A step the server
    refuses (a NaN, a token out of range) is skipped, its answer the word "refused"."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    state = {s.input: np.zeros(s.session_shape, DTYPES[s.dtype]) for s in config.states}
    names = [o.name for o in config.outputs] + [s.output for s in config.states]
    served = Served([], {})
    for arrays in sequence:
        if any(_refused(config, name, value) for name, value in arrays.items()):
            served.outputs.append("refused")
            continue
        feeds = {t.name: np.expand_dims(arrays[t.name], t.batch_axis) for t in config.inputs}
        feeds.update({s.input: np.expand_dims(state[s.input], s.batch_axis) for s in config.states})
        values = session.run(names, feeds)
        served.outputs.append(
            {
                o.name: np.take(value, 0, axis=o.batch_axis)
                for o, value in zip(config.outputs, values, strict=False)
            }
        )
        state = {
            s.input: np.take(value, 0, axis=s.batch_axis)
            for s, value in zip(config.states, values[len(config.outputs) :], strict=True)
        }
    served.state = state
    return served


def _refused(config: ModelConfig, name: str, value: np.ndarray) -> bool:
    """Whether the server refuses ``value`` for input ``name`` (NaN; past a declared range)."""
    (spec,) = [t for t in config.inputs if t.name == name]
    if value.dtype.kind == "f":
        return not bool(np.isfinite(value).all())
    return spec.range is not None and not spec.range[0] <= int(value.max()) <= spec.range[1]


def _assert_same_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"state {name}")


def _assert_served_alike(got: Served, want: Served, what: str) -> None:
    assert len(got.outputs) == len(want.outputs)
    for k, (mine, theirs) in enumerate(zip(got.outputs, want.outputs, strict=True)):
        if isinstance(theirs, str) and isinstance(mine, str):  # refused both ways
            assert "INVALID_ARGUMENT" in mine if theirs == "refused" else mine == theirs, what
            continue
        assert isinstance(mine, dict), f"{what}: step {k} failed: {mine}"
        assert isinstance(theirs, dict), f"{what}: step {k} failed: {theirs}"
        assert sorted(mine) == sorted(theirs), what
        for name in mine:
            assert mine[name].shape == theirs[name].shape, f"{what}: step {k} output {name}"
            np.testing.assert_allclose(
                mine[name], theirs[name], rtol=TOL, atol=TOL, err_msg=f"{what}: step {k} {name}"
            )
    assert sorted(got.state) == sorted(want.state), what
    for name in got.state:
        np.testing.assert_allclose(
            got.state[name], want.state[name], rtol=TOL, atol=TOL, err_msg=f"{what}: state {name}"
        )


# --- the specification -------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
async def test_a_config_is_refused_naming_its_field_or_keeps_every_session_to_itself(
    case: Case, tmp_path: Path
) -> None:
    built = _built(case.graph)
    config_path, model_path, config = _write(case, tmp_path)
    try:
        repository = load_repository(tmp_path, device="cpu")
    except ConfigError as refused:
        message = str(refused)
        assert case.mistake or built.mixes, f"the right config was refused: {message}"
        if built.mixes and not case.mistake:
            assert built.refusal in message, message
        if message.startswith(f"{model_path}: "):  # onnxruntime cannot load the graph at all
            assert "onnxruntime cannot load the model" in message, message
            return
        assert message.startswith(f"{config_path}: field "), message
        for label, words in REFUSALS.items():
            if label in case.mistake:
                assert words in message, message
        return
    narrowed = repository.get(case.graph).config
    repository.close()

    sequences = _sequences(narrowed, seed=len(case.id))
    for slabs in ("host", "device"):
        together, alone, batched = await _serve(tmp_path, case.graph, slabs, sequences)
        assert batched == (len(STEPS), len(STEPS) * SESSIONS - 1), "not one batch per step"
        for n, seq in enumerate(sequences):
            _assert_served_alike(together[n], alone[n], f"{slabs} slabs, session {n} batched")
            _assert_served_alike(
                together[n], _direct(model_path, narrowed, seq), f"{slabs} slabs, session {n}"
            )
    assert not built.mixes, f"served a graph in which {built.mixes}"
    if case.mistake:
        # A served mistake gives each session the graph's true answers, as the right config
        # reads them: it only says less.
        assert any(words in case.mistake for words in HARMLESS), f"served {case.mistake!r}"
        right = ModelConfig.model_validate(built.config)
        for n, seq in enumerate(sequences):
            _assert_served_alike(together[n], _direct(model_path, right, seq), f"session {n}")
