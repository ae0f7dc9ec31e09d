"""Raw-text corpora read from local files; nothing is downloaded.

The embedded default is this Python's own standard library: about 730 non-test modules that are
on every machine that can run us, a real code corpus with the skew long-context training is about
(most files a few thousand tokens, a few over 100K). JSONL, plain-text files and Parquet (through
Hugging Face ``datasets``, when installed) cover user data.

Every corpus yields its documents in a fixed, sorted order and has a cheap ``fingerprint`` (names,
sizes, modification times) so a tokenized copy can be cached and reused safely.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import tokenize
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

# Directories under the stdlib that are tests, installed third-party packages or build artefacts.
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


class Corpus(ABC):
    """Documents in a deterministic order; ``max_docs > 0`` keeps only the first ones."""

    kind: str

    def __init__(self, max_docs: int = 0):
        if max_docs < 0:
            raise ValueError(f"max_docs must be >= 0, got {max_docs}")
        self.max_docs = max_docs

    @abstractmethod
    def _documents(self) -> Iterator[Document]: ...

    @abstractmethod
    def _identity(self) -> list[str]:
        """Strings that change whenever the documents may have changed."""

    def documents(self) -> Iterator[Document]:
        docs = self._documents()
        return islice(docs, self.max_docs) if self.max_docs else docs

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for part in [self.kind, str(self.max_docs), *self._identity()]:
            h.update(part.encode("utf-8", "surrogateescape") + b"\0")
        return h.hexdigest()[:16]


def _file_identity(root: Path, files: list[Path]) -> list[str]:
    out = []
    for f in files:
        st = f.stat()
        out.append(f"{f.relative_to(root).as_posix() if f != root else f.name}:{st.st_size}:{st.st_mtime_ns}")
    return out


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} not found")
    return path


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Non-test ``.py`` files of the standard library, sorted by relative path.

    Skipped: test packages and ``test_*.py``, ``site-packages`` (third-party code lives inside the
    stdlib folder), the ``config-*`` build folder and the generated ``_sysconfigdata*`` module
    (machine-specific paths, not source anyone wrote).
    """
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = []
    for folder, dirs, names in os.walk(root):
        top = Path(folder) == root
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS and not (top and d.startswith("config-"))]
        files.extend(Path(folder, n) for n in names
                     if n.endswith(".py") and not n.startswith(("test_", "_sysconfigdata")))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class StdlibCorpus(Corpus):
    """The Python standard library's source files, one document per module."""

    kind = "stdlib"

    def __init__(self, max_docs: int = 0, root: Path | None = None):
        super().__init__(max_docs)
        self.root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
        self.files = stdlib_files(self.root)
        if not self.files:
            raise ValueError(f"no standard library sources found under {str(self.root)!r}")

    def _documents(self) -> Iterator[Document]:
        for f in self.files:
            # tokenize.open honours PEP 263 coding cookies, as Python itself does.
            with tokenize.open(f) as fh:
                yield Document(f.relative_to(self.root).as_posix(), fh.read())

    def _identity(self) -> list[str]:
        return [sys.version, *_file_identity(self.root, self.files)]


def _files_under(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_file():
        return [path]
    files = [p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes)
             and not any(part.startswith(".") for part in p.relative_to(path).parts)]
    if not files:
        raise ValueError(f"no {'/'.join(suffixes)} files under {str(path)!r}")
    return sorted(files, key=lambda p: p.relative_to(path).as_posix())


class TextCorpus(Corpus):
    """One document per UTF-8 text file: ``path`` is a file or a folder searched recursively."""

    kind = "text"

    def __init__(self, path: str | Path, max_docs: int = 0, suffixes: tuple[str, ...] = (".txt", ".md")):
        super().__init__(max_docs)
        self.path = _require(Path(path), "text path")
        self.files = _files_under(self.path, suffixes)

    def _documents(self) -> Iterator[Document]:
        for f in self.files:
            name = f.name if f == self.path else f.relative_to(self.path).as_posix()
            try:
                yield Document(name, f.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise ValueError(f"{f}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None

    def _identity(self) -> list[str]:
        return _file_identity(self.path, self.files)


class JsonlCorpus(Corpus):
    """One document per JSON line; the text is the string field ``text_field``.

    ``path`` is a ``.jsonl`` file or a folder of them. A line without the field, or whose field is
    not a string, is an error naming the file and line: silently skipping rows would change the
    data without anyone noticing.
    """

    kind = "jsonl"

    def __init__(self, path: str | Path, text_field: str = "text", max_docs: int = 0):
        super().__init__(max_docs)
        self.path = _require(Path(path), "JSONL path")
        self.text_field = text_field
        self.files = _files_under(self.path, (".jsonl",))

    def _documents(self) -> Iterator[Document]:
        for f in self.files:
            name = f.name if f == self.path else f.relative_to(self.path).as_posix()
            with f.open(encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ValueError(f"{f}:{lineno}: invalid JSON: {_json_reason(exc)}") from None
                    text = row.get(self.text_field) if isinstance(row, dict) else None
                    if not isinstance(text, str):
                        raise ValueError(f"{f}:{lineno}: no string field {self.text_field!r} (data.text_field)")
                    yield Document(f"{name}:{lineno}", text)

    def _identity(self) -> list[str]:
        return [self.text_field, *_file_identity(self.path, self.files)]


def _json_reason(exc: json.JSONDecodeError) -> str:
    """The decoder's reason as a whole phrase: some of its messages end in "at" and expect the
    position after them ("Invalid control character at")."""
    where = f"column {exc.colno}" if exc.msg.endswith(" at") else f"at column {exc.colno}"
    return f"{exc.msg} {where}"


class ParquetCorpus(Corpus):
    """Parquet files read with Hugging Face ``datasets`` (optional: only needed for this source)."""

    kind = "parquet"

    def __init__(self, path: str | Path, text_field: str = "text", max_docs: int = 0):
        super().__init__(max_docs)
        self.path = _require(Path(path), "Parquet path")
        self.text_field = text_field
        self.files = _files_under(self.path, (".parquet",))

    def _documents(self) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise ValueError("data.source = 'parquet' needs the Hugging Face 'datasets' package "
                             "(pip install datasets)") from None
        ds = datasets.load_dataset("parquet", data_files=[str(f) for f in self.files], split="train")
        if self.text_field not in ds.column_names:
            raise ValueError(f"{self.path}: no column {self.text_field!r} (data.text_field); "
                             f"columns: {', '.join(ds.column_names)}")
        for i, text in enumerate(ds[self.text_field]):
            if not isinstance(text, str):
                raise ValueError(f"{self.path}: row {i}: column {self.text_field!r} is not a string")
            yield Document(f"{self.path.name}:{i}", text)

    def _identity(self) -> list[str]:
        return [self.text_field, *_file_identity(self.path, self.files)]


def open_corpus(source: str, path: str = "", text_field: str = "text", max_docs: int = 0) -> Corpus:
    """The corpus named by ``[data]`` settings (``source``, ``path``, ``text_field``, ``max_docs``)."""
    if source == "stdlib":
        if path:
            raise ValueError("data.path must be empty for data.source = 'stdlib'")
        return StdlibCorpus(max_docs)
    if not path:
        raise ValueError(f"data.path is required for data.source = {source!r}")
    if source == "jsonl":
        return JsonlCorpus(path, text_field, max_docs)
    if source == "text":
        return TextCorpus(path, max_docs)
    if source == "parquet":
        return ParquetCorpus(path, text_field, max_docs)
    raise ValueError(f"unknown data.source {source!r}; choose from stdlib, jsonl, text, parquet")
