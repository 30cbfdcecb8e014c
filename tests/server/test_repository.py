"""Loading a model repository: good ones load, bad ones fail naming the file and field."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from rnnserve.server.errors import ConfigError
from rnnserve.server.repository import load_repository
from rnnserve.testing import TEST_MODELS, build_test_repository


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("repo"))


def _copy(built: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(built, tmp_path / "repo"))


def test_every_model_and_version_loads(built: Path) -> None:
    repo = load_repository(built)
    try:
        assert sorted(repo.models) == sorted(TEST_MODELS)
        assert repo.versions("tiny_lstm") == ["1", "2"]
        assert repo.get("tiny_lstm").version == "2"
        lstm = repo.get("tiny_lstm", "1").config
        assert [s.input for s in lstm.states] == ["initial_c", "initial_h"]
        assert repo.get("tiny_rnn").runner is not None
        assert repo.get("tiny_rnn").runner.providers[-1] == "CPUExecutionProvider"
    finally:
        repo.close()


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ('dtype = "float32"', 'dtype = "float33"', "field inputs[0].dtype"),
        ("batch_axis = 1\ntime_axis = 0", "batch_axis = 7\ntime_axis = 0", "field inputs[0]"),
        ('name = "x"', 'name = "nope"', "field inputs[0].name"),
        ('output = "Y_h"', 'output = "Y_hh"', "field states[0].output"),
        ("[limits]", "[limits]\nmax_batch_size = 0", "field limits.max_batch_size"),
        ("[limits]", "[limits]\nunknown_knob = 1", "field limits.unknown_knob"),
        ("shape = [1, -1, 6]", "shape = [1, -1, 9]", "field states[0].input"),
        ('cell_kind = "rnn"', "cell_kind = ", "not valid TOML"),
    ],
)
def test_bad_config_names_file_and_field(
    built: Path, tmp_path: Path, old: str, new: str, needle: str
) -> None:
    repo = _copy(built, tmp_path)
    config = repo / "tiny_rnn" / "config.toml"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load_repository(repo).close()
    assert str(config) in str(info.value)
    assert needle in str(info.value)


def test_bad_model_and_layout_fail_naming_the_file(built: Path, tmp_path: Path) -> None:
    repo = _copy(built, tmp_path)
    model = repo / "tiny_gru" / "1" / "model.onnx"
    model.write_bytes(b"not an onnx model")
    with pytest.raises(ConfigError, match=str(model)):
        load_repository(repo).close()
    model.unlink()
    with pytest.raises(ConfigError, match="missing model.onnx"):
        load_repository(repo).close()
    (repo / "tiny_gru" / "1").rmdir()
    (repo / "tiny_gru" / "v1").mkdir()
    with pytest.raises(ConfigError, match="positive integers"):
        load_repository(repo).close()
