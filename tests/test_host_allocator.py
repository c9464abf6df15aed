"""The CPU host-allocator setting: when it applies, and that a step's temporaries stop page-faulting."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxtrain.train import host_allocator

# A jitted function whose temporaries (the matmul's operands, 36 MB of float32 each) exceed
# glibc's largest mmap threshold (32 MB), called repeatedly; prints the minor page faults of each
# call after the first. The probe keeps to one CPU: on two busy cores the retained heap kept
# faulting a block's worth (9-19k) now and then for up to five calls more (worker threads
# allocating from malloc arenas of their own, most likely); on one CPU it settles after at most
# one such call.
PROBE = r"""
import json, os, resource, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from jaxtrain.train.host_allocator import retain_freed_memory
applied = retain_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((3072, 3072), jnp.float32)
f = jax.jit(lambda x: (jnp.exp(x) @ jnp.sin(x)).sum() + (jnp.cos(x) * 2).sum())
jax.block_until_ready(f(x))
faults = []
for _ in range(9):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults,
                  "async": bool(jax.config.values["jax_cpu_enable_async_dispatch"])}))
"""


def _probe(choice: str) -> dict:
    env = dict(os.environ, JAXTRAIN_HOST_ALLOCATOR=choice, JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_retained_memory_stops_per_step_page_faults():
    default, retain = _probe("default"), _probe("retain")
    assert default["applied"] is False and default["async"] is True
    assert retain["applied"] is True and retain["async"] is False
    # fresh mmap'd temporaries: ~18k faults a call (two 36 MB blocks / 4 KiB); reused heap pages:
    # none once the heap has grown to the step's peak (a few calls; on a busy machine a later call
    # can still grow it by one block now and then)
    assert min(default["faults"]) > 12_000, default
    settled = sorted(retain["faults"][4:])
    assert settled[0] < 1_000, retain
    assert settled[len(settled) // 2] < min(default["faults"]) / 10, (retain, default)


@pytest.mark.parametrize("platforms,expected", [("cpu", True), ("cpu,cuda", True), ("cuda", False), ("tpu,cpu", False)])
def test_runs_on_cpu_follows_jax_platforms(monkeypatch, platforms, expected):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert host_allocator.runs_on_cpu() is expected


def test_runs_on_cpu_without_platforms_looks_for_accelerator_plugins(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    found = {"jax_cuda12_plugin"}
    monkeypatch.setattr(host_allocator.importlib.util, "find_spec", lambda name: object() if name in found else None)
    assert host_allocator.runs_on_cpu() is False
    found.clear()
    assert host_allocator.runs_on_cpu() is True


def test_unknown_choice_warns_and_falls_back(monkeypatch, capsys):
    monkeypatch.setattr(host_allocator, "_applied", None)
    monkeypatch.setenv("JAXTRAIN_HOST_ALLOCATOR", "bogus")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")  # the default choice: not on CPU, so nothing changes
    assert host_allocator.retain_freed_memory() is False
    assert "JAXTRAIN_HOST_ALLOCATOR='bogus'" in capsys.readouterr().err
