"""The default benchmark model: a seeded 2-layer LSTM written with onnx.helper.

It is built here rather than trained so the benchmark needs nothing but onnx and numpy, and
every run measures the same shapes (input 32, hidden 256). Two copies go into one temporary
repository: one with batching on and one with ``max_batch_size = 1`` (batching off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

BATCHED = "bench_lstm"
UNBATCHED = "bench_lstm_nobatch"


@dataclass(frozen=True)
class ModelShape:
    """What the benchmark needs to know about a model to build requests for it."""

    inputs: dict[str, tuple[int, ...]]  # per-timestep shape of each non-state input
    outputs: dict[str, tuple[int, ...]]  # per-timestep shape of each output
    state_bytes: int  # bytes of state one session holds
    max_sessions: int = 10_000


def graph_feeds(model_dir: Path, batch: int, timesteps: int) -> dict[str, np.ndarray]:
    """Random feeds for every graph input (inputs and state inputs), from the config's axes."""
    import tomllib

    config = tomllib.loads((model_dir / "config.toml").read_text())
    rng = np.random.default_rng(0)
    feeds = {}
    for spec in [*config["inputs"], *config.get("states", [])]:
        dims = list(spec["shape"])
        dims[spec["batch_axis"]] = batch
        if spec.get("time_axis", -1) not in (-1, None):
            dims[spec["time_axis"]] = timesteps
        dims = [1 if d == -1 else d for d in dims]
        name = spec.get("name", spec.get("input"))
        feeds[name] = rng.standard_normal(dims).astype(spec["dtype"])
    return feeds


def state_inputs(model_dir: Path) -> list[str]:
    """The state input names of a repository model, from its config.toml."""
    import tomllib

    config = tomllib.loads((model_dir / "config.toml").read_text())
    return [state["input"] for state in config.get("states", [])]


def build_lstm(
    input_size: int = 32, hidden: int = 256, layers: int = 2, seed: int = 0, peephole: bool = False
) -> bytes:
    """Serialize a stacked LSTM graph: x (T, B, input) -> y (T, B, hidden), h/c per layer.

    With ``peephole`` every layer gets ONNX's ``P`` input (the gates see the cell state), the
    variant cuDNN has no kernel for: the GPU check measures where and how fast it runs."""
    rng = np.random.default_rng(seed)
    nodes, inits, graph_inputs, graph_outputs = [], [], [], []
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", input_size])
    graph_inputs.append(x)
    prev, prev_size = "x", input_size
    scale = 1.0 / np.sqrt(hidden)
    for layer in range(layers):
        w = rng.uniform(-scale, scale, (1, 4 * hidden, prev_size)).astype(np.float32)
        r = rng.uniform(-scale, scale, (1, 4 * hidden, hidden)).astype(np.float32)
        b = rng.uniform(-scale, scale, (1, 8 * hidden)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"W{layer}"),
            numpy_helper.from_array(r, f"R{layer}"),
            numpy_helper.from_array(b, f"B{layer}"),
        ]
        peep = ""
        if peephole:
            peep = f"P{layer}"
            p = rng.uniform(-scale, scale, (1, 3 * hidden)).astype(np.float32)
            inits.append(numpy_helper.from_array(p, peep))
        for kind in ("h", "c"):
            graph_inputs.append(
                helper.make_tensor_value_info(
                    f"{kind}0_{layer}", TensorProto.FLOAT, [1, "B", hidden]
                )
            )
            graph_outputs.append(
                helper.make_tensor_value_info(
                    f"{kind}n_{layer}", TensorProto.FLOAT, [1, "B", hidden]
                )
            )
        nodes.append(
            helper.make_node(
                "LSTM",
                [prev, f"W{layer}", f"R{layer}", f"B{layer}", "", f"h0_{layer}", f"c0_{layer}"]
                + ([peep] if peep else []),
                [f"Y{layer}", f"hn_{layer}", f"cn_{layer}"],
                hidden_size=hidden,
            )
        )
        axes = f"axes{layer}"
        inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
        out = "y" if layer == layers - 1 else f"x{layer + 1}"
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", axes], [out]))
        prev, prev_size = out, hidden
    graph_outputs.insert(
        0, helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "B", hidden])
    )
    graph = helper.make_graph(nodes, "bench_lstm", graph_inputs, graph_outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _config(input_size: int, hidden: int, layers: int, max_batch: int, max_sessions: int) -> str:
    """The config.toml text for the stacked LSTM (state pairs named per layer)."""
    lines = [
        'cell_kind = "lstm"',
        f'description = "rnnserve bench: {layers}-layer LSTM, input {input_size}, hidden {hidden}"',
        "",
        "[[inputs]]",
        'name = "x"',
        'dtype = "float32"',
        f"shape = [-1, -1, {input_size}]",
        "batch_axis = 1",
        "time_axis = 0",
        "",
        "[[outputs]]",
        'name = "y"',
        'dtype = "float32"',
        f"shape = [-1, -1, {hidden}]",
        "batch_axis = 1",
        "time_axis = 0",
    ]
    for layer in range(layers):
        for kind in ("h", "c"):
            lines += [
                "",
                "[[states]]",
                f'input = "{kind}0_{layer}"',
                f'output = "{kind}n_{layer}"',
                'dtype = "float32"',
                f"shape = [1, -1, {hidden}]",
                "batch_axis = 1",
            ]
    lines += [
        "",
        "[limits]",
        f"max_batch_size = {max_batch}",
        "max_queue_delay_us = 500",
        f"max_sessions = {max_sessions}",
        "idle_timeout_s = 3600",
        "max_timesteps = 4096",
        'on_full = "reject"',
        "",
    ]
    return "\n".join(lines)


def write_repository(
    root: Path,
    *,
    input_size: int = 32,
    hidden: int = 256,
    layers: int = 2,
    max_batch: int = 256,
    max_sessions: int = 10_000,
    peephole: bool = False,
) -> ModelShape:
    """Write the batched and unbatched copies of the default model under ``root``."""
    onnx_bytes = build_lstm(input_size, hidden, layers, peephole=peephole)
    for name, batch in ((BATCHED, max_batch), (UNBATCHED, 1)):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        (root / name / "1" / "model.onnx").write_bytes(onnx_bytes)
        (root / name / "config.toml").write_text(
            _config(input_size, hidden, layers, batch, max_sessions)
        )
    return ModelShape(
        inputs={"x": (input_size,)},
        outputs={"y": (hidden,)},
        state_bytes=layers * 2 * hidden * 4,
        max_sessions=max_sessions,
    )


def read_shape(model_dir: Path) -> ModelShape:
    """Per-timestep shapes of any repository model, read from its config.toml."""
    import tomllib

    config = tomllib.loads((model_dir / "config.toml").read_text())

    def per_step(spec: dict) -> tuple[int, ...]:
        drop = {spec["batch_axis"] % len(spec["shape"])}
        if spec.get("time_axis", -1) not in (-1, None):
            drop.add(spec["time_axis"] % len(spec["shape"]))
        return tuple(int(d) for i, d in enumerate(spec["shape"]) if i not in drop)

    itemsize = {"float32": 4, "float16": 2, "float64": 8, "int32": 4, "int64": 8}
    state_bytes = 0
    for state in config.get("states", []):
        dims = [d for i, d in enumerate(state["shape"]) if i != state["batch_axis"]]
        state_bytes += int(np.prod(dims)) * itemsize[state["dtype"]]
    return ModelShape(
        inputs={s["name"]: per_step(s) for s in config["inputs"]},
        outputs={s["name"]: per_step(s) for s in config["outputs"]},
        state_bytes=state_bytes,
        max_sessions=int(config.get("limits", {}).get("max_sessions", 10_000)),
    )
