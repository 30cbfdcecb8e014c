"""Training data that is already on the machine: nothing is downloaded, nothing is copied in.

- Text: the Python source of ``torch.nn`` and ``torch.optim`` as installed with the pinned
  ``torch==2.13.0`` of the ``[train]`` extra, in sorted file order. Unlike the standard
  library (71-75 top-level files across Python 3.11-3.13, with different contents), these
  files are the same on every interpreter, so the corpus and its digest are too.
- Series: the yearly sunspot numbers 1700-2008 that ship inside ``statsmodels``.
"""

from __future__ import annotations

import hashlib
import importlib.util
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
    sha256: str

    def split(self, heldout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """Training and held-out token streams; held-out is the corpus's tail."""
        cut = int(len(self.tokens) * (1 - heldout_fraction))
        return self.tokens[:cut], self.tokens[cut:]


#: The packages of torch whose source makes the corpus, in this order.
CORPUS_PACKAGES = ("nn", "optim")
#: SHA-256 of the default corpus (2,000,000 characters) with torch 2.13.0, on any interpreter.
CORPUS_SHA256 = "1d963f983b4d293ae011ea2203cea0976f83e92760c59af1275e78629d075345"


def corpus_files() -> list[Path]:
    """The corpus's files: ``torch/nn/**.py`` then ``torch/optim/**.py``, each sorted by path."""
    spec = importlib.util.find_spec("torch")  # found, not imported: reading text needs no torch
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the language model's corpus is torch's source: install the [train] extra"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    files: list[Path] = []
    for package in CORPUS_PACKAGES:
        files += sorted(
            (root / package).rglob("*.py"), key=lambda f: f.relative_to(root).as_posix()
        )
    return files


def text_corpus(max_chars: int = 2_000_000, min_chars: int = 100_000) -> Corpus:
    """Python source text (see :func:`corpus_files`), concatenated up to ``max_chars``."""
    parts: list[str] = []
    total = files = 0
    for path in corpus_files():
        text = path.read_text(encoding="utf-8")
        parts.append(text)
        total += len(text)
        files += 1
        if total >= max_chars:
            break
    corpus = "".join(parts)[:max_chars]
    if len(corpus) < min_chars:
        raise RuntimeError(
            f"only {len(corpus)} characters of Python source found; "
            f"the language model needs at least {min_chars}"
        )
    source = f"torch {'/'.join(CORPUS_PACKAGES)} source"
    return Corpus(encode(corpus), files, source, hashlib.sha256(corpus.encode()).hexdigest())


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
