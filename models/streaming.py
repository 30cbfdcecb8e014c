"""A streaming model whose state is not only recurrent state: causal conv → GRU → classifier.

The shape of a streaming keyword spotter: a causal 1-D convolution over feature frames (say
40 log-mel bands), whose last ``kernel_size - 1`` input frames are carried as state so a
stream cut into chunks gives exactly the outputs of the whole stream, then a GRU, then a
per-frame classifier. ``forward(x, state) -> (logits, state)`` with ``x`` (B, T, F) batch-first
and ``state = (frames (B, F, kernel_size - 1), h (layers, B, H))``: two state tensors with
their batch on different axes, one of them no RNN node knows about. ``rnnserve export`` serves
it as it is (tests/models/test_export_module.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CausalConvGRU(nn.Module):
    """Causal conv front end (its last k-1 frames as state) → GRU → linear classifier."""

    def __init__(
        self,
        features: int = 40,
        channels: int = 32,
        kernel_size: int = 5,
        hidden_size: int = 48,
        classes: int = 12,
        num_layers: int = 1,
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.features = features
        self.conv = nn.Conv1d(features, channels, kernel_size)
        self.gru = nn.GRU(channels, hidden_size, num_layers, batch_first=True)
        self.classifier = nn.Linear(hidden_size, classes)

    def zero_state(self, batch: int) -> tuple[Tensor, Tensor]:
        frames = torch.zeros(batch, self.features, self.kernel_size - 1)
        h = torch.zeros(self.gru.num_layers, batch, self.gru.hidden_size)
        return frames, h

    def forward(
        self, x: Tensor, state: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        frames, h = self.zero_state(x.shape[0]) if state is None else state
        window = torch.cat([frames, x.transpose(1, 2)], dim=2)  # (B, F, k-1+T)
        features = torch.relu(self.conv(window))  # (B, C, T)
        hidden, h = self.gru(features.transpose(1, 2), h)  # (B, T, H)
        next_frames = window[:, :, 1 - self.kernel_size :]  # (B, F, k-1): the last k-1 frames
        return self.classifier(hidden), (next_frames, h)
