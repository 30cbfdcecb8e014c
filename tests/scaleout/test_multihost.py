"""Multi-host rehearsal of the handoff: each replica in its own network namespace with its
own address (a host of its own, as far as the network goes), Redis and Envoy in the root
namespace on the bridge that joins them. Same load and checks as test_handoff.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
from pathlib import Path

from deploy.tools import free_port

from .handoff import check_against_reference, step_through
from .netns import hosts, namespaced_servers, require_namespaces
from .redis_server import RedisServer, left_behind
from .topology import envoy_in_front

SESSIONS = 30
STEPS = 20


async def test_handoff_between_replicas_on_separate_network_namespaces(
    scaleout_repository: Path, tmp_path: Path
) -> None:
    require_namespaces()
    with contextlib.ExitStack() as stack:
        net = stack.enter_context(hosts(2))
        redis = stack.enter_context(RedisServer(tmp_path / "redis", free_port(), net.gateway))
        args = ("--state-store", redis.url, "--grace-s", "5")
        replicas = stack.enter_context(
            namespaced_servers(net.members, scaleout_repository, tmp_path, *args)
        )
        assert {r.address_host for r in replicas} == {a for _, a in net.members}
        envoy = stack.enter_context(
            envoy_in_front([(r.address_host, r.grpc_port) for r in replicas], tmp_path)
        )
        leaving = replicas[0]
        run = await step_through(
            envoy.address, SESSIONS, STEPS, lambda: leaving.process.send_signal(signal.SIGTERM), 0.3
        )
        assert await asyncio.to_thread(leaving.process.wait, 30) == 0
        handed = re.search(r"event=handoff store=\S+ sessions=(\d+) left=0", leaving.stderr())
        assert handed is not None and int(handed.group(1)) > 0, leaving.stderr()[-3000:]
        assert not left_behind(redis.client(), "rnnserve:session:*")  # who holds what only
    check_against_reference(run, scaleout_repository)
