"""Where sessions' state lives: one slab per state pair, slot-major, on the host or the device.

A slab holds every slot's state of one pair, shaped ``(max_sessions, *per_session_shape)``,
so a batch's state is one gather of its slots' rows and its new state one scatter. The
batcher binds the gathered rows to the model's state inputs and hands the run's state outputs
(still where onnxruntime put them) back to :meth:`StateMemory.scatter`. Two implementations
keep that contract:

- :class:`HostSlabs`: numpy arrays; gather and scatter are numpy indexing, the run a plain
  ``session.run``. What a CPU session uses (measured faster on CPU than binding, see
  docs/server.md).
- :class:`DeviceSlabs`: ``OrtValue``s on the session's device; gather and scatter are two tiny
  onnxruntime graphs (``Gather`` + ``Transpose``, ``Transpose`` + ``Gather`` + ``ScatterND``
  written into the slab itself) run on the session's own providers, so on CUDA the state never
  leaves the device between steps; only :meth:`~StateMemory.read` (export, fork, park,
  snapshot) and :meth:`~StateMemory.write` (open, reset, restore) cross the bus. It needs no
  library beyond onnxruntime, and it runs on CPU ``OrtValue``s as well, which is how the tests
  cover it without a GPU.

Rows of a batch are unique slots (a batch holds one step per session), so a scatter never
writes one slot twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, TypeAlias

import numpy as np
import onnxruntime as ort

from ..config import DTYPES, ModelConfig, StateConfig

if TYPE_CHECKING:
    from onnx import NodeProto, ValueInfoProto

#: What a gathered state row set is bound as: a host array or an OrtValue on the device.
Bound: TypeAlias = np.ndarray | ort.OrtValue


class StateMemory(Protocol):
    """The state slabs of one model version (see the module docstring)."""

    device: str
    #: Whether runs bind the rows through IOBinding (OrtValues) or feed them to session.run.
    bound: bool

    def write(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        """Set a slot's state: given pairs copied in, the others zeroed (no leaks)."""

    def read(self, slot: int) -> dict[str, np.ndarray]:
        """A host copy of a slot's state, by pair name (batch axis removed)."""

    def gather(self, slots: np.ndarray) -> dict[str, Bound]:
        """The state rows of ``slots`` in the model's layout (batch on its axis), by pair."""

    def scatter(
        self, slots: np.ndarray, rows: np.ndarray | None, states: Mapping[str, Bound]
    ) -> None:
        """Write a run's new states (model layout, by pair) into ``slots``; with ``rows``,
        only those rows of the batch go into ``slots[rows]``."""


def to_batch_first(rank: int, batch_axis: int) -> list[int]:
    """Transpose permutation moving ``batch_axis`` to the front."""
    return [batch_axis] + [a for a in range(rank) if a != batch_axis]


def _from_batch_first(rank: int, batch_axis: int) -> list[int]:
    """Transpose permutation moving the front axis to ``batch_axis``."""
    rest = list(range(1, rank))
    return rest[:batch_axis] + [0] + rest[batch_axis:]


class _Layout:
    """How one state pair's rows go between the slab (slot axis first) and the model's layout.

    Precomputed once: ``np.moveaxis`` re-validates its axes on every call (~7 µs a state per
    batch, measured), and where every axis before the batch axis has extent 1 (an ONNX
    ``(num_directions, batch, hidden)`` state) the move is a free reshape, not a copy.
    """

    __slots__ = ("batch_axis", "session_shape", "to_model", "to_slab", "reshape")

    def __init__(self, state: StateConfig) -> None:
        rank = len(state.shape)
        self.batch_axis = state.batch_axis
        self.session_shape = tuple(state.session_shape)
        self.to_model = tuple(_from_batch_first(rank, state.batch_axis))
        self.to_slab = tuple(to_batch_first(rank, state.batch_axis))
        self.reshape = all(d == 1 for d in self.session_shape[: state.batch_axis])

    def model_rows(self, rows: np.ndarray) -> np.ndarray:
        """Slab rows ``(n, *session_shape)`` as a contiguous array in the model's layout."""
        if self.batch_axis == 0:
            return rows
        if self.reshape:
            shape = list(self.session_shape)
            shape.insert(self.batch_axis, rows.shape[0])
            return rows.reshape(shape)
        return np.ascontiguousarray(rows.transpose(self.to_model))

    def slab_rows(self, value: np.ndarray) -> np.ndarray:
        """A batch in the model's layout as rows ``(n, *session_shape)`` (a view if it can)."""
        if self.batch_axis == 0:
            return value
        if self.reshape and value.flags.c_contiguous:
            return value.reshape((value.shape[self.batch_axis], *self.session_shape))
        return value.transpose(self.to_slab)


class HostSlabs:
    """State slabs as numpy arrays in host memory, fed to a plain ``session.run``."""

    device = "cpu"
    bound = False

    def __init__(self, config: ModelConfig, max_sessions: int) -> None:
        self._layouts = {s.input: _Layout(s) for s in config.states}
        self.arrays: dict[str, np.ndarray] = {
            s.input: np.zeros((max_sessions, *s.session_shape), DTYPES[s.dtype])
            for s in config.states
        }

    def write(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        for name, slab in self.arrays.items():
            value = state.get(name)
            if value is None:
                slab[slot] = 0
            else:
                slab[slot] = value

    def read(self, slot: int) -> dict[str, np.ndarray]:
        return {name: slab[slot].copy() for name, slab in self.arrays.items()}

    def gather(self, slots: np.ndarray) -> dict[str, Bound]:
        layouts = self._layouts
        if len(slots) == 1:  # a lone step: its row as a view, no copy (read before written)
            slot = int(slots[0])
            return {
                name: layouts[name].model_rows(slab[slot : slot + 1])
                for name, slab in self.arrays.items()
            }
        return {name: layouts[name].model_rows(slab[slots]) for name, slab in self.arrays.items()}

    def scatter(
        self, slots: np.ndarray, rows: np.ndarray | None, states: Mapping[str, Bound]
    ) -> None:
        lone = int(slots[0]) if len(slots) == 1 and rows is None else None
        for name, value in states.items():
            array = value if isinstance(value, np.ndarray) else value.numpy()
            batch_first = self._layouts[name].slab_rows(array)
            if lone is not None:  # a plain row write, cheaper than a fancy-indexed one
                self.arrays[name][lone] = batch_first[0]
            elif rows is None:
                self.arrays[name][slots] = batch_first
            else:
                self.arrays[name][slots[rows]] = batch_first[rows]


class DeviceSlabs:
    """State slabs as ``OrtValue``s on ``device``, gathered and scattered by onnxruntime and
    bound to the model's runs through IOBinding."""

    bound = True

    def __init__(
        self,
        config: ModelConfig,
        max_sessions: int,
        device: str,
        providers: list[str] | tuple[str, ...],
    ) -> None:
        self.device = device
        #: State bytes copied between host and device (read and write only; batches copy none).
        self.host_bytes = 0
        self._states = list(config.states)
        self._by_name = {s.input: s for s in self._states}
        self._zeros = {s.input: np.zeros(s.session_shape, DTYPES[s.dtype]) for s in self._states}
        # Zeroed at allocation; on CPU the OrtValue shares the numpy array's memory, kept here.
        self._backing = [np.zeros((max_sessions, *s.session_shape), DTYPES[s.dtype]) for s in
                         self._states]  # fmt: skip
        self.slabs: dict[str, ort.OrtValue] = {
            s.input: ort.OrtValue.ortvalue_from_numpy(backing, device, 0)
            for s, backing in zip(self._states, self._backing, strict=True)
        }
        if device != "cpu":
            self._backing = []  # copied to the device; the host zeros are not needed
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self._gather = ort.InferenceSession(
            _gather_graph(self._states), options, providers=list(providers)
        )
        self._scatter = ort.InferenceSession(
            _scatter_graph(self._states), options, providers=list(providers)
        )
        self._scatter_all = ort.InferenceSession(
            _scatter_graph(self._states, every_row=True), options, providers=list(providers)
        )

    def write(self, slot: int, state: Mapping[str, np.ndarray]) -> None:
        updates = {}
        for s in self._states:
            value = state.get(s.input)
            row = self._zeros[s.input] if value is None else value
            updates[s.input] = np.expand_dims(np.asarray(row, DTYPES[s.dtype]), s.batch_axis)
        self.scatter(np.array([slot], np.int64), None, updates)
        if self.device != "cpu":
            self.host_bytes += sum(u.nbytes for u in updates.values())

    def read(self, slot: int) -> dict[str, np.ndarray]:
        rows = self._run_gather(np.array([slot], np.int64), "cpu")
        if self.device != "cpu":
            self.host_bytes += sum(rows[s.input].tensor_size_in_bytes() for s in self._states)
        return {
            s.input: np.take(rows[s.input].numpy(), 0, axis=s.batch_axis).copy()
            for s in self._states
        }

    def gather(self, slots: np.ndarray) -> dict[str, Bound]:
        return dict(self._run_gather(np.asarray(slots, np.int64), self.device))

    def _run_gather(self, slots: np.ndarray, where: str) -> dict[str, ort.OrtValue]:
        binding = self._gather.io_binding()
        binding.bind_cpu_input("slots", slots)
        for j, s in enumerate(self._states):
            binding.bind_ortvalue_input(f"slab_{j}", self.slabs[s.input])
            binding.bind_output(f"rows_{j}", where)
        self._gather.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {s.input: values[j] for j, s in enumerate(self._states)}

    def scatter(
        self, slots: np.ndarray, rows: np.ndarray | None, states: Mapping[str, Bound]
    ) -> None:
        slots = np.asarray(slots, np.int64)
        if rows is None:
            graph = self._scatter_all
            binding = graph.io_binding()
            binding.bind_cpu_input("slots", slots.reshape(-1, 1))
        else:
            take = np.asarray(rows, np.int64)
            graph = self._scatter
            binding = graph.io_binding()
            binding.bind_cpu_input("slots", np.ascontiguousarray(slots[take].reshape(-1, 1)))
            binding.bind_cpu_input("rows", take)
        for j, s in enumerate(self._states):
            slab = self.slabs[s.input]
            value = states[s.input]
            binding.bind_ortvalue_input(f"slab_{j}", slab)
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(f"update_{j}", np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(f"update_{j}", value)
            # In place: ScatterND skips its copy of the input when output and input coincide.
            binding.bind_ortvalue_output(f"slab_out_{j}", slab)
        graph.run_with_iobinding(binding)


_ONNX_TYPES = {"float32": 1, "int32": 6, "int64": 7, "float16": 10, "float64": 11}


def _slab_info(j: int, state: StateConfig) -> ValueInfoProto:
    from onnx import helper

    return helper.make_tensor_value_info(
        f"slab_{j}", _ONNX_TYPES[state.dtype], ["slots", *state.session_shape]
    )


def _model_layout(name: str, state: StateConfig, batch: str) -> ValueInfoProto:
    from onnx import helper

    shape: list[int | str] = list(state.session_shape)
    shape.insert(state.batch_axis, batch)
    return helper.make_tensor_value_info(name, _ONNX_TYPES[state.dtype], shape)


def _finish(nodes: list, name: str, inputs: list, outputs: list) -> bytes:
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def _free_move(state: StateConfig) -> bool:
    """Whether moving the batch axis to or from the front is a reshape (every axis before it
    has extent 1, an ONNX ``(num_directions, batch, hidden)`` state): no copy, no kernel."""
    return all(d == 1 for d in state.session_shape[: state.batch_axis])


def _shape_constant(name: str, shape: list[int]) -> NodeProto:
    from onnx import TensorProto, helper

    value = helper.make_tensor(name, TensorProto.INT64, [len(shape)], shape)
    return helper.make_node("Constant", [], [name], value=value)


def _gather_graph(states: list[StateConfig]) -> bytes:
    """``rows_j = moveaxis(slab_j[slots], 0, batch_axis)`` for every pair j."""
    from onnx import TensorProto, helper

    nodes, inputs, outputs = (
        [],
        [helper.make_tensor_value_info("slots", TensorProto.INT64, ["n"])],
        [],
    )
    for j, s in enumerate(states):
        inputs.append(_slab_info(j, s))
        rank = len(s.shape)
        if s.batch_axis == 0:
            nodes.append(helper.make_node("Gather", [f"slab_{j}", "slots"], [f"rows_{j}"], axis=0))
            outputs.append(_model_layout(f"rows_{j}", s, "n"))
            continue
        nodes.append(helper.make_node("Gather", [f"slab_{j}", "slots"], [f"g_{j}"], axis=0))
        if _free_move(s):
            shape = list(s.session_shape)
            shape.insert(s.batch_axis, -1)
            nodes.append(_shape_constant(f"shape_{j}", shape))
            nodes.append(helper.make_node("Reshape", [f"g_{j}", f"shape_{j}"], [f"rows_{j}"]))
        else:
            perm = _from_batch_first(rank, s.batch_axis)
            nodes.append(helper.make_node("Transpose", [f"g_{j}"], [f"rows_{j}"], perm=perm))
        outputs.append(_model_layout(f"rows_{j}", s, "n"))
    return _finish(nodes, "rnnserve_gather", inputs, outputs)


def _scatter_graph(states: list[StateConfig], every_row: bool = False) -> bytes:
    """``slab_j[slots] = moveaxis(update_j, batch_axis, 0)[rows]``, written in place; with
    ``every_row``, ``slab_j[slots] = moveaxis(update_j, batch_axis, 0)`` (no ``rows`` input,
    no gather of the whole batch: the usual case)."""
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("slots", TensorProto.INT64, ["m", 1])]
    if not every_row:
        inputs.append(helper.make_tensor_value_info("rows", TensorProto.INT64, ["m"]))
    nodes, outputs = [], []
    for j, s in enumerate(states):
        inputs += [_slab_info(j, s), _model_layout(f"update_{j}", s, "n")]
        rank = len(s.shape)
        first = f"update_{j}"
        if s.batch_axis != 0:
            first = f"t_{j}"
            if _free_move(s):
                nodes.append(_shape_constant(f"shape_{j}", [-1, *s.session_shape]))
                nodes.append(helper.make_node("Reshape", [f"update_{j}", f"shape_{j}"], [first]))
            else:
                perm = to_batch_first(rank, s.batch_axis)
                nodes.append(helper.make_node("Transpose", [f"update_{j}"], [first], perm=perm))
        if every_row:
            value = first
        else:
            value = f"v_{j}"
            nodes.append(helper.make_node("Gather", [first, "rows"], [value], axis=0))
        nodes.append(
            helper.make_node("ScatterND", [f"slab_{j}", "slots", value], [f"slab_out_{j}"])
        )
        outputs.append(
            helper.make_tensor_value_info(
                f"slab_out_{j}", _ONNX_TYPES[s.dtype], ["slots", *s.session_shape]
            )
        )
    return _finish(nodes, "rnnserve_scatter", inputs, outputs)
