"""The pipe between frontends and the engine: every message arrives whole and in order, none is
dropped however far one side falls behind (a dropped "steps" or "outcomes" message is a caller
that waits forever), and callers waiting on an engine that went away are told at once.

The pipe buffers whatever its peer has not read yet (the first pipe, on zmq, dropped messages
past 1,000 queued per socket). Here the engine runs on its own thread and loop (as in its own
process); first its loop is held while a frontend sends 4,000 separate step messages, far more
than the socket's kernel buffer holds, then the frontend's loop is held while the engine
answers what reached it. Every step must still be answered, in order.
"""

from __future__ import annotations

import asyncio
import os
import stat
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.server.engine.batcher import Outcome
from rnnserve.server.engine.core import Engine
from rnnserve.server.engine.ipc import (
    SOCKET_PATH_MAX,
    EngineServer,
    PackedOutcomes,
    Pipe,
    dumps,
    loads,
    pack_outcomes,
    pack_steps,
    socket_path,
    unpack_arrays,
    unpack_steps,
)
from rnnserve.server.errors import RnnserveError
from rnnserve.server.frontend.engine_client import EngineClient
from rnnserve.server.frontend.replies import CallerSink
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import load_repository
from rnnserve.testing import build_test_repository

from .helpers import Collector, engine_over_pipe

OWNER = "tester"
STEPS = 4000  # under the model's queue limit (4,096), far over one socket buffer's worth


class _EngineThread:
    """An engine and its IPC server on a loop of their own, in a thread."""

    def __init__(self, repository: Path, address: str) -> None:
        self.address = address
        self._repository = repository
        self.loop: asyncio.AbstractEventLoop | None = None
        self.engine: Engine | None = None
        self._up = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.engine = Engine(load_repository(self._repository), Metrics())
        await self.engine.start()
        server = EngineServer(self.engine, self.address)
        await server.start()
        self._up.set()
        try:
            await self._stop.wait()
        finally:
            await server.close()
            await self.engine.stop()

    def start(self) -> None:
        self._thread.start()
        assert self._up.wait(60)

    def hold(self, release: threading.Event) -> None:
        """Block the engine's loop until ``release`` is set."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(release.wait, 60)

    def steps_run(self) -> float:
        assert self.engine is not None
        return sum(
            self.engine.metrics.batch_size.labels(*key.split(":"))._sum.get()  # noqa: SLF001
            for key in self.engine.batchers
        )

    def stop(self) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


async def test_a_backlog_either_way_loses_no_message(tmp_path: Path) -> None:
    repository = build_test_repository(tmp_path / "repo")
    engine = _EngineThread(repository, str(tmp_path / "engine.sock"))
    engine.start()
    client = EngineClient(engine.address)
    try:
        await client.connect()
        sid = (await client.open_session("tiny_gru", "", "", {}, 0, OWNER)).session_id
        x = np.zeros((1, 4), np.float32)
        answers = Collector()
        before = engine.steps_run()

        release = threading.Event()
        engine.hold(release)  # the engine reads nothing while the frontend sends
        for ticket in range(STEPS):  # one message per turn of the frontend's loop
            client.submit([(ticket, sid, {"x": x}, None, None)], OWNER, answers)
            await asyncio.sleep(0)
        release.set()

        # Now the frontend's loop is held (it reads and writes nothing) while the engine
        # answers what reached it, each step as soon as it arrives.
        held_from = engine.steps_run()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            seen = engine.steps_run()
            time.sleep(0.5)
            if engine.steps_run() == seen > before:
                break
        assert engine.steps_run() > held_from  # answers queued for a frontend that read none

        await answers.wait_for(STEPS)
        assert [o.ticket for o in answers.outcomes] == list(range(STEPS))
        assert engine.steps_run() - before == STEPS
        assert all(o.error is None for o in answers.outcomes)
        assert [o.position for o in answers.outcomes] == list(range(1, STEPS + 1))
    finally:
        await client.close()
        engine.stop()


async def test_calls_waiting_on_an_engine_that_goes_away_fail_at_once(tmp_path: Path) -> None:
    # A frontend whose engine closed the pipe (its process died) must not hold callers until
    # their deadlines: what waits fails UNAVAILABLE, and so does every later call.
    repository = load_repository(build_test_repository(tmp_path / "repo"))
    async with engine_over_pipe(repository, tmp_path) as (engine, server, client):
        never = asyncio.Event()

        async def stuck() -> None:
            await never.wait()

        engine.repository_index = stuck  # type: ignore[method-assign]
        waiting = asyncio.create_task(client.repository_index())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await server.close()
        with pytest.raises(RnnserveError) as failed:
            await asyncio.wait_for(waiting, 10)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RnnserveError) as later:
            await asyncio.wait_for(client.get_session("s", OWNER), 10)
        assert later.value.code == grpc.StatusCode.UNAVAILABLE
        sink = Collector()  # a step too is answered at once, not left waiting
        client.submit([(7, "s", {"x": np.zeros((1, 4), np.float32)}, None, None)], OWNER, sink)
        (outcome,) = sink.outcomes
        assert outcome.ticket == 7 and outcome.error is not None
        assert outcome.error.code == grpc.StatusCode.UNAVAILABLE
        never.set()


async def test_connecting_to_an_engine_that_goes_away_before_it_answers_fails(
    tmp_path: Path,
) -> None:
    # The engine's process dies between accepting a (re)started frontend and answering its
    # hello: connect() used to wait forever, and the frontend process, its parent gone too,
    # never exited. Here the connection is closed at once, as the kernel closes a dead
    # process's sockets.
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_unix_server(die, str(tmp_path / "engine.sock"))
    try:
        client = EngineClient(str(tmp_path / "engine.sock"))
        with pytest.raises(RnnserveError) as failed:
            await asyncio.wait_for(client.connect(), 10)
        assert failed.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.close()


async def test_cancels_that_cross_their_answers_on_the_pipe_leave_nothing_behind(
    tmp_path: Path,
) -> None:
    # A call that ends while its answers are already on their way sends a cancel for steps
    # the engine has answered: the engine used to keep those tickets for the pipe's life.
    repository = load_repository(build_test_repository(tmp_path / "repo"))
    async with engine_over_pipe(repository, tmp_path) as (engine, server, client):
        await client.open_session("tiny_rnn", "", "s", {}, 0, OWNER)
        transport = client._pipe._transport  # noqa: SLF001 (hold the answers in the socket)
        assert transport is not None
        for round_ in range(20):
            sink = CallerSink(lambda outcomes: None)
            transport.pause_reading()
            x = np.zeros((1, 4), np.float32)
            client.submit([(n, "s", {"x": x}, None, None) for n in range(4)], OWNER, sink)
            for _ in range(100):  # until the engine has run them
                if (await engine.get_session("s", OWNER)).position == 4 * (round_ + 1):
                    break
                await asyncio.sleep(0.01)
            sink.hang_up(client, True)  # the call ends: its steps are cancelled
            transport.resume_reading()
            await asyncio.sleep(0.01)
        (engine_side,) = server._sinks.values()  # noqa: SLF001
        assert engine_side.cancelled == set() and engine_side.unanswered == set()


@asynccontextmanager
async def _pipe_to(on_message: Callable[[Pipe, object], None], folder: Path) -> AsyncIterator[Pipe]:
    """A pipe connected to a listening one that hands every message to ``on_message``."""
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: Pipe(on_message), str(folder / "p.sock"))
    sender = Pipe(lambda *_: None)
    await loop.create_unix_connection(lambda: sender, str(folder / "p.sock"))
    try:
        yield sender
    finally:
        sender.close()
        server.close()


async def test_messages_of_any_size_arrive_whole_and_in_order(tmp_path: Path) -> None:
    # A read may end anywhere: inside a length, inside a message, or after several.
    received: list[object] = []
    arrived = asyncio.Event()
    sizes = [0, 1, 3, 4, 5, 100, 65_535, 65_536, 1 << 20, 7, 3 << 20, 0, 12]

    def on_message(_: Pipe, message: object) -> None:
        received.append(message)
        if len(received) == len(sizes):
            arrived.set()

    async with _pipe_to(on_message, tmp_path) as sender:
        sent = [("blob", i, bytes([i % 251]) * size) for i, size in enumerate(sizes)]
        for message in sent:
            sender.send(message)
        await asyncio.wait_for(arrived.wait(), 30)
        assert received == sent


async def test_a_message_whose_handling_fails_leaves_the_pipe_open(tmp_path: Path) -> None:
    received: list[object] = []
    arrived = asyncio.Event()

    def on_message(_: Pipe, message: object) -> None:
        if message == "bad":
            raise ValueError("this handler fails on this message")
        received.append(message)
        arrived.set()

    async with _pipe_to(on_message, tmp_path) as sender:
        sender.send("bad")
        sender.send("good")
        await asyncio.wait_for(arrived.wait(), 30)
        assert received == ["good"]
        assert sender.connected


def test_the_engine_socket_is_private_and_under_the_temporary_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = socket_path()
    assert path.parent.parent == tmp_path
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700  # only this user may connect


def test_the_engine_socket_leaves_a_temporary_folder_too_deep_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    path = socket_path()
    try:
        assert path.parent.parent == Path("/tmp")
        assert len(os.fsencode(path)) <= SOCKET_PATH_MAX
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert not list(deep.iterdir())  # the folder it tried first is not left behind
    finally:
        path.parent.rmdir()


def _steps_cross(steps: list) -> list:
    """Steps as the engine receives them from a frontend: packed, pickled, unpickled, unpacked."""
    return unpack_steps(loads(dumps(pack_steps(steps))))


def _same_steps(got: list, sent: list) -> None:
    assert len(got) == len(sent)
    for (ticket, sid, arrays, digest, expected), want in zip(got, sent, strict=True):
        assert (ticket, sid, digest, expected) == (want[0], want[1], want[3], want[4])
        if isinstance(want[2], RnnserveError):
            assert isinstance(arrays, RnnserveError)
            assert arrays.reason == want[2].reason
            continue
        assert list(arrays) == list(want[2])
        for name, array in arrays.items():
            assert array.dtype == want[2][name].dtype
            np.testing.assert_array_equal(array, want[2][name])


def _x(seed: int, shape: tuple[int, ...] = (1, 4), dtype: str = "<f4") -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def test_steps_alike_cross_the_pipe_unchanged_as_one_bytes_per_input() -> None:
    steps = [
        (n, f"s{n}", {"x": _x(n), "ids": np.arange(n, n + 3, dtype="<i8").reshape(3, 1)[:1]},
         None, None)
        for n in range(5)
    ]  # fmt: skip
    packed = pack_steps(steps)
    names, _dtypes, _shapes, blobs = packed[4]  # the usual message: one bytes per input
    assert names == ("x", "ids") and len(blobs) == 2
    assert packed[2] is None and packed[3] is None  # no digests, no expected positions
    _same_steps(_steps_cross(steps), steps)


def test_steps_that_differ_cross_the_pipe_unchanged() -> None:
    bad = RnnserveError(grpc.StatusCode.INVALID_ARGUMENT, "TENSOR_INVALID", "inputs: broken")
    steps = [
        (0, "a", {"x": _x(0)}, None, None),
        (1, "b", {"x": _x(1, (3, 4))}, b"digest", 7),  # another T, a retry key
        (2, "c", bad, None, None),  # failed to decode: answered in its turn by the engine
        (3, "d", {"x": _x(3, dtype="<f8")}, None, 0),
        (4, "a", {"x": _x(4), "y": _x(5)}, None, None),
    ]
    _same_steps(_steps_cross(steps), steps)


def test_one_step_crosses_the_pipe_unchanged() -> None:
    steps = [(9, "a", {"x": _x(9)}, b"d", 3)]
    _same_steps(_steps_cross(steps), steps)


async def test_calls_of_one_turn_share_a_message_and_each_gets_its_own_answers(
    tmp_path: Path,
) -> None:
    # A frontend sends every call's steps of one loop turn as one message (one entry per
    # owner); each call still gets exactly its own outcomes, in order, under its own ticket
    # numbers and session ids, errors included.
    repository = load_repository(build_test_repository(tmp_path / "repo"))
    async with engine_over_pipe(repository, tmp_path) as (_engine, _server, client):
        a = (await client.open_session("tiny_lstm", "", "", {}, 0, OWNER)).session_id
        b = (await client.open_session("tiny_lstm", "", "", {}, 0, OWNER)).session_id
        first, second = Collector(), Collector()
        x = np.ones((1, 4), np.float32)
        client.submit([(7, a, {"x": x}, None, None)], OWNER, first)
        client.submit([], OWNER, second)  # nothing to send: no entry, no answer
        client.submit(
            [
                (0, b, {"x": x}, None, None),
                (1, "no-such-session", {"x": x}, None, None),
                (2, b, {"x": x}, None, 5),
            ],  # fmt: skip
            OWNER,
            second,
        )
        mine = await first.wait_for(1)
        theirs = await second.wait_for(3)
        await asyncio.sleep(0.05)  # nothing else arrives
        assert [(o.ticket, o.session_id, o.position) for o in mine] == [(7, a, 1)]
        assert [(o.ticket, o.session_id) for o in theirs] == [
            (0, b),
            (1, "no-such-session"),
            (2, b),
        ]
        assert theirs[0].error is None and theirs[0].position == 1
        assert mine[0].outputs is not None and theirs[0].outputs is not None
        for name, batch in mine[0].outputs.items():  # same state, same input: same rows
            np.testing.assert_array_equal(
                batch[mine[0].row], theirs[0].outputs[name][theirs[0].row]
            )
        assert theirs[1].error is not None and theirs[1].error.code == grpc.StatusCode.NOT_FOUND
        assert theirs[2].error is not None
        assert theirs[2].error.code == grpc.StatusCode.FAILED_PRECONDITION  # expected 5, at 1


def _outcomes_cross(outcomes: list[Outcome]) -> tuple[PackedOutcomes, list[dict[str, np.ndarray]]]:
    """Outcomes packed, pickled and unpickled as on the pipe; with each one's own output rows
    read back as a frontend reads them (its batch's arrays at its row)."""
    packed: PackedOutcomes = loads(dumps(pack_outcomes(outcomes)))
    batches, _tickets, _positions, refs, rows, _models, _errors = packed
    arrays = [unpack_arrays(batch) for batch in batches]
    return packed, [
        {name: value[row] for name, value in arrays[ref].items()} if ref >= 0 else {}
        for ref, row in zip(refs, rows, strict=True)
    ]


def test_a_frontend_with_less_than_half_of_a_batch_gets_only_its_rows() -> None:
    # Frontends sharing batches: one with a small share is sent its own steps' rows, not the
    # whole batch, and reads exactly the rows it would have read in the whole batch.
    batch = {"y": _x(0, (6, 3)), "h": _x(1, (6, 2, 5))}
    other = {"y": _x(2, (2, 3))}  # a second batch in the same message, wholly this frontend's
    outcomes = [
        Outcome(10, "a", 1, batch, None, 4, "m:1"),
        Outcome(11, "b", error=RnnserveError(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", "")),
        Outcome(12, "c", 2, other, None, 1, "m:1"),
        Outcome(13, "d", 3, batch, None, 1, "m:1"),
        Outcome(14, "e", 4, other, None, 0, "m:1"),
    ]
    packed, rows = _outcomes_cross(outcomes)
    assert [len(b["y"][2]) for b in packed[0]] == [2 * 3 * 4, 2 * 3 * 4]  # 2 rows of each batch
    for outcome, got in zip(outcomes, rows, strict=True):
        want = outcome.outputs or {}
        assert list(got) == list(want)
        for name, value in got.items():
            np.testing.assert_array_equal(value, want[name][outcome.row])


@pytest.mark.parametrize("share", [(2, 0, 1, 3), (3, 0)], ids=["all of it", "half of it"])
def test_a_frontend_with_half_of_a_batch_or_more_gets_it_whole(share: tuple[int, ...]) -> None:
    batch = {"y": _x(0, (4, 2))}
    outcomes = [Outcome(n, f"s{n}", 1, batch, None, row, "m:1") for n, row in enumerate(share)]
    packed, rows = _outcomes_cross(outcomes)
    assert packed[0][0]["y"][2] == batch["y"].tobytes() and packed[4] == list(share)
    for outcome, got in zip(outcomes, rows, strict=True):
        np.testing.assert_array_equal(got["y"], batch["y"][outcome.row])


# -- read-your-writes of the catalogue across frontends ------------------------------------------
@asynccontextmanager
async def _frontends_on_one_engine(
    folder: Path, sync_s: float
) -> AsyncIterator[tuple[EngineClient, EngineClient]]:
    """Two frontends' clients of one engine whose catalogue calls wait up to ``sync_s``."""
    repository = load_repository(build_test_repository(folder / "repo"))
    engine = Engine(repository, Metrics())
    await engine.start()
    server = EngineServer(engine, str(folder / "engine.sock"), catalogue_sync_s=sync_s)
    await server.start()
    clients = (EngineClient(server.address), EngineClient(server.address))
    try:
        for client in clients:
            await client.connect()
        yield clients
    finally:
        for client in clients:
            await client.close()
        await server.close()
        await engine.stop()


def _unread(client: EngineClient) -> asyncio.Transport:
    """``client``'s pipe, left unread: what the engine sends it stays in the socket (as for
    a frontend busy with a backlog of outcomes) until reading resumes."""
    transport = client._pipe._transport  # noqa: SLF001
    assert transport is not None
    transport.pause_reading()
    return transport


async def _waits(call: asyncio.Task[object], client: EngineClient) -> bool:
    """Whether ``call`` (made through ``client``) is still unanswered once a call made after
    it through the same pipe is answered (the engine answers a call as soon as it ends)."""
    await client.repository_index()
    return not call.done()


async def test_a_catalogue_call_is_answered_once_every_frontend_has_the_change(
    tmp_path: Path,
) -> None:
    async with _frontends_on_one_engine(tmp_path, sync_s=3600) as (a, b):
        assert "2" in b.catalogue().models["tiny_lstm"]
        reading = _unread(b)
        retire = asyncio.create_task(a.retire_model("tiny_lstm", "2", OWNER))
        assert await _waits(retire, a)
        assert "2" in b.catalogue().models["tiny_lstm"]  # b has not read the change yet
        # Only catalogue calls wait: sessions and steps of any frontend go on meanwhile.
        sid = (await a.open_session("tiny_rnn", "", "", {}, 0, OWNER)).session_id
        answers = Collector()
        a.submit([(1, sid, {"x": np.zeros((1, 4), np.float32)}, None, None)], OWNER, answers)
        (outcome,) = await answers.wait_for(1)
        assert outcome.error is None
        reading.resume_reading()
        status = await retire
        assert status.state == "RETIRED"
        assert "2" not in b.catalogue().models["tiny_lstm"]


async def test_a_frontend_whose_pipe_closes_is_not_waited_for(tmp_path: Path) -> None:
    async with _frontends_on_one_engine(tmp_path, sync_s=3600) as (a, b):
        _unread(b)
        retire = asyncio.create_task(a.retire_model("tiny_lstm", "2", OWNER))
        assert await _waits(retire, a)
        await b.close()  # its process died: the call is answered at once, not at the bound
        assert (await retire).state == "RETIRED"
        assert "2" not in a.catalogue().models["tiny_lstm"]


async def test_a_frontend_that_never_takes_up_the_change_delays_the_call_by_the_bound_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with _frontends_on_one_engine(tmp_path, sync_s=0.2) as (a, b):
        reading = _unread(b)
        assert (await a.retire_model("tiny_lstm", "2", OWNER)).state == "RETIRED"
        assert "2" not in a.catalogue().models["tiny_lstm"]
        assert "2" in b.catalogue().models["tiny_lstm"]  # behind, and said so in the log
        assert "event=catalogue_sync_timeout method=retire_model" in caplog.text
        assert "frontends_behind=1" in caplog.text
        reading.resume_reading()
        await b.repository_index()  # answered after the catalogue, on the same pipe
        assert "2" not in b.catalogue().models["tiny_lstm"]
