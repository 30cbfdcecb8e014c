"""Parked sessions keep their owner, and a Redis outage costs resident sessions nothing.

- With bearer tokens, a session parked for alice is invisible to bob (NOT_FOUND, exactly as
  for a resident one) and stays in the store for alice.
- Redis killed: resident sessions go on stepping; a parked session answers UNAVAILABLE
  naming the store, and its state is untouched; Redis back (same port, same saved data):
  the parked session carries on where it was.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from deploy.stubs import to_tensor
from deploy.tools import free_port, wait_until
from rnnserve.testing import ServerProcess, run_reference
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer
from .wire import MODEL, TIMEOUT_S, code_of, inputs, metadata, open_session, output, step

ALICE = "alice-0123456789abcdef"
BOB = "bob-fedcba9876543210xx"
PREFIX = "owned:"
#: With tokens and a state store, parked sessions are signed: the servers share this key.
SIGNED = {"RNNSERVE_SNAPSHOT_KEY": "parked-sessions-key-0123456789abcdef"}


def _calls(session_id: str) -> dict[str, tuple[object, object]]:
    x = to_tensor(np.zeros((1, 4), np.float32))
    return {
        "Step": ("Step", pb.StepRequest(session_id=session_id, inputs={"x": x})),
        "GetSession": ("GetSession", pb.GetSessionRequest(session_id=session_id)),
        "ExportState": ("ExportState", pb.ExportStateRequest(session_id=session_id)),
        "ForkSession": ("ForkSession", pb.ForkSessionRequest(session_id=session_id)),
        "CloseSession": ("CloseSession", pb.CloseSessionRequest(session_id=session_id)),
    }


def _parking_args(tmp_path: Path, redis_server: RedisServer, prefix: str) -> tuple[str, ...]:
    """Server flags: alice and bob as token identities, sessions parked in Redis under
    ``prefix`` after 0.3 s idle."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    tokens.chmod(0o600)
    return (
        *("--token-file", str(tokens), "--state-store", redis_server.url),
        *("--state-store-prefix", prefix, "--park-after-s", "0.3"),
    )


def test_another_identity_cannot_unpark_a_session(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    args = _parking_args(tmp_path, redis_server, PREFIX)
    redis = redis_server.client()
    xs = inputs(seed=7, steps=2)
    with (
        ServerProcess(scaleout_repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        open_session(stub, "alices", token=ALICE)
        first = output(step(stub, "alices", xs[0], token=ALICE))
        wait_until("alice's session to be parked", lambda: redis.exists(PREFIX + "alice/alices"))
        for name, (method, request) in _calls("alices").items():
            code = code_of(getattr(stub, method), request, "alices", token=BOB)
            assert code == grpc.StatusCode.NOT_FOUND, name
            assert redis.exists(PREFIX + "alice/alices"), f"{name} by bob took alice's session"
        second = output(step(stub, "alices", xs[1], token=ALICE))
    whole = run_reference(scaleout_repository, MODEL, "", {"x": np.concatenate(xs)})
    np.testing.assert_allclose(np.concatenate([first, second]), whole["Y"], rtol=1e-5, atol=1e-6)


def test_redis_down_resident_sessions_step_parked_ones_wait_unchanged(
    scaleout_repository: Path, tmp_path: Path
) -> None:
    store = RedisServer(tmp_path / "redis", free_port())
    store.start()
    try:
        _outage(scaleout_repository, store)
    finally:
        store.stop()


def _outage(repository: Path, store: RedisServer) -> None:
    args = ("--state-store", store.url, "--state-store-prefix", PREFIX, "--park-after-s", "0.5")
    xs = {name: inputs(seed=seed, steps=6) for seed, name in enumerate(("resident", "parked"))}
    outputs: dict[str, list[np.ndarray]] = {"resident": [], "parked": []}
    redis = store.client()

    def run(stub: pb_grpc.InferenceServiceStub, name: str, k: int) -> None:
        reply = step(stub, name, xs[name][k], expected_position=k)
        assert reply.position == k + 1
        outputs[name].append(output(reply))

    with ServerProcess(repository, *args) as server, grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        for name in xs:
            open_session(stub, name)
            run(stub, name, 0)
        wait_until(
            "both sessions parked",
            lambda: redis.exists(PREFIX + "anonymous/parked", PREFIX + "anonymous/resident") == 2,
        )
        run(stub, "resident", 1)  # back in its slot; it is stepped often from now on
        redis.save()  # what survives the crash below
        store.kill()

        for k in range(2, 5):
            # Idle past --park-after-s: the reaper tries to park it, fails, leaves it resident.
            time.sleep(1.2)
            run(stub, "resident", k)
        request = pb.StepRequest(session_id="parked", inputs={"x": to_tensor(xs["parked"][1])})
        request.expected_position = 1
        with pytest.raises(grpc.RpcError) as caught:
            stub.Step(request, metadata=metadata("parked"), timeout=TIMEOUT_S)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert store.url.removesuffix("/0") in (caught.value.details() or "")
        assert dict(caught.value.trailing_metadata() or ())["rnnserve-error-reason"] == (
            "STATE_STORE_UNAVAILABLE"
        )
        run(stub, "resident", 5)  # still served after the refusal

        store.start()  # same port and folder: the saved data is back
        # The store is asked again after a short pause (no per-call cost while it is down).
        back = wait_until("the parked session to come back", lambda: _try(stub, request))
        outputs["parked"].append(output(back))
        for k in range(2, 6):
            run(stub, "parked", k)
        assert "event=state_store_down" in server.stderr()
        assert server.stderr().count("event=state_store_down") == 1  # once per outage

    for name, chunks in outputs.items():
        whole = run_reference(repository, MODEL, "", {"x": np.concatenate(xs[name])})
        np.testing.assert_allclose(np.concatenate(chunks), whole["Y"], rtol=1e-5, atol=1e-6)


def _try(stub: pb_grpc.InferenceServiceStub, request: pb.StepRequest) -> pb.StepResponse | None:
    """The step's reply, or None while the server still answers UNAVAILABLE."""
    try:
        return stub.Step(request, metadata=metadata(request.session_id), timeout=TIMEOUT_S)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return None


def test_a_store_entry_whose_data_names_another_session_is_refused(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """An entry under bob's key whose data is alice's parked session (forged, or mixed up)
    must not hand alice's state to bob: it is refused, and alice's own entry is untouched."""
    args = _parking_args(tmp_path, redis_server, "forged:")
    redis = redis_server.client()
    xs = inputs(seed=9, steps=2)
    with (
        ServerProcess(scaleout_repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        open_session(stub, "alices", token=ALICE)
        open_session(stub, "bobs", token=BOB)
        step(stub, "alices", xs[0], token=ALICE)
        wait_until(
            "both sessions to be parked",
            lambda: redis.exists("forged:alice/alices") and redis.exists("forged:bob/bobs"),
        )
        redis.hset("forged:bob/bobs", "data", redis.hget("forged:alice/alices", "data"))
        code = code_of(stub.GetSession, pb.GetSessionRequest(session_id="bobs"), "bobs", token=BOB)
        assert code == grpc.StatusCode.DATA_LOSS
        assert redis.exists("forged:alice/alices")
        reply = stub.Step(
            pb.StepRequest(session_id="alices", inputs={"x": to_tensor(xs[1])}),
            metadata=metadata("alices", token=ALICE),
            timeout=TIMEOUT_S,
        )
        assert reply.position == 2


def test_two_identities_park_and_take_back_sessions_of_one_id(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Session ids are namespaced by owner in Redis too: alice's and bob's "same" are two
    entries, each parked and taken back by its owner, neither answering ALREADY_EXISTS."""
    args = _parking_args(tmp_path, redis_server, "ns:")
    redis = redis_server.client()
    xs = {ALICE: inputs(seed=11, steps=2), BOB: inputs(seed=12, steps=2)}
    got: dict[str, list[np.ndarray]] = {ALICE: [], BOB: []}
    with (
        ServerProcess(scaleout_repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        for token in (ALICE, BOB):
            open_session(stub, "same", token=token)
            got[token].append(output(step(stub, "same", xs[token][0], token=token)))
        wait_until(
            "both sessions to be parked",
            lambda: redis.exists("ns:alice/same", "ns:bob/same") == 2,
        )
        for token in (ALICE, BOB):  # a parked id of another identity is no obstacle either
            code = code_of(
                stub.OpenSession, pb.OpenSessionRequest(model=MODEL, session_id="same"), "same",
                token=token,
            )  # fmt: skip
            assert code == grpc.StatusCode.ALREADY_EXISTS  # its own parked session
        for token in (BOB, ALICE):
            reply = step(stub, "same", xs[token][1], token=token)
            assert reply.position == 2
            got[token].append(output(reply))
    for token, chunks in got.items():
        whole = run_reference(scaleout_repository, MODEL, "", {"x": np.concatenate(xs[token])})
        np.testing.assert_allclose(np.concatenate(chunks), whole["Y"], rtol=1e-5, atol=1e-6)


def test_a_parked_entry_edited_with_a_recomputed_checksum_is_refused(
    scaleout_repository: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """With authentication on, parked sessions are signed: an entry whose record was edited
    (here its position) and re-encoded with a valid checksum is refused with DATA_LOSS and
    dropped; bob's session parked alongside comes back untouched."""
    import dataclasses

    from rnnserve.server.engine.snapshot import decode_sessions, encode_sessions

    args = _parking_args(tmp_path, redis_server, "signed:")
    redis = redis_server.client()
    xs = inputs(seed=13, steps=2)
    with (
        ServerProcess(scaleout_repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        stub = pb_grpc.InferenceServiceStub(ch)
        open_session(stub, "alices", token=ALICE)
        open_session(stub, "bobs", token=BOB)
        first = output(step(stub, "bobs", xs[0], token=BOB))
        wait_until(
            "both sessions to be parked",
            lambda: redis.exists("signed:alice/alices", "signed:bob/bobs") == 2,
        )
        parked = decode_sessions(redis.hget("signed:alice/alices", "data"), "test").sessions
        edited = dataclasses.replace(parked[0], position=1000)
        redis.hset("signed:alice/alices", "data", encode_sessions([edited], created_at=0.0))
        request = pb.GetSessionRequest(session_id="alices")
        assert code_of(stub.GetSession, request, "alices", token=ALICE) == (
            grpc.StatusCode.DATA_LOSS
        )
        assert not redis.exists("signed:alice/alices")  # dropped, never restored
        assert code_of(stub.GetSession, request, "alices", token=ALICE) == (
            grpc.StatusCode.NOT_FOUND
        )
        second = output(step(stub, "bobs", xs[1], token=BOB))
        assert (
            server.metric(
                "rnnserve_session_records_refused_total", source="state_store", reason="signature"
            )
            == 1
        )
        assert server.stderr().count("event=unpark_corrupt session=alices") == 1
    whole = run_reference(scaleout_repository, MODEL, "", {"x": np.concatenate(xs)})
    np.testing.assert_allclose(np.concatenate([first, second]), whole["Y"], rtol=1e-5, atol=1e-6)
