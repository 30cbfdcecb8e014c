"""The docs name what the code has: every ``rnnserve serve`` flag, metric, error reason and
environment variable is documented, every flag the docs and deployments pass exists, and the
config defaults docs/model-repository.md shows are the schema's. Cheap (no server, no model),
so a rename or a new option cannot leave the docs behind unnoticed."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import typer

pytest.importorskip("prometheus_client")

from rnnserve.server.config import Limits  # noqa: E402
from rnnserve.server.metrics import Metrics  # noqa: E402
from rnnserve.v1 import error_reason_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "SECURITY.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text(*paths: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in paths)


def _mentions(text: str, flag: str) -> bool:
    return re.search(re.escape(flag) + r"(?![\w-])", text) is not None


def _cli() -> typer.core.TyperGroup:
    from rnnserve.server import cli

    app = typer.Typer()
    for name in cli._COMMAND_MODULES:
        try:
            module = __import__(name, fromlist=["register"])
        except ModuleNotFoundError:
            continue  # a part not installed here (e.g. torch for train/export)
        module.register(app)
    return typer.main.get_command(app)  # type: ignore[return-value]


def _options(command: object) -> set[str]:
    return {
        o
        for p in command.params  # type: ignore[attr-defined]
        for o in (*p.opts, *p.secondary_opts)
        if o.startswith("--")
    }


def test_every_serve_flag_is_documented() -> None:
    serve = _cli().commands["serve"]  # type: ignore[attr-defined]
    docs = _text(*DOCS)
    missing = [
        p.opts[-1]
        for p in serve.params
        if p.opts[-1].startswith("--") and p.name != "help" and not _mentions(docs, p.opts[-1])
    ]
    assert not missing, f"`rnnserve serve` flags in no doc (README, SECURITY.md, docs/): {missing}"


def _code_lines(text: str) -> list[str]:
    """Command lines of the fenced code blocks, continuation lines joined, comments cut."""
    lines: list[str] = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        for line in block.replace("\\\n", " ").splitlines():
            lines.append(line.split(" #", 1)[0].strip())
    return lines


def test_flags_in_doc_commands_exist() -> None:
    root = _cli()
    wrong = []
    for line in _code_lines(_text(*DOCS)):
        if not line.startswith("rnnserve "):
            continue
        words = line.split()[1:]
        command: object = root
        while words and words[0] in getattr(command, "commands", {}):
            command = command.commands[words.pop(0)]  # type: ignore[attr-defined]
        if command is root:
            continue
        known = _options(command)
        wrong += [f"{line!r}: {w}" for w in re.findall(r"--[a-z][\w-]*", line) if w not in known]
    assert not wrong, "flags the docs' commands pass that do not exist:\n" + "\n".join(wrong)


def test_flags_the_deployments_pass_exist() -> None:
    known = _options(_cli().commands["serve"])  # type: ignore[attr-defined]
    files = [ROOT / "Dockerfile", *ROOT.glob("docker-compose*.yml"), *ROOT.glob("deploy/**/*.y*ml")]
    seen, wrong = 0, []
    for path in files:
        for args in re.findall(r'\[\s*"serve",(.*?)\]', path.read_text(), re.DOTALL):
            seen += 1
            for flag in re.findall(r'"(--[\w-]+)"', args):
                if flag not in known:
                    wrong.append(f"{path.relative_to(ROOT)}: {flag}")
    assert seen >= 3  # Dockerfile, compose, Kubernetes
    assert not wrong, f"flags passed to `rnnserve serve` that it does not have: {wrong}"


def _metric_names() -> list[str]:
    names = []
    for family in Metrics().registry.collect():
        names.append(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_every_metric_is_documented() -> None:
    server_md = (ROOT / "docs" / "server.md").read_text()
    section = server_md.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    readme = (ROOT / "README.md").read_text()
    names = _metric_names()
    assert len(names) >= 18
    for name in names:
        short = name.removeprefix("rnnserve_")
        assert re.search(rf"`{short}[`{{]", section), f"{name} is not in docs/server.md, Metrics"
        assert f"`{name}`" in readme, f"{name} is not in the README's metrics table"
    documented = set(re.findall(r"`(rnnserve_[a-z_]+)`", _text(*DOCS)))
    gone = {n for n in documented if n not in names and n != "rnnserve_"}
    assert not gone, f"metrics the docs name that the server does not export: {sorted(gone)}"


def test_every_error_reason_is_documented() -> None:
    section = (ROOT / "docs" / "server.md").read_text().split("## Error reasons", 1)[1]
    section = section.split("\n## ", 1)[0]
    for reason in error_reason_pb2.ErrorReason.keys():
        if reason != "ERROR_REASON_UNSPECIFIED":
            assert f"`{reason}`" in section, f"{reason} is not in docs/server.md, Error reasons"


def test_environment_variables_are_documented() -> None:
    from rnnserve.server import admin_commands, multiprocess
    from rnnserve.server.engine import signing
    from rnnserve.server.frontend import security

    docs = _text(*DOCS)
    for name in (
        security.TOKENS_ENV,
        signing.KEY_ENV,
        admin_commands.TOKEN_ENV,
        multiprocess.METRICS_DIR_ENV,
    ):
        assert name in docs, f"env {name} is read by the server or CLI but in no doc"


def test_config_defaults_shown_are_the_schemas() -> None:
    text = (ROOT / "docs" / "model-repository.md").read_text()
    block = next(b for b in re.findall(r"```toml\n(.*?)```", text, re.DOTALL) if "[limits]" in b)
    shown = tomllib.loads(block)["limits"]
    defaults = Limits()
    assert set(shown) == set(Limits.model_fields), "docs/model-repository.md [limits] fields"
    for field, value in shown.items():
        busy = field == "busy_queue_delay_us"  # shown as its default, 4 x max_queue_delay_us
        real = defaults.busy_delay_us if busy else getattr(defaults, field)
        assert value == real, f"[limits] {field}: docs say {value}, the default is {real}"


def test_prose_defaults_are_the_flags() -> None:
    """The defaults SECURITY.md's limits table and docs/server.md quote for serve's flags."""
    serve = _cli().commands["serve"]  # type: ignore[attr-defined]
    default = {p.opts[-1]: p.default for p in serve.params}
    table = (ROOT / "SECURITY.md").read_text()
    quoted = re.findall(r"`(--[\w-]+)` \(([\d,.]+)(?: per frontend)?[:)]", table)
    assert len(quoted) >= 8
    for flag, shown in quoted:
        assert float(shown.replace(",", "")) == default[flag], f"SECURITY.md: {flag} ({shown})"
    mib = {"--bytes-per-identity": 256, "--unsent-bytes-per-stream": 64}
    for flag, size in mib.items():
        assert default[flag] == size << 20
        for doc in ("SECURITY.md", "docs/server.md"):
            assert f"`{flag}` ({size} MiB" in (ROOT / doc).read_text(), f"{doc}: {flag}"
    assert f"`--busy-poll-us`, default {default['--busy-poll-us']}" in _text(*DOCS)
