"""Hardware table, LLM Foundry's FLOP count and MFU, and the sliding-window throughput meter."""

import types

import pytest

from jaxtrain.metrics.flops import ThroughputMeter, mfu, mpt_flops_per_batch
from jaxtrain.metrics.hardware import (
    cpu_bf16_note,
    HARDWARE,
    PRICE_NOTE,
    detect_hardware,
    get_hardware,
    load_price_overrides,
)


def test_peaks_from_vendor_datasheets():
    tera = 1e12
    assert HARDWARE["a100-40gb"].peak_bf16_flops == 312 * tera
    assert HARDWARE["a100-80gb"].peak_bf16_flops == 312 * tera
    assert HARDWARE["h100"].peak_bf16_flops == 989 * tera
    assert HARDWARE["h200"].peak_bf16_flops == 989 * tera
    assert HARDWARE["b200"].peak_bf16_flops == 2250 * tera
    assert [HARDWARE[f"tpu-{v}"].peak_bf16_flops / tera for v in ("v4", "v5e", "v5p", "v6e")] == [275, 197, 459, 918]
    assert HARDWARE["cpu"].peak_fp32_flops == 330e9 and HARDWARE["cpu"].peak_bf16_flops == 1.58e12
    assert "assumption" in PRICE_NOTE


def test_get_hardware_unknown_lists_names():
    assert get_hardware("h100").name == "h100"
    with pytest.raises(ValueError, match="a100-40gb.*tpu-v6e"):
        get_hardware("h1000")


@pytest.mark.parametrize(
    "kind, platform, name",
    [
        ("NVIDIA H100 80GB HBM3", "gpu", "h100"),
        ("NVIDIA H200", "gpu", "h200"),
        ("NVIDIA A100-SXM4-80GB", "gpu", "a100-80gb"),
        ("NVIDIA A100-SXM4-40GB", "gpu", "a100-40gb"),
        ("NVIDIA B200", "gpu", "b200"),
        ("TPU v4", "tpu", "tpu-v4"),
        ("TPU v5 lite", "tpu", "tpu-v5e"),
        ("TPU v5p", "tpu", "tpu-v5p"),
        ("TPU v6 lite", "tpu", "tpu-v6e"),
        ("cpu", "cpu", "cpu"),
        ("NVIDIA H100 PCIe", "gpu", "h100-pcie"),  # a lower peak than the SXM part
        ("NVIDIA H100 NVL", "gpu", "h100-nvl"),
        ("NVIDIA L40", "gpu", None),  # not the L40S
        ("NVIDIA GeForce RTX 4090", "gpu", None),
    ],
)
def test_detect_hardware(kind, platform, name):
    found = detect_hardware(types.SimpleNamespace(device_kind=kind, platform=platform))
    assert (found.name if found else None) == name


def test_detect_hardware_on_this_machine():
    assert detect_hardware() is not None  # tests run on CPU, or on an accelerator in the table


def test_price_overrides(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("h100: 2.5\ntpu-v5e: 1\n")
    table = load_price_overrides(path)
    assert table["h100"].price_per_hour_usd == 2.5 and table["tpu-v5e"].price_per_hour_usd == 1.0
    assert table["h100"].peak_bf16_flops == HARDWARE["h100"].peak_bf16_flops
    assert HARDWARE["h100"].price_per_hour_usd != 2.5  # the built-in table is untouched
    path.write_text("h999: 2.5\n")
    with pytest.raises(ValueError, match="h999"):
        load_price_overrides(path)


def test_flops_per_batch_by_hand():
    # 3 * B * (2 * N * seq + n_layers * 4 * d_model * seq^2) = 3 * 3 * (8000 + 1024)
    assert mpt_flops_per_batch(n_params=1000, n_layers=2, d_model=8, seq_len=4, batch_size=3) == 81216.0


@pytest.mark.parametrize("peft", [None, {}, {"use_dora": True, "lora_dropout": 0.1}], ids=["full", "lora", "dora"])
def test_training_flops_match_what_xla_counts_in_the_compiled_step(peft):
    """The FLOPs MFU is counted with are those of the compiled train step (XLA's cost analysis):
    Foundry's formula for training every weight; for LoRA, none for the frozen weights' gradients,
    which Foundry's formula would count (42 % over here); for DoRA with dropout, its second product
    of each adapted layer (of the dropped input) too."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import optax

    from jaxtrain.config import ParallelismConfig
    from jaxtrain.config.schema import AttnConfig, ModelConfig, PeftConfig
    from jaxtrain.metrics.flops import mpt_active_params, training_flops_per_batch
    from jaxtrain.parallel.logical import DEFAULT_RULES
    from jaxtrain.parallel.mesh import batch_sharding, build_mesh
    from jaxtrain.train.state import create_train_state
    from jaxtrain.train.step import compile_train_step, make_train_step

    batch, seq = 4, 128
    model = ModelConfig(d_model=256, n_heads=4, n_layers=4, max_seq_len=seq, vocab_size=4096,
                        attn_config=AttnConfig(), scan_layers=False)
    if peft is not None:
        model = dataclasses.replace(model, peft_config=PeftConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                  **peft))
    mesh = build_mesh(ParallelismConfig(), jax.devices()[:1])
    tx = optax.adamw(1e-3)
    state, model_def, shardings = create_train_state(model, tx, seed=0, mesh=mesh, rules=DEFAULT_RULES)
    step = compile_train_step(make_train_step(model_def, tx, lambda count: jnp.asarray(1e-3),
                                              use_dropout=bool(peft and peft.get("lora_dropout"))),
                              shardings, batch_sharding(mesh))
    cost = step.lower(state, {"input_ids": jnp.zeros((batch, seq), jnp.int32)}).compile().cost_analysis()
    counted = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = training_flops_per_batch(model, seq, batch)
    assert ours == pytest.approx(counted, rel=0.02)
    foundry = mpt_flops_per_batch(mpt_active_params(model), model.n_layers, model.d_model, seq, batch)
    assert (foundry == ours) == (peft is None)
    if peft == {}:
        assert foundry / counted > 1.35


def test_mpt_7b_published_mfu():
    # MPT-7B, no biases, tied embedding: 32 blocks of 12*d^2 matmul weights + 2 norms, wte, norm_f.
    d, layers, vocab, seq = 4096, 32, 50432, 2048
    n_params = layers * (12 * d * d + 2 * d) + vocab * d + d
    assert n_params == 6_649_286_656
    flops_per_token = mpt_flops_per_batch(n_params, layers, d, seq, batch_size=1) / seq
    # LLM Foundry's benchmark table: 8xH100, seq 2048, 10,643 tokens/s per GPU, 46.4 % MFU.
    assert mfu(10_643 * flops_per_token, 989e12) == pytest.approx(0.464, abs=5e-4)


def test_meter_follows_speed_monitor_window():
    meter = ThroughputMeter(window_size=2, num_devices=2, peak_flops_per_device=50.0)
    for t in (0.0, 1.0):
        meter.update(t, samples=4, tokens=40, flops=100.0)
        assert meter.metrics() == {}  # fewer than window_size + 1 entries
    meter.update(3.0, samples=4, tokens=40, flops=100.0)
    # Window [0, 1, 3]: 2 batches, 8 samples, 80 tokens, 200 FLOPs (the oldest entry's excluded) in 3 s.
    got = meter.metrics()
    assert got["throughput/batches_per_sec"] == pytest.approx(2 / 3)
    assert got["throughput/samples_per_sec"] == pytest.approx(8 / 3)
    assert got["throughput/tokens_per_sec"] == pytest.approx(80 / 3)
    assert got["throughput/device/tokens_per_sec"] == pytest.approx(40 / 3)
    assert got["throughput/flops_per_sec"] == pytest.approx(200 / 3)
    assert got["throughput/device/mfu"] == pytest.approx(100 / 3 / 50)
    meter.update(6.0, samples=4, tokens=40, flops=100.0)
    assert meter.metrics()["throughput/batches_per_sec"] == pytest.approx(2 / 5)  # window [1, 3, 6]


def test_meter_summary_after_start():
    meter = ThroughputMeter(window_size=10)
    meter.update(0.0, samples=2, tokens=20, flops=1e3)  # e.g. the compiling step, dropped by start()
    meter.start(10.0)
    assert meter.summary() == {}
    meter.update(12.0, samples=2, tokens=20, flops=1e3)
    meter.update(14.0, samples=2, tokens=20, flops=1e3)
    got = meter.summary(peak_flops_per_device=1e3)
    assert got["tokens_per_second"] == pytest.approx(40 / 4)
    assert got["samples_per_second"] == pytest.approx(4 / 4)
    assert got["flops_per_second_per_device"] == pytest.approx(2e3 / 4)
    assert got["mfu"] == pytest.approx(0.5)


def test_meter_run_summary_counts_every_timed_step_across_restarts():
    """The run's mean covers each step whose start the meter saw, windows restarted or not; the
    time between a restart and the step before it (an evaluation, say) is left out."""
    meter = ThroughputMeter(window_size=2)
    assert meter.run_summary() == {}
    meter.update(5.0, samples=2, tokens=20, flops=1e3)  # no start seen: untimed
    assert meter.run_summary() == {}
    meter.start(10.0)
    meter.update(11.0, samples=2, tokens=20, flops=1e3)
    meter.update(13.0, samples=2, tokens=20, flops=1e3)
    meter.update(14.0, samples=2, tokens=20, flops=1e3)
    meter.start(100.0)  # after an evaluation
    meter.update(104.0, samples=2, tokens=20, flops=1e3)
    got = meter.run_summary(peak_flops_per_device=1e3)
    assert got["steps"] == 4 and got["seconds"] == pytest.approx(8.0)
    assert got["tokens_per_second"] == pytest.approx(80 / 8)
    assert got["samples_per_second"] == pytest.approx(8 / 8)
    assert got["mfu"] == pytest.approx(4e3 / 8 / 1e3)
    assert meter.summary()["tokens_per_second"] == pytest.approx(20 / 4)  # the window: the last step only
    assert meter.window_steps == 1


def test_cpu_without_bf16_matrix_units_is_named(tmp_path):
    def note(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        return cpu_bf16_note(str(path))

    plain_x86 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
    assert "no bf16 matrix units" in note(plain_x86) and "precision=fp32" in note(plain_x86)
    assert note(plain_x86.replace("avx512bw", "avx512bw avx512_bf16")) is None
    assert note(plain_x86.replace("avx2", "avx2 amx_bf16 amx_tile")) is None
    assert note("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n") is None  # Arm: not judged
    assert cpu_bf16_note(str(tmp_path / "missing")) is None


def _small_gqa_model(tied):
    from jaxtrain.config.schema import AttnConfig, ModelConfig

    return ModelConfig(d_model=8, n_heads=4, n_layers=2, expansion_ratio=2, vocab_size=32, no_bias=True,
                       tie_word_embeddings=tied,
                       attn_config=AttnConfig(alibi=True, attn_type="grouped_query_attention", kv_n_heads=2))


@pytest.mark.parametrize("tied", [True, False])
def test_active_params_leave_out_an_untied_input_embedding(tied):
    """LLM Foundry's ``mpt_get_active_params``: every parameter once, less ``wte`` when the output
    head is a separate ``lm_head`` (a lookup table does no matmul). By hand, d_model 8, 4 heads with
    2 key/value heads (Wqkv 8x16, out 8x8), MLP 8->16->8, two weight-only norms per block, 2 blocks,
    norm_f, vocab 32: 2*(128+64+256+16) + 8 = 936 in the blocks and norm_f; plus one 32x8 matrix
    (wte tied, or lm_head untied) = 1192."""
    from jaxtrain.metrics.flops import mpt_active_params

    n_params = mpt_active_params(_small_gqa_model(tied))
    assert n_params == 1192
    # 3 * B * (2 * N * seq + n_layers * 4 * d_model * seq^2) with N = 1192, seq 4, B 3
    assert mpt_flops_per_batch(n_params, 2, 8, 4, 3) == 3 * 3 * (2 * 1192 * 4 + 2 * 4 * 8 * 16)


def test_meter_resume_keeps_the_window_and_leaves_out_the_pause():
    """Composer pauses its training clock while evaluating and keeps the window: steps ending at
    1, 2, 3 s, an evaluation from 3 s to 10 s, a step ending at 11 s is at 4 s of training time, so
    a 2-step window covers [2, 3, 4]: 2 batches in 2 s."""
    meter = ThroughputMeter(window_size=2, peak_flops_per_device=10.0)
    meter.start(0.0)
    for t in (1.0, 2.0, 3.0):
        meter.update(t, samples=4, tokens=40, flops=10.0)
    meter.resume(10.0)
    meter.update(11.0, samples=4, tokens=40, flops=10.0)
    got = meter.metrics()
    assert got["throughput/batches_per_sec"] == pytest.approx(1.0)
    assert got["throughput/tokens_per_sec"] == pytest.approx(40.0)
    assert got["throughput/device/mfu"] == pytest.approx(1.0)
    assert meter.run_summary()["seconds"] == pytest.approx(4.0)  # the pause is left out of the run's mean too


@pytest.mark.parametrize(
    "kind, name, bf16, fp8",
    [
        # NVIDIA datasheets list tensor-core rates with sparsity; the dense rate is half.
        ("NVIDIA H100 PCIe", "h100-pcie", 756.5e12, 1513e12),  # 1,513 / 3,026 TFLOP/s sparse
        ("NVIDIA H100 NVL", "h100-nvl", 835.5e12, 1670.5e12),  # 1,671 / 3,341 sparse
        ("NVIDIA H200 NVL", "h200-nvl", 835.5e12, 1670.5e12),  # 1,671 / 3,341 sparse
        ("NVIDIA L4", "l4", 121e12, 242.5e12),  # 242 / 485 sparse
        ("NVIDIA L40S", "l40s", 362.05e12, 733e12),  # 733 / 1,466 sparse
    ],
)
def test_fp8_capable_gpus_have_their_dense_peaks(kind, name, bf16, fp8):
    """Every GPU that runs amp_fp8 natively is in the table, with its own dense bf16 and fp8 peaks,
    so MFU is not taken against a guessed CPU figure."""
    found = detect_hardware(types.SimpleNamespace(device_kind=kind, platform="gpu"))
    assert found is not None and found.name == name
    assert found.peak_flops("amp_bf16") == pytest.approx(bf16, rel=2e-3)
    assert found.peak_flops("amp_fp8") == pytest.approx(fp8, rel=2e-3)


def test_an_unknown_accelerator_reports_no_mfu_unless_its_peak_is_given(monkeypatch):
    """As Composer's SpeedMonitor logs no MFU without a peak: no made-up figure for a device the
    hardware table lacks, and the configured peak when there is one."""
    import jaxtrain.train.setup as setup
    from jaxtrain.config import load_config_dict

    monkeypatch.setattr(setup, "detect_hardware", lambda: None)
    peak, source = setup.peak_flops(load_config_dict({}))
    assert peak is None and source.endswith("so MFU is not reported: set peak_flops_per_device to its dense peak "
                                            "FLOP/s for the run's precision")
    assert setup.peak_flops(load_config_dict({"peak_flops_per_device": 2e15}))[0] == 2e15
    meter = ThroughputMeter(window_size=1, peak_flops_per_device=peak)
    meter.update(0.0, tokens=10, flops=100.0, samples=1)
    meter.update(1.0, tokens=10, flops=100.0, samples=1)
    assert meter.metrics()["throughput/tokens_per_sec"] == 10 and "throughput/device/mfu" not in meter.metrics()
    assert "mfu" not in meter.summary() and meter.summary()["tokens_per_second"] == 10
