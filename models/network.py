"""A servable sequence model: an optional embedding, a recurrent stack, a linear readout.

This is the unit that is trained, saved as a checkpoint, and exported to one ONNX graph. Its
:class:`ModelSpec` is small and plain so a checkpoint can be rebuilt without pickled code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .cells import RecurrentModule, State, has_cell_state, make_cell


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a :class:`SequenceModel` (weights aside).

    ``vocab_size > 0`` makes a token model: int64 token ids in, an embedding of
    ``embedding_size`` in front of the cells. Otherwise ``input_size`` float features come in.
    """

    kind: str
    hidden_size: int
    output_size: int
    input_size: int = 0
    vocab_size: int = 0
    embedding_size: int = 0
    num_layers: int = 1
    bias: bool | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.vocab_size > 0) == (self.input_size > 0):
            raise ValueError("give exactly one of input_size (features) or vocab_size (tokens)")
        if self.vocab_size > 0 and self.embedding_size <= 0:
            raise ValueError("a token model needs embedding_size > 0")

    @property
    def tokens(self) -> bool:
        return self.vocab_size > 0

    @property
    def cell_input_size(self) -> int:
        return self.embedding_size if self.tokens else self.input_size


class SequenceModel(nn.Module):
    """Embedding (token models only) → recurrent stack → linear readout, time-first by default.

    ``forward(x, state)`` returns ``(y, state)`` so a caller can carry the state from one call
    to the next, exactly as the server does between steps.
    """

    def __init__(self, spec: ModelSpec, batch_first: bool = False) -> None:
        super().__init__()
        self.spec = spec
        self.batch_first = batch_first
        self.embedding = nn.Embedding(spec.vocab_size, spec.embedding_size) if spec.tokens else None
        self.rnn: RecurrentModule = make_cell(
            spec.kind,
            spec.cell_input_size,
            spec.hidden_size,
            spec.num_layers,
            bias=spec.bias,
            batch_first=batch_first,
        )
        self.readout = nn.Linear(spec.hidden_size, spec.output_size)

    @property
    def has_cell_state(self) -> bool:
        return has_cell_state(self.spec.kind)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        features = self.embedding(x) if self.embedding is not None else x
        hidden, state = self.rnn(features, state)
        return self.readout(hidden), state

    def zero_state(self, batch: int) -> State:
        """The state a new session starts from (what the server gives a fresh session)."""
        shape = (self.spec.num_layers, batch, self.spec.hidden_size)
        h = torch.zeros(shape)
        return (h, torch.zeros(shape)) if self.has_cell_state else h


def save_checkpoint(model: SequenceModel, path: Path) -> Path:
    """Write the spec and the weights; :func:`load_checkpoint` needs no pickled classes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"spec": asdict(model.spec), "state_dict": model.state_dict()}
    blob["batch_first"] = model.batch_first  # how it reads its data, which the weights do not say
    torch.save(blob, path)
    return path


def load_checkpoint(path: Path) -> SequenceModel:
    """A model saved by :func:`save_checkpoint` (``rnnserve train`` writes these)."""
    try:
        blob: dict[str, Any] = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a file that is not its format
        raise ValueError(f"{path}: not an rnnserve checkpoint ({exc.__class__.__name__})") from exc
    if not isinstance(blob, dict) or "spec" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path}: not an rnnserve checkpoint (expected keys 'spec', 'state_dict')")
    model = SequenceModel(ModelSpec(**blob["spec"]), batch_first=bool(blob.get("batch_first")))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def from_torch(
    rnn: nn.RNN | nn.LSTM | nn.GRU,
    readout: nn.Linear,
    embedding: nn.Embedding | None = None,
    metadata: dict[str, str] | None = None,
) -> SequenceModel:
    """Wrap a model trained with PyTorch's own modules, so it can be exported and served.

    ``nn.LSTM`` becomes ``lstm``, ``nn.GRU`` ``gru_torch`` (its reset gate acts after the
    linear map), ``nn.RNN`` with tanh ``rnn``. The weights are copied, not shared.
    """
    if rnn.bidirectional:
        raise ValueError("bidirectional recurrent layers cannot carry state step by step")
    if isinstance(rnn, nn.LSTM):
        if rnn.proj_size:
            raise ValueError("LSTM projections (proj_size) have no ONNX LSTM equivalent")
        kind = "lstm"
    elif isinstance(rnn, nn.GRU):
        kind = "gru_torch"
    elif isinstance(rnn, nn.RNN):
        if rnn.nonlinearity != "tanh":
            raise ValueError(f"nn.RNN with {rnn.nonlinearity!r}: only tanh is supported")
        kind = "rnn"
    else:
        raise TypeError(f"expected nn.RNN, nn.LSTM or nn.GRU, got {type(rnn).__name__}")
    if embedding is not None and embedding.embedding_dim != rnn.input_size:
        raise ValueError(
            f"embedding gives {embedding.embedding_dim} features; the recurrent layers take "
            f"{rnn.input_size}"
        )
    if readout.in_features != rnn.hidden_size:
        raise ValueError(
            f"readout takes {readout.in_features} features; the recurrent layers give "
            f"{rnn.hidden_size}"
        )
    spec = ModelSpec(
        kind=kind,
        hidden_size=rnn.hidden_size,
        output_size=readout.out_features,
        input_size=0 if embedding is not None else rnn.input_size,
        vocab_size=embedding.num_embeddings if embedding is not None else 0,
        embedding_size=embedding.embedding_dim if embedding is not None else 0,
        num_layers=rnn.num_layers,
        bias=rnn.bias,
        metadata=dict(metadata or {}),
    )
    model = SequenceModel(spec)
    model.rnn.load_state_dict(rnn.state_dict())
    model.readout.load_state_dict(readout.state_dict())
    if embedding is not None:
        assert model.embedding is not None
        model.embedding.load_state_dict(embedding.state_dict())
    return model.eval()
