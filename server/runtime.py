"""onnxruntime sessions: choosing the device, checking the graph against the config, running.

The device (``rnnserve serve --device auto|cuda|cpu``) is decided once per server from what
really works, never from what is merely installed: the CUDA and cuDNN libraries are loaded the
way onnxruntime documents (:func:`onnxruntime.preload_dlls`, which finds the ``nvidia-*``
wheels), the CUDA provider's own library must then load, and a driver must report a device.
Only then is CUDA requested, and a session is on CUDA only if ``session.get_providers()``
says so. ``auto`` falls back to CPU with one log line saying why (without onnxruntime's own
loud errors: CUDA is not even requested when it cannot load); ``cuda`` refuses to start.

Where each node of a model runs is read from one profiled warm-up run (the profile names every
kernel's provider): cuDNN has no peephole LSTM, so a peephole model's LSTM may run on the CPU
inside a CUDA session. It is logged, served in ``GetModel`` and exported as a metric.

With state in device memory a batch runs through IOBinding (:meth:`Runner.run_bound`):
client inputs are bound from host arrays, state inputs from the slabs' rows on the session's
device, client outputs come back to the host and state outputs stay on the device for the
slabs' scatter. The same code runs on CPU ``OrtValue``s (``--slabs device``), so the tests
cover the path a GPU takes. With host slabs on CPU a plain ``session.run`` (:meth:`Runner.run`)
is used: binding tensor by tensor measured slower there (docs/server.md). Each model version
gets one executor thread, so runs of one model never contend with each other.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .config import ModelConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

DEVICES = ("auto", "cuda", "cpu")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_PROFILE_PREFIX = "rnnserve-profile-"
#: Operators whose placement is reported (the recurrent cells).
RECURRENT_OPS = frozenset({"RNN", "LSTM", "GRU"})

_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
}


@dataclass(frozen=True)
class DeviceChoice:
    """What sessions are requested on, and why (the one log line)."""

    requested: str  # auto | cuda | cpu: the --device flag
    device: str  # cuda | cpu: where sessions are asked to run
    providers: tuple[str, ...]
    reason: str


def cuda_problem() -> str | None:
    """Why CUDA cannot work in this process, or None if it may (the session has the last word).

    Loads the CUDA/cuDNN libraries first (``onnxruntime.preload_dlls``, its report kept out of
    stdout), then the CUDA provider's own library, whose loader names the first missing
    dependency, then asks the driver for a device.
    """
    if CUDA not in ort.get_available_providers():
        return f"this onnxruntime build ({ort.__version__}) has no CUDA provider"
    problem = _load_cuda_provider(None)
    if problem is not None:
        # onnxruntime looks for the nvidia-* wheels next to itself; they may be installed
        # elsewhere on sys.path (onnxruntime in a --target folder, CUDA with torch).
        for folder in _nvidia_lib_folders():
            if _load_cuda_provider(folder) is None:
                problem = None
                break
    if problem is not None:
        return problem
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"no NVIDIA driver ({_first_line(exc)})"
    count = ctypes.c_int(0)
    status = driver.cuInit(0)
    if status == 0:
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"the NVIDIA driver reports error {status} (cuInit/cuDeviceGetCount)"
    if count.value < 1:
        return "the NVIDIA driver sees no CUDA device"
    return None


def _load_cuda_provider(folder: Path | None) -> str | None:
    """Preload CUDA/cuDNN (from ``folder``, or where onnxruntime looks), then load the CUDA
    provider's library; why it does not load, or None."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        report = io.StringIO()
        with contextlib.redirect_stdout(report):
            try:
                if folder is None:
                    preload()
                else:
                    cuda = folder.parent.name != "cudnn"
                    preload(cuda=cuda, cudnn=not cuda, directory=str(folder))
            except Exception as exc:  # noqa: BLE001 - best effort; the load below decides
                logger.debug("event=preload_dlls_failed folder=%s error=%r", folder, exc)
        logger.debug("event=preload_dlls folder=%s report=%r", folder, report.getvalue())
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return f"the CUDA provider does not load ({_first_line(exc)})"
    return None


def _nvidia_lib_folders() -> list[Path]:
    """``nvidia/<package>/lib`` folders of the NVIDIA wheels anywhere on sys.path, cuDNN last
    (it needs the CUDA libraries loaded first)."""
    import sys

    found: list[Path] = []
    for entry in sys.path:
        root = Path(entry or ".") / "nvidia"
        if root.is_dir():
            found += [lib for lib in sorted(root.glob("*/lib")) if lib.is_dir()]
    return sorted(dict.fromkeys(found), key=lambda lib: lib.parent.name == "cudnn")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def choose_device(requested: str = "auto") -> DeviceChoice:
    """The device for every session of this server; ``--device cuda`` without CUDA raises
    :class:`ConfigError` naming the flag and the reason."""
    if requested not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {requested!r}")
    if requested == "cpu":
        return DeviceChoice(requested, "cpu", (CPU,), "--device cpu")
    problem = cuda_problem()
    if problem is None:
        return DeviceChoice(requested, "cuda", (CUDA, CPU), "CUDA libraries and a device found")
    if requested == "cuda":
        raise ConfigError(
            f"--device cuda: CUDA is not usable here: {problem} "
            "(install onnxruntime-gpu with the CUDA 13 / cuDNN 9 libraries, or use --device auto)"
        )
    return DeviceChoice(requested, "cpu", (CPU,), problem)


def choose_providers() -> tuple[list[str], str]:
    """The providers ``--device auto`` requests, and why (for tools that run ORT directly)."""
    choice = choose_device("auto")
    return list(choice.providers), choice.reason


def create_session(
    model_path: Path, providers: tuple[str, ...] | list[str], requested: str = "auto"
) -> ort.InferenceSession:
    """An ORT session on ``providers``; with ``requested == "cuda"`` it must really be on CUDA.

    Profiling is on for the first run only (:func:`node_placement` reads and ends it).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    options.enable_profiling = True
    profiles = Path(tempfile.mkdtemp(prefix=_PROFILE_PREFIX))
    options.profile_file_prefix = str(profiles / "run")
    try:
        session = ort.InferenceSession(str(model_path), options, providers=list(providers))
    except Exception as exc:  # onnxruntime raises its own untyped errors
        shutil.rmtree(profiles, ignore_errors=True)
        raise ConfigError(f"{model_path}: onnxruntime cannot load the model: {exc}") from None
    got = session.get_providers()
    if providers[0] == CUDA and got[0] != CUDA:
        if requested == "cuda":
            session.end_profiling()
            shutil.rmtree(profiles, ignore_errors=True)
            raise ConfigError(
                f"--device cuda: onnxruntime did not put {model_path} on CUDA "
                f"(session providers: {', '.join(got)})"
            )
        logger.warning(
            "event=device model=%s device=cpu reason=%r",
            model_path,
            "the CUDA provider did not take (session providers: " + ", ".join(got) + ")",
        )
    return session


def node_placement(session: ort.InferenceSession) -> dict[str, str]:
    """Node -> provider for every node that ran, from one profiled warm-up run.

    The run feeds zeros shaped by the graph (every symbolic axis 1). Ends the profiling the
    session was created with; empty (and logged) if the graph cannot run on zeros.
    """
    feeds: dict[str, np.ndarray] = {}
    for spec in session.get_inputs():
        dtype = _ORT_TYPES.get(spec.type)
        shape = [d if isinstance(d, int) and d > 0 else 1 for d in spec.shape]
        if dtype is None:
            break
        feeds[spec.name] = np.zeros(shape, dtype)
    placement: dict[str, str] = {}
    try:
        if len(feeds) == len(session.get_inputs()):
            session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - placement is a report, never a reason to fail
        logger.warning("event=placement_unknown error=%r", _first_line(exc))
    finally:
        profile = Path(session.end_profiling())
    try:
        events = json.loads(profile.read_text(encoding="utf-8")) if profile.is_file() else []
    finally:
        _remove_profile(profile)
    for event in events:
        args = event.get("args") or {}
        if event.get("cat") == "Node" and "provider" in args:
            node = event.get("name", "").removesuffix("_kernel_time")
            placement[f"{node}:{args.get('op_name', '?')}"] = args["provider"]
    return placement


def discard_profile(session: ort.InferenceSession) -> None:
    """End and delete the profile of a session that will not be used (a failed check)."""
    _remove_profile(Path(session.end_profiling()))


def _remove_profile(profile: Path) -> None:
    if profile.parent.name.startswith(_PROFILE_PREFIX):  # the folder create_session made
        shutil.rmtree(profile.parent, ignore_errors=True)
    else:
        profile.unlink(missing_ok=True)


def recurrent_placement(placement: dict[str, str]) -> dict[str, str]:
    """The recurrent nodes of a placement (``name:op`` -> provider)."""
    return {node: p for node, p in placement.items() if node.rpartition(":")[2] in RECURRENT_OPS}


def check_graph(
    config_path: Path, model_path: Path, config: ModelConfig, session: ort.InferenceSession
) -> None:
    """Every declared name must exist in the graph with the declared dtype and rank."""
    graph_inputs = {i.name: i for i in session.get_inputs()}
    graph_outputs = {o.name: o for o in session.get_outputs()}
    declared: list[tuple[str, str, str, list[int], dict]] = []
    for n, t in enumerate(config.inputs):
        declared.append((f"inputs[{n}].name", t.name, t.dtype, t.shape, graph_inputs))
    for n, t in enumerate(config.outputs):
        declared.append((f"outputs[{n}].name", t.name, t.dtype, t.shape, graph_outputs))
    for n, s in enumerate(config.states):
        declared.append((f"states[{n}].input", s.input, s.dtype, s.shape, graph_inputs))
        declared.append((f"states[{n}].output", s.output, s.dtype, s.shape, graph_outputs))
    for field, name, dtype, shape, graph in declared:
        if name not in graph:
            raise ConfigError(
                f"{config_path}: field {field}: {name!r} is not in {model_path.name} "
                f"(graph has {sorted(graph)})"
            )
        node = graph[name]
        if _ORT_TYPES.get(node.type) != dtype:
            raise ConfigError(
                f"{config_path}: field {field}: {name!r} is {node.type} in the graph, "
                f"config says {dtype}"
            )
        if len(node.shape) != len(shape):
            raise ConfigError(
                f"{config_path}: field {field}: {name!r} has rank {len(node.shape)} in the "
                f"graph, config shape {shape} has rank {len(shape)}"
            )
        for axis, (g, c) in enumerate(zip(node.shape, shape, strict=True)):
            if isinstance(g, int) and c != -1 and g != c:
                raise ConfigError(
                    f"{config_path}: field {field}: {name!r} axis {axis} is {g} in the graph, "
                    f"config says {c}"
                )
    required = {name for name, i in graph_inputs.items()}
    missing = required - {d[1] for d in declared if d[4] is graph_inputs}
    if missing:
        raise ConfigError(
            f"{config_path}: field inputs: graph inputs {sorted(missing)} are not declared"
        )


class Runner:
    """Runs one model version's ORT session on its own worker thread.

    ``device`` is where the session keeps tensors it is handed or returns on the device side
    (``"cuda"`` or ``"cpu"``): state rows are bound there, state outputs are left there.
    """

    def __init__(self, session: ort.InferenceSession, name: str) -> None:
        self.session = session
        self.providers: list[str] = list(session.get_providers())
        self.device = "cuda" if self.providers[0] == CUDA else "cpu"
        self.placement: dict[str, str] = node_placement(session)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One blocking ``session.run``: host arrays in, host arrays out. The path of host
        slabs on CPU (measured faster there than binding each tensor, docs/server.md) and of
        Predict."""
        return self.session.run(output_names, feeds)

    def run_bound(
        self,
        host_feeds: dict[str, np.ndarray],
        device_feeds: dict[str, ort.OrtValue | np.ndarray],
        host_outputs: list[str],
        device_outputs: list[str],
    ) -> tuple[list[np.ndarray], list[ort.OrtValue]]:
        """One blocking run through IOBinding: ``host_outputs`` as host arrays,
        ``device_outputs`` as OrtValues on :attr:`device` (the path of device slabs).

        Host feeds are copied to the device by onnxruntime (once); device feeds are bound as
        they are. Host outputs are allocated by onnxruntime on the host; on CPU the array
        shares the OrtValue's memory, which stays alive as long as the array does.
        """
        binding = self.session.io_binding()
        for name, value in host_feeds.items():
            binding.bind_cpu_input(name, value)
        for name, value in device_feeds.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in host_outputs:
            binding.bind_output(name, "cpu")
        for name in device_outputs:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        n = len(host_outputs)
        return [values[i].numpy() for i in range(n)], [values[i] for i in range(n, len(values))]

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
