"""rnnserve.server: the gRPC server that keeps recurrent state per session.

Importing this package stays cheap (no onnxruntime, no torch) so the CLI can load fast.
"""
