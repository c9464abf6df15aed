"""LLM Foundry's YAMLs as Foundry reads them: its vocabulary mapped to jaxtrain's, keys with no
meaning here accepted with a notice, and what jaxtrain cannot do refused in one line. The
``foundry_*.yaml`` fixtures are trimmed copies of Foundry's own pretrain, fine-tuning and eval
YAMLs, in their structure."""

from __future__ import annotations

import logging
import os

import pytest

from jaxtrain.config import load_config
from test_config import FIXTURES, error_of, write


# ----------------------------------------------------------------------------- LLM Foundry


def test_foundry_pretrain_yaml_loads_with_notices():
    notices: list[str] = []
    cfg = load_config(os.path.join(FIXTURES, "foundry_pretrain.yaml"), notices=notices)
    assert cfg.seed == 23 and cfg.max_seq_len == 1024 and cfg.run_name == "foundry-compat"
    assert cfg.model.attn_config.attn_impl == "xla" and cfg.model.init_device == "meta"
    assert cfg.model.loss_fn == "torch_crossentropy"
    assert cfg.tokenizer.kwargs == {"model_max_length": 1024}
    dataset = cfg.train_loader.dataset
    assert dataset.source == "mds" and dataset.local == "/tmp/jaxtrain-test/c4-mds" and dataset.remote is None
    assert dataset.extra == {"shuffle_algo": "py1e", "num_canonical_nodes": 8, "predownload": 64}
    assert cfg.eval_loader.dataset.split == "val" and cfg.eval_loader.dataset.shuffle_seed == 23
    assert cfg.loggers == {"tensorboard": {}}
    assert list(cfg.callbacks) == ["speed_monitor", "lr_monitor", "memory_monitor", "runtime_estimator"]
    assert cfg.algorithms.gradient_clipping.clipping_threshold == 1.0
    assert cfg.optimizer.betas == [0.9, 0.95] and cfg.optimizer.eps == 1e-8
    assert cfg.autoresume is True and cfg.save_num_checkpoints_to_keep == 1

    def notice(start: str) -> str:
        found = [n for n in notices if n.startswith(start)]
        assert len(found) == 1, (start, notices)
        return found[0]

    assert notice("fsdp_config:") == "fsdp_config: no meaning in jaxtrain (sharding comes from 'parallelism'); ignored"
    assert "ignored" in notice("dist_timeout:")
    assert "'flash'" in notice("model.attn_config.attn_impl:")
    assert "accepted" in notice("model.init_device:")
    assert "no telemetry" in notice("loggers.wandb:")
    assert "dropped" in notice("callbacks.hf_checkpointer:")
    assert "shuffle_algo, num_canonical_nodes, predownload" in notice("train_loader.dataset:")
    assert len(notices) == 7
    # Keys the Foundry file leaves unset take Foundry's MPT defaults: the same model as Foundry builds.
    assert cfg.model.no_bias is False and cfg.model.attn_config.alibi is False and cfg.model.learned_pos_emb is True


def test_foundry_legacy_top_level_variables():
    notices: list[str] = []
    cfg = load_config(os.path.join(FIXTURES, "foundry_legacy.yaml"), notices=notices)
    assert cfg.seed == 5  # from global_seed
    assert cfg.max_seq_len == cfg.model.max_seq_len == 512
    assert cfg.train_loader.dataset.local == "./my-mds-copy" and cfg.train_loader.dataset.source == "mds"
    assert cfg.eval_interval == "0ba" and cfg.device_train_microbatch_size == "auto"
    assert cfg.variables == {"data_local": "./my-mds-copy", "data_remote": None, "global_seed": 5}
    assert any("'triton'" in n for n in notices)
    cfg = load_config(os.path.join(FIXTURES, "foundry_legacy.yaml"), ["data_local=/elsewhere"], notices=[])
    assert cfg.train_loader.dataset.local == "/elsewhere"


def test_foundry_keys_that_change_the_math_are_errors(tmp_path):
    message = error_of(load_config, write(tmp_path, "model: {attn_config: {qk_gn: true}}\n"))
    assert "model.attn_config.qk_gn: True is not supported by jaxtrain" in message
    cfg = load_config(write(tmp_path, "model: {attn_config: {qk_gn: false, fused_qkv: true}, fc_type: torch}\n"),
                      notices=(notices := []))
    assert cfg.model.attn_config.qk_ln is False
    assert notices == ["model.fc_type: jaxtrain's linear layers need no Transformer Engine: precision amp_fp8 "
                       "takes their products in fp8; ignored"]
    # Foundry's fp8 recipe (Transformer Engine layers, amp_fp8) is jaxtrain's amp_fp8
    cfg = load_config(write(tmp_path, "precision: amp_fp8\nmodel: {fc_type: te}\n"), notices=[])
    assert cfg.precision == "amp_fp8"


def test_notices_are_logged_when_not_collected(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_config(write(tmp_path, "dist_timeout: 600\n"))
    assert "dist_timeout: no meaning in jaxtrain" in caplog.text


def test_foundry_list_of_eval_loaders_uses_the_first(tmp_path):
    path = write(tmp_path, """\
        eval_loader:
          - {label: c4, name: text, dataset: {local: /c4, split: val}}
          - {label: code, name: text, dataset: {local: /code, split: val}}
        """)
    cfg = load_config(path, notices=(notices := []))
    assert cfg.eval_loader.dataset.local == "/c4" and cfg.eval_loader.dataset.source == "mds"
    assert notices == ["eval_loader: jaxtrain evaluates one loader; using the first of [c4, code]"]


def test_foundry_finetuning_loader(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    path = write(tmp_path, f"""\
        model: {{attn_config: {{attn_uses_sequence_id: true}}}}
        train_loader:
          name: finetuning
          dataset:
            hf_name: json
            hf_kwargs: {{data_files: {{train: {data}}}}}
            split: train
            decoder_only_format: true
            packing_ratio: auto
            target_responses: all
            pad_to_longest: true
        """)
    cfg = load_config(path, notices=(notices := []))
    dataset = cfg.train_loader.dataset
    assert (dataset.source, dataset.local, dataset.packing_ratio, dataset.target_responses) == (
        "finetune_jsonl", str(data), "auto", "all")
    assert notices == ["train_loader.dataset.pad_to_longest: rows always have max_seq_len tokens and no example is "
                       "dropped; ignored"]
    local = write(tmp_path, f"train_loader: {{name: finetuning, dataset: {{hf_name: {data}, split: train}}}}\n")
    assert load_config(local, notices=[]).train_loader.dataset.local == str(data)
    hub = write(tmp_path, "train_loader: {name: finetuning, dataset: {hf_name: mosaicml/dolly_hhrlhf, split: train}}\n")
    assert "'mosaicml/dolly_hhrlhf' is not a local path; jaxtrain downloads no datasets" in error_of(load_config, hub)
    python = write(tmp_path, "train_loader: {name: finetuning, dataset: {hf_name: x, preprocessing_fn: m:f}}\n")
    assert "preprocessing_fn: jaxtrain runs no Python preprocessing" in error_of(load_config, python)


def test_finetuning_options_and_loader_names_are_checked(tmp_path):
    message = error_of(load_config, write(tmp_path, "train_loader: {dataset: {packing_ratio: auto}}\n"))
    assert "train_loader.dataset.packing_ratio: applies to source finetune_jsonl only, not 'python_stdlib'" in message
    message = error_of(load_config, write(tmp_path, "train_loader: {name: txt}\n"))
    assert "train_loader.name: unknown name 'txt'; did you mean 'text'?" in message
    message = error_of(load_config, write(tmp_path, "train_loader: {name: finetuning, dataset: {source: jsonl}}\n"))
    assert "train_loader.dataset.source: 'jsonl' under the finetuning loader" in message


# ----------------------------------------------------------------------------- LLM Foundry's own YAMLs
# Trimmed copies of the YAMLs in LLM Foundry's scripts/train/yamls and scripts/eval/yamls.


def foundry(name: str, overrides=(), *, expect_error: bool = False):
    """(config, notices) of a Foundry fixture, or the one-line error message it raises."""
    path = os.path.join(FIXTURES, name)
    if expect_error:
        return error_of(load_config, path, overrides, notices=[])
    notices: list[str] = []
    return load_config(path, overrides, notices=notices), notices


def test_foundry_mpt_7b_activation_checkpointing_is_full_remat():
    cfg, notices = foundry("foundry_mpt_7b.yaml")
    assert (cfg.model.d_model, cfg.model.n_heads, cfg.model.n_layers) == (4096, 32, 32)
    assert cfg.model.remat == "full"  # fsdp_config.activation_checkpointing: true
    assert (cfg.optimizer.lr, cfg.max_duration, cfg.eval_interval) == (1.2e-4, "63900ba", "5000ba")
    assert (cfg.global_train_batch_size, cfg.device_train_microbatch_size, cfg.seed) == (1024, 8, 17)
    assert cfg.train_loader.dataset.source == "mds" and cfg.eval_loader.dataset.split == "val"
    assert notices == [
        "fsdp_config: no meaning in jaxtrain (sharding comes from 'parallelism'); ignored",
        "fsdp_config.activation_checkpointing: true recomputes each block in the backward pass: model.remat: full",
        "model.init_device: 'meta' has no meaning in jaxtrain (parameters are created already sharded); accepted",
        "model.attn_config.attn_impl: 'flash' is a PyTorch kernel; using 'xla'",
    ]
    # an explicit model.remat wins over fsdp_config
    cfg, notices = foundry("foundry_mpt_7b.yaml", ["model.remat=auto"])
    assert cfg.model.remat == "auto" and not any("activation_checkpointing" in n for n in notices)


def test_foundry_mpt_small_cpu():
    cfg, notices = foundry("foundry_mpt_small_cpu.yaml")
    assert cfg.run_name == "mpt_causal_lm_cpu" and cfg.precision == "fp32" and cfg.max_seq_len == 128
    assert (cfg.model.d_model, cfg.model.expansion_ratio, cfg.model.loss_fn) == (16, 5.0, "torch_crossentropy")
    assert cfg.model.remat == "none"  # activation_checkpointing: false
    assert (cfg.max_duration, cfg.eval_interval, cfg.eval_subset_num_batches) == ("10ba", "5ba", 5)
    assert cfg.save_overwrite is True and cfg.save_num_checkpoints_to_keep == 1 and cfg.autoresume is False
    assert len(notices) == 2 and "'torch' is a PyTorch kernel" in notices[1]


def test_foundry_mixture_of_experts_is_one_line():
    message = foundry("foundry_testing_moe.yaml", expect_error=True)
    assert message.endswith("model.ffn_config.ffn_type: 'mb_dmoe' (MegaBlocks dropless mixture of experts) is not "
                            "supported by jaxtrain; use mptmlp or mptglu")


def test_foundry_hugging_face_models_are_one_line():
    message = foundry("foundry_mpt_7b_dolly_sft.yaml", expect_error=True)
    assert "model.name: 'hf_causal_lm' (mosaicml/mpt-7b) is a Hugging Face model" in message
    assert "set pretrained_model_name_or_path to a local folder holding its config.json and safetensors" in message
    mpt = "model={name: mpt_causal_lm, d_model: 64, n_heads: 2, n_layers: 1}"
    message = foundry("foundry_mpt_7b_dolly_sft.yaml", [mpt], expect_error=True)
    assert message.endswith("train_loader.dataset.hf_name: 'mosaicml/dolly_hhrlhf' is not a local path; jaxtrain "
                            "downloads no datasets: save it as JSONL (prompt/response or messages) and set "
                            "train_loader.dataset.local")


def test_foundry_hf_causal_lm_on_a_local_mpt_folder_builds_it_and_starts_from_its_weights(tmp_path):
    """Foundry's SFT YAML with the model downloaded to a folder: its config.json, changed by
    config_overrides, is the model; its weights are load_path; peft_config makes it LoRA."""
    folder = os.path.join(os.path.dirname(FIXTURES), "hf_mpt", "mha")
    data = tmp_path / "dolly.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    local = [f"model.pretrained_model_name_or_path={folder}", f"train_loader.dataset.hf_name={data}",
             f"eval_loader.dataset.hf_name={data}"]
    cfg, notices = foundry("foundry_mpt_7b_dolly_sft.yaml", local)
    model = cfg.model
    assert (model.name, model.d_model, model.n_heads, model.n_layers, model.vocab_size) == ("mpt_causal_lm", 32, 4, 2, 128)
    assert model.max_seq_len == 2048 and model.attn_config.alibi and not model.attn_config.attn_uses_sequence_id
    assert cfg.load_path == folder and model.peft_config is None
    assert f"jaxtrain builds the MPT that {folder}/config.json describes and starts from its weights" in " ".join(notices)
    cfg, _ = foundry("foundry_mpt_7b_dolly_sft.yaml", [*local, "model.peft_config={r: 4, target_modules: [Wqkv]}"])
    assert cfg.model.peft_config.r == 4 and cfg.model.peft_config.target_modules == ["Wqkv"]
    assert cfg.save_frozen_weights is None  # Composer's should_save_peft_only: true, adapters-only checkpoints
    lora = [*local, "model.peft_config={r: 4, target_modules: [Wqkv]}", "model.should_save_peft_only=false"]
    cfg, notices = foundry("foundry_mpt_7b_dolly_sft.yaml", lora)
    assert cfg.save_frozen_weights is True and any("save_frozen_weights: true" in line for line in notices)
    # 8-bit frozen weights: int8 with a scale per column, for a LoRA run only
    cfg, notices = foundry("foundry_mpt_7b_dolly_sft.yaml", [*lora, "model.load_in_8bit=true"])
    assert cfg.model.quantize_frozen == "int8" and any("quantize_frozen: int8" in line for line in notices)
    cfg, _ = foundry("foundry_mpt_7b_dolly_sft.yaml", [*lora, "model.quantize_frozen=nf4"])  # jaxtrain's own key
    assert cfg.model.quantize_frozen == "nf4"
    message = foundry("foundry_mpt_7b_dolly_sft.yaml", [*local, "model.load_in_8bit=true"], expect_error=True)
    assert "model.load_in_8bit: true: only a LoRA run (model.peft_config) keeps frozen weights in 8 bits" in message
    assert "\n" not in message
    message = foundry("foundry_mpt_7b_dolly_sft.yaml", [*local, "model.d_model=64"], expect_error=True)
    assert "model.d_model: not a key of Foundry's hf_causal_lm model" in message and "config_overrides" in message


def test_foundry_7b_dolly_sft_with_local_data(tmp_path):
    data = tmp_path / "dolly.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    message = foundry("foundry_7b_dolly_sft.yaml", expect_error=True)
    assert "'HuggingFaceH4/databricks_dolly_15k' is not a local path" in message
    cfg, notices = foundry("foundry_7b_dolly_sft.yaml", [f"train_loader.dataset.hf_name={data}"])
    dataset = cfg.train_loader.dataset
    assert (dataset.source, dataset.local, dataset.split, dataset.max_seq_len) == (
        "finetune_jsonl", str(data), "train", 2048)
    assert cfg.train_loader.name == "finetuning" and cfg.eval_loader is None
    assert cfg.eval_interval == "1ba"  # no eval loader: Foundry's "1" (an epoch) has no effect either way
    assert (cfg.scheduler.name, cfg.scheduler.alpha_f, cfg.optimizer.betas) == ("linear_decay_with_warmup", 0.0,
                                                                                 [0.9, 0.999])
    assert cfg.model.remat == "full" and cfg.load_path.startswith("oci://")
    assert not any(n.startswith(("load_path", "load_weights_only", "eval_interval")) for n in notices)


def test_foundry_1b_local_data_sft_anchors_and_data_dir():
    cfg, notices = foundry("foundry_1b_local_data_sft.yaml")
    train, held = cfg.train_loader.dataset, cfg.eval_loader.dataset
    assert (train.source, train.local, train.split) == ("finetune_jsonl", "/tmp/jaxtrain-test/sft-jsonl", "train")
    assert (held.source, held.local, held.split) == ("finetune_jsonl", "/tmp/jaxtrain-test/sft-jsonl", "validation")
    assert cfg.eval_loader.name == "finetuning" and cfg.eval_loader.num_workers == 8  # merged from *train_loader
    # the top-level 'dataset' only holds the YAML anchor: a variable, as Foundry reads it
    assert cfg.variables["dataset"] == {"hf_name": "json", "hf_kwargs": {"data_dir": "/tmp/jaxtrain-test/sft-jsonl"}}
    assert notices == [
        "model.init_device: 'meta' has no meaning in jaxtrain (parameters are created already sharded); accepted",
        "model.attn_config.attn_impl: 'flash' is a PyTorch kernel; using 'xla'",
    ]


def test_top_level_section_that_is_not_an_anchor_is_still_a_mistake(tmp_path):
    path = write(tmp_path, "dataset: {hf_name: json, split: train}\ntrain_loader: {dataset: {split: train}}\n")
    assert "unknown key 'dataset'" in error_of(load_config, path)
    path = write(tmp_path, "optimzer: {lr: 0.001}\noptimizer: {lr: 0.001}\n")
    assert "unknown key 'optimzer'" in error_of(load_config, path)
    cfg = load_config(write(tmp_path, "shared: &t [{label: a}]\nicl_tasks: *t\n"))
    assert cfg.icl_tasks == [{"label": "a"}] and cfg.variables["shared"] == [{"label": "a"}]


def test_foundry_mpt_30b_instruct_icl_tasks_inline():
    message = foundry("foundry_mpt_30b_instruct.yaml", expect_error=True)
    assert "model.name: 'hf_causal_lm' (mosaicml/mpt-30b)" in message
    overrides = ["model={name: mpt_causal_lm, d_model: 64, n_heads: 2, n_layers: 1, max_seq_len: 8192}",
                 "train_loader.dataset.hf_name=json", "train_loader.dataset.hf_kwargs={data_files: /data/it.jsonl}"]
    cfg, notices = foundry("foundry_mpt_30b_instruct.yaml", overrides)
    assert cfg.variables["icl_max_seq_len"] == 2048  # a leftover variable in Foundry too: each task sets its own
    task = cfg.icl_tasks[0]
    assert (task["label"], task["max_seq_len"], task["batch_size"], task["continuation_delimiter"]) == (
        "piqa", 2048, 4, " ")
    assert cfg.train_loader.dataset.packing_ratio == 9 and cfg.train_loader.dataset.local == "/data/it.jsonl"
    assert (cfg.max_duration, cfg.eval_interval, cfg.eval_first) == ("8ep", "1ep", True)
    assert list(cfg.callbacks) == ["speed_monitor", "runtime_estimator", "lr_monitor"]
    assert notices == []  # the model given on the command line replaces Foundry's whole section


def test_foundry_streaming_finetuning_data_is_one_line():
    mpt = "model={name: mpt_causal_lm, d_model: 64, n_heads: 2, n_layers: 1}"
    message = foundry("foundry_gpt2_arc_easy_streaming.yaml", [mpt], expect_error=True)
    assert message.endswith("train_loader.dataset.streams: Foundry's streaming fine-tuning data (MDS shards) is not "
                            "read by jaxtrain; save the examples as prompt/response or messages JSONL and set "
                            "train_loader.dataset.local")


def test_foundry_eval_config_is_one_line():
    message = foundry("foundry_mpt_eval.yaml", expect_error=True)
    assert "models: this is a Foundry eval.py config" in message and "`jaxtrain eval --checkpoint DIR" in message


def test_foundry_icl_tasks_and_gauntlet_paths_are_kept():
    cfg, _ = foundry("foundry_mpt_7b.yaml", ["icl_tasks=eval/yamls/tasks_v0.3.yaml", "icl_seq_len=1024",
                                             "eval_gauntlet=eval/yamls/eval_gauntlet_v0.3.yaml"])
    assert (cfg.icl_tasks, cfg.eval_gauntlet, cfg.icl_seq_len) == (
        "eval/yamls/tasks_v0.3.yaml", "eval/yamls/eval_gauntlet_v0.3.yaml", 1024)


def test_composer_integer_durations_are_epochs(tmp_path):
    path = write(tmp_path, """\
        max_duration: 3
        eval_interval: 1
        save_interval: 2
        console_log_interval: 0
        eval_loader: {dataset: {source: python_stdlib, split: eval}}
        """)
    cfg = load_config(path, notices=(notices := []))
    assert (cfg.max_duration, cfg.eval_interval, cfg.save_interval, cfg.console_log_interval) == (
        "3ep", "1ep", "2ep", "0ba")
    assert notices[1] == "eval_interval: 1 is 1 epoch, as Composer reads a bare integer (write 1ba for batches)"
    assert load_config(None, ["max_duration=20ba"]).max_duration == "20ba"


def test_foundry_trainer_keys(tmp_path):
    message = error_of(load_config, write(tmp_path, "accumulate_train_batch_on_tokens: false\n"))
    assert ("accumulate_train_batch_on_tokens: false (each microbatch's mean loss weighted alike) is not "
            "supported") in message
    cfg = load_config(write(tmp_path, "accumulate_train_batch_on_tokens: true\nflatten_metadata: true\n"),
                      notices=(notices := []))
    assert notices == ["flatten_metadata: no meaning in jaxtrain (metadata is stored as given with the resolved "
                       "config); ignored"]
    cfg = load_config(write(tmp_path, "load_path: runs/a/checkpoints\n"), notices=(notices := []))
    assert cfg.load_path == "runs/a/checkpoints" and notices == [
        "load_path: loads the weights only (a fresh optimizer and schedule from step 0, as Foundry's "
        "load_weights_only: true); to continue a run, set save_folder and autoresume: true"]
    load_config(write(tmp_path, "load_path: runs/a\nload_weights_only: true\n"), notices=(notices := []))
    assert notices == []


def test_document_masking_on_text_rows_splits_at_the_configured_token(tmp_path):
    text = ("model: {attn_config: {attn_uses_sequence_id: true}}\n"
            "train_loader: {dataset: {local: /mds, bos_token_id: 1}}\n")
    cfg = load_config(write(tmp_path, text))
    assert cfg.model.attn_config.attn_uses_sequence_id is True
    assert cfg.train_loader.dataset.bos_token_id == 1 and "bos_token_id" not in cfg.train_loader.dataset.extra
    # Foundry's leave for an id other than the tokenizer's: jaxtrain takes the ids as given
    text = ("train_loader: {dataset: {local: /mds, eos_token_id: 0, override_eos_token_id_mismatch_error: true}}\n"
            "algorithms: {ema: {half_life: 100ba}}\n")
    cfg = load_config(write(tmp_path, text), notices=(notices := []))
    assert cfg.train_loader.dataset.eos_token_id == 0 and cfg.algorithms.ema.half_life == "100ba"
    assert notices == ["train_loader.dataset.override_eos_token_id_mismatch_error: jaxtrain uses eos_token_id / "
                       "bos_token_id as given; ignored"]


@pytest.mark.parametrize("text, expected", [
    ("model: {d_model: 256, n_heads: 4, head_dim: 64}", None),
    ("model: {d_model: 256, n_heads: 4, head_dim: 128}", "model.head_dim: 128 is not d_model / n_heads (256 / 4)"),
    ("model: {no_bias: true, attention_bias: false}", None),
    ("model: {no_bias: true, attention_bias: true}", "model.attention_bias: True differs from no_bias: True"),
    ("model: {attn_config: {nope: false, attn_temperature_tuning: {floor_scale: 8192, attn_scale: 0.0}}}", None),
    ("model: {attn_config: {nope: true}}", "model.attn_config.nope: True is not supported by jaxtrain"),
    ("model: {attn_config: {attn_temperature_tuning: {attn_scale: 0.1}}}",
     "model.attn_config.attn_temperature_tuning.attn_scale: 0.1 is not supported"),
    ("model: {init_config: {init_gain: 0.0, emb_init_uniform_lim: null}}", None),
    ("model: {init_config: {init_gain: 0.2}}", None),  # relu's gain ignores it, as torch's does
    ("model: {init_config: {init_gain: 0.2, init_nonlinearity: leaky_relu}}",
     "model.init_config.init_gain: 0.2 (a leaky_relu slope) is not supported"),
    ("model: {init_config: {emb_init_uniform_lim: 0.1}}",
     "model.init_config.emb_init_uniform_lim: 0.1 is not supported"),
    ("model: {ffn_config: {ffn_type: te_ln_mlp}}", "'te_ln_mlp' (Transformer Engine's fused LayerNorm and MLP)"),
    ("model: {name: hf_t5, pretrained_model_name_or_path: t5-small}",
     "model.name: 'hf_t5' (t5-small) is a Hugging Face"),
    ("optimizer: {amsgrad: false}", None),
    ("optimizer: {amsgrad: true}",
     "optimizer.amsgrad: True is not supported by jaxtrain; remove the key or set it to False"),
    ("scheduler: {name: constant_with_warmup, alpha: 1.0}", None),
])
def test_foundry_model_and_optimizer_keys(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    if expected is None:
        load_config(path, notices=[])
    else:
        message = error_of(load_config, path, notices=[])
        assert message.startswith(f"{path}: ") and expected in message


def test_foundry_model_metric_options_are_notices(tmp_path):
    load_config(write(tmp_path, "model: {use_train_metrics: false, additional_train_metrics: [a]}\n"),
                notices=(notices := []))
    assert notices == ["model.use_train_metrics: Foundry option with no effect on jaxtrain's math; ignored",
                       "model.additional_train_metrics: Foundry option with no effect on jaxtrain's math; ignored"]


@pytest.mark.parametrize("dataset, expected", [
    ("{hf_name: json, hf_kwargs: {data_dir: /d, data_files: {train: t.jsonl}}, split: train}", "/d/t.jsonl"),
    ("{hf_name: json, hf_kwargs: {data_files: [/d/a.jsonl]}, split: train, safe_load: true}", "/d/a.jsonl"),
    ("{hf_name: csv, hf_kwargs: {data_files: /d/a.csv}}",
     "hf_name: 'csv' files are not read by jaxtrain, which reads JSONL"),
    ("{hf_name: json, hf_kwargs: {data_files: [/a.jsonl, /b.jsonl]}}",
     "give one file, folder or glob for split 'train', or data_dir"),
    ("{local: /d, seq_parallel_replication: 2}", "seq_parallel_replication: 2 is not supported by jaxtrain"),
    ("{remote: s3://bucket/ft, local: /tmp/ft}", "train_loader.dataset.remote: Foundry's streaming fine-tuning data"),
])
def test_foundry_finetuning_dataset_keys(tmp_path, dataset, expected):
    path = write(tmp_path, f"train_loader: {{name: finetuning, dataset: {dataset}}}\n")
    if expected.startswith("/"):
        assert load_config(path, notices=[]).train_loader.dataset.local == expected
    else:
        assert expected in error_of(load_config, path, notices=[])
    notices: list[str] = []
    path = write(tmp_path, "train_loader: {name: finetuning, dataset: {hf_name: json, hf_kwargs: "
                           "{data_files: /a.jsonl, field: data}, auto_packing_replication: 2}}\n")
    load_config(path, notices=notices)
    assert notices == ["train_loader.dataset.auto_packing_replication: packing_ratio auto is profiled on all the "
                       "examples; ignored",
                       "train_loader.dataset.hf_kwargs: field: the JSONL files are read as they are; ignored"]
