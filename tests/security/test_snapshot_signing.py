"""Saved sessions are signed when authentication is on; forged ones and unknown owners are refused.

- A snapshot record whose owner was edited (checksum recomputed, so the file is whole), and
  one whose signature was stripped, are refused on restore: logged, counted, not restored;
  every other session of the file is restored as it was.
- A record whose owner is no longer an identity the server authenticates (a token removed)
  is refused too, instead of holding a slot nobody can reach.
- With tokens and --snapshot but no key, the server refuses to start and says which flag.
(Parked sessions in Redis: tests/scaleout/test_ownership_and_outage.py.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc
import numpy as np
import pytest
from reliability.harness import (
    MODEL,
    ServerProcess,
    build_repository,
    inputs_for,
    step_request,
    stub,
    to_array,
)
from rnnserve.server.engine.snapshot import decode_sessions, encode_sessions, read_snapshot
from rnnserve.testing import run_reference
from rnnserve.v1 import inference_service_pb2 as pb

from .identities import ALICE, BOB, SIGNED, auth

REFUSED = "rnnserve_session_records_refused_total"


def _tokens(folder: Path, *entries: str) -> Path:
    path = folder / f"tokens-{len(entries)}.txt"
    path.write_text("".join(f"{entry}\n" for entry in entries))
    path.chmod(0o600)
    return path


def _open_and_step(service, session_id: str, token: str, x: np.ndarray) -> np.ndarray:  # noqa: ANN001
    service.OpenSession(
        pb.OpenSessionRequest(model=MODEL, session_id=session_id), metadata=auth(token)
    )
    return to_array(service.Step(step_request(session_id, x), metadata=auth(token)).outputs["Y"])


def _code(call, request, token: str) -> grpc.StatusCode:  # noqa: ANN001
    try:
        call(request, metadata=auth(token), timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_forged_or_unsigned_snapshot_record_is_refused_and_the_rest_restored(
    tmp_path: Path,
) -> None:
    repository = build_repository(tmp_path / "repository")
    tokens = _tokens(tmp_path, f"alice:{ALICE}", f"bob:{BOB}")
    snapshot = tmp_path / "sessions.snap"
    args = ("--token-file", str(tokens), "--snapshot", str(snapshot))
    x0, x1 = inputs_for(0, 0), inputs_for(0, 1)
    with (
        ServerProcess(repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        service = stub(channel)
        _open_and_step(service, "alices", ALICE, x0)
        _open_and_step(service, "unsigned", ALICE, x0)
        first = _open_and_step(service, "bobs", BOB, x0)
    # Alice's session handed to bob, checksum recomputed: the file is whole, the record forged.
    saved = read_snapshot(snapshot)
    edited = []
    for record in saved.sessions:
        if record.session_id == "alices":
            record = dataclasses.replace(record, owner="bob")
        elif record.session_id == "unsigned":
            record = dataclasses.replace(record, signature="")
        edited.append(record)
    snapshot.write_bytes(encode_sessions(edited, created_at=saved.created_at))

    with (
        ServerProcess(repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        service = stub(channel)
        for session_id, token in (("alices", BOB), ("alices", ALICE), ("unsigned", ALICE)):
            request = pb.GetSessionRequest(session_id=session_id)
            assert _code(service.GetSession, request, token) == grpc.StatusCode.NOT_FOUND
        # Nothing else was affected: bob's own session carries on where it was.
        reply = service.Step(step_request("bobs", x1), metadata=auth(BOB))
        assert reply.position == 2
        assert server.metric(REFUSED, source="snapshot", reason="signature") == 2
        log = server.stderr()
    assert "snapshot session alices skipped: its signature does not match" in log
    assert "snapshot session unsigned skipped: the record is not signed" in log
    want = run_reference(repository, MODEL, "", {"X": np.concatenate([x0, x1])})
    got = np.concatenate([first, to_array(reply.outputs["Y"])])
    np.testing.assert_allclose(got, want["Y"], rtol=1e-5, atol=1e-6)


def test_a_record_of_an_identity_no_longer_authenticated_is_refused(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    snapshot = tmp_path / "sessions.snap"
    both = _tokens(tmp_path, f"alice:{ALICE}", f"bob:{BOB}")
    alice_only = _tokens(tmp_path, f"alice:{ALICE}")
    x = inputs_for(1, 0)
    args = ("--snapshot", str(snapshot), "--token-file")
    with (
        ServerProcess(repository, *args, str(both), env=SIGNED) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        service = stub(channel)
        _open_and_step(service, "alices", ALICE, x)
        _open_and_step(service, "bobs", BOB, x)
    assert {r.owner for r in read_snapshot(snapshot).sessions} == {"alice", "bob"}
    with (
        ServerProcess(repository, *args, str(alice_only), env=SIGNED) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        service = stub(channel)
        reply = service.GetSession(pb.GetSessionRequest(session_id="alices"), metadata=auth(ALICE))
        assert reply.session.position == 1
        assert server.metric(REFUSED, source="snapshot", reason="owner") == 1
        assert server.metric("rnnserve_active_sessions") == 1  # no slot held for bob
        log = server.stderr()
    assert "snapshot session bobs skipped: its owner 'bob' is not an identity" in log


def test_authentication_with_saved_sessions_and_no_key_refuses_to_start(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    tokens = _tokens(tmp_path, f"alice:{ALICE}")
    args = ("--token-file", str(tokens), "--snapshot", str(tmp_path / "s.snap"))
    with pytest.raises(RuntimeError) as info:
        ServerProcess(repository, *args, env={"RNNSERVE_SNAPSHOT_KEY": ""}).start()
    message = str(info.value)
    assert "server exited with 2" in message, message
    assert "--snapshot-key-file" in message and "RNNSERVE_SNAPSHOT_KEY" in message, message
    short = tmp_path / "short.key"
    short.write_text("too-short")
    with pytest.raises(RuntimeError) as info:
        ServerProcess(repository, *args, "--snapshot-key-file", str(short)).start()
    assert "at least 32" in str(info.value), str(info.value)


def test_records_decode_with_their_signature() -> None:
    """The signature travels in the snapshot encoding (files and Redis entries alike)."""
    from rnnserve.server.engine.signing import RecordSigner
    from rnnserve.server.engine.snapshot import SessionRecord

    signer = RecordSigner(SIGNED["RNNSERVE_SNAPSHOT_KEY"].encode())
    record = signer.sign(
        SessionRecord("s", MODEL, "1", 3, {"h": np.arange(4, dtype=np.float32)}, owner="alice")
    )
    (back,) = decode_sessions(encode_sessions([record], created_at=1.0), "test").sessions
    assert signer.problem(back) is None
    assert signer.problem(dataclasses.replace(back, position=4)) is not None
    assert RecordSigner(b"another-key-of-32-bytes-or-more-00").problem(back) is not None
