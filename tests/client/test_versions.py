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
from rnnserve.client import AsyncClient, Client, ClientOptions, InvalidInput, RnnserveError
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


class HoldGetSession(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Holds every GetSession call until ``release`` is set: a stream's re-read of a session's
    version then waits, and the session stays recovering (``AsyncStepStream._recovering``)
    for as long as a test needs, with no sleep. ``reached`` is set once one arrived."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.calls = 0

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: Any,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        if name == "GetSession":
            self.calls += 1
            self.reached.set()
            await self.release.wait()
        return await continuation(client_call_details, request)


async def _recovering(stream: Any, session: Any, hold: HoldGetSession) -> Any:
    """The stream's recovery of ``session`` once its re-read is under way (and held)."""
    await asyncio.wait_for(hold.reached.wait(), 60)  # a bound, not a timed assertion
    recovery = stream._recovering[session.session_id]
    assert not recovery.read
    return recovery


async def _moved_session(
    sdk_testing: Any, server: Any, client: AsyncClient, x: np.ndarray
) -> tuple[Any, Any]:
    """A session that took two steps of ``x`` on version 1, then was moved to version 2 (its
    handle not told), and its state as of the move."""
    session = await client.open_session(MODEL)
    await session.step(x[:2])
    exported = await session.export_state()
    _load_version_2(sdk_testing, server)
    _move(server, session.session_id, "2")
    return session, exported


async def test_steps_submitted_while_a_moved_session_recovers_go_after_the_refused_ones(
    sdk_testing: Any, server: Any
) -> None:
    # Steps of a session submitted while its refused ones wait for the re-read of its
    # version are held (never sent encoded for the old version), then sent behind the
    # refused ones, re-encoded for the new version: all applied once, in submission order.
    hold = HoldGetSession()
    x = _x(9, 8)
    async with AsyncClient(server.address, options=ClientOptions(interceptors=(hold,))) as client:
        session, exported = await _moved_session(sdk_testing, server, client, x)
        async with client.stream() as stream:
            refused = [stream.submit(session, x[t : t + 1]) for t in range(2, 5)]
            recovery = await _recovering(stream, session, hold)
            held = [stream.submit(session, x[t : t + 1]) for t in range(5, 8)]
            assert [refusal for _, refusal in recovery.steps][-3:] == [None] * 3
            sent = stream.steps_sent
            hold.release.set()
            outputs = await asyncio.gather(*refused, *held)
            assert stream.steps_sent == sent + 6  # each of the six sent once more, or first
        assert hold.calls == 1
        assert (session.model.version, session.position) == ("2", 8)
        want = sdk_testing.run_reference(
            server.repository, MODEL, "2", {"features": x[2:]}, initial_state=exported.state
        )
        _close(np.concatenate(outputs), want["Y"])


async def test_a_refused_step_overtaken_by_an_applied_one_raises_and_is_not_sent_again(
    sdk_testing: Any, server: Any
) -> None:
    # Two steps encoded for version 1 are refused; a later step of the same session (from a
    # handle that knows version 2) is applied before they could go again. Sending them then
    # would apply them after it: each raises its refusal instead, and nothing is re-sent.
    x = _x(10, 5)
    async with AsyncClient(server.address) as client:
        session, exported = await _moved_session(sdk_testing, server, client, x)
        current = await client.session(session.session_id)
        assert current.model.version == "2"
        async with client.stream() as stream:
            refused = [stream.submit(session, x[t : t + 1]) for t in (2, 3)]
            applied = stream.submit(current, x[4:5])
            for future in refused:
                with pytest.raises(InvalidInput) as caught:
                    await future
                assert caught.value.reason == "INVALID_TENSOR"
            first = await applied
            # The re-read, which sends nothing, may still be under way.
            await asyncio.wait_for(stream._recovered.wait(), 60)
            assert session.model.version == "2"
            second = await stream.step(session, x[4:5])  # the session goes on, on version 2
            assert stream.steps_sent == 4  # the three submitted first, and this one
        assert (current.position, session.position) == (3, 4)
        want = sdk_testing.run_reference(
            server.repository,
            MODEL,
            "2",
            {"features": x[[4, 4]]},
            initial_state=exported.state,
        )
        _close(np.concatenate([first, second]), want["Y"])


async def test_close_while_a_moved_session_recovers_sends_its_steps_first(
    sdk_testing: Any, server: Any
) -> None:
    # close() while a session's steps are held for the re-read of its version: it waits for
    # the re-read, the held steps go before the half-close, and every step is answered.
    hold = HoldGetSession()
    x = _x(11, 6)
    async with AsyncClient(server.address, options=ClientOptions(interceptors=(hold,))) as client:
        session, exported = await _moved_session(sdk_testing, server, client, x)
        stream = client.stream()
        stream.start()
        refused = [stream.submit(session, x[t : t + 1]) for t in (2, 3)]
        await _recovering(stream, session, hold)
        held = [stream.submit(session, x[t : t + 1]) for t in (4, 5)]
        closing = asyncio.create_task(stream.close())
        for _ in range(20):
            await asyncio.sleep(0)
        assert not closing.done() and not stream._close_queued  # held by the re-read
        with pytest.raises(RuntimeError):
            stream.submit(session, x[:1])  # closing: no more steps
        hold.release.set()
        await closing
        outputs = [future.result() for future in (*refused, *held)]
        assert (session.model.version, session.position) == ("2", 6)
        want = sdk_testing.run_reference(
            server.repository, MODEL, "2", {"features": x[2:]}, initial_state=exported.state
        )
        _close(np.concatenate(outputs), want["Y"])


async def test_a_bad_step_on_a_stream_fails_alone_after_one_re_read(
    sdk_testing: Any, server: Any
) -> None:
    # A step refused as not fitting when its session was not moved (a wrong shape): the
    # re-read finds the same version, so the step raises its refusal and is not sent again;
    # the session's steps sent after it, and those submitted during the re-read, are applied
    # in order, and the stream closes.
    hold = HoldGetSession()
    x = _x(12, 6)
    async with AsyncClient(server.address, options=ClientOptions(interceptors=(hold,))) as client:
        session = await client.open_session(MODEL)
        async with client.stream() as stream:
            before = stream.submit(session, x[0:1])
            bad = stream.submit(session, np.zeros((1, 5), np.float32))
            after = [stream.submit(session, x[t : t + 1]) for t in (1, 2)]
            await _recovering(stream, session, hold)
            held = [stream.submit(session, x[t : t + 1]) for t in (3, 4)]
            sent = stream.steps_sent
            hold.release.set()
            with pytest.raises(InvalidInput) as caught:
                await bad
            assert caught.value.reason == "INVALID_TENSOR"
            outputs = await asyncio.gather(before, *after, *held)
            outputs.append(await stream.step(session, x[5:6]))
            assert stream.steps_sent == sent + 3  # the held two and the last: the bad one not
        assert hold.calls == 1
        assert (session.model.version, session.position) == ("1", 6)
        want = sdk_testing.run_reference(server.repository, MODEL, "1", {"x": x})
        _close(np.concatenate(outputs), want["Y"])


async def test_a_session_closed_while_it_recovers_fails_its_steps_and_the_stream_closes(
    sdk_testing: Any, server: Any
) -> None:
    # The re-read itself fails (the session was closed meanwhile): the refused steps raise
    # their refusal, the held ones are sent and refused for the closed session, and close()
    # returns; nothing waits for an answer that never comes.
    hold = HoldGetSession()
    x = _x(13, 4)
    async with AsyncClient(server.address, options=ClientOptions(interceptors=(hold,))) as client:
        session, _ = await _moved_session(sdk_testing, server, client, x)
        async with client.stream() as stream:
            refused = stream.submit(session, x[2:3])
            await _recovering(stream, session, hold)
            held = stream.submit(session, x[3:4])
            await session.close()
            hold.release.set()
            with pytest.raises(InvalidInput):
                await refused
            with pytest.raises(RnnserveError) as caught:
                await held
            assert not isinstance(caught.value, InvalidInput)
        assert session.model.version == "1"
