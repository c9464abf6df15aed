"""`jaxtrain bench` measures the real train step and writes what `jaxtrain plan --mfu from:FILE` reads."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_end_to_end import ROOT, TINY


def bench_module(name: str):
    """A script of ``bench/`` imported as a module (it is not part of the package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


def test_bench_counts_the_tokens_of_padded_rows_as_training_does(tmp_path, capsys, monkeypatch):
    """Prompt/response rows padded to the sequence length: tokens/s counts the tokens, as the
    training log does, and the padded rate is every position's."""
    from jaxtrain.data.loader import BatchLoader
    from jaxtrain.metrics.tokens import batch_tokens
    from jaxtrain.train.bench import main as bench_main

    rows = [{"prompt": f"What is {a} plus {b}?\n", "response": f"{a + b}"} for a in range(20) for b in range(10)]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    drawn = []
    draw = BatchLoader.__next__

    def recorded(self):  # the batches the steps train on, to count their tokens here
        batch = draw(self)
        drawn.append(batch_tokens(batch))
        return batch

    monkeypatch.setattr(BatchLoader, "__next__", recorded)
    sets = [*TINY, f"run_folder={tmp_path}/run", "train_loader.dataset.source=finetune_jsonl",
            f"train_loader.dataset.local={tmp_path / 'pairs.jsonl'}", "eval_loader=null"]
    argv = ["--config", str(ROOT / "configs/quickstart.yaml"), "--steps", "3", "--warmup", "1",
            "--out", str(tmp_path / "bench.json")]
    assert bench_main(argv + [arg for item in sets for arg in ("--set", item)]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    positions = bench["global_batch"] * bench["seq_len"]
    assert bench["padded_tokens_per_second"] == pytest.approx(positions / bench["step_seconds_median"], rel=1e-9)
    timed = drawn[2:5]  # after the compiling step and the warm-up step
    assert bench["tokens_per_second"] == pytest.approx(sum(timed) / 3 / bench["step_seconds_median"], rel=1e-9)
    assert 0 < sum(timed) < positions  # the rows are mostly padding
    assert "% of the positions are padding" in capsys.readouterr().out


def test_bench_writes_a_file_the_planner_reads(tmp_path):
    jaxtrain = shutil.which("jaxtrain", path=str(Path(sys.executable).parent))
    args = [jaxtrain, "bench", "--config", str(ROOT / "configs/quickstart.yaml"), "--steps", "3", "--out", str(tmp_path / "bench.json")]
    for item in [*TINY, f"run_folder={tmp_path}/run"]:
        args += ["--set", item]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["hardware"] == "cpu" and 0 < bench["mfu"] < 1
    expected_tokens_per_second = bench["global_batch"] * bench["seq_len"] / bench["step_seconds_median"]
    assert abs(bench["tokens_per_second"] - expected_tokens_per_second) < 1e-6 * expected_tokens_per_second
    assert bench["step_seconds_spread"][0] <= bench["step_seconds_median"] <= bench["step_seconds_spread"][1]

    plan = subprocess.run([jaxtrain, "plan", "--budget-usd", "100", "--hardware", "cpu", "--mfu", f"from:{tmp_path / 'bench.json'}", "--no-plot"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert f"{100 * bench['mfu']:.1f}% (measured by jaxtrain bench" in plan.stdout


def test_kernel_census_counts_a_scans_bytes_and_flops():
    """bench/gpu_aot.py's HLO census: loop bodies weighted by their trip count, matmul FLOPs exact,
    a slice of a stacked array read at its slice size and a stack update written at its update size;
    products of float32 operands (TF32 on a GPU) listed apart, at half the peak, unless their
    algorithm rounds them to bf16."""
    gpu_aot = bench_module("gpu_aot")
    import jax
    import jax.numpy as jnp

    def layers(x, ws):
        def body(x, w):
            y = jnp.tanh(x @ w)
            return y, y

        return jax.lax.scan(body, x, ws)[1]

    x, ws = jnp.ones((64, 128)), jnp.ones((5, 128, 128))
    rows = gpu_aot.kernel_census(jax.jit(layers).lower(x, ws).compile().as_text(), peak_flops=1e12, bandwidth=1e11)
    matmuls = [row for row in rows if row["kind"] == "matmul (float32, TF32)"]
    assert sum(row["flops"] for row in matmuls) == 5 * 2 * 64 * 128 * 128
    assert {row["count"] for row in matmuls} == {5}
    for row in rows:
        assert row["seconds"] == pytest.approx(max(row["bytes"] / 1e11, row["flops"] / 0.5e12))
        if row["count"] == 5:  # no iteration moves the whole [5, 128, 128] stack or [5, 64, 128] outputs
            assert row["bytes"] / 5 <= 2 * 128 * 128 * 4 + 64, row
    assert sum(row["bytes"] for row in matmuls) >= 5 * (64 * 128 + 128 * 128 + 64 * 128) * 4
    # float32 operands that the product's algorithm rounds to bf16 run at the bf16 rate
    rounded = jax.jit(lambda x, w: jnp.dot(x, w, precision=jax.lax.DotAlgorithmPreset.BF16_BF16_F32))
    (row,) = [r for r in gpu_aot.kernel_census(rounded.lower(x, ws[0]).compile().as_text(), peak_flops=1e12,
                                               bandwidth=1e15) if r["flops"]]  # fmt: skip
    assert row["kind"] == "matmul" and row["seconds"] == pytest.approx(2 * 64 * 128 * 128 / 1e12)


_COLLECTIVE_HLO = """HloModule m, is_scheduled=true

ENTRY %main (p0: bf16[512,4096], p1: f32[1024,1024]) -> (bf16[4096,4096], bf16[4096,4096], f32[1024,1024]) {
  %p0 = bf16[512,4096]{1,0} parameter(0)
  %p1 = f32[1024,1024]{1,0} parameter(1)
  %ag-start = ((bf16[512,4096]{1,0}), bf16[4096,4096]{1,0}) all-gather-start(%p0), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  %e = f32[1024,1024]{1,0} exponential(%p1)
  %ag-done = bf16[4096,4096]{1,0} all-gather-done(%ag-start)
  %ag2 = bf16[4096,4096]{1,0} all-gather(%p0), channel_id=2, replica_groups=mesh['axis_0'=8] {'axis_0'}, dimensions={0}
  ROOT %t = (bf16[4096,4096]{1,0}, bf16[4096,4096]{1,0}, f32[1024,1024]{1,0}) tuple(%ag-done, %ag2, %e)
}
"""


def test_collective_exposure_counts_what_the_schedule_leaves_uncovered():
    """An async all-gather is covered by the kernels scheduled between its start and done; a
    synchronous one by nothing. Ring link time: (n-1)/n of the gathered array per device."""
    gpu_aot = bench_module("gpu_aot")
    rows = gpu_aot.kernel_census(_COLLECTIVE_HLO, peak_flops=1e12, bandwidth=1e11)
    between = 2 * 1024 * 1024 * 4 / 1e11  # the exponential: read and write 4 MiB
    link = 4096 * 4096 * 2 * 7 / 8 / 100e-6  # a bandwidth at which each gather takes 100 us
    exposure = gpu_aot.collective_exposure(_COLLECTIVE_HLO, rows, link_bandwidth=link)
    assert exposure["collectives"] == 2
    assert exposure["link_ms"] == pytest.approx(0.2)
    assert exposure["exposed_ms"] == pytest.approx((100e-6 - between + 100e-6) * 1e3)
    assert gpu_aot._group_size("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions") == 4
    assert gpu_aot._group_size("replica_groups=[2,4]<=[8], dimensions") == 4
    assert gpu_aot._group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions") == 4
    assert gpu_aot._group_size("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}") == 8
    assert gpu_aot._group_size("replica_groups=mesh['axis_0'=8], dimensions") == 8


_TPU_LOOP_HLO = """HloModule m, is_scheduled=true

%cond (p: (s32[], f32[64,64])) -> pred[] {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[64,64])) -> (s32[], f32[64,64]) {
  %p = (s32[], f32[64,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[64,64]{1,0} get-tuple-element(%p), index=1
  %e = f32[64,64]{1,0} exponential(%x)
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[64,64]{1,0}) tuple(%j, %e)
}

ENTRY %main (x: f32[64,64]) -> (s32[], f32[64,64]) {
  %x = f32[64,64]{1,0} parameter(0)
  %z = s32[] constant(0)
  %t = (s32[], f32[64,64]{1,0}) tuple(%z, %x)
  ROOT %w = (s32[], f32[64,64]{1,0}) while(%t), condition=%cond, body=%body
}
"""


def test_kernel_census_reads_a_loop_bound_from_the_condition():
    """TPU programs carry no known trip count: the census takes N from the condition ``i < N``."""
    gpu_aot = bench_module("gpu_aot")
    rows = gpu_aot.kernel_census(_TPU_LOOP_HLO, peak_flops=1e12, bandwidth=1e11)
    (exp,) = [row for row in rows if row["kind"] == "exponential"]
    assert exp["count"] == 7 and exp["bytes"] == 7 * 2 * 64 * 64 * 4


_GATHER_HLO = """HloModule m, is_scheduled=true

%fused_gather (param_0: f32[1024,512], param_1: s32[16,2]) -> f32[16] {
  %param_0 = f32[1024,512]{1,0} parameter(0)
  %param_1 = s32[16,2]{1,0} parameter(1)
  %b = f32[1024,512]{1,0} bitcast(%param_0)
  %g = f32[16]{0} gather(%b, %param_1), offset_dims={}, collapsed_slice_dims={0,1}, start_index_map={0,1}, index_vector_dim=1, slice_sizes={1,1}
  ROOT %e = f32[16]{0} exponential(%g)
}

ENTRY %main (x: f32[1024,512], i: s32[16,2]) -> f32[16] {
  %x = f32[1024,512]{1,0} parameter(0)
  %i = s32[16,2]{1,0} parameter(1)
  ROOT %f = f32[16]{0} fusion(%x, %i), kind=kLoop, calls=%fused_gather
}
"""


def test_kernel_census_counts_a_gather_at_the_elements_it_picks():
    """A fusion that gathers a few entries of a large operand (a target logit per row) reads
    those entries, not the operand."""
    gpu_aot = bench_module("gpu_aot")
    (row,) = gpu_aot.kernel_census(_GATHER_HLO, peak_flops=1e12, bandwidth=1e11)
    assert row["bytes"] == 16 * 4 + 16 * 2 * 4 + 16 * 4  # gathered, indices, result


def test_op_events_read_device_kernels_once_and_busy_time_is_their_union():
    """The profile table on a GPU: kernels on the device's stream lines, named by their HLO op,
    host lines naming the same ops ignored, an ``XLA Ops`` line preferred where the trace has
    one; busy time is the union of the ops' intervals."""
    from types import SimpleNamespace as NS

    layer_profile = bench_module("layer_profile")

    def event(name, start, duration, **stats):
        return NS(name=name, start_ns=start, duration_ns=duration, stats=list(stats.items()))

    host = NS(name="/host:CPU", lines=[NS(name="XLA thunks", events=[event("fusion.1", 0, 50)])])
    streams = [NS(name="Stream #13(Compute)", events=[event("sm90_gemm_kernel", 0, 30, hlo_op="dot.2"),
                                                      event("loop_fusion_kernel", 40, 20, hlo_op="fusion.1")]),
               NS(name="Stream #14(MemcpyH2D)", events=[event("cudnn_kernel", 50, 30)])]  # fmt: skip
    gpu = NS(name="/device:GPU:0", lines=streams)
    events = layer_profile.op_events(iter([host, gpu]), {"fusion.1": 0, "dot.2": 0})
    assert sorted(events) == [("cudnn_kernel", 50, 30), ("dot.2", 0, 30), ("fusion.1", 40, 20)]
    assert layer_profile.busy_ns(events) == 30 + 40  # [0, 30) and [40, 80)

    ops_line = NS(name="XLA Ops", events=[event("fusion.1", 40, 20)])
    gpu_with_ops = NS(name="/device:GPU:0", lines=[*streams, ops_line])
    assert layer_profile.op_events([gpu_with_ops], {}) == [("fusion.1", 40, 20)]
    cpu = layer_profile.op_events([host, NS(name="/host:metadata", lines=[])], {"fusion.1": 0})
    assert cpu == [("fusion.1", 0, 50)]


def test_throughput_script_profiles_the_step_it_timed():
    """``bench/train_throughput.py --profile`` (what the GPU check ends with) traces the compiled,
    state-donating step it timed and prints the op table (each op's wall share, then its summed
    thread time) with the busy share of each call. Run in
    ``--precision fp8`` (the GPU check's amp_fp8 stage): on this CPU the fp8 layer products are
    emulated, so no cuBLAS fp8 GEMM is counted."""
    args = [sys.executable, "bench/train_throughput.py", "--shape", "xs", "--precision", "fp8", "--seq", "64",
            "--batch", "2", "--steps", "2", "--no-microbench", "--profile", "3"]  # fmt: skip
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    (header,) = [line for line in lines if line.startswith("HLO ops")]
    busy, wall = (float(x) for x in re.search(r"some op running ([\d.]+) ms of the ([\d.]+) ms", header).groups())
    assert 0 < busy <= wall
    rows = lines[lines.index(header) + 1: lines.index(header) + 4]
    assert all(re.match(r"\s+[\d.]+\s+[\d.]+%\s+[\d.]+\s+\S+", row) for row in rows), rows
    (record,) = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    assert record["tokens_per_s"] > 0 and record["seq"] == 64
    assert record["precision"] == "fp8" and record["fp8_gemm_calls"] == 0 and 0 < record["loss"] < 20


def test_gpu_check_fits_one_device_call_and_its_stages_parse():
    """``bench/gpu_check.sh`` runs on a lent device within one 600 s call: its stage timeouts sum
    to at most 560 s (start-up and the transfers need the rest), the script is valid bash, and
    every throughput stage's arguments parse, so no device second is lost on a typo."""
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
    stages = [int(n) for n in re.findall(r"^\s*(?:timeout|run \"[^\"]*\") (\d+) ", text, re.M)]
    assert len(stages) == 7 and sum(stages) <= 560, stages
    train_throughput = bench_module("train_throughput")
    parser = train_throughput.build_parser()
    shared = ["--precision", "bf16", "--seq", "2048", "--steps", "20", "--peak", "989e12"]
    runs = re.findall(r"^\s*run \"[^\"]*\" \d+ (.*)$", text, re.M)
    assert len(runs) == 4
    precisions = set()
    for line in runs:
        args = parser.parse_args(shared + shlex.split(line))
        assert os.path.exists(ROOT / args.config), args.config
        precisions.add(args.precision)
    assert precisions == {"bf16", "fp8"}


_CUBLAS_HLO = """HloModule m, is_scheduled=true

%sliced_gemm (p0: bf16[4,512,1024], p1: bf16[256,512]) -> (bf16[256,1024], s8[1024]) {
  %p0 = bf16[4,512,1024]{2,1,0} parameter(0)
  %p1 = bf16[256,512]{1,0} parameter(1)
  %sl = bf16[1,512,1024]{2,1,0} slice(%p0), slice={[0:1], [0:512], [0:1024]}
  %bc = bf16[512,1024]{1,0} bitcast(%sl)
  ROOT %cc = (bf16[256,1024]{1,0}, s8[1024]{0}) custom-call(%p1, %bc), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
}

ENTRY %main (a: bf16[256,512], b: bf16[1024,512], c: f8e4m3fn[256,512], d: f8e4m3fn[1024,512], s: f32[], w: bf16[4,512,1024]) -> (bf16[256,1024], bf16[256,1024], bf16[256,1024]) {
  %a = bf16[256,512]{1,0} parameter(0)
  %b = bf16[1024,512]{1,0} parameter(1)
  %c = f8e4m3fn[256,512]{1,0} parameter(2)
  %d = f8e4m3fn[1024,512]{1,0} parameter(3)
  %s = f32[] parameter(4)
  %g1 = (bf16[256,1024]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %r1 = bf16[256,1024]{1,0} get-tuple-element(%g1), index=0
  %g2 = (bf16[256,1024]{1,0}, s8[4194304]{0}) custom-call(%c, %d, %s, %s), custom_call_target="__cublas$lt$matmul$f8", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %r2 = bf16[256,1024]{1,0} get-tuple-element(%g2), index=0
  %w = bf16[4,512,1024]{2,1,0} parameter(5)
  %g3 = (bf16[256,1024]{1,0}, s8[1024]{0}) fusion(%w, %a), kind=kCustom, calls=%sliced_gemm
  %r3 = bf16[256,1024]{1,0} get-tuple-element(%g3), index=0
  ROOT %t = (bf16[256,1024]{1,0}, bf16[256,1024]{1,0}, bf16[256,1024]{1,0}) tuple(%r1, %r2, %r3)
}
"""


def test_kernel_census_counts_cublas_gemms_and_fp8_at_twice_the_rate():
    """GEMMs XLA hands to cuBLAS (Triton GEMMs off, fp8, or inside a dynamic-slice fusion that
    reads one layer's weights from the stack) carry no dot to count: their FLOPs come from the
    call's shapes and contracting dimensions, fp8 ones at twice the bf16 peak, and the cuBLAS
    workspace is not counted as traffic."""
    gpu_aot = bench_module("gpu_aot")
    rows = {row["name"]: row for row in gpu_aot.kernel_census(_CUBLAS_HLO, peak_flops=1e12, bandwidth=1e15)}
    flops = 2 * 256 * 1024 * 512
    assert rows["g1"]["kind"] == rows["g2"]["kind"] == "matmul"
    assert rows["g1"]["flops"] == rows["g2"]["flops"] == flops
    assert rows["g1"]["seconds"] == pytest.approx(flops / 1e12)
    assert rows["g2"]["seconds"] == pytest.approx(flops / 2e12)
    assert rows["g1"]["bytes"] == (256 * 512 + 1024 * 512 + 256 * 1024) * 2
    assert rows["g3"]["kind"] == "matmul" and rows["g3"]["flops"] == flops
    assert rows["g3"]["bytes"] == (512 * 1024 + 256 * 512 + 256 * 1024) * 2  # one layer's slice of w


def test_wall_shares_split_overlapping_ops_and_add_up_to_busy_time():
    """Two ops overlapping on two threads each last the whole overlap; the table's wall column
    splits every instant among the ops running then."""
    layer_profile = bench_module("layer_profile")

    events = [("dot.1", 0, 100), ("dot.2", 50, 100), ("fusion.3", 200, 10), ("dot.1", 300, 20)]
    shares = layer_profile.wall_shares_ns(events)
    assert shares == {"dot.1": 50 + 25 + 20, "dot.2": 25 + 50, "fusion.3": 10}
    assert sum(shares.values()) == layer_profile.busy_ns(events) == 150 + 10 + 20


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_startup_cores_counts_a_forked_child_once():
    """``bench/startup.py --cores`` adds the CPU time of the run's forked children (the data
    process) to the run's own, and a child reaped by its parent is not counted twice."""
    startup = bench_module("startup")
    script = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sum(i * i for i in range(4_000_000))\n"
        "    time.sleep(0.3)\n"  # the sampler sees the child's whole CPU time before it exits
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "child = os.times().children_user + os.times().children_system\n"
        "time.sleep(0.4)\n"  # reaped: the kernel now counts the child in the parent's cutime
        "print(child, flush=True)\n"
        "sys.stdin.readline()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    tree = startup.TreeCPU(process.pid, interval=0.02)
    try:
        child_cpu = float(process.stdout.readline())
        total = tree.sample()
    finally:
        tree.stop()
        process.communicate("\n", timeout=30)
    own = total - child_cpu  # the parent's own start-up and waiting: well under the child's work
    assert child_cpu > 0.1
    assert -0.05 <= own < child_cpu / 2, (total, child_cpu)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_startup_busy_processes_spin_and_are_stopped():
    """``bench/startup.py --busy N``: N processes use CPU beside the runs and none outlives the bench."""
    startup = bench_module("startup")
    with startup.busy_processes(2) as pids:
        assert len(set(pids)) == 2
        deadline = time.monotonic() + 30  # on a loaded machine they get a share of the cores
        while (used := [startup.process_cpu(pid)[1] for pid in pids]) and min(used) < 0.3:
            assert time.monotonic() < deadline, used
            time.sleep(0.05)
    assert all(startup.process_cpu(pid) is None for pid in pids)  # killed and reaped
