"""An OpenSession or ForkSession that is refused parks nobody.

At capacity, a server with a state store makes room for a new session by parking the least
recently used idle one, whoever owns it. A call that is refused anyway (a bad
``initial_position``, the caller's session quota) must be refused before that: a failed call
touches no other session (another identity's least of all), and a parked session needs the
store to be up to come back.

A real ``rnnserve serve`` process (alice and bob as token identities, each allowed three
sessions) parks into a real ``redis-server``; whether a session was parked is read from
Redis itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import grpc
import pytest
from rnnserve.testing import ServerProcess
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

from .redis_server import RedisServer
from .wire import MODEL, TIMEOUT_S, metadata, open_session

ALICE = "alice-0123456789abcdef"
BOB = "bob-fedcba9876543210xx"
#: With tokens and a state store, parked sessions are signed.
SIGNED = {"RNNSERVE_SNAPSHOT_KEY": "parked-sessions-key-0123456789abcdef"}
QUOTA = 3
_prefixes = itertools.count()


class Full(NamedTuple):
    stub: pb_grpc.InferenceServiceStub
    prefix: str


@pytest.fixture
def full(small_repository: Path, redis_server: RedisServer, tmp_path: Path) -> Iterator[Full]:
    """A parking server whose four tiny_lstm slots are all taken: alice's "a0" (the least
    recently used) and bob's "b1".."b3" (bob is at his quota of three)."""
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    tokens.chmod(0o600)
    prefix = f"refused{next(_prefixes)}:"
    args = (
        *("--token-file", str(tokens), "--state-store", redis_server.url),
        *("--state-store-prefix", prefix, "--max-sessions-per-identity", str(QUOTA)),
    )
    with (
        ServerProcess(small_repository, *args, env=SIGNED) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.InferenceServiceStub(channel)
        open_session(stub, "a0", token=ALICE)
        for n in range(1, QUOTA + 1):
            open_session(stub, f"b{n}", token=BOB)
        yield Full(stub, prefix)


def _parked(redis_server: RedisServer, prefix: str) -> list[str]:
    """Sessions whose state is in the store (their own key, not a holder record or claim)."""
    keys = (key.decode() for key in redis_server.client().keys(prefix + "*/*"))
    return sorted(key for key in keys if "#" not in key)


def _refused(call: object, request: object, session_id: str, token: str) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call(request, metadata=metadata(session_id, token), timeout=TIMEOUT_S)  # type: ignore[operator]
    return refused.value.code()


@pytest.mark.parametrize("session_id", ["", "chosen"])
@pytest.mark.parametrize("token", [ALICE, BOB])
def test_open_with_a_bad_initial_position_at_capacity_parks_nobody(
    full: Full, redis_server: RedisServer, session_id: str, token: str
) -> None:
    request = pb.OpenSessionRequest(model=MODEL, session_id=session_id, initial_position=-1)
    code = _refused(full.stub.OpenSession, request, session_id, token)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert _parked(redis_server, full.prefix) == []


def test_open_over_the_quota_at_capacity_parks_nobody_elses_session(
    full: Full, redis_server: RedisServer
) -> None:
    request = pb.OpenSessionRequest(model=MODEL)
    assert _refused(full.stub.OpenSession, request, "", BOB) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _parked(redis_server, full.prefix) == []


def test_fork_over_the_quota_at_capacity_parks_nobody_elses_session(
    full: Full, redis_server: RedisServer
) -> None:
    request = pb.ForkSessionRequest(session_id="b3")
    code = _refused(full.stub.ForkSession, request, "b3", BOB)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _parked(redis_server, full.prefix) == []


def test_an_open_that_is_allowed_still_makes_room_by_parking(
    full: Full, redis_server: RedisServer
) -> None:
    """The other side: alice, under her quota, gets a slot by parking the least recently
    used session (her own "a0"), which answers again afterwards."""
    opened = open_session(full.stub, "a1", token=ALICE)
    assert opened.session_id == "a1"
    assert _parked(redis_server, full.prefix) == [f"{full.prefix}alice/a0"]
    request = pb.GetSessionRequest(session_id="a0")
    reply = full.stub.GetSession(request, metadata=metadata("a0", ALICE), timeout=TIMEOUT_S)
    assert reply.session.session_id == "a0"
