"""Where parked and handed-off sessions wait: a shared key-value store (Redis).

A parked session is one key, ``<prefix><owner>/<session id>`` (the owner percent-encoded, so
``/`` and ``#`` never occur in it; session ids are namespaced by owner, so two identities'
sessions of one id are two keys): a hash holding its ``owner``, its
``model`` (``name/version``) and ``data``, the session encoded exactly as a snapshot file
encodes it (:func:`rnnserve.server.engine.snapshot.encode_sessions`), plus (format 2) the
``token`` of the park that wrote it and ``format`` itself. The key expires after the model's
idle timeout.

Parks and takes stay safe when Redis runs a command and its reply is lost (a timeout, a
connection cut): the replica cannot tell "done" from "not done" by the error, so each park
and each take carries a token, and the replica asks afterwards what it did.

- A park writes, in one script, the record and a *receipt* ``<key>#parked:<token>`` that
  outlives the record. A replica that lost the reply settles the park
  (:meth:`~RedisStateStore.settle_parks`): a receipt says it was written (the session is in
  the store, or was taken from it since); none says it was not, and the settle leaves a void
  receipt in its place, so that the write, were it still on its way, never lands.
- A take moves the record, in one script, to ``<key>#taken`` stamped with the take's token
  and time (Redis' clock), and names the taker as the session's holder. Asked again with the
  same token (its reply was lost), it returns what it moved. The taker restores the session,
  confirms its take (:meth:`~RedisStateStore.confirm_take`) before serving it, then deletes
  ``#taken`` (:meth:`~RedisStateStore.finish_take`, which voids the token); or it moves it
  back (:meth:`~RedisStateStore.give_back`, which voids the token so that the take, were it
  still on its way, takes nothing). Of two replicas asking at once exactly one gets it: a
  session is never served by two replicas, and one on its way (``#taken``) is "moving",
  never "not found". A take not confirmed within :data:`TAKE_LEASE_S` may be given back by
  any replica (:meth:`~RedisStateStore.peek_taken` says how old it is): its taker is gone or
  cut off, and its confirmation, were it to come, fails.

Records of format 1 (no ``format`` field: written before tokens) are read and taken as
before; a record of a format this code does not know (:data:`READS`) is left in place for a
server that does.

A session resident on a replica is *held* there: ``<prefix><owner>/<session id>#holder``
names the replica (a random id per process), set when the replica opens the session or
takes it from the store. A client-chosen id is *claimed* before it is opened
(:meth:`~RedisStateStore.claim`): in one script, refused while the session is parked, taken,
marked moving, or held by another replica that is running (one that listens on its release
channel), else held by the claimer. Of two replicas opening one id at once exactly one gets
it. Each claim carries a token, written beside the holder record (``#claim``) until the
session is parked or closed. A claim the replica cannot stand by (its reply lost, or the open
failed after it) is taken back by token (:meth:`~RedisStateStore.unclaim`): the holder record
is deleted only if that claim wrote it, and the token is voided (``#void:<token>``), so that
the claim, were it still on its way, claims nothing when it lands. A replica's next claim of
the id takes back its earlier ones still in doubt in the same step.

A replica that gets a call for a session it neither holds nor finds parked asks the holder,
over the pub/sub channel ``<prefix>release:<replica id>``, to park it, and takes it once it
appears: so when a load balancer's ring moves sessions between replicas (a replica rejoins
after a rolling restart, or one is added) they follow instead of being "not found". A holder
asked for a session it no longer has drops its holder key, so the asker stops waiting at
once.

A replica about to hand its sessions off first marks each of them *moving*
(``<prefix><owner>/<session id>#moving``, short-lived; ``#`` never occurs in a session id) and
clears
each mark in the same transaction that writes the session. Another replica that misses a
session while its mark stands answers "retry shortly" instead of "no such session": the
state is on its way, not lost.

The store can be down while the server runs. Every failure becomes :class:`StoreUnavailable`
naming the store, and saying whether the call surely never reached it; after one, calls
fail at once for ``retry_after_s`` (so a dead store costs a step nothing and a background
parker no time), except the follow-ups that learn what a call whose reply was lost did. The
outage is logged once when it starts and once when it ends, never per call.
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_PREFIX = "rnnserve:session:"

#: The format of the records this code writes; :data:`READS` are those it reads (1: written
#: before parks and takes had tokens, no ``format`` field).
FORMAT = 2
READS = frozenset({1, 2})
#: Connections to Redis at most; a call past them waits for one (up to the call timeout).
_MAX_CONNECTIONS = 100
#: What settling a park found (:meth:`RedisStateStore.settle_parks`): not written (and now
#: never will be), written, or not written while another replica holds the session's id (it
#: was opened there while the parker could not be reached: the parker's copy must go).
NOT_WRITTEN, WRITTEN, SUPERSEDED = 0, 1, 2
#: How long a holder record stands. Refreshed whenever the session moves; a session resident
#: on one replica for longer than this without moving can no longer be called back.
HOLDER_TTL_S = 86_400.0
#: How much longer than its record a park's receipt (or void receipt) lives: for that long a
#: replica that lost the park's reply can learn whether it was written.
_RECEIPT_MARGIN_S = 60.0
#: A taken record (``#taken``) lives at least this long, and a given-up take's token stays
#: void this long: room for the taker to ask again, and for a take still on its way to land.
_TAKEN_MIN_S = 60.0
#: How long a take holds what it moved aside (``#taken``) for its taker alone. A taker serves
#: the session only once it has confirmed its take (:meth:`RedisStateStore.confirm_take`);
#: a take not confirmed within its lease (its taker died, drained or was cut off from the
#: store) may be given back by another replica, which then takes the session
#: (:meth:`RedisStateStore.peek_taken`): the taker's confirmation then fails, and it never
#: served the session.
TAKE_LEASE_S = 15.0
#: How long a claim taken back stays void (:meth:`RedisStateStore.unclaim`): a claim still on
#: its way that lands within this time claims nothing. A request written before its
#: connection was given up on can still reach Redis while TCP retransmits it (past a
#: network partition that also held the take-back up): minutes, not the take's seconds. Void
#: records are written only for claims whose reply was lost, or whose open failed: few.
CLAIM_VOID_S = 600.0

# KEYS: per entry, its key, its receipt, and its #moving, #holder, #taken and #claim keys.
# ARGV: per entry, owner, model, data, token, ttl (ms), receipt ttl (ms). Writes each entry
# whose receipt is not there (a settle that came first voided it: that park never lands);
# returns 1 for each entry written, 0 for each not. A session parked was opened: the claim
# that preceded its open stands for good, and its token (#claim) goes.
_PUT = """
local written = {}
for i = 0, #KEYS / 6 - 1 do
  local k, a = i * 6, i * 6
  if redis.call('EXISTS', KEYS[k + 2]) == 1 then
    written[i + 1] = 0
  else
    redis.call('DEL', KEYS[k + 1], KEYS[k + 5])
    redis.call('HSET', KEYS[k + 1], 'owner', ARGV[a + 1], 'model', ARGV[a + 2],
      'data', ARGV[a + 3], 'token', ARGV[a + 4], 'format', '@FORMAT@')
    redis.call('PEXPIRE', KEYS[k + 1], ARGV[a + 5])
    redis.call('SET', KEYS[k + 2], '1', 'PX', ARGV[a + 6])
    redis.call('DEL', KEYS[k + 3], KEYS[k + 6])
    -- The holder record lives no longer than the parked session.
    redis.call('PEXPIRE', KEYS[k + 4], ARGV[a + 5])
    written[i + 1] = 1
  end
end
return written
""".replace("@FORMAT@", str(FORMAT))

# KEYS: per park, its receipt and the session's #holder key; ARGV: per park, its receipt's
# ttl (ms) and the parker (a replica id, or ''). For each, 1 if it was written, else 0, or 2
# if, not written, the session's holder record names a replica other than the parker (the id
# was opened there while the parker could not be reached); a park not written is then void
# (its receipt written as such): it can no longer be written.
_SETTLE = """
local landed = {}
for i = 1, #KEYS / 2 do
  local receipt, holder, parker = KEYS[2 * i - 1], KEYS[2 * i], ARGV[2 * i]
  if redis.call('SET', receipt, 'void', 'NX', 'PX', ARGV[2 * i - 1]) then
    landed[i] = 0
  elseif redis.call('GET', receipt) == '1' then
    landed[i] = 1
  else
    landed[i] = 0
  end
  if landed[i] == 0 and parker ~= '' then
    local held = redis.call('GET', holder)
    if held and held ~= parker then landed[i] = 2 end
  end
end
return landed
"""

# KEYS: the session's key, its #taken key, its #holder key, this take's #void:<token> key,
# its #claim key. ARGV: owner, take token, taker (replica id), holder ttl (ms), least ttl of
# the taken record (ms), '1' if this take may have run before, void ttl (ms), the newest
# format the taker reads. Returns the data, or nil when there is none for this caller (gone,
# another identity's, of a newer or unreadable format, or the token given up). A record
# without expiry (written by hand) gets the least ttl when taken. The holder record is the
# take's from then on: a claim token left (#claim) goes, so that a take-back of that claim
# arriving late never drops the record of the session taken.
_TAKE = """
if redis.call('HGET', KEYS[2], 'take') == ARGV[2] then
  return redis.call('HGET', KEYS[2], 'data')
end
if redis.call('EXISTS', KEYS[4]) == 1 then return false end
local found = redis.call('HMGET', KEYS[1], 'owner', 'data', 'format')
if not found[1] or found[1] ~= ARGV[1] then
  if ARGV[6] == '1' then redis.call('SET', KEYS[4], '1', 'PX', ARGV[7]) end
  return false
end
if found[3] and not (string.match(found[3], '^%d+$') and tonumber(found[3]) <= tonumber(ARGV[8]))
then
  return false
end
redis.call('RENAME', KEYS[1], KEYS[2])
local now = redis.call('TIME')
redis.call('HSET', KEYS[2], 'take', ARGV[2], 'taker', ARGV[3],
  'taken_at', now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000)))
local ttl = redis.call('PTTL', KEYS[2])
if ttl < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[2], ARGV[5]) end
redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4])
redis.call('DEL', KEYS[5])
return found[2]
"""

# KEYS: a #taken key; ARGV: a take token. Confirms that take (its taker is about to serve the
# session): no other replica may take it over from then on. Returns 1 if the take still
# holds what it moved aside (confirmed now or before), 0 if not (given back, taken over).
_CONFIRM_TAKE = """
if redis.call('HGET', KEYS[1], 'take') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'confirmed', '1')
return 1
"""

# KEYS: a #taken key. Its owner, model, format ('' if none), take token, how long ago it was
# taken (ms, by Redis' clock; -1 if it does not say) and whether it is confirmed ('1'/'0');
# nil if there is no such record.
_PEEK_TAKEN = """
local t = redis.call('HMGET', KEYS[1], 'owner', 'model', 'format', 'take', 'taken_at',
  'confirmed')
if not t[1] or not t[4] then return false end
local held = -1
local at = t[5] and tonumber(t[5])
if at then
  local now = redis.call('TIME')
  held = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - at
end
return {t[1], t[2] or '', t[3] or '', t[4], tostring(held), t[6] and '1' or '0'}
"""

# KEYS: a #taken key, the session's #holder key, the take's #void:<token> key; ARGV: a take
# token, the taker, '1' if the session was dropped (not restored), void ttl (ms). Deletes
# #taken if that take made it and voids the token ('done'), so that the take's first request,
# were it still on its way, takes nothing from a later park; a dropped session also drops the
# holder record naming the taker. Returns 1 if the take is finished (now, or by an earlier
# finish whose reply was lost), 0 if it no longer holds what it took (given back).
_FINISH_TAKE = """
local done = 0
if redis.call('HGET', KEYS[1], 'take') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[3], 'done', 'PX', ARGV[4])
  done = 1
elseif redis.call('GET', KEYS[3]) == 'done' then
  done = 1
else
  redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[4])
end
if ARGV[3] == '1' and redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('DEL', KEYS[2])
end
return done
"""

# KEYS: the session's key, its #taken key, the take's #void:<token> key, its #holder key;
# ARGV: the take token, void ttl (ms). Voids the token, then parks again what that take
# moved aside, unless a record is parked meanwhile (that one stands) or the holder record
# names a replica other than the taker (one that did not see #taken opened the id again and
# holds it: a copy parked beside it would live twice). The taker never held the session: a
# holder record naming it lives no longer than the parked record, as a parker's does.
# Returns 1 if a record was put back.
_GIVE_BACK = """
redis.call('SET', KEYS[3], '1', 'NX', 'PX', ARGV[2])
if redis.call('HGET', KEYS[2], 'take') ~= ARGV[1] then return 0 end
local taker = redis.call('HGET', KEYS[2], 'taker')
local holder = redis.call('GET', KEYS[4])
local back = 0
if redis.call('EXISTS', KEYS[1]) == 1 or (holder and holder ~= taker) then
  redis.call('DEL', KEYS[2])
else
  redis.call('HDEL', KEYS[2], 'take', 'taker', 'taken_at', 'confirmed')
  redis.call('RENAME', KEYS[2], KEYS[1])
  back = 1
end
if taker and holder == taker then
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) else redis.call('DEL', KEYS[4]) end
end
return back
"""


# Lua: take back the claim ``token`` of ``claimer`` (a replica id): void the token for ``ttl``
# ms (#void:<token>), so that the claim, were it still on its way, claims nothing when it
# lands; with ``drop``, also delete the holder record if that claim wrote it (#claim holds its
# token) and it still names the claimer. Any other record (a later claim's, a take's, another
# replica's) stands.
_TAKE_BACK_CLAIM = """
local function take_back(holder, claim, void, token, claimer, ttl, drop)
  redis.call('SET', void, 'cancelled', 'PX', ttl)
  if drop and redis.call('GET', claim) == token and redis.call('GET', holder) == claimer then
    redis.call('DEL', holder, claim)
  end
end
"""

# KEYS: the session's key, its #taken, #moving, #holder and #claim keys, this claim's
# #void:<token> key, then the #void:<token> key of each earlier claim to take back. ARGV: the
# claimer (a replica id), the holder ttl (ms), the prefix of release channels, this claim's
# token, the void ttl (ms), then the earlier claims' tokens. Claims a client-chosen id for the
# claimer: 0 (taken) if this claim was taken back before it arrived (it was held up on the
# way, and its claimer answered for it long ago), or if the session is parked, on its way out
# of the store, marked moving, or held by another replica that listens on its release channel
# (running); else the claimer is its holder from now on and #claim holds the token, 1. The
# claimer's earlier claims of the id still in doubt are taken back first, in this same step
# (the claimer has nothing of the id now: a record one of them wrote is stale). A holder that
# listens no more is gone, and its sessions with it: its record is replaced in this same step,
# so two replicas replacing it at once cannot both. Liveness is what
# :meth:`RedisStateStore.holder_alive` asks, PUBSUB NUMSUB (allowed before a write in a script
# since Redis 5, which replicates a script's effects, not the script).
_CLAIM = (
    _TAKE_BACK_CLAIM
    + """
if redis.call('EXISTS', KEYS[6]) == 1 then return 0 end
for i = 7, #KEYS do
  take_back(KEYS[4], KEYS[5], KEYS[i], ARGV[i - 1], ARGV[1], ARGV[5], true)
end
if redis.call('EXISTS', KEYS[1], KEYS[2], KEYS[3]) > 0 then return 0 end
local held = redis.call('GET', KEYS[4])
if held and held ~= ARGV[1] then
  local listening = redis.call('PUBSUB', 'NUMSUB', ARGV[3] .. held)
  if tonumber(listening[2]) > 0 then return 0 end
end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
redis.call('SET', KEYS[5], ARGV[4], 'PX', ARGV[2])
return 1
"""
)

# KEYS: the session's #holder and #claim keys, then the #void:<token> key of each claim to
# take back; ARGV: the claimer, '1' to drop the holder record one of them wrote ('0': the
# session is on the claimer by now, and its record stands whatever wrote it), the void ttl
# (ms), then the claims' tokens.
_UNCLAIM = (
    _TAKE_BACK_CLAIM
    + """
for i = 3, #KEYS do
  take_back(KEYS[1], KEYS[2], KEYS[i], ARGV[i + 1], ARGV[1], ARGV[3], ARGV[2] == '1')
end
return 0
"""
)

# KEYS: a holder key and the session's #claim key; ARGV[1]: the replica dropping it. Deletes
# both only if the holder record names that replica (another may have taken the session
# meanwhile).
_DROP_HOLDER = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1], KEYS[2]) end
return 0
"""


class StoreUnavailable(Exception):
    """The state store could not be reached; the message names it.

    ``unsent``: the call surely never reached the store (it failed connecting, or was not
    made during the pause after a failure). Otherwise the store may have run it, and only
    its reply be lost."""

    def __init__(self, message: str, *, unsent: bool = False) -> None:
        super().__init__(message)
        self.unsent = unsent


@dataclass(frozen=True)
class ParkedEntry:
    """One session to write: its id, owner, model key, encoded state, time to live and the
    park's token (new for every park)."""

    session_id: str
    owner: str
    model: str
    data: bytes
    ttl_s: float
    token: str


@dataclass(frozen=True)
class ParkedInfo:
    """What can be read about a parked session without taking it; ``format`` is its
    record's (:data:`READS`; 0 when unreadable)."""

    owner: str
    model: str
    format: int = FORMAT


@dataclass(frozen=True)
class TakenInfo:
    """A session on its way out of the store (``#taken``): what was taken (``info``), the
    take's token, how long ago it was taken (-1.0 when the record does not say: written by a
    server before take leases) and whether its taker confirmed it."""

    info: ParkedInfo
    token: str
    held_s: float
    confirmed: bool


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

    async def put(self, entries: Sequence[ParkedEntry]) -> list[bool]: ...

    async def settle_parks(
        self, entries: Sequence[ParkedEntry], parkers: Sequence[str] | None = None
    ) -> list[int]: ...

    async def drop_receipts(self, entries: Sequence[ParkedEntry]) -> None: ...

    async def peek(self, session_id: str, owner: str) -> ParkedInfo | None: ...

    async def take(
        self, session_id: str, owner: str, token: str, taker: str, *, again: bool = False
    ) -> bytes | None: ...

    async def confirm_take(self, session_id: str, owner: str, token: str) -> bool: ...

    async def peek_taken(self, session_id: str, owner: str) -> TakenInfo | None: ...

    async def finish_take(
        self, session_id: str, owner: str, token: str, dropped_by: str | None = None
    ) -> None: ...

    async def give_back(self, session_id: str, owner: str, token: str) -> bool: ...

    async def exists(self, session_id: str, owner: str) -> bool: ...

    async def mark_moving(self, keys: Sequence[tuple[str, str]], ttl_s: float) -> None: ...

    async def unmark_moving(self, session_id: str, owner: str) -> None: ...

    async def is_moving(self, session_id: str, owner: str) -> bool: ...

    async def claim(
        self,
        session_id: str,
        owner: str,
        holder: str,
        ttl_s: float,
        token: str,
        earlier: Sequence[str] = (),
    ) -> bool: ...

    async def unclaim(
        self,
        session_id: str,
        owner: str,
        holder: str,
        tokens: Sequence[str],
        *,
        drop: bool = True,
        follow_up: bool = False,
    ) -> None: ...

    async def set_holder(self, session_id: str, owner: str, holder: str, ttl_s: float) -> None: ...

    async def holder(self, session_id: str, owner: str) -> str | None: ...

    async def holders(self, keys: Sequence[tuple[str, str]]) -> list[str | None]: ...

    async def drop_holder(self, session_id: str, owner: str, holder: str) -> None: ...

    async def holder_alive(self, holder: str) -> bool: ...

    async def request_release(self, holder: str, session_id: str, owner: str) -> bool: ...

    def releases(
        self, holder: str, subscribed: Callable[[], None] | None = None
    ) -> AsyncIterator[tuple[str, str]]: ...

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
        # A pool that waits for a free connection (up to timeout_s): redis-py's default one
        # refuses the command past its size ("Too many connections"), which a burst of calls
        # for parked sessions reaches with Redis itself fine, and which would read as an outage.
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=_MAX_CONNECTIONS,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = aioredis.Redis.from_pool(pool)  # closed with the client
        self._put = self._client.register_script(_PUT)
        self._settle = self._client.register_script(_SETTLE)
        self._take = self._client.register_script(_TAKE)
        self._confirm_take = self._client.register_script(_CONFIRM_TAKE)
        self._peek_taken = self._client.register_script(_PEEK_TAKEN)
        self._finish_take = self._client.register_script(_FINISH_TAKE)
        self._give_back = self._client.register_script(_GIVE_BACK)
        self._drop_holder = self._client.register_script(_DROP_HOLDER)
        self._claim = self._client.register_script(_CLAIM)
        self._unclaim = self._client.register_script(_UNCLAIM)

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

    def taken_key(self, session_id: str, owner: str) -> str:
        return self.key(session_id, owner) + "#taken"

    def claim_key(self, session_id: str, owner: str) -> str:
        return self.key(session_id, owner) + "#claim"

    def receipt_key(self, entry: ParkedEntry) -> str:
        return f"{self.key(entry.session_id, entry.owner)}#parked:{entry.token}"

    def void_key(self, session_id: str, owner: str, token: str) -> str:
        return f"{self.key(session_id, owner)}#void:{token}"

    def release_channel(self, holder: str) -> str:
        return f"{self._prefix}release:{holder}"

    async def put(self, entries: Sequence[ParkedEntry]) -> list[bool]:
        """Write every entry with its TTL and its receipt in one round trip (one script: all
        or none); for each, whether it was written (False only for a park settled as not
        written before this write arrived, see :meth:`settle_parks`)."""
        if not entries:
            return []

        async def run() -> list[bool]:
            keys: list[str] = []
            args: list[str | bytes | int] = []
            for entry in entries:
                key = self.key(entry.session_id, entry.owner)
                ttl = _ms(entry.ttl_s)
                keys += [key, self.receipt_key(entry), key + "#moving", key + "#holder"]
                keys += [key + "#taken", key + "#claim"]
                args += [entry.owner, entry.model, entry.data, entry.token, ttl]
                args.append(ttl + _ms(_RECEIPT_MARGIN_S))
            written = await self._put(keys=keys, args=args)
            return [bool(flag) for flag in written]

        return await self._guard("put", run)

    async def settle_parks(
        self, entries: Sequence[ParkedEntry], parkers: Sequence[str] | None = None
    ) -> list[int]:
        """For parks whose reply was lost: whether each was written (:data:`WRITTEN`) or not
        (:data:`NOT_WRITTEN`); one that was not never will be (its receipt is now void).
        ``parkers``: the replica that made each park; a park not written whose session's
        holder record names another replica is :data:`SUPERSEDED`. Made even during the
        pause after a failure: it is the follow-up of one."""
        if not entries:
            return []
        named = list(parkers) if parkers is not None else [""] * len(entries)

        async def run() -> list[int]:
            keys: list[str] = []
            args: list[int | str] = []
            for entry, parker in zip(entries, named, strict=True):
                keys += [self.receipt_key(entry), self.holder_key(entry.session_id, entry.owner)]
                args += [_ms(entry.ttl_s + _RECEIPT_MARGIN_S), parker]
            landed = await self._settle(keys=keys, args=args)
            return [int(flag) for flag in landed]

        return await self._guard("settle_parks", run, follow_up=True)

    async def drop_receipts(self, entries: Sequence[ParkedEntry]) -> None:
        """Forget the receipts of parks whose outcome their parker knows."""
        if not entries:
            return

        async def run() -> None:
            await self._client.delete(*(self.receipt_key(entry) for entry in entries))

        await self._guard("drop_receipts", run)

    async def peek(self, session_id: str, owner: str) -> ParkedInfo | None:
        async def run() -> ParkedInfo | None:
            found, model, written = await self._client.hmget(
                self.key(session_id, owner), ["owner", "model", "format"]
            )
            if found is None or model is None:
                return None
            version = "1" if written is None else _text(written)
            return ParkedInfo(_text(found), _text(model), int(version) if version.isdigit() else 0)

        return await self._guard("peek", run)

    async def take(
        self, session_id: str, owner: str, token: str, taker: str, *, again: bool = False
    ) -> bytes | None:
        """Move the session's record aside for ``taker`` (a replica id, its holder from now
        on) if ``owner`` owns it, atomically, and return its data; None if there is none for
        them. The taker then calls :meth:`finish_take` (restored) or :meth:`give_back`.

        ``token`` names this take. ``again``: this take may have run already, its reply lost:
        what it moved aside is returned again; if there is nothing, the token is voided (the
        take, were it still on its way, takes nothing). Such a take is made even during the
        pause after a failure."""

        async def run() -> bytes | None:
            data = await self._take(
                keys=[
                    self.key(session_id, owner),
                    self.taken_key(session_id, owner),
                    self.holder_key(session_id, owner),
                    self.void_key(session_id, owner, token),
                    self.claim_key(session_id, owner),
                ],
                args=[
                    owner,
                    token,
                    taker,
                    _ms(HOLDER_TTL_S),
                    _ms(_TAKEN_MIN_S),
                    "1" if again else "0",
                    _ms(_TAKEN_MIN_S),
                    max(READS),
                ],
            )
            return bytes(data) if data else None

        return await self._guard("take", run, follow_up=again)

    async def confirm_take(self, session_id: str, owner: str, token: str) -> bool:
        """Confirm the take ``token`` before serving what it took: True if it still holds it
        (no other replica can take it over from now on), False if it was given back or taken
        over (the taker must not serve it). Safe to ask again; made even during the pause
        after a failure (it follows the take)."""

        async def run() -> bool:
            confirmed = await self._confirm_take(
                keys=[self.taken_key(session_id, owner)], args=[token]
            )
            return bool(confirmed)

        return await self._guard("confirm_take", run, follow_up=True)

    async def peek_taken(self, session_id: str, owner: str) -> TakenInfo | None:
        """What is on its way out of the store for ``owner``'s session, if anything."""

        async def run() -> TakenInfo | None:
            found = await self._peek_taken(keys=[self.taken_key(session_id, owner)])
            if not found:
                return None
            owner_, model, written, token, held, confirmed = (_text(v) for v in found)
            version = "1" if not written else written
            info = ParkedInfo(owner_, model, int(version) if version.isdigit() else 0)
            held_ms = int(held) if held.lstrip("-").isdigit() else -1
            return TakenInfo(
                info, token, held_ms / 1000 if held_ms >= 0 else -1.0, confirmed == "1"
            )

        return await self._guard("peek_taken", run)

    async def finish_take(
        self, session_id: str, owner: str, token: str, dropped_by: str | None = None
    ) -> None:
        """Drop what the take ``token`` moved aside: the session is restored, or refused.
        ``dropped_by``: the taker refused it (corrupt), so its holder record goes too."""

        async def run() -> None:
            await self._finish_take(
                keys=[
                    self.taken_key(session_id, owner),
                    self.holder_key(session_id, owner),
                    self.void_key(session_id, owner, token),
                ],
                args=[token, dropped_by or "", "1" if dropped_by else "0", _ms(_TAKEN_MIN_S)],
            )

        await self._guard("finish_take", run, follow_up=True)

    async def give_back(self, session_id: str, owner: str, token: str) -> bool:
        """Void the take ``token`` and park again what it moved aside, if it ran; whether a
        record was put back. Made even during the pause after a failure."""

        async def run() -> bool:
            back = await self._give_back(
                keys=[
                    self.key(session_id, owner),
                    self.taken_key(session_id, owner),
                    self.void_key(session_id, owner, token),
                    self.holder_key(session_id, owner),
                ],
                args=[token, _ms(_TAKEN_MIN_S)],
            )
            return bool(back)

        return await self._guard("give_back", run, follow_up=True)

    async def exists(self, session_id: str, owner: str) -> bool:
        """Whether the session is parked, or on its way from the store to a replica."""

        async def run() -> bool:
            key = self.key(session_id, owner)
            return bool(await self._client.exists(key, self.taken_key(session_id, owner)))

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

    async def unmark_moving(self, session_id: str, owner: str) -> None:
        """Take back :meth:`mark_moving` for a session that ended instead of being written."""

        async def run() -> None:
            await self._client.delete(self.moving_key(session_id, owner))

        await self._guard("unmark_moving", run)

    async def is_moving(self, session_id: str, owner: str) -> bool:
        async def run() -> bool:
            return bool(await self._client.exists(self.moving_key(session_id, owner)))

        return await self._guard("is_moving", run)

    async def claim(
        self,
        session_id: str,
        owner: str,
        holder: str,
        ttl_s: float,
        token: str,
        earlier: Sequence[str] = (),
    ) -> bool:
        """Claim a client-chosen id for ``holder`` (a replica id) before it opens the session,
        atomically (one script, one round trip): False if the caller's session of that id is
        parked, on its way out of the store, being handed off, or held by another running
        replica, or if this claim (``token``, new for every claim) was taken back before it
        arrived; else ``holder`` is its holder for ``ttl_s`` and True. A holder that is no
        longer running is replaced. ``earlier``: tokens of the holder's earlier claims of the
        id that it could not take back yet (:meth:`unclaim`), taken back in the same step
        however it ends (the caller has nothing of the id: a record they wrote is stale). A
        claim the caller cannot stand by is taken back with :meth:`unclaim`."""

        async def run() -> bool:
            keys = [
                self.key(session_id, owner),
                self.taken_key(session_id, owner),
                self.moving_key(session_id, owner),
                self.holder_key(session_id, owner),
                self.claim_key(session_id, owner),
                self.void_key(session_id, owner, token),
            ]
            keys += [self.void_key(session_id, owner, before) for before in earlier]
            args: list[str | int] = [holder, _ms(ttl_s), self.release_channel(""), token]
            args += [_ms(CLAIM_VOID_S), *earlier]
            claimed = await self._claim(keys=keys, args=args)
            return bool(claimed)

        return await self._guard("claim", run)

    async def unclaim(
        self,
        session_id: str,
        owner: str,
        holder: str,
        tokens: Sequence[str],
        *,
        drop: bool = True,
        follow_up: bool = False,
    ) -> None:
        """Take back ``holder``'s claims ``tokens`` of a client-chosen id (:meth:`claim`):
        each is void from now on (one still on its way claims nothing when it lands), and the
        holder record is deleted if one of them wrote it and it still names ``holder``; a
        record written since (by a later claim, a take, another replica) stands. ``drop``
        False: void them only (the session is on ``holder`` by now). ``follow_up``: it takes
        back a claim whose reply was lost, and is made even during the pause after that
        failure."""
        if not tokens:
            return

        async def run() -> None:
            keys = [self.holder_key(session_id, owner), self.claim_key(session_id, owner)]
            keys += [self.void_key(session_id, owner, token) for token in tokens]
            args = [holder, "1" if drop else "0", _ms(CLAIM_VOID_S), *tokens]
            await self._unclaim(keys=keys, args=args)

        await self._guard("unclaim", run, follow_up=follow_up)

    async def set_holder(self, session_id: str, owner: str, holder: str, ttl_s: float) -> None:
        """Record that ``holder`` (a replica id) has the session resident, whoever held it
        before: for a session no other replica can have (its id made by the server, or it is
        resident here already). A client-chosen id is :meth:`claim`-ed before it is opened."""

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

    async def holders(self, keys: Sequence[tuple[str, str]]) -> list[str | None]:
        """The holder recorded for each session (owner, id), in one round trip."""
        if not keys:
            return []

        async def run() -> list[str | None]:
            found = await self._client.mget([self.holder_key(sid, owner) for owner, sid in keys])
            return [None if value is None else _text(value) for value in found]

        return await self._guard("holders", run)

    async def drop_holder(self, session_id: str, owner: str, holder: str) -> None:
        """Forget that ``holder`` has the session (and the token of the claim that named it),
        unless another replica has it by now."""

        async def run() -> None:
            keys = [self.holder_key(session_id, owner), self.claim_key(session_id, owner)]
            await self._drop_holder(keys=keys, args=[holder])

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

    async def releases(
        self, holder: str, subscribed: Callable[[], None] | None = None
    ) -> AsyncIterator[tuple[str, str]]:
        """The (owner, session id) of every release asked of ``holder``, as they come;
        ``subscribed`` is called once the subscription is made (from then on other replicas
        count ``holder`` alive).

        Ends with :class:`StoreUnavailable` when the subscription breaks; the caller
        subscribes again. Not guarded: one long-lived connection of its own, not a call."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.release_channel(holder))
            if subscribed is not None:
                subscribed()
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

    async def _guard(
        self, operation: str, call: Callable[[], Awaitable[T]], *, follow_up: bool = False
    ) -> T:
        """Run ``call``; turn any store failure into :class:`StoreUnavailable`, once logged.
        A ``follow_up`` (learning what a call whose reply was lost did) is made even during
        the pause after a failure."""
        if not self.available and not follow_up:
            self._on_error(operation)
            raise StoreUnavailable(f"state store {self._name} is unreachable", unsent=True)
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
            raise StoreUnavailable(
                f"state store {self._name} is unreachable: {exc}", unsent=_never_sent(exc)
            ) from exc
        if self._down_since is not None:
            logger.warning(
                "event=state_store_up store=%s down_s=%.1f",
                self._name,
                time.monotonic() - self._down_since,
            )
            self._down_since = None
        return result


def _never_sent(exc: BaseException) -> bool:
    """Whether a failed call surely never reached Redis: redis-py failed to connect (it words
    those errors "... connecting to ..."), before it wrote any request. Any other failure
    may come after Redis ran the call; an error not recognised here is taken for one."""
    return isinstance(exc, (RedisConnectionError, RedisTimeoutError)) and (
        "connecting to" in str(exc).lower()
    )


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
