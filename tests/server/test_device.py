"""The device: which one the server chooses and says it chose, and the one run path on it.

Every batch runs through onnxruntime IOBinding with the state rows gathered from and scattered
to the slabs (host numpy slabs, or OrtValue slabs on the session's device, gathered and
scattered by onnxruntime itself). On CPU both must give exactly what the plain numpy path
gives (stack the rows, ``session.run``, write the new rows back), bit for bit, for every cell
kind over multi-step sessions; a failed run changes nothing; export, fork and snapshots carry
state exactly. The provider tests start real servers and read their logs; the ``gpu`` tests
run only where CUDA really works (``runtime.cuda_problem()`` is None).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from rnnserve.server.config import StateConfig
from rnnserve.server.engine.core import Engine, EngineConfig
from rnnserve.server.engine.slabs import DeviceSlabs, HostSlabs
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import ModelVersion, Repository, load_repository
from rnnserve.server.runtime import CUDA, cuda_problem
from rnnserve.testing import ServerProcess, build_test_repository, run_reference
from rnnserve.v1 import inference_service_pb2 as pb

from .helpers import Collector
from .test_failed_run import CONFIG as GATHER_CONFIG
from .test_failed_run import _model as gather_model

OWNER = "tester"
SLABS = ["host", "device"]
CUDA_PROBLEM = cuda_problem()
no_cuda = pytest.mark.skipif(CUDA_PROBLEM is None, reason="CUDA works here")


@pytest.fixture(scope="module")
def repo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(
        tmp_path_factory.mktemp("device-repo"),
        {"max_queue_delay_us": 20000, "max_sessions": 32},
    )


class NumpyPath:
    """Today's plain path, kept as the reference: numpy slabs, stacked rows, ``session.run``."""

    def __init__(self, mv: ModelVersion) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(mv.model_path), options, providers=["CPUExecutionProvider"]
        )
        self.config = mv.config
        self.states: dict[str, dict[str, np.ndarray]] = {}
        self.names = [o.name for o in mv.config.outputs] + [s.output for s in mv.config.states]

    def run(self, ids: list[str], inputs: list[dict[str, np.ndarray]]) -> list[dict]:
        config = self.config
        feeds = {
            spec.name: np.stack([x[spec.name] for x in inputs], spec.batch_axis)
            for spec in config.inputs
        }
        for s in config.states:
            rows = np.stack([self.states[sid][s.input] for sid in ids])
            feeds[s.input] = np.ascontiguousarray(np.moveaxis(rows, 0, s.batch_axis))
        values = self.session.run(self.names, feeds)
        n_out = len(config.outputs)
        for s, value in zip(config.states, values[n_out:], strict=True):
            for row, sid in enumerate(ids):
                self.states[sid][s.input] = np.take(value, row, axis=s.batch_axis).copy()
        return [
            {
                spec.name: np.take(value, row, axis=spec.batch_axis)
                for spec, value in zip(config.outputs, values[:n_out], strict=True)
            }
            for row in range(len(ids))
        ]


def _engine(repository: Repository, slabs: str, **config: object) -> Engine:
    return Engine(repository, Metrics(), EngineConfig(slabs=slabs, **config))  # type: ignore[arg-type]


def _state(mv: ModelVersion, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        s.input: rng.standard_normal(s.session_shape).astype(np.float32) for s in mv.config.states
    }


def _inputs(mv: ModelVersion, timesteps: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One session's random inputs of ``timesteps`` steps: floats, or token ids in range."""
    metadata = mv.config.metadata
    vocabulary = len(json.loads(metadata.get("vocabulary", "[0, 1]")))
    out = {}
    for spec in mv.config.inputs:
        shape = list(spec.session_shape)
        if spec.session_time_axis != -1:
            shape[spec.session_time_axis] = timesteps
        if spec.dtype.startswith("int"):
            out[spec.name] = rng.integers(0, vocabulary, shape).astype(spec.dtype)
        else:
            out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
    return out


async def _run_rounds(
    engine: Engine, mv: ModelVersion, sessions: int, rounds: tuple[int, ...], seed: int
) -> None:
    """Step ``sessions`` sessions of ``mv`` through rounds of T timesteps, all of a round in one
    batch, and check every output and the final states bit for bit against :class:`NumpyPath`."""
    reference = NumpyPath(mv)
    rng = np.random.default_rng(seed)
    ids = []
    for n in range(sessions):
        state = _state(mv, seed + n) if n % 2 else {}
        info = await engine.open_session(mv.name, mv.version, "", state, 0, OWNER)
        ids.append(info.session_id)
        reference.states[info.session_id] = {
            s.input: state.get(s.input, np.zeros(s.session_shape, np.float32))
            for s in mv.config.states
        }
    position = 0
    for timesteps in rounds:
        inputs = [_inputs(mv, timesteps, rng) for _ in ids]
        sink = Collector()
        engine.submit(
            [(n, sid, x, None, None) for n, (sid, x) in enumerate(zip(ids, inputs, strict=True))],
            OWNER,
            sink,
        )
        outcomes = sorted(await sink.wait_for(len(ids)), key=lambda o: o.ticket)
        want = reference.run(ids, inputs)
        position += timesteps
        for outcome, expected in zip(outcomes, want, strict=True):
            assert outcome.error is None, outcome.error
            assert outcome.position == position
            for name, value in expected.items():
                got = outcome.outputs[name][outcome.row]  # type: ignore[index]
                assert np.array_equal(got, value), f"{mv.key} {name} T={timesteps}"
    for sid in ids:
        _, exported = await engine.export_state(sid, OWNER)
        for name, value in reference.states[sid].items():
            assert np.array_equal(exported[name], value), f"{mv.key} state {name}"
    await engine.close_sessions(ids, OWNER)


@pytest.mark.parametrize("slabs", SLABS)
async def test_the_iobinding_path_is_bit_identical_to_session_run_for_every_cell(
    repo_path: Path, slabs: str
) -> None:
    repository = load_repository(repo_path, "cpu")
    engine = _engine(repository, slabs)
    await engine.start()
    try:
        kinds = set()
        for seed, mv in enumerate(repository.all()):
            memory = engine.store.slabs(mv).memory
            assert isinstance(memory, DeviceSlabs if slabs == "device" else HostSlabs)
            await _run_rounds(engine, mv, sessions=5, rounds=(1, 3, 2, 1), seed=100 * seed)
            kinds.add(mv.config.cell_kind)
        assert kinds == {"rnn", "lstm", "peephole_lstm", "gru", "gru_torch"}
    finally:
        await engine.stop()
        repository.close()


@pytest.mark.parametrize("slabs", SLABS)
async def test_the_trained_models_run_bit_identically_too(
    default_repository: Path, slabs: str
) -> None:
    """The default repository's trained models (RNNSERVE_TEST_REPOSITORY; `make test` sets it)."""
    repository = load_repository(default_repository, "cpu")
    engine = _engine(repository, slabs)
    await engine.start()
    try:
        for seed, mv in enumerate(repository.all()):
            await _run_rounds(engine, mv, sessions=4, rounds=(1, 5, 2), seed=1000 + seed)
    finally:
        await engine.stop()
        repository.close()


def test_auto_keeps_host_slabs_on_cpu(repo_path: Path) -> None:
    repository = load_repository(repo_path, "cpu")
    try:
        engine = _engine(repository, "auto")
        for mv in repository.all():
            assert isinstance(engine.store.slabs(mv).memory, HostSlabs)
    finally:
        repository.close()


@pytest.mark.parametrize("batch_axis", [0, 1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
# [1, 3] with the batch axis after the 1: the move to and from the slab's layout is a reshape
@pytest.mark.parametrize("extents", [[2, 3], [1, 3]])
def test_host_and_device_slabs_gather_and_scatter_alike(
    batch_axis: int, dtype: str, extents: list[int]
) -> None:
    shape = list(extents)
    shape.insert(batch_axis, -1)
    states = [
        StateConfig(input="a", output="a_out", dtype=dtype, shape=shape, batch_axis=batch_axis),
        StateConfig(input="b", output="b_out", dtype=dtype, shape=[-1, 5], batch_axis=0),
    ]
    config = SimpleNamespace(states=states)
    host = HostSlabs(config, 16)  # type: ignore[arg-type]
    device = DeviceSlabs(config, 16, "cpu", ["CPUExecutionProvider"])  # type: ignore[arg-type]
    rng = np.random.default_rng(batch_axis)

    def value(s: StateConfig, batch: int | None) -> np.ndarray:
        per = s.session_shape if batch is None else [batch if e == -1 else e for e in s.shape]
        return (rng.standard_normal(per) * 100).astype(dtype)

    for slot in range(0, 16, 3):
        row = {s.input: value(s, None) for s in states[: 1 + slot % 2]}  # "b" zeroed when missing
        host.write(slot, row)
        device.write(slot, row)
    slots = np.array([9, 0, 12, 3], np.intp)
    for rows in (None, np.array([0, 2, 3])):
        new = {s.input: value(s, len(slots)) for s in states}
        host.scatter(slots, rows, new)
        device.scatter(
            slots, rows, {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in new.items()}
        )
        gathered_host = host.gather(slots)
        gathered_device = device.gather(slots)
        for s in states:
            assert np.array_equal(gathered_host[s.input], gathered_device[s.input].numpy())
    for slot in range(16):
        a, b = host.read(slot), device.read(slot)
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), (slot, name)


@pytest.mark.parametrize("slabs", SLABS)
async def test_a_failed_run_changes_nothing(tmp_path: Path, slabs: str) -> None:
    (tmp_path / "gather_lstm" / "1").mkdir(parents=True)
    (tmp_path / "gather_lstm" / "1" / "model.onnx").write_bytes(gather_model())
    (tmp_path / "gather_lstm" / "config.toml").write_text(GATHER_CONFIG)
    repository = load_repository(tmp_path, "cpu")
    engine = _engine(repository, slabs)
    await engine.start()
    try:
        mv = repository.get("gather_lstm")
        start = {name: _state(mv, n)[name] for n, name in enumerate(("initial_h", "initial_c"))}
        a = (await engine.open_session("gather_lstm", "", "", start, 0, OWNER)).session_id
        b = (await engine.open_session("gather_lstm", "", "", start, 0, OWNER)).session_id
        x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
        sink = Collector()
        engine.submit(
            [
                (0, a, {"x": x, "idx": np.asarray(3, np.int64)}, None, None),
                (1, b, {"x": x, "idx": np.asarray(99, np.int64)}, None, None),  # out of range
            ],
            OWNER,
            sink,
        )
        ok, failed = sorted(await sink.wait_for(2), key=lambda o: o.ticket)
        assert ok.error is None and failed.error is not None
        assert failed.error.code == grpc.StatusCode.INTERNAL
        info, state_b = await engine.export_state(b, OWNER)
        assert info.position == 0
        for name, value in start.items():
            assert np.array_equal(state_b[name], value)
        want = run_reference(
            tmp_path, "gather_lstm", "1", {"x": x, "idx": np.asarray(3, np.int64)}, start
        )
        _, state_a = await engine.export_state(a, OWNER)
        for name in start:
            assert np.array_equal(state_a[name], want[name])
    finally:
        await engine.stop()
        repository.close()


@pytest.mark.parametrize("slabs", SLABS)
async def test_export_fork_and_snapshot_carry_state_exactly(
    repo_path: Path, tmp_path: Path, slabs: str
) -> None:
    snapshot = tmp_path / "sessions.snapshot"
    repository = load_repository(repo_path, "cpu")
    engine = _engine(repository, slabs, snapshot_path=snapshot)
    await engine.start()
    saved: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
    try:
        for n, mv in enumerate(repository.all()):
            given = _state(mv, 7 + n)
            sid = (await engine.open_session(mv.name, mv.version, "", given, 5, OWNER)).session_id
            _, exported = await engine.export_state(sid, OWNER)
            assert exported.keys() == given.keys()
            for name, value in given.items():
                assert np.array_equal(exported[name], value)
            sink = Collector()
            x = np.random.default_rng(n).standard_normal((3, 4)).astype(np.float32)
            engine.submit([(0, sid, {"x": x}, None, None)], OWNER, sink)
            (outcome,) = await sink.wait_for(1)
            assert outcome.error is None
            info, stepped = await engine.export_state(sid, OWNER)
            fork = await engine.fork_session(sid, "", OWNER)
            fork_info, forked = await engine.export_state(fork.session_id, OWNER)
            assert fork_info.position == info.position == 8
            for name, value in stepped.items():
                assert np.array_equal(forked[name], value)
                assert not np.array_equal(value, given[name])  # the step did change it
            saved[sid] = (info.position, stepped)
            saved[fork.session_id] = (info.position, stepped)
    finally:
        await engine.stop()  # writes the snapshot
        repository.close()
    repository = load_repository(repo_path, "cpu")
    engine = _engine(repository, slabs, snapshot_path=snapshot)
    await engine.start()  # restores it
    try:
        for sid, (position, state) in saved.items():
            info, restored = await engine.export_state(sid, OWNER)
            assert info.position == position
            for name, value in state.items():
                assert np.array_equal(restored[name], value)
    finally:
        await engine.stop()
        repository.close()


# -- the provider the server chooses, and says it chose ----------------------------------------
@no_cuda
def test_without_cuda_auto_falls_back_to_cpu_with_one_log_line(server) -> None:  # noqa: ANN001
    from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.address) as sync_channel:
        stub = pb_grpc.InferenceServiceStub(sync_channel)
        model = stub.GetModel(pb.GetModelRequest(name="tiny_peephole")).model
    log = server.stderr()
    lines = [line for line in log.splitlines() if "event=device " in line]
    assert len(lines) == 1, lines
    assert "device=cpu requested=auto reason=" in lines[0]
    assert str(CUDA_PROBLEM) in lines[0]
    # No loud errors from onnxruntime itself: CUDA was never requested.
    assert "Failed to create CUDAExecutionProvider" not in log
    assert "[E:onnxruntime" not in log
    assert list(model.providers) == ["CPUExecutionProvider"]
    assert model.metadata["rnnserve.device"] == "cpu"
    placement = json.loads(model.metadata["rnnserve.placement"])
    assert placement == {"LSTM_0:LSTM": "CPUExecutionProvider"}
    assert model.metadata["test"] == "peephole_lstm"  # the config's own metadata is kept
    assert (
        server.metric(
            "rnnserve_model_info",
            model="tiny_lstm",
            device="cpu",
            provider="CPUExecutionProvider",
            recurrent_provider="CPUExecutionProvider",
        )
        == 2  # versions 1 and 2
    )
    loaded = [line for line in log.splitlines() if "event=model_loaded model=tiny_gru " in line]
    assert len(loaded) == 1 and "recurrent=GRU_0:GRU@CPUExecutionProvider" in loaded[0]


@no_cuda
@pytest.mark.parametrize("frontends", ["1", "2"])
def test_device_cuda_without_cuda_refuses_to_start(test_repository: Path, frontends: str) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve.server", "serve",
            "--repository", str(test_repository), "--port", "0", "--metrics-port", "-1",
            "--device", "cuda", "--frontends", frontends,
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "rnnserve: cannot serve: --device cuda: CUDA is not usable here:" in done.stderr
    assert str(CUDA_PROBLEM) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_device_the_server_does_not_know_is_refused(test_repository: Path) -> None:
    done = subprocess.run(
        [
            sys.executable, "-m", "rnnserve.server", "serve",
            "--repository", str(test_repository), "--device", "gpu", "--slabs", "disk",
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--device must be one of auto, cuda, cpu, got 'gpu'" in done.stderr
    assert "--slabs must be one of auto, host, device, got 'disk'" in done.stderr


def test_device_cpu_says_so_and_serves_on_device_slabs(test_repository: Path) -> None:
    from rnnserve.v1 import inference_service_pb2_grpc as pb_grpc

    with ServerProcess(test_repository, "--device", "cpu", "--slabs", "device") as process:
        with grpc.insecure_channel(process.address) as sync_channel:
            stub = pb_grpc.InferenceServiceStub(sync_channel)
            sid = stub.OpenSession(pb.OpenSessionRequest(model="tiny_gru")).session.session_id
            x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
            from rnnserve.server.frontend.tensors import from_array, to_array

            reply = stub.Step(pb.StepRequest(session_id=sid, inputs={"x": from_array(x)}))
            state = stub.ExportState(pb.ExportStateRequest(session_id=sid))
        log = process.stderr()
    want = run_reference(test_repository, "tiny_gru", "", {"x": x})
    assert np.array_equal(to_array(reply.outputs["Y"], "Y"), want["Y"])
    assert np.array_equal(to_array(state.state["initial_h"], "initial_h"), want["initial_h"])
    lines = [line for line in log.splitlines() if "event=device " in line]
    assert len(lines) == 1 and "device=cpu requested=cpu" in lines[0]


def test_cuda_runs_exact_fp32_unless_tf32_is_asked_for() -> None:
    """TF32 would make a session's numbers depend on who else is in its batch: off by default."""
    from rnnserve.server.runtime import CPU, ort_providers

    assert ort_providers((CUDA, CPU)) == [(CUDA, {"use_tf32": "0"}), CPU]
    assert ort_providers((CUDA, CPU), tf32=True) == [(CUDA, {"use_tf32": "1"}), CPU]
    assert ort_providers((CPU,), tf32=True) == [CPU]


# -- on a GPU ----------------------------------------------------------------------------------
gpu_only = pytest.mark.skipif(CUDA_PROBLEM is not None, reason=f"no CUDA: {CUDA_PROBLEM}")


@pytest.mark.gpu
@gpu_only
def test_the_served_cuda_session_has_tf32_off_and_batches_do_not_move_a_sessions_numbers(
    repo_path: Path, tmp_path: Path
) -> None:
    """With exact FP32 a session's row is (nearly) the same alone and in a crowd of 64."""
    import shutil

    shutil.copytree(repo_path / "tiny_lstm", tmp_path / "tiny_lstm")
    repository = load_repository(tmp_path, "cuda")
    try:
        mv = repository.get("tiny_lstm")
        session = mv.runner.session
        assert session.get_provider_options()[CUDA]["use_tf32"] == "0"
        rng = np.random.default_rng(0)
        feeds, axes = {}, {}
        for name, shape, batch_axis, time_axis in [
            *((t.name, t.shape, t.batch_axis, t.time_axis) for t in mv.config.inputs),
            *((s.input, s.shape, s.batch_axis, -1) for s in mv.config.states),
        ]:
            dims = [64 if a == batch_axis else 3 if a == time_axis else d
                    for a, d in enumerate(shape)]  # fmt: skip
            feeds[name] = rng.standard_normal(dims).astype(np.float32)
            axes[name] = batch_axis
        crowd = session.run(None, feeds)
        alone = session.run(None, {k: np.take(v, [3], axis=axes[k]) for k, v in feeds.items()})
        out_axes = [t.batch_axis for t in mv.config.outputs] + [
            s.batch_axis for s in mv.config.states
        ]
        for a, c, axis in zip(alone, crowd, out_axes, strict=True):
            assert np.abs(a - np.take(c, [3], axis=axis)).max() < 1e-5
    finally:
        repository.close()


@pytest.mark.gpu
@gpu_only
def test_cuda_is_really_used_and_node_placement_is_reported(repo_path: Path) -> None:
    """Every test model on CUDA, one by one (a model onnxruntime cannot put there is reported,
    not hidden behind the first failure); where each node ran is printed and saved."""
    from rnnserve.server.repository import scan_repository
    from rnnserve.server.runtime import CPU, Runner, create_session, recurrent_placement

    report: dict[str, dict[str, object]] = {}
    for mv in scan_repository(repo_path).all():
        try:
            runner = Runner(create_session(mv.model_path, (CUDA, CPU), "cuda"), mv.key)
        except Exception as exc:  # noqa: BLE001 - a finding to report, asserted below
            report[mv.key] = {"cell": mv.config.cell_kind, "error": str(exc)}
            continue
        report[mv.key] = {
            "cell": mv.config.cell_kind,
            "providers": runner.providers,
            "placement": runner.placement,
            "recurrent": recurrent_placement(runner.placement),
        }
        runner.close()
    print(json.dumps(report, indent=1))  # the placement table in the GPU check's log
    target = os.environ.get("RNNSERVE_GPU_REPORT")
    if target:
        Path(target).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    for key, entry in report.items():
        assert "error" not in entry, (key, entry)
        assert entry["providers"][0] == CUDA, (key, entry)  # type: ignore[index]
        assert entry["placement"], key  # every model says where its nodes ran
    assert set(report["tiny_lstm:2"]["recurrent"].values()) == {CUDA}  # type: ignore[union-attr]


@pytest.mark.gpu
@gpu_only
def test_auto_slabs_follow_where_the_recurrent_nodes_run(repo_path: Path, tmp_path: Path) -> None:
    """On CUDA, device slabs for a cuDNN cell; host slabs for one cuDNN lacks (peephole)."""
    import shutil

    from rnnserve.server.engine.store import state_memory

    for name in ("tiny_lstm", "tiny_peephole"):
        shutil.copytree(repo_path / name, tmp_path / name)
    repository = load_repository(tmp_path, "cuda")
    try:
        assert state_memory(repository.get("tiny_lstm")).device == "cuda"
        peephole = repository.get("tiny_peephole")
        assert peephole.recurrent_provider == "CPUExecutionProvider"
        assert state_memory(peephole).device == "cpu"
    finally:
        repository.close()


@pytest.mark.gpu
@gpu_only
async def test_device_slabs_on_cuda_match_host_slabs_bit_for_bit(
    repo_path: Path, tmp_path: Path
) -> None:
    import shutil

    shutil.copytree(repo_path / "tiny_lstm", tmp_path / "tiny_lstm")
    results = {}
    for slabs in SLABS:
        repository = load_repository(tmp_path, "cuda")
        engine = _engine(repository, slabs)
        await engine.start()
        try:
            mv = repository.get("tiny_lstm")
            memory = engine.store.slabs(mv).memory
            assert memory.device == ("cuda" if slabs == "device" else "cpu")
            ids = [
                (await engine.open_session("tiny_lstm", "", "", _state(mv, n), 0, OWNER)).session_id
                for n in range(8)
            ]
            rng = np.random.default_rng(0)
            opened = getattr(memory, "host_bytes", 0)
            for timesteps in (1, 4, 1):
                sink = Collector()
                engine.submit(
                    [
                        (n, sid, {"x": rng.standard_normal((timesteps, 4)).astype(np.float32)},
                         None, None)
                        for n, sid in enumerate(ids)
                    ],
                    OWNER,
                    sink,
                )  # fmt: skip
                assert all(o.error is None for o in await sink.wait_for(len(ids)))
            if slabs == "device":  # steps copy no state between host and device
                assert memory.host_bytes == opened > 0  # type: ignore[union-attr]
            results[slabs] = [(await engine.export_state(sid, OWNER))[1] for sid in ids]
        finally:
            await engine.stop()
            repository.close()
    for host, device in zip(results["host"], results["device"], strict=True):
        for name in host:
            assert np.array_equal(host[name], device[name])
