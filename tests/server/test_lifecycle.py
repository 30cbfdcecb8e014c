"""Session lifecycle limits: idle expiry, capacity refusal, LRU eviction (each model its own)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server.frontend.tensors import from_array
from rnnserve.testing import ServerProcess, build_test_repository
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import assert_close, metric, outputs_of, reason_of, reference, step, stub_for

LIMITS = {
    "tiny_rnn": "idle_timeout_s = 0.3",
    "tiny_lstm": "max_sessions = 3",
    "tiny_gru": 'max_sessions = 3\non_full = "evict_lru"',
    "tiny_peephole": "max_queue_size = 2\nmax_queue_delay_us = 200000",
}


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = build_test_repository(tmp_path_factory.mktemp("limited"), limits={})
    for name, extra in LIMITS.items():
        config = root / name / "config.toml"
        config.write_text(config.read_text().replace("[limits]\n", f"[limits]\n{extra}\n"))
    with ServerProcess(root) as process:
        yield process, root


def _x(seed: int, t: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, 4)).astype(np.float32)


def _expect(call, code: grpc.StatusCode, reason: str) -> None:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert reason_of(info.value) == reason


def test_idle_session_expires_with_its_reason(limited) -> None:  # noqa: ANN001
    process, _ = limited
    with stub_for(process.address) as stub:
        sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_rnn")).session.session_id
        step(stub, sid, "x", _x(1))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                stub.GetSession(pb.GetSessionRequest(session_id=sid))
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND
                assert reason_of(error) == "SESSION_EXPIRED"
                break
            time.sleep(0.1)
        else:
            pytest.fail("session never expired")
        _expect(lambda: step(stub, sid, "x", _x(2)), grpc.StatusCode.NOT_FOUND, "SESSION_EXPIRED")
    ended = metric(process.metrics_port, "rnnserve_sessions_ended_total")
    assert any("tiny_rnn" in k and "expire" in k and v >= 1 for k, v in ended.items())


def test_capacity_refuses_at_once_and_keeps_the_others(limited) -> None:  # noqa: ANN001
    process, root = limited
    with stub_for(process.address) as stub:
        model = stub.GetModel(pb.GetModelRequest(name="tiny_lstm")).model
        ids = [f"cap-{n}" for n in range(3)]
        for n, sid in enumerate(ids):
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm", session_id=sid))
            step(stub, sid, "x", _x(n))
        _expect(
            lambda: stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm")),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "CAPACITY_REACHED",
        )
        _expect(
            lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=ids[0])),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "CAPACITY_REACHED",
        )
        for n, sid in enumerate(ids):
            more = _x(10 + n)
            got = outputs_of(step(stub, sid, "x", more))
            want = reference(root, model, np.concatenate([_x(n), more]))
            assert_close(got, {"Y": want["Y"][3:]})
        stub.CloseSession(pb.CloseSessionRequest(session_id=ids[0]))
        x = _x(20)
        sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_lstm")).session.session_id
        assert_close(outputs_of(step(stub, sid, "x", x)), reference(root, model, x))


def test_lru_eviction_evicts_the_least_recently_used(limited) -> None:  # noqa: ANN001
    process, root = limited
    with stub_for(process.address) as stub:
        model = stub.GetModel(pb.GetModelRequest(name="tiny_gru")).model
        for n in range(3):
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru", session_id=f"lru-{n}"))
            step(stub, f"lru-{n}", "x", _x(n))
        step(stub, "lru-0", "x", _x(5))  # lru-1 is now the least recently used
        stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru", session_id="lru-new"))
        _expect(
            lambda: step(stub, "lru-1", "x", _x(6)),
            grpc.StatusCode.NOT_FOUND,
            "SESSION_EVICTED",
        )
        x = _x(7)
        assert_close(outputs_of(step(stub, "lru-new", "x", x)), reference(root, model, x))
        got = outputs_of(step(stub, "lru-0", "x", _x(8)))
        want = reference(root, model, np.concatenate([_x(0), _x(5), _x(8)]))
        assert_close(got, {"Y": want["Y"][6:]})
    ended = metric(process.metrics_port, "rnnserve_sessions_ended_total")
    assert any("tiny_gru" in k and "evict" in k and v >= 1 for k, v in ended.items())


def test_full_queue_refuses_at_once_and_changes_nothing(limited) -> None:  # noqa: ANN001
    process, root = limited
    with stub_for(process.address) as stub:
        model = stub.GetModel(pb.GetModelRequest(name="tiny_peephole")).model
        ids = [
            stub.OpenSession(pb.OpenSessionRequest(model="tiny_peephole")).session.session_id
            for _ in range(4)
        ]
        xs = [_x(30 + n, 2) for n in range(4)]
        steps = [
            pb.StepRequest(session_id=sid, request_id=str(n), inputs={"x": from_array(xs[n])})
            for n, sid in enumerate(ids)
        ]
        message = pb.StreamStepsRequest(steps=steps)
        results = {r.request_id: r for m in stub.StreamSteps(iter([message])) for r in m.results}
        refused = [n for n in range(4) if results[str(n)].WhichOneof("outcome") == "error"]
        assert refused == [2, 3]
        for n in refused:
            error = results[str(n)].error
            assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            assert error.reason == "QUEUE_FULL"
        for n, sid in enumerate(ids):
            position = stub.GetSession(pb.GetSessionRequest(session_id=sid)).session.position
            assert position == (0 if n in refused else 2)
            if n in refused:
                got = outputs_of(step(stub, sid, "x", xs[n]))
                assert_close(got, reference(root, model, xs[n]))
            else:
                assert_close(outputs_of(results[str(n)].response), reference(root, model, xs[n]))
