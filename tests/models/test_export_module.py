"""`rnnserve.models.export` and `rnnserve export`: every kind of recurrent module round-trips.

Each module is exported (onnxruntime parity checked by the exporter itself), served by one
real server, stepped one timestep per ``Step``, and compared with the module's whole-sequence
run in torch. ``rnnserve config infer`` reads the same config back from each graph. The CLI
is run once end to end with its own server check, on the streaming conv + GRU model.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from rnnserve.client import Client
from rnnserve.models.export import TOLERANCE, ExportError, export, scaled_error
from rnnserve.models.graph import infer_config
from rnnserve.models.network import ModelSpec, SequenceModel
from rnnserve.models.streaming import CausalConvGRU
from rnnserve.testing import ServerProcess
from torch import nn


class Classifier(nn.Module):
    """A 2-layer GRU and a readout, batch-first, as people write them."""

    def __init__(self) -> None:
        super().__init__()
        self.gru = nn.GRU(6, 10, num_layers=2, batch_first=True)
        self.readout = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):  # noqa: ANN201
        y, h = self.gru(x, h)
        return self.readout(y), h


def _sequence_model(kind: str) -> SequenceModel:
    """The project's own training module, batch-first (its cells are not torch's modules)."""
    spec = ModelSpec(kind=kind, hidden_size=9, output_size=3, input_size=6, num_layers=2)
    return SequenceModel(spec, batch_first=True)


def _modules() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    time_first = torch.randn(5, 2, 6)
    batch_first = torch.randn(2, 5, 6)
    return {
        "rnn_tanh": (nn.RNN(6, 9), time_first),
        "rnn_relu_2_layers": (nn.RNN(6, 9, num_layers=2, nonlinearity="relu"), time_first),
        "lstm_batch_first": (nn.LSTM(6, 9, batch_first=True), batch_first),
        "lstm_2_layers": (nn.LSTM(6, 9, num_layers=2), time_first),
        "lstm_proj": (nn.LSTM(6, 9, num_layers=2, proj_size=4), time_first),
        "gru": (nn.GRU(6, 9), time_first),
        "gru_classifier_batch_first": (Classifier(), batch_first),
        "conv_gru_streaming": (CausalConvGRU(features=6, channels=8, kernel_size=4), batch_first),
        "sequence_lstm_batch_first": (_sequence_model("lstm"), batch_first),
        "sequence_peephole_batch_first": (_sequence_model("peephole_lstm"), batch_first),
        "sequence_gru_batch_first": (_sequence_model("gru"), batch_first),
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    repository = tmp_path_factory.mktemp("exported")
    modules = _modules()
    for name, (module, example) in modules.items():
        result = export(module, example, repository, name, check="onnxruntime")
        assert result.version == 1
        assert max(result.parity.values()) <= TOLERANCE, (name, result.parity)
    return repository, modules


def _per_session(x: torch.Tensor, batch_first: bool) -> np.ndarray:
    """A (T, F) or (T, ...) sequence for one session, from a batch of one."""
    return (x[0] if batch_first else x[:, 0]).numpy()


def test_every_module_kind_served_stepwise_equals_torch(exported: tuple[Path, dict]) -> None:
    repository, modules = exported
    steps = 17
    with ServerProcess(repository) as server, Client(server.address) as client:
        for name, (module, _) in modules.items():
            config = tomllib.loads((repository / name / "config.toml").read_text())
            (spec,) = config["inputs"]
            batch_first = spec["batch_axis"] == 0
            features = spec["shape"][2]
            torch.manual_seed(1)
            x = torch.randn((1, steps, features) if batch_first else (steps, 1, features))
            with torch.no_grad():
                want_y, want_state = module(x)
            want_y = want_y[0] if batch_first else want_y[:, 0]
            flat = list(want_state) if isinstance(want_state, tuple) else [want_state]
            sequence = _per_session(x, batch_first)
            with client.open_session(name) as session:
                got = np.concatenate([session.step(sequence[t : t + 1]) for t in range(steps)])
                state = session.export_state().state
            assert scaled_error(got, want_y.numpy()) <= TOLERANCE, name
            for pair, want in zip(config["states"], flat, strict=True):
                want = np.take(want.numpy(), 0, axis=pair["batch_axis"])
                assert scaled_error(state[pair["input"]], want) <= TOLERANCE, (name, pair)


def test_config_infer_reads_back_the_exported_config(exported: tuple[Path, dict]) -> None:
    repository, modules = exported
    for name in modules:
        written = tomllib.loads((repository / name / "config.toml").read_text())
        inferred = infer_config(repository / name / "1" / "model.onnx")
        assert inferred.todo == [], (name, inferred.todo)
        parsed = tomllib.loads(inferred.text)
        assert parsed["inputs"] == written["inputs"], name
        assert parsed["outputs"] == written["outputs"], name
        by_input = {s["input"]: s for s in written["states"]}
        assert {s["input"]: s for s in parsed["states"]} == by_input, name


def test_export_refuses_what_cannot_be_stepped(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="bidirectional"):
        export(nn.GRU(4, 5, bidirectional=True), torch.randn(3, 2, 4), tmp_path, "bi")

    class Pooled(nn.Module):  # the output's extent depends on the batch in another way
        def forward(self, x: torch.Tensor, h: torch.Tensor | None = None):  # noqa: ANN201
            return x.reshape(-1, 4), (x[-1] if h is None else h)

    with pytest.raises(ExportError, match="only a batch axis and a time axis may vary"):
        export(Pooled(), torch.randn(3, 2, 4), tmp_path, "pooled")
    assert not list(tmp_path.iterdir()), "nothing is written when the export fails"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_module_with_dropout_exports_in_eval_mode_and_keeps_its_own_mode(
    tmp_path: Path, mode: str
) -> None:
    # Export ran its parity check with dropout on (refused every such module) and left the
    # caller's module in train mode.
    torch.manual_seed(0)
    module = nn.GRU(3, 4, num_layers=2, dropout=0.5)
    module.train(mode == "train")
    exported = export(module, torch.randn(5, 2, 3), tmp_path, "g", check="onnxruntime")
    assert max(exported.parity.values()) <= TOLERANCE
    assert module.training == (mode == "train")


FACTORY = """
import torch
from rnnserve.models.streaming import CausalConvGRU


def keyword_spotter():
    torch.manual_seed(3)
    return CausalConvGRU(features=8, channels=6, kernel_size=3, hidden_size=7, classes=4), (
        torch.randn(2, 5, 8),
    )
"""


def test_export_command_round_trips_the_streaming_model_through_a_server(tmp_path: Path) -> None:
    factory = tmp_path / "mine.py"
    factory.write_text(textwrap.dedent(FACTORY))
    repository = tmp_path / "repository"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnserve.server",
            "export",
            f"{factory}:keyword_spotter",
            "--repository",
            str(repository),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "parity: server stepwise: scaled error" in done.stdout
    assert (repository / "keyword_spotter" / "1" / "model.onnx").is_file()
    config = tomllib.loads((repository / "keyword_spotter" / "config.toml").read_text())
    frames, hidden = config["states"]
    assert frames["shape"] == [-1, 8, 2] and frames["batch_axis"] == 0  # the conv's k-1 frames
    assert hidden["shape"] == [1, -1, 7] and hidden["batch_axis"] == 1
