"""TOML config: defaults match the example, every bad key or value is an error naming it."""
from __future__ import annotations

from pathlib import Path

import pytest

from infinipipe.config import Config, collect_overrides, load_config, with_overrides
from infinipipe.config.schema import LRSchedulerConfig, ParallelismConfig
from infinipipe.contract.model_config import ModelConfig, preset
from infinipipe.contract.units import parse_bytes
from infinipipe.runtime.parallel_dims import ParallelDims

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_example_default_file_equals_builtin_defaults():
    assert load_config(EXAMPLES / "default.toml") == load_config(None) == Config()


def test_multinode_example_is_valid():
    cfg = load_config(EXAMPLES / "llama13b-4node.toml")
    assert ParallelDims.from_config(cfg.parallelism, 32) == ParallelDims(pp=4, dp_replicate=1, dp_shard=1, sp=8)
    assert cfg.training.mixed_precision == "bf16" and cfg.epp.memory_budget_bytes == 76 * 2**30


@pytest.mark.parametrize("text, message", [
    ("[training]\nstpes = 3\n", "unknown key 'training.stpes' (did you mean 'training.steps'?)"),
    ("[trainig]\nsteps = 3\n", "unknown section 'trainig' (did you mean 'training'?)"),
    ("[training]\nsteps = '3'\n", "training.steps must be int, got str '3'"),
    ("[training]\nsteps = 2.5\n", "training.steps must be int, got float"),
    ("[checkpoint]\nenable = 1\n", "checkpoint.enable must be bool"),
    ("[training]\nsteps = true\n", "training.steps must be int, got bool"),
    ("[training]\nmixed_precision = 'fp16'\n", "training.mixed_precision must be one of"),
    ("[parallelism]\ncontext_parallel_degree = 2\n", "context_parallel_degree = 2: not supported yet"),
    ("[parallelism]\ndata_parallel_shard_degree = 0\n", "data_parallel_shard_degree"),
    ("[epp]\nmemory_budget = '80 GiBs'\n", "epp.memory_budget must be a size"),
    ("[epp]\nmin_slices = 4\nmax_slices = 2\n", "epp.max_slices"),
    ("[data]\nsource = 'jsonl'\n", "data.path is required"),
    ("[data]\nover_long = 'drop'\n", "data.over_long"),
    ("[model]\nflavor = 'huge'\n", "model.flavor"),
    ("[model]\nhf_path = 'ckpt'\nhidden = 64\n", "model.hidden cannot be set together with model.hf_path"),
    ("[training]\nglobal_batch_size = 8\n", "exactly one of training.global_batch_tokens"),
    ("[training]\nglobal_batch_tokens = 1000\nseq_len = 2000\n", "must be >= training.seq_len"),
    ("training = 3\n", "[training] must be a table"),
    ("[training\n", "invalid TOML"),
])
def test_bad_config_is_an_error_naming_the_key(tmp_path, text, message):
    with pytest.raises(ValueError) as err:
        load_config(_write(tmp_path, text))
    assert message in str(err.value)


def test_int_is_accepted_where_a_float_is_expected(tmp_path):
    cfg = load_config(_write(tmp_path, "[optimizer]\nlr = 1\n"))
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)


def test_overrides_beat_the_file_and_are_typed(tmp_path):
    path = _write(tmp_path, "[training]\nsteps = 7\nseed = 3\n")
    cfg = load_config(path, ["--training.steps=12", "data.tokenizer=o200k_base", "--epp.prefetch=false",
                             "--optimizer.lr=1e-4", "--data.cache_dir='my dir'"])
    assert (cfg.training.steps, cfg.training.seed) == (12, 3)
    assert cfg.data.tokenizer == "o200k_base" and cfg.epp.prefetch is False
    assert cfg.optimizer.lr == 1e-4 and cfg.data.cache_dir == "my dir"


@pytest.mark.parametrize("item, message", [
    ("--training.steps=many", "training.steps must be int, got str 'many'"),
    ("--training.stpes=3", "unknown key 'training.stpes'"),
    ("--steps=3", "must look like --section.key=value"),
    ("--training.steps", "must look like --section.key=value"),
])
def test_bad_override_is_an_error_naming_the_key(item, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [item])


def test_collect_overrides_accepts_both_spellings():
    assert collect_overrides(["--training.steps", "5", "--data.vocab_size=512"]) == [
        "--training.steps=5", "--data.vocab_size=512"]
    with pytest.raises(ValueError, match="unrecognised argument '--steps'"):
        collect_overrides(["--steps", "5"])


def test_to_toml_round_trips_every_value(tmp_path):
    cfg = load_config(None, ['--job.description=say "hi"\\ok', "--lr_scheduler.decay_ratio=0.25",
                             "--model.hidden=96", "--model.tie_embeddings=true", "--optimizer.eps=1e-12",
                             "--training.global_batch_tokens=0", "--training.global_batch_size=16"])
    again = load_config(_write(tmp_path, cfg.to_toml()))
    assert again == cfg and again.lr_scheduler.decay_ratio == 0.25 and again.job.description == 'say "hi"\\ok'
    assert with_overrides(cfg, ["--training.steps=99"]) == load_config(_write(tmp_path, cfg.to_toml()),
                                                                      ["--training.steps=99"])


@pytest.mark.parametrize("text, expected", [
    ("80GiB", 80 * 2**30), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("2GB", 2 * 10**9),
    ("4096", 4096), ("64 kib", 64 * 1024), (1234, 1234),
])
def test_parse_bytes_reads_binary_and_decimal_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "12XB", "-1GiB", True, -5])
def test_parse_bytes_rejects_nonsense_with_the_field_name(bad):
    with pytest.raises(ValueError, match="epp.memory_budget"):
        parse_bytes(bad, "epp.memory_budget")


def test_model_config_follows_preset_overrides_and_data_vocab():
    assert load_config(None).model_config() == ModelConfig(**{**preset("tiny").to_json(), "vocab_size": 4096})
    cfg = load_config(None, ["--model.flavor=small", "--model.layers=4", "--model.tie_embeddings=false",
                             "--data.vocab_size=0"])
    assert cfg.model_config() == ModelConfig(**{**preset("small").to_json(), "layers": 4, "tie_embeddings": False})
    with pytest.raises(ValueError, match="model.vocab_size .* is smaller than data.vocab_size"):
        load_config(None, ["--model.vocab_size=1000", "--data.vocab_size=2048"])


def test_model_config_reads_a_local_hf_checkpoint(tmp_path):
    import json

    from infinipipe.model.hf import config_to_hf

    shape = ModelConfig(vocab_size=300, hidden=48, layers=3, heads=6, kv_heads=2, ffn=80)
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(shape)))
    cfg = load_config(None, [f"--model.hf_path={tmp_path}", "--data.vocab_size=0"])
    assert cfg.model_config() == shape
    with pytest.raises(ValueError, match="data.vocab_size must be 0 with model.hf_path"):
        load_config(None, [f"--model.hf_path={tmp_path}"])


def test_missing_hf_checkpoint_is_named_before_any_setting_that_depends_on_it(tmp_path):
    with pytest.raises(ValueError, match=rf"model.hf_path: no config.json in '{tmp_path / 'gone'}'"):
        load_config(None, [f"--model.hf_path={tmp_path / 'gone'}"])


def test_parallel_degrees_resolve_against_world_size():
    def dims(world, **degrees):
        return ParallelDims.from_config(ParallelismConfig(**degrees), world)

    assert dims(16, pipeline_parallel_degree=4, data_parallel_shard_degree=-1) == ParallelDims(4, 1, 4)
    assert dims(4, pipeline_parallel_degree=2, data_parallel_replicate_degree=2) == ParallelDims(2, 2, 1)
    assert dims(None, pipeline_parallel_degree=2, data_parallel_shard_degree=-1).world_size == 2
    with pytest.raises(ValueError, match="!= world size 6"):
        dims(6, pipeline_parallel_degree=4)
    with pytest.raises(ValueError, match="not divisible"):
        dims(6, pipeline_parallel_degree=4, data_parallel_shard_degree=-1)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    sched = LRSchedulerConfig(warmup_steps=4, decay_type="linear", min_lr_factor=0.1)
    f = [sched.factor(s, 20) for s in range(20)]
    assert f[:4] == [0.2, 0.4, 0.6, 0.8] and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and f[-1] == pytest.approx(0.1 + 0.9 / 16)
    held = LRSchedulerConfig(warmup_steps=0, decay_ratio=0.5, decay_type="cosine", min_lr_factor=0.0)
    g = [held.factor(s, 10) for s in range(10)]
    assert g[:5] == [1.0] * 5 and g[5] == 1.0 and g[6] < 1.0 and g[9] > 0.0
