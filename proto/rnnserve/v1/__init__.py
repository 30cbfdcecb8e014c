"""rnnserve.v1: the wire API, generated from the .proto files next to this module."""
