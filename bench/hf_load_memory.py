"""Host memory of reading a Hugging Face MPT folder as ``load_path``.

    python bench/hf_load_memory.py                          # about 110M parameters, bf16 files
    python bench/hf_load_memory.py --d-model 2048 --layers 16

Writes a bf16 Hugging Face folder of a randomly initialised MPT (vocab 8192), then reads it into
bf16 parameters on the CPU device in fresh processes, two ways, alternating: ``load_hf_weights``
(each device's part of each tensor, straight into the target dtype) and the whole model into
float32 host arrays first (``read_hf``, what ``convert`` does) followed by placing it; and into
int8 and nf4 frozen weights (``model.quantize_frozen``: each layer's kernel read in float32 and
quantized in turn, the rest bf16). Prints each
process's peak resident memory (VmHWM, reset before reading; Linux) above what it held before
reading, and the seconds the read took. The peak includes the file pages both ways map in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jaxtrain.checkpoint.load import load_hf_weights
from jaxtrain.convert.hf_mpt import hf_model_config, read_hf
from jaxtrain.train.state import abstract_model

folder, way = sys.argv[1], sys.argv[2]
device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
_, abstract = abstract_model(hf_model_config(folder))
like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=device), abstract)
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from here
    f.write("5")
before = status("VmRSS")
start = time.perf_counter()
if way == "parts":
    params = load_hf_weights(folder, like=like).params
elif way in ("int8", "nf4"):  # quantized frozen weights, each layer's kernels read and quantized in turn
    import dataclasses
    from jaxtrain.layers import quant
    _, abstract = abstract_model(dataclasses.replace(hf_model_config(folder), quantize_frozen=way))
    def placed(path, variable):  # codes as they are, scales float32, the rest bf16
        x = variable.get_value()
        dtype = x.dtype if path[-1] == quant.SCALE or not jnp.issubdtype(x.dtype, jnp.floating) else jnp.bfloat16
        return path, variable.replace(jax.ShapeDtypeStruct(x.shape, dtype, sharding=device))
    like = nnx.from_flat_state([placed(p, v) for p, v in nnx.to_flat_state(abstract)])
    params = load_hf_weights(folder, like=like).params
else:
    _, buffers, _ = read_hf(folder)
    params = jax.tree.map(lambda v, l: jax.device_put(np.asarray(v, l.dtype), l.sharding),
                          buffers, nnx.to_pure_dict(like))
jax.block_until_ready(jax.tree.leaves(params))
seconds = time.perf_counter() - start
peak = status("VmHWM")
print(json.dumps({"peak_above_start": peak - before, "seconds": seconds}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import jax
    from flax import nnx

    from jaxtrain.config.schema import AttnConfig, ModelConfig
    from jaxtrain.convert.hf_mpt import export_hf, save_model
    from jaxtrain.models import build_model

    cfg = ModelConfig(d_model=args.d_model, n_heads=args.d_model // 64, n_layers=args.layers, max_seq_len=2048,
                      vocab_size=8192, attn_config=AttnConfig(), scan_layers=True)
    with tempfile.TemporaryDirectory() as tmp:
        params = nnx.to_pure_dict(nnx.state(build_model(cfg, rngs=nnx.Rngs(0)), nnx.Param))
        count = sum(x.size for x in jax.tree.leaves(params))
        save_model(os.path.join(tmp, "ckpt"), cfg, params)
        del params
        folder = os.path.join(tmp, "hf")
        export_hf(os.path.join(tmp, "ckpt"), folder, dtype="bfloat16")
        files = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder) if n.endswith(".safetensors"))
        print(f"{count / 1e6:.1f}M parameters; safetensors {files / 1e6:.0f} MB (bf16); bf16 parameters "
              f"{2 * count / 1e6:.0f} MB, float32 {4 * count / 1e6:.0f} MB")
        results: dict[str, list[dict]] = {"parts": [], "float32 first": [], "int8": [], "nf4": []}
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        for _ in range(args.rounds):
            for way in results:
                out = subprocess.run([sys.executable, "-c", CHILD, folder, way], env=env, capture_output=True,
                                     text=True, check=True)
                results[way].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for way, runs in results.items():
            peak = statistics.median(r["peak_above_start"] for r in runs) / 1e6
            seconds = statistics.median(r["seconds"] for r in runs)
            print(f"{way}: peak resident memory {peak:.0f} MB above the start, read in {seconds:.2f} s "
                  f"(medians of {len(runs)})")


if __name__ == "__main__":
    main()
