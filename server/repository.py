"""Loading a model repository: every model, every version, checked before serving.

Layout: ``<repo>/<model>/config.toml`` + ``<repo>/<model>/<version>/model.onnx`` with
positive integer versions. Anything wrong raises :class:`ConfigError` naming the file.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from . import errors
from .config import ModelConfig, load_model_config
from .errors import ConfigError, RnnserveError
from .runtime import (
    DeviceChoice,
    Runner,
    check_graph,
    choose_device,
    create_session,
    discard_profile,
    narrowed_to_graph,
    recurrent_placement,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelVersion:
    """One servable model version with its config and its ORT runner."""

    name: str
    version: str
    config: ModelConfig
    config_path: Path
    model_path: Path
    runner: Runner | None = None
    providers: tuple[str, ...] = ()  # what onnxruntime really runs it on (set at load)
    #: Where each node ran in the warm-up run (``"name:op"`` -> provider), set at load.
    placement: dict[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """``cuda`` when onnxruntime runs the session on CUDA, else ``cpu``."""
        return "cuda" if self.providers[:1] == ("CUDAExecutionProvider",) else "cpu"

    @property
    def recurrent_provider(self) -> str:
        """Where the recurrent nodes run: one provider, ``mixed``, or ``unknown``."""
        found = set(recurrent_placement(self.placement).values())
        if len(found) == 1:
            return found.pop()
        return "mixed" if found else "unknown"

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@dataclass
class Repository:
    """All loaded models: ``models[name]`` maps version strings to :class:`ModelVersion`."""

    root: Path
    models: dict[str, dict[str, ModelVersion]] = field(default_factory=dict)
    #: Keys (``model:version``) of loaded versions that take no new sessions (retiring).
    retiring: set[str] = field(default_factory=set)
    #: What sessions were created on at startup; versions loaded later use the same.
    device: DeviceChoice | None = None
    tf32: bool = False
    #: Versions retired and released while serving, by key, as they were (no onnxruntime
    #: session, no slabs): sessions parked on one are reported as such, and may be moved.
    released: dict[str, ModelVersion] = field(default_factory=dict)

    def versions(self, name: str) -> list[str]:
        return sorted(self.models.get(name, {}), key=int)

    def get(self, name: str, version: str = "") -> ModelVersion:
        """The named version (the highest not retiring when empty); NOT_FOUND otherwise."""
        version = canonical_version(version)
        by_version = self.models.get(name)
        if by_version is None:
            raise RnnserveError(
                grpc.StatusCode.NOT_FOUND, errors.MODEL_NOT_FOUND, f"no model named {name!r}"
            )
        if not version:
            ready = [v for v in self.versions(name) if f"{name}:{v}" not in self.retiring]
            if not ready:
                raise RnnserveError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    errors.VERSION_RETIRING,
                    f"every loaded version of model {name!r} is retiring",
                )
            version = ready[-1]
        found = by_version.get(version)
        if found is None:
            raise RnnserveError(
                grpc.StatusCode.NOT_FOUND,
                errors.VERSION_NOT_FOUND,
                f"model {name!r} has no version {version!r} (has {self.versions(name)})",
            )
        return found

    def for_new_work(self, name: str, version: str = "") -> ModelVersion:
        """Like :meth:`get`, but a retiring version is refused: it takes no new sessions."""
        found = self.get(name, version)
        if found.key in self.retiring:
            raise RnnserveError(
                grpc.StatusCode.FAILED_PRECONDITION,
                errors.VERSION_RETIRING,
                f"model {name!r} version {found.version} is retiring and takes no new sessions; "
                "open one without a version to get the newest ready one",
                metadata={"model": name, "version": found.version},
            )
        return found

    def all(self) -> list[ModelVersion]:
        return [self.models[n][v] for n in sorted(self.models) for v in self.versions(n)]

    def catalogue(self) -> Repository:
        """The same models without their onnxruntime sessions: what frontends are told."""
        return Repository(
            self.root,
            {
                name: {v: dataclasses.replace(mv, runner=None) for v, mv in by_version.items()}
                for name, by_version in self.models.items()
            },
            set(self.retiring),
            self.device,
            self.tf32,
        )

    def close(self) -> None:
        for mv in self.all():
            if mv.runner is not None:
                mv.runner.close()


def scan_repository(root: Path) -> Repository:
    """Read and check every config and find every version, without loading ONNX."""
    if not root.is_dir():
        raise ConfigError(f"{root}: model repository is not a directory")
    repo = Repository(root=root)
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        if model_dir.name.startswith("."):
            continue
        config_path = model_dir / "config.toml"
        config = load_model_config(config_path)
        versions: dict[str, ModelVersion] = {}
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if version_dir.name.startswith("."):  # being staged (copied, then renamed)
                continue
            if not version_dir.name.isdigit() or int(version_dir.name) < 1:
                raise ConfigError(
                    f"{version_dir}: version folders are positive integers, got "
                    f"{version_dir.name!r}"
                )
            model_path = version_dir / "model.onnx"
            if not model_path.is_file():
                raise ConfigError(f"{model_path}: missing model.onnx")
            version = str(int(version_dir.name))
            if version in versions:
                raise ConfigError(
                    f"{version_dir}: version {version} has two folders "
                    f"({versions[version].model_path.parent.name!r} too)"
                )
            versions[version] = ModelVersion(
                model_dir.name, version, config, config_path, model_path
            )
        if not versions:
            raise ConfigError(f"{model_dir}: no version folder with a model.onnx")
        repo.models[model_dir.name] = versions
    if not repo.models:
        raise ConfigError(f"{root}: no models (expected <model>/config.toml)")
    return repo


def canonical_version(version: str) -> str:
    """``version`` as the repository names it: its folder ``02`` is version ``2`` (leading
    zeros dropped), so every call that names a version, in either spelling, means that one."""
    return str(int(version)) if version.isascii() and version.isdigit() else version


def version_folder(model_dir: Path, version: str) -> Path:
    """The folder of ``version`` ("2"): its own name, or the number with leading zeros ("02")
    as startup reads it."""
    exact = model_dir / version
    if exact.is_dir() or not model_dir.is_dir():
        return exact
    for folder in model_dir.iterdir():
        if folder.name.isdigit() and int(folder.name) == int(version) and folder.is_dir():
            return folder
    return exact


def load_repository(root: Path, device: str = "auto", tf32: bool = False) -> Repository:
    """Scan, choose the device (``--device``), then create and check an ORT session for every
    version. ``device="cuda"`` raises :class:`ConfigError` when CUDA does not take; ``tf32``
    allows TF32 matmuls on CUDA (:func:`~.runtime.ort_providers`)."""
    repo = scan_repository(root)
    choice = choose_device(device)
    if choice.device == "cpu" and choice.requested == "auto":
        logger.warning("event=device device=cpu requested=auto reason=%r", choice.reason)
    else:
        logger.info(
            "event=device device=%s requested=%s reason=%r",
            choice.device,
            choice.requested,
            choice.reason,
        )
    repo.device = choice
    repo.tf32 = tf32
    for mv in repo.all():
        load_version(mv, choice, tf32)
    return repo


def load_version(mv: ModelVersion, choice: DeviceChoice, tf32: bool = False) -> None:
    """Create ``mv``'s onnxruntime session on ``choice``'s providers (TF32 matmuls on CUDA
    when ``tf32``) and check its graph against its config (:class:`ConfigError` naming file
    and field if they disagree)."""
    session = create_session(mv.model_path, choice.providers, choice.requested, tf32)
    try:
        check_graph(mv.config_path, mv.model_path, mv.config, session)
    except ConfigError:
        discard_profile(session)
        raise
    mv.config = narrowed_to_graph(mv.config, session)
    mv.runner = Runner(session, mv.key)
    mv.providers = tuple(mv.runner.providers)
    mv.placement = mv.runner.placement
    logger.info(
        "event=model_loaded model=%s version=%s providers=%s recurrent=%s",
        mv.name,
        mv.version,
        ",".join(mv.runner.providers),
        ",".join(f"{n}@{p}" for n, p in recurrent_placement(mv.placement).items()) or "none",
    )
