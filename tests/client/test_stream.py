"""The step-stream multiplexer and ``AsyncSession.steps`` against a real server."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rnnserve.client import AsyncClient, Client, SessionClosed, SessionNotFound, Unavailable
from rnnserve.client._stream import _CLOSE_FLAG_BYTES, _framed_size
from rnnserve.v1 import inference_service_pb2 as pb
from rnnserve.v1 import tensor_pb2 as tensor_pb

from .reference import as_dict, assert_outputs_close, concat, inputs_for, reference

SESSIONS = 24
ROUNDS = 3


async def test_steps_streams_in_order_and_matches_the_reference(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_lstm") as session:
            model = session.model
            x = inputs_for(model, 12, seed=20)
            chunks = [x[t : t + 1] for t in range(12)]
            outputs = [as_dict(y, model) async for y in session.steps(chunks, window=4)]
            assert len(outputs) == 12
            assert session.position == 12
            assert (await session.refresh()).position == 12
            expected = reference(sdk_testing, sdk_repository, model, x)
            assert_outputs_close(concat(outputs, model), expected)


async def test_many_sessions_on_one_stream_each_get_their_own_outputs(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    async with AsyncClient(target) as client:
        sessions = [await client.open_session("tiny_gru") for _ in range(SESSIONS)]
        model = sessions[0].model
        inputs = [inputs_for(model, ROUNDS, seed=100 + i) for i in range(SESSIONS)]
        results: list[list[dict[str, np.ndarray]]] = [[] for _ in sessions]
        async with client.stream() as stream:
            for t in range(ROUNDS):
                # Submitted in one tick: they travel in one message.
                sent_before = stream.messages_sent
                futures = [stream.submit(s, inputs[i][t : t + 1]) for i, s in enumerate(sessions)]
                for i, output in enumerate(await asyncio.gather(*futures)):
                    results[i].append(as_dict(output, model))
                assert stream.messages_sent == sent_before + 1
            assert stream.steps_sent == SESSIONS * ROUNDS
        for i, session in enumerate(sessions):
            assert session.position == ROUNDS
            expected = reference(sdk_testing, sdk_repository, model, inputs[i])
            assert_outputs_close(concat(results[i], model), expected)
            await session.close()


async def test_one_sessions_steps_queued_together_apply_in_order(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    async with AsyncClient(target) as client, await client.open_session("tiny_rnn") as session:
        model = session.model
        x = inputs_for(model, 5, seed=30)
        async with client.stream() as stream:
            futures = [stream.submit(session, x[t : t + 1]) for t in range(5)]
            outputs = [as_dict(await f, model) for f in futures]
        assert session.position == 5
        assert_outputs_close(
            concat(outputs, model), reference(sdk_testing, sdk_repository, model, x)
        )


async def test_a_step_whose_caller_stopped_waiting_still_moves_the_position(target: str) -> None:
    # The step is applied all the same; its reply was dropped without recording the
    # position, so the next unary step expected the old one: PositionMismatch.
    async with AsyncClient(target) as client, await client.open_session("tiny_gru") as session:
        x = inputs_for(session.model, 1, seed=41)
        async with client.stream() as stream:
            stream.submit(session, x).cancel()  # as wait_for() does when it times out
        assert session.position == 1  # close() waited for the step's reply
        await session.step(x)
        assert session.position == 2
        assert (await session.refresh()).position == 2


async def test_a_failing_step_does_not_break_the_stream(target: str) -> None:
    async with AsyncClient(target) as client:
        alive = await client.open_session("tiny_lstm")
        gone = await client.open_session("tiny_lstm")
        await gone.close()
        x = inputs_for(alive.model, 1, seed=40)
        async with client.stream() as stream:
            ok_before = stream.submit(alive, x)
            failed = stream.submit(gone, x)
            ok_after = stream.submit(alive, x)
            with pytest.raises(SessionClosed):
                await failed
            await ok_before
            await ok_after
            assert alive.position == 2
            with pytest.raises(SessionNotFound):
                await stream.step(gone, x)
            await stream.step(alive, x)
        assert alive.position == 3
        await alive.close()


def test_sync_stream_futures(target: str, sdk_testing: Any, sdk_repository: Path) -> None:
    with Client(target) as client:
        sessions = [client.open_session("tiny_rnn") for _ in range(4)]
        model = sessions[0].model
        inputs = [inputs_for(model, 2, seed=50 + i) for i in range(4)]
        with client.stream() as stream:
            futures = [stream.submit(s, inputs[i]) for i, s in enumerate(sessions)]
            outputs = [as_dict(f.result(timeout=60), model) for f in futures]
        for i, session in enumerate(sessions):
            assert session.position == 2
            expected = reference(sdk_testing, sdk_repository, model, inputs[i])
            assert_outputs_close(outputs[i], expected)
            session.close()


async def test_leaving_steps_early_cancels_the_stream_and_the_session_goes_on(
    target: str,
) -> None:
    async with AsyncClient(target) as client, await client.open_session("tiny_gru") as session:
        x = inputs_for(session.model, 1, seed=80)
        results = session.steps([x] * 8, window=2)
        async for _ in results:
            break
        await results.aclose()
        applied = (await session.refresh()).position
        assert 1 <= applied <= 8  # steps already sent may or may not have been applied
        await session.step(x)
        assert session.position == applied + 1


@pytest.mark.parametrize("how", ["the caller left early", "a step failed"])
async def test_steps_left_unread_log_no_errors(
    target: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Each step sent and never read ended with an exception nobody retrieved, and asyncio
    # logged "Future exception was never retrieved" for every one.
    async with AsyncClient(target) as client:
        session = await client.open_session("tiny_gru")
        x = inputs_for(session.model, 1, seed=81)
        if how == "a step failed":
            await session.close()
        results = session.steps([x] * 8, window=8)
        try:
            async for _ in results:
                break
        except SessionClosed:
            assert how == "a step failed"
        await results.aclose()
        del results
        gc.collect()
        if how == "the caller left early":
            await session.close()
    unread = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not unread


async def test_a_stream_can_release_its_sessions_when_it_ends(target: str) -> None:
    async with AsyncClient(target) as client:
        released = [await client.open_session("tiny_rnn") for _ in range(2)]
        kept = await client.open_session("tiny_rnn")
        async with client.stream(close_sessions_on_end=True) as stream:
            for session in released:
                await stream.step(session, inputs_for(session.model, 1, seed=3))
        async with client.stream() as stream:
            await stream.step(kept, inputs_for(kept.model, 1, seed=4))
        for session in released:
            for _ in range(100):  # the server closes them as the stream ends
                try:
                    await session.refresh()
                except SessionClosed:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the stream's session was not closed")
        assert (await kept.refresh()).position == 1


async def test_closing_the_client_answers_every_step_in_flight_unavailable(target: str) -> None:
    # The stream's reader died of the cancellation and its steps' futures never resolved.
    client = AsyncClient(target)
    session = await client.open_session("tiny_lstm")
    stream = client.stream()
    stream.start()
    x = np.zeros((1, 4), np.float32)
    steps = [stream.submit(session, x) for _ in range(200)]
    await asyncio.sleep(0)
    await client.close()
    outcomes = await asyncio.wait_for(asyncio.gather(*steps, return_exceptions=True), 10)
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert failed and all(isinstance(o, Unavailable) for o in failed), {type(o) for o in failed}
    with pytest.raises(RuntimeError, match="the client is closed"):
        await client.list_models()


@pytest.mark.parametrize("how", ["abort()", "an error inside async with"])
async def test_an_aborted_stream_fails_its_unanswered_steps_unavailable(
    target: str, how: str
) -> None:
    async with AsyncClient(target) as client:
        session = await client.open_session("tiny_lstm")
        x = np.zeros((1, 4), np.float32)
        steps: list[asyncio.Future] = []
        if how == "abort()":
            stream = client.stream()
            stream.start()
            steps = [stream.submit(session, x) for _ in range(300)]
            await stream.abort()
        else:
            with pytest.raises(KeyError):
                async with client.stream() as stream:
                    steps = [stream.submit(session, x) for _ in range(300)]
                    raise KeyError("the caller's own error")
        outcomes = await asyncio.gather(*steps, return_exceptions=True)
        failed = [o for o in outcomes if isinstance(o, BaseException)]
        assert failed and all(isinstance(o, Unavailable) for o in failed), {type(o) for o in failed}


async def test_steps_valid_alone_are_never_coalesced_past_the_message_limit(target: str) -> None:
    # 80 steps of 64 KiB each (5 MiB) used to travel as one message over the server's 4 MiB
    # limit, and their 10 MiB of results as one reply over the client's: the stream died.
    async with AsyncClient(target) as client:
        sessions = [await client.open_session("tiny_lstm") for _ in range(40)]
        x = np.random.default_rng(3).standard_normal((4096, 4)).astype(np.float32)
        want = await (await client.open_session("tiny_lstm")).step(x)
        async with client.stream() as stream:
            steps = [stream.submit(s, x) for s in sessions] + [
                stream.submit(s, x) for s in sessions
            ]
            outputs = await asyncio.gather(*steps)
        assert stream.messages_sent > 1
        for got in outputs[:40]:
            np.testing.assert_array_equal(got, want)


def test_closing_the_sync_client_while_threads_step_leaves_none_hanging(target: str) -> None:
    client = Client(target)
    sessions = [client.open_session("tiny_lstm") for _ in range(4)]
    ended: list[BaseException] = []

    def step_until_closed(session: Any) -> None:
        while True:
            try:
                session.step(np.zeros((50, 4), np.float32))
            except (Unavailable, RuntimeError) as exc:  # in flight / after the close
                ended.append(exc)
                return

    threads = [threading.Thread(target=step_until_closed, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    client.close()
    for thread in threads:
        thread.join(10)
    assert not any(thread.is_alive() for thread in threads)
    assert len(ended) == len(sessions)


def test_closing_the_sync_client_fails_stream_steps_of_other_threads_unavailable(
    target: str,
) -> None:
    # A step whose task the closing loop cancelled raised concurrent.futures.CancelledError
    # in the thread waiting on it, a type no caller expects from the SDK.
    def step_until_closed(stream: Any, session: Any, ended: list[BaseException]) -> None:
        while True:
            try:
                stream.step(session, np.zeros((50, 4), np.float32))
            except BaseException as exc:  # what the caller gets, whatever it is
                ended.append(exc)
                return

    for _ in range(6):  # the close meets steps at every stage only now and then
        client = Client(target)
        stream = client.stream()
        ended: list[BaseException] = []
        threads = [
            threading.Thread(
                target=step_until_closed, args=(stream, client.open_session("tiny_lstm"), ended)
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        time.sleep(0.1)
        client.close()
        for thread in threads:
            thread.join(10)
        assert not any(thread.is_alive() for thread in threads)
        assert all(isinstance(exc, Unavailable | RuntimeError) for exc in ended), ended


def test_sync_steps_read_their_inputs_in_the_callers_thread(target: str) -> None:
    # The inputs were read on the client's loop thread: an input generator that calls the
    # client (here it steps a second session on each input first) waited on that loop from
    # the loop itself, and everything waited forever.
    client = Client(target)
    session, twin = client.open_session("tiny_gru"), client.open_session("tiny_gru")
    x = inputs_for(session.model, 6, seed=90)
    twin_outputs: list[Any] = []

    def inputs() -> Any:
        for t in range(6):
            twin_outputs.append(twin.step(x[t : t + 1]))
            yield x[t : t + 1]

    outputs: list[Any] = []
    consumer = threading.Thread(
        target=lambda: outputs.extend(session.steps(inputs(), window=3)), daemon=True
    )
    consumer.start()
    consumer.join(30)
    assert not consumer.is_alive(), "steps() deadlocked on an input generator using the client"
    assert len(outputs) == 6 and session.position == 6 and twin.position == 6
    for got, want in zip(outputs, twin_outputs, strict=True):
        assert_outputs_close(as_dict(got, session.model), as_dict(want, session.model))
    client.close()


@pytest.mark.parametrize("close_sessions_on_end", [False, True])
async def test_no_coalesced_message_exceeds_the_bound_the_server_reads(
    sdk_testing: Any, sdk_repository: Path, close_sessions_on_end: bool
) -> None:
    # The multiplexer summed its steps' sizes, not their encoded sizes in the message (a tag
    # and a length per step): 16 KiB of small steps made a message some 400 bytes over, which
    # a server reading exactly 16 KiB refused, ending the stream and every step on it.
    limit = 16 << 10
    with sdk_testing.ServerProcess(sdk_repository, "--max-message-bytes", str(limit)) as server:
        async with AsyncClient(server.address) as client:
            sessions = [await client.open_session("tiny_lstm") for _ in range(50)]
            x = inputs_for(sessions[0].model, 1, seed=31)
            stream = client.stream(
                max_message_bytes=limit, close_sessions_on_end=close_sessions_on_end
            )
            async with stream:
                steps = [stream.submit(s, x) for _ in range(8) for s in sessions]
                await asyncio.gather(*steps)
            assert stream.messages_sent > 1
            assert all(s.position == 8 for s in sessions)


@pytest.mark.parametrize("close_sessions_on_end", [False, True])
def test_the_multiplexer_counts_a_message_exactly_as_it_is_encoded(
    close_sessions_on_end: bool,
) -> None:
    # Steps whose lengths straddle the varint boundaries (1, 2 and 3 bytes of length).
    steps = [
        pb.StepRequest(
            session_id="s", request_id=str(i), inputs={"x": tensor_pb.Tensor(data=b"\0" * n)}
        )
        for i, n in enumerate((0, 100, 115, 116, 120, 16360, 16370, 16371, 16380, 20000))
    ]
    message = pb.StreamStepsRequest(steps=steps, close_sessions_on_end=close_sessions_on_end)
    counted = sum(_framed_size(step) for step in steps)
    counted += _CLOSE_FLAG_BYTES if close_sessions_on_end else 0
    assert counted == len(message.SerializeToString())
    framing = {
        len(pb.StreamStepsRequest(steps=[s]).SerializeToString()) - s.ByteSize() for s in steps
    }
    assert framing == {2, 3, 4}  # a tag and a length of 1, 2 and 3 bytes: every case met
