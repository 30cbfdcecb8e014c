"""Client-chosen session ids are namespaced by owner: an id tells nobody about another identity.

Two identities open a session with the same client-chosen id; each gets its own session,
steps it, forks to it, exports it and closes it without seeing or touching the other's, so
``ALREADY_EXISTS`` can never reveal that another identity uses an id. Both sessions come
back from a snapshot with their owners. (Parking in Redis keys entries by owner too:
tests/scaleout/test_ownership_and_outage.py.)
"""

from __future__ import annotations

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
from rnnserve.testing import run_reference
from rnnserve.v1 import inference_service_pb2 as pb

from .identities import ALICE, BOB, SIGNED, auth, token_file

SHARED = "shared-id"


def _y(reply: pb.StepResponse) -> np.ndarray:
    return to_array(reply.outputs["Y"])


def test_two_identities_use_one_session_id_independently(tmp_path: Path) -> None:
    repository = build_repository(tmp_path / "repository")
    tokens = token_file(tmp_path)
    snapshot = tmp_path / "sessions.snap"
    args = ("--token-file", str(tokens), "--snapshot", str(snapshot))
    xs = {ALICE: [inputs_for(0, k) for k in range(3)], BOB: [inputs_for(1, k) for k in range(3)]}
    ys: dict[str, list[np.ndarray]] = {ALICE: [], BOB: []}
    with (
        ServerProcess(repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        service = stub(ch)
        for token in (ALICE, BOB):  # the same id, two identities: both open
            request = pb.OpenSessionRequest(model=MODEL, session_id=SHARED)
            reply = service.OpenSession(request, metadata=auth(token))
            assert reply.session.session_id == SHARED
        with pytest.raises(grpc.RpcError) as again:  # one's own open id is still taken
            service.OpenSession(
                pb.OpenSessionRequest(model=MODEL, session_id=SHARED), metadata=auth(ALICE)
            )
        assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS
        for k in range(2):
            for token in (ALICE, BOB):
                reply = service.Step(step_request(SHARED, xs[token][k]), metadata=auth(token))
                assert reply.position == k + 1
                ys[token].append(_y(reply))
        # Bob forks his session to an id alice uses too, then closes his original.
        service.OpenSession(
            pb.OpenSessionRequest(model=MODEL, session_id="fork"), metadata=auth(ALICE)
        )
        forked = service.ForkSession(
            pb.ForkSessionRequest(session_id=SHARED, new_session_id="fork"), metadata=auth(BOB)
        )
        assert forked.session.position == 2
        bob_state = service.ExportState(
            pb.ExportStateRequest(session_id=SHARED), metadata=auth(BOB)
        )
        alice_state = service.ExportState(
            pb.ExportStateRequest(session_id=SHARED), metadata=auth(ALICE)
        )
        assert not np.array_equal(
            to_array(bob_state.state["initial_h"]), to_array(alice_state.state["initial_h"])
        )
        service.CloseSession(pb.CloseSessionRequest(session_id=SHARED), metadata=auth(BOB))
        alice = service.GetSession(pb.GetSessionRequest(session_id=SHARED), metadata=auth(ALICE))
        assert alice.session.position == 2  # bob's close closed only his own
        fork_of_alice = service.GetSession(
            pb.GetSessionRequest(session_id="fork"), metadata=auth(ALICE)
        )
        assert fork_of_alice.session.position == 0
    # Restarted from the snapshot: alice's "shared-id" and both "fork"s, each its owner's.
    with (
        ServerProcess(repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        service = stub(ch)
        reply = service.Step(step_request(SHARED, xs[ALICE][2]), metadata=auth(ALICE))
        assert reply.position == 3
        ys[ALICE].append(_y(reply))
        reply = service.Step(step_request("fork", xs[BOB][2]), metadata=auth(BOB))
        assert reply.position == 3
        ys[BOB].append(_y(reply))
        with pytest.raises(grpc.RpcError) as closed:
            service.GetSession(pb.GetSessionRequest(session_id=SHARED), metadata=auth(BOB))
        assert closed.value.code() == grpc.StatusCode.NOT_FOUND
        fork_of_alice = service.GetSession(
            pb.GetSessionRequest(session_id="fork"), metadata=auth(ALICE)
        )
        assert fork_of_alice.session.position == 0
    for token in (ALICE, BOB):
        want = run_reference(repository, MODEL, "", {"X": np.concatenate(xs[token])})
        np.testing.assert_allclose(np.concatenate(ys[token]), want["Y"], rtol=1e-5, atol=1e-6)


def test_an_id_ending_in_a_newline_is_refused(tmp_path: Path) -> None:
    """Ids are 1-128 characters of [A-Za-z0-9._:-]: the check's ``$`` also matched before a
    final newline, so ``"abc\\n"`` opened a session, and every log line naming it (``event=
    session_open session=...``) was broken in two by a caller's choice."""
    repository = build_repository(tmp_path / "repository")
    log = tmp_path / "server.log"
    with (
        ServerProcess(repository, log_path=log) as server,
        grpc.insecure_channel(server.address) as ch,
    ):
        service = stub(ch)
        source = service.OpenSession(pb.OpenSessionRequest(model=MODEL)).session.session_id
        calls = {
            "OpenSession": lambda sid: service.OpenSession(
                pb.OpenSessionRequest(model=MODEL, session_id=sid)
            ),
            "ForkSession": lambda sid: service.ForkSession(
                pb.ForkSessionRequest(session_id=source, new_session_id=sid)
            ),
        }
        for method, call in calls.items():
            for sid in ("abc\n", "a" * 128 + "\n"):
                with pytest.raises(grpc.RpcError) as refused:
                    call(sid)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, sid)
