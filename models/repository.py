"""Write an exported model into a repository: ``<name>/config.toml`` + ``<version>/model.onnx``.

The config is generated from the same :class:`GraphNames` the exporter used, so the names the
server checks at load always match the graph. Versions share one config.toml, so a new version
whose tensors differ from the existing config is refused rather than breaking the old ones.
"""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path

import onnx

from .network import SequenceModel
from .onnx_export import graph_names, to_onnx


def _toml_value(value: object) -> str:
    # JSON strings, numbers, booleans and arrays of them are also valid TOML values.
    return json.dumps(value)


def config_toml(
    model: SequenceModel,
    *,
    description: str = "",
    metadata: Mapping[str, str] | None = None,
    limits: Mapping[str, object] | None = None,
    output_name: str = "y",
) -> str:
    """The config.toml text that serves ``model``'s exported graph."""
    spec = model.spec
    names = graph_names(model, output_name)
    # The graph has the module's layout (onnx_export.py): (T, N, ...) or, batch-first, (N, T, ...).
    axes = (
        ["batch_axis = 0", "time_axis = 1"]
        if model.batch_first
        else ["batch_axis = 1", "time_axis = 0"]
    )
    lines = [
        f"cell_kind = {_toml_value(spec.kind)}",
        f"description = {_toml_value(description)}",
        "",
        "[[inputs]]",
        f"name = {_toml_value(names.input)}",
    ]
    if spec.tokens:
        # Token ids index the embedding's rows: anything else is refused before it is queued
        # (a Gather would read -1 as the last row, and fail the batch beyond the table).
        lines += ['dtype = "int64"', "shape = [-1, -1]", f"range = [0, {spec.vocab_size - 1}]"]
    else:
        lines += ['dtype = "float32"', f"shape = [-1, -1, {spec.input_size}]"]
    lines += [*axes, ""]
    lines += [
        "[[outputs]]",
        f"name = {_toml_value(names.output)}",
        'dtype = "float32"',
        f"shape = [-1, -1, {spec.output_size}]",
        *axes,
    ]
    for state_in, state_out in names.state_pairs:
        lines += [
            "",
            "[[states]]",
            f"input = {_toml_value(state_in)}",
            f"output = {_toml_value(state_out)}",
            'dtype = "float32"',
            f"shape = [{spec.num_layers}, -1, {spec.hidden_size}]",
            "batch_axis = 1",
        ]
    if limits:
        lines += ["", "[limits]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in limits.items()]
    merged = {**spec.metadata, **(metadata or {})}
    if merged:
        lines += ["", "[metadata]"]
        lines += [f"{_toml_value(key)} = {_toml_value(str(v))}" for key, v in merged.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # a writer bug must never produce a file the server cannot read
    return text


def _tensors_of(text: str) -> object:
    """What versions must share; an input's value range is left out, so a config written
    before ranges existed takes a new version (and gains the range)."""
    parsed = tomllib.loads(text)
    for table in parsed.get("inputs", []):
        table.pop("range", None)
    return [parsed.get(key) for key in ("cell_kind", "inputs", "outputs", "states")]


def _atomic_write(path: Path, data: bytes) -> None:
    """Write through a temporary file and a rename, with the mode a plain ``open`` would give
    (mkstemp makes 0600 files, which a server running as another user, as in a container,
    could not read)."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            os.fchmod(handle.fileno(), 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def next_version(model_dir: Path) -> int:
    existing = (
        [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()] if model_dir.is_dir() else []
    )
    return max(existing, default=0) + 1


def write_model(
    repository: Path,
    name: str,
    model: SequenceModel,
    *,
    version: int | None = None,
    description: str = "",
    metadata: Mapping[str, str] | None = None,
    limits: Mapping[str, object] | None = None,
    output_name: str = "y",
) -> Path:
    """Export ``model`` as ``<repository>/<name>/<version>/model.onnx``; the path written.

    ``version=None`` takes the next free integer. The config is (re)written from this model;
    it must declare the same tensors as any existing versions' config.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model name {name!r}: use a plain folder name")
    model_dir = Path(repository) / name
    number = next_version(model_dir) if version is None else version
    if number < 1:
        raise ValueError(f"version {number}: versions are positive integers")
    text = config_toml(
        model, description=description, metadata=metadata, limits=limits, output_name=output_name
    )
    config_path = model_dir / "config.toml"
    others = (
        [p for p in model_dir.iterdir() if p.name.isdigit() and p.name != str(number)]
        if model_dir.is_dir()
        else []
    )
    if others and config_path.exists():
        if _tensors_of(config_path.read_text(encoding="utf-8")) != _tensors_of(text):
            raise ValueError(
                f"{config_path}: versions {sorted(p.name for p in others)} declare other tensors "
                f"than this model; export it under a new model name"
            )
    version_dir = model_dir / str(number)
    version_dir.mkdir(parents=True, exist_ok=True)
    proto = to_onnx(model, output_name=output_name)
    onnx_path = version_dir / "model.onnx"
    _atomic_write(onnx_path, proto.SerializeToString())
    onnx.checker.check_model(str(onnx_path))
    _atomic_write(config_path, text.encode("utf-8"))
    return onnx_path
