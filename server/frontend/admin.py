"""The rnnserve.v1 AdminService: model lifecycle calls at the gRPC boundary of one frontend.

Handlers only check who may call, translate protobuf, and call the engine (in this process,
or across the pipe): the lifecycle itself lives in :mod:`rnnserve.server.engine.lifecycle`.

Who may call: when the server authenticates callers (tokens or mutual TLS), only identities
named by ``--admin-identity``; anyone else gets PERMISSION_DENIED (ADMIN_REQUIRED), and with
none named nobody may. Without authentication every caller is the same ``anonymous`` and the
service is open, as the inference service is: bind such a server to loopback only.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from rnnserve.v1 import admin_service_pb2 as pb
from rnnserve.v1 import admin_service_pb2_grpc as pb_grpc

from .. import errors
from ..engine.lifecycle import VersionStatus
from ..errors import RnnserveError
from ..metrics import Metrics
from .engine_api import EngineApi
from .security import current_identity
from .status import abort, as_expected_error

Response = TypeVar("Response")
SERVICE = pb.DESCRIPTOR.services_by_name["AdminService"]
SERVICE_NAME = SERVICE.full_name


def describe_version(status: VersionStatus) -> pb.VersionStatus:
    return pb.VersionStatus(
        model=status.model,
        version=status.version,
        on_disk=status.on_disk,
        state=pb.VersionState.Value(status.state),
        reason=status.reason,
        live_sessions=status.live_sessions,
    )


class AdminService(pb_grpc.AdminServiceServicer):
    """LoadModel, RetireModel, RepositoryIndex and MoveSession over an engine."""

    def __init__(
        self,
        engine: EngineApi,
        metrics: Metrics,
        admins: frozenset[str],
        authenticated: bool,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._admins = admins
        self._authenticated = authenticated

    def _check_admin(self) -> str:
        identity = current_identity()
        if self._authenticated and identity not in self._admins:
            raise RnnserveError(
                grpc.StatusCode.PERMISSION_DENIED,
                errors.ADMIN_REQUIRED,
                f"identity {identity!r} may not call the AdminService "
                "(the server names its admins with --admin-identity)",
            )
        return identity

    async def _unary(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handle: Callable[[str], Awaitable[Response]],
    ) -> Response:
        try:
            response = await handle(self._check_admin())
        except Exception as exc:  # the boundary: every failure becomes a status
            err = as_expected_error(exc)
            self._metrics.requests.labels(method, "", err.code.name).inc()
            await abort(context, err)
        self._metrics.requests.labels(method, "", "OK").inc()
        return response

    async def LoadModel(self, request: pb.LoadModelRequest, context: Any) -> Any:  # noqa: N802
        async def handle(identity: str) -> pb.LoadModelResponse:
            found = await self._engine.load_model(request.model, request.version)
            return pb.LoadModelResponse(versions=[describe_version(s) for s in found])

        return await self._unary("LoadModel", context, handle)

    async def RetireModel(self, request: pb.RetireModelRequest, context: Any) -> Any:  # noqa: N802
        async def handle(identity: str) -> pb.RetireModelResponse:
            found = await self._engine.retire_model(request.model, request.version, identity)
            return pb.RetireModelResponse(version=describe_version(found))

        return await self._unary("RetireModel", context, handle)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> Any:  # noqa: N802
        async def handle(identity: str) -> pb.RepositoryIndexResponse:
            found = await self._engine.repository_index()
            return pb.RepositoryIndexResponse(versions=[describe_version(s) for s in found])

        return await self._unary("RepositoryIndex", context, handle)

    async def MoveSession(self, request: pb.MoveSessionRequest, context: Any) -> Any:  # noqa: N802
        async def handle(identity: str) -> pb.MoveSessionResponse:
            info = await self._engine.move_session(
                request.session_id, request.owner, request.version
            )
            return pb.MoveSessionResponse(
                session_id=info.session_id,
                model=info.model,
                version=info.version,
                position=info.position,
            )

        return await self._unary("MoveSession", context, handle)
