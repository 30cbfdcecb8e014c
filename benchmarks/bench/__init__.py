"""``rnnserve bench``: measure rnnserve against the floors it cannot beat.

The floors are a bare gRPC echo of the same messages (transport) and onnxruntime alone on
the same model (compute); the server is judged by ratios to them, measured in one run.
"""
