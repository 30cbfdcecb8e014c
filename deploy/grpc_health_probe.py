"""Container health check for an rnnserve replica: exit 0 only if grpc.health.v1 says SERVING.

Docker runs this inside the server image (`python /opt/rnnserve/grpc_health_probe.py`), so
it needs only grpcio and grpcio-health-checking, which the `[server]` extra installs. A
draining replica answers NOT_SERVING and is reported unhealthy.

Usage: grpc_health_probe.py [ADDRESS] [SERVICE]   (default 127.0.0.1:50051, overall health)
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S = 3.0


def probe(address: str, service: str = "") -> bool:
    """True when the server at ``address`` reports ``service`` SERVING within the timeout."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            print(f"{address}: {error.code().name}: {error.details()}", file=sys.stderr)
            return False
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        print(f"{address}: {status}", file=sys.stderr)
    return serving


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "127.0.0.1:50051"
    service = argv[2] if len(argv) > 2 else ""
    return 0 if probe(address, service) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
