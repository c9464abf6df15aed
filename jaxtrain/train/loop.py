"""The training loop: steps, held-out evaluation, checkpoints, logging, and events.

Host work (logging, checkpoints, callbacks) happens around the compiled step. A step's metrics
are fetched one step late, after the next step has been dispatched, so the device never waits
for the host.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from typing import Any

import jax
from absl import logging

from jaxtrain.checkpoint.load import TOKENIZER_FILE, load_checkpoint
from jaxtrain.checkpoint.manager import Checkpointer, abstract_like
from jaxtrain.config import ConfigError, config_to_dict
from jaxtrain.metrics.flops import ThroughputMeter
from jaxtrain.metrics.loggers import ConsoleProgress, JSONLLogger, TensorBoardLogger
from jaxtrain.parallel.mesh import global_batch_from_local
from jaxtrain.train.events import Event, EventBus
from jaxtrain.train.setup import RunParts, interval_batches

EXIT_INTERRUPTED = 130  # the run stopped on SIGINT/SIGTERM after saving a checkpoint


@dataclasses.dataclass
class FitResult:
    step: int
    interrupted: bool
    train_loss: float | None
    eval_loss: float | None
    first_eval_loss: float | None
    tokens_per_second: float | None
    mfu: float | None
    wall_seconds: float
    seconds_to_first_step: float | None


class Trainer:
    """Runs a built ``RunParts`` to ``max_duration``, resuming from ``save_folder`` if asked."""

    def __init__(self, parts: RunParts, *, callbacks: list | None = None, started: float | None = None):
        """``started``: a ``time.perf_counter()`` reading from process start, for time to first step."""
        self.started = started
        self.parts = parts
        self.cfg = parts.cfg
        self.state = parts.state
        self.events = EventBus(callbacks)
        self.step = 0
        self.last_metrics: dict[str, float] = {}
        self.eval_history: list[tuple[int, float]] = []
        self._stop_signal: int | None = None
        cfg = self.cfg
        self.eval_every = interval_batches(cfg, cfg.eval_interval, "eval_interval", parts)
        self.save_every = interval_batches(cfg, cfg.save_interval, "save_interval", parts) if cfg.save_folder else 0
        self.log_every = interval_batches(cfg, cfg.console_log_interval, "console_log_interval", parts) or 1
        os.makedirs(cfg.run_folder, exist_ok=True)
        self.metrics_file = JSONLLogger(os.path.join(cfg.run_folder, "metrics.jsonl"))
        self.tensorboard = (
            TensorBoardLogger(os.path.join(cfg.run_folder, "tensorboard")) if "tensorboard" in cfg.loggers else None
        )
        window = int((cfg.callbacks.get("speed_monitor") or {}).get("window_size", 10))
        self.meter = ThroughputMeter(window_size=window, num_devices=jax.device_count())
        self.checkpointer = (
            Checkpointer(cfg.save_folder, keep=cfg.save_num_checkpoints_to_keep) if cfg.save_folder else None
        )

    # ------------------------------------------------------------------ checkpoints

    def _meta(self) -> dict[str, Any]:
        return {
            "loader": self.parts.train_loader.state_dict(),
            "config": config_to_dict(self.cfg),
            "layout": {"scan_layers": bool(self.cfg.model.scan_layers), "n_layers": self.cfg.model.n_layers},
            "eval_history": self.eval_history,
        }

    def load_weights(self, path: str) -> None:
        """Start from the parameters of another run's checkpoint (the optimizer starts fresh)."""
        loaded = load_checkpoint(path, shardings=self.parts.state_shardings.params)
        ours = jax.tree_util.tree_flatten_with_path(self.state.params)[0]
        theirs = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_flatten_with_path(loaded.params)[0])
        for key, value in ours:
            other = theirs.get(jax.tree_util.keystr(key))
            if other is None or other.shape != value.shape:
                found = "missing" if other is None else f"shape {other.shape}"
                raise ConfigError(
                    f"load_path: {path}: parameter {jax.tree_util.keystr(key)} is {found}, the model needs "
                    f"shape {value.shape}; make the model section match the checkpoint's"
                )
        self.state = self.state.replace(params=loaded.params)
        self.print(f"loaded weights from {path} (step {loaded.step}); optimizer state is fresh")

    def maybe_resume(self) -> None:
        latest = self.checkpointer.latest_step() if self.checkpointer is not None else None
        if latest is None:
            if self.cfg.load_path:
                self.load_weights(self.cfg.load_path)
            return
        if not self.cfg.autoresume:
            if self.cfg.save_overwrite:
                return
            raise ConfigError(
                f"save_folder: {self.cfg.save_folder} already holds checkpoints (latest step {latest}); "
                "set autoresume: true to continue, save_overwrite: true to start over, or pick another folder"
            )
        self.state, meta = self.checkpointer.restore(latest, abstract_like(self.state))
        self.parts.train_loader.load_state_dict(meta["loader"])
        self.eval_history = [tuple(item) for item in meta.get("eval_history", [])]
        self.step = int(jax.device_get(self.state.step))
        self.print(f"resumed from {self.checkpointer.folder} at step {self.step}")

    def _save_tokenizer(self) -> None:
        """Keep the tokenizer beside the checkpoints, so generation and export need nothing else."""
        if self.checkpointer is None or jax.process_index() != 0 or "://" in self.checkpointer.folder:
            return
        os.makedirs(self.checkpointer.folder, exist_ok=True)
        self.parts.tokenizer.save(os.path.join(self.checkpointer.folder, TOKENIZER_FILE))

    def save(self, *, force: bool = False) -> None:
        if self.checkpointer is None:
            return
        if self.checkpointer.save(self.step, self.state, self._meta(), force=force):
            self.events.fire(Event.CHECKPOINT, self)

    # ------------------------------------------------------------------ eval

    def evaluate(self) -> float | None:
        loader = self.parts.eval_loader
        if loader is None:
            return None
        self.events.fire(Event.EVAL_START, self)
        batch_size = self.cfg.device_eval_batch_size * jax.device_count()
        limit = self.cfg.eval_subset_num_batches
        totals = None
        for index, local in enumerate(loader.batches(batch_size)):
            if 0 <= limit <= index:
                break
            batch = global_batch_from_local(local, self.parts.mesh)
            out = self.parts.eval_step(self.state.params, batch)
            totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
        if totals is None:
            return None
        totals = jax.device_get(totals)
        loss = float(totals["loss_sum"] / max(float(totals["tokens"]), 1.0))
        self.eval_history.append((self.step, loss))
        record = {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
        self._write_metrics(record)
        self.print(f"step {self.step}: held-out loss {loss:.4f}, perplexity {record['eval/perplexity']:.2f}")
        self.events.fire(Event.EVAL_END, self)
        return loss

    # ------------------------------------------------------------------ logging

    def print(self, message: str) -> None:
        if self.progress is not None:
            self.progress.print_line(message)
        else:
            print(message, flush=True)

    def _write_metrics(self, record: dict[str, float], step: int | None = None) -> None:
        step = self.step if step is None else step
        self.metrics_file.log_metrics(step, record)
        if self.tensorboard is not None:
            self.tensorboard.log_metrics(step, record)

    def _on_step_done(self, step: int, device_metrics: dict[str, jax.Array], tokens: int, *, timed: bool = True) -> None:
        metrics = {key: float(value) for key, value in jax.device_get(device_metrics).items()}
        if timed:  # the first step includes compilation, so it gets no throughput figure
            now = time.perf_counter()
            self.meter.update(now, tokens=tokens, flops=self.parts.flops_per_batch, samples=self.cfg.global_train_batch_size)
            metrics.update(self.meter.summary(self.parts.peak_flops_per_device))
        self.last_metrics = metrics
        self.events.fire(Event.BATCH_END, self)
        if step % self.log_every == 0 or step == self.parts.total_batches:
            record = {f"train/{k}": v for k, v in metrics.items() if k != "finite"}
            self._write_metrics(record, step)
            if self.progress is not None:
                self.progress.update(step, metrics)

    # ------------------------------------------------------------------ signals

    def _install_signal_handlers(self) -> dict:
        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    # ------------------------------------------------------------------ fit

    def fit(self) -> FitResult:
        """Train to ``max_duration``. SIGINT/SIGTERM end the run after the current step with a
        checkpoint (a second signal stops at once); the handlers stay until the final save is done."""
        previous_handlers = self._install_signal_handlers()
        try:
            return self._fit()
        finally:
            for sig, old in previous_handlers.items():
                signal.signal(sig, old)

    def _fit(self) -> FitResult:
        start_wall = time.perf_counter()
        cfg, parts = self.cfg, self.parts
        self.progress = None
        self.maybe_resume()
        self.progress = ConsoleProgress(
            parts.total_batches, self.step, enabled=cfg.progress_bar, log_every=self.log_every
        )
        self._save_tokenizer()
        self.events.fire(Event.FIT_START, self)
        first_eval = self.eval_history[0][1] if self.eval_history else None
        if cfg.eval_first and self.step == 0 and not self.eval_history:
            first_eval = self.evaluate()
        self.meter.start(time.perf_counter())
        tokens_per_batch = cfg.global_train_batch_size * cfg.max_seq_len
        pending: tuple[int, Any] | None = None
        seconds_to_first_step = None
        loader_iter = iter(parts.train_loader)
        while self.step < parts.total_batches and self._stop_signal is None:
            self.events.fire(Event.BATCH_START, self)
            batch = global_batch_from_local(next(loader_iter), parts.mesh)
            self.state, metrics = parts.train_step(self.state, batch)
            self.step += 1
            if pending is not None:
                self._on_step_done(*pending, tokens_per_batch)
            pending = (self.step, metrics)
            if seconds_to_first_step is None:
                jax.block_until_ready(metrics)
                seconds_to_first_step = time.perf_counter() - (self.started or start_wall)
                self._on_step_done(*pending, tokens_per_batch, timed=False)
                pending = None
                self.meter.start(time.perf_counter())
            if self.eval_every and self.step % self.eval_every == 0:
                self._on_step_done(*pending, tokens_per_batch)
                pending = None
                loss = self.evaluate()
                first_eval = loss if first_eval is None else first_eval
                self.meter.start(time.perf_counter())
            if self.save_every and self.step % self.save_every == 0:
                self.save()
        if pending is not None:
            self._on_step_done(*pending, tokens_per_batch)
            pending = None
        interrupted = self._stop_signal is not None and self.step < parts.total_batches
        eval_loss = None
        if interrupted:
            self.print(f"stopping at step {self.step} ({signal.Signals(self._stop_signal).name}); saving a checkpoint")
        elif self.eval_every or parts.eval_loader is not None:
            last_eval_step = self.eval_history[-1][0] if self.eval_history else -1
            eval_loss = self.evaluate() if last_eval_step != self.step else self.eval_history[-1][1]
        if self.checkpointer is not None:
            if self.checkpointer.latest_step() != self.step:
                self.save(force=True)
            self.checkpointer.close()
        self.events.fire(Event.FIT_END, self)
        self.progress.close()
        self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return FitResult(
            step=self.step,
            interrupted=interrupted,
            train_loss=self.last_metrics.get("loss"),
            eval_loss=eval_loss,
            first_eval_loss=first_eval,
            tokens_per_second=self.last_metrics.get("tokens_per_second"),
            mfu=self.last_metrics.get("mfu"),
            wall_seconds=time.perf_counter() - start_wall,
            seconds_to_first_step=seconds_to_first_step,
        )


def write_summary(path: str, result: FitResult) -> None:
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)

