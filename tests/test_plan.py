"""The planner against published figures: Chinchilla's tables, LLM Foundry's throughput tables,
MosaicML's MPT-7B run, ZeRO's memory arithmetic, and XLA's own memory analysis."""

from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from jaxtrain.config.schema import ModelConfig
from jaxtrain.metrics.hardware import get_hardware
from jaxtrain.models import build_model
from jaxtrain.plan import chinchilla
from jaxtrain.plan.cli import main
from jaxtrain.plan.inputs import load_bench, parse_count
from jaxtrain.plan.cost import ModelShape, RunCost
from jaxtrain.plan.ladder import PRESET_DIR, load_presets
from jaxtrain.plan.memory import estimate_memory

# Hoffmann et al. 2022, Table 3 (Approach 1): parameters, FLOPs, tokens.
PAPER_TABLE_3 = [
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
]
# Table A3, Approach 2 and Approach 3 columns (a few rows).
PAPER_TABLE_A3 = {
    "approach2": [(400e6, 1.84e19, 7.7e9), (10e9, 1.32e22, 219.5e9), (1e12, 1.59e26, 26.5e12)],
    "approach3": [(400e6, 2.21e19, 9.2e9), (10e9, 2.46e22, 410.1e9), (1e12, 5.65e26, 94.1e12)],
}


def _close(value, expected, rel):
    return abs(value / expected - 1) <= rel


# ----------------------------------------------------------------------------- Chinchilla


@pytest.mark.parametrize("params,flops,tokens", PAPER_TABLE_3)
def test_table_3_allocation(params, flops, tokens):
    # FLOPs are printed to 3 significant figures (up to 0.3% off), which moves tokens by ~0.5%.
    # Gopher's row (67B, 5.76e23 = Gopher's own budget) prints 1.5T tokens, but 6 * 67e9 * 1.5e12
    # is 6.03e23: the row itself is 4.7% off 6*N*D, so its tokens get that much slack.
    allocation = chinchilla.compute_optimal(flops)
    assert _close(allocation.params, params, 0.015)
    assert _close(allocation.tokens, tokens, 0.06 if params == 67e9 else 0.01)
    assert _close(chinchilla.compute_optimal_for_params(params).flops, flops, 0.03)


@pytest.mark.parametrize("approach", sorted(PAPER_TABLE_A3))
def test_table_a3_allocation(approach):
    for params, flops, tokens in PAPER_TABLE_A3[approach]:
        allocation = chinchilla.compute_optimal(flops, approach)
        assert _close(allocation.params, params, 0.01)
        assert _close(allocation.tokens, tokens, 0.01)


def test_exponents_match_table_2():
    # Table 2: N_opt ~ C^a with a = 0.50 (Approach 1), 0.49 (Approach 2), 0.46 (Approach 3).
    published = {"approach1": 0.50, "approach2": 0.49, "approach3": 0.46}
    for approach, a in published.items():
        assert abs(chinchilla.ALLOCATIONS[approach].exponent - a) < 0.005


def test_predicted_loss_is_the_published_law():
    # Equation 10 with E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, at Chinchilla's 70B / 1.4T.
    expected = 1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28
    assert chinchilla.predicted_loss(70e9, 1.4e12) == pytest.approx(expected, rel=1e-12)
    assert chinchilla.predicted_loss(70e9, 1.4e12) < chinchilla.predicted_loss(280e9, 300e9)  # beats Gopher
    assert chinchilla.predicted_loss(1e40, 1e40) == pytest.approx(1.69, abs=1e-6)  # E, the entropy floor


# ----------------------------------------------------------------------------- throughput and cost


@pytest.mark.parametrize(
    "hardware,mfu,n_params,tokens_per_s",
    [
        # LLM Foundry benchmarking README, MPT-7B at seq 2048 on 8 devices (MFU, NumParams, T/s/GPU).
        ("a100-40gb", 0.5092, 6658859008, 3679),
        ("a100-80gb", 0.6423, 6658859008, 4641),
        ("h100", 0.4644, 6658859008, 10643),
    ],
)
def test_foundry_throughput_table(hardware, mfu, n_params, tokens_per_s):
    run = RunCost(n_params, 1e12, ModelShape(32, 4096, 2048), get_hardware(hardware), 8, mfu)
    assert _close(run.tokens_per_second_per_device, tokens_per_s, 0.01)


def test_mpt_7b_run():
    # MosaicML: MPT-7B, 1T tokens on 440 A100-40GB in ~9.5 days for ~$200k. Price assumption
    # $2.00 per A100-hour ($200k / (440 GPUs * 228 h)). MFU 0.40 sits inside LLM Foundry's
    # published A100-40GB range (36-56%) and below its 7b/2048 rows (~50%): the real run's
    # wall time also covers checkpointing, evaluation and recovery from failures.
    preset = next(p for p in load_presets() if p.name == "7b")
    a100 = dataclasses.replace(get_hardware("a100-40gb"), price_per_hour_usd=2.00)
    run = RunCost(preset.params, 1e12, preset.shape, a100, 440, 0.40)
    assert _close(run.days, 9.5, 0.15)
    assert _close(run.cost_usd, 200_000, 0.15)


def test_reverse_cli_reproduces_mpt_7b(capsys):
    code = main(["--preset", "7b", "--tokens", "1T", "--devices", "440", "--hardware", "a100-40gb",
                 "--price-per-hour", "2", "--mfu", "0.4"])
    out = capsys.readouterr().out
    assert code == 0
    days = float(re.search(r"wall time\s+([\d.]+) days", out).group(1))
    cost = float(re.search(r"cost\s+\$([\d,]+)", out).group(1).replace(",", ""))
    assert _close(days, 9.5, 0.15) and _close(cost, 200_000, 0.15)
    assert "scaling-law (6*N*D)" in out and "model FLOPs" in out


def test_parse_count():
    assert parse_count("1T") == 1e12
    assert parse_count("20B") == 20e9
    assert parse_count("500M") == 500e6
    assert parse_count("6.7b") == pytest.approx(6.7e9)
    assert parse_count("1.5e12") == 1.5e12


# ----------------------------------------------------------------------------- the CLI


def test_budget_cli_prints_table_and_writes_png(tmp_path, capsys):
    plot = tmp_path / "ladder.png"
    assert main(["--budget-usd", "50000", "--hardware", "h100", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "compute-optimal model" in out and "predicted loss" in out and "nearest preset" in out
    assert "editable assumption" in out and "MFU" in out and "default assumption" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+\s+\S+[MBT]\s", line)]
    assert len(rows) == 6
    assert "$50,000" in rows[-1]  # the top rung spends the budget
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budget_cli_other_budgets(tmp_path, capsys):
    assert main(["--budget-flops", "1.21e20", "--hardware", "a100-80gb", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"compute-optimal model\s+(999M|1(\.00)?B) parameters on 20\.[12]B tokens", out)  # Table 3 row
    assert (tmp_path / "plan.png").exists()
    assert main(["--hours", "24", "--devices", "64", "--hardware", "tpu-v5p", "--no-plot"]) == 0


def test_mfu_from_bench_file(tmp_path, capsys):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"mfu": 0.4644, "hardware": "h100", "tokens_per_second_per_device": 10643.0}))
    assert load_bench(str(bench)).mfu == 0.4644
    assert main(["--budget-usd", "50000", "--mfu", f"from:{bench}", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "46.4%" in out and "measured by jaxtrain bench" in out and "h100" in out


def test_fp8_bench_file_plans_against_the_fp8_peak(tmp_path, capsys):
    """A bench run in amp_fp8 measured its MFU against the fp8 peak; the plan takes that peak from
    the file, refuses a contradicting --precision, and has no default MFU for amp_fp8."""
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"mfu": 0.3, "hardware": "h100", "tokens_per_second_per_device": 1.0,
                                 "precision": "amp_fp8"}))  # fmt: skip
    assert main(["--budget-usd", "50000", "--mfu", f"from:{bench}", "--no-plot"]) == 0
    assert "1,979 TFLOP/s dense fp8 peak" in capsys.readouterr().out
    assert main(["--budget-usd", "50000", "--mfu", f"from:{bench}", "--precision", "amp_bf16", "--no-plot"]) == 2
    assert "measured in amp_fp8" in capsys.readouterr().err
    assert main(["--budget-usd", "50000", "--hardware", "h100", "--precision", "amp_fp8", "--no-plot"]) == 2
    assert "no default MFU" in capsys.readouterr().err
    # a device without fp8 units: amp_fp8 runs at its bf16 peak, and the default MFU stands
    assert main(["--budget-usd", "50000", "--hardware", "a100-80gb", "--precision", "amp_fp8", "--no-plot"]) == 0
    assert "312 TFLOP/s dense bf16 peak" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["--budget-usd", "50000", "--hardware", "tpu-v9"],
        ["--budget-usd", "-5", "--hardware", "h100"],
        ["--budget-usd", "50000", "--mfu", "from:/nonexistent/bench.json"],
        ["--budget-usd", "50000", "--mfu", "from:MALFORMED"],
        ["--budget-usd", "50000", "--mfu", "from:WRONG_HARDWARE", "--hardware", "a100-40gb"],
        ["--budget-usd", "50000", "--budget-flops", "1e21"],
        ["--preset", "7b", "--tokens", "lots"],
        ["--budget-usd", "50000", "--unknown-flag"],
        ["--config", str(PRESET_DIR / "7b.yaml"), "--preset", "1b", "--tokens", "1T"],
        ["--preset", "7b", "--params", "6.7B", "--tokens", "1T"],
        ["--config", str(PRESET_DIR / "7b.yaml"), "--params", "6.7B", "--tokens", "1T"],
        ["--config", str(PRESET_DIR / "7b.yaml"), "--preset", "1b", "--memory"],
        ["--budget-usd", "50000", "--preset", "7b"],  # a budget picks the sizes itself
        ["--budget-usd", "50000", "--preset", "7b", "--tokens", "1T"],  # two questions at once
        ["--budget-usd", "50000", "--config", str(PRESET_DIR / "7b.yaml"), "--memory"],
    ],
)
def test_bad_input_is_one_line_exit_2(argv, tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"mfu": 0.4, "hardware": "h100"')
    (tmp_path / "other.json").write_text('{"mfu": 0.4, "hardware": "h100", "tokens_per_second_per_device": 1}')
    argv = [a.replace("MALFORMED", str(tmp_path / "bad.json")).replace("WRONG_HARDWARE", str(tmp_path / "other.json"))
            for a in argv]
    assert main(argv + ["--no-plot"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error:")


def test_two_model_sources_are_refused_naming_both(capsys):
    assert main(["--config", str(PRESET_DIR / "7b.yaml"), "--preset", "1b", "--tokens", "1T", "--no-plot"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("error: --preset 1b and --config ")
    assert "only one model source" in captured.err


def test_a_plot_path_that_cannot_take_the_plot_is_one_line_before_the_work(tmp_path, capsys):
    folder, existing = tmp_path / "folder", tmp_path / "plan.yaml"
    folder.mkdir()
    existing.write_text("kept\n")
    cases = [(["--plot", str(folder)], f"--plot {folder}: is a folder"),
             (["--out", str(existing)], f"--out {existing}: is a file"),
             (["--plot", str(existing / "plan.png")], f"--plot {existing / 'plan.png'}: {existing} is a file"),
             (["--out", str(existing / "plots")], f"--out {existing / 'plots'}: {existing} is a file")]
    for argv, start in cases:
        assert main(["--budget-usd", "50000", *argv]) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1, captured.err
        assert captured.err.startswith(f"error: {start}"), captured.err
        assert "Traceback" not in captured.err
    assert existing.read_text() == "kept\n" and not any(folder.iterdir())
    assert main(["--budget-usd", "50000", "--out", str(folder / "new")]) == 0
    assert (folder / "new" / "plan.png").stat().st_size > 0


# ----------------------------------------------------------------------------- memory


def test_memory_state_matches_zero_arithmetic():
    # Rajbhandari et al. 2020 (ZeRO), Figure 1: a 7.5B model with mixed-precision Adam needs 16 bytes
    # per parameter of model state, 120 GB; sharded over 64 devices (ZeRO-3), 1.88 GB each.
    cfg = ModelConfig(d_model=4096, n_heads=32, n_layers=32, vocab_size=50432)
    for devices, expected in ((1, 120e9), (64, 1.875e9)):
        est = estimate_memory(cfg, global_batch=devices, microbatch=1, seq_len=2048, mesh_shape={"fsdp": devices},
                              optimizer="adam", n_params=int(7.5e9))
        assert _close(est.params_bytes + est.grads_bytes + est.optimizer_bytes, expected, 0.01)


def test_memory_cli(capsys):
    assert main(["--config", str(PRESET_DIR / "7b.yaml"), "--hardware", "h100", "--devices", "8", "--memory"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "largest microbatch that fits" in out
    # remat auto: the least recompute the estimate fits; full when nothing fits
    args = ["--config", str(PRESET_DIR / "1b.yaml"), "--hardware", "h200", "--devices", "1", "--memory", "--remat", "auto"]
    for batch, expected in (("16", "none"), ("32", "dots_saveable")):
        assert main([*args, "--global-batch", batch, "--microbatch", batch]) == 0
        assert f"remat=auto -> {expected}," in capsys.readouterr().out.splitlines()[0]
    assert main(["--config", str(PRESET_DIR / "7b.yaml"), "--hardware", "h100", "--devices", "8", "--memory",
                 "--remat", "auto"]) == 0  # fmt: skip
    assert "remat=auto -> full," in capsys.readouterr().out.splitlines()[0]


def test_memory_that_does_not_fit_names_the_devices_that_would_hold_it(capsys):
    """70B on 8 H100s does not fit even fully sharded; the plan names the fewest devices (doubling)
    over which it does, and that count's own plan agrees. A global batch too small to spread over
    more devices is said to be the limit."""
    preset = ["--preset", "70b", "--hardware", "h100", "--memory", "--no-plot"]
    assert main([*preset, "--devices", "8"]) == 0
    out = capsys.readouterr().out
    assert "with the state fully sharded" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("fits on 32 x h100: mesh {'data': 1, 'fsdp': 32, 'tensor': 1}, microbatch 1, remat=full")
    assert main([*preset, "--devices", "16", "--mesh", "fsdp=16", "--microbatch", "1"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main([*preset, "--devices", "32", "--mesh", "fsdp=32", "--microbatch", "1"]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" not in out and "fits on" not in out
    assert main([*preset, "--devices", "8", "--global-batch", "8"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(
        "does not fit on up to 8 x h100 at global batch 8 (each device needs at least one sequence)")


def test_memory_counts_the_moving_average_of_the_weights(tmp_path, capsys):
    cfg = ModelConfig(d_model=1024, n_heads=8, n_layers=4, vocab_size=50432)
    plain, averaged = (estimate_memory(cfg, global_batch=8, microbatch=2, seq_len=512, mesh_shape={"fsdp": 4},
                                       optimizer="adam", ema=ema) for ema in (False, True))
    assert averaged.ema_bytes == plain.params_bytes and averaged.total_bytes == plain.total_bytes + plain.params_bytes
    config = tmp_path / "ema.yaml"
    import yaml

    preset = yaml.safe_load((PRESET_DIR / "1b.yaml").read_text())
    preset["algorithms"]["ema"] = {"half_life": "1000ba"}
    config.write_text(yaml.safe_dump(preset))
    assert main(["--config", str(config), "--hardware", "h200", "--devices", "1", "--memory"]) == 0
    assert "moving average of the weights (fp32)" in capsys.readouterr().out


def _xla_train_step_bytes(cfg: ModelConfig, batch: int, seq_len: int, compute_dtype) -> int:
    """Peak bytes of a jitted forward + backward + Adam step, from XLA's compiled memory analysis."""
    abstract = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    tx = optax.adam(1e-3)
    opt_state = jax.eval_shape(tx.init, params)

    def loss_fn(p, ids):
        logits = nnx.merge(graphdef, p)(ids, compute_dtype=compute_dtype).astype(jnp.float32)
        targets = jnp.concatenate([ids[:, 1:], jnp.full_like(ids[:, :1], -100)], axis=1)
        valid = targets != -100
        log_z = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.where(valid, log_z - target_logit, 0.0).sum() / valid.sum()

    def step(p, o, ids):
        loss, grads = jax.value_and_grad(loss_fn)(p, ids)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    ids = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
    stats = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, ids).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes)


TINY = ModelConfig(d_model=128, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=1024)
SHAPE_125M = ModelConfig(d_model=768, n_heads=12, n_layers=12, max_seq_len=2048, vocab_size=50432)


@pytest.mark.parametrize(
    "name,cfg,batch,seq_len,precision,remat",
    [
        ("tiny", TINY, 4, 256, "fp32", "none"),
        ("tiny", TINY, 4, 256, "amp_bf16", "full"),
        ("125m", SHAPE_125M, 1, 512, "amp_bf16", "none"),
        ("125m", SHAPE_125M, 1, 512, "fp32", "full"),
    ],
)
def test_memory_estimate_vs_xla(name, cfg, batch, seq_len, precision, remat, monkeypatch):
    # The estimate is for the platform-neutral step that GPUs and TPUs run; the bf16 CPU kernels
    # keep more activations in bf16 and would measure below it.
    from jaxtrain.layers import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "use_cpu_kernels", lambda compute_dtype: False)
    cfg = dataclasses.replace(cfg, remat=remat, scan_unroll=1)  # the rolled layer loop (TPUs; GPUs at remat=full)
    dtype = jnp.float32 if precision == "fp32" else jnp.bfloat16
    measured = _xla_train_step_bytes(cfg, batch, seq_len, dtype)
    estimate = estimate_memory(cfg, global_batch=batch, microbatch=batch, seq_len=seq_len, precision=precision,
                               mesh_shape={"data": 1, "fsdp": 1, "tensor": 1}, remat=remat, optimizer="adam")
    ratio = estimate.total_bytes / measured
    print(f"{name} {precision} remat={remat}: estimate {estimate.total_bytes / 2**20:.1f} MiB, "
          f"XLA {measured / 2**20:.1f} MiB, ratio {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25


def test_fused_attention_keeps_no_scores_and_is_the_gpu_and_tpu_default():
    """On a GPU in half precision attention runs in cuDNN's flash kernel, on a TPU in the Pallas
    flash kernel; both keep softmax statistics instead of the [heads, L, L] probabilities."""
    cfg = ModelConfig(d_model=2048, n_heads=16, n_layers=24, vocab_size=50432, max_seq_len=2048)
    common = dict(global_batch=8, microbatch=8, seq_len=2048, mesh_shape={"data": 1}, remat="none")
    unfused = estimate_memory(cfg, fused_attention=False, **common).activations_bytes
    fused = estimate_memory(cfg, fused_attention=True, **common).activations_bytes
    L, d, f, V = 2048, 2048, 8192, 50432
    block = (2 * L * d * (4 + 2)  # two LayerNorms: float32 input, bf16 output
             + L * (6144 + d) * 2 + 16 * L * 4  # Q, K, V and the attention output; softmax statistics
             + L * f * 2)  # GELU's input
    assert fused == pytest.approx(8 * (24 * block + 4 * L * V + L * d * (8 + 4 * 2)), rel=1e-9)
    scores = 8 * 24 * 16 * 2048 * 2048 * (4 + 2)  # float32 exp and bf16 probabilities, every layer
    assert unfused - fused > scores
    flash = estimate_memory(cfg, fused_attention="flash", **common).activations_bytes
    assert fused < flash < unfused  # TPU statistics fill a 128-lane tile per row
    for name, expected in (("h200", fused), ("a100-80gb", fused), ("tpu-v5p", flash), ("cpu", unfused)):
        assert estimate_memory(cfg, hardware=get_hardware(name), **common).activations_bytes == expected, name
    assert estimate_memory(cfg, hardware=get_hardware("h200"), precision="fp32", **common).activations_bytes > unfused


def test_gpu_memory_counts_the_alibi_bias_only_while_it_is_a_tensor():
    """cuDNN keeps one constant [heads, L, L] ALiBi bias for all layers up to 1 GiB; longer
    sequences compute ALiBi in the kernel and hold no bias."""
    from jaxtrain.config.schema import AttnConfig
    from jaxtrain.plan.memory import activation_bytes

    def extra(seq_len):
        sizes = [activation_bytes(ModelConfig(d_model=2048, n_heads=16, n_layers=24, attn_config=AttnConfig(alibi=alibi)),
                                  microbatch=1, seq_len=seq_len, precision="amp_bf16", remat="full",
                                  fused_attention="cudnn")
                 for alibi in (True, False)]  # fmt: skip
        return sizes[0] - sizes[1]

    assert extra(2048) == 16 * 2048 * 2048 * 2  # 128 MiB
    assert extra(32768) == 0.0  # would be 32 GiB


def test_a_dollar_budget_at_a_price_of_zero_says_what_plans_owned_hardware(capsys):
    """A price of 0 (owned hardware) is a price the user gave: the error says a dollar budget needs
    a price above 0 and which budgets plan owned hardware, not that no price was given."""
    assert main(["--budget-usd", "100", "--price-per-hour", "0", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no price per hour above 0" in err and "--hours or --budget-flops" in err


def test_a_budget_far_below_the_fitted_sizes_says_its_figures_are_extrapolations(capsys):
    assert main(["--budget-flops", "1e10", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "parameters is far below the 44M to 16B the scaling laws were fitted on" in out
    assert "the smallest preset (125m) takes 1.8e+18 scaling-law FLOPs compute-optimally" in out
    assert main(["--budget-usd", "50000", "--no-plot"]) == 0
    assert "far below" not in capsys.readouterr().out


def test_hardware_names_are_read_in_any_case(capsys):
    assert main(["--budget-usd", "50000", "--hardware", "H100", "--no-plot"]) == 0
    assert "on h100" in capsys.readouterr().out.splitlines()[0]


def test_a_budget_in_dollars_is_read_as_people_write_it(capsys):
    """50k, $50,000 and 5e4 are the budget 50000 is; 1.5M is 1,500,000; words are one line."""
    assert main(["--budget-usd", "50000", "--no-plot"]) == 0
    expected = capsys.readouterr().out
    assert "$50,000" in expected
    for written in ("50k", "$50,000", "5e4", "50_000", "$50K"):
        assert main(["--budget-usd", written, "--no-plot"]) == 0, written
        assert capsys.readouterr().out == expected, written
    assert main(["--budget-usd", "1.5M", "--no-plot"]) == 0
    assert "$1,500,000" in capsys.readouterr().out
    for wrong in ("fifty", "50x", "inf", "0"):
        assert main(["--budget-usd", wrong, "--no-plot"]) == 2, wrong
        err = capsys.readouterr().err
        assert err.startswith("error: --budget-usd ") and err.count("\n") == 1, err
