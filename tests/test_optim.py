"""Schedules and optimizers against Composer / LLM Foundry formulas worked by hand, and torch's AdamW."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtrain.config.schema import GradientClippingConfig, OptimizerConfig, SchedulerConfig
from jaxtrain.train.optim import build_optimizer, clip_by_global_norm_torch, current_lr
from jaxtrain.train.schedules import build_schedule

REFERENCE = pathlib.Path(__file__).parent / "fixtures" / "optim" / "reference.json"


def batches_of(total: int):
    """A minimal time-string converter for the tests: "Nba" and "Xdur" (truncated, as Composer does)."""

    def to_batches(time: str) -> int:
        if time.endswith("dur"):
            return int(float(time[:-3]) * total)
        assert time.endswith("ba"), time
        return int(time[:-2])

    return to_batches


def schedule_of(total: int, **kwargs):
    cfg = SchedulerConfig(**kwargs)
    return build_schedule(cfg, base_lr=6e-4, total_batches=total, to_batches=batches_of(total))


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("t_warmup", ["100ba", "0.1dur"])
def test_cosine_with_warmup(t_warmup):
    lr = schedule_of(1000, name="cosine_with_warmup", t_warmup=t_warmup, alpha_f=0.1)
    expected = {
        0: 0.0,  # Composer's linear warmup starts at 0
        50: 6e-4 * 50 / 100,
        99: 6e-4 * 99 / 100,
        100: 6e-4,  # tau = 0: 0.1 + 0.9 * (1 + cos 0) / 2 = 1
        325: 6e-4 * (0.1 + 0.9 * 0.5 * (1 + math.sqrt(0.5))),  # tau = 225/900 = 1/4
        550: 6e-4 * 0.55,  # tau = 1/2: 0.1 + 0.9 * 0.5
        1000: 6e-4 * 0.1,  # tau = 1
        1500: 6e-4 * 0.1,  # past t_max: tau clipped to 1
    }
    for step, value in expected.items():
        np.testing.assert_allclose(float(lr(step)), value, rtol=1e-5, atol=1e-12, err_msg=f"step {step}")


def test_cosine_t_max_longer_than_run():
    lr = schedule_of(1000, name="cosine_with_warmup", t_warmup="100ba", alpha_f=0.0, t_max="1900ba")
    # tau = (1000 - 100) / (1900 - 100) = 1/2 -> (1 + cos(pi/2)) / 2 = 0.5
    np.testing.assert_allclose(float(lr(1000)), 3e-4, rtol=1e-5)


def test_linear_decay_with_warmup():
    lr = schedule_of(110, name="linear_decay_with_warmup", t_warmup="10ba", alpha_i=0.8, alpha_f=0.2)
    expected = {0: 0.0, 5: 0.8 * 0.5, 10: 0.8, 60: 0.5, 85: 0.8 - 0.6 * 0.75, 110: 0.2, 500: 0.2}
    for step, multiplier in expected.items():
        np.testing.assert_allclose(float(lr(step)), 6e-4 * multiplier, rtol=1e-5, atol=1e-12, err_msg=f"step {step}")


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_constant_with_warmup(alpha):
    # Composer's ConstantWithWarmupScheduler(alpha): alpha * t / t_warmup while warming up, then alpha
    lr = schedule_of(100, name="constant_with_warmup", t_warmup="10ba", alpha=alpha)
    for step, multiplier in {0: 0.0, 3: 0.3, 10: 1.0, 99: 1.0, 10_000: 1.0}.items():
        np.testing.assert_allclose(float(lr(step)), 6e-4 * alpha * multiplier, rtol=1e-5, atol=1e-12,
                                   err_msg=f"step {step}")


def test_no_warmup_starts_at_peak():
    lr = schedule_of(100, name="cosine_with_warmup", t_warmup="0ba", alpha_f=0.0)
    np.testing.assert_allclose(float(lr(0)), 6e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(50)), 3e-4, rtol=1e-5)


def test_schedule_traces_under_jit():
    lr = schedule_of(1000, name="cosine_with_warmup", t_warmup="100ba", alpha_f=0.1)
    values = jax.jit(jax.vmap(lr))(jnp.array([0, 50, 550], jnp.int32))
    np.testing.assert_allclose(np.asarray(values), [0.0, 3e-4, 3.3e-4], rtol=1e-5)


def test_schedule_errors():
    from jaxtrain.config import ConfigError

    with pytest.raises(ConfigError, match="t_max"):
        schedule_of(1000, name="cosine_with_warmup", t_max="500ba")
    with pytest.raises(ValueError, match="valid names"):
        schedule_of(1000, name="cosine")


def test_a_run_shorter_than_one_batch_says_what_to_train_for():
    from jaxtrain.config import ConfigError, load_config
    from jaxtrain.train.setup import _plan_optimizer

    cfg = load_config(None, ["max_duration=0ba"])
    with pytest.raises(ConfigError, match=r"max_duration: '0ba' is shorter than one batch; train for at least 1ba"):
        _plan_optimizer(cfg, batches_per_epoch=10)


# ----------------------------------------------------------------------------- optimizers


def run_steps(name, grads_per_step, lrs, *, lr_0, weight_decay, betas=(0.9, 0.95), eps=1e-8, params, clipping=None):
    cfg = OptimizerConfig(name=name, lr=lr_0, betas=list(betas), eps=eps, weight_decay=weight_decay)
    lr_table = jnp.asarray(lrs, jnp.float32)
    tx = build_optimizer(cfg, lambda count: lr_table[count], clipping=clipping)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(params)
    update = jax.jit(tx.update)
    history = []
    for grads in grads_per_step:
        grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads)
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append((jax.tree.map(np.asarray, params), float(current_lr(state))))
    return history


def test_decoupled_adamw_two_steps_by_hand():
    p0, g1, g2 = np.array([1.0, -2.0]), np.array([0.5, -0.1]), np.array([-0.2, 0.3])
    b1, b2, eps, wd, lr_0, lrs = 0.9, 0.95, 1e-8, 0.01, 0.1, [0.05, 0.1]
    # Step 1: decay by (lr_t/lr_0)*wd, then Adam with bias correction (t = 1).
    m1, v1 = 0.1 * g1, 0.05 * g1**2
    p1 = p0 * (1 - 0.5 * wd) - 0.05 / (1 - b1) * m1 / (np.sqrt(v1) / np.sqrt(1 - b2) + eps)
    # Step 2 (t = 2): the moments carry step 1's gradient.
    m2, v2 = b1 * m1 + 0.1 * g2, b2 * v1 + 0.05 * g2**2
    p2 = p1 * (1 - 1.0 * wd) - 0.1 / (1 - b1**2) * m2 / (np.sqrt(v2) / np.sqrt(1 - b2**2) + eps)
    history = run_steps("decoupled_adamw", [{"p": g1}, {"p": g2}], lrs, lr_0=lr_0, weight_decay=wd, params={"p": p0})
    np.testing.assert_allclose(history[0][0]["p"], p1, rtol=1e-6)
    np.testing.assert_allclose(history[1][0]["p"], p2, rtol=1e-6)
    assert history[0][1] == pytest.approx(0.05) and history[1][1] == pytest.approx(0.1)


def test_adamw_decay_is_multiplied_by_lr():
    p0, g = np.array([1.0, -2.0]), np.array([0.5, -0.1])
    b1, b2, eps, wd, lr = 0.9, 0.95, 1e-8, 0.01, 0.05
    m, v = 0.1 * g, 0.05 * g**2
    expected = p0 * (1 - lr * wd) - lr / (1 - b1) * m / (np.sqrt(v) / np.sqrt(1 - b2) + eps)
    history = run_steps("adamw", [{"p": g}], [lr], lr_0=0.1, weight_decay=wd, params={"p": p0})
    np.testing.assert_allclose(history[0][0]["p"], expected, rtol=1e-6)


def test_decoupled_versus_coupled_decay_with_zero_gradient():
    # A zero gradient makes the Adam step 0, leaving the decay alone: decoupled scales p by
    # 1 - (lr/lr_0)*wd = 1 - 0.01, coupled by 1 - lr*wd = 1 - 0.001.
    p0, zero = np.array([2.0, -4.0]), np.zeros(2)
    common = dict(lr_0=0.1, weight_decay=0.01, params={"p": p0})
    decoupled = run_steps("decoupled_adamw", [{"p": zero}], [0.1], **common)[0][0]["p"]
    coupled = run_steps("adamw", [{"p": zero}], [0.1], **common)[0][0]["p"]
    np.testing.assert_allclose(decoupled, p0 * 0.99, rtol=1e-7)
    np.testing.assert_allclose(coupled, p0 * 0.999, rtol=1e-7)


def test_decoupled_lionw_two_steps_by_hand():
    b1, b2, wd, lr_0, lrs = 0.9, 0.99, 0.1, 1e-3, [1e-3, 5e-4]
    p0 = np.array([1.0, -2.0, 0.5])
    g1 = np.array([1.0, -0.4, 0.0])
    g2 = np.array([-0.001, -0.2, 0.3])
    # Step 1: m = 0, so u = sign(0.1*g1) = [1, -1, 0].
    p1 = p0 * (1 - 1.0 * wd) - 1e-3 * np.array([1.0, -1.0, 0.0])
    m1 = 0.01 * g1  # [0.01, -0.004, 0]
    # Step 2: u = sign(0.9*m1 + 0.1*g2) = sign([0.0089, -0.0236, 0.03]); the momentum wins element 0.
    u2 = np.sign(0.9 * m1 + 0.1 * g2)
    np.testing.assert_array_equal(u2, [1.0, -1.0, 1.0])
    p2 = p1 * (1 - 0.5 * wd) - 5e-4 * u2
    history = run_steps(
        "decoupled_lionw", [{"p": g1}, {"p": g2}], lrs, lr_0=lr_0, weight_decay=wd, betas=(b1, b2), params={"p": p0}
    )
    np.testing.assert_allclose(history[0][0]["p"], p1, rtol=1e-6)
    np.testing.assert_allclose(history[1][0]["p"], p2, rtol=1e-6)


def test_clip_by_global_norm_matches_torch_formula():
    grads = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}  # global norm 5
    clipped, _ = clip_by_global_norm_torch(1.0).update(grads, optax.EmptyState())
    coef = 1.0 / (5.0 + 1e-6)  # torch: max_norm / (norm + 1e-6), at most 1
    np.testing.assert_allclose(clipped["a"], [3 * coef, 0.0], rtol=1e-6)
    np.testing.assert_allclose(clipped["b"], [4 * coef], rtol=1e-6)
    small, _ = clip_by_global_norm_torch(10.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(small["b"], [4.0])


@pytest.mark.parametrize(
    "clipping, clipped_first_grad",
    [
        (GradientClippingConfig("norm", 1.0), np.array([3.0, -4.0]) / (5.0 + 1e-6)),
        (GradientClippingConfig("value", 0.5), np.array([0.5, -0.5])),
    ],
)
def test_clipping_runs_before_the_optimizer(clipping, clipped_first_grad):
    # Step 1 is clipped, step 2 (norm 0.05) is not; the moments must carry the clipped gradient.
    g1, g2 = np.array([3.0, -4.0]), np.array([0.03, 0.04])
    p0, kwargs = np.array([1.0, 1.0]), dict(lr_0=0.1, weight_decay=0.0, eps=1e-3)
    with_clip = run_steps("adamw", [{"p": g1}, {"p": g2}], [0.1, 0.1], params={"p": p0}, clipping=clipping, **kwargs)
    by_hand = run_steps("adamw", [{"p": clipped_first_grad}, {"p": g2}], [0.1, 0.1], params={"p": p0}, **kwargs)
    np.testing.assert_allclose(with_clip[1][0]["p"], by_hand[1][0]["p"], rtol=1e-6)
    unclipped = run_steps("adamw", [{"p": g1}, {"p": g2}], [0.1, 0.1], params={"p": p0}, **kwargs)
    assert not np.allclose(unclipped[1][0]["p"], by_hand[1][0]["p"], rtol=1e-4)


@pytest.mark.parametrize("name", ["adamw", "decoupled_adamw"])
def test_matches_torch_adamw_reference(name):
    ref = json.loads(REFERENCE.read_text())
    history = run_steps(
        name,
        ref["grads"],
        ref["lrs"],
        lr_0=ref["lr_0"],
        weight_decay=ref["weight_decay"],
        betas=tuple(ref["betas"]),
        eps=ref["eps"],
        params=ref["params0"],
    )
    for step, (params, _) in enumerate(history):
        for key in ("w", "b"):
            np.testing.assert_allclose(params[key], np.asarray(ref[name][step][key]), rtol=2e-6, atol=1e-7)


def test_unknown_optimizer_is_an_error():
    with pytest.raises(ValueError, match="valid names"):
        build_optimizer(OptimizerConfig(name="sgd"), lambda count: 0.1, clipping=None)
