"""The Pallas flash attention for TPUs (ALiBi in the kernel, causal block skipping, packed
documents, grouped queries), run in Pallas' interpreter and checked against the XLA formulation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.config.schema import AttnConfig, ModelConfig
from jaxtrain.layers import attention, tpu_kernels
from jaxtrain.parallel import platform


@pytest.fixture(autouse=True)
def full_float32_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _inputs(batch, length, heads, kv_heads, head_dim, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((batch, length, kv_heads, head_dim)), dtype) for _ in range(2))
    cotangent = jnp.asarray(rng.standard_normal((batch, length, heads, head_dim)), jnp.float32)
    return q, k, v, cotangent


def _value_and_grads(fn, q, k, v, cotangent):
    out, vjp = jax.vjp(lambda *a: fn(*a).astype(jnp.float32), q, k, v)
    return [out, *vjp(cotangent)]


def _relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize(
    "kv_heads,alibi,packed,blocks,dtype",
    [
        (4, True, False, (128, 128), jnp.float32),  # MHA, square blocks
        (2, True, True, (128, 256), jnp.float32),  # GQA, packed documents, wider k blocks
        (1, False, False, (256, 128), jnp.float32),  # MQA, no ALiBi, taller q blocks
        (2, True, True, (128, 128), jnp.bfloat16),
    ],
    ids=["mha", "gqa_packed", "mqa_no_alibi", "gqa_packed_bf16"],
)
def test_flash_attention_matches_the_xla_formulation(kv_heads, alibi, packed, blocks, dtype):
    # bf16 dots are slow in the interpreter on a CPU: half the length (still 2 x 2 blocks)
    batch, length, heads, head_dim = 2, 512 if dtype == jnp.float32 else 256, 4, 64
    q, k, v, cotangent = _inputs(batch, length, heads, kv_heads, head_dim, dtype)
    slopes = jnp.asarray(attention.alibi_slopes(heads)) if alibi else None
    first = 200 * length // 512  # three documents
    documents = [0] * first + [1] * (150 * length // 512)
    documents += [2] * (length - len(documents))
    sequence_id = jnp.asarray(np.repeat([documents], batch, 0), jnp.int32) if packed else None
    opts = dict(scale=head_dim**-0.5, slopes=slopes, sequence_id=sequence_id)
    flash = functools.partial(tpu_kernels.flash_attention, block_q=blocks[0], block_k=blocks[1], interpret=True, **opts)
    got = _value_and_grads(flash, q, k, v, cotangent)
    want = _value_and_grads(functools.partial(attention.dot_product_attention, compute_dtype=dtype, **opts),
                            q, k, v, cotangent)  # fmt: skip
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and _relative_error(a, b) < tolerance, name
    assert [g.dtype for g in got[1:]] == [dtype] * 3
    if packed:  # the document mask matters: without it the later documents' rows change
        unmasked = tpu_kernels.flash_attention(q, k, v, scale=head_dim**-0.5, slopes=slopes, block_q=blocks[0],
                                               block_k=blocks[1], interpret=True)  # fmt: skip
        assert _relative_error(unmasked[:, first:], got[0][:, first:]) > 0.05
        assert _relative_error(unmasked[:, :first], got[0][:, :first]) < tolerance


def test_block_size_divides_the_length():
    assert tpu_kernels.block_size(2048) == 512
    assert tpu_kernels.block_size(384) == 384
    assert tpu_kernels.block_size(640) == 128  # 640 = 5 x 128: no larger multiple of 128 divides it
    assert tpu_kernels.block_size(1536, preferred=1024) == 768
    with pytest.raises(ValueError, match="multiple of 128, got 100"):
        tpu_kernels.block_size(100)


def test_tpu_attention_dispatches_to_the_flash_kernel(monkeypatch):
    """Traced for a TPU, training attention goes to the Pallas kernel (here in the interpreter);
    dropout, lengths off the 128 grid, TPU v2/v3 and JAXTRAIN_TPU_ATTENTION=xla keep XLA's."""
    calls = []
    real = tpu_kernels.flash_attention
    monkeypatch.setattr(tpu_kernels, "flash_attention",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, interpret=True, **kw))  # fmt: skip
    q, k, v, _ = _inputs(1, 256, 4, 2, 32, jnp.float32)
    opts = dict(scale=32**-0.5, slopes=jnp.asarray(attention.alibi_slopes(4)), compute_dtype=jnp.float32)
    expected = attention.dot_product_attention(q, k, v, **opts)
    assert not calls
    with platform.compiling_for("tpu"):
        out = attention.dot_product_attention(q, k, v, **opts)
        assert calls == [q.shape] and _relative_error(out, expected) < 1e-5
        attention.dot_product_attention(q[:, :200], k[:, :200], v[:, :200], **opts)
        attention.dot_product_attention(q, k, v, dropout_rate=0.1, dropout_rng=jax.random.key(0), **opts)
        monkeypatch.setattr(tpu_kernels, "_pre_v4_tpu", lambda: True)  # a TPU v3 host
        attention.dot_product_attention(q, k, v, **opts)
        monkeypatch.setattr(tpu_kernels, "_pre_v4_tpu", lambda: False)
        monkeypatch.setenv(tpu_kernels.TPU_ATTENTION_ENV, "xla")
        attention.dot_product_attention(q, k, v, **opts)
        assert calls == [q.shape]
        monkeypatch.setenv(tpu_kernels.TPU_ATTENTION_ENV, "pallas")
        with pytest.raises(ValueError, match="JAXTRAIN_TPU_ATTENTION='pallas'; use one of auto, xla"):
            attention.dot_product_attention(q, k, v, **opts)


def test_fused_attention_kind_by_platform():
    cfg = ModelConfig(d_model=256, n_heads=4, n_layers=2, max_seq_len=2048, vocab_size=1024)
    assert attention.fused_attention_kind(cfg, jnp.bfloat16, "gpu") == "cudnn"
    assert attention.fused_attention_kind(cfg, jnp.float32, "gpu") == ""
    assert attention.fused_attention_kind(cfg, jnp.float32, "tpu") == "flash"
    assert attention.fused_attention_kind(cfg, jnp.bfloat16, "cpu") == ""
    dropout = ModelConfig(d_model=256, n_heads=4, n_layers=2, max_seq_len=2048, vocab_size=1024,
                          attn_config=AttnConfig(attn_pdrop=0.1))  # fmt: skip
    assert attention.fused_attention_kind(dropout, jnp.bfloat16, "tpu") == ""


_SHARDED_SCRIPT = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtrain.layers import attention, tpu_kernels
from jaxtrain.parallel import platform
from jaxtrain.parallel.logical import DEFAULT_RULES

jax.config.update("jax_default_matmul_precision", "highest")
tpu_kernels.flash_attention = functools.partial(tpu_kernels.flash_attention, interpret=True)
mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
rng = np.random.default_rng(0)
q = jnp.asarray(rng.standard_normal((4, 256, 4, 32)), jnp.float32)
k, v = (jnp.asarray(rng.standard_normal((4, 256, 2, 32)), jnp.float32) for _ in range(2))
sequence_id = jnp.asarray(np.repeat([[0] * 100 + [1] * 156], 4, 0), jnp.int32)
opts = dict(scale=32 ** -0.5, slopes=jnp.asarray(attention.alibi_slopes(4)), compute_dtype=jnp.float32)
expected = attention.dot_product_attention(q, k, v, sequence_id=sequence_id, **opts)

def attend(q, k, v, sequence_id):
    with platform.compiling_for("tpu"), jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
            nn.logical_axis_rules(DEFAULT_RULES):
        return attention.dot_product_attention(q, k, v, sequence_id=sequence_id, **opts)

heads = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
rows = NamedSharding(mesh, P(("data", "fsdp"), None))
step = jax.jit(attend, in_shardings=(heads, heads, heads, rows), out_shardings=heads)
hlo = step.lower(q, k, v, sequence_id).compile().as_text()
out = step(q, k, v, sequence_id)
print(json.dumps({"error": float(jnp.abs(out - expected).max() / jnp.abs(expected).max()),
                  "gathers": hlo.count("all-gather"), "shard_shape": list(out.addressable_shards[0].data.shape)}))
"""


def test_flash_attention_runs_per_shard_on_a_mesh():
    """On a data x fsdp x tensor mesh the kernel runs on each device's batch and head shard (no
    gathers), with the single-device values; 8 simulated CPU devices, the kernel interpreted."""
    import json
    import os
    import subprocess
    import sys

    from conftest import cpu_devices_env

    env = cpu_devices_env(8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"] < 1e-5
    assert report["gathers"] == 0
    assert report["shard_shape"] == [1, 256, 2, 32]


def test_model_traced_for_tpu_trains_like_xla_attention(monkeypatch):
    """The whole model traced for a TPU (flash kernel inside the scanned, rematerialised blocks;
    interpreted here) gives XLA attention's loss and gradients: ALiBi, packed documents, GQA."""
    from flax import nnx

    from jaxtrain.models import build_model

    cfg = ModelConfig(
        d_model=64, n_heads=4, n_layers=2, vocab_size=128, max_seq_len=256, remat="full",
        attn_config=AttnConfig(alibi=True, attn_uses_sequence_id=True, attn_type="grouped_query_attention",
                               kv_n_heads=2),
    )  # fmt: skip
    graphdef, params = nnx.split(build_model(cfg, rngs=nnx.Rngs(3)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(9), (2, 256), 0, 128, dtype=jnp.int32)
    sequence_id = jnp.asarray([[0] * 100 + [1] * 156, [0] * 256], jnp.int32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, compute_dtype=jnp.float32, sequence_id=sequence_id)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    calls = []
    real = tpu_kernels.flash_attention
    monkeypatch.setattr(tpu_kernels, "flash_attention",
                        lambda *a, **kw: calls.append(1) or real(*a, interpret=True, **kw))  # fmt: skip
    with platform.compiling_for("tpu"):
        flash_loss, flash_grads = jax.value_and_grad(loss)(params)
        assert calls
        monkeypatch.setenv(tpu_kernels.TPU_ATTENTION_ENV, "xla")
        xla_loss, xla_grads = jax.value_and_grad(loss)(params)
    np.testing.assert_allclose(float(flash_loss), float(xla_loss), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(flash_grads), jax.tree.leaves(xla_grads)):
        assert _relative_error(a, b) < 1e-4


@pytest.mark.parametrize(
    "devices,overrides",
    [(1, []), (8, ["parallelism.fsdp=4", "parallelism.tensor=2", "model.attn_config.attn_type=grouped_query_attention",
                   "model.attn_config.kv_n_heads=2"])],
    ids=["one_chip", "fsdp4_tensor2_gqa"],
)
def test_train_step_compiles_for_a_tpu(tpu_compiler_python, devices, overrides):
    """The quickstart model's whole train step, compiled by libtpu for TPU v5p chips without one:
    Pallas' TPU compiler lowers the flash kernels (forward, dQ, dK/dV per layer), per shard on a
    data x fsdp x tensor mesh."""
    import json
    import os
    import subprocess

    from jaxtrain.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sets = [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.run(
        [tpu_compiler_python, "bench/gpu_aot.py", "--target", "tpu-v5p", "--config", "configs/quickstart.yaml",
         "--batch", "2", "--devices", str(devices), *sets],
        cwd=root, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    layers = load_config(os.path.join(root, "configs/quickstart.yaml"), [], notices=[]).model.n_layers
    assert result["fits"] and result["fused_attention_calls"] == 3 * layers
