"""Named sequence-length distributions for planning and benchmarks.

Empirical distributions are files of token counts from real tokenized text, shipped in
``data/lengths/`` (one integer per line, ``#`` comments) and made by ``benchmarks/make_lengths.py``.
Parametric ones are log-normals fitted to published statistics; each figure below says where it
comes from and which numbers are our assumptions.

- ``github``: InfiniPipe (arXiv 2509.21275, §1) reports that in GitHub data most sequences are
  shorter than 16K tokens and fewer than 0.6% exceed 64K. We fit P(len > 64K) = 0.6% and read
  "most" as P(len > 16K) = 5% (our assumption; the Python standard library file measures 5.8%).
- ``commoncrawl``: RefinedWeb, a CommonCrawl corpus, holds about 600B tokens in 960M documents
  (Penedo et al. 2023), a mean of 625 tokens per document; we take a log-normal body with that
  mean and sigma 1.0 (our assumption). Long-context training mixes up-sample long documents
  (Fu et al. 2024, "Data Engineering for Scaling Language Models to 128K Context"); we model that
  as 2% of documents drawn log-uniformly from 8K tokens to the context length (our assumption).
- ``python-stdlib``: empirical, cl100k_base token counts of the CPython standard library's
  ``.py`` files.

Samples longer than the context length are truncated to it, as training truncates documents.
``at_cap`` models a corpus of long documents (books, papers, repositories) truncated at the
context length: that many of the batch's sequences sit exactly at the cap.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

GITHUB_P_OVER_16K = 0.05
GITHUB_P_OVER_64K = 0.006
COMMONCRAWL_MEAN_TOKENS = 600e9 / 960e6
COMMONCRAWL_SIGMA = 1.0
COMMONCRAWL_LONG_SHARE = 0.02
COMMONCRAWL_LONG_FROM = 8192

EMPIRICAL_FILES = {"python-stdlib": "python-stdlib-cl100k.txt"}


def read_lengths(path: str | Path) -> list[int]:
    """Integers, one per line; blank lines and ``#`` comments are skipped."""
    lengths = []
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            n = int(text)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: expected a sequence length (integer), got {text!r}") from None
        if n < 1:
            raise ValueError(f"{path}:{lineno}: a sequence length must be >= 1, got {n}")
        lengths.append(n)
    if not lengths:
        raise ValueError(f"{path}: holds no sequence lengths")
    return lengths


def empirical_lengths(name: str) -> list[int]:
    file = resources.files("infinipipe.data").joinpath("lengths", EMPIRICAL_FILES[name])
    with resources.as_file(file) as path:
        return read_lengths(path)


def _normal_quantile(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def _github(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    z16, z64 = _normal_quantile(1 - GITHUB_P_OVER_16K), _normal_quantile(1 - GITHUB_P_OVER_64K)
    sigma = (math.log(65536) - math.log(16384)) / (z64 - z16)
    mu = math.log(16384) - z16 * sigma
    return rng.lognormal(mu, sigma, n)


def _commoncrawl(rng: np.random.Generator, n: int, max_len: int) -> np.ndarray:
    mu = math.log(COMMONCRAWL_MEAN_TOKENS) - COMMONCRAWL_SIGMA**2 / 2
    body = rng.lognormal(mu, COMMONCRAWL_SIGMA, n)
    lo = min(COMMONCRAWL_LONG_FROM, max_len)
    long = np.exp(rng.uniform(math.log(lo), math.log(max_len), n))
    return np.where(rng.random(n) < COMMONCRAWL_LONG_SHARE, long, body)


PARAMETRIC: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "github": _github,
    "commoncrawl": _commoncrawl,
}

DISTRIBUTIONS = tuple(sorted([*PARAMETRIC, *EMPIRICAL_FILES]))


def sample_lengths(name: str, n: int, max_len: int, seed: int = 0, at_cap: int = 0) -> list[int]:
    """``n`` sequence lengths in ``1..max_len`` from distribution ``name`` (deterministic in ``seed``);
    at least ``at_cap`` of them (drawn at random places) are ``max_len``."""
    if n < 1:
        raise ValueError(f"batch size n must be >= 1, got {n}")
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    if not 0 <= at_cap <= n:
        raise ValueError(f"at_cap must be in 0..{n} (the batch size), got {at_cap}")
    rng = np.random.default_rng(seed)
    if name in PARAMETRIC:
        raw = PARAMETRIC[name](rng, n, max_len)
    elif name in EMPIRICAL_FILES:
        raw = rng.choice(np.asarray(empirical_lengths(name)), size=n, replace=True)
    else:
        raise ValueError(f"unknown length distribution {name!r}; known: {', '.join(DISTRIBUTIONS)}")
    lengths = np.clip(np.rint(raw), 1, max_len)
    short = np.flatnonzero(lengths < max_len)
    missing = at_cap - (n - len(short))
    if missing > 0:
        lengths[np.random.default_rng([seed, at_cap]).choice(short, size=missing, replace=False)] = max_len
    return [int(x) for x in lengths]
