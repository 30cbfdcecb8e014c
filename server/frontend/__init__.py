"""Frontends: the gRPC boundary (auth, drain, protobuf ⇄ arrays, statuses), stateless.

One runs in the engine's process, or several run as processes of their own sharing the port;
either way they reach the engine through the methods of :mod:`.engine_api`.
"""
