"""Where parked and handed-off sessions wait: a shared key-value store (Redis).

A parked session is one key, ``<prefix><owner>/<session id>`` (the owner percent-encoded, so
``/`` and ``#`` never occur in it; session ids are namespaced by owner, so two identities'
sessions of one id are two keys): a hash holding its ``owner``, its
``model`` (``name/version``) and ``data``, the session encoded exactly as a snapshot file
encodes it (:func:`rnnserve.server.engine.snapshot.encode_sessions`). The key expires after the
model's idle timeout. Taking a session back is one atomic script (check the owner, read,
delete), so of two replicas asking at once exactly one gets it: a session is never served
by two replicas.

A session resident on a replica is *held* there: ``<prefix><owner>/<session id>#holder``
names the replica (a random id per process), set when the replica opens the session or
takes it from the store. A replica that gets a call for a session it neither holds nor finds
parked asks the holder, over the pub/sub channel ``<prefix>release:<replica id>``, to park it,
and takes it once it appears: so when a load balancer's ring moves sessions between replicas
(a replica rejoins after a rolling restart, or one is added) they follow instead of being
"not found". A holder asked for a session it no longer has drops its holder key, so the
asker stops waiting at once.

A replica about to hand its sessions off first marks each of them *moving*
(``<prefix><owner>/<session id>#moving``, short-lived; ``#`` never occurs in a session id) and
clears
each mark in the same transaction that writes the session. Another replica that misses a
session while its mark stands answers "retry shortly" instead of "no such session": the
state is on its way, not lost.

The store can be down while the server runs. Every failure becomes :class:`StoreUnavailable`
naming the store; after one, calls fail at once for ``retry_after_s`` (so a dead store costs
a step nothing and a background parker no time), and the outage is logged once when it
starts and once when it ends, never per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_PREFIX = "rnnserve:session:"

# KEYS[1]: the session's key; ARGV[1]: the caller's identity. Returns the data, or nil when
# the key is gone or belongs to another identity (which is then left where it is).
_TAKE = """
local found = redis.call('HMGET', KEYS[1], 'owner', 'data')
if not found[1] or found[1] ~= ARGV[1] then return false end
redis.call('DEL', KEYS[1])
return found[2]
"""


# KEYS[1]: a holder key; ARGV[1]: the replica dropping it. Deletes it only if it names that
# replica (another may have taken the session meanwhile).
_DROP_HOLDER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""


class StoreUnavailable(Exception):
    """The state store could not be reached; the message names it."""


@dataclass(frozen=True)
class ParkedEntry:
    """One session to write: its id, owner, model key, encoded state and time to live."""

    session_id: str
    owner: str
    model: str
    data: bytes
    ttl_s: float


@dataclass(frozen=True)
class ParkedInfo:
    """What can be read about a parked session without taking it."""

    owner: str
    model: str


class StateStore(Protocol):
    """The operations parking needs; :class:`RedisStateStore` is the implementation."""

    @property
    def name(self) -> str:
        """The store's address for messages (no password)."""
        ...

    @property
    def available(self) -> bool:
        """False while an outage is being waited out (calls would fail at once)."""
        ...

    async def put(self, entries: Sequence[ParkedEntry]) -> None: ...

    async def peek(self, session_id: str, owner: str) -> ParkedInfo | None: ...

    async def take(self, session_id: str, owner: str) -> bytes | None: ...

    async def exists(self, session_id: str, owner: str) -> bool: ...

    async def mark_moving(self, keys: Sequence[tuple[str, str]], ttl_s: float) -> None: ...

    async def is_moving(self, session_id: str, owner: str) -> bool: ...

    async def set_holder(self, session_id: str, owner: str, holder: str, ttl_s: float) -> None: ...

    async def holder(self, session_id: str, owner: str) -> str | None: ...

    async def drop_holder(self, session_id: str, owner: str, holder: str) -> None: ...

    async def holder_alive(self, holder: str) -> bool: ...

    async def request_release(self, holder: str, session_id: str, owner: str) -> bool: ...

    def releases(self, holder: str) -> AsyncIterator[tuple[str, str]]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def redact(url: str) -> str:
    """``url`` without its password, for logs and client messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urllib.parse.urlunsplit(parts._replace(netloc=user + host))


def check_url(url: str) -> str | None:
    """Why ``url`` is not a usable state store address, or None."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"{redact(url)!r}: the scheme must be redis://, rediss:// or unix://"
    if parts.scheme != "unix" and not parts.hostname:
        return f"{redact(url)!r}: no host"
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        return f"{redact(url)!r}: {exc}"
    return None


class RedisStateStore:
    """:class:`StateStore` on Redis (redis-py's asyncio client, one connection pool)."""

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        *,
        timeout_s: float = 2.0,
        retry_after_s: float = 1.0,
        on_error: Callable[[str], None] = lambda operation: None,
    ) -> None:
        self._name = redact(url)
        self._prefix = prefix
        self._retry_after_s = retry_after_s
        self._on_error = on_error
        self._down_since: float | None = None
        self._next_try = 0.0
        # No client-side retries: a failed call is reported at once and the caller decides.
        self._client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._take = self._client.register_script(_TAKE)
        self._drop_holder = self._client.register_script(_DROP_HOLDER)

    @property
    def name(self) -> str:
        return self._name

    @property
    def available(self) -> bool:
        return self._down_since is None or time.monotonic() >= self._next_try

    def key(self, session_id: str, owner: str) -> str:
        """The Redis key of ``owner``'s session ``session_id``."""
        return f"{self._prefix}{urllib.parse.quote(owner, safe='')}/{session_id}"

    def moving_key(self, session_id: str, owner: str) -> str:
        return self.key(session_id, owner) + "#moving"

    def holder_key(self, session_id: str, owner: str) -> str:
        return self.key(session_id, owner) + "#holder"

    def release_channel(self, holder: str) -> str:
        return f"{self._prefix}release:{holder}"

    async def put(self, entries: Sequence[ParkedEntry]) -> None:
        """Write every entry with its TTL in one round trip (MULTI/EXEC: all or none)."""
        if not entries:
            return

        async def run() -> None:
            async with self._client.pipeline(transaction=True) as pipe:
                for entry in entries:
                    key = self.key(entry.session_id, entry.owner)
                    pipe.delete(key)
                    pipe.hset(
                        key,
                        mapping={"owner": entry.owner, "model": entry.model, "data": entry.data},
                    )
                    pipe.pexpire(key, max(1, int(entry.ttl_s * 1000)))
                    pipe.delete(self.moving_key(entry.session_id, entry.owner))
                    # The holder record lives no longer than the parked session.
                    pipe.pexpire(
                        self.holder_key(entry.session_id, entry.owner),
                        max(1, int(entry.ttl_s * 1000)),
                    )
                await pipe.execute()

        await self._guard("put", run)

    async def peek(self, session_id: str, owner: str) -> ParkedInfo | None:
        async def run() -> ParkedInfo | None:
            found, model = await self._client.hmget(self.key(session_id, owner), ["owner", "model"])
            if found is None or model is None:
                return None
            return ParkedInfo(_text(found), _text(model))

        return await self._guard("peek", run)

    async def take(self, session_id: str, owner: str) -> bytes | None:
        """Remove and return the session's data if ``owner`` owns it, atomically."""

        async def run() -> bytes | None:
            data = await self._take(keys=[self.key(session_id, owner)], args=[owner])
            return bytes(data) if data else None

        return await self._guard("take", run)

    async def exists(self, session_id: str, owner: str) -> bool:
        async def run() -> bool:
            return bool(await self._client.exists(self.key(session_id, owner)))

        return await self._guard("exists", run)

    async def mark_moving(self, keys: Sequence[tuple[str, str]], ttl_s: float) -> None:
        """Say that these sessions, each (owner, id), are about to be written here (one round
        trip)."""
        if not keys:
            return

        async def run() -> None:
            async with self._client.pipeline(transaction=False) as pipe:
                for owner, session_id in keys:
                    pipe.set(self.moving_key(session_id, owner), b"1", px=max(1, int(ttl_s * 1000)))
                await pipe.execute()

        await self._guard("mark_moving", run)

    async def is_moving(self, session_id: str, owner: str) -> bool:
        async def run() -> bool:
            return bool(await self._client.exists(self.moving_key(session_id, owner)))

        return await self._guard("is_moving", run)

    async def set_holder(self, session_id: str, owner: str, holder: str, ttl_s: float) -> None:
        """Record that ``holder`` (a replica id) has the session resident."""

        async def run() -> None:
            key = self.holder_key(session_id, owner)
            await self._client.set(key, holder, px=max(1, int(ttl_s * 1000)))

        await self._guard("set_holder", run)

    async def holder(self, session_id: str, owner: str) -> str | None:
        """The replica recorded as holding the session, if any."""

        async def run() -> str | None:
            found = await self._client.get(self.holder_key(session_id, owner))
            return None if found is None else _text(found)

        return await self._guard("holder", run)

    async def drop_holder(self, session_id: str, owner: str, holder: str) -> None:
        """Forget that ``holder`` has the session, unless another replica has it by now."""

        async def run() -> None:
            await self._drop_holder(keys=[self.holder_key(session_id, owner)], args=[holder])

        await self._guard("drop_holder", run)

    async def holder_alive(self, holder: str) -> bool:
        """Whether the replica ``holder`` is running (it listens on its release channel)."""

        async def run() -> bool:
            found = await self._client.pubsub_numsub(self.release_channel(holder))
            return bool(found and found[0][1])

        return await self._guard("holder_alive", run)

    async def request_release(self, holder: str, session_id: str, owner: str) -> bool:
        """Ask ``holder`` to park the session; False when no replica of that id listens (it
        is gone, and the session with it)."""

        async def run() -> bool:
            payload = json.dumps([owner, session_id])
            return bool(await self._client.publish(self.release_channel(holder), payload))

        return await self._guard("request_release", run)

    async def releases(self, holder: str) -> AsyncIterator[tuple[str, str]]:
        """The (owner, session id) of every release asked of ``holder``, as they come.

        Ends with :class:`StoreUnavailable` when the subscription breaks; the caller
        subscribes again. Not guarded: one long-lived connection of its own, not a call."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.release_channel(holder))
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                try:
                    owner, session_id = json.loads(_text(message["data"]))
                except (ValueError, TypeError):
                    logger.warning("event=release_malformed data=%r", message["data"][:200])
                    continue
                yield str(owner), str(session_id)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(f"state store {self._name}: release channel: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):  # closing a connection already broken
                await asyncio.shield(pubsub.aclose())

    async def ping(self) -> None:
        async def run() -> None:
            await self._client.ping()

        await self._guard("ping", run)

    async def close(self) -> None:
        await self._client.aclose()

    async def _guard(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call``; turn any store failure into :class:`StoreUnavailable`, once logged."""
        if not self.available:
            self._on_error(operation)
            raise StoreUnavailable(f"state store {self._name} is unreachable")
        try:
            result = await call()
        except ResponseError as exc:
            # Redis answered: the store is up, this one call was refused (a key of another
            # type, a script error). Failing it alone keeps one caller from making the store
            # look down for everyone.
            logger.warning("event=state_store_refused operation=%s error=%r", operation, str(exc))
            raise StoreUnavailable(f"state store {self._name} refused {operation}: {exc}") from exc
        except (RedisError, OSError) as exc:
            self._on_error(operation)
            now = time.monotonic()
            if self._down_since is None:
                self._down_since = now
                logger.error(
                    "event=state_store_down store=%s operation=%s error=%r; resident sessions "
                    "are still served, parking is skipped, parked sessions answer UNAVAILABLE",
                    self._name,
                    operation,
                    str(exc),
                )
            self._next_try = now + self._retry_after_s
            raise StoreUnavailable(f"state store {self._name} is unreachable: {exc}") from exc
        if self._down_since is not None:
            logger.warning(
                "event=state_store_up store=%s down_s=%.1f",
                self._name,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        return result


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
