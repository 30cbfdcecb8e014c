"""The engine: one per device, the only owner of sessions and state (see core.py).

Nothing here imports :mod:`rnnserve.server.frontend` or protobuf: frontends hand the engine
arrays and identities, and get arrays, plain records and errors back.
"""
