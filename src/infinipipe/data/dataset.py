"""Tokenized documents and deterministic global batches.

A document is one training sequence: EPP never packs documents into fixed windows (it packs them
into chunks whose segments keep attention separate), so the natural, skewed length mix of the
corpus is what the planner sees. The global batch of step ``i`` is a pure function of
``(seed, step)``, so resuming from a checkpoint replays exactly the batches an uninterrupted run
would have seen.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .corpus import Corpus, open_corpus
from .tokenizer import MappedTokenizer, Tokenizer, VocabMap, load_tokenizer

if TYPE_CHECKING:
    from ..config import Config

_ENCODE_BATCH_DOCS = 256


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "infinipipe"


def _gather(flat: np.ndarray, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """Concatenate ``flat[s:s+n]`` for each (s, n) without a Python loop."""
    out_start = np.cumsum(lens) - lens
    return flat[np.arange(int(lens.sum())) - np.repeat(out_start, lens) + np.repeat(starts, lens)]


@dataclass(frozen=True, eq=False)
class TokenizedCorpus:
    """Base-tokenizer ids of every document, flat, with ``offsets[i]:offsets[i+1]`` per document."""

    tokens: np.ndarray
    offsets: np.ndarray
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def counts(self, n_vocab: int) -> np.ndarray:
        return np.bincount(self.tokens, minlength=n_vocab).astype(np.int64)


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, cache_dir: str | Path | None = None) -> TokenizedCorpus:
    """Tokenize every document, reusing ``cache_dir/tokens-<corpus>-<tokenizer>.npz`` when present.

    The cache key is (corpus fingerprint, tokenizer fingerprint), so a changed file or tokenizer
    never reuses stale ids. The file is written to a temporary name and renamed, so an
    interrupted run cannot leave a half-written cache behind. ``cache_dir=None`` disables caching.
    """
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"tokens-{corpus.fingerprint()}-{tokenizer.fingerprint()}.npz"
        if cache.is_file():
            try:
                with np.load(cache) as z:
                    return TokenizedCorpus(z["tokens"].astype(np.int64), z["offsets"], tuple(z["names"].tolist()))
            except Exception as exc:  # numpy and zipfile raise several types for a damaged archive
                raise ValueError(f"{cache}: unreadable token cache ({type(exc).__name__}: {exc}); delete it "
                                 f"to tokenize the corpus again") from None
    names: list[str] = []
    pieces: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        pieces.extend(np.asarray(ids, dtype=np.int64) for ids in tokenizer.encode_batch(batch))
        batch.clear()

    for doc in corpus.documents():
        names.append(doc.name)
        batch.append(doc.text)
        if len(batch) == _ENCODE_BATCH_DOCS:
            flush()
    flush()
    if not names:
        where = getattr(corpus, "path", None)
        raise ValueError(f"the {corpus.kind} corpus {where} has no documents" if where
                         else f"the {corpus.kind} corpus has no documents")
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype(np.int64)
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, tokens=tokens.astype(np.uint32), offsets=offsets, names=np.array(names, dtype=str))
            os.replace(tmp, cache)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return TokenizedCorpus(tokens, offsets, tuple(names))


@dataclass(frozen=True, eq=False)
class TokenDataset:
    """Training sequences: ids in the model's vocabulary, one end-of-text id appended per document.

    Length policy (``over_long``): ``truncate`` keeps the first ``seq_len`` tokens, ``reject``
    drops the document. Documents shorter than ``min_doc_tokens`` (after the end-of-text id) are
    dropped: a 1-token sequence predicts nothing. The counts are kept for the run summary.
    """

    tokens: np.ndarray
    offsets: np.ndarray
    names: tuple[str, ...]
    n_vocab: int
    truncated: int
    rejected: int
    too_short: int

    @classmethod
    def build(cls, corpus: TokenizedCorpus, n_vocab: int, seq_len: int, over_long: str = "truncate",
              min_doc_tokens: int = 2, vocab_map: VocabMap | None = None, eos_id: int | None = None) -> "TokenDataset":
        if over_long not in ("truncate", "reject"):
            raise ValueError(f"data.over_long must be 'truncate' or 'reject', got {over_long!r}")
        if seq_len < min_doc_tokens:
            raise ValueError(f"training.seq_len ({seq_len}) must be >= data.min_doc_tokens ({min_doc_tokens})")
        tokens, offsets = corpus.tokens, corpus.offsets
        if vocab_map is not None:
            cum = np.concatenate([[0], np.cumsum(vocab_map.table_len[tokens])])
            tokens, offsets = vocab_map.apply(tokens), cum[offsets]
        if eos_id is not None:
            tokens = np.insert(tokens, offsets[1:], eos_id)
            offsets = offsets + np.arange(len(offsets))
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= n_vocab):
            raise ValueError(f"token ids span {tokens.min()}..{tokens.max()}, outside a vocabulary of {n_vocab}")
        lens = np.diff(offsets)
        short = lens < min_doc_tokens
        long = lens > seq_len
        keep = ~short & ~long if over_long == "reject" else ~short
        new_lens = np.minimum(lens, seq_len)[keep]
        flat = _gather(tokens, offsets[:-1][keep], new_lens)
        new_offsets = np.concatenate([[0], np.cumsum(new_lens)]).astype(np.int64)
        names = tuple(n for n, k in zip(corpus.names, keep) if k)
        if not names:
            raise ValueError("no document survives the length policy (data.min_doc_tokens / training.seq_len)")
        n_long = int(long.sum())
        return cls(flat, new_offsets, names, n_vocab, truncated=n_long if over_long == "truncate" else 0,
                   rejected=n_long if over_long == "reject" else 0, too_short=int(short.sum()))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.tokens[self.offsets[i]:self.offsets[i + 1]].astype(np.int64))


@dataclass(frozen=True)
class GlobalBatch:
    """The sequences of one optimizer step, in sampling order (the planner reorders as it likes)."""

    step: int
    doc_ids: tuple[int, ...]
    sequences: tuple[torch.Tensor, ...]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(int(s.numel()) for s in self.sequences)

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def predicted_tokens(self) -> int:
        """Tokens with a next token to predict: the loss normaliser of the step."""
        return sum(n - 1 for n in self.lengths)


class BatchSampler:
    """Deterministic global batches: epochs are seeded permutations, read as one endless stream.

    Documents are drawn without replacement within an epoch, in the order of
    ``default_rng([seed, epoch]).permutation``, so every batch is a uniform sample of the corpus
    and keeps its length skew. A batch takes the next ``global_batch_size`` documents, or (token
    budget) the next documents while their total stays within ``global_batch_tokens`` (at least
    one). Batch boundaries are found by a cumulative-sum search and remembered, so step ``i``
    costs O(i) once and O(1) after; the result depends only on ``(seed, step)``.
    """

    def __init__(self, lengths: np.ndarray, seed: int, global_batch_tokens: int = 0, global_batch_size: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if (global_batch_tokens > 0) == (global_batch_size > 0):
            raise ValueError("set exactly one of global_batch_tokens and global_batch_size (> 0)")
        if global_batch_size > len(self.lengths):
            raise ValueError(f"training.global_batch_size ({global_batch_size}) exceeds the "
                             f"{len(self.lengths)} documents of the corpus")
        if global_batch_tokens > int(self.lengths.sum()):
            raise ValueError(f"training.global_batch_tokens ({global_batch_tokens}) exceeds the corpus's "
                             f"{int(self.lengths.sum())} tokens")
        self.seed, self.batch_tokens, self.batch_size = seed, global_batch_tokens, global_batch_size
        self._order = np.zeros(0, dtype=np.int64)
        self._cum = np.zeros(1, dtype=np.int64)
        self._starts = [0]

    def _extend_epoch(self) -> None:
        epoch = len(self._order) // len(self.lengths)
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.lengths))
        self._order = np.concatenate([self._order, perm])
        self._cum = np.concatenate([self._cum, self._cum[-1] + np.cumsum(self.lengths[perm])])

    def _span(self, step: int) -> tuple[int, int]:
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.batch_size:
            start, end = step * self.batch_size, (step + 1) * self.batch_size
            while len(self._order) < end:
                self._extend_epoch()
            return start, end
        while len(self._starts) <= step + 1:
            start = self._starts[-1]
            while self._cum[-1] - self._cum[start] <= self.batch_tokens:
                self._extend_epoch()
            end = int(np.searchsorted(self._cum, self._cum[start] + self.batch_tokens, side="right")) - 1
            self._starts.append(max(end, start + 1))
        return self._starts[step], self._starts[step + 1]

    def doc_ids(self, step: int) -> np.ndarray:
        start, end = self._span(step)
        return self._order[start:end]

    def batch(self, dataset: TokenDataset, step: int) -> GlobalBatch:
        if len(dataset) != len(self.lengths):
            raise ValueError(f"sampler built for {len(self.lengths)} documents, dataset has {len(dataset)}")
        ids = self.doc_ids(step)
        return GlobalBatch(step, tuple(int(i) for i in ids), tuple(dataset.sequence(int(i)) for i in ids))


def build_dataset(cfg: "Config") -> tuple[TokenDataset, Tokenizer]:
    """Corpus -> tokenizer (mapped to ``data.vocab_size`` when set) -> dataset, from a ``Config``."""
    data = cfg.data
    corpus = open_corpus(data.source, data.path, data.text_field, data.max_docs)
    base = load_tokenizer(data.tokenizer)
    cache = Path(data.cache_dir) if data.cache_dir else default_cache_dir()
    tokenized = tokenize_corpus(corpus, base, cache)
    tokenizer: Tokenizer = base
    vocab_map = None
    if data.vocab_size:
        vocab_map = VocabMap.build(tokenized.counts(base.n_vocab), data.vocab_size, base)
        tokenizer = MappedTokenizer(base, vocab_map)
    dataset = TokenDataset.build(tokenized, tokenizer.n_vocab, cfg.training.seq_len, data.over_long,
                                 data.min_doc_tokens, vocab_map, tokenizer.eos_id)
    return dataset, tokenizer


def build_sampler(cfg: "Config", dataset: TokenDataset) -> BatchSampler:
    t = cfg.training
    return BatchSampler(dataset.lengths, t.seed, t.global_batch_tokens, t.global_batch_size)
