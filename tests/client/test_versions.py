"""The SDK uses the description of the model version the server really serves a call on.

Each test runs its own server over its own repository, in which tiny_lstm starts with version
1 only (input ``x``). Version 2, loaded later through the AdminService, names its input
``features``: same state pairs (so a session can be moved onto it), other weights. A call
encoded from version 1's description cannot pass for version 2: the server refuses input
``x``, and the SDK itself refuses input ``features`` for version 1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import AsyncClient, Client, ClientOptions, InvalidInput
from rnnserve.v1 import admin_service_pb2 as admin_pb
from rnnserve.v1 import admin_service_pb2_grpc as admin_grpc

from .reference import TOLERANCE

MODEL = "tiny_lstm"


class CountCalls(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Records the name of every unary method called, with its request."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        self.calls.append((name, request))
        return await continuation(client_call_details, request)

    def count(self, name: str) -> int:
        return sum(1 for called, _ in self.calls if called == name)


@pytest.fixture
def server(sdk_testing: Any, tmp_path: Path) -> Iterator[Any]:
    """A server over a repository with tiny_lstm version 1 only."""
    repository = sdk_testing.build_test_repository(tmp_path / "repo")
    version_2 = repository / MODEL / "2"
    for path in version_2.iterdir():
        path.unlink()
    version_2.rmdir()
    with sdk_testing.ServerProcess(repository) as process:
        yield process


def _load_version_2(testing: Any, server: Any) -> None:
    """Write version 2 (input ``features``) into the repository and load it."""
    model_dir = Path(server.repository) / MODEL
    config = model_dir / "config.toml"
    config.write_text(config.read_text().replace('name = "x"', 'name = "features"'))
    hidden = testing.HIDDEN[MODEL]
    staging = model_dir / ".staging-2"
    staging.mkdir()
    blob = testing.cell_model("LSTM", hidden, 77, {}, input_name="features")
    (staging / "model.onnx").write_bytes(blob)
    staging.rename(model_dir / "2")
    with grpc.insecure_channel(server.address) as channel:
        reply = admin_grpc.AdminServiceStub(channel).LoadModel(
            admin_pb.LoadModelRequest(model=MODEL, version="2")
        )
    assert [(v.version, v.state) for v in reply.versions] == [("2", admin_pb.READY)]


def _move(server: Any, session_id: str, version: str) -> None:
    with grpc.insecure_channel(server.address) as channel:
        moved = admin_grpc.AdminServiceStub(channel).MoveSession(
            admin_pb.MoveSessionRequest(session_id=session_id, version=version)
        )
    assert moved.version == version


def _x(seed: int, timesteps: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((timesteps, 4)).astype(np.float32)


def _close(actual: Any, expected: Any) -> None:
    np.testing.assert_allclose(actual, expected, rtol=TOLERANCE, atol=TOLERANCE)


async def test_calls_without_a_version_follow_a_version_loaded_since(
    sdk_testing: Any, server: Any
) -> None:
    # The description of the highest version was cached once, under version "": after
    # version 2 loaded, predict still encoded for version 1 (input "x", refused by the
    # server; input "features" refused by the SDK), however often the caller retried.
    counter = CountCalls()
    x = _x(1, 3)
    options = ClientOptions(interceptors=(counter,))
    async with AsyncClient(server.address, options=options) as client:
        first = await client.open_session(MODEL)
        assert first.model.version == "1"
        await client.predict(MODEL, x)
        _load_version_2(sdk_testing, server)
        gets_before = counter.count("GetModel")

        want = sdk_testing.run_reference(server.repository, MODEL, "2", {"features": x})
        predicted = await client.predict(MODEL, x)  # the only input, given positionally
        _close(predicted.outputs["Y"], want["Y"])
        predicted = await client.predict(MODEL, features=x)
        _close(predicted.outputs["Y"], want["Y"])

        second = await client.open_session(MODEL)
        assert (second.model.version, second.model.data_inputs[0].name) == ("2", "features")
        _close(await second.step(x), want["Y"])
        # One description read for the new version, none for each later call.
        assert counter.count("GetModel") - gets_before == 1

        # The session opened before goes on on version 1, with version 1's description.
        assert first.model.version == "1"
        await first.step(x)
        with pytest.raises(InvalidInput):
            await first.step(features=x)  # version 1 has no such input: refused, not re-read
        assert first.position == 3
        assert (await client.get_model(MODEL)).version == "2"


async def test_a_session_opened_from_state_without_a_version_lands_on_the_new_one(
    sdk_testing: Any, server: Any
) -> None:
    async with AsyncClient(server.address) as client:
        first = await client.open_session(MODEL)
        await first.step(_x(2, 2))
        exported = await first.export_state()
        _load_version_2(sdk_testing, server)
        second = await client.open_session(MODEL, initial_state=exported)
        assert (second.model.version, second.position) == ("2", 2)
        x = _x(3, 2)
        want = sdk_testing.run_reference(
            server.repository, MODEL, "2", {"features": x}, initial_state=exported.state
        )
        _close(await second.step(x), want["Y"])


async def test_a_handle_follows_its_session_moved_to_another_version(
    sdk_testing: Any, server: Any
) -> None:
    # A handle kept the description of the version its session opened on: after the session
    # was moved, each step was encoded for the old version and refused, refresh() re-read the
    # version and kept the old description, and a fork's handle inherited it.
    counter = CountCalls()
    x = _x(4, 5)
    async with AsyncClient(
        server.address, options=ClientOptions(interceptors=(counter,))
    ) as client:
        session = await client.open_session(MODEL)
        other = await client.session(session.session_id)  # a second handle, same session
        await session.step(x[:3])
        exported = await session.export_state()
        _load_version_2(sdk_testing, server)
        _move(server, session.session_id, "2")

        found = await client.session(session.session_id)
        assert found.model.version == "2"
        assert session.model.version == "1"  # nothing has told this handle yet

        want = sdk_testing.run_reference(
            server.repository, MODEL, "2", {"features": x[3:]}, initial_state=exported.state
        )
        gets = counter.count("GetModel")
        _close(await session.step(x[3:]), want["Y"])  # refused for version 1, re-read, redone
        assert (session.model.version, session.position) == ("2", 5)
        assert counter.count("GetModel") == gets  # version 2's description was cached
        assert "tiny_lstm:2" in repr(session)

        info = await other.refresh()
        assert (info.version, other.model.version, other.position) == ("2", "2", 5)
        forked = await session.fork()
        assert forked.model.version == "2"
        y = _x(5, 1)
        _close(await forked.step(features=y), await session.step(features=y))


def test_the_blocking_handle_follows_a_moved_session(sdk_testing: Any, server: Any) -> None:
    with Client(server.address) as client:
        session = client.open_session(MODEL)
        session.step(_x(6, 1))
        _load_version_2(sdk_testing, server)
        _move(server, session.session_id, "2")
        session.step(_x(7, 1))
        assert (session.model.version, session.position) == ("2", 2)


async def test_steps_streamed_to_a_moved_session_are_sent_again_in_order(
    sdk_testing: Any, server: Any
) -> None:
    # Steps on a stream, encoded for version 1 after the session was moved to version 2,
    # were each refused (INVALID_TENSOR) and raised, where a unary step re-reads the version
    # and is sent again. Now they go again for version 2: each applied once, in order, and
    # a session of the same stream that stayed on version 1 is not disturbed.
    x = _x(8, 12)
    async with AsyncClient(server.address) as client:
        session = await client.open_session(MODEL)
        bystander = await client.open_session(MODEL)
        async with client.stream() as stream:
            await asyncio.gather(*(stream.submit(session, x[t : t + 1]) for t in range(2)))
            exported = await session.export_state()
            _load_version_2(sdk_testing, server)
            _move(server, session.session_id, "2")
            assert session.model.version == "1"  # nothing has told this handle yet

            first = [stream.submit(session, x[t : t + 1]) for t in range(2, 7)]
            beside = stream.submit(bystander, x[:1])
            await asyncio.sleep(0)
            later = [stream.submit(session, x[t : t + 1]) for t in range(7, 10)]
            outputs = await asyncio.gather(*first, *later)
            await beside
            outputs += [await stream.step(session, features=x[t : t + 1]) for t in (10, 11)]
        assert (session.model.version, session.position) == ("2", 12)
        assert (await session.refresh()).position == 12
        assert bystander.position == 1
        want = sdk_testing.run_reference(
            server.repository, MODEL, "2", {"features": x[2:]}, initial_state=exported.state
        )
        _close(np.concatenate(outputs), want["Y"])
