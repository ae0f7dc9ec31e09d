"""Corpora read real local files; datasets apply the length policy; batches depend only on (seed, step)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from infinipipe.config import load_config
from infinipipe.data.corpus import JsonlCorpus, ParquetCorpus, StdlibCorpus, TextCorpus, open_corpus, stdlib_files
from infinipipe.data.dataset import (
    BatchSampler,
    TokenDataset,
    TokenizedCorpus,
    build_dataset,
    build_sampler,
    tokenize_corpus,
)
from infinipipe.data.tokenizer import TiktokenTokenizer, load_tokenizer


@pytest.fixture(scope="module")
def cl100k():
    return TiktokenTokenizer("cl100k_base")


def test_stdlib_corpus_is_the_sorted_non_test_sources():
    files = stdlib_files()
    names = [d.name for d in StdlibCorpus().documents()]
    assert len(names) == len(files) > 500 and names == sorted(names)
    assert "argparse.py" in names and "json/decoder.py" in names
    for name in names:
        parts = name.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), name
        assert not parts[-1].startswith(("test_", "_sysconfigdata")), name


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_jsonl_corpus_reads_the_text_field_in_file_order(tmp_path):
    (tmp_path / "b").mkdir()
    _jsonl(tmp_path / "b" / "x.jsonl", [{"content": "third"}])
    _jsonl(tmp_path / "a.jsonl", [{"content": "first", "id": 1}, {"content": "second"}])
    (tmp_path / "a.jsonl").write_text((tmp_path / "a.jsonl").read_text() + "\n")
    docs = list(JsonlCorpus(tmp_path, text_field="content").documents())
    assert [(d.name, d.text) for d in docs] == [
        ("a.jsonl:1", "first"), ("a.jsonl:2", "second"), ("b/x.jsonl:1", "third")]
    assert [d.text for d in JsonlCorpus(tmp_path, "content", max_docs=2).documents()] == ["first", "second"]


@pytest.mark.parametrize("line, message", [('{"body": "x"}', "a.jsonl:2: no string field 'text'"),
                                           ('{"text": 3}', "a.jsonl:2: no string field 'text'"),
                                           ("{oops", "a.jsonl:2: invalid JSON: Expecting property name enclosed in "
                                                     "double quotes at column 2$"),
                                           ('{"text": "a\tb"}', "a.jsonl:2: invalid JSON: Invalid control character "
                                                                "at column 12$"),
                                           ('{"text": "ab', "a.jsonl:2: invalid JSON: Invalid control character "
                                                           "at column 13$")])  # the line's end
def test_bad_jsonl_line_is_named_with_its_whole_reason(tmp_path, line, message):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        list(JsonlCorpus(tmp_path / "a.jsonl").documents())


def test_empty_jsonl_file_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=rf"^the jsonl corpus {tmp_path / 'empty.jsonl'} has no documents$"):
        tokenize_corpus(JsonlCorpus(tmp_path / "empty.jsonl"), load_tokenizer("cl100k_base"), None)


def test_text_corpus_reads_files_and_refuses_binary(tmp_path):
    (tmp_path / "one.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "two.md").write_text("beta", encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".hidden.txt").write_text("no")
    assert [(d.name, d.text) for d in TextCorpus(tmp_path).documents()] == [("one.txt", "alpha"), ("two.md", "beta")]
    (tmp_path / "three.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ValueError, match="three.txt: not UTF-8"):
        list(TextCorpus(tmp_path).documents())


def test_parquet_needs_datasets_and_says_so(tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"PAR1")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the Hugging Face 'datasets' package"):
            list(ParquetCorpus(tmp_path).documents())
    else:
        pytest.skip("datasets is installed; the missing-package message cannot be shown")


def test_parquet_corpus_reads_a_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a b", "c"], "n": [1, 2]}).to_parquet(str(tmp_path / "d.parquet"))
    assert [d.text for d in ParquetCorpus(tmp_path).documents()] == ["a b", "c"]


def test_open_corpus_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="data.path is required"):
        open_corpus("jsonl")
    with pytest.raises(FileNotFoundError, match="JSONL path"):
        open_corpus("jsonl", str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unknown data.source 'csv'"):
        open_corpus("csv", "x")


def test_fingerprint_changes_with_the_files_and_the_limit(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    before = JsonlCorpus(tmp_path).fingerprint()
    assert JsonlCorpus(tmp_path).fingerprint() == before
    assert JsonlCorpus(tmp_path, max_docs=1).fingerprint() != before
    assert JsonlCorpus(tmp_path, text_field="body").fingerprint() != before
    _jsonl(tmp_path / "a.jsonl", [{"text": "one, longer"}])
    assert JsonlCorpus(tmp_path).fingerprint() != before


def test_tokenized_corpus_is_cached_atomically_and_reused(tmp_path, cl100k):
    corpus = StdlibCorpus(max_docs=12)
    first = tokenize_corpus(corpus, cl100k, tmp_path)
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".npz") and corpus.fingerprint() in files[0]
    again = tokenize_corpus(corpus, cl100k, tmp_path)
    assert again.names == first.names and np.array_equal(again.tokens, first.tokens)
    assert np.array_equal(again.offsets, first.offsets)
    texts = [d.text for d in corpus.documents()]
    assert [again.tokens[a:b].tolist() for a, b in zip(again.offsets, again.offsets[1:])] == cl100k.encode_batch(texts)
    tokenize_corpus(StdlibCorpus(max_docs=3), cl100k, tmp_path)
    assert len(os.listdir(tmp_path)) == 2


def _corpus(lengths):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(offsets[-1], dtype=np.int64) % 50 + 1
    return TokenizedCorpus(tokens, offsets, tuple(f"d{i}" for i in range(len(lengths))))


@pytest.mark.parametrize("policy", ["truncate", "reject"])
def test_length_policy_truncates_or_rejects_and_appends_eos(policy):
    corpus = _corpus([0, 1, 5, 9, 20])
    ds = TokenDataset.build(corpus, n_vocab=64, seq_len=8, over_long=policy, min_doc_tokens=3, eos_id=0)
    expected = [6, 8, 8] if policy == "truncate" else [6]
    assert ds.lengths.tolist() == expected and ds.too_short == 2
    assert (ds.truncated, ds.rejected) == ((2, 0) if policy == "truncate" else (0, 2))
    assert ds.sequence(0).tolist() == corpus.tokens[1:6].tolist() + [0]
    assert ds.sequence(0).dtype == torch.int64
    if policy == "truncate":
        assert ds.names == ("d2", "d3", "d4") and ds.sequence(2).tolist() == corpus.tokens[15:23].tolist()


def test_out_of_vocabulary_ids_are_refused():
    with pytest.raises(ValueError, match="outside a vocabulary of 20"):
        TokenDataset.build(_corpus([30]), n_vocab=20, seq_len=64)


SKEWED = np.random.default_rng(0).lognormal(6.5, 1.2, size=300).astype(np.int64).clip(2, 8000)


def test_batch_of_a_step_depends_only_on_seed_and_step():
    walked = BatchSampler(SKEWED, seed=7, global_batch_tokens=16000)
    seq = [walked.doc_ids(s).tolist() for s in range(40)]
    fresh = BatchSampler(SKEWED, seed=7, global_batch_tokens=16000)
    assert fresh.doc_ids(33).tolist() == seq[33] and fresh.doc_ids(5).tolist() == seq[5]
    assert BatchSampler(SKEWED, seed=8, global_batch_tokens=16000).doc_ids(0).tolist() != seq[0]


def test_token_budget_batches_fill_up_to_the_budget():
    sampler = BatchSampler(SKEWED, seed=1, global_batch_tokens=16000)
    for step in range(60):
        ids = sampler.doc_ids(step)
        total = int(SKEWED[ids].sum())
        assert total <= 16000 or len(ids) == 1
        nxt = sampler.doc_ids(step + 1)[0]
        assert total + SKEWED[nxt] > 16000


def test_an_epoch_visits_every_document_once_keeping_the_length_mix():
    sampler = BatchSampler(SKEWED, seed=3, global_batch_tokens=16000)
    stream = np.concatenate([sampler.doc_ids(s) for s in range(80)])
    assert sorted(stream[:len(SKEWED)].tolist()) == list(range(len(SKEWED)))
    sized = BatchSampler(SKEWED, seed=3, global_batch_size=32)
    assert all(len(sized.doc_ids(s)) == 32 for s in range(20))
    first_epoch = np.concatenate([sized.doc_ids(s) for s in range(10)])[:300]
    assert len(set(first_epoch.tolist())) == 300


def test_sampler_refuses_batches_larger_than_the_corpus():
    with pytest.raises(ValueError, match="global_batch_tokens .* exceeds the corpus"):
        BatchSampler(np.array([10, 20]), seed=0, global_batch_tokens=100)
    with pytest.raises(ValueError, match="global_batch_size .* exceeds the 2 documents"):
        BatchSampler(np.array([10, 20]), seed=0, global_batch_size=3)


def test_config_builds_a_mapped_stdlib_dataset_and_batches(tmp_path):
    cfg = load_config(None, [f"--data.cache_dir={tmp_path}", "--data.max_docs=30", "--data.vocab_size=1024",
                             "--training.seq_len=2048", "--training.global_batch_tokens=4096"])
    ds, tok = build_dataset(cfg)
    assert tok.n_vocab == ds.n_vocab == 1024 and tok.eos_id is not None
    assert ds.lengths.max() <= 2048 and ds.too_short + ds.rejected + len(ds) == 30
    batch = build_sampler(cfg, ds).batch(ds, step=3)
    assert batch.step == 3 and sum(batch.lengths) == batch.num_tokens <= 4096
    assert batch.predicted_tokens == batch.num_tokens - len(batch.sequences)
    i = ds.names.index("__future__.py")
    text = next(d.text for d in StdlibCorpus(max_docs=30).documents() if d.name == "__future__.py")
    assert ds.sequence(i).tolist() == (tok.encode(text) + [tok.eos_id])[:2048]


def test_cap_heavy_samples_put_at_least_that_many_sequences_at_the_context_length():
    from infinipipe.data.lengths import sample_lengths

    plain = sample_lengths("github", 256, 65536, seed=4)
    capped = sample_lengths("github", 256, 65536, seed=4, at_cap=6)
    assert capped == sample_lengths("github", 256, 65536, seed=4, at_cap=6)
    assert capped.count(65536) >= 6 > plain.count(65536)
    assert sum(a != b for a, b in zip(plain, capped)) == 6 - plain.count(65536)
    with pytest.raises(ValueError, match="at_cap must be in 0..256"):
        sample_lengths("github", 256, 65536, at_cap=257)
