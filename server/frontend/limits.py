"""Per-connection limits of a frontend: message sizes, idle and keepalive, stalled calls.

What one connection may cost the server is bounded here, before any rnnserve code sees a
call: the largest message gRPC will read (sized from the repository's models, so an
unauthenticated or careless caller cannot make a frontend read 64 MiB that no model could
take), how long a connection may sit with no call, how often the server checks a silent
peer is still there, and how often a client may ping. The values follow what gRPC's own
documentation recommends for servers (keepalive every minute or more, a ping policy that
allows the client's keepalive and ends ping floods with GOAWAY).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import DTYPES, ModelConfig, load_model_config
from ..errors import ConfigError
from ..repository import ModelVersion
from .budget import BYTES_PER_IDENTITY, STEPS_PER_IDENTITY
from .stream import UNSENT_BYTES_PER_STREAM

#: gRPC's own default receive limit: the floor, so small models keep gRPC's usual room.
GRPC_DEFAULT_BYTES = 4 << 20
#: The limit when a model's input has no bound in its config (an axis besides time is -1).
CEILING_BYTES = 64 << 20
#: Room for protobuf framing, ids and a StreamSteps message that carries several steps.
HEADROOM_FACTOR = 2
HEADROOM_BYTES = 64 << 10
#: Replies (stream batches, exported state) are the server's own, bounded by the per-stream
#: in-flight limit; they may be as large as the old limit.
MAX_SEND_BYTES = 64 << 20


def largest_request_bytes(model: ModelVersion) -> int | None:
    """Bytes of the largest request ``model`` accepts: ``max_timesteps`` steps of every
    input plus one full state (an ``initial_state``); None when a shape is unbounded."""
    return config_request_bytes(model.config)


def config_request_bytes(config: ModelConfig) -> int | None:
    """:func:`largest_request_bytes` of any version read with ``config``."""
    total = 0
    for spec in config.inputs:
        extents = [e for axis, e in enumerate(spec.session_shape) if axis != spec.session_time_axis]
        if any(e < 0 for e in extents):
            return None
        steps = config.limits.max_timesteps if spec.session_time_axis >= 0 else 1
        total += steps * math.prod(extents) * DTYPES[spec.dtype].itemsize
    for state in config.states:
        total += math.prod(state.session_shape) * DTYPES[state.dtype].itemsize
    return total


def message_limit(models: Iterable[ModelVersion]) -> int:
    """The default receive limit: twice the largest request any model accepts plus 64 KiB,
    at least gRPC's 4 MiB default, at most 64 MiB (also when a model's input is unbounded)."""
    return _limit_for(model.config for model in models)


def _limit_for(configs: Iterable[ModelConfig]) -> int:
    largest = 0
    for config in configs:
        size = config_request_bytes(config)
        if size is None:
            return CEILING_BYTES
        largest = max(largest, size)
    wanted = HEADROOM_FACTOR * largest + HEADROOM_BYTES
    return min(CEILING_BYTES, max(GRPC_DEFAULT_BYTES, wanted))


def repository_message_limit(root: Path, loaded: Iterable[ModelVersion]) -> int:
    """The receive limit sized at start: :func:`message_limit` of the loaded versions and of
    every model config on disk, so that versions loaded later (LoadModel, polling) with a
    config already there take their largest requests. A config that cannot be read is
    skipped here: its version fails to load with that reason anyway."""
    configs = [model.config for model in loaded]
    if root.is_dir():
        for model_dir in sorted(root.iterdir()):
            path = model_dir / "config.toml"
            if model_dir.name.startswith(".") or not path.is_file():
                continue
            try:
                configs.append(load_model_config(path))
            except (ConfigError, OSError, ValueError):
                continue
    return _limit_for(configs)


def version_too_large(model: ModelVersion, limit: int) -> str | None:
    """Why frontends whose receive limit is ``limit`` cannot take ``model``'s largest valid
    requests (a version loaded after the limit was sized), or None when they can."""
    needed = message_limit([model])
    if needed <= limit:
        return None
    size = largest_request_bytes(model)
    what = "inputs of unbounded size" if size is None else f"requests of up to {size} bytes"
    return (
        f"{model.config_path}: its config allows {what}, which needs a receive limit of "
        f"{needed} bytes; the frontends read at most {limit} (sized at start from the "
        f"repository): restart with --max-message-bytes {needed} (or more) to serve it"
    )


@dataclass(frozen=True)
class ConnectionLimits:
    """Idle, keepalive and stalled-call limits of every connection (seconds; 0 = none)."""

    body_timeout_s: float = 30.0  # a unary request's message must arrive within this
    stream_idle_s: float = 300.0  # a StreamSteps call silent this long, nothing outstanding
    connection_idle_s: float = 300.0  # a connection with no call this long gets GOAWAY
    connection_age_s: float = 0.0  # every connection gets GOAWAY at this age (0: never)
    connection_age_grace_s: float = 30.0  # calls still running then get this long to end
    keepalive_s: float = 60.0  # ping a silent peer this often...
    keepalive_timeout_s: float = 20.0  # ...and drop it when the ping is not answered
    min_client_ping_s: float = 10.0  # a client pinging more often gets GOAWAY
    steps_per_identity: int = STEPS_PER_IDENTITY  # unanswered steps per identity (budget.py)
    bytes_per_identity: int = BYTES_PER_IDENTITY  # ...and their bytes (budget.py)
    unsent_bytes_per_stream: int = UNSENT_BYTES_PER_STREAM  # results not yet sent (stream.py)

    def problems(self) -> list[str]:
        """What is wrong, each naming its flag; empty if fine."""
        found: list[str] = []
        for flag, value in (
            ("--body-timeout-s", self.body_timeout_s),
            ("--stream-idle-s", self.stream_idle_s),
            ("--connection-idle-s", self.connection_idle_s),
            ("--connection-age-s", self.connection_age_s),
            ("--connection-age-grace-s", self.connection_age_grace_s),
            ("--keepalive-s", self.keepalive_s),
            ("--keepalive-timeout-s", self.keepalive_timeout_s),
            ("--min-client-ping-s", self.min_client_ping_s),
        ):
            if not (value >= 0 and math.isfinite(value)):
                found.append(f"{flag} must be a finite number >= 0 (0 turns it off), got {value}")
        if self.steps_per_identity < 1:
            found.append(f"--steps-per-identity must be >= 1, got {self.steps_per_identity}")
        if self.bytes_per_identity < 1:
            found.append(f"--bytes-per-identity must be >= 1, got {self.bytes_per_identity}")
        if self.unsent_bytes_per_stream < 1:
            found.append(
                f"--unsent-bytes-per-stream must be >= 1, got {self.unsent_bytes_per_stream}"
            )
        if self.keepalive_s and self.keepalive_timeout_s == 0:
            found.append("--keepalive-timeout-s must be > 0 when --keepalive-s is on")
        return found

    def grpc_options(self) -> list[tuple[str, int]]:
        """The grpc server options for these limits (the ones that are on)."""

        def ms(seconds: float) -> int:
            return max(1, round(seconds * 1000))

        options: list[tuple[str, int]] = []
        if self.connection_idle_s:
            options.append(("grpc.max_connection_idle_ms", ms(self.connection_idle_s)))
        if self.connection_age_s:
            options.append(("grpc.max_connection_age_ms", ms(self.connection_age_s)))
            options.append(("grpc.max_connection_age_grace_ms", ms(self.connection_age_grace_s)))
        if self.keepalive_s:
            options.append(("grpc.keepalive_time_ms", ms(self.keepalive_s)))
            options.append(("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)))
        options += [
            # Client keepalive pings are allowed down to min_client_ping_s, with or without
            # calls; more often, twice, and gRPC ends the connection (ENHANCE_YOUR_CALM).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", ms(self.min_client_ping_s)),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        return options

    @property
    def body_timeout(self) -> float | None:
        return self.body_timeout_s or None

    @property
    def stream_idle(self) -> float | None:
        return self.stream_idle_s or None
