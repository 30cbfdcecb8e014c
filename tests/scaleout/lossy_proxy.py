"""A TCP proxy in front of a real redis-server that loses replies, for the lost-reply tests.

Armed with :meth:`LossyProxy.lose_reply`, it lets the next request that matches go through
to Redis, which runs it, and drops Redis' answer: the client waits until its socket timeout,
exactly as when a reply is lost on the network after the command ran. Armed with
``lose_reply(..., request_too=True)`` it drops the request itself: the client sees the same
timeout, and Redis never ran it. :meth:`hold_request` drops a request the same way but keeps
it, and :meth:`deliver` sends it to Redis later, on a connection of its own: a request held
up on the network (a reconnecting client's buffer, a slow path) that lands after the
requests the client made once it gave up on it. :meth:`cut` closes every connection and
refuses new ones (the replica behind it is cut off from Redis while others still reach it)
until :meth:`heal`.

It runs on the test's event loop. Requests are matched on the bytes a client sent since
Redis last answered it (a redis-py connection sends one request, or one pipeline, and waits
for its answer before the next).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from deploy.tools import free_port


class _Link:
    """One client connection and its connection to Redis."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.request = b""  # sent by the client since Redis last answered
        #: Set once a request matched: Redis' answers on this link are dropped from then on
        #: (whether to drop its requests too, to cut everyone off then, and the event to set).
        self.losing: tuple[bool, bool, asyncio.Event] | None = None
        #: Where the requests dropped on this link are kept (:meth:`LossyProxy.hold_request`).
        self.held: list[bytes] | None = None

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            writer.close()


class LossyProxy:
    """A loopback proxy to ``host:port`` that can lose one reply and cut everyone off."""

    def __init__(self, host: str, port: int) -> None:
        self._target = (host, port)
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._armed: tuple[Callable[[bytes], bool], bool, bool, asyncio.Event] | None = None
        #: Where the request dropped while armed by :meth:`hold_request` goes, if so armed.
        self._holding: list[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> LossyProxy:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        return self

    def lose_reply(
        self, matches: Callable[[bytes], bool], *, request_too: bool = False, then_cut: bool = False
    ) -> asyncio.Event:
        """Drop Redis' answer to the next request for which ``matches(request bytes)`` (with
        ``request_too``, the request itself: Redis never gets it); with ``then_cut``, cut
        everyone off once it is dropped. The event is set then."""
        lost = asyncio.Event()
        self._armed = (matches, request_too, then_cut, lost)
        self._holding = None
        return lost

    def hold_request(self, matches: Callable[[bytes], bool]) -> tuple[asyncio.Event, list[bytes]]:
        """Drop the next request for which ``matches(request bytes)`` before Redis gets it,
        and keep it: the event is set then, and the list holds the request (for
        :meth:`deliver`)."""
        lost = self.lose_reply(matches, request_too=True)
        self._holding = []
        return lost, self._holding

    async def deliver(self, request: bytes) -> bytes:
        """Send a request held by :meth:`hold_request` to Redis now, on a new connection;
        Redis' answer."""
        reader, writer = await asyncio.open_connection(*self._target)
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read(65536)
        finally:
            writer.close()

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.close()
        self._links.clear()

    async def heal(self) -> None:
        """Take connections again (on the same port)."""
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        link = _Link(writer, up_writer)
        self._links.add(link)
        for pump in (self._requests(reader, link), self._answers(up_reader, link)):
            task = asyncio.get_running_loop().create_task(pump)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _requests(self, reader: asyncio.StreamReader, link: _Link) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                link.request += chunk
                if self._armed is not None and self._armed[0](link.request):
                    link.losing = self._armed[1:]
                    self._armed = None
                    request_too, then_cut, lost = link.losing
                    if request_too:
                        if self._holding is not None:
                            link.held, self._holding = self._holding, None
                            link.held.append(link.request)
                        lost.set()
                        if then_cut:
                            self.cut()
                        continue
                if link.losing is not None and link.losing[0]:
                    if link.held is not None:  # the rest of a request held
                        link.held[-1] += chunk
                    continue
                link.upstream.write(chunk)
                await link.upstream.drain()
        link.close()
        self._links.discard(link)

    async def _answers(self, reader: asyncio.StreamReader, link: _Link) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                link.request = b""
                if link.losing is not None:
                    _, then_cut, lost = link.losing
                    if not lost.is_set():
                        lost.set()
                        if then_cut:
                            self.cut()
                    continue
                link.client.write(chunk)
                await link.client.drain()
        link.close()
        self._links.discard(link)
