"""The model tests need the ``[train]`` extra (torch); without it they skip with a message."""

import pytest

pytest.importorskip("torch", reason="the model tests need the [train] extra (torch)")
