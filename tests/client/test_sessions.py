"""Sessions through the SDK against a real server: outputs match onnxruntime run directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import (
    AlreadyExists,
    AsyncClient,
    Client,
    InvalidInput,
    ModelNotFound,
    NotFound,
    SessionClosed,
    SessionNotFound,
)

from .reference import MODELS, as_dict, assert_outputs_close, concat, inputs_for, reference


async def test_list_and_get_models(target: str) -> None:
    async with AsyncClient(target) as client:
        listed = {(m.name, m.version) for m in await client.list_models()}
        assert {(name, "1") for name in MODELS} <= listed
        assert ("tiny_lstm", "2") in listed
        latest = await client.get_model("tiny_lstm")
        assert latest.version == "2"
        assert latest.versions == ("1", "2")
        assert (await client.get_model("tiny_lstm", "1")).version == "1"
        with pytest.raises(ModelNotFound) as caught:
            await client.get_model("no_such_model")
        assert caught.value.code is grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("model_name", MODELS)
async def test_async_steps_in_chunks_equal_the_whole_sequence(
    target: str, sdk_testing: Any, sdk_repository: Path, model_name: str
) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session(model_name) as session:
            model = session.model
            x = inputs_for(model, 6, seed=1)
            chunks = []
            for start, stop in ((0, 1), (1, 4), (4, 6)):
                chunks.append(as_dict(await session.step(x[start:stop]), model))
                assert session.position == stop
            assert_outputs_close(
                concat(chunks, model), reference(sdk_testing, sdk_repository, model, x)
            )


def test_sync_client_steps_equal_the_reference(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    with Client(target) as client, client.open_session("tiny_lstm", version="1") as session:
        assert session.model.version == "1"
        x = inputs_for(session.model, 5, seed=2)
        chunks = [as_dict(session.step(x[t : t + 1]), session.model) for t in range(5)]
        assert session.position == 5
        expected = reference(sdk_testing, sdk_repository, session.model, x)
        assert_outputs_close(concat(chunks, session.model), expected)
        streamed = [as_dict(y, session.model) for y in session.steps([x[:2], x[2:]])]
        assert session.position == 10
        assert session.export_state().position == 10
        # The state carried on: the streamed outputs continue from the end of ``x``.
        twice = reference(sdk_testing, sdk_repository, session.model, np.concatenate([x, x]))
        assert_outputs_close(concat(streamed, session.model), _last(twice, session.model, 5))
    assert session.closed
    with Client(target) as client:
        with pytest.raises(SessionClosed):
            client.session(session.session_id)


async def test_predict_is_stateless_and_matches_the_reference(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    async with AsyncClient(target) as client:
        model = await client.get_model("tiny_gru")
        x = inputs_for(model, 4, seed=3)
        first = await client.predict("tiny_gru", x)
        again = await client.predict("tiny_gru", x)
        expected = reference(sdk_testing, sdk_repository, model, x)
        assert_outputs_close(first.outputs, expected)
        assert_outputs_close(again.outputs, expected)
        assert set(first.final_state) == {state.name for state in model.states}


async def test_export_then_open_continues_exactly(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_lstm") as original:
            model = original.model
            x = inputs_for(model, 7, seed=4)
            await original.step(x[:4])
            exported = await original.export_state()
            assert exported.position == 4
            assert set(exported.state) == {state.name for state in model.states}
            async with await client.open_session("tiny_lstm", initial_state=exported) as moved:
                assert moved.position == 4
                continued = as_dict(await moved.step(x[4:]), model)
                assert moved.position == 7
            expected = reference(sdk_testing, sdk_repository, model, x)
            assert_outputs_close(continued, _last(expected, model, 3))


async def test_fork_gives_two_independent_continuations(
    target: str, sdk_testing: Any, sdk_repository: Path
) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_peephole") as parent:
            model = parent.model
            prefix = inputs_for(model, 3, seed=5)
            await parent.step(prefix)
            async with await parent.fork() as child:
                assert child.session_id != parent.session_id
                assert child.position == 3
                a, b = inputs_for(model, 2, seed=6), inputs_for(model, 2, seed=7)
                from_parent = as_dict(await parent.step(a), model)
                from_child = as_dict(await child.step(b), model)
            for suffix, got in ((a, from_parent), (b, from_child)):
                whole = reference(
                    sdk_testing, sdk_repository, model, np.concatenate([prefix, suffix])
                )
                assert_outputs_close(concat([got], model), _last(whole, model, 2))


async def test_reset_starts_the_session_over(target: str) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_rnn") as session:
            x = inputs_for(session.model, 3, seed=8)
            first = as_dict(await session.step(x), session.model)
            await session.step(x)
            await session.reset()
            assert session.position == 0
            assert (await session.refresh()).position == 0
            assert_outputs_close(as_dict(await session.step(x), session.model), first)


async def test_closed_session_raises_session_closed(target: str) -> None:
    async with AsyncClient(target) as client:
        session = await client.open_session("tiny_lstm")
        x = inputs_for(session.model, 1, seed=9)
        await session.step(x)
        await session.close()
        with pytest.raises(SessionClosed) as caught:
            await session.step(x)
        assert isinstance(caught.value, SessionNotFound)
        assert caught.value.code is grpc.StatusCode.NOT_FOUND
        assert caught.value.reason == "SESSION_CLOSED"
        with pytest.raises(SessionClosed):
            await session.export_state()


async def test_unknown_session_and_taken_id(target: str) -> None:
    async with AsyncClient(target) as client:
        with pytest.raises(SessionNotFound):
            await client.session("never-opened")
        async with await client.open_session("tiny_rnn", session_id="sdk-taken") as session:
            assert session.session_id == "sdk-taken"
            with pytest.raises(AlreadyExists):
                await client.open_session("tiny_rnn", session_id="sdk-taken")
            again = await client.session("sdk-taken")
            assert again.position == session.position == 0
        with pytest.raises(ModelNotFound):
            await client.open_session("no_such_model")
        assert issubclass(ModelNotFound, NotFound)


async def test_bad_inputs_raise_invalid_input_and_change_nothing(target: str) -> None:
    async with AsyncClient(target) as client:
        async with await client.open_session("tiny_gru") as session:
            good = inputs_for(session.model, 2, seed=10)
            with pytest.raises(InvalidInput):
                await session.step(np.zeros((2, 5), np.float32))  # wrong feature size
            with pytest.raises(InvalidInput):
                await session.step(not_an_input=good)  # refused before any call
            assert (await session.refresh()).position == 0
            await session.step(good)
            assert session.position == 2


def _last(outputs: dict[str, np.ndarray], model: Any, count: int) -> dict[str, np.ndarray]:
    """The last ``count`` timesteps of each output."""
    result = {}
    for spec in model.outputs:
        value = outputs[spec.name]
        length = value.shape[spec.time_axis]
        result[spec.name] = np.take(value, range(length - count, length), axis=spec.time_axis)
    return result


def test_a_closed_sync_client_refuses_calls(target: str) -> None:
    client = Client(target)
    client.close()
    client.close()  # closing twice is harmless
    with pytest.raises(RuntimeError):
        client.list_models()
