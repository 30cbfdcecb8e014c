"""An exported model lands in a repository the server loads and serves with the model's outputs."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from rnnserve.models.graph import infer_config
from rnnserve.models.network import ModelSpec, SequenceModel, load_checkpoint, save_checkpoint
from rnnserve.models.repository import write_model

pytest.importorskip(
    "rnnserve.server.config", reason="serving the repository needs the [server] extra"
)

from rnnserve.client import Client  # noqa: E402
from rnnserve.server.config import load_model_config  # noqa: E402
from rnnserve.testing import ServerProcess  # noqa: E402


def _model(
    kind: str = "peephole_lstm", tokens: bool = True, layers: int = 2, batch_first: bool = False
) -> SequenceModel:
    torch.manual_seed(7)
    sizes = {"vocab_size": 9, "embedding_size": 4} if tokens else {"input_size": 3}
    spec = ModelSpec(kind=kind, hidden_size=6, output_size=5, num_layers=layers, **sizes)
    return SequenceModel(spec, batch_first=batch_first).eval()


def test_written_config_declares_the_graph_the_server_checks(tmp_path: Path) -> None:
    path = write_model(
        tmp_path, "lm", _model(), metadata={"vocabulary": json.dumps(list("abcdefghi"))}
    )
    assert path == tmp_path / "lm" / "1" / "model.onnx"
    config = load_model_config(tmp_path / "lm" / "config.toml")
    assert config.cell_kind == "peephole_lstm"
    assert [(i.name, i.dtype, i.batch_axis, i.time_axis) for i in config.inputs] == [
        ("tokens", "int64", 1, 0)
    ]
    # Token ids index the embedding's 9 rows: anything else is refused before queueing.
    assert config.inputs[0].range == (0, 8)
    inferred = infer_config(tmp_path / "lm" / "1" / "model.onnx")
    assert "range = [0, 8]" in inferred.text, inferred.text
    assert [(s.input, s.output, s.shape) for s in config.states] == [
        ("initial_h", "Y_h", [2, -1, 6]),
        ("initial_c", "Y_c", [2, -1, 6]),
    ]
    assert json.loads(config.metadata["vocabulary"]) == list("abcdefghi")


def test_written_files_are_readable_by_a_server_running_as_another_user(tmp_path: Path) -> None:
    """Written like plain files (0644 under the usual umask), not 0600: a container's server
    user must read a repository built by another user."""
    import os
    import stat

    previous = os.umask(0o022)
    try:
        path = write_model(tmp_path, "lm", _model())
    finally:
        os.umask(previous)
    for written in (path, path.parent.parent / "config.toml"):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written


def test_versions_count_up_and_a_different_graph_is_refused(tmp_path: Path) -> None:
    assert write_model(tmp_path, "m", _model()).parent.name == "1"
    assert write_model(tmp_path, "m", _model()).parent.name == "2"
    with pytest.raises(ValueError, match="declare other tensors"):
        write_model(tmp_path, "m", _model(kind="gru", tokens=False))
    with pytest.raises(ValueError, match="plain folder name"):
        write_model(tmp_path, "../escape", _model())
    assert (
        tomllib.loads((tmp_path / "m" / "config.toml").read_text())["cell_kind"] == "peephole_lstm"
    )


@pytest.mark.parametrize("kind", ["rnn", "gru"])
def test_served_session_steps_equal_the_pytorch_model(tmp_path: Path, kind: str) -> None:
    """PyTorch to a served session: one timestep per call equals the whole sequence in torch."""
    model = _model(kind=kind, tokens=False)
    write_model(tmp_path, "mine", model, limits={"max_queue_delay_us": 0})
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    with torch.no_grad():
        want, _ = model(torch.from_numpy(x)[:, None, :])
    with ServerProcess(tmp_path) as server, Client(server.address) as client:
        with client.open_session("mine") as session:
            got = np.concatenate([session.step(x[t : t + 1]) for t in range(10)])
    np.testing.assert_allclose(got, want[:, 0].numpy(), atol=1e-5)


def test_a_batch_first_model_is_written_and_served_batch_first(tmp_path: Path) -> None:
    """The config declares the graph's (B, T) axes; sessions see (T, ...) either way, and a
    checkpoint keeps the layout (a batch-first model loaded time-first reads its data wrong)."""
    model = _model(kind="peephole_lstm", tokens=True, batch_first=True)
    write_model(tmp_path / "repo", "lm", model)
    config = load_model_config(tmp_path / "repo" / "lm" / "config.toml")
    assert [(t.name, t.batch_axis, t.time_axis) for t in config.inputs] == [("tokens", 0, 1)]
    assert [(t.name, t.batch_axis, t.time_axis) for t in config.outputs] == [("y", 0, 1)]
    assert [s.batch_axis for s in config.states] == [1, 1]
    tokens = np.random.default_rng(3).integers(0, 9, size=12).astype(np.int64)
    with torch.no_grad():
        want, _ = model(torch.from_numpy(tokens)[None, :])  # (1, T, 5)
    with ServerProcess(tmp_path / "repo") as server, Client(server.address) as client:
        with client.open_session("lm") as session:
            got = np.concatenate([session.step(tokens[t : t + 1]) for t in range(12)])
    np.testing.assert_allclose(got, want[0].numpy(), atol=1e-5)
    loaded = load_checkpoint(save_checkpoint(model, tmp_path / "bf.pt"))
    assert loaded.batch_first
    with torch.no_grad():
        again, _ = loaded(torch.from_numpy(tokens)[None, :])
    assert torch.equal(again, want)


def test_checkpoint_round_trip_and_export_command(tmp_path: Path) -> None:
    model = _model(kind="lstm", tokens=False, layers=1)
    checkpoint = save_checkpoint(model, tmp_path / "mine.pt")
    loaded = load_checkpoint(checkpoint)
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name])
    repository = tmp_path / "repository"
    command = [
        sys.executable,
        "-m",
        "rnnserve.server",
        "export",
        str(checkpoint),
        "--repository",
        str(repository),
    ]
    done = subprocess.run([*command, "--name", "mine"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "exported lstm model" in done.stdout
    assert (repository / "mine" / "1" / "model.onnx").is_file()
    listed = subprocess.run(
        [sys.executable, "-m", "rnnserve.server", "models", "--repository", str(repository)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "mine" in listed.stdout, listed.stdout + listed.stderr
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve.server",
            "export",
            str(tmp_path / "junk.pt"),
            "--repository",
            str(repository),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "not an rnnserve checkpoint" in bad.stderr
