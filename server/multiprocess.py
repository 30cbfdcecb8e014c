"""Several frontends: the engine in this process, each frontend a process of its own.

The frontends share one port (SO_REUSEPORT; the kernel spreads connections over them, as
gRPC's ``examples/python/multiprocessing`` does) and reach the engine over a private
unix-socket pipe (:mod:`.engine.ipc`). Metrics: every process writes prometheus-client's
multiprocess files in one private folder, and this process serves them all on the metrics
port, with the gauges read from the engine at each scrape (:class:`.metrics.EngineGauges`).
SIGTERM here: sessions are marked as moving (with a state store), every frontend drains and
exits, then the engine stops (handoff, snapshot) as with one frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing as mp
import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

from .app import (
    ServerConfig,
    begin_stop,
    build_engine,
    frontend_options,
    stop_engine,
    write_port_file,
)
from .errors import ConfigError
from .frontend.server import FrontendOptions

logger = logging.getLogger(__name__)
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
_START_TIMEOUT_S = 60.0
_READY_POLL_S = 0.5  # a wait for a frontend's readiness, checked this often
_WATCH_S = 1.0


@contextlib.contextmanager
def reserve_port(host: str, port: int) -> Iterator[int]:
    """Hold ``host:port`` (any free port for 0) with SO_REUSEPORT while frontends bind it.

    A port another process holds is refused first (:class:`ConfigError`): with SO_REUSEPORT
    alone the frontends would share it with another server's that set it too."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if port:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                raise ConfigError(
                    f"--port {port}: cannot listen on {host}:{port} ({exc.strerror})"
                ) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _frontend_main(
    index: int, options: FrontendOptions, engine_address: str, grace_s: float, ready: Any
) -> None:
    """Entry point of one frontend process."""
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s frontend-{index} %(name)s %(message)s",
    )
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(_frontend(index, options, engine_address, grace_s, ready))


async def _frontend(
    index: int, options: FrontendOptions, engine_address: str, grace_s: float, ready: Any
) -> None:
    from .frontend.engine_client import EngineClient
    from .frontend.server import start_frontend
    from .metrics import Metrics

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    # Ctrl-C reaches every process of the terminal's group: the server's own process alone
    # acts on it, stopping in order (sessions marked moving, then the frontends drained by
    # SIGTERM, then the engine), instead of frontends draining on their own meanwhile.
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    watchdog = loop.create_task(_exit_with_parent(stop))
    engine = EngineClient(engine_address, options.busy_poll_s)
    await engine.connect()
    # At once when the pipe closes; the parent watchdog is for a pipe left open.
    engine.on_lost(lambda: _stop_for_engine_gone(stop))
    frontend = await start_frontend(engine, Metrics(), options)
    ready.send(frontend.port)
    ready.close()
    await stop.wait()
    deadline = loop.time() + grace_s
    await frontend.begin_drain()
    await frontend.drain.wait_idle(grace_s)
    await frontend.stop(max(0.0, deadline - loop.time()))
    watchdog.cancel()
    await engine.close()


async def _exit_with_parent(stop: asyncio.Event) -> None:
    """A frontend whose engine process died (even by SIGKILL) stops serving: it would only
    leave calls hanging on a port that looks alive."""
    parent = os.getppid()
    while os.getppid() == parent:
        await asyncio.sleep(_WATCH_S)
    _stop_for_engine_gone(stop)


def _stop_for_engine_gone(stop: asyncio.Event) -> None:
    """Stop serving (once, logged once): the engine's process or its pipe is gone."""
    if not stop.is_set():
        logger.error("event=engine_gone action=stop")
        stop.set()


class _Frontends:
    """The frontend processes of one server: started, restarted if one dies, stopped."""

    def __init__(self, config: ServerConfig, engine_address: str, message_bytes: int) -> None:
        self._config = config
        self._message_bytes = message_bytes  # the engine's resolved receive limit
        self._engine_address = engine_address
        self._context = mp.get_context("spawn")
        self._processes: dict[int, Any] = {}
        self._port = 0

    async def start_all(self, port: int) -> None:
        self._port = port
        waiting = [self._spawn(index) for index in range(self._config.frontends)]
        for index, conn in enumerate(waiting):
            if not await self._ready(index, conn):
                for process in self._processes.values():
                    process.kill()
                raise RuntimeError(f"frontend {index} did not start in {_START_TIMEOUT_S:.0f} s")

    def _spawn(self, index: int) -> Any:
        config = self._config
        parent_end, child_end = self._context.Pipe(duplex=False)
        health_port = config.health_port if index == 0 else 0
        options = frontend_options(config, self._port, health_port, self._message_bytes)
        process = self._context.Process(
            target=_frontend_main,
            args=(index, options, self._engine_address, config.grace_s, child_end),
            name=f"rnnserve-frontend-{index}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._processes[index] = process
        return parent_end

    async def _ready(self, index: int, conn: Any) -> bool:
        """Whether frontend ``index`` said it serves within ``_START_TIMEOUT_S``. Polled in
        short slices, so a stop (which cancels this) leaves no thread waiting out the rest."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _START_TIMEOUT_S
        while not await loop.run_in_executor(None, conn.poll, _READY_POLL_S):
            if loop.time() >= give_up:
                return False
        conn.recv()  # EOFError: it exited before it was ready
        return True

    async def supervise(self) -> None:
        """Replace a frontend process that exits while the server runs (a crash, an OOM
        kill): the others keep serving meanwhile, and the port never goes dark. Each restart
        waits for its process on its own, so one slow to start holds up no other's restart;
        one that does not start in time is killed alone and started again."""
        from prometheus_client.multiprocess import mark_process_dead

        restarting: dict[int, asyncio.Task[None]] = {}
        try:
            while True:
                await asyncio.sleep(_WATCH_S)
                for index, process in list(self._processes.items()):
                    if process.is_alive() or index in restarting:
                        continue
                    logger.error(
                        "event=frontend_exited index=%d pid=%d code=%s action=restart",
                        index,
                        process.pid,
                        process.exitcode,
                    )
                    mark_process_dead(process.pid)
                    task = asyncio.get_running_loop().create_task(self._restart(index))
                    restarting[index] = task
                    task.add_done_callback(functools.partial(_forget, restarting, index))
        finally:
            for task in list(restarting.values()):
                task.cancel()

    async def _restart(self, index: int) -> None:
        try:
            if not await self._ready(index, self._spawn(index)):
                self._processes[index].kill()  # seen dead on a later round: started again
                logger.error(
                    "event=frontend_restart_failed index=%d: not serving after %.0f s; killed",
                    index,
                    _START_TIMEOUT_S,
                )
        except Exception:
            logger.exception("event=frontend_restart_failed index=%d", index)

    async def stop_all(self, mark_dead: Any) -> None:
        """SIGTERM every frontend (each drains its calls), wait, kill what remains."""
        loop = asyncio.get_running_loop()
        processes = list(self._processes.values())
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            await loop.run_in_executor(None, process.join, self._config.grace_s + 5)
            if process.is_alive():
                process.kill()
            mark_dead(process.pid)


def _forget(restarting: dict[int, asyncio.Task[None]], index: int, _: object) -> None:
    restarting.pop(index, None)


async def serve_multiprocess(config: ServerConfig) -> None:
    """Run the engine here and ``config.frontends`` frontend processes until SIGTERM."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

    from .engine.ipc import EngineServer, socket_path
    from .metrics import Metrics

    if not os.environ.get(METRICS_DIR_ENV):
        raise RuntimeError(f"{METRICS_DIR_ENV} must be set before prometheus_client is imported")
    loop = asyncio.get_running_loop()
    metrics = Metrics()
    engine = await build_engine(config, metrics)
    await engine.start()
    pipe = socket_path()
    ipc = EngineServer(engine, str(pipe))
    await ipc.start()
    frontends = _Frontends(config, ipc.address, engine.config.message_limit_bytes)
    with reserve_port(config.host, config.port) as port:
        await frontends.start_all(port)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ[METRICS_DIR_ENV])
    registry.register(metrics.engine_gauges)  # read from the engine, here (metrics.py)
    metrics_http = None
    metrics_port = -1
    if config.metrics_port >= 0:
        metrics_http, _ = start_http_server(
            config.metrics_port, config.metrics_host, registry=registry
        )
        metrics_port = metrics_http.server_port
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.port_file is not None:
        write_port_file(config.port_file, port, metrics_port)
    logger.info(
        "event=start grpc_port=%d metrics_port=%d frontends=%d models=%s",
        port,
        metrics_port,
        config.frontends,
        ",".join(mv.key for mv in engine.repository.all()),
    )
    supervisor = loop.create_task(frontends.supervise())
    try:
        await stop.wait()
    finally:
        supervisor.cancel()  # a frontend that exits from here on is stopping, not crashed
        await begin_stop(engine)
        await frontends.stop_all(mark_process_dead)
        await stop_engine(engine)
        await ipc.close()
        if metrics_http is not None:
            metrics_http.shutdown()
        with contextlib.suppress(OSError):
            pipe.unlink()
            pipe.parent.rmdir()
        logger.info("event=stop")
