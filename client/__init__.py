"""rnnserve.client: the Python SDK (needs only grpcio, protobuf and numpy)."""
