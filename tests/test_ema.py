"""The moving average of the weights (``algorithms.ema``) against Composer's EMA algorithm.

``fixtures/ema/reference.json`` holds the weights Composer 0.32.1's ``EMA`` evaluates with after
each batch of a short run (written by ``fixtures/ema/make_reference.py``); jaxtrain's average must
be those weights, batch for batch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxtrain.algorithms.ema import EMAPlan, ema_plan, init_ema, update_ema
from jaxtrain.config import ConfigError, load_config_dict
from jaxtrain.config.schema import EMAConfig

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "ema" / "reference.json").read_text())


def weights(n: float) -> list[float]:  # as make_reference.py sets them after batch n
    return [float(n), 0.1 * n * n, math.sin(n), 1.0 / n, -2.0 * n + 3.0, math.cos(0.5 * n)]


@pytest.mark.parametrize("case", REFERENCE, ids=[json.dumps(case["config"]) for case in REFERENCE])
def test_the_average_is_composers_batch_for_batch(case):
    plan = ema_plan(EMAConfig(**case["config"]), batches_per_epoch=case["batches_per_epoch"], total_batches=case["batches"])
    ema = init_ema({"w": jnp.asarray(weights(0.5), jnp.float32)})
    for n, expected in enumerate(case["evaluated"], start=1):
        ema = update_ema(plan, ema, {"w": jnp.asarray(weights(n), jnp.float32)}, jnp.int32(n), jnp.bool_(True))
        np.testing.assert_allclose(np.asarray(ema["w"]), expected, rtol=2e-6, atol=2e-6, err_msg=f"batch {n}")


def test_a_skipped_step_leaves_the_average_alone():
    plan = EMAPlan(start=1, every=1, smoothing=0.5)
    ema = {"w": jnp.asarray([1.0, 2.0])}
    params = {"w": jnp.asarray([3.0, 4.0])}
    kept = update_ema(plan, ema, params, jnp.int32(5), jnp.bool_(False))
    np.testing.assert_array_equal(kept["w"], [1.0, 2.0])
    np.testing.assert_array_equal(update_ema(plan, ema, params, jnp.int32(5), jnp.bool_(True))["w"], [2.0, 3.0])


def test_defaults_and_plans():
    assert ema_plan(EMAConfig(), batches_per_epoch=None, total_batches=50) == EMAPlan(1, 1, 2.0 ** (-1 / 1000))
    assert ema_plan(EMAConfig(smoothing=0.9, ema_start="0.5dur"), batches_per_epoch=None,
                    total_batches=7) == EMAPlan(4, 1, 0.9)
    with pytest.raises(ConfigError, match="algorithms.ema: times in epochs need the dataset's length"):
        ema_plan(EMAConfig(half_life="2ep"), batches_per_epoch=None, total_batches=10)


@pytest.mark.parametrize("ema, message", [
    ({"half_life": "10ba", "smoothing": 0.9}, "algorithms.ema: half_life and smoothing both set the average's decay: "
                                              "keep one of them"),
    ({"half_life": "0.5dur"}, "algorithms.ema.half_life: '0.5dur' must be a positive number of batches or epochs"),
    ({"half_life": "0ba"}, "algorithms.ema.half_life: '0ba' must be a positive number of batches or epochs"),
    ({"smoothing": 1.0}, "algorithms.ema.smoothing: 1.0 must be between 0 and 1"),
    ({"half_life": "10ep", "update_interval": "2ba"}, "algorithms.ema.update_interval: '2ba' and half_life '10ep' "
                                                      "must count the same unit"),
    ({"update_interval": "100tok"}, "algorithms.ema.update_interval: '100tok' must be a whole number of batches or "
                                    "epochs"),
    ({"ema_start": "1000tok"}, "algorithms.ema.ema_start: '1000tok' must be in dur, ba or ep"),
])
def test_settings_composer_refuses_are_one_line_errors(ema, message):
    with pytest.raises(ConfigError) as error:
        load_config_dict({"algorithms": {"ema": ema}})
    assert message in str(error.value) and "\n" not in str(error.value)


# ----------------------------------------------------------------------------- in training

def _tiny_run(tmp_path, *overrides):
    from jaxtrain.config import load_config
    from test_end_to_end import ROOT, TINY

    return load_config(str(ROOT / "configs" / "quickstart.yaml"), [
        *TINY, "max_duration=6ba", "eval_interval=6ba", "save_interval=6ba", "eval_first=false",
        f"run_folder={tmp_path}/run", f"save_folder={tmp_path}/checkpoints", "log_to_console=false",
        "algorithms.ema.half_life=2ba", "algorithms.ema.ema_start=3ba", *overrides])


def test_training_keeps_evaluates_saves_and_resumes_the_average(tmp_path):
    import contextlib
    import io
    import json
    import shutil

    import jax

    from jaxtrain.checkpoint.load import load_checkpoint
    from jaxtrain.parallel.mesh import global_batch_from_local
    from jaxtrain.train.events import Callback, Event
    from jaxtrain.train.loop import Trainer
    from jaxtrain.train.setup import build_run, eval_batch_size

    def copy(state):  # copied out before the next step takes (donates) the state's buffers
        return jax.tree.map(lambda a: np.array(a, copy=True), (state.params, state.ema))

    class Record(Callback):  # the weights and the average before each step
        def __init__(self):
            self.seen = {}

        def run_event(self, event, loop):
            if event == Event.BATCH_START:
                self.seen[int(loop.state.step)] = copy(loop.state)

    cfg = _tiny_run(tmp_path, "save_interval=3ba")
    with contextlib.redirect_stdout(out := io.StringIO()):
        parts = build_run(cfg)
        record = Record()
        trainer = Trainer(parts, callbacks=[record])
        trainer.fit()
        uninterrupted = jax.tree.map(np.asarray, trainer.state.ema)
        record.seen[6] = copy(trainer.state)
    # the step's average: a copy of the weights up to batch 3, where it starts, then one update
    # per batch with a half life of 2 batches
    assert sorted(record.seen) == list(range(7))
    smoothing, expected = 2.0 ** -0.5, None
    for step in range(1, 7):
        params, ema = record.seen[step]
        expected = params if step <= 3 else jax.tree.map(lambda e, p: smoothing * e + (1 - smoothing) * p,
                                                         expected, params)
        jax.tree.map(lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7), ema, expected)
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), *record.seen[6]))) > 0
    with contextlib.redirect_stdout(out):
        # killed before step 6 was saved: the same command resumes from step 3 and ends with the same average
        shutil.rmtree(tmp_path / "checkpoints" / "6")
        trainer = Trainer(parts)
        trainer.fit()
    parts.train_loader.close()
    assert "at step 3" in out.getvalue()
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), trainer.state.ema, uninterrupted)
    loaded = load_checkpoint(f"{tmp_path}/checkpoints")
    assert loaded.averaged and loaded.step == 6
    from jaxtrain.train.resume_settings import tokenizer_record

    assert loaded.meta["tokenizer"] == tokenizer_record(parts.tokenizer)  # what a moved tokenizer is checked against
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 loaded.params, trainer.state.ema)

    def held_out_loss(params):
        sums = [parts.eval_step(params, global_batch_from_local(local, parts.mesh))
                for local, _ in zip(parts.eval_loader.batches(eval_batch_size(cfg)), range(cfg.eval_subset_num_batches))]
        return sum(float(s["loss_sum"]) for s in sums) / sum(float(s["tokens"]) for s in sums)

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [record["eval/loss"] for record in records if "eval/loss" in record][-1]
    assert logged == pytest.approx(held_out_loss(trainer.state.ema), rel=1e-6)
    assert abs(logged - held_out_loss(trainer.state.params)) > 1e-4
    # load_path: a new run starts from the average (the checkpoint's weights, as Composer saves
    # them), and its own average starts there too
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.load_weights(f"{tmp_path}/checkpoints")
    for tree in (trainer.state.params, trainer.state.ema):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree, loaded.params)


def test_a_checkpoint_written_before_the_state_had_an_average_restores(tmp_path):
    """Checkpoints hold the state's fields by name, without the average when there is none: one
    written when the state had no ``ema`` field (saved as that dataclass) restores as it was."""
    import jax
    from flax import struct

    from jaxtrain.checkpoint.manager import Checkpointer, abstract_like
    from jaxtrain.train.state import TrainState, checkpoint_items

    @struct.dataclass
    class EarlierTrainState:  # the fields, in order, of the state before the average
        step: jax.Array
        params: dict
        opt_state: tuple
        rng: jax.Array
        loss_window: jax.Array
        window_count: jax.Array
        lr_scale: jax.Array

    earlier = EarlierTrainState(step=jnp.int32(7), params={"w": jnp.arange(4.0)}, opt_state=(jnp.ones(4),),
                                rng=jnp.zeros(2, jnp.uint32), loss_window=jnp.zeros(3), window_count=jnp.int32(2),
                                lr_scale=jnp.float32(0.5))
    saving = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    saving.save(7, earlier, {"note": "earlier"}, force=True)
    saving.close()
    like = TrainState(**{name: jax.tree.map(jnp.zeros_like, value) for name, value in vars(earlier).items()})
    assert like.ema is None and "ema" not in checkpoint_items(like)
    reading = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
    items, meta = reading.restore(7, abstract_like(checkpoint_items(like)))
    reading.close()
    restored = TrainState(**items)
    assert meta["note"] == "earlier" and int(restored.step) == 7 and float(restored.lr_scale) == 0.5
    np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
