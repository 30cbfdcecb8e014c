"""rnnserve.models: the four recurrent cells, their training and their ONNX export.

Needs the ``[train]`` extra (torch). The server never imports this package.
"""
