"""`infinipipe train` refuses input it cannot train on before starting any rank."""
from __future__ import annotations

from infinipipe.cli import main


def test_corpus_smaller_than_one_global_batch_is_refused_before_any_rank_starts(tmp_path, capsys):
    args = ["train", "--no-progress", "--run-dir", str(tmp_path), f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.max_docs=3", "--training.seq_len=2048", "--training.global_batch_tokens=1000000"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("infinipipe train: error: training.global_batch_tokens (1000000) exceeds the corpus's")
