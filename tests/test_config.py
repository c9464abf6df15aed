"""Config loading: YAML, variables, --set overrides, Foundry compatibility, validation, time."""

from __future__ import annotations

import os
import textwrap

import pytest

from jaxtrain.config import (
    Config,
    ConfigError,
    LoaderConfig,
    Time,
    config_to_dict,
    describe,
    dump_yaml,
    load_config,
    parse_time,
    to_batches,
    validate_for_devices,
)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "config")


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(fn, *args, **kwargs) -> str:
    """The message of the ConfigError ``fn`` raises; it must be one line."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# ----------------------------------------------------------------------------- reading


def test_no_file_gives_defaults():
    assert load_config(None) == Config()


def test_an_empty_file_is_refused_not_read_as_the_defaults(tmp_path):
    """The defaults alone are a 1.3B model at batch 256: a config file that sets nothing (an empty
    or truncated file, the wrong one) is a mistake, as no --config is."""
    for text in ("", "# only a comment\n\n"):
        path = write(tmp_path, text)
        message = error_of(load_config, path)
        assert message.startswith(f"{path}: the config file is empty;") and "configs/quickstart.yaml" in message


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.yaml")
    message = error_of(load_config, path)
    assert path in message and "not found" in message


def test_malformed_yaml_names_file_and_line():
    path = os.path.join(FIXTURES, "malformed.yaml")
    message = error_of(load_config, path)
    assert f"{path}:4:" in message and "malformed YAML" in message and "line 3" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message = error_of(load_config, write(tmp_path, "- a\n- b\n"))
    assert "top level must be a mapping" in message


# ----------------------------------------------------------------------------- keys and types


def test_unknown_key_suggests_the_nearest_valid_key():
    path = os.path.join(FIXTURES, "unknown_key.yaml")
    message = error_of(load_config, path)
    assert message == f"unknown key 'optimizer.learning_rate' in {path}; did you mean 'optimizer.lr'?"


def test_unknown_nested_key_and_misplaced_key(tmp_path):
    message = error_of(load_config, write(tmp_path, "model:\n  attn_config:\n    qk_lnn: true\n"))
    assert "'model.attn_config.qk_lnn'" in message and "did you mean 'model.attn_config.qk_ln'?" in message
    message = error_of(load_config, write(tmp_path, "weight_decay: 0.1\n"))
    assert "did you mean 'optimizer.weight_decay'?" in message


def test_wrong_type_names_key_and_value(tmp_path):
    path = write(tmp_path, "model:\n  d_model: abc\n")
    assert error_of(load_config, path) == f"{path}: model.d_model: expected an integer, got 'abc'"
    assert "expected true or false" in error_of(load_config, write(tmp_path, "eval_first: 3\n"))
    assert "expected an integer" in error_of(load_config, write(tmp_path, "seed: true\n"))
    assert "expected a list" in error_of(load_config, write(tmp_path, "optimizer:\n  betas: 0.9\n"))
    assert "expected a mapping" in error_of(load_config, write(tmp_path, "model: 5\n"))


def test_numbers_coerce_where_unambiguous(tmp_path):
    cfg = load_config(write(tmp_path, """\
        optimizer: {lr: 1e-3, betas: [0, 0.5], weight_decay: 0}
        model: {expansion_ratio: 2, logit_scale: inv_sqrt_d_model}
        max_duration: 250
        scheduler: {t_warmup: 10}
        device_train_microbatch_size: auto
        """), notices=(notices := []))
    assert cfg.optimizer.lr == 1e-3 and isinstance(cfg.optimizer.lr, float)  # YAML reads 1e-3 as text
    assert cfg.optimizer.betas == [0, 0.5]
    assert cfg.model.expansion_ratio == 2.0 and isinstance(cfg.model.expansion_ratio, float)
    assert cfg.model.logit_scale == "inv_sqrt_d_model"
    # Composer's trainer reads a bare integer duration as epochs; a schedule time as batches
    assert cfg.max_duration == "250ep" and cfg.scheduler.t_warmup == "10ba"
    assert notices == ["max_duration: 250 is 250 epochs, as Composer reads a bare integer (write 250ba for batches)"]
    assert cfg.device_train_microbatch_size == "auto"


# ----------------------------------------------------------------------------- semantics


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optimizer: {lr: -0.001}", "optimizer.lr: must be positive, got -0.001"),
        ("optimizer: {lr: 0}", "optimizer.lr: must be positive, got 0.0"),
        ("optimizer: {weight_decay: -1.0e-4}", "optimizer.weight_decay: must be >= 0"),
        ("optimizer: {betas: [0.9, 1.0]}", "optimizer.betas: beta2 must be in [0, 1), got 1.0"),
        ("optimizer: {betas: [0.9]}", "optimizer.betas: expected two numbers"),
        ("optimizer: {name: decoupled_adamww}", "unknown name 'decoupled_adamww'; did you mean 'decoupled_adamw'?"),
        ("scheduler: {name: cosine}", "scheduler.name: unknown name 'cosine'"),
        ("precision: amp_fp16", "precision: unknown name 'amp_fp16'; did you mean 'amp_bf16'?"),
        ("model: {attn_config: {attn_type: gqa}}", "model.attn_config.attn_type: unknown name 'gqa'"),
        ("model: {ffn_config: {ffn_type: mptglue}}", "did you mean 'mptglu'?"),
        ("model: {d_model: 100, n_heads: 3}", "model.d_model: 100 is not divisible by model.n_heads 3"),
        ("model: {attn_config: {attn_type: grouped_query_attention, kv_n_heads: 5}}",
         "model.attn_config.kv_n_heads: 5 does not divide model.n_heads 16"),
        ("model: {attn_config: {attn_type: grouped_query_attention}}", "grouped_query_attention needs kv_n_heads"),
        ("global_train_batch_size: 0", "global_train_batch_size: must be positive, got 0"),
        ("device_train_microbatch_size: 0", "device_train_microbatch_size: expected a positive integer, 'auto' or null"),
        ("device_train_microbatch_size: big", "expected a positive integer, 'auto' or null, got 'big'"),
        ("max_duration: 10xx", "max_duration: invalid time '10xx'"),
        ("scheduler: {t_warmup: -5ba}", "scheduler.t_warmup: invalid time '-5ba' (negative); use e.g. '100ba'"),
        ("max_duration: 0.5dur", "max_duration: '0.5dur' is a fraction of the run itself"),
        ("model: {attn_config: {rope: true}}", "model.attn_config.rope: only false is supported"),
        ("train_loader: {dataset: {source: python_stdlib}}\neval_loader: {dataset: {source: python_stdlib, "
         "holdout_fraction: 0.3}}", "eval_loader.dataset.holdout_fraction: 0.3 differs from "
         "train_loader.dataset.holdout_fraction 0.05: files between the two would be trained on and evaluated on"),
    ],
)
def test_semantic_errors_name_the_key(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    message = error_of(load_config, path)
    assert message.startswith(f"{path}: ") and expected in message


def test_max_seq_len_above_the_models_names_both_numbers(tmp_path):
    message = error_of(load_config, write(tmp_path, "max_seq_len: 4096\nmodel: {max_seq_len: 2048}\n"))
    assert "max_seq_len: 4096 is longer than model.max_seq_len 2048" in message


def test_grouped_query_attention_that_divides_is_fine(tmp_path):
    cfg = load_config(write(tmp_path, "model: {attn_config: {attn_type: grouped_query_attention, kv_n_heads: 4}}\n"))
    assert cfg.model.attn_config.kv_n_heads == 4


# ----------------------------------------------------------------------------- devices


def test_validate_for_devices_accepts_divisible_batches():
    validate_for_devices(Config(global_train_batch_size=256, device_train_microbatch_size=16), 8)
    validate_for_devices(Config(global_train_batch_size=24, device_train_microbatch_size="auto"), 8)
    validate_for_devices(Config(global_train_batch_size=8), 1)


def test_validate_for_devices_names_all_three_numbers_and_a_fix():
    cfg = Config(global_train_batch_size=100, device_train_microbatch_size=16)
    message = error_of(validate_for_devices, cfg, 8)
    assert message == ("global_train_batch_size 100 is not divisible by 8 devices x "
                       "device_train_microbatch_size 16 = 128; use 128")
    message = error_of(validate_for_devices, Config(global_train_batch_size=300, device_train_microbatch_size=16), 8)
    assert message.endswith("use 256 or 384")


def test_validate_for_devices_uses_the_data_parallel_size():
    cfg = Config(global_train_batch_size=12)
    cfg.parallelism.tensor = 2
    validate_for_devices(cfg, 8)  # 4 data-parallel replicas
    cfg.global_train_batch_size = 10
    assert "4 data-parallel replicas (8 devices / tensor 2)" in error_of(validate_for_devices, cfg, 8)
    cfg.parallelism.tensor = 3
    assert "do not divide the 8 devices" in error_of(validate_for_devices, cfg, 8)


# ----------------------------------------------------------------------------- variables


def test_variables_keep_type_nest_and_embed(tmp_path):
    cfg = load_config(write(tmp_path, """\
        variables:
          seq: 512
          doubled: ${variables.seq}
          root: /data
          train_dir: ${variables.root}/train
          tokenizer_opts:
            model_max_length: ${variables.seq}
        max_seq_len: ${variables.doubled}
        model:
          max_seq_len: ${variables.seq}
        run_name: run-${variables.seq}
        tokenizer:
          kwargs: ${variables.tokenizer_opts}
        train_loader:
          dataset:
            source: text
            local: ${variables.train_dir}
        """))
    assert cfg.max_seq_len == 512 and isinstance(cfg.max_seq_len, int)
    assert cfg.model.max_seq_len == 512
    assert cfg.run_name == "run-512"
    assert cfg.tokenizer.kwargs == {"model_max_length": 512}
    assert cfg.train_loader.dataset.local == "/data/train"
    assert cfg.variables["train_dir"] == "/data/train"


def test_undefined_variable_names_the_referencing_key(tmp_path):
    path = write(tmp_path, "variables: {data_local: /x}\ntrain_loader: {dataset: {local: '${variables.data_lcal}'}}\n")
    message = error_of(load_config, path)
    assert message.startswith(f"{path}: train_loader.dataset.local: undefined variable '${{variables.data_lcal}}'")
    assert "did you mean '${variables.data_local}'?" in message


def test_circular_variables_and_null_embedding_are_errors(tmp_path):
    message = error_of(load_config, write(tmp_path, "variables: {a: '${variables.b}', b: '${variables.a}'}\n"))
    assert "circular reference" in message
    message = error_of(load_config, write(tmp_path, "variables: {bucket: null}\nsave_folder: s3://${variables.bucket}/x\n"))
    assert "save_folder: '${variables.bucket}' is null and cannot be embedded" in message


def test_plain_name_form_reads_variables_then_top_level(tmp_path):
    cfg = load_config(write(tmp_path, """\
        variables: {lr: 0.002}
        max_seq_len: 256
        model: {max_seq_len: '${max_seq_len}'}
        optimizer: {lr: '${lr}'}
        """))
    assert cfg.model.max_seq_len == 256 and cfg.optimizer.lr == 0.002


def test_escaped_reference_stays_literal_and_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, r"run_folder: 'runs/\${literal}'" + "\n"))
    assert cfg.run_folder == "runs/${literal}"
    assert load_config(write(tmp_path, dump_yaml(cfg), "dumped.yaml")) == cfg


# ----------------------------------------------------------------------------- --set


def test_overrides_scalars_nested_and_null(tmp_path):
    path = write(tmp_path, """\
        eval_loader: {dataset: {split: eval}}
        model: {d_model: 256, n_heads: 4}
        optimizer: {betas: [0.9, 0.95]}
        """)
    cfg = load_config(path, [
        "max_duration=10ba", "optimizer.lr=1e-3", "model.attn_config.qk_ln=true",
        "eval_loader=null", "optimizer.betas.1=0.99", "run_name=",
    ])
    assert cfg.max_duration == "10ba"
    assert cfg.optimizer.lr == 1e-3
    assert cfg.model.attn_config.qk_ln is True and cfg.model.d_model == 256
    assert cfg.eval_loader is None
    assert cfg.optimizer.betas == [0.9, 0.99]
    assert cfg.run_name is None
    cfg = load_config(None, ["eval_loader.dataset.split=eval"])
    assert isinstance(cfg.eval_loader, LoaderConfig) and cfg.eval_loader.dataset.split == "eval"


def test_overrides_merge_before_interpolation(tmp_path):
    path = write(tmp_path, """\
        variables: {seq: 1024, peak: 0.001}
        max_seq_len: ${variables.seq}
        model:
          max_seq_len: ${variables.seq}
        """)
    cfg = load_config(path, ["variables.seq=512", "optimizer.lr=${variables.peak}"])
    assert cfg.max_seq_len == 512 and cfg.model.max_seq_len == 512
    assert cfg.optimizer.lr == 0.001


def test_bad_overrides_are_named(tmp_path):
    assert "expected dotted.key=value" in error_of(load_config, None, ["max_duration"])
    assert error_of(load_config, None, ["optimizer.learning_rate=1"]) == (
        "unknown key 'optimizer.learning_rate' in --set; did you mean 'optimizer.lr'?")
    assert error_of(load_config, None, ["optimizer.lr=-1"]).startswith("--set: optimizer.lr: must be positive")
    assert "'seed' holds 17, not a section" in error_of(load_config, write(tmp_path, "seed: 17\n"), ["seed.x=1"])
    assert "set the whole list instead" in error_of(load_config, None, ["optimizer.betas.1=0.99"])


# ----------------------------------------------------------------------------- time strings


@pytest.mark.parametrize(
    "text, value, unit",
    [("100ba", 100, "ba"), ("2ep", 2, "ep"), ("50000tok", 50000, "tok"), ("0.1dur", 0.1, "dur"),
     ("1_000ba", 1000, "ba"), ("2Btok", 2e9, "tok"), ("1.5Mtok", 1.5e6, "tok"), ("64sp", 64, "sp"),
     (300, 300, "ba"), ("300", 300, "ba")],
)
def test_parse_time(text, value, unit):
    assert parse_time(text) == Time(value, unit)


@pytest.mark.parametrize("text", ["-3ba", "abc", "1.5ba", "10xx", "", "1__0ba", "ba"])
def test_parse_time_errors_name_the_key(text):
    message = error_of(parse_time, text, key="eval_interval")
    assert message.startswith("eval_interval: invalid time") and "'100ba'" in message


def test_to_batches():
    kw = dict(batches_per_epoch=50, tokens_per_batch=8 * 128, samples_per_batch=8, total_batches=30)
    assert to_batches(parse_time("100ba"), **kw) == 100
    assert to_batches(parse_time("2ep"), **kw) == 100
    assert to_batches(parse_time("50000tok"), **kw) == 49  # 48.8 batches, rounded up
    assert to_batches(parse_time("20sp"), **kw) == 3
    assert to_batches(parse_time("0.1dur"), **kw) == 3  # not 4 from float noise
    assert "epochs" in error_of(to_batches, parse_time("1ep"), **{**kw, "batches_per_epoch": None})
    assert "fraction of the run" in error_of(to_batches, parse_time("0.5dur"), **{**kw, "total_batches": None})


# ----------------------------------------------------------------------------- output


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(os.path.join(FIXTURES, "foundry_pretrain.yaml"), ["optimizer.lr=3e-4"], notices=[])
    dumped = write(tmp_path, dump_yaml(cfg), "resolved.yaml")
    assert load_config(dumped, notices=[]) == cfg
    assert config_to_dict(cfg)["optimizer"]["lr"] == 3e-4


def test_describe_lists_every_field_with_type_default_and_doc():
    text = describe(Config)
    assert "optimizer.lr: float = 0.0006  -- peak learning rate" in text
    assert "device_train_microbatch_size: int | str | None = None" in text
    assert "model.attn_config.kv_n_heads: int | None = None" in text


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=nan", "optimizer.lr: expected a finite number, got 'nan'"),
    ("optimizer.lr=.inf", "optimizer.lr: expected a finite number, got inf"),
    ("seed=99999999999999999999999", "seed: 99999999999999999999999 is out of range"),
    ("seed=-5", "seed: -5 must be in [0, 2**32)"),
    ("train_loader.dataset.shuffle_seed=4294967296", "train_loader.dataset.shuffle_seed: 4294967296 must be in"),
    ("run_name=../../elsewhere", "run_name: '../../elsewhere' is not a name"),
    ("save_folder=foo://bucket/ckpt", "save_folder: foo://bucket/ckpt: foo:// is not a storage scheme jaxtrain can "
                                      "read; use s3://BUCKET/PATH, gs://BUCKET/PATH or a local path"),
    ("load_path=s3:///ckpt", "load_path: s3:///ckpt: no bucket in the URL; write s3://BUCKET/PATH"),
])
def test_numbers_no_setting_can_mean_are_one_line(override, message):
    """Not-a-number and infinite values, integers past 64 bits, seeds outside Composer's range and
    URLs no store reads are refused where they are set, naming the key the user wrote."""
    text = error_of(load_config, None, [override])
    assert message in text and "\n" not in text


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    path = write(tmp_path, "max_duration: 3ba\nmodel:\n  d_model: 64\n  n_layers: 2\n  d_model: 32\n")
    assert error_of(load_config, path) == (f"{path}:5: malformed YAML (the key 'd_model' is given twice in one "
                                           f"mapping (remove one)); fix the file at that line")
    # a key brought in by a merge may be overridden
    path = write(tmp_path, "variables:\n  base: &b {a: 1, b: 2}\n  other:\n    <<: *b\n    a: 3\n", "merge.yaml")
    assert load_config(path).variables["other"] == {"a": 3, "b": 2}


def test_a_run_longer_than_the_step_counter_is_refused():
    from jaxtrain.train.setup import _plan_optimizer

    cfg = load_config(None, ["max_duration=3000000000ba"])
    text = error_of(_plan_optimizer, cfg, batches_per_epoch=10)
    assert "max_duration: '3000000000ba' is 3000000000 batches; a run takes at most 2147483647 steps" in text
