"""A session stepped through the server equals the whole sequence run by onnxruntime directly.

Checked for every hand-built cell (and every trained default model when present), one
timestep at a time, in chunks of several timesteps, over StreamSteps, and with Predict.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rnnserve.server.frontend.tensors import from_array, to_array
from rnnserve.testing import TEST_MODELS, ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import (
    assert_close,
    data_input,
    joined,
    outputs_of,
    reference,
    step,
    stub_for,
    take,
)

T = 12


def _sequence(model: pb.Model, seed: int) -> np.ndarray:
    spec = data_input(model)
    shape = [T if a == spec.time_axis else e for a, e in enumerate(spec.shape)]
    rng = np.random.default_rng(seed)
    if spec.dtype in (4, 5):
        vocab = len(json.loads(model.metadata.get("vocabulary", "[0, 1]")))
        return rng.integers(0, vocab, shape).astype(np.int64 if spec.dtype == 5 else np.int32)
    return rng.standard_normal(shape).astype(np.float32)


def _check_all_ways(address: str, repository: Path, name: str, version: str = "") -> None:
    with stub_for(address) as stub:
        model = stub.GetModel(pb.GetModelRequest(name=name, version=version)).model
        spec = data_input(model)
        x = _sequence(model, seed=hash(name) % 1000)
        want = reference(repository, model, x)
        for chunk in (1, 5):
            sid = stub.OpenSession(pb.OpenSessionRequest(model=name, version=version))
            sid = sid.session.session_id
            parts = []
            for start in range(0, T, chunk):
                reply = step(stub, sid, spec.name, take(x, spec, start, min(T, start + chunk)))
                parts.append(outputs_of(reply))
            assert reply.position == T
            assert_close(joined(parts, model), want)
            exported = stub.ExportState(pb.ExportStateRequest(session_id=sid))
            assert_close({k: to_array(v, k) for k, v in exported.state.items()}, want)
            stub.CloseSession(pb.CloseSessionRequest(session_id=sid))

        sid = stub.OpenSession(pb.OpenSessionRequest(model=name, version=version))
        sid = sid.session.session_id
        requests = [
            pb.StreamStepsRequest(
                steps=[
                    pb.StepRequest(
                        session_id=sid,
                        request_id=str(t),
                        inputs={spec.name: from_array(take(x, spec, t, t + 1))},
                    )
                ]
            )
            for t in range(T)
        ]
        results = [r for message in stub.StreamSteps(iter(requests)) for r in message.results]
        assert [r.request_id for r in results] == [str(t) for t in range(T)]
        assert_close(joined([outputs_of(r.response) for r in results], model), want)

        predicted = stub.Predict(
            pb.PredictRequest(model=name, version=version, inputs={spec.name: from_array(x)})
        )
        assert_close(outputs_of(predicted), want)
        final = {k: to_array(v, k) for k, v in predicted.final_state.items()}
        assert_close(final, want)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_hand_built_cells_match_onnxruntime(server: ServerProcess, test_repository, name) -> None:  # noqa: ANN001
    _check_all_ways(server.address, test_repository, name)


def test_every_version_is_its_own_model(server: ServerProcess, test_repository) -> None:  # noqa: ANN001
    _check_all_ways(server.address, test_repository, "tiny_lstm", "1")
    _check_all_ways(server.address, test_repository, "tiny_lstm", "2")


def test_trained_default_models_match_onnxruntime(default_repository: Path) -> None:
    with ServerProcess(default_repository) as process:
        with stub_for(process.address) as stub:
            names = sorted({m.name for m in stub.ListModels(pb.ListModelsRequest()).models})
        assert names
        for name in names:
            _check_all_ways(process.address, default_repository, name)
