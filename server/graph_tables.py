"""What an ONNX graph's constant tables say about its integer inputs.

A token input indexes an embedding table through a ``Gather``; its legal values are that
table's rows. The server checks a config's declared ``range`` against them, and
``rnnserve config infer`` / ``rnnserve export`` write the range from them.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def graph_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Every constant value of the graph by name: initializers and ``Constant`` nodes."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_ints", "value_int"):
                values[node.output[0]] = np.array(helper.get_attribute_value(attr))
    return values


def attribute(node: onnx.NodeProto, name: str, default: object) -> object:
    """A node attribute's value, or ``default`` when the node does not set it."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


#: Ops that pass an integer input's values on unchanged, on the way to the Gather it indexes.
VALUE_PRESERVING = frozenset(
    {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose", "Cast"}
)


def index_range(
    graph: onnx.GraphProto, name: str, constants: dict[str, np.ndarray] | None = None
) -> tuple[int, int] | None:
    """The values an integer graph input may take, when it indexes a constant table.

    An input that reaches a ``Gather``'s indices (directly or through ops that keep its
    values) over an initializer of N rows on the gathered axis must hold 0..N-1: onnxruntime
    reads -1 as the last row without complaint, and fails the whole run beyond. With several
    such tables the smallest wins. None when no table bounds it.
    """
    if constants is None:
        constants = graph_constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    rows: list[int] = []
    seen: set[str] = set()
    pending = [name]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in consumers.get(current, []):
            if node.op_type in VALUE_PRESERVING and node.input[0] == current:
                pending.extend(o for o in node.output if o)
            elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == current:
                table = constants.get(node.input[0])
                if table is not None and table.ndim:
                    raw = attribute(node, "axis", 0)
                    axis = (raw if isinstance(raw, int) else 0) % table.ndim
                    rows.append(int(table.shape[axis]))
    if not rows or min(rows) < 1:
        return None
    return 0, min(rows) - 1
