"""Training data that is already on the machine: nothing is downloaded, nothing is copied in.

- Text: the Python standard library's own source files, read at run time from this
  interpreter's ``stdlib`` folder, in sorted file order so the corpus is reproducible.
- Series: the yearly sunspot numbers 1700-2008 that ship inside ``statsmodels``.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Newline plus printable ASCII: a fixed vocabulary, so models do not depend on the corpus.
VOCABULARY: tuple[str, ...] = ("\n", *(chr(c) for c in range(32, 127)))
_INDEX = {ch: i for i, ch in enumerate(VOCABULARY)}
_UNKNOWN = _INDEX["?"]


def encode(text: str) -> np.ndarray:
    """Token ids; tabs become a space, anything outside the vocabulary becomes ``?``."""
    return np.fromiter(
        (_INDEX.get(" " if ch == "\t" else ch, _UNKNOWN) for ch in text), dtype=np.int64
    )


def decode(tokens: np.ndarray) -> str:
    return "".join(VOCABULARY[int(t)] for t in tokens)


@dataclass(frozen=True)
class Corpus:
    tokens: np.ndarray
    files: int
    source: str

    def split(self, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Training and held-out token streams; held-out is the corpus's tail."""
        cut = int(len(self.tokens) * (1 - heldout_fraction))
        return self.tokens[:cut], self.tokens[cut:]


def stdlib_corpus(max_chars: int = 2_000_000, min_chars: int = 100_000) -> Corpus:
    """The standard library's top-level ``*.py`` files, concatenated up to ``max_chars``."""
    folder = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = files = 0
    for path in sorted(folder.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        total += len(text)
        files += 1
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if len(corpus) < min_chars:
        raise RuntimeError(
            f"{folder}: only {len(corpus)} characters of Python source found; "
            f"the language model needs at least {min_chars}"
        )
    return Corpus(encode(corpus), files, str(folder))


def unigram_entropy_bits(train: np.ndarray, heldout: np.ndarray, vocab: int) -> float:
    """Bits per character of the best context-free model: training frequencies, add-one smoothed.

    This is the baseline a language model must beat on the held-out text.
    """
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    p = counts / counts.sum()
    return float(-np.mean(np.log2(p[heldout])))


@dataclass(frozen=True)
class Series:
    years: np.ndarray
    values: np.ndarray
    name: str


def sunspots() -> Series:
    """Yearly mean sunspot numbers, 1700-2008 (309 values), from ``statsmodels.datasets``."""
    from statsmodels.datasets import sunspots as dataset

    frame = dataset.load_pandas().data
    return Series(
        frame["YEAR"].to_numpy(dtype=np.float64),
        frame["SUNACTIVITY"].to_numpy(dtype=np.float64),
        "statsmodels.datasets.sunspots (yearly sunspot numbers 1700-2008)",
    )
