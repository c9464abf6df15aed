#!/usr/bin/env bash
# GPU check for one H200 (jax 0.11 or newer, no network): cuDNN attention against XLA's (ALiBi as
# a bias, inside the kernel and in extra key dimensions), then training throughput with MFU
# against the bf16 peak (989 TFLOP/s): the MPT-125M preset through the training entry point (its
# remat: auto settles on none, so the layer loop is unrolled); MPT-1B without remat (seq 2048) with
# its layer loop rolled (compiles in seconds), then unrolled in precision amp_fp8 (fp8 layer
# products); MPT-1B at 16k tokens (full remat, ALiBi without a bias tensor); MPT-1B unrolled with
# cuBLAS for every GEMM; and MPT-1B unrolled (the GPU default since bench/gpu_aot.py showed the
# rolled loop moving a third more bytes) followed by its costliest HLO ops from a profiler trace.
# Run from the repository root:  PYTHONPATH=. bash bench/gpu_check.sh   (at most 9.5 minutes: the stage timeouts sum to 560 s)
# With $OUT set (a folder that comes back from the device), the whole output is also kept in
# $OUT/gpu_check.log, beside the 125M run's summary and metrics.
set -u
cd "$(dirname "$0")/.."
if [ -n "${OUT:-}" ]; then exec > >(tee -a "$OUT/gpu_check.log") 2>&1; fi
export PYTHONPATH="${PYTHONPATH:-.}:."
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
PY="${PYTHON:-$(command -v python3 || command -v python)}"
PEAK=989e12
START=$(date +%s)

echo "== $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
# the GPU's clock, power and temperature every 5 s, summarised at the end: a power-capped or
# throttling GPU shows as a loaded SM clock well below its maximum
SMI_LOG=$(mktemp)
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv,noheader,nounits \
  -l 5 > "$SMI_LOG" 2>/dev/null &
SMI_PID=$!
timeout 75 "$PY" - <<'PY'
import jax, jax.numpy as jnp, numpy as np
from jaxtrain.layers import attention, gpu_kernels
try:  # the libraries that decide which cuDNN attention forms exist (score_mod: cuDNN 9.13 or newer)
    from jax._src.lib import cuda_versions
    libraries = (f", cuDNN {cuda_versions.cudnn_get_version()}, cuBLAS {cuda_versions.cublas_get_version()}, "
                 f"CUDA runtime {cuda_versions.cuda_runtime_get_version()}")
except Exception as e:
    libraries = f" (library versions unknown: {type(e).__name__})"
print("jax", jax.__version__, "backend", jax.default_backend(), jax.devices()[0].device_kind + libraries)
b, L, h, kv, d = 2, 256, 8, 2, 64
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (b, L, h, d), jnp.float32)
k = jax.random.normal(keys[1], (b, L, kv, d), jnp.float32)
v = jax.random.normal(keys[2], (b, L, kv, d), jnp.float32)
ct = jax.random.normal(keys[3], (b, L, h, d), jnp.float32)
slopes = jnp.asarray(attention.alibi_slopes(h))
seq = jnp.asarray(np.repeat([[0] * 100 + [1] * 156], b, 0), jnp.int32)
for sid in (None, seq):
    opts = dict(scale=d ** -0.5, slopes=slopes, sequence_id=sid, compute_dtype=jnp.bfloat16)
    fused = lambda q, k, v: gpu_kernels.cudnn_attention(q, k, v, **opts).astype(jnp.float32)
    gpu_kernels.use_cudnn_attention = lambda *a: False
    plain = lambda q, k, v: attention.dot_product_attention(q, k, v, **opts).astype(jnp.float32)
    try:
        text = jax.jit(jax.grad(lambda *a: (fused(*a) * ct).sum(), (0, 1, 2))).lower(q, k, v).compile().as_text()
        o1, g1 = jax.jit(fused)(q, k, v), jax.jit(jax.grad(lambda *a: (fused(*a) * ct).sum(), (0, 1, 2)))(q, k, v)
        o2, g2 = jax.jit(plain)(q, k, v), jax.jit(jax.grad(lambda *a: (plain(*a) * ct).sum(), (0, 1, 2)))(q, k, v)
        err = lambda a, c: float(jnp.abs(a - c).max() / jnp.abs(c).max())
        print(f"cuDNN vs XLA attention (alibi, gqa, sequence_id={sid is not None}): cudnn calls {text.count('__cudnn$fmha')}, "
              f"out rel err {err(o1, o2):.4f}, grad rel err " + ", ".join(f"{err(a, c):.4f}" for a, c in zip(g1, g2)))
    except Exception as e:
        print(f"cuDNN attention check failed (sequence_id={sid is not None}): {type(e).__name__}: {str(e)[:300]}")

try:  # ALiBi inside the kernel (cuDNN 9.13+ score_mod), what auto uses once the bias would pass 1 GiB
    print(f"cuDNN in-kernel ALiBi vs XLA (gqa): max rel err {gpu_kernels.alibi_form_error(gpu_kernels.score_mod_alibi_attention):.4f}")
except Exception as e:
    print(f"cuDNN in-kernel ALiBi check failed: {type(e).__name__}: {str(e)[:300]}")
try:  # ALiBi in extra query/key dimensions: auto's fallback when score_mod does not probe well
    print(f"cuDNN ALiBi in key dimensions vs XLA (gqa): max rel err {gpu_kernels.alibi_form_error(gpu_kernels.key_dims_alibi_attention):.4f}")
except Exception as e:
    print(f"cuDNN ALiBi in key dimensions check failed: {type(e).__name__}: {str(e)[:300]}")

# forward + backward time at the MPT-1B attention shape: ALiBi as a constant bias (the default),
# in the kernel, as a bias argument (cuDNN also computes its gradient), no bias, and XLA's attention
import time
b, L, h, d = 8, 2048, 16, 128
q, k, v, ct = (jax.random.normal(key, (b, L, h, d), jnp.bfloat16) for key in jax.random.split(jax.random.key(1), 4))
slopes = jnp.asarray(attention.alibi_slopes(h))
pos = jnp.arange(L, dtype=jnp.float32)
alibi = (slopes[:, None, None] * (pos[None, :] - pos[:, None]))[None].astype(jnp.bfloat16)
variants = {
    "cuDNN, ALiBi as a constant bias": lambda q, k, v: gpu_kernels.cudnn_attention(
        q, k, v, scale=d ** -0.5, slopes=slopes, sequence_id=None, compute_dtype=jnp.bfloat16),
    "cuDNN, ALiBi in the kernel (score_mod)": lambda q, k, v: gpu_kernels.score_mod_alibi_attention(
        q, k, v, slopes=slopes, mask=None, scale=d ** -0.5),
    "cuDNN, ALiBi in extra key dimensions": lambda q, k, v: gpu_kernels.key_dims_alibi_attention(
        q, k, v, slopes=slopes, mask=None, scale=d ** -0.5),
    "cuDNN, ALiBi as a bias argument": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, bias=alibi, scale=d ** -0.5, is_causal=True, implementation="cudnn"),
    "cuDNN, causal, no bias": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, scale=d ** -0.5, is_causal=True, implementation="cudnn"),
    "XLA, ALiBi": lambda q, k, v: attention.dot_product_attention(
        q, k, v, scale=d ** -0.5, slopes=slopes, compute_dtype=jnp.bfloat16),
}
flops = 3.5 * 4 * b * h * L * L * d / 2  # forward + backward, causal
for name, fn in variants.items():
    try:
        step = jax.jit(jax.grad(lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * ct).sum(), (0, 1, 2)))
        jax.block_until_ready(step(q, k, v))
        start = time.perf_counter()
        for _ in range(10):
            out = step(q, k, v)
        jax.block_until_ready(out)
        ms = (time.perf_counter() - start) / 10 * 1e3
        print(f"attention fwd+bwd {b}x{L}, {h} heads of {d}: {name}: {ms:.2f} ms, {flops / ms / 1e9:.0f} TFLOP/s")
    except Exception as e:
        print(f"attention timing failed ({name}): {type(e).__name__}: {str(e)[:200]}")
PY

run() {  # name, timeout, args... (--precision bf16 unless the args name another)
  local name=$1 limit=$2; shift 2
  echo "== $name ($(( $(date +%s) - START )) s elapsed)"
  timeout "$limit" "$PY" bench/train_throughput.py --precision bf16 --seq 2048 --steps 20 --peak $PEAK "$@" 2>&1 \
    | grep -E "^(jaxtrain|  step|RESULT)|Error|error|ALiBi|warning" | tail -6
}
echo "== MPT-125M preset through the training entry point, 30 steps of 32 x 2048 on the embedded data ($(( $(date +%s) - START )) s elapsed)"
timeout 85 "$PY" -m jaxtrain.main --config configs/mpt/125m.yaml \
  --set tokenizer.name=bpe:default --set tokenizer.kwargs.vocab_size=8192 \
  --set train_loader.dataset.source=python_stdlib --set train_loader.dataset.local=null \
  --set global_train_batch_size=32 --set device_train_microbatch_size=16 --set max_duration=30ba \
  --set eval_interval=0 --set progress_bar=false --set console_log_interval=10ba \
  --set run_folder=/tmp/jaxtrain-gpu-125m 2>&1 | grep -vE "^  |^[a-z_]+:|^$" | tail -12
if [ -n "${OUT:-}" ]; then cp /tmp/jaxtrain-gpu-125m/summary.json /tmp/jaxtrain-gpu-125m/metrics.jsonl "$OUT"/ 2>/dev/null; fi
run "MPT-1B, batch 8, no remat, rolled layer loop" 55 --config configs/mpt/1b.yaml --batch 8 --remat none --set model.scan_unroll=1 --steps 10
# precision amp_fp8: the layer products in cuBLASLt fp8 GEMMs (it turns Triton GEMMs off itself, so
# no GEMM autotuning: the unrolled step compiles in 45 s on a 2-core CPU, 70 s in bf16), MFU against
# the bf16 peak like every other stage. Unrolled, the GPU default: bench/gpu_aot.py bounds 136.3 ms,
# against 174.7 ms for the bf16 step of the last stage (rolled: 157.5 and 210.8 ms)
run "MPT-1B, batch 8, no remat, unrolled layers, amp_fp8" 85 --config configs/mpt/1b.yaml --batch 8 --remat none --precision fp8 --steps 10
# long context: the 16k ALiBi bias would be 8 GiB, so auto computes ALiBi in cuDNN's kernel, or
# carries it in extra key dimensions, whichever probes well first (the run's log says which)
run "MPT-1B, batch 1 x 16384, full remat, rolled (ALiBi without a bias tensor)" 45 --config configs/mpt/1b.yaml --batch 1 --seq 16384 --remat full
# every GEMM in cuBLAS instead of XLA's autotuned Triton kernels (what MaxText's GPU recipes set)
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=false" \
  run "MPT-1B, batch 8, no remat, unrolled, --xla_gpu_enable_triton_gemm=false" 85 --config configs/mpt/1b.yaml --batch 8 --remat none --steps 10
echo "== MPT-1B, batch 8, no remat, unrolled layers (GPU default), then its costliest HLO ops ($(( $(date +%s) - START )) s elapsed)"
# jax.profiler trace of the step: what holds MFU down. The table's first line says for how much of
# each step some kernel ran on the GPU: far below 100 % means host or launch gaps, not slow kernels.
timeout 130 "$PY" bench/train_throughput.py --config configs/mpt/1b.yaml --batch 8 --remat none --precision bf16 \
  --seq 2048 --steps 20 --peak $PEAK --profile 30 2>&1 | grep -E "^(jaxtrain|  step|RESULT|HLO ops|  +[0-9]|by kind)|Error|error" | tail -46
kill "$SMI_PID" 2>/dev/null
awk -F', *' '$1 ~ /^[0-9]/ { n++; if ($3 > $4 / 2) { busy++; if (low == "" || $1 < low) low = $1; if ($1 > high) high = $1 }
  if ($3 > power) power = $3; if ($5 > temp) temp = $5; max = $2; limit = $4 }
  END { if (n) printf "== GPU: %d samples, %d under load: SM clock %s-%s MHz (max %s), power up to %s W of %s W, up to %s C\n",
        n, busy, low, high, max, power, limit, temp }' "$SMI_LOG"
echo "== total $(( $(date +%s) - START )) s"
